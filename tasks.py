"""Tasks: where data and environments come from.

Every stage imports this one module. For an env name it gives
  * the offline dataset, with D4RL `qlearning_dataset` semantics   -> load_dataset
  * the reward transform (LEQ.md section 2)                         -> Dataset.reward_scale/shift
  * the TRUE termination function, in JAX, batched                  -> termination_fn
  * the evaluation environment (gymnasium API, whatever is behind)  -> make_env
  * the normalised score                                            -> normalized_score
  * plain `.npz` artifacts: atomic writes, validated loads          -> save_npz / load_artifact

Supported names: the built-in `pointmaze-{umaze,medium,large,ultra}` (datasets generated
locally, see "Built-in PointMaze tasks"), D4RL's `antmaze-*`, `hopper-*`, `walker2d-*`,
`halfcheetah-*` (through the optional d4rl package), and `antmaze-ultra-{play,diverse}-v0`.
Any D4RL-format HDF5 file can stand in for the dataset with `dataset_path`.

Run `python tasks.py --env pointmaze-umaze` to (re)generate a built-in dataset and measure
the waypoint controller ("expert") on the evaluation task.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

# (Deviation, README.) XLA's CPU backend runs this project's small matrix products about 10% faster through its Eigen
# kernels than through the YNNPACK fusions it picks by default (measured with benchmarks/). Only
# CPU compilation is affected; it must be set before JAX's first computation; XLA_FLAGS that
# already name the option win.
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

FORMAT_VERSION = 1  # of every .npz artifact this project writes
DATA_DIR = Path(os.environ.get("LEQ_DATA_DIR", Path(__file__).resolve().parent / "data"))


class InputError(ValueError):
    """Bad input from the user (env name, file, flag). Scripts print it as one line and exit."""


# ============================================================================================
# Task descriptions
# ============================================================================================

# Maze layouts: '#' wall, '.' free, 'R' start cell, 'G' goal cell; row 0 is the top row.
# umaze/medium/large are D4RL's U_MAZE_TEST / BIG_MAZE_TEST / HARDEST_MAZE_TEST; ultra is the
# 12x16 ULTRA_MAZE_TEST of the TAP paper's D4RL fork (LEQ.md section 2).
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
# goal, see README) and default dataset size (transitions, in 1000-step episodes).
POINTMAZE_LIMITS = {"umaze": 300, "medium": 600, "large": 800, "ultra": 1200}
POINTMAZE_SIZES = {"umaze": 200_000, "medium": 400_000, "large": 600_000, "ultra": 1_000_000}
# The data policy: the waypoint controller aiming at a random point of the next cell (jitter, so
# that the data also touches walls and the world model can learn them) plus N(0, noise^2), and,
# with probability DATA_EXCURSION per step, a 10-40-step excursion towards a random point up to
# 1.5 cells away (often inside a wall: the point pushes against it; see README, Data).
DATA_NOISE, DATA_JITTER, DATA_EXCURSION, DATA_VERSION = 1.0, 0.4, 0.02, 3
GOAL_RADIUS = 0.5  # PointMaze: success (reward 1, episode end) when ||xy - goal|| < 0.5

# AntMaze termination centres and radius used in imagination (LEQ.md section 2).
ANTMAZE_CENTRES = {"umaze": (0.75, 8.75), "medium": (20.75, 20.75), "large": (32.75, 24.75),
                   "ultra": (52.75, 36.75)}
ANTMAZE_RADIUS = 0.25
ANTMAZE_LIMITS = {"umaze": 700, "medium": 1000, "large": 1000, "ultra": 2000}
ULTRA_URL = ("https://github.com/ZhengyaoJiang/d4rl/releases/download/public/"
             "Ant_maze_ultra_noisy_multistart_True_multigoal_{}_sparse.hdf5")

LOCOMOTION_DIMS = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6)}
NAME_PATTERNS = [
    r"pointmaze-(umaze|medium|large|ultra)",
    r"antmaze-umaze(-diverse)?-v[0-2]",
    r"antmaze-(medium|large)-(play|diverse)-v[0-2]",
    r"antmaze-ultra-(play|diverse)-v0",
    r"(hopper|walker2d|halfcheetah)-(random|medium|expert|medium-replay|medium-expert|full-replay)-v[0-2]",
]
SUPPORTED = ("pointmaze-{umaze,medium,large,ultra}, antmaze-umaze[-diverse]-v2, "
             "antmaze-{medium,large}-{play,diverse}-v2, antmaze-ultra-{play,diverse}-v0, "
             "{hopper,walker2d,halfcheetah}-{random,medium,medium-replay,medium-expert,expert}-v2")


@dataclasses.dataclass(frozen=True)
class Task:
    """Static facts of a task (hashable, so jitted functions can close over it)."""
    name: str
    family: str              # pointmaze | antmaze | hopper | walker2d | halfcheetah
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    maze: str = ""           # umaze | medium | large | ultra (maze families only)
    goal: tuple = ()         # termination centre (maze families only)
    goal_radius: float = 0.0


def maze_cells(layout, char):
    return [(i, j) for i, row in enumerate(layout) for j, c in enumerate(row) if c in char]


def cell_xy(layout, cell):
    """Centre of a maze cell in gymnasium-robotics coordinates (maze scaling 1, centred)."""
    height, width = len(layout), len(layout[0])
    return np.array([cell[1] + 0.5 - width / 2, height / 2 - cell[0] - 0.5])


def get_task(name: str) -> Task:
    """The static description of `name`; unknown names fail at once, listing the supported ones."""
    if not any(re.fullmatch(p, name) for p in NAME_PATTERNS):
        raise InputError(f"unknown env '{name}'. Supported: {SUPPORTED}")
    family = name.split("-")[0]
    if family == "pointmaze":
        maze = name.split("-")[1]
        goal = cell_xy(MAZES[maze], maze_cells(MAZES[maze], "G")[0])
        return Task(name, family, 4, 2, POINTMAZE_LIMITS[maze], maze, tuple(goal), GOAL_RADIUS)
    if family == "antmaze":
        maze = name.split("-")[1]
        return Task(name, family, 29, 8, ANTMAZE_LIMITS[maze], maze, ANTMAZE_CENTRES[maze],
                    ANTMAZE_RADIUS)
    return Task(name, family, *LOCOMOTION_DIMS[family], 1000)


# ============================================================================================
# True termination functions (JAX, batched over leading axes), evaluated on the next state
# ============================================================================================

def termination_fn(task: Task, goal: Optional[tuple] = None) -> Callable:
    """done(s, a, s') for a batch, as LEQ.md section 2. `goal` overrides the maze centre."""
    if task.family in ("pointmaze", "antmaze"):
        centre, radius = jnp.asarray(goal if goal is not None else task.goal), task.goal_radius

        def done(s, a, s2):  # reached the goal region: ||xy' - centre|| < radius
            return jnp.linalg.norm(s2[..., :2] - centre, axis=-1) < radius
    elif task.family == "hopper":
        def done(s, a, s2):  # alive iff finite, |s'[1:]| < 100, height > 0.7, |angle| < 0.2
            alive = (jnp.all(jnp.isfinite(s2), -1) & jnp.all(jnp.abs(s2[..., 1:]) < 100, -1)
                     & (s2[..., 0] > 0.7) & (jnp.abs(s2[..., 1]) < 0.2))
            return ~alive
    elif task.family == "walker2d":
        def done(s, a, s2):  # alive iff |s'| < 100, 0.8 < height < 2, -1 < angle < 1
            alive = (jnp.all(jnp.abs(s2) < 100, -1) & (s2[..., 0] > 0.8) & (s2[..., 0] < 2.0)
                     & (s2[..., 1] > -1.0) & (s2[..., 1] < 1.0))
            return ~alive
    else:  # halfcheetah
        def done(s, a, s2):  # done iff any |s'| >= 100
            return jnp.any(jnp.abs(s2) >= 100, -1)
    return done


# ============================================================================================
# Datasets: D4RL-format HDF5 -> qlearning_dataset transitions
# ============================================================================================

class Dataset(NamedTuple):
    observations: np.ndarray       # (N, obs_dim) float32
    actions: np.ndarray            # (N, act_dim) float32, clipped to [-1 + 1e-5, 1 - 1e-5]
    rewards: np.ndarray            # (N,) float32, RAW (apply reward_scale/shift to train)
    next_observations: np.ndarray  # (N, obs_dim) float32
    terminals: np.ndarray          # (N,) float32; masks = 1 - terminals
    reward_scale: float            # reward transform r -> scale * r + shift (LEQ.md 2)
    reward_shift: float
    path: str                      # the HDF5 file it came from


REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")


def read_hdf5(path, max_episode_steps: Optional[int] = None) -> dict:
    """Read a D4RL-format file with h5py, validating it; errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"dataset file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise InputError(f"dataset file {path} has no {missing} (a D4RL file needs "
                                 f"{', '.join(REQUIRED_KEYS)} and usually timeouts)")
            data = {k: f[k][()] for k in REQUIRED_KEYS + ("timeouts",) if k in f}
    except OSError as e:
        raise InputError(f"dataset file {path} is not a readable HDF5 file (corrupt or "
                         f"truncated? delete it to regenerate/re-download): {e}") from None
    n = len(data["observations"])
    if n < 2:
        raise InputError(f"dataset file {path} is empty ({n} rows)")
    data["rewards"], data["terminals"] = data["rewards"].reshape(-1), data["terminals"].reshape(-1)
    if "timeouts" not in data:  # as d4rl: episodes end every max_episode_steps steps
        data["timeouts"] = (np.arange(n) % (max_episode_steps or n + 1)) == (max_episode_steps or 0) - 1
    for k, v in data.items():
        if len(v) != n or (k in ("observations", "actions") and v.ndim != 2) or (
                k not in ("observations", "actions") and v.ndim != 1):
            raise InputError(f"dataset file {path}: '{k}' has shape {v.shape}, expected "
                             f"({n}, dim) for observations/actions and ({n},) otherwise")
        bad = ~np.isfinite(v.astype(np.float64)) if v.ndim == 1 else ~np.isfinite(v).all(1)
        if bad.any():
            raise InputError(f"dataset file {path}: '{k}' has NaN/inf in {bad.sum()} rows "
                             f"(first at row {np.argmax(bad)}); clean the file")
    return data


def qlearning_transitions(data: dict) -> dict:
    """D4RL `qlearning_dataset`: pair row i with row i+1, drop the last step of timed-out
    episodes (it has no next observation) and the file's last row; timeouts are not terminals."""
    keep = ~data["timeouts"][:-1].astype(bool)
    return dict(observations=data["observations"][:-1][keep].astype(np.float32),
                actions=np.clip(data["actions"][:-1][keep], -1 + 1e-5, 1 - 1e-5).astype(np.float32),
                rewards=data["rewards"][:-1][keep].astype(np.float32),
                next_observations=data["observations"][1:][keep].astype(np.float32),
                terminals=data["terminals"][:-1][keep].astype(np.float32))


def episode_returns(t: dict) -> np.ndarray:
    """Returns of the dataset's episodes; an episode ends at a terminal or where the next row
    does not continue it (as IQL splits trajectories for reward normalisation)."""
    ends = t["terminals"] > 0
    ends[:-1] |= np.any(t["next_observations"][:-1] != t["observations"][1:], axis=1)
    ends[-1] = True
    episode = np.concatenate([[0], np.cumsum(ends)[:-1]])
    return np.bincount(episode, weights=t["rewards"])


def reward_transform(task: Task, t: dict) -> tuple:
    """(scale, shift) of LEQ.md section 2: mazes r - 1; locomotion (not random)
    r * 1000 / (max return - min return) over the dataset's episodes; otherwise unscaled."""
    if task.family in ("pointmaze", "antmaze"):
        return 1.0, -1.0
    if "random" not in task.name:
        returns = episode_returns(t)
        return float(1000.0 / (returns.max() - returns.min())), 0.0
    return 1.0, 0.0


def load_dataset(task: Task, dataset_path: Optional[str] = None,
                 data_dir: Optional[str] = None) -> Dataset:
    """The task's offline dataset as qlearning_dataset transitions (raw rewards)."""
    if dataset_path:
        path = Path(dataset_path)
    elif task.family == "pointmaze":
        path = builtin_dataset_path(task, data_dir)
        if not path.exists():
            print(f"[tasks] generating the built-in dataset {path.name} (once) ...")
            generate_pointmaze(task, path)
    else:
        path = d4rl_dataset_path(task)
    t = qlearning_transitions(read_hdf5(path, task.max_episode_steps))
    dims = (t["observations"].shape[1], t["actions"].shape[1])
    if dims != (task.obs_dim, task.act_dim):
        raise InputError(f"dataset file {path} has obs/action dims {dims}, but {task.name} "
                         f"needs {(task.obs_dim, task.act_dim)}")
    scale, shift = reward_transform(task, t)
    return Dataset(**t, reward_scale=scale, reward_shift=shift, path=str(path))


# ============================================================================================
# The optional d4rl package (old gym API, mujoco-py)
# ============================================================================================

def import_d4rl(task: Task):
    """Import gym + d4rl and register the ultra mazes; a clear error when the extra is missing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import gym
            import d4rl  # noqa: F401  (registers what it can)
            import d4rl.gym_mujoco  # noqa: F401  (`import d4rl` skips these without mjrl)
            import d4rl.locomotion  # noqa: F401
    except Exception as e:  # ImportError, or mujoco-py failing to find MuJoCo 2.1
        raise InputError(f"{task.name} needs the optional d4rl package ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); install it with "
                         f"scripts/install_d4rl.sh, or pass --dataset-path FILE.hdf5 to train "
                         f"without it") from None
    for kind in ("diverse", "play"):
        env_id = f"antmaze-ultra-{kind}-v0"
        if env_id not in gym.envs.registry.env_specs:  # gym 0.23's registry
            layout = [[{"#": 1, ".": 0, "R": "r", "G": "g"}[c] for c in row] for row in MAZES["ultra"]]
            gym.envs.registration.register(
                id=env_id, entry_point="d4rl.locomotion.ant:make_ant_maze_env",
                max_episode_steps=ANTMAZE_LIMITS["ultra"],
                kwargs=dict(maze_map=layout, reward_type="sparse", non_zero_reset=False,
                            eval=True, maze_size_scaling=4.0, ref_min_score=0.0, ref_max_score=1.0,
                            v2_resets=True,  # a new goal each episode, as D4RL's -v2 AntMazes
                            dataset_url=ULTRA_URL.format(kind == "diverse")))
    return gym, d4rl


def d4rl_dataset_path(task: Task) -> Path:
    """Where d4rl keeps the task's file (downloading it when the network allows)."""
    gym, d4rl = import_d4rl(task)
    from d4rl import offline_env
    url = gym.make(task.name).dataset_url
    path = Path(offline_env.DATASET_PATH) / os.path.basename(url)
    if not path.exists():
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                offline_env.download_dataset_from_url(url)
        except Exception:
            raise InputError(f"dataset for {task.name} not found: place the file "
                             f"{path.name} at {path} (from {url}), or pass --dataset-path") from None
    return path


# ============================================================================================
# Built-in PointMaze tasks: environment and locally generated datasets
# ============================================================================================

def import_gymnasium_robotics():
    import gymnasium
    with contextlib.redirect_stderr(io.StringIO()):  # silence an unrelated Adroit notice
        import gymnasium_robotics
    gymnasium.register_envs(gymnasium_robotics)
    return gymnasium


def make_pointmaze(task: Task, max_episode_steps: Optional[int] = None, render_mode=None):
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


def obs_cell(layout, obs):
    """The maze cell (row, column) the point is in."""
    return int(np.floor(len(layout) / 2 - obs[1])), int(np.floor(obs[0] + len(layout[0]) / 2))


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


def builtin_dataset_path(task: Task, data_dir=None, size=None, seed=0) -> Path:
    size = size or POINTMAZE_SIZES[task.maze]
    return Path(data_dir or DATA_DIR) / f"{task.name}_{size // 1000}k_seed{seed}_v{DATA_VERSION}.hdf5"


def generate_pointmaze(task: Task, path: Path, size=None, seed=0, noise=DATA_NOISE, jitter=DATA_JITTER,
                       episode_len=1000, excursion=DATA_EXCURSION):
    """A "diverse" dataset the way D4RL made its mazes: each 1000-step episode starts in a random
    free cell; the waypoint controller (aiming at the next cell's centre plus a uniform offset in
    [-jitter, jitter]^2, redrawn in every cell) plus N(0, noise^2) action noise drives to random
    goal cells one after another. With probability `excursion` per step it leaves for 10-40 steps
    to a random point within +-1.5 cells (PD control, same noise), so the data pushes into walls
    as a clumsy ant's does. Rewards/terminals are relabelled for the evaluation goal (1 when
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
                if away > 0:
                    away -= 1
                    action = pd_action(obs, aim)
                else:
                    action = waypoint_action(layout, dists[target], target, obs, offset)
                action = np.clip(action + noise * rng.normal(size=2), -1.0, 1.0)
                next_obs = env.step(action)[0]["observation"]
                reached = np.linalg.norm(next_obs[:2] - goal) < GOAL_RADIUS
                out["observations"][t], out["actions"][t], out["goals"][t] = obs, action, cell_xy(layout, target)
                out["rewards"][t] = out["terminals"][t] = float(reached)
                out["timeouts"][t] = step == episode_len - 1
                obs, t = next_obs, t + 1
            bar.update(step + 1)
    out["timeouts"][-1] = 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for k in ("observations", "actions", "rewards"):
            f.create_dataset(k, data=out[k])
        f.create_dataset("terminals", data=out["terminals"].astype(bool))
        f.create_dataset("timeouts", data=out["timeouts"].astype(bool))
        f.create_dataset("infos/goal", data=out["goals"])
        f.attrs.update(env=task.name, size=size, seed=seed, noise=noise, jitter=jitter, excursion=excursion,
                       episode_len=episode_len,
                       generator=f"tasks.generate_pointmaze v{DATA_VERSION}")
    os.replace(tmp, path)
    return time.time() - start_time


def controller_success(task: Task, episodes=50, noise=0.0, seed=0):
    """The waypoint controller run to the evaluation goal in the evaluation env: the task's
    'expert' reference. Returns (success rate, mean steps of successful episodes)."""
    layout, env, rng = MAZES[task.maze], make_env(task), np.random.default_rng(seed)
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


# ============================================================================================
# Evaluation environments and scores
# ============================================================================================

class OldGymAPI:
    """Presents an old-gym env (reset -> obs; step -> 4 values), as d4rl's, with the gymnasium
    API: reset(seed=) -> (obs, info); step -> (obs, r, terminated, truncated, info)."""

    def __init__(self, env):
        self.env, self.unwrapped = env, env
        while hasattr(self.unwrapped, "env") or hasattr(self.unwrapped, "wrapped_env"):  # gym and d4rl wrappers
            self.unwrapped = getattr(self.unwrapped, "env", None) or self.unwrapped.wrapped_env
        self.action_space, self.observation_space = env.action_space, env.observation_space

    def reset(self, *, seed=None):
        if seed is not None:
            self.unwrapped.seed(seed)  # d4rl's NormalizedBoxEnv does not pass seed() on
            self.env.action_space.seed(seed)
            np.random.seed(seed)  # d4rl's AntMaze draws its goal noise from np.random
        return self.env.reset(), {}

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        truncated = bool(info.get("TimeLimit.truncated", False))
        return obs, reward, done and not truncated, truncated, info

    def render(self, *a, **k):
        return self.env.render(*a, **k)

    def close(self):
        self.env.close()


def make_env(task: Task, render_mode: Optional[str] = None):
    """The evaluation environment, always with the gymnasium API."""
    if task.family == "pointmaze":
        return make_pointmaze(task, render_mode=render_mode)
    gym, _ = import_d4rl(task)
    with contextlib.redirect_stdout(io.StringIO()):
        return OldGymAPI(gym.make(task.name))


def maze_geometry(task: Task):
    """(wall cell centres (n, 2), start xy, goal xy, cell size) in the env's coordinates."""
    layout = MAZES[task.maze]
    if task.family == "pointmaze":
        walls = np.array([cell_xy(layout, c) for c in maze_cells(layout, "#")])
        return walls, cell_xy(layout, maze_cells(layout, "R")[0]), np.asarray(task.goal), 1.0
    # D4RL AntMaze: cell (i, j) at (4 j, 4 i) minus the start cell's position
    start = np.array(maze_cells(layout, "R")[0][::-1], float) * 4.0
    walls = np.array([np.array([j, i]) * 4.0 - start for i, j in maze_cells(layout, "#")])
    return walls, np.zeros(2), np.asarray(task.goal), 4.0


def env_goal(env) -> Optional[np.ndarray]:
    """The goal the environment actually uses (to check the termination centre against)."""
    u = env.unwrapped
    goal = getattr(u, "target_goal", None)
    return np.asarray(goal if goal is not None else getattr(u, "goal", None), dtype=float)


def normalized_score(task: Task, mean_return: float, success_rate: float) -> float:
    """Mazes: success rate x 100. Locomotion: D4RL's normalised score x 100."""
    if task.family in ("pointmaze", "antmaze"):
        return 100.0 * success_rate
    _, d4rl = import_d4rl(task)
    return 100.0 * float(d4rl.get_normalized_score(task.name, mean_return))


# ============================================================================================
# Artifacts: flat .npz files (no pickle), atomic writes, validated loads
# ============================================================================================

def flatten(tree, prefix: str) -> dict:
    """{'a': {'b': x}} -> {'prefix/a/b': np.asarray(x)}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        out.update(flatten(value, name) if isinstance(value, dict) else {name: np.asarray(value)})
    return out


def unflatten(flat: dict, prefix: str) -> dict:
    """Inverse of `flatten` for the entries under `prefix/`."""
    tree = {}
    for name, value in flat.items():
        if name.startswith(prefix + "/"):
            *path, leaf = name[len(prefix) + 1:].split("/")
            node = tree
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = value
    return tree


def save_npz(path, arrays: dict, kind: str, task: Task, config) -> None:
    """Write arrays plus metadata to `path` atomically (temp file in the same folder, fsync,
    rename): a kill mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    meta = {"meta/format_version": np.array(FORMAT_VERSION), "meta/kind": np.array(kind),
            "meta/env": np.array(task.name), "meta/obs_dim": np.array(task.obs_dim),
            "meta/act_dim": np.array(task.act_dim),
            "meta/config": np.array(json.dumps(config, default=str, sort_keys=True))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for orphan in path.parent.glob(glob.escape(path.name) + "*.tmp"):  # left by writes killed before renaming
        orphan.unlink(missing_ok=True)


def load_artifact(path, task: Optional[Task] = None, kinds: tuple = (), need: str = "") -> dict:
    """Load an artifact, checking format version, kind, env and dims; one-line errors."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"artifact {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise InputError(f"artifact {path} is not a readable .npz file (truncated or corrupt?): "
                         f"{type(e).__name__}") from None
    if "meta/format_version" not in arrays:
        raise InputError(f"artifact {path} has no metadata: not written by this project")
    if int(arrays["meta/format_version"]) != FORMAT_VERSION:
        raise InputError(f"artifact {path} has format version {int(arrays['meta/format_version'])}, "
                         f"this code reads version {FORMAT_VERSION}; re-run the stage that made it")
    kind = str(arrays["meta/kind"])
    if kinds and kind not in kinds:
        raise InputError(f"artifact {path} is a '{kind}' artifact; expected one of {list(kinds)}")
    if need and not any(k.startswith(need + "/") for k in arrays):
        raise InputError(f"artifact {path} ('{kind}') has no {need} parameters")
    if task is not None:
        env, dims = str(arrays["meta/env"]), (int(arrays["meta/obs_dim"]), int(arrays["meta/act_dim"]))
        if env != task.name:
            raise InputError(f"artifact {path} was made for env '{env}', not '{task.name}'")
        if dims != (task.obs_dim, task.act_dim):
            raise InputError(f"artifact {path} has obs/action dims {dims}, but {task.name} "
                             f"needs {(task.obs_dim, task.act_dim)}")
    arrays["meta/config"] = json.loads(str(arrays["meta/config"]))
    return arrays


def tree_arrays(tree, prefix: str) -> dict:
    """Any pytree (optimiser states, training states) as numbered leaves: {prefix/0000: leaf}."""
    return {f"{prefix}/{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def tree_from_arrays(template, arrays: dict, prefix: str):
    """Inverse of `tree_arrays`, with `template` giving the structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(template)
    new = []
    for i, leaf in enumerate(leaves):
        x = arrays.get(f"{prefix}/{i:04d}")
        if x is None or x.shape != np.shape(leaf):
            raise InputError(f"checkpoint does not match this configuration at {prefix}/{i:04d} "
                             f"(shape {None if x is None else x.shape} vs {np.shape(leaf)})")
        new.append(jnp.asarray(x, dtype=jnp.asarray(leaf).dtype))
    return jax.tree.unflatten(treedef, new)


def check_same_config(path, saved: dict, args, ignore=()) -> None:
    """A checkpoint may only be resumed by the configuration that wrote it."""
    now = json.loads(json.dumps(dataclasses.asdict(args), default=str, sort_keys=True))
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        raise InputError(f"checkpoint {path} was written with other settings ({', '.join(diff)}); "
                         f"use the same flags, or delete it to start over")


# ============================================================================================
# CLI: generate a built-in dataset and measure the controller
# ============================================================================================

@dataclasses.dataclass
class Args:
    env: str = "pointmaze-umaze"
    """built-in task whose dataset to generate"""
    size: Optional[int] = None
    """number of transitions (default: the task's default size, see README)"""
    seed: int = 0
    """generator seed (the dataset is a deterministic function of it)"""
    noise: float = DATA_NOISE
    """std of the Gaussian action noise added to the waypoint controller"""
    jitter: float = DATA_JITTER
    """the controller aims at a uniform random point within +-jitter of each cell's centre"""
    excursion: float = DATA_EXCURSION
    """per-step probability of a 10-40-step excursion to a random point within +-1.5 cells"""
    data_dir: Optional[str] = None
    """folder for generated datasets (default: $LEQ_DATA_DIR or ./data next to this file)"""
    out: Optional[str] = None
    """output path (default: <data_dir>/<env>_<size/1000>k_seed<seed>_v<version>.hdf5)"""
    expert_episodes: int = 50
    """episodes to measure the controller on the evaluation task (0 to skip)"""


def main(args: Args):
    task = get_task(args.env)
    if task.family != "pointmaze":
        raise InputError(f"only built-in pointmaze tasks can be generated, not {task.name}")
    path = Path(args.out) if args.out else builtin_dataset_path(task, args.data_dir, args.size, args.seed)
    seconds = generate_pointmaze(task, path, args.size, args.seed, args.noise, args.jitter,
                                 excursion=args.excursion)
    data = qlearning_transitions(read_hdf5(path))
    print(f"wrote {path}: {len(data['rewards'])} transitions, {int(data['rewards'].sum())} at the "
          f"goal, in {seconds:.1f} s")
    if args.expert_episodes:
        for noise in (0.0, args.noise):
            rate, steps = controller_success(task, args.expert_episodes, noise)
            print(f"controller (noise {noise}) on the evaluation task: success {100 * rate:.0f}% "
                  f"over {args.expert_episodes} episodes, {steps:.0f} steps to the goal")


if __name__ == "__main__":
    import sys

    import tyro
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"error: {e}")
