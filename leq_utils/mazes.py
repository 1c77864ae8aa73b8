"""The built-in PointMaze world: maze layouts, the evaluation env, and the dataset generator.

This project's machines cannot download D4RL, so it ships tasks it can make itself: real MuJoCo
physics from gymnasium-robotics `PointMaze_*-v3` on D4RL's maze layouts, with AntMaze's
semantics (fixed start and goal cells, reward 1 and the episode's end within 0.5 of the goal).
tasks.py names the tasks and calls this module for their environments and datasets:
  * layouts and cell geometry                      -> MAZES, maze_cells, cell_xy, maze_geometry
  * the evaluation environment                      -> make_pointmaze
  * the "diverse" dataset generator (D4RL-format)   -> generate_pointmaze, builtin_dataset_path
  * the waypoint controller, the task's "expert"    -> waypoint_action, controller_success
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import time
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

DATA_DIR = Path(os.environ.get("LEQ_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))

# ============================================================================================
# Layouts
# ============================================================================================

# Maze layouts: '#' wall, '.' free, 'R' start cell, 'G' goal cell; row 0 is the top row.
# umaze/medium/large are D4RL's U_MAZE_TEST / BIG_MAZE_TEST / HARDEST_MAZE_TEST; ultra is the
# 12x16 ULTRA_MAZE_TEST of the TAP paper's D4RL fork (docs/ALGORITHM.md, section 2).
MAZES = {
    "umaze": ["#####",
              "#R..#",
              "###.#",
              "#G..#",
              "#####"],
    "medium": ["########",
               "#R.##..#",
               "#..#...#",
               "##...###",
               "#..#...#",
               "#.#..#.#",
               "#...#.G#",
               "########"],
    "large": ["############",
              "#R...#.....#",
              "#.##.#.#.#.#",
              "#......#...#",
              "#.####.###.#",
              "#..#.#.....#",
              "##.#.#.#.###",
              "#..#...#.G.#",
              "############"],
    "ultra": ["################",
              "#R......#......#",
              "#.###.#.#.##.#.#",
              "#.###.#....#.#.#",
              "#...#.##.###.#.#",
              "#.#...#........#",
              "#...#...#.###.##",
              "#.#.###.#...#.##",
              "#.......#.#....#",
              "##.##.#...####.#",
              "##.#..#.#.....G#",
              "################"],
}
# Built-in PointMaze tasks: evaluation episode limit (about 2.5x the controller's time to the
# goal, see docs/TASKS.md) and default dataset size (transitions, in 1000-step episodes).
POINTMAZE_LIMITS = {"umaze": 300, "medium": 600, "large": 800, "ultra": 1200}
POINTMAZE_SIZES = {"umaze": 200_000, "medium": 400_000, "large": 600_000, "ultra": 1_000_000}
# The data policy: the waypoint controller aiming at a random point of the next cell (jitter, so
# that the data also touches walls and the world model can learn them) plus N(0, noise^2), and,
# with probability DATA_EXCURSION per step, a 10-40-step excursion towards a random point up to
# 1.5 cells away (often inside a wall: the point pushes against it; see docs/TASKS.md). With
# probability `dash` an excursion is a dash instead: full throttle in a random direction, with the
# smaller noise DASH_NOISE, so that the point hits walls at top speed as a learnt actor does.
DATA_NOISE, DATA_JITTER, DATA_EXCURSION, DATA_DASH, DATA_VERSION = 1.0, 0.4, 0.02, 0.0, 3
DASH_NOISE = 0.3
GOAL_RADIUS = 0.5  # PointMaze: success (reward 1, episode end) when ||xy - goal|| < 0.5


def maze_cells(layout, char):
    return [(i, j) for i, row in enumerate(layout) for j, c in enumerate(row) if c in char]


def cell_xy(layout, cell):
    """Centre of a maze cell in gymnasium-robotics coordinates (maze scaling 1, centred)."""
    height, width = len(layout), len(layout[0])
    return np.array([cell[1] + 0.5 - width / 2, height / 2 - cell[0] - 0.5])



def maze_geometry(task):
    """(wall cell centres (n, 2), start xy, goal xy, cell size) in the env's coordinates."""
    layout = MAZES[task.maze]
    if task.family == "pointmaze":
        walls = np.array([cell_xy(layout, c) for c in maze_cells(layout, "#")])
        return walls, cell_xy(layout, maze_cells(layout, "R")[0]), np.asarray(task.goal), 1.0
    # D4RL AntMaze: cell (i, j) at (4 j, 4 i) minus the start cell's position
    start = np.array(maze_cells(layout, "R")[0][::-1], float) * 4.0
    walls = np.array([np.array([j, i]) * 4.0 - start for i, j in maze_cells(layout, "#")])
    return walls, np.zeros(2), np.asarray(task.goal), 4.0



