"""The goal-reaching ant: a tool for making built-in AntMaze data (issue 37), not part of LEQ.

D4RL made its AntMaze datasets by steering a goal-reaching ant policy (trained with RL) along
waypoints through the maze. This module is that ant's world, on D4RL AntMaze's ant body: gymnasium's
`Ant-v5` xml (the legs, masses and joints D4RL's has too) with D4RL's motors, time step and contacts
(torque 30 per unit action, 5 physics steps of 0.02 s per step), put in a maze by gymnasium-robotics:
  * the body, the xml both the walker's floor and the mazes load                -> ant_xml_path, ant_model
  * the state, D4RL AntMaze's layout: qpos (15, x y first) + qvel (14) = 29    -> ant_state
  * what the walker sees: the state without x, y (27) and the goal in the
    ant's heading frame (2), so that one policy walks anywhere in any maze   -> walker_obs
  * N ants on an open floor, each walking to its own goal, with the reward the
    walker trains on (scripts/train_ant_walker.py)                            -> GoalAnts
  * the trained walker (an .npz artifact of that script; the project ships
    one, leq_utils/ant_walker.npz, and a walker trained here comes first)     -> load_walker, default_walker_path
  * an ant turned over (on its back), a figure of the generated data          -> upside_down
  * the built-in AntMaze tasks `ant-{umaze,medium,large,ultra}-{diverse,play}`:
    D4RL's layouts in gymnasium-robotics' AntMaze (MuJoCo), D4RL's success rule
    (reward 1 and the episode's end within 0.5 of the goal) and episode limits -> describe, make_antmaze
  * the grid planner and the waypoint driver (the tasks' "expert")           -> waypoint, controller_success
  * the dataset generator, D4RL's recipe, D4RL's HDF5 layout                  -> generate, builtin_dataset_path
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from leq_utils import mazes
from leq_utils.common import ANTMAZE_LIMITS, InputError, Task

WALKER_OBS_DIM = 29   # qpos[2:] (13) + qvel (14) + the goal in the heading frame (2)
ACT_DIM = 8
HEALTHY_Z = (0.2, 1.0)  # D4RL's (and Ant-v5's) healthy torso heights; outside them the ant has fallen or jumped
REACH_RADIUS = 0.5    # a goal is reached within 0.5 (D4RL AntMaze's success radius)
GOAL_VECTOR_CLIP = 8.0  # the goal vector the walker sees is cut to this length


# D4RL AntMaze's ant (d4rl/locomotion/assets/ant.xml, stepped through its NormalizedBoxEnv, which maps
# actions in [-1, 1] onto the motors' control range) differs from gymnasium's Ant-v5 xml in three
# settings, and nowhere else (geometry, density 5, joint armature and damping 1, RK4 agree):
BODY_TIMESTEP = 0.02  # MuJoCo's step, 5 per env step (Ant-v5: 0.01)
DT = 5 * BODY_TIMESTEP  # seconds per step (0.1): gymnasium's AntEnv steps MuJoCo 5 times (frame_skip); Ant-v5's 0.05
BODY_GEAR = 30.0      # torque per unit action: D4RL's motors have gear 1 and range +-30 (Ant-v5: gear 150)
BODY_CONTACT = {"solref": ".02 1", "solimp": ".8 .8 .01"}  # D4RL's geom contacts: its solimp is softer than
#                     MuJoCo's default (.9 .95 .001), which Ant-v5 keeps; its solref is MuJoCo's default, written as D4RL does
BODY = "d4rl"         # recorded in the walker's artifacts and the datasets: ants trained on another body are refused


def ant_xml_path() -> Path:
    """The ant body as an xml file (gymnasium's ant.xml with D4RL's BODY_* settings), written once per
    content into the temp folder (atomically): gymnasium's AntEnv and AntMaze take a file (xml_file)."""
    import hashlib
    import os
    import tempfile
    import xml.etree.ElementTree as ET

    import gymnasium
    root = ET.parse(Path(gymnasium.__file__).parent / "envs" / "mujoco" / "assets" / "ant.xml").getroot()
    root.find("option").set("timestep", str(BODY_TIMESTEP))
    root.find("default").find("geom").attrib.update(BODY_CONTACT)
    for motor in root.find("actuator"):
        motor.set("gear", str(BODY_GEAR))
    text = ET.tostring(root, encoding="unicode")
    path = Path(tempfile.gettempdir()) / f"leq_ant_{BODY}_{hashlib.sha256(text.encode()).hexdigest()[:12]}.xml"
    if not path.exists() or path.read_text() != text:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".xml")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # readable by every user of a shared temp folder
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def ant_model():
    """The ant's MuJoCo model on an open floor (gymnasium's AntEnv on ant_xml_path()): (model,
    init_qpos, init_qvel, frame_skip)."""
    from gymnasium.envs.mujoco.ant_v5 import AntEnv
    env = AntEnv(xml_file=str(ant_xml_path()), exclude_current_positions_from_observation=False,
                 include_cfrc_ext_in_observation=False)
    return env.model, env.init_qpos.copy(), env.init_qvel.copy(), env.frame_skip


