"""Tasks: where data and environments come from.

Every stage imports this module. For an env name it gives
  * the static facts of the task (dims, episode limit, goal)      -> get_task
  * the offline dataset, with D4RL `qlearning_dataset` semantics   -> load_dataset
  * the reward transform (docs/ALGORITHM.md, section 2)            -> Dataset.reward_scale/shift
  * the TRUE termination function, in JAX, batched                  -> termination_fn
  * the evaluation environment (gymnasium API, whatever is behind)  -> make_env
  * the normalised score                                            -> normalized_score
The sources behind them live in their own modules, imported only for their own names:
mazes.py (the built-in PointMaze world and its dataset generator), d4rl_tasks.py (the optional
d4rl package), ogbench_tasks.py (OGBench's single-task mazes, and a local generator of its
PointMaze data) and minari_tasks.py (Minari datasets).

Supported names: the built-in `pointmaze-{umaze,medium,large,ultra}` (datasets generated
locally, see mazes.py), D4RL's `antmaze-*`, `hopper-*`, `walker2d-*`, `halfcheetah-*` (through
the optional d4rl package), `antmaze-ultra-{play,diverse}-v0`, OGBench's
`{pointmaze,antmaze,humanoidmaze}-{medium,large,giant}-{navigate,stitch}-singletask[-task1..5]-v0`
(and `antmaze-*-explore-*`), and `minari:<dataset id>` (AntMaze, PointMaze and MuJoCo
hopper/walker2d/halfcheetah datasets). Any D4RL-format HDF5 file (OGBench: an OGBench .npz) can
stand in for the dataset with `dataset_path`.

Run `python tasks.py --env pointmaze-umaze` to (re)generate a built-in dataset and measure the
waypoint controller ("expert") on the evaluation task; `python tasks.py --env
pointmaze-giant-navigate-singletask-v0` does the same for an OGBench PointMaze.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import h5py
import jax
import jax.numpy as jnp
import numpy as np

import mazes


class InputError(ValueError):
    """Bad input from the user (env name, file, flag). Scripts print it as one line and exit."""


def warn(message: str) -> None:
    """A one-line warning on stderr (something was accepted, but the user should know)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


RULES = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "in (0, 1)": lambda v: 0 < v < 1,
         "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1}


def check_flags(args, *rules) -> None:
    """Refuse, in one line, the first flag out of its range. rules: (rule, "field field ..."), a
    rule being a key of RULES; a tuple-valued flag needs at least one value and checks each;
    None (a per-task default not yet filled) passes."""
    for rule, names in rules:
        for name in names.split():
            value = getattr(args, name)
            values = value if isinstance(value, tuple) else (value,)
            if value is not None and not (values and all(RULES[rule](v) for v in values)):
                raise InputError(f"--{name.replace('_', '-')} must be {rule}{' (each)' if isinstance(value, tuple) else ''}, "
                                 f"got {' '.join(map(str, values)) if isinstance(value, tuple) else value}")


@dataclasses.dataclass
class TaskArgs:
    """The flags every stage shares (each stage's Args extends these): task, data and seed."""
    # --- Experiment ---
    env: str = "pointmaze-umaze"
    """task name (see tasks.py / README for the supported names)"""
    dataset_path: Optional[str] = None
    """a D4RL-format HDF5 file (OGBench tasks: an OGBench .npz) to use instead of the task's own dataset"""
    data_dir: Optional[str] = None
    """folder of the built-in datasets (default: $LEQ_DATA_DIR or ./data); OGBench tasks: the folder
    of its .npz files (default: ~/.ogbench/data, then data/ogbench for generated PointMaze files)"""
    seed: int = 0
    """random seed of everything the stage draws (leq.py: also of the upstream stages it runs)"""