# ============================================================================================
# The evaluation environment
# ============================================================================================

def import_gymnasium_robotics():
    import gymnasium
    with contextlib.redirect_stderr(io.StringIO()):  # silence an unrelated Adroit notice
        import gymnasium_robotics
    gymnasium.register_envs(gymnasium_robotics)
    return gymnasium


def render_help() -> str:
    """What rendering the built-in envs needs: MuJoCo's own bindings, whose backend MUJOCO_GL picks."""
    gl = os.environ.get("MUJOCO_GL")
    needs = {"egl": "EGL (Debian: libegl1, with a GPU driver or Mesa's libegl-mesa0)",
             "osmesa": "OSMesa (Debian: apt-get install libosmesa6)", "glfw": "a display (X11 or Wayland)"}
    if gl in needs:
        return (f"MUJOCO_GL={gl} needs {needs[gl]}; without a display use MUJOCO_GL=egl (GPU) or "
                f"MUJOCO_GL=osmesa (CPU)")
    return (f"MUJOCO_GL is {'not set' if gl is None else repr(gl)}: set MUJOCO_GL=egl (GPU; Debian libegl1) "
            f"or MUJOCO_GL=osmesa (CPU; Debian libosmesa6)")


def make_pointmaze(task, max_episode_steps: Optional[int] = None, render_mode=None):
    """gymnasium-robotics PointMaze_*-v3 with AntMaze's evaluation semantics: fixed start cell
    (uniform +-0.25 noise from the seed) and fixed goal cell centre, 4-d observation
    (x, y, vx, vy; no goal), reward 1 and episode end when ||xy - goal|| < 0.5."""
    gymnasium = import_gymnasium_robotics()
    layout = MAZES[task.maze]
    maze_map = [[1 if c == "#" else 0 for c in row] for row in layout]
    inner = gymnasium.make("PointMaze_UMaze-v3", maze_map=maze_map, continuing_task=True,
                           reset_target=False, render_mode=render_mode,
                           max_episode_steps=max_episode_steps or task.max_episode_steps)
    start, goal = maze_cells(layout, "R")[0], maze_cells(layout, "G")[0]

    class PointMazeTask(gymnasium.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.observation_space = env.observation_space["observation"]
            self.goal = np.asarray(task.goal)

        def reset(self, *, seed=None, options=None):
            obs, info = self.env.reset(seed=seed, options=dict(reset_cell=np.array(start),
                                                               goal_cell=np.array(goal)))
            self.env.unwrapped.goal = self.goal.copy()  # no goal noise: the exact cell centre
            self.env.unwrapped.update_target_site_pos()
            return obs["observation"], info

        def step(self, action):
            obs, _, _, truncated, info = self.env.step(action)
            success = bool(np.linalg.norm(obs["observation"][:2] - self.goal) < GOAL_RADIUS)
            info["success"] = success
            return obs["observation"], float(success), success, truncated, info

    return PointMazeTask(inner)



# ============================================================================================
# The waypoint controller and the dataset generator
# ============================================================================================

def bfs_distances(layout, target):
    """Grid shortest-path distance (in cells) from every free cell to `target`."""
    dist = np.full((len(layout), len(layout[0])), np.inf)
    dist[target] = 0
    queue = collections.deque([target])
    while queue:
        i, j = queue.popleft()
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if layout[a][b] != "#" and dist[a, b] > dist[i, j] + 1:
                dist[a, b] = dist[i, j] + 1
                queue.append((a, b))
    return dist


def xy_cells(layout, xy, xp=np):
    """The maze cells (rows, columns) of points xy (..., 2), as integer arrays; xp is numpy or
    jax.numpy (for jitted code)."""
    return (xp.floor(len(layout) / 2 - xy[..., 1]).astype(int), xp.floor(xy[..., 0] + len(layout[0]) / 2).astype(int))


def obs_cell(layout, obs):
    """The maze cell (row, column) the point is in."""
    i, j = xy_cells(layout, np.asarray(obs[:2]))
    return int(i), int(j)


def waypoint_action(layout, dist, target_cell, obs, offset=(0.0, 0.0), kp=10.0, kd=1.0):
    """The maze2d-style controller: head for the centre (+ offset) of the neighbouring cell
    closest to the target, or for the target itself once in its cell, with a PD law clipped to
    [-1, 1]."""
    cell = obs_cell(layout, obs)
    if cell == tuple(target_cell) or not np.isfinite(dist[cell]):
        waypoint = cell_xy(layout, target_cell)
    else:
        i, j = cell
        waypoint = cell_xy(layout, min(((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)), key=lambda c: dist[c]))
    return pd_action(obs, waypoint + np.asarray(offset), kp, kd)


def pd_action(obs, point, kp=10.0, kd=1.0):
    """PD control of the point towards `point`, clipped to [-1, 1]."""
    return np.clip(kp * (point - obs[:2]) - kd * obs[2:4], -1.0, 1.0)



def builtin_dataset_path(task, data_dir=None, size=None, seed=0) -> Path:
    size = size or POINTMAZE_SIZES[task.maze]
    return Path(data_dir or DATA_DIR) / f"{task.name}_{size // 1000}k_seed{seed}_v{DATA_VERSION}.hdf5"


def generate_pointmaze(task, path: Path, size=None, seed=0, noise=DATA_NOISE, jitter=DATA_JITTER,
                       episode_len=1000, excursion=DATA_EXCURSION, dash=DATA_DASH):
    """A "diverse" dataset the way D4RL made its mazes: each 1000-step episode starts in a random
    free cell; the waypoint controller (aiming at the next cell's centre plus a uniform offset in
    [-jitter, jitter]^2, redrawn in every cell) plus N(0, noise^2) action noise drives to random
    goal cells one after another. With probability `excursion` per step it leaves for 10-40 steps
    to a random point within +-1.5 cells (PD control, same noise), so the data pushes into walls
    as a clumsy ant's does; with probability `dash` that excursion is a dash (full throttle in a
    random direction, noise DASH_NOISE), which hits walls at top speed. Rewards/terminals are relabelled for the evaluation goal (1 when
    ||xy' - goal|| < 0.5; the trajectory goes on); timeouts end each episode. Deterministic for a
    seed; written atomically in D4RL's format."""
    from tqdm import tqdm
    size = size or POINTMAZE_SIZES[task.maze]
    layout, rng = MAZES[task.maze], np.random.default_rng(seed)
    free = maze_cells(layout, ".RG")
    dists = {c: bfs_distances(layout, c) for c in free}
    env = make_pointmaze(task).unwrapped  # stepped directly: no time limit, no wrapper overhead
    goal = np.asarray(task.goal)
    keys = dict(observations=(size, 4), actions=(size, 2), rewards=(size,), terminals=(size,),
                timeouts=(size,), goals=(size, 2))
    out = {k: np.zeros(shape, np.float32) for k, shape in keys.items()}
    t, start_time = 0, time.time()
    with tqdm(total=size, desc=f"generate {task.name}", unit="step", mininterval=1) as bar:
        while t < size:
            start = free[rng.integers(len(free))]
            obs, _ = env.reset(seed=int(rng.integers(2**31)), options=dict(reset_cell=np.array(start)))
            obs = obs["observation"]
            target, cell, away = free[rng.integers(len(free))], None, 0
            for step in range(min(episode_len, size - t)):
                if np.linalg.norm(obs[:2] - cell_xy(layout, target)) < GOAL_RADIUS:
                    target = free[rng.integers(len(free))]
                if obs_cell(layout, obs) != cell:  # a new cell: a new random offset of its waypoint
                    cell, offset = obs_cell(layout, obs), rng.uniform(-jitter, jitter, size=2)
                if away == 0 and rng.random() < excursion:  # leave the path for a while
                    away, aim = int(rng.integers(10, 41)), obs[:2] + rng.uniform(-1.5, 1.5, size=2)
                    heading = None  # drawn only when dashes are on, so dash=0 keeps v3's stream
                    if dash > 0 and rng.random() < dash:  # a dash: full throttle, this heading
                        angle = rng.uniform(0, 2 * np.pi)
                        heading = np.array([np.cos(angle), np.sin(angle)])
                        heading /= np.abs(heading).max()
                if away > 0:
                    away -= 1
                    action, scale = (pd_action(obs, aim), noise) if heading is None else (heading, DASH_NOISE)
                else:
                    action, scale = waypoint_action(layout, dists[target], target, obs, offset), noise
                action = np.clip(action + scale * rng.normal(size=2), -1.0, 1.0)
                next_obs = env.step(action)[0]["observation"]
                reached = np.linalg.norm(next_obs[:2] - goal) < GOAL_RADIUS
                out["observations"][t], out["actions"][t], out["goals"][t] = obs, action, cell_xy(layout, target)
                out["rewards"][t] = out["terminals"][t] = float(reached)
                out["timeouts"][t] = step == episode_len - 1
                obs, t = next_obs, t + 1
            bar.update(step + 1)
    out["timeouts"][-1] = 1.0
    write_d4rl_file(path, out, env=task.name, size=size, seed=seed, noise=noise, jitter=jitter,
                    excursion=excursion, episode_len=episode_len, **(dict(dash=dash) if dash > 0 else {}),
                    generator=f"tasks.generate_pointmaze v{DATA_VERSION}")
    return time.time() - start_time


def write_d4rl_file(path: Path, out: dict, **attrs) -> None:
    """A generated dataset in D4RL's HDF5 layout (observations, actions, rewards, bool terminals
    and timeouts, infos/goal), with the generator's settings as attributes; written to a temporary
    file and renamed, so a killed generator never leaves a half file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for k in ("observations", "actions", "rewards"):
            f.create_dataset(k, data=out[k])
        f.create_dataset("terminals", data=out["terminals"].astype(bool))
        f.create_dataset("timeouts", data=out["timeouts"].astype(bool))
        f.create_dataset("infos/goal", data=out["goals"])
        f.attrs.update(**attrs)
    os.replace(tmp, path)


def controller_success(task, episodes=50, noise=0.0, seed=0):
    """The waypoint controller run to the evaluation goal in the evaluation env: the task's
    'expert' reference. Returns (success rate, mean steps of successful episodes)."""
    layout, env, rng = MAZES[task.maze], make_pointmaze(task), np.random.default_rng(seed)
    target = maze_cells(layout, "G")[0]
    dist = bfs_distances(layout, target)
    wins, lengths = 0, []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        for step in range(task.max_episode_steps):
            action = np.clip(waypoint_action(layout, dist, target, obs) + noise * rng.normal(size=2), -1, 1)
            obs, reward, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
        wins += reward > 0
        lengths += [step + 1] if reward > 0 else []
    return wins / episodes, float(np.mean(lengths)) if lengths else float("nan")