def ant_state(data) -> np.ndarray:
    """D4RL AntMaze's 29-d state of a MuJoCo MjData: qpos (x, y, z, quaternion, 8 joints), qvel (14)."""
    return np.concatenate([data.qpos, data.qvel])


def yaw_of(qpos):
    """The torso's heading angle (radians) from its quaternion qpos[..., 3:7] = (w, x, y, z)."""
    w, x, y, z = (qpos[..., i] for i in range(3, 7))
    return np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def to_heading_frame(qpos, vector):
    """A world-frame xy vector (..., 2) in the ant's heading frame (x forward, y left)."""
    yaw = yaw_of(qpos)
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * vector[..., 0] + s * vector[..., 1], -s * vector[..., 0] + c * vector[..., 1]], -1)


def walker_obs(state, goal):
    """The walker's input: state (..., 29) without x, y, then goal - xy in the heading frame, cut to
    length GOAL_VECTOR_CLIP (a waypoint farther away is "that way")."""
    qpos = state[..., :15]
    v = to_heading_frame(qpos, np.asarray(goal) - state[..., :2])
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    v = v * np.minimum(1.0, GOAL_VECTOR_CLIP / np.maximum(norm, 1e-8))
    return np.concatenate([state[..., 2:], v], -1).astype(np.float32)


def up_axis_z(state):
    """The world z component of the torso's up axis, 1 - 2 (qx^2 + qy^2) from its unit quaternion
    qpos[3:7] = (w, x, y, z): 1 upright, -1 on its back; any leading shape, numpy or jax arrays."""
    return 1 - 2 * (state[..., 4] ** 2 + state[..., 5] ** 2)


def upside_down(state, xp=np) -> np.ndarray:
    """The torso's up axis points down: `up_axis_z` below 0. xp is numpy or jax.numpy (for jitted
    code)."""
    return up_axis_z(xp.atleast_2d(state)) < 0


def healthy(state) -> np.ndarray:
    """D4RL's (and Ant-v5's) rule: every number finite and the torso height within HEALTHY_Z."""
    state = np.atleast_2d(state)
    return np.isfinite(state).all(-1) & (state[:, 2] >= HEALTHY_Z[0]) & (state[:, 2] <= HEALTHY_Z[1])