def check_task_args(args: TaskArgs) -> None:
    """The shared flags, before any work: a known env, a seed >= 0, an existing dataset file."""
    get_task(args.env)
    check_flags(args, (">= 0", "seed"))
    if args.dataset_path and not Path(args.dataset_path).is_file():
        raise InputError(f"--dataset-path {args.dataset_path} "
                         f"{'is a folder, not a file' if Path(args.dataset_path).is_dir() else 'does not exist'}")
    if args.data_dir and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise InputError(f"--data-dir {args.data_dir} is a file, not a folder")


def per_task_help(what: str, table: dict, column: int, otherwise: str) -> str:
    """--help text of a flag whose default depends on the task: `what`, then the value for other
    tasks and column `column` of `table` ({env: (values...)}) for each task in it."""
    values = ", ".join(f"{env.removeprefix('pointmaze-')} {row[column]:,}" for env, row in table.items())
    return f"{what} (default: {otherwise}; built-in pointmaze {values})"


# ============================================================================================
# Task descriptions
# ============================================================================================

# AntMaze termination centres and radius used in imagination (docs/ALGORITHM.md, section 2).
ANTMAZE_CENTRES = {"umaze": (0.75, 8.75), "medium": (20.75, 20.75), "large": (32.75, 24.75),
                   "ultra": (52.75, 36.75)}
ANTMAZE_RADIUS = 0.25
ANTMAZE_LIMITS = {"umaze": 700, "medium": 1000, "large": 1000, "ultra": 2000}

LOCOMOTION_DIMS = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6)}
NAME_PATTERNS = [  # (name, source)
    (r"pointmaze-(umaze|medium|large|ultra)", "builtin"),
    (r"antmaze-umaze(-diverse)?-v[0-2]", "d4rl"),
    (r"antmaze-(medium|large)-(play|diverse)-v[0-2]", "d4rl"),
    (r"antmaze-ultra-(play|diverse)-v0", "d4rl"),
    (r"(hopper|walker2d|halfcheetah)-(random|medium|expert|medium-replay|medium-expert|full-replay)-v[0-2]", "d4rl"),
    (r"(pointmaze|antmaze|humanoidmaze)-(medium|large|giant)-(navigate|stitch)-singletask(-task[1-5])?-v0", "ogbench"),
    (r"antmaze-(medium|large|giant)-explore-singletask(-task[1-5])?-v0", "ogbench"),
    (r"minari:.+", "minari"),
]
SUPPORTED = ("pointmaze-{umaze,medium,large,ultra}, antmaze-umaze[-diverse]-v2, "
             "antmaze-{medium,large}-{play,diverse}-v2, antmaze-ultra-{play,diverse}-v0, "
             "{hopper,walker2d,halfcheetah}-{random,medium,medium-replay,medium-expert,expert}-v2, "
             "OGBench {pointmaze,antmaze,humanoidmaze}-{medium,large,giant}-navigate-singletask[-task1..5]-v0 "
             "(also -stitch-, antmaze -explore-), minari:<dataset id>")
MAZE_FAMILIES = ("pointmaze", "antmaze", "humanoidmaze")


@dataclasses.dataclass(frozen=True)
class Task:
    """Static facts of a task (hashable, so jitted functions can close over it)."""
    name: str
    family: str              # pointmaze | antmaze | humanoidmaze | hopper | walker2d | halfcheetah
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    maze: str = ""           # umaze | medium | large | ultra | giant (maze families only)
    goal: tuple = ()         # termination centre (maze families only)
    goal_radius: float = 0.0
    source: str = "builtin"  # builtin | d4rl | ogbench | minari: the module data and envs come from
    goal_inclusive: bool = False  # the goal region is ||xy - goal|| <= radius (else < radius)

    @property
    def is_maze(self) -> bool:
        return self.family in MAZE_FAMILIES



