"""Minari datasets (pip `minari`, Farama's successor to D4RL): `minari:<dataset id>`.

A Minari dataset carries its own evaluation env (`recover_environment`), so the task's facts
come from the dataset on disk (minari's folder: $MINARI_DATASETS_PATH, default
~/.minari/datasets). tasks.py calls this module only for `minari:` names:
  * the static facts (family, dims, goal, episode limit)     -> describe
  * episodes flattened to qlearning_dataset transitions       -> transitions
  * the evaluation env from the dataset                       -> make_env
  * the normalised score (the dataset's reference scores)     -> normalized_score
  * walls, start and goal for trajectory pictures             -> maze_geometry

Families: gymnasium-robotics AntMaze and PointMaze (dict observations mapped as D4RL's:
AntMaze `[achieved_goal (xy), observation]` = qpos + qvel, 29 numbers for v4; PointMaze
`observation` = (x, y, vx, vy); the goal is left out), and MuJoCo Hopper, Walker2d and
HalfCheetah (the true termination functions of tasks.py). Mazes: the evaluation env's single
goal cell is the task; rewards and terminals are relabelled for it (1 on every transition whose
s' is within 0.45 of the goal cell's centre, gymnasium-robotics' success rule), reward transform
r - 1, and evaluation ends an episode at success (`continuing_task=False`).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from leq_utils import mazes
from leq_utils import common

FAMILIES = [(r"AntMaze_.*", "antmaze"), (r"PointMaze_.*", "pointmaze"), (r"Hopper-v\d+", "hopper"),
            (r"Walker2d-v\d+", "walker2d"), (r"HalfCheetah-v\d+", "halfcheetah")]
GOAL_RADIUS = 0.45  # gymnasium-robotics mazes: success iff ||achieved_goal - goal|| <= 0.45


def root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path("~/.minari/datasets").expanduser()))


def open_dataset(dataset_id: str):
    import minari
    try:
        return minari.load_dataset(dataset_id)  # local only: never downloads
    except FileNotFoundError:
        raise common.InputError(
            f"Minari dataset {dataset_id} is not in {root()}: on a machine with internet run `pip install "
            f"'minari[hf]==0.5.4' && minari download {dataset_id}` (it writes to $MINARI_DATASETS_PATH, default "
            f"~/.minari/datasets) and copy its folder {dataset_id}/ to {root()}, or set MINARI_DATASETS_PATH "
            f"to the folder that holds it") from None
    except (ValueError, TypeError, OSError) as e:
        raise common.InputError(f"cannot read Minari dataset {dataset_id} in {root()} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None


def flat_obs(family: str, obs):
    """Dict observations of the mazes as D4RL's: xy first, no goal."""
    if not isinstance(obs, dict):
        return np.asarray(obs)
    if family == "antmaze":
        return np.concatenate([obs["achieved_goal"], obs["observation"]], -1)
    return np.asarray(obs["observation"])  # PointMaze: (x, y, vx, vy)


def recover_env(ds, family: str, **kwargs):
    """The dataset's evaluation env; mazes end the episode at the goal."""
    mazes.import_gymnasium_robotics()  # registers its envs, silencing an unrelated notice
    if family in common.MAZE_FAMILIES:
        kwargs["continuing_task"] = False
    with warnings.catch_warnings():  # e.g. "installed mujoco does not meet the requirement"
        warnings.simplefilter("ignore")
        return ds.recover_environment(eval_env=True, **kwargs)


@functools.lru_cache(maxsize=None)
def describe(name: str) -> common.Task:
    dataset_id = name.removeprefix("minari:")
    ds = open_dataset(dataset_id)
    spec = ds.env_spec  # the collection env; its evaluation env is of the same family
    family = next((f for pattern, f in FAMILIES if spec is not None and re.fullmatch(pattern, spec.id)), None)
    if family is None:
        raise common.InputError(f"{name}: its env {spec.id if spec else None} is not a supported family "
                               f"(AntMaze_*, PointMaze_*, Hopper, Walker2d, HalfCheetah)")
    env = recover_env(ds, family)
    obs, _ = env.reset(seed=0)
    obs_dim, act_dim = flat_obs(family, obs).shape[-1], env.action_space.shape[0]
    limit = env.spec.max_episode_steps or 1000
    if family not in common.MAZE_FAMILIES:
        env.close()
        return common.Task(name, family, obs_dim, act_dim, limit, source="minari")
    goals = env.unwrapped.maze.unique_goal_locations
    env.close()
    if len(goals) != 1:
        raise common.InputError(f"{name}: its evaluation env has {len(goals)} goal cells, not one ('g' in "
                               f"maze_map): LEQ's termination needs a fixed goal")
    return common.Task(name, family, obs_dim, act_dim, limit, spec.id, tuple(float(x) for x in goals[0]),
                      GOAL_RADIUS, source="minari", goal_inclusive=True)