class GoalAnts:
    """N ants on an open floor, each walking to its own goal. An ant starts at the origin with a
    random heading (and D4RL's reset noise, Ant-v5's too); its goal lies at a distance drawn from
    `goal_distance` in a uniformly random direction; a reached goal (within REACH_RADIUS) is
    replaced by a new one drawn around the ant. Reward per step: the speed towards the goal (units
    per second, so about the ant's speed when it walks straight at it) + `alive_bonus` - ctrl_cost
    |a|^2; an ant that falls (not `healthy`, or with `upside_down_falls` also on its back) ends its
    episode, one that lives `max_steps` steps is cut off (truncated) and restarts."""

    def __init__(self, n: int, seed: int, goal_distance=(1.0, 8.0), max_steps: int = 300,
                 alive_bonus: float = 0.5, ctrl_cost: float = 0.1, upside_down_falls: bool = False):
        import mujoco
        self._mujoco = mujoco
        self.model, self.init_qpos, self.init_qvel, self.frame_skip = ant_model()
        self.data = [mujoco.MjData(self.model) for _ in range(n)]
        self.n, self.goal_distance, self.max_steps = n, goal_distance, max_steps
        self.alive_bonus, self.ctrl_cost, self.upside_down_falls = alive_bonus, ctrl_cost, upside_down_falls
        self.rng = np.random.default_rng(seed)
        self.goals = np.zeros((n, 2))
        self.steps = np.zeros(n, np.int64)
        self.states = np.zeros((n, 29))
        for i in range(n):
            self._reset(i)

    def _state(self, i) -> np.ndarray:
        return ant_state(self.data[i])

    def _new_goal(self, i) -> None:
        r = self.rng.uniform(*self.goal_distance)
        angle = self.rng.uniform(-np.pi, np.pi)
        self.goals[i] = self.states[i, :2] + r * np.array([np.cos(angle), np.sin(angle)])

    def _reset(self, i) -> None:
        d = self.data[i]
        self._mujoco.mj_resetData(self.model, d)
        qpos = self.init_qpos + self.rng.uniform(-0.1, 0.1, self.init_qpos.shape)
        yaw = self.rng.uniform(-np.pi, np.pi)
        qpos[3:7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        d.qpos[:] = qpos
        d.qvel[:] = self.init_qvel + 0.1 * self.rng.standard_normal(self.init_qvel.shape)
        self._mujoco.mj_forward(self.model, d)
        self.states[i] = self._state(i)
        self.steps[i] = 0
        self._new_goal(i)

    def observe(self) -> np.ndarray:
        return walker_obs(self.states, self.goals)

    def step(self, actions):
        """actions (n, 8) in [-1, 1] -> (obs after the step (n, 29), reward (n,), terminated (n,),
        truncated (n,), reached (n,), next_obs_for_bootstrap (n, 29)). An ended ant is reset: obs is
        its new episode's first observation; next_obs_for_bootstrap is what the step led to (with
        the new goal of an ant that reached its goal). The reward is measured to the old goal."""
        actions = np.clip(actions, -1.0, 1.0)
        before = np.linalg.norm(self.goals - self.states[:, :2], axis=-1)
        for i, d in enumerate(self.data):
            d.ctrl[:] = actions[i]
            self._mujoco.mj_step(self.model, d, nstep=self.frame_skip)
            self.states[i] = self._state(i)
        self.steps += 1
        after = np.linalg.norm(self.goals - self.states[:, :2], axis=-1)
        alive = healthy(self.states) & ~(self.upside_down_falls & upside_down(self.states))
        reward = np.where(alive, (before - after) / DT + self.alive_bonus, 0.0) - self.ctrl_cost * (actions ** 2).sum(-1)
        reward = np.nan_to_num(reward, nan=0.0, posinf=0.0, neginf=0.0)
        reached = alive & (after <= REACH_RADIUS)
        terminated, truncated = ~alive, alive & (self.steps >= self.max_steps)
        for i in np.flatnonzero(reached & ~truncated):
            self._new_goal(i)
        # what the ant goes on from (before a reset): a reached goal is already replaced, as the ant
        # walks on to the new one (the critic never sees a goal vector shorter than the reach radius)
        next_obs = walker_obs(np.nan_to_num(self.states), self.goals)
        for i in np.flatnonzero(terminated | truncated):
            self._reset(i)
        return self.observe(), reward.astype(np.float32), terminated, truncated, reached, next_obs


def reach_trials(act, trials: int, seed: int, distance=(4.0, 8.0), steps: int = 100,
                 batch: Optional[int] = None) -> dict:
    """The walker's measure (issue 37): from a fresh start (random heading), a goal drawn at a
    distance in `distance`; reached if the ant gets within REACH_RADIUS in at most `steps` steps
    without falling. `act(obs (n, 29)) -> actions (n, 8)`. Returns the reach rate, the mean steps
    of the reached ones, the fall rate, and the share of trials in which the ant was on its back
    (`upside_down`) at some step before any fall (the height rule does not call that a fall)."""
    batch = batch or trials
    reached_steps, falls, turned_over, done_trials = [], 0, 0, 0
    while done_trials < trials:
        n = min(batch, trials - done_trials)
        ants = GoalAnts(n, seed + done_trials, goal_distance=distance, max_steps=steps + 1)
        goals = ants.goals.copy()
        first = np.full(n, -1)
        fell, turned = np.zeros(n, bool), np.zeros(n, bool)
        for t in range(steps):
            _, _, terminated, _, reached, _ = ants.step(act(ants.observe()))
            ants.goals[:] = goals  # one goal per trial: no new goal after a reach
            first = np.where((first < 0) & reached & ~fell, t + 1, first)
            fell |= terminated
            turned |= ~fell & upside_down(ants.states)  # a fallen ant is reset: its new state says nothing
        reached_steps += list(first[first > 0])
        falls += int(fell.sum())
        turned_over += int(turned.sum())
        done_trials += n
    return {"trials": trials, "reach_rate": len(reached_steps) / trials,
            "mean_steps_to_reach": float(np.mean(reached_steps)) if reached_steps else float("nan"),
            "fall_rate": falls / trials, "upside_down_rate": turned_over / trials, "distance": list(distance), "steps": steps}


def long_walks(act, ants: "GoalAnts", steps: int = 1000, noise: float = 0.0, seed: int = 0) -> dict:
    """What issue 37's 100-step measure cannot see: ants walking as long as a dataset's episode,
    on an open floor, each to goal after goal (a new one when reached), the actions with
    N(0, noise^2) added as the generator adds it. Returns the share of ants that lay on their back
    at some step before any fall by the height rule, the share that fell (an ant that falls is
    reset and not counted again), and the goals reached per ant. `ants` is a GoalAnts made with
    max_steps >= steps, so that no ant is restarted by its time limit."""
    rng = np.random.default_rng(seed)
    fell, turned, reached_goals = np.zeros(ants.n, bool), np.zeros(ants.n, bool), 0
    for _ in range(steps):
        actions = act(ants.observe()) + noise * rng.standard_normal((ants.n, ACT_DIM))
        _, _, terminated, _, reached, _ = ants.step(actions)
        reached_goals += int((reached & ~fell).sum())
        fell |= terminated
        turned |= ~fell & upside_down(ants.states)  # as in reach_trials: a fallen ant is reset
    return {"ants": ants.n, "steps": steps, "noise": noise, "upside_down_rate": float(turned.mean()),
            "fall_rate": float(fell.mean()), "goals_per_ant": reached_goals / ants.n}


# ============================================================================================
# The trained walker (written by scripts/train_ant_walker.py)
# ============================================================================================

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
WALKER_KIND = "ant_walker"
WALKER_TASK = Task(f"ant-walker-{BODY}-body", "ant", WALKER_OBS_DIM, ACT_DIM, 100)  # what its artifacts record


def walker_actor(hidden_dims):
    """The walker's tanh-Gaussian actor: MLP (ReLU) -> (mean, log-std clipped to [-5, 2])."""
    import flax.linen as nn
    import jax.numpy as jnp

    class WalkerActor(nn.Module):
        hidden_dims: tuple

        @nn.compact
        def __call__(self, obs):
            x = obs
            for h in self.hidden_dims:
                x = nn.relu(nn.Dense(h)(x))
            mean = nn.Dense(ACT_DIM)(x)
            return mean, jnp.clip(nn.Dense(ACT_DIM)(x), LOG_STD_MIN, LOG_STD_MAX)
    return WalkerActor(tuple(hidden_dims))


SHIPPED_WALKER = Path(__file__).with_name("ant_walker.npz")  # the project's trained walker (docs/TASKS.md says how it was made)


def trained_walker_path(data_dir=None) -> Path:
    """Where scripts/train_ant_walker.py puts the walker it trains: <data dir>/ant_walker.npz."""
    return Path(data_dir or mazes.DATA_DIR) / "ant_walker.npz"


def default_walker_path(data_dir=None) -> Path:
    """The walker the generator uses: one trained here (<data dir>/ant_walker.npz) if there is one,
    else the one that comes with the project (leq_utils/ant_walker.npz)."""
    trained = trained_walker_path(data_dir)
    return trained if trained.exists() or not SHIPPED_WALKER.exists() else SHIPPED_WALKER


def load_walker(path):
    """(act(walker obs (n, 29)) -> deterministic actions tanh(mean) (n, 8), the artifact's arrays)."""
    import jax
    import jax.numpy as jnp
    from leq_utils import artifacts
    path = Path(path)
    if not path.exists():
        raise InputError(f"no ant walker at {path}: pass an existing one (--walker PATH), train one with `python "
                         f"scripts/train_ant_walker.py`, or restore the project's leq_utils/ant_walker.npz (git checkout)")
    try:
        f = artifacts.load_artifact(path, WALKER_TASK, kinds=(WALKER_KIND,), need="actor")
    except artifacts.CorruptArtifact:
        raise
    except InputError:  # before data version 2 the walkers were trained on Ant-v5's strong-motored body
        if str(artifacts.read_npz(path).get("meta/env", "")) == "ant-walker":
            raise InputError(f"{path} is a walker for Ant-v5's body (data version 1), not D4RL's ant that the tasks "
                             f"use now: delete or move it (the project's own leq_utils/ant_walker.npz is taken when the "
                             f"data folder has none), or train one with `python scripts/train_ant_walker.py --run-dir "
                             f"NEW_FOLDER`") from None
        raise
    actor = walker_actor(f["meta/config"]["hidden_dims"])
    template = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, WALKER_OBS_DIM)))
    params = artifacts.tree_from_arrays(template, f, "actor")  # checks every shape
    fn = jax.jit(lambda obs: jnp.tanh(actor.apply(params, obs)[0]))
    return (lambda obs: np.asarray(fn(jnp.asarray(obs, jnp.float32)))), f