def get_task(name: str) -> Task:
    """The static description of `name`; unknown names fail at once, listing the supported ones."""
    source = next((src for p, src in NAME_PATTERNS if re.fullmatch(p, name)), None)
    if source is None:
        raise InputError(f"unknown env '{name}'. Supported: {SUPPORTED}")
    if source == "ogbench":
        import ogbench_tasks  # imported only for OGBench tasks (it imports this module)
        return ogbench_tasks.describe(name)
    if source == "minari":
        import minari_tasks
        return minari_tasks.describe(name)
    family = name.split("-")[0]
    if family == "pointmaze":
        maze = name.split("-")[1]
        goal = mazes.cell_xy(mazes.MAZES[maze], mazes.maze_cells(mazes.MAZES[maze], "G")[0])
        return Task(name, family, 4, 2, mazes.POINTMAZE_LIMITS[maze], maze, tuple(goal), mazes.GOAL_RADIUS)
    if family == "antmaze":
        maze = name.split("-")[1]
        return Task(name, family, 29, 8, ANTMAZE_LIMITS[maze], maze, ANTMAZE_CENTRES[maze],
                    ANTMAZE_RADIUS, source="d4rl")
    return Task(name, family, *LOCOMOTION_DIMS[family], 1000, source="d4rl")


def run_name(env: str) -> str:
    """The env name as a folder name (`minari:D4RL/antmaze/large-diverse-v1` ->
    `minari_D4RL_antmaze_large-diverse-v1`); other names are unchanged."""
    return re.sub(r"[^\w.-]+", "_", env)



# ============================================================================================
# True termination functions (JAX, batched over leading axes), evaluated on the next state
# ============================================================================================

def termination_fn(task: Task, goal: Optional[tuple] = None) -> Callable:
    """done(s, a, s') for a batch, as docs/ALGORITHM.md, section 2. `goal` overrides the maze centre.
    A non-finite s' (NaN or inf anywhere) is done in every family (deviation, README: the
    written rules of the mazes and of halfcheetah would call a NaN state "not done"; hopper's
    and walker2d's already end there, and the authors' release ends halfcheetah's too)."""
    rule = family_termination(task, goal)
    return lambda s, a, s2: rule(s, a, s2) | ~jnp.all(jnp.isfinite(s2), -1)


def family_termination(task: Task, goal: Optional[tuple] = None) -> Callable:
    """The task family's rule of docs/ALGORITHM.md, section 2, as written."""
    if task.is_maze:
        centre, radius = jnp.asarray(goal if goal is not None else task.goal), task.goal_radius
        inside = jnp.less_equal if task.goal_inclusive else jnp.less

        def done(s, a, s2):  # reached the goal region: ||xy' - centre|| < radius (OGBench, Minari: <=)
            return inside(jnp.linalg.norm(s2[..., :2] - centre, axis=-1), radius)
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
    reward_scale: float            # reward transform r -> scale * r + shift (docs/ALGORITHM.md, section 2)
    reward_shift: float
    path: str                      # the HDF5 file it came from


REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")


REMEDIES = {"yours": "check or replace the file", "built-in": "delete it to regenerate it",
            "d4rl": "delete it to download it again"}


