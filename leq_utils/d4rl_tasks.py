"""The optional d4rl package: its AntMaze and MuJoCo locomotion envs and datasets.

d4rl needs the old `gym` 0.23 and mujoco-py with the MuJoCo 2.1 binaries (scripts/install_d4rl.sh).
tasks.py calls this module only for D4RL task names, so nothing here is imported otherwise:
  * import gym + d4rl, register the ultra mazes     -> import_d4rl
  * where d4rl keeps a task's HDF5 file              -> d4rl_dataset_path
  * the old gym API presented as gymnasium's         -> OldGymAPI, make_d4rl_env
  * quiet: gym's and d4rl's messages that are not the user's business are silenced (quiet_gym;
    AntMaze's "Target Goal: ..." on every reset in OldGymAPI.reset)
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np

from leq_utils import mazes
from leq_utils import common

ULTRA_URL = ("https://github.com/ZhengyaoJiang/d4rl/releases/download/public/"
             "Ant_maze_ultra_noisy_multistart_True_multigoal_{}_sparse.hdf5")


def import_d4rl(task: common.Task):
    """Import gym + d4rl and register the ultra mazes; a clear error when the extra is missing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import gym
            import d4rl  # noqa: F401  (registers what it can)
            import d4rl.gym_mujoco  # noqa: F401  (`import d4rl` skips these without mjrl)
            import d4rl.locomotion  # noqa: F401
    except Exception as e:  # ImportError, or mujoco-py failing to find MuJoCo 2.1
        raise common.InputError(f"{task.name} needs the optional d4rl package ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); install it with "
                         f"scripts/install_d4rl.sh, or pass --dataset-path FILE.hdf5 to train "
                         f"without it") from None
    for kind in ("diverse", "play"):
        env_id = f"antmaze-ultra-{kind}-v0"
        if env_id not in gym.envs.registry.env_specs:  # gym 0.23's registry
            layout = [[{"#": 1, ".": 0, "R": "r", "G": "g"}[c] for c in row] for row in mazes.MAZES["ultra"]]
            gym.envs.registration.register(
                id=env_id, entry_point="d4rl.locomotion.ant:make_ant_maze_env",
                max_episode_steps=common.ANTMAZE_LIMITS["ultra"],
                kwargs=dict(maze_map=layout, reward_type="sparse", non_zero_reset=False,
                            eval=True, maze_size_scaling=4.0, ref_min_score=0.0, ref_max_score=1.0,
                            v2_resets=True,  # a new goal each episode, as D4RL's -v2 AntMazes
                            dataset_url=ULTRA_URL.format(kind == "diverse")))
    quiet_gym()
    return gym, d4rl


# Warnings gym 0.23 and d4rl give on every env creation or reset that say nothing about the
# user's run: the observation Box's float64 bounds cast to float32, the old seeding API this
# module calls (OldGymAPI.reset) and d4rl's use of the old `randn`. gym's logger prefixes them
# with colour codes, hence the leading `.*`.
QUIET_WARNINGS = (r".*Box bound precision lowered by casting to float32",
                  r".*Function `env\.seed\(seed\)` is marked as deprecated",
                  r".*Function `rng\.randn\(\*size\)` is marked as deprecated")


def quiet_gym() -> None:
    """Silence QUIET_WARNINGS (after gym's import, which resets the warning filters); others stay."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def d4rl_dataset_path(task: common.Task) -> Path:
    """Where d4rl keeps the task's file (downloading it when the network allows)."""
    gym, d4rl = import_d4rl(task)
    from d4rl import offline_env
    with contextlib.redirect_stdout(io.StringIO()):  # AntMaze prints "Target Goal: ..." when made
        url = gym.make(task.name).dataset_url
    path = Path(offline_env.DATASET_PATH) / os.path.basename(url)
    if not path.exists():
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                offline_env.download_dataset_from_url(url)
        except Exception:
            raise common.InputError(f"dataset for {task.name} not found: place the file "
                             f"{path.name} at {path} (from {url}), or pass --dataset-path") from None
    return path



class OldGymAPI:
    """Presents an old-gym env (reset -> obs; step -> 4 values), as d4rl's, with the gymnasium
    API: reset(seed=) -> (obs, info); step -> (obs, r, terminated, truncated, info)."""

    def __init__(self, env, render_mode=None):
        self.env, self.unwrapped, self.render_mode = env, env, render_mode
        while hasattr(self.unwrapped, "env") or hasattr(self.unwrapped, "wrapped_env"):  # gym and d4rl wrappers
            self.unwrapped = getattr(self.unwrapped, "env", None) or self.unwrapped.wrapped_env
        self.action_space, self.observation_space = env.action_space, env.observation_space

    def reset(self, *, seed=None):
        if seed is not None:
            self.unwrapped.seed(seed)  # d4rl's NormalizedBoxEnv does not pass seed() on
            self.env.action_space.seed(seed)
            np.random.seed(seed)  # d4rl's AntMaze draws its goal noise from np.random
        with contextlib.redirect_stdout(io.StringIO()):  # AntMaze prints "Target Goal: ..." every reset
            return self.env.reset(), {}

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        truncated = bool(info.get("TimeLimit.truncated", False))
        return obs, reward, done and not truncated, truncated, info

    def render(self):
        """The frame as gymnasium's render() gives it for render_mode="rgb_array" (old gym's
        default mode, "human", opens a window)."""
        if self.render_mode != "rgb_array":
            raise ValueError(f"render() needs render_mode='rgb_array', this env has {self.render_mode!r}")
        return self.env.render(mode="rgb_array")

    def close(self):
        self.env.close()



def make_d4rl_env(task: common.Task, render_mode=None):
    """The d4rl env of `task` with the gymnasium API (render_mode None or "rgb_array")."""
    gym, _ = import_d4rl(task)
    with contextlib.redirect_stdout(io.StringIO()):  # AntMaze prints "Target Goal: ..." when made
        return OldGymAPI(gym.make(task.name), render_mode)


# What rendering needs, for the error message of a video that cannot be made.
RENDER_HELP = ("D4RL envs render with mujoco-py, which draws off-screen with OSMesa (Debian: libosmesa6, "
               "which scripts/install_d4rl.sh installs) or, in the build it makes where it finds an NVIDIA "
               "driver, with EGL (MUJOCO_PY_FORCE_CPU=1 picks OSMesa); MUJOCO_GL does not apply to it")
