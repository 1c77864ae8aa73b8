import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))  # generate_dataset.py, the other scripts
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# One JAX persistent compilation cache per test session, shared by the pytest-xdist workers and
# every script they start (both inherit the environment of the process that made it). Most of a
# tiny pipeline's time is XLA compiling the same few programs again in each subprocess; loading
# them instead took tests/test_robustness.py from 265 s to 199 s. A loaded executable is the one that was
# compiled, so results are bitwise those of a fresh compile
# (test_robustness.py::test_compilation_cache_changes_no_bit). LEQ_TEST_NO_JAX_CACHE=1 turns it off.
if not os.environ.get("LEQ_TEST_NO_JAX_CACHE") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="leq-tests-jax-cache-")
    os.environ["LEQ_TEST_JAX_CACHE_OWNER"] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")  # not every small op


# XLA's cheaper CPU compilation for the tests and every script they start (the flags
# benchmarks/gpu_check.sh --cpu uses): most of the suite's time is compiling many small programs
# once each, and these flags took tests/test_leq.py + tests/test_robustness.py from 325 s to 258 s
# on 2 cores. They change how XLA optimises, not what is computed: every assertion is the same
# (a comparison across two programs has its tolerance either way), and the project's scripts never
# set them. LEQ_TEST_FULL_XLA=1 runs the suite with XLA's usual settings.
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if not os.environ.get("LEQ_TEST_FULL_XLA") and CHEAP_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    # (an xdist worker inherits them from the process that started it: added once, not again)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_XLA_FLAGS}".strip()


def pytest_sessionfinish(session, exitstatus):
    """The process that made this session's compilation cache removes it."""
    if os.environ.get("LEQ_TEST_JAX_CACHE_OWNER") == str(os.getpid()):
        import shutil
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

from leq_utils import cli  # noqa: E402
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


def killed_before_a_rename(code: str, name_part: str = "", n: int = 1, cwd=None, timeout=300) -> int:
    """Run `code` in a subprocess whose os.replace (the rename of an atomic write) waits at the n-th
    file whose name contains `name_part` (by default the first rename of all), and SIGKILL it
    there: the n - 1 before it are in place, the n-th is complete but not renamed. Where the kill
    lands does not depend on the machine's speed, so runs can be short. Returns the exit code
    (-SIGKILL)."""
    script = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
real_replace, seen = os.replace, []
def replace(a, b):
    if {name_part!r} in os.path.basename(b):
        seen.append(b)
        if len(seen) == {n}:
            print("@@killme", flush=True)
            time.sleep(600)
    real_replace(a, b)
os.replace = replace
{code}
"""
    with tempfile.TemporaryFile("w+") as err:  # a file: a full stderr pipe would block the script
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        for line in proc.stdout:  # the code's own output, then the marker
            if line.strip() == "@@killme":
                break
        else:
            err.seek(0)
            raise AssertionError(f"the subprocess ended before its rename {n} of '{name_part}': {err.read()[-3000:]}")
        timer.cancel()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode


def run_killed_at_rename(args, cwd, name_part: str, n: int, timeout=300) -> int:
    """killed_before_a_rename for a script run as `run` runs it (args: the script, then its flags),
    killed at its n-th rename of a file whose name contains `name_part` (its n-th checkpoint, say)."""
    code = f"import runpy\nsys.argv = {[str(a) for a in args]!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    return killed_before_a_rename(code, name_part, n, cwd, timeout)


@pytest.fixture
def entry(monkeypatch, capsys):
    """A script's entry point, cli.run_script, in this process: -> (returncode, stdout, stderr)."""
    def call(module, *argv):
        monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
        try:
            cli.run_script(getattr(module, "train", getattr(module, "main", None)), module.Args)
            code = 0
        except SystemExit as e:  # sys.exit("error: ...") prints the message and exits with 1
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return call


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