def read_hdf5(path, max_episode_steps: Optional[int] = None, origin: str = "yours") -> dict:
    """Read a D4RL-format file with h5py, validating it; errors name the file and the problem.
    origin (yours | built-in | d4rl) picks the advice for a broken file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise InputError(f"dataset file {path} has no {missing} (a D4RL file needs "
                                 f"{', '.join(REQUIRED_KEYS)} and usually timeouts)")
            for k in REQUIRED_KEYS + ("timeouts",):
                if k in f and not (isinstance(f[k], h5py.Dataset) and f[k].dtype.kind in "biuf"):
                    what = "a group" if isinstance(f[k], h5py.Group) else f"of type {f[k].dtype}"
                    raise InputError(f"dataset file {path}: '{k}' is {what}, not an array of numbers")
            data = {k: f[k][()] for k in REQUIRED_KEYS + ("timeouts",) if k in f}
    except OSError as e:
        raise InputError(f"dataset file {path} is not a readable HDF5 file (corrupt or "
                         f"truncated?): {e}; {REMEDIES[origin]}") from None
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
    """(scale, shift) of docs/ALGORITHM.md, section 2: mazes r - 1; locomotion (not random)
    r * 1000 / (max return - min return) over the dataset's episodes; otherwise unscaled. OGBench
    rewards are already -1 / 0 (ogbench_tasks.transitions): unscaled."""
    if task.source == "ogbench":
        return 1.0, 0.0
    if task.is_maze:
        return 1.0, -1.0
    if "random" not in task.name:
        returns = episode_returns(t)
        return float(1000.0 / (returns.max() - returns.min())), 0.0
    return 1.0, 0.0


def load_dataset(task: Task, dataset_path: Optional[str] = None,
                 data_dir: Optional[str] = None) -> Dataset:
    """The task's offline dataset as qlearning_dataset transitions (raw rewards)."""
    if task.source == "ogbench":
        import ogbench_tasks
        path = ogbench_tasks.dataset_file(task, dataset_path, data_dir)
        t = ogbench_tasks.transitions(task, path)
    elif task.source == "minari":
        import minari_tasks
        path, t = minari_tasks.transitions(task, dataset_path, data_dir)
    else:
        path, origin = d4rl_format_file(task, dataset_path, data_dir)
        data = read_hdf5(path, task.max_episode_steps, origin)
        outside = np.abs(data["actions"]) > 1
        if outside.any():
            warn(f"dataset {path}: {int(outside.sum())} action values (in {int(outside.any(1).sum())} rows) are "
                 f"outside [-1, 1]; they are clipped to [-1 + 1e-5, 1 - 1e-5] like every action")
        t = qlearning_transitions(data)
    dims = (t["observations"].shape[1], t["actions"].shape[1])
    if dims != (task.obs_dim, task.act_dim):
        raise InputError(f"dataset file {path} has obs/action dims {dims}, but {task.name} "
                         f"needs {(task.obs_dim, task.act_dim)}")
    scale, shift = reward_transform(task, t)
    return Dataset(**t, reward_scale=scale, reward_shift=shift, path=str(path))


def d4rl_format_file(task: Task, dataset_path: Optional[str], data_dir: Optional[str]) -> tuple:
    """(--dataset-path, the built-in file (generated once when missing) or d4rl's file; where it
    came from: yours | built-in | d4rl, for the advice on a broken file)."""
    if dataset_path:
        path, origin = Path(dataset_path), "yours"
    elif task.source == "builtin":
        path, origin = mazes.builtin_dataset_path(task, data_dir), "built-in"
        if not path.exists():
            print(f"[tasks] generating the built-in dataset {path.name} (once) ...")
            mazes.generate_pointmaze(task, path)
    else:
        import d4rl_tasks  # imported only for D4RL tasks (it imports this module)
        path, origin = d4rl_tasks.d4rl_dataset_path(task), "d4rl"
    return path, origin



class Transitions(NamedTuple):
    """Dataset transitions on the device, as the training stages sample them."""
    observations: jnp.ndarray       # (N, obs_dim)
    actions: jnp.ndarray            # (N, act_dim)
    rewards: jnp.ndarray            # (N,) transformed: reward_scale * r + reward_shift
    next_observations: jnp.ndarray  # (N, obs_dim)
    masks: jnp.ndarray              # (N,) 1 - terminals


def device_dataset(ds: Dataset) -> Transitions:
    """The dataset on the device with the task's reward transform applied and masks = 1 - terminals."""
    r = ds.reward_scale * ds.rewards + ds.reward_shift
    return Transitions(*(jnp.asarray(x) for x in
                         (ds.observations, ds.actions, r, ds.next_observations, 1.0 - ds.terminals)))