# ============================================================================================
# The built-in AntMaze tasks
# ============================================================================================

NAME = r"ant-(umaze|medium|large|ultra)-(diverse|play)"
SCALE = 4.0            # gymnasium-robotics' AntMaze: 4 units per maze cell, the maze centred at 0
DATA_SIZE = 1_000_000  # transitions, in 1000-step episodes (D4RL's AntMaze datasets)
DATA_NOISE = 0.2       # N(0, 0.2^2) on the walker's actions (our choice: D4RL's value is not at hand here)
DATA_VERSION = 2      # 2: D4RL's ant body (1: Ant-v5's)


def describe(name: str) -> Task:
    """ant-<maze>-<variant>: 29-d states (D4RL's layout), 8 actions, the goal cell's centre,
    success within 0.5 (inclusive, as D4RL's AntMaze), D4RL's episode limits (ultra: the TAP fork's)."""
    m = re.fullmatch(NAME, name)
    if m is None:
        raise InputError(f"unknown built-in ant task '{name}' (ant-{{umaze,medium,large,ultra}}-{{diverse,play}})")
    maze = m.group(1)
    return Task(name, "antmaze", 29, 8, ANTMAZE_LIMITS[maze], maze, tuple(float(x) for x in cell_centre(maze, goal_cell(maze))),
                REACH_RADIUS, source="builtin", goal_inclusive=True)


