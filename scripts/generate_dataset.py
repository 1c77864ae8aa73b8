"""Generate a built-in PointMaze or AntMaze dataset (or a local stand-in for an OGBench PointMaze
`navigate` dataset) and measure the waypoint controller that made it on the evaluation task.

    python scripts/generate_dataset.py --env pointmaze-medium
    python scripts/generate_dataset.py --env pointmaze-giant-navigate-singletask-v0
    python scripts/generate_dataset.py --env ant-large-diverse     # with the project's walker (leq_utils/ant_walker.npz)

The stages generate the built-in dataset themselves on first use; this script makes one on
purpose (another size, seed or noise) and reports the controller's success rate.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leq_utils import ant, cli, mazes  # noqa: E402
from leq_utils.tasks import (InputError, Task, check_common, check_flags, check_writable_folder, get_task,  # noqa: E402
                             qlearning_transitions, read_hdf5)


# ============================================================================================
# CLI: generate a built-in (or OGBench PointMaze) dataset and measure the controller
# ============================================================================================

@dataclasses.dataclass
class Args:
    env: str = "pointmaze-umaze"
    """built-in task, or OGBench pointmaze-*-navigate-singletask task, whose dataset to generate"""
    size: Optional[int] = None
    """number of transitions (default: the task's default size, see docs/TASKS.md; OGBench 1,000,000)"""
    seed: int = 0
    """generator seed (the dataset is a deterministic function of it)"""
    noise: Optional[float] = None
    """std of the Gaussian action noise added to the controller (default: built-in PointMaze 1.0, built-in ant 0.2, OGBench 0.5)"""
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
    walker: Optional[str] = None
    """built-in ant tasks: the walker (default: <data_dir>/ant_walker.npz if scripts/train_ant_walker.py made one there,
    else the project's own, leq_utils/ant_walker.npz)"""


def main(args: Args):
    task = get_task(args.env)
    check_common(args)  # no empty path flag (--data-dir "" would mean ./data), a seed in [0, 2**32)
    check_flags(args, (">= 0", "seed noise jitter expert_episodes"), ("in [0, 1]", "excursion dash"))
    if args.size is not None and args.size < 2:
        raise InputError(f"--size must be >= 2, got {args.size}")
    if task.source == "ogbench" and task.family == "pointmaze":
        return generate_ogbench(task, args)
    if task.source != "builtin":
        raise InputError(f"only built-in pointmaze and ant tasks and OGBench pointmaze-*-singletask tasks can "
                         f"be generated, not {task.name}")
    if ant.is_builtin_ant(task):
        return generate_ant(task, args)
    noise = mazes.DATA_NOISE if args.noise is None else args.noise
    changed = [f"--{k}" for k, v, default in (("noise", noise, mazes.DATA_NOISE), ("jitter", args.jitter, mazes.DATA_JITTER),
               ("excursion", args.excursion, mazes.DATA_EXCURSION), ("dash", args.dash, mazes.DATA_DASH)) if v != default]
    if changed and not args.out:  # the default file name does not say how the data were made
        raise InputError(f"{' '.join(changed)} make other data than the task's own: pass --out FILE.hdf5 (and "
                         f"--dataset-path FILE.hdf5 to the stages), so that the default dataset is not replaced")
    path = Path(args.out) if args.out else mazes.builtin_dataset_path(task, args.data_dir, args.size, args.seed)
    check_writable_folder(path.parent, "the output folder (--out, --data-dir or LEQ_DATA_DIR)")
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


def generate_ant(task: Task, args: Args):
    noise = ant.DATA_NOISE if args.noise is None else args.noise
    pointmaze_only = [f"--{k}" for k, v, default in (("jitter", args.jitter, mazes.DATA_JITTER),
                      ("excursion", args.excursion, mazes.DATA_EXCURSION), ("dash", args.dash, mazes.DATA_DASH)) if v != default]
    if pointmaze_only:
        raise InputError(f"{' '.join(pointmaze_only)}: built-in PointMaze settings; the ant generator has only --noise and --walker")
    changed = [flag for flag, differs in (("--noise", noise != ant.DATA_NOISE), ("--walker", args.walker is not None and Path(args.walker).resolve() != ant.default_walker_path(args.data_dir).resolve())) if differs]
    if changed and not args.out:
        raise InputError(f"{' '.join(changed)} make other data than the task's own: pass --out FILE.hdf5 (and "
                         f"--dataset-path FILE.hdf5 to the stages), so that the default dataset is not replaced")
    walker = Path(args.walker) if args.walker else ant.default_walker_path(args.data_dir)
    path = Path(args.out) if args.out else ant.builtin_dataset_path(task, args.data_dir, args.size, args.seed)
    check_writable_folder(path.parent, "the output folder (--out, --data-dir or LEQ_DATA_DIR)")
    seconds = ant.generate(task, path, walker, args.size, args.seed, noise)
    data = read_hdf5(path)
    t = qlearning_transitions(data)
    obs = data["observations"]
    unhealthy, flipped = 100 * np.mean(~ant.healthy(obs)), 100 * np.mean(ant.upside_down(obs))
    print(f"wrote {path}: {len(t['rewards'])} transitions, {int(data['timeouts'].sum())} episodes, "
          f"{int(t['rewards'].sum())} at the goal, in {seconds:.1f} s; states upside down {flipped:.1f}%, "
          f"with the torso's height outside {ant.HEALTHY_Z} {unhealthy:.1f}%")
    for n in (0.0, noise) if args.expert_episodes else ():
        rate, steps = ant.controller_success(task, walker, args.expert_episodes, n)
        print(f"walker + planner (noise {n}) on the evaluation task: success {100 * rate:.0f}% "
              f"over {args.expert_episodes} episodes, {steps:.0f} steps to the goal")


def generate_ogbench(task: Task, args: Args):
    from leq_utils import ogbench_tasks
    noise = ogbench_tasks.NAVIGATE_NOISE if args.noise is None else args.noise
    path = Path(args.out) if args.out else ogbench_tasks.generated_file(task, args.data_dir, args.size, args.seed)
    check_writable_folder(path.parent, "the output folder (--out, --data-dir or LEQ_DATA_DIR)")
    seconds = ogbench_tasks.generate(task, path, args.size, args.seed, noise, args.episode_len)
    t = ogbench_tasks.transitions(task, path)
    val = path.with_name(path.name.replace(".npz", "-val.npz"))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; {val.name} {val.stat().st_size / 1e6:.1f} MB): "
          f"{len(t['rewards'])} transitions, {int(t['terminals'].sum())} into the goal of {task.name}, "
          f"in {seconds:.1f} s")
    print(f"navigate statistics (docs/TASKS.md): {json.dumps(ogbench_tasks.navigate_statistics(task, path))}")
    report_controller(ogbench_tasks.controller_success, task, args.expert_episodes, noise)


if __name__ == "__main__":
    cli.run_script(main, Args)