def sample(data: Transitions, key, batch_size: int) -> Transitions:
    """A uniform minibatch (with replacement), drawn on the device."""
    idx = jax.random.randint(key, (batch_size,), 0, data.observations.shape[0])
    return Transitions(*(x[idx] for x in data))


# ============================================================================================
# Evaluation environments and scores
# ============================================================================================

def make_env(task: Task, render_mode: Optional[str] = None):
    """The evaluation environment, always with the gymnasium API."""
    if task.source == "builtin":
        return mazes.make_pointmaze(task, render_mode=render_mode)
    if task.source == "ogbench":
        import ogbench_tasks
        return ogbench_tasks.make_env(task, render_mode=render_mode)
    if task.source == "minari":
        import minari_tasks
        return minari_tasks.make_env(task, render_mode=render_mode)
    import d4rl_tasks
    return d4rl_tasks.make_d4rl_env(task, render_mode)


def render_help(task: Task) -> str:
    """What rendering `task`'s env needs, for the error message of a video that cannot be made."""
    if task.family == "pointmaze":
        return mazes.render_help()
    import d4rl_tasks
    return d4rl_tasks.RENDER_HELP


def maze_geometry(task: Task):
    """(wall cell centres (n, 2), start xy, goal xy, cell size, radius of the env's goal region)
    of a maze task, for trajectory pictures."""
    if task.source == "ogbench":
        import ogbench_tasks
        return (*ogbench_tasks.maze_geometry(task), task.goal_radius)
    if task.source == "minari":
        import minari_tasks
        return (*minari_tasks.maze_geometry(task), task.goal_radius)
    # built-in, or D4RL's AntMaze (its env succeeds within 0.5)
    return (*mazes.maze_geometry(task), task.goal_radius if task.source == "builtin" else 0.5)


def env_goal(env) -> Optional[np.ndarray]:
    """The goal the environment actually uses (to check the termination centre against)."""
    u = env.unwrapped
    for name in ("target_goal", "cur_goal_xy", "goal"):  # d4rl, ogbench, gymnasium-robotics
        if getattr(u, name, None) is not None:
            return np.asarray(getattr(u, name), dtype=float)
    return np.asarray(None, dtype=float)


def normalized_score(task: Task, mean_return: float, success_rate: float) -> float:
    """Mazes: success rate x 100. Locomotion: D4RL's normalised score x 100 (Minari: its
    dataset's reference scores)."""
    if task.is_maze:
        return 100.0 * success_rate
    if task.source == "minari":
        import minari_tasks
        return minari_tasks.normalized_score(task, mean_return)
    import d4rl_tasks
    _, d4rl = d4rl_tasks.import_d4rl(task)
    return 100.0 * float(d4rl.get_normalized_score(task.name, mean_return))


# ============================================================================================
# CLI: generate a built-in (or OGBench PointMaze) dataset and measure the controller
# ============================================================================================

@dataclasses.dataclass
class Args:
    env: str = "pointmaze-umaze"
    """built-in task, or OGBench pointmaze-*-navigate-singletask task, whose dataset to generate"""
    size: Optional[int] = None
    """number of transitions (default: the task's default size, see README; OGBench 1,000,000)"""
    seed: int = 0
    """generator seed (the dataset is a deterministic function of it)"""
    noise: Optional[float] = None
    """std of the Gaussian action noise added to the controller (default: built-in 1.0, OGBench 0.5)"""
    jitter: float = mazes.DATA_JITTER
    """built-in: the controller aims at a uniform random point within +-jitter of each cell's centre"""
    excursion: float = mazes.DATA_EXCURSION
    """built-in: per-step probability of a 10-40-step excursion to a random point within +-1.5 cells"""
    dash: float = mazes.DATA_DASH
    """built-in: probability that an excursion is a dash instead (full throttle in a random direction, into walls at top speed)"""
    episode_len: Optional[int] = None
    """OGBench: steps per trajectory (default 1000, giant 2000, as ogbench's navigate data)"""
    data_dir: Optional[str] = None
    """folder for generated datasets (default: $LEQ_DATA_DIR or ./data next to this file; for OGBench its ogbench/ subfolder)"""
    out: Optional[str] = None
    """output path (default: <data_dir>/<env>_<size/1000>k_seed<seed>_v<version>.hdf5; OGBench
    <data_dir>/<dataset>_<size/1000>k_seed<seed>_v<version>.npz, and its -val.npz)"""
    expert_episodes: int = 50
    """episodes to measure the controller on the evaluation task (0 to skip)"""


