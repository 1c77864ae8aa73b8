import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tasks  # noqa: E402

tasks.use_fast_cpu_kernels()  # the compiler options the scripts use, before JAX starts


def write_d4rl_file(path, observations, actions, rewards, terminals, timeouts=None, **extra):
    """A file in D4RL's format (the keys and dtypes d4rl's own files use)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.asarray(observations, np.float32))
        f.create_dataset("actions", data=np.asarray(actions, np.float32))
        f.create_dataset("rewards", data=np.asarray(rewards, np.float32))
        f.create_dataset("terminals", data=np.asarray(terminals, bool))
        if timeouts is not None:
            f.create_dataset("timeouts", data=np.asarray(timeouts, bool))
        for k, v in extra.items():
            f.create_dataset(k, data=v)
    return path


@pytest.fixture
def tiny_maze_file(tmp_path):
    """A small generated built-in dataset (pointmaze-umaze, 6000 steps), shared shape for tests."""
    import mazes
    import tasks
    task = tasks.get_task("pointmaze-umaze")
    path = tmp_path / "umaze_tiny.hdf5"
    mazes.generate_pointmaze(task, path, size=6000, seed=3, episode_len=1000)
    return path