def is_builtin_ant(task) -> bool:
    return task.source == "builtin" and task.family == "antmaze"


def cell_centre(maze: str, cell) -> np.ndarray:
    return SCALE * mazes.cell_xy(mazes.MAZES[maze], cell)


def goal_cell(maze: str):
    return mazes.maze_cells(mazes.MAZES[maze], "G")[0]


def xy_cell(maze: str, xy) -> tuple:
    i, j = mazes.xy_cells(mazes.MAZES[maze], np.asarray(xy, float) / SCALE)
    return int(i), int(j)


def play_cells(maze: str) -> list:
    """The "play" variant's hand-picked places, by one rule: the start and goal cells, the dead
    ends (one open neighbour) and the junctions (three or more)."""
    layout = mazes.MAZES[maze]
    free = mazes.maze_cells(layout, ".RG")
    def degree(c):
        i, j = c
        return sum(layout[a][b] != "#" for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)))
    return [c for c in free if layout[c[0]][c[1]] in "RG" or degree(c) != 2]


def waypoint(maze: str, dist, target_cell, xy) -> np.ndarray:
    """The grid planner's next waypoint: the centre of the neighbouring cell closest (BFS) to the
    target cell, or the target cell's centre once the ant is in it (or off the grid)."""
    cell = xy_cell(maze, xy)
    layout = mazes.MAZES[maze]
    inside = 0 <= cell[0] < len(layout) and 0 <= cell[1] < len(layout[0])
    if not inside or cell == tuple(target_cell) or not np.isfinite(dist[cell]):
        return cell_centre(maze, target_cell)
    i, j = cell
    return cell_centre(maze, min(((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)), key=lambda c: dist[c]))


