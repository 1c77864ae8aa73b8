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

Run `python scripts/generate_dataset.py --env pointmaze-umaze` to (re)generate a built-in dataset and measure the
waypoint controller ("expert") on the evaluation task; `python scripts/generate_dataset.py --env
pointmaze-giant-navigate-singletask-v0` does the same for an OGBench PointMaze.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import NamedTuple, Optional

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from leq_utils import mazes


from leq_utils.common import (  # noqa: F401  (re-exported: tasks.InputError, tasks.Task, ...)
    ANTMAZE_CENTRES, ANTMAZE_LIMITS, ANTMAZE_RADIUS, LOCOMOTION_DIMS, MAZE_FAMILIES, NAME_PATTERNS, RULES,
    SEED_LIMIT, SUPPORTED, InputError, Task, check_common, check_flags, check_input_file, check_writable_folder, family_termination,
    termination_fn, warn)


@dataclasses.dataclass
class TaskArgs:
    """The flags every stage shares (each stage's Args extends these): task, data and seed."""
    # --- Experiment ---
    env: str = "pointmaze-umaze"
    """task name (see docs/TASKS.md for the supported names)"""
    dataset_path: Optional[str] = None
    """a D4RL-format HDF5 file (OGBench tasks: an OGBench .npz) to use instead of the task's own dataset"""
    data_dir: Optional[str] = None
    """folder of the built-in datasets (default: $LEQ_DATA_DIR or ./data); OGBench tasks: the folder
    of its .npz files (default: ~/.ogbench/data, then data/ogbench for generated PointMaze files)"""
    seed: int = 0
    """random seed of everything the stage draws (leq.py: also of the upstream stages it runs)"""


def check_task_args(args: TaskArgs) -> None:
    """The shared flags, before any work: a known env, a seed in [0, 2**32), no empty path, an
    existing dataset file."""
    get_task(args.env)
    check_common(args)
    if args.dataset_path:
        check_input_file(args.dataset_path, "--dataset-path")
    if args.data_dir and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise InputError(f"--data-dir {args.data_dir} is a file, not a folder")


def per_task_help(what: str, table: dict, column: int, otherwise: str) -> str:
    """--help text of a flag whose default depends on the task: `what`, then the value for other
    tasks and column `column` of `table` ({env: (values...)}) for each task in it."""
    values = ", ".join(f"{env.removeprefix('pointmaze-')} {row[column]:,}" for env, row in table.items())
    return f"{what} (default: {otherwise}; built-in pointmaze {values})"


def get_task(name: str) -> Task:
    """The static description of `name`; unknown names fail at once, listing the supported ones."""
    source = next((src for p, src in NAME_PATTERNS if re.fullmatch(p, name)), None)
    if source is None:
        raise InputError(f"unknown env '{name}'. Supported: {SUPPORTED}")
    if source == "ogbench":
        from leq_utils import ogbench_tasks  # imported only for OGBench tasks (it imports this module)
        return ogbench_tasks.describe(name)
    if source == "minari":
        from leq_utils import minari_tasks
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