def transitions(task: common.Task, dataset_path=None, data_dir=None):
    """(the dataset's file, its episodes as qlearning_dataset transitions): s = o[:-1], s' = o[1:]
    per episode, terminal = termination; mazes relabelled for the evaluation goal (module doc)."""
    if dataset_path or data_dir:
        raise common.InputError("--dataset-path/--data-dir do not apply to minari: tasks; set "
                               "MINARI_DATASETS_PATH to the folder that holds the dataset")
    dataset_id = task.name.removeprefix("minari:")
    ds = open_dataset(dataset_id)
    parts = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    for ep in ds.iterate_episodes():
        o = flat_obs(task.family, ep.observations).astype(np.float32)
        for k, v in zip(parts, (o[:-1], ep.actions, ep.rewards, o[1:], ep.terminations)):
            parts[k].append(np.asarray(v).reshape(len(ep.actions), -1) if k in ("observations", "actions",
                                                                                "next_observations") else v)
    t = {k: np.concatenate(v) for k, v in parts.items()}
    t["actions"] = np.clip(t["actions"], -1 + 1e-5, 1 - 1e-5).astype(np.float32)
    if task.is_maze:  # relabelled for the evaluation goal (choice, docs/DEVIATIONS.md: OGBench and Minari)
        t["terminals"] = np.asarray(common.termination_fn(task)(t["observations"], t["actions"],
                                                               t["next_observations"]))
        t["rewards"] = t["terminals"]
    t["rewards"], t["terminals"] = t["rewards"].astype(np.float32), t["terminals"].astype(np.float32)
    if not all(np.isfinite(v).all() for v in t.values()):
        raise common.InputError(f"Minari dataset {dataset_id} has NaN/inf values; clean it")
    return Path(ds.storage.data_path) / "main_data.hdf5", t


def make_env(task: common.Task, render_mode: Optional[str] = None):
    """The dataset's evaluation env, observations flattened as the dataset's."""
    import gymnasium
    env = recover_env(open_dataset(task.name.removeprefix("minari:")), task.family, render_mode=render_mode)
    space = gymnasium.spaces.Box(-np.inf, np.inf, (task.obs_dim,), np.float64)
    return gymnasium.wrappers.TransformObservation(env, functools.partial(flat_obs, task.family), space)


@functools.lru_cache(maxsize=None)
def reference_scores(dataset_id: str):
    metadata = open_dataset(dataset_id).storage.metadata
    return metadata.get("ref_min_score"), metadata.get("ref_max_score")


def normalized_score(task: common.Task, episode_return: float) -> float:
    """100 (R - ref_min) / (ref_max - ref_min) with the dataset's reference scores; the raw
    return R when the dataset has none (docs/DEVIATIONS.md)."""
    low, high = reference_scores(task.name.removeprefix("minari:"))
    if low is None or high is None:  # no reference scores: the raw return (choice, docs/DEVIATIONS.md)
        return float(episode_return)
    return 100.0 * (episode_return - low) / (high - low)


def maze_geometry(task: common.Task):
    """(wall cell centres (n, 2), start xy, goal xy, cell size) of the evaluation maze."""
    env = make_env(task)
    maze = env.unwrapped.maze
    walls = [maze.cell_rowcol_to_xy(np.array([i, j])) for i, row in enumerate(maze.maze_map)
             for j, c in enumerate(row) if c == 1]
    starts = maze.unique_reset_locations
    env.close()
    return np.array(walls), np.asarray(starts[0]) if starts else np.asarray(task.goal), np.asarray(task.goal), \
        maze.maze_size_scaling