def make_antmaze(task, max_episode_steps: Optional[int] = None, render_mode=None):
    """gymnasium-robotics AntMaze_*-v5 on the task's D4RL layout: the ant starts in the start
    cell (the env's own +-1 position noise from the seed), the goal is the goal cell's exact
    centre; the observation is D4RL's 29-d state (x, y, then the env's 27-d observation); reward
    1 and the episode's end when ||xy - goal|| <= 0.5."""
    gymnasium = mazes.import_gymnasium_robotics()
    layout = mazes.MAZES[task.maze]
    maze_map = [[1 if c == "#" else 0 for c in row] for row in layout]
    inner = gymnasium.make("AntMaze_UMaze-v5", maze_map=maze_map, continuing_task=True, reset_target=False,
                           xml_file=str(ant_xml_path()), include_cfrc_ext_in_observation=False, render_mode=render_mode, max_episode_steps=max_episode_steps or task.max_episode_steps)
    start, goal = mazes.maze_cells(layout, "R")[0], goal_cell(task.maze)

    class AntMazeTask(gymnasium.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (29,), np.float64)
            self.goal = np.asarray(task.goal)

        def reset(self, *, seed=None, options=None):
            obs, info = self.env.reset(seed=seed, options=dict(reset_cell=np.array(start), goal_cell=np.array(goal)))
            self.env.unwrapped.goal = self.goal.copy()  # no goal noise: the exact cell centre
            self.env.unwrapped.update_target_site_pos()
            return np.concatenate([obs["achieved_goal"], obs["observation"]]), info

        def step(self, action):
            obs, _, _, truncated, info = self.env.step(action)
            state = np.concatenate([obs["achieved_goal"], obs["observation"]])
            success = bool(np.linalg.norm(state[:2] - self.goal) <= REACH_RADIUS)
            info["success"] = success
            return state, float(success), success, truncated, info

    return AntMazeTask(inner)


def controller_success(task, walker_path=None, episodes: int = 20, noise: float = 0.0, seed: int = 0):
    """The walker steered by the grid planner to the evaluation goal in the evaluation env: the
    task's "expert" reference (the ceiling). Returns (success rate, mean steps of successes)."""
    act, _ = load_walker(walker_path or default_walker_path())
    env, rng = make_antmaze(task), np.random.default_rng(seed)
    target = goal_cell(task.maze)
    dist = mazes.bfs_distances(mazes.MAZES[task.maze], target)
    wins, lengths = 0, []
    for i in range(episodes):
        state, _ = env.reset(seed=seed + i)
        reward = 0.0
        for step in range(task.max_episode_steps):
            a = act(walker_obs(state[None], waypoint(task.maze, dist, target, state[:2])))[0]
            state, reward, terminated, truncated, _ = env.step(np.clip(a + noise * rng.normal(size=ACT_DIM), -1, 1))
            if terminated or truncated:
                break
        wins += reward > 0
        lengths += [step + 1] if reward > 0 else []
    return wins / episodes, float(np.mean(lengths)) if lengths else float("nan")


def check_walker_of(path: Path, data_dir=None) -> None:
    """A built-in ant dataset made by another walker than the one the generator would take now (a
    walker trained into the data folder, or removed from it, since): a one-line warning; delete the
    file to make it again with that walker."""
    walker = default_walker_path(data_dir)
    if not walker.exists():
        return
    with np.load(walker, allow_pickle=False) as f:
        now = str(f["meta/fingerprint"]) if "meta/fingerprint" in f.files else ""
    with h5py.File(path, "r") as f:
        made_by = str(f.attrs.get("walker", ""))
    if made_by != now:
        from leq_utils.common import warn
        warn(f"dataset {path.name} was made by another walker than {walker} (one trained into the data folder or "
             f"removed from it since?): delete it to make it again with this one")


def check_data_version(path: Path) -> None:
    """A built-in ant dataset made by another version of the generator (version 1: Ant-v5's
    strong-motored body) is refused: its ant is not the one the evaluation mazes hold. A file
    without the generator's mark (not made here) or that cannot be read passes on to the reader."""
    try:
        with h5py.File(path, "r") as f:
            made = str(f.attrs.get("generator", ""))
    except OSError:
        return
    if made.startswith("ant.generate") and made != f"ant.generate v{DATA_VERSION}":
        raise InputError(f"dataset {path} was made by {made} (version 1: Ant-v5's body), the tasks now use D4RL's ant "
                         f"(version {DATA_VERSION}): make it again with `python scripts/generate_dataset.py --env ENV`")


def builtin_dataset_path(task, data_dir=None, size=None, seed=0) -> Path:
    return Path(data_dir or mazes.DATA_DIR) / f"{task.name}_{(size or DATA_SIZE) // 1000}k_seed{seed}_v{DATA_VERSION}.hdf5"


