import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))  # generate_dataset.py, the other scripts
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from leq_utils import mazes  # noqa: E402
from leq_utils import tasks  # noqa: E402



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
    from leq_utils import mazes
    from leq_utils import tasks
    task = tasks.get_task("pointmaze-umaze")
    path = tmp_path / "umaze_tiny.hdf5"
    mazes.generate_pointmaze(task, path, size=6000, seed=3, episode_len=1000)
    return path


# --------------------------------------------------------------------------------------------
# The real scripts in subprocesses, on tiny upstream artifacts (shared by the robustness tests)
# --------------------------------------------------------------------------------------------

ENV = "pointmaze-umaze"


def killed_before_a_rename(code: str):
    """Run `code` in a subprocess whose os.replace (the rename of an atomic write) waits, and
    SIGKILL it there: the new file is complete, but not yet renamed."""
    script = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
real_replace = os.replace
def slow_replace(a, b):
    print("written", flush=True)
    time.sleep(60)
    real_replace(a, b)
os.replace = slow_replace
{code}
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def run(args, cwd, check=True, timeout=600):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def run_and_kill_when(args, cwd, ready, timeout=300):
    """Start a script, SIGKILL it as soon as `ready()` is true, return how it ended."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{args[0]} ended before it could be killed: {proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting to kill")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


TINY_WORLD_MODEL = ["--hidden-dims", 16, 16, "--weight-decay", 2.5e-5, 5e-5, 1e-4, "--ensemble-size", 3,
                    "--num-elites", 2, "--max-epochs", 2]
TINY_PRETRAIN = ["--hidden-dims", 32, 32, "--bc-steps", 20, "--fqe-steps", 20, "--bc-batch-size", 64]


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, tiny_maze_file_module):
    """A tiny world model and pretrained actor/critic for fast LEQ runs."""
    d = tmp_path_factory.mktemp("upstream")
    common = ["--env", ENV, "--dataset-path", tiny_maze_file_module]
    run([ROOT / "world_model.py", *common, "--out", d / "wm.npz", *TINY_WORLD_MODEL], d)
    run([ROOT / "pretrain.py", *common, "--world-model", d / "wm.npz", "--out", d / "pt.npz", *TINY_PRETRAIN,
         "--chunk", 10], d)
    return d


@pytest.fixture(scope="session")
def tiny_maze_file_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "umaze_tiny.hdf5"
    mazes.generate_pointmaze(tasks.get_task(ENV), path, size=6000, seed=3, episode_len=1000)
    return path


def leq_cmd(upstream, data, run_dir, *extra):
    return [ROOT / "leq.py", "--env", ENV, "--dataset-path", data, "--world-model", upstream / "wm.npz",
            "--pretrain", upstream / "pt.npz", "--run-dir", run_dir, "--total-steps", 300, "--chunk", 50,
            "--checkpoint-every", 100, "--eval-every", 300, "--eval-episodes", 1, "--final-eval-rounds", 1,
            "--expand-every", 100, "--expand-size", 64, "--batch-size", 32, "--model-batch-size", 32,
            "--horizon", 3, *extra]


def npz_arrays(path, prefixes=("actor/", "critic/", "critic_ema/")):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k.startswith(prefixes)}


def metric_rows(run_dir):
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if r]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]  # wall time differs


@pytest.fixture(scope="session")
def uninterrupted(upstream, tiny_maze_file_module):
    run_dir = upstream / "plain"
    run(leq_cmd(upstream, tiny_maze_file_module, run_dir), upstream)
    return run_dir