def read_hdf5(path, max_episode_steps: Optional[int] = None, origin: str = "yours", env: Optional[str] = None) -> dict:
    """Read a D4RL-format file with h5py, validating it; errors name the file and the problem.
    origin (yours | built-in | d4rl) picks the advice for a broken file. env: the task the file is
    read for; a file the built-in generator made for another task (it records it) is refused."""
    path = Path(path)
    check_input_file(path, "dataset file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise InputError(f"dataset file {path} has no {missing} (a D4RL file needs "
                                 f"{', '.join(REQUIRED_KEYS)} and usually timeouts)")
            for k in REQUIRED_KEYS + ("timeouts",):
                try:
                    item = f[k] if k in f else None
                except KeyError as e:  # a soft link to nowhere, an external link to a missing file
                    raise InputError(f"dataset file {path}: '{k}' is a link that does not resolve ({e}); "
                                     f"store the array itself") from None
                if item is not None and not (isinstance(item, h5py.Dataset) and item.dtype.kind in "biuf"):
                    what = "a group" if isinstance(item, h5py.Group) else f"of type {item.dtype}"
                    raise InputError(f"dataset file {path}: '{k}' is {what}, not an array of numbers")
                if item is not None and item.ndim == 0:
                    raise InputError(f"dataset file {path}: '{k}' is a single number, not an array (one row per step)")
            data = {k: f[k][()] for k in REQUIRED_KEYS + ("timeouts",) if k in f}
            made_for = f.attrs.get("env")  # the built-in generator records the task it made the file for
    except OSError as e:
        raise InputError(f"dataset file {path} is not a readable HDF5 file (corrupt or "
                         f"truncated?): {e}; {REMEDIES[origin]}") from None
    made_for = made_for.decode() if isinstance(made_for, bytes) else made_for
    if env is not None and isinstance(made_for, str) and made_for != env:  # umaze data under --env pointmaze-medium
        raise InputError(f"dataset file {path} was generated for {made_for}, not {env}: pass --env {made_for}, "
                         f"or the file made for {env}")
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
        odd = ~np.isin(v, (0, 1)) if k in ("terminals", "timeouts") else None  # flags: 7.0 is no terminal
        if odd is not None and odd.any():
            raise InputError(f"dataset file {path}: '{k}' must be 0/1 (or true/false), but {odd.sum()} rows hold other "
                             f"values (first at row {np.argmax(odd)}: {v[np.argmax(odd)]:g}); fix the file")
        big = np.abs(v.astype(np.float64)) > np.finfo(np.float32).max  # finite here, inf in the stages' float32
        big = big if v.ndim == 1 else big.any(1)
        if big.any():
            raise InputError(f"dataset file {path}: '{k}' has values beyond float32's range (|x| > 3.4e38) in "
                             f"{big.sum()} rows (first at row {np.argmax(big)}); the stages compute in float32: "
                             f"clean or rescale the file")
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


def reward_transform(task: Task, t: dict, path="the dataset") -> tuple:
    """(scale, shift) of docs/ALGORITHM.md, section 2: mazes r - 1; locomotion (not random)
    r * 1000 / (max return - min return) over the dataset's episodes; otherwise unscaled. OGBench
    rewards are already -1 / 0 (ogbench_tasks.transitions): unscaled. A locomotion dataset whose
    episodes all have the same return has no such scale (1000 / 0): refused in one line naming it."""
    if task.source == "ogbench":
        return 1.0, 0.0
    if task.is_maze:
        return 1.0, -1.0
    if "random" not in task.name:
        returns = episode_returns(t)
        with np.errstate(divide="ignore", over="ignore"):
            scale = float(1000.0 / (returns.max() - returns.min()))
        if not (np.isfinite(scale) and scale > 0):
            raise InputError(f"dataset {path}: its {len(returns)} episodes all have the return {returns.max():.6g}, so "
                             f"{task.family}'s reward scale 1000 / (max return - min return) is undefined; use a "
                             f"dataset with episodes of different returns")
        return scale, 0.0
    return 1.0, 0.0


def load_dataset(task: Task, dataset_path: Optional[str] = None,
                 data_dir: Optional[str] = None) -> Dataset:
    """The task's offline dataset as qlearning_dataset transitions (raw rewards)."""
    if task.source == "ogbench":
        from leq_utils import ogbench_tasks
        path = ogbench_tasks.dataset_file(task, dataset_path, data_dir)
        t = ogbench_tasks.transitions(task, path)
    elif task.source == "minari":
        from leq_utils import minari_tasks
        path, t = minari_tasks.transitions(task, dataset_path, data_dir)
    else:
        path, origin = d4rl_format_file(task, dataset_path, data_dir)
        data = read_hdf5(path, task.max_episode_steps, origin, task.name)
        outside = np.abs(data["actions"]) > 1
        if outside.any():
            warn(f"dataset {path}: {int(outside.sum())} action values (in {int(outside.any(1).sum())} rows) are "
                 f"outside [-1, 1]; they are clipped to [-1 + 1e-5, 1 - 1e-5] like every action")
        t = qlearning_transitions(data)
    if len(t["rewards"]) == 0:  # before any statistics of them (numpy's warnings on empty slices)
        raise InputError(f"dataset file {path} gives no transitions: every step ends its episode by a timeout or is "
                         f"the file's last (a timed-out step has no next observation); check its timeouts")
    dims = (t["observations"].shape[1], t["actions"].shape[1])
    if dims != (task.obs_dim, task.act_dim):
        raise InputError(f"dataset file {path} has obs/action dims {dims}, but {task.name} "
                         f"needs {(task.obs_dim, task.act_dim)}")
    check_states_fit(task, t["observations"], path)
    scale, shift = reward_transform(task, t, path)
    return Dataset(**t, reward_scale=scale, reward_shift=shift, path=str(path))


def check_states_fit(task: Task, observations: np.ndarray, path) -> None:
    """Data that cannot be a recording of the task, refused in one line: every observation the same
    (all zeros, say). For the built-in mazes, states inside walls or outside the maze (another maze's
    data of the same dimensions) get a warning: a file the built-in generator made for another task
    is refused earlier (it records its task), synthetic data may go anywhere."""
    if len(observations) > 1 and (observations.max(0) == observations.min(0)).all():
        raise InputError(f"dataset file {path}: every observation is the same ({np.array2string(observations[0], precision=3)})"
                         f": not a recording of {task.name}; check the file")
    if task.source == "builtin" and task.family == "pointmaze":
        walls = np.array([[c == "#" for c in row] for row in mazes.MAZES[task.maze]])
        i, j = mazes.xy_cells(mazes.MAZES[task.maze], observations[:, :2])
        inside = (i >= 0) & (i < walls.shape[0]) & (j >= 0) & (j < walls.shape[1])
        wall = ~inside
        wall[inside] = walls[i[inside], j[inside]]
        if wall.mean() > 0.01:  # the point's centre never enters a wall cell: a warning (synthetic data may)
            warn(f"dataset file {path}: {100 * wall.mean():.0f}% of its states lie inside walls or outside the "
                 f"{task.maze} maze: data of another maze? (pass the --env it was recorded in)")


def d4rl_format_file(task: Task, dataset_path: Optional[str], data_dir: Optional[str]) -> tuple:
    """(--dataset-path, the built-in file (generated once when missing) or d4rl's file; where it
    came from: yours | built-in | d4rl, for the advice on a broken file)."""
    if dataset_path:
        path, origin = Path(dataset_path), "yours"
    elif task.source == "builtin":
        path, origin = mazes.builtin_dataset_path(task, data_dir), "built-in"
        if not path.exists():
            check_writable_folder(path.parent, "the data folder (--data-dir or LEQ_DATA_DIR)")
            print(f"[tasks] generating the built-in dataset {path.name} (once) ...")
            mazes.generate_pointmaze(task, path)
    else:
        from leq_utils import d4rl_tasks  # imported only for D4RL tasks (it imports this module)
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
        from leq_utils import ogbench_tasks
        return ogbench_tasks.make_env(task, render_mode=render_mode)
    if task.source == "minari":
        from leq_utils import minari_tasks
        return minari_tasks.make_env(task, render_mode=render_mode)
    from leq_utils import d4rl_tasks
    return d4rl_tasks.make_d4rl_env(task, render_mode)


def render_help(task: Task) -> str:
    """What rendering `task`'s env needs, for the error message of a video that cannot be made."""
    if task.family == "pointmaze":
        return mazes.render_help()
    from leq_utils import d4rl_tasks
    return d4rl_tasks.RENDER_HELP


def maze_geometry(task: Task):
    """(wall cell centres (n, 2), start xy, goal xy, cell size, radius of the env's goal region)
    of a maze task, for trajectory pictures."""
    if task.source == "ogbench":
        from leq_utils import ogbench_tasks
        return (*ogbench_tasks.maze_geometry(task), task.goal_radius)
    if task.source == "minari":
        from leq_utils import minari_tasks
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
        from leq_utils import minari_tasks
        return minari_tasks.normalized_score(task, mean_return)
    from leq_utils import d4rl_tasks
    _, d4rl = d4rl_tasks.import_d4rl(task)
    return 100.0 * float(d4rl.get_normalized_score(task.name, mean_return))