def main(args: Args):
    task = get_task(args.env)
    check_flags(args, (">= 0", "seed noise jitter expert_episodes"), ("in [0, 1]", "excursion dash"))
    if args.size is not None and args.size < 2:
        raise InputError(f"--size must be >= 2, got {args.size}")
    if task.source == "ogbench" and task.family == "pointmaze":
        return generate_ogbench(task, args)
    if task.source != "builtin":
        raise InputError(f"only built-in pointmaze tasks and OGBench pointmaze-*-singletask tasks can "
                         f"be generated, not {task.name}")
    noise = mazes.DATA_NOISE if args.noise is None else args.noise
    changed = [f"--{k}" for k, v, default in (("noise", noise, mazes.DATA_NOISE), ("jitter", args.jitter, mazes.DATA_JITTER),
               ("excursion", args.excursion, mazes.DATA_EXCURSION), ("dash", args.dash, mazes.DATA_DASH)) if v != default]
    if changed and not args.out:  # the default file name does not say how the data were made
        raise InputError(f"{' '.join(changed)} make other data than the task's own: pass --out FILE.hdf5 (and "
                         f"--dataset-path FILE.hdf5 to the stages), so that the default dataset is not replaced")
    path = Path(args.out) if args.out else mazes.builtin_dataset_path(task, args.data_dir, args.size, args.seed)
    seconds = mazes.generate_pointmaze(task, path, args.size, args.seed, noise, args.jitter,
                                       excursion=args.excursion, dash=args.dash)
    data = qlearning_transitions(read_hdf5(path))
    print(f"wrote {path}: {len(data['rewards'])} transitions, {int(data['rewards'].sum())} at the "
          f"goal, in {seconds:.1f} s")
    report_controller(mazes.controller_success, task, args.expert_episodes, noise)


def report_controller(controller_success: Callable, task: Task, episodes: int, noise: float):
    """The data's controller on the evaluation task, without and with the data's action noise."""
    for n in (0.0, noise) if episodes else ():
        rate, steps = controller_success(task, episodes, n)
        print(f"controller (noise {n}) on the evaluation task: success {100 * rate:.0f}% "
              f"over {episodes} episodes, {steps:.0f} steps to the goal")


def generate_ogbench(task: Task, args: Args):
    import ogbench_tasks
    noise = ogbench_tasks.NAVIGATE_NOISE if args.noise is None else args.noise
    path = Path(args.out) if args.out else ogbench_tasks.generated_file(task, args.data_dir, args.size, args.seed)
    seconds = ogbench_tasks.generate(task, path, args.size, args.seed, noise, args.episode_len)
    t = ogbench_tasks.transitions(task, path)
    val = path.with_name(path.name.replace(".npz", "-val.npz"))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; {val.name} {val.stat().st_size / 1e6:.1f} MB): "
          f"{len(t['rewards'])} transitions, {int(t['terminals'].sum())} into the goal of {task.name}, "
          f"in {seconds:.1f} s")
    report_controller(ogbench_tasks.controller_success, task, args.expert_episodes, noise)


if __name__ == "__main__":
    import cli
    import tasks  # this file as the module the others import (its InputError is the one cli catches)
    cli.run_script(tasks.main, tasks.Args)  # with an XLA CPU compiler option (deviation, README)