def generate(task, path: Path, walker_path=None, size=None, seed: int = 0, noise: float = DATA_NOISE,
             episode_len: int = 1000, n_ants: int = 16) -> float:
    """A dataset the way D4RL made its AntMazes: in each `episode_len`-step episode an ant starts
    in a random cell and is sent to a goal cell, then to the next when it gets within 0.5 of the
    goal (diverse: any free cells; play: the hand-picked `play_cells`). The grid planner gives the
    next waypoint, the walker walks to it, N(0, noise^2) is added to its actions. Rewards/terminals
    are relabelled for the evaluation goal (1 when ||xy' - goal|| <= 0.5; the episode goes on);
    timeouts end each episode. `n_ants` ants in the same maze model are stepped together (one
    walker call for all). Deterministic for a seed; written atomically in D4RL's HDF5 format.
    Returns the seconds it took."""
    import mujoco
    from tqdm import tqdm
    size = size or DATA_SIZE
    act, walker = load_walker(walker_path or default_walker_path())
    layout, rng = mazes.MAZES[task.maze], np.random.default_rng(seed)
    places = mazes.maze_cells(layout, ".RG") if task.name.endswith("diverse") else play_cells(task.maze)
    dists = {c: mazes.bfs_distances(layout, c) for c in places}
    env = make_antmaze(task).unwrapped
    model, ant_env = env.model, env.ant_env
    init_qpos, init_qvel = ant_env.init_qpos.copy(), ant_env.init_qvel.copy()
    episodes = -(-size // episode_len)
    keys = dict(observations=(size, 29), actions=(size, ACT_DIM), rewards=(size,), terminals=(size,),
                timeouts=(size,), goals=(size, 2))
    out = {k: np.zeros(shape, np.float32) for k, shape in keys.items()}
    goal, start_time = np.asarray(task.goal), time.time()
    with tqdm(total=size, desc=f"generate {task.name}", unit="step", mininterval=1) as bar:
        for first in range(0, episodes, n_ants):
            n = min(n_ants, episodes - first)
            data = [mujoco.MjData(model) for _ in range(n)]
            targets = []
            for d in data:  # a random start cell (+-1 position noise, as the env's reset), a random heading
                qpos = init_qpos.copy()
                qpos[:2] = cell_centre(task.maze, places[rng.integers(len(places))]) + rng.uniform(-1, 1, 2)
                yaw = rng.uniform(-np.pi, np.pi)
                qpos[3:7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
                d.qpos[:], d.qvel[:] = qpos, init_qvel
                mujoco.mj_forward(model, d)
                targets.append(places[rng.integers(len(places))])
            state = np.stack([ant_state(d) for d in data])
            for step in range(episode_len):
                rows = [(first + k) * episode_len + step for k in range(n)]
                live = [k for k in range(n) if rows[k] < size]
                if not live:
                    break
                for k in range(n):  # a reached goal: the next one
                    if np.linalg.norm(state[k, :2] - cell_centre(task.maze, targets[k])) <= REACH_RADIUS:
                        targets[k] = places[rng.integers(len(places))]
                points = np.stack([waypoint(task.maze, dists[targets[k]], targets[k], state[k, :2]) for k in range(n)])
                actions = np.clip(act(walker_obs(state, points)) + noise * rng.normal(size=(n, ACT_DIM)), -1.0, 1.0)
                for k, d in enumerate(data):
                    d.ctrl[:] = actions[k]
                    mujoco.mj_step(model, d, nstep=ant_env.frame_skip)
                next_state = np.stack([ant_state(d) for d in data])
                reached = np.linalg.norm(next_state[:, :2] - goal, axis=-1) <= REACH_RADIUS
                for k in live:
                    t = rows[k]
                    out["observations"][t], out["actions"][t] = state[k], actions[k]
                    out["goals"][t] = cell_centre(task.maze, targets[k])
                    out["rewards"][t] = out["terminals"][t] = float(reached[k])
                    out["timeouts"][t] = step == episode_len - 1
                state = next_state
                bar.update(len(live))
    out["timeouts"][-1] = 1.0
    mazes.write_d4rl_file(path, out, env=task.name, size=size, seed=seed, noise=noise, episode_len=episode_len,
                          walker=str(walker["meta/fingerprint"]), generator=f"ant.generate v{DATA_VERSION}")
    return time.time() - start_time
