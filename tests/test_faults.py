"""What fault injection broke, one test per item of the reliability issue (round two), on the real
scripts (in a subprocess, or through their entry point cli.run_script in this process): each
checks the one-line message, the exit code and that the files already there are unchanged.

   1 two runs on one folder: a lock              6 a corrupt newest checkpoint: fall back
   2 changed inputs at a resume: fingerprints    7 one line instead of a traceback; signals
   3 metrics.jsonl: torn lines, atomic rewrites  8 messages that say what happened
   4 every flag of every stage checked           9 no longer accepted silently
   5 checks before any work                     10 non-finite imagined states end a rollout

The NaN guard's message (item 8) is checked in test_robustness.py with the other guard tests.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from leq_utils import artifacts
from leq_utils import cli
import evaluate
import leq
from leq_utils import mazes
import pretrain
from leq_utils import tasks
import world_model
import generate_dataset  # noqa: E402  (scripts/)
from conftest import ENV, ROOT, killed_before_a_rename, leq_cmd, metric_rows, npz_arrays, run, write_d4rl_file

TASK = tasks.get_task(ENV)


def snapshot(folder) -> dict:
    """Every file under `folder`: relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def last_line(p, code: int = 1, only: bool = False) -> str:
    """The last line on stderr of a script that ended with `code` and printed no traceback
    (`only`: and nothing else on stderr)."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    assert not only or len(lines) == 1, p.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, upstream, tiny_maze_file_module):
    """Copies of the tiny world model, pretrain.npz and dataset that tests may replace (and restore)."""
    d = tmp_path_factory.mktemp("inputs")
    for src, name in ((upstream / "wm.npz", "wm.npz"), (upstream / "pt.npz", "pt.npz"),
                      (tiny_maze_file_module, "umaze_tiny.hdf5")):
        shutil.copy(src, d / name)
    return d


@pytest.fixture(scope="module")
def half_run(inputs, tmp_path_factory):
    """leq.py (the settings of the `uninterrupted` run, on the copied inputs) stopped by SIGINT after
    its first checkpoint (step 100) and the metrics row of step 150: it saves a checkpoint at the next
    chunk boundary (step 150 or 200) and exits 130."""
    run_dir = tmp_path_factory.mktemp("half") / "run"
    proc = subprocess.Popen([sys.executable, *map(str, leq_cmd(inputs, inputs / "umaze_tiny.hdf5", run_dir))],
                            cwd=inputs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, metrics = time.time(), run_dir / "metrics.jsonl"
    while not (metrics.exists() and '"step": 150' in metrics.read_text()):  # the checkpoint of step 100 is written
        assert proc.poll() is None and time.time() - start < 600, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    return SimpleNamespace(dir=run_dir, returncode=proc.returncode, stdout=stdout, stderr=stderr)


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(path, change) -> None:
    """Write the artifact at `path` again with its arrays changed by change(arrays), keeping its metadata."""
    f = artifacts.load_artifact(path)
    arrays = {k: v for k, v in f.items() if not k.startswith("meta/")}
    change(arrays)
    artifacts.save_npz(path, arrays, str(f["meta/kind"]), TASK, f["meta/config"], f["meta/inputs"])


# --------------------------------------------------------------------------------------------
# 1. Two runs on one folder
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_1_a_second_leq_on_a_held_run_folder_is_refused(upstream, tiny_maze_file_module, uninterrupted, tmp_path):
    """Two leq.py processes on one --run-dir (seeds 0 and 1): the second is refused in one line
    naming the first's pid, and the first ends exactly as a run alone (its leq.npz, metrics and
    config), its lock file removed."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, *map(str, leq_cmd(upstream, tiny_maze_file_module, run_dir))],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock, start = run_dir / "run.lock", time.time()
    while not (lock.exists() and lock.read_text()):
        assert first.poll() is None and time.time() - start < 300, first.communicate()
        time.sleep(0.02)
    second = run(leq_cmd(upstream, tiny_maze_file_module, run_dir, "--seed", 1), tmp_path, check=False)
    line = last_line(second, only=True)
    assert line.startswith(f"error: run folder {run_dir} is in use by pid {first.pid} on ") and \
        f"(lock file {lock}); wait for it to end, or write somewhere else" in line, line
    assert first.wait(timeout=600) == 0, first.communicate()
    assert metric_rows(run_dir) == metric_rows(uninterrupted)
    plain, both = npz_arrays(uninterrupted / "leq.npz"), npz_arrays(run_dir / "leq.npz")
    assert all(np.array_equal(plain[k], both[k]) for k in plain) and plain.keys() == both.keys()
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 0 and not lock.exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["world_model", "pretrain", "leq"])
def test_1_every_stage_locks_what_it_writes(stage, upstream, tiny_maze_file_module, tmp_path, entry):
    """world_model.py and pretrain.py lock their output file, leq.py its run folder: a holder
    (here this process) makes them refuse in one line before any work; a lock left by a process
    that has ended is stale (the kernel dropped its flock) and is taken over, saying so."""
    out = tmp_path / "out"
    out.mkdir()
    data = ["--env", ENV, "--dataset-path", tiny_maze_file_module]
    argv, lock = {
        "world_model": ([*data, "--out", out / "wm.npz", "--max-epochs", 1], out / "wm.npz.lock"),
        "pretrain": ([*data, "--world-model", upstream / "wm.npz", "--out", out / "pt.npz"], out / "pt.npz.lock"),
        "leq": (leq_cmd(upstream, tiny_maze_file_module, out)[1:], out / "run.lock")}[stage]
    module = {"world_model": world_model, "pretrain": pretrain, "leq": leq}[stage]
    with artifacts.FolderLock(lock, "held by the test"):
        before = snapshot(out)
        line = last_line(entry(module, *argv), only=True)
        assert line.startswith(f"error: {'run folder' if stage == 'leq' else ''}") and \
            f"is in use by pid {os.getpid()} on " in line and f"(lock file {lock})" in line, line
        assert snapshot(out) == before
    assert not lock.exists()
    lock.write_text("pid 999999 on elsewhere since 2020-01-01 00:00:00")  # a holder killed long ago
    with artifacts.FolderLock(lock, "the test") as held:
        assert f"pid {os.getpid()} on " in lock.read_text() and held.fd is not None
    assert not lock.exists()


# --------------------------------------------------------------------------------------------
# 2. Changed inputs at a resume
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["world model replaced", "other data under the same name", "pretrain replaced",
                                  "relative paths: accepted, ends equal"])
def test_2_a_resume_refuses_inputs_that_changed(case, half_run, inputs, uninterrupted, tiny_maze_file_module, tmp_path):
    """A run stopped half way records the sha256 of its dataset, world model and pretrain.npz in
    its checkpoints; replacing one of those files (same path) is refused in one line before any
    work, the run folder unchanged; the same files given by relative instead of absolute paths
    are accepted, and the resumed run ends bitwise equal to an uninterrupted one."""
    run_dir = copy_run(half_run.dir, tmp_path / "run")
    saved = {p.name: p.read_bytes() for p in inputs.iterdir()}
    try:
        if case == "world model replaced":
            rewrite(inputs / "wm.npz", lambda a: a.update({k: a[k] + 1e-3 for k in a if k.endswith("layer_0/kernel")}))
        elif case == "other data under the same name":
            mazes.generate_pointmaze(TASK, inputs / "umaze_tiny.hdf5", size=6000, seed=4, episode_len=1000)
        elif case == "pretrain replaced":
            rewrite(inputs / "pt.npz", lambda a: a.update({k: a[k] * 1.01 for k in a if k.startswith("critic/")}))
        before = snapshot(run_dir)
        if case.startswith("relative"):
            cmd = [str(x).replace(f"{inputs}/", "") for x in leq_cmd(inputs, inputs / "umaze_tiny.hdf5", run_dir)]
            p = run(cmd, inputs)
            assert "resuming" in p.stdout and metric_rows(run_dir) == metric_rows(uninterrupted)
            plain, resumed = npz_arrays(uninterrupted / "leq.npz"), npz_arrays(run_dir / "leq.npz")
            assert plain.keys() == resumed.keys() and all(np.array_equal(plain[k], resumed[k]) for k in plain)
            return
        p = run(leq_cmd(inputs, inputs / "umaze_tiny.hdf5", run_dir), inputs, check=False)
        line = last_line(p, only=True)
        newest = artifacts.checkpoints(run_dir)[-1]
        want = {"world model replaced": (f"error: checkpoint {newest} was made from the world model {inputs / 'wm.npz'} "
                                         f"(sha256 ", "), but that file is now "),
                "other data under the same name": (f"error: world model {inputs / 'wm.npz'} was made from the dataset "
                                                   f"{tiny_maze_file_module} (sha256 ",  # the file it was copied from
                                                   f"), but this run's {inputs / 'umaze_tiny.hdf5'} is "),
                "pretrain replaced": (f"error: checkpoint {newest} was made from the pretrain {inputs / 'pt.npz'} "
                                      f"(sha256 ", "), but that file is now ")}[case]
        assert line.startswith(want[0]) and want[1] in line, line
        assert snapshot(run_dir) == before
    finally:
        for name, content in saved.items():
            (inputs / name).write_bytes(content)


def test_2_fingerprints_and_artifacts_from_before_them(upstream, tiny_maze_file_module, tmp_path, capsys, monkeypatch):
    """A file's fingerprint is the sha256 of its bytes, the same for a relative and an absolute
    path, hashed once and then reused while size, times and inode stay; an artifact's is that of
    its arrays. Artifacts written before fingerprints (no meta/fingerprint, meta/inputs) still
    load: their fingerprint is computed from the same arrays, and a world model's dataset is then
    checked by file name, with a warning."""
    data = tmp_path / "d.hdf5"
    data.write_bytes(tiny_maze_file_module.read_bytes())
    monkeypatch.chdir(tmp_path)
    absolute = artifacts.file_fingerprint(data)
    assert absolute["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    reads, sha256 = [], hashlib.sha256
    monkeypatch.setattr(artifacts.hashlib, "sha256", lambda: reads.append(1) or sha256())
    assert artifacts.file_fingerprint("d.hdf5") == absolute and reads == []  # reused: nothing re-hashed
    data.write_bytes(data.read_bytes()[:-1] + b"x")  # changed in place
    assert artifacts.file_fingerprint("d.hdf5")["sha256"] != absolute["sha256"] and reads == [1]
    monkeypatch.undo()

    with np.load(upstream / "wm.npz", allow_pickle=False) as f:
        new = {k: f[k] for k in f.files}
    old = tmp_path / "old_wm.npz"
    np.savez(old, **{k: v for k, v in new.items() if k not in ("meta/fingerprint", "meta/inputs")})
    record, made_from = artifacts.provenance(old)
    assert record["sha256"] == str(new["meta/fingerprint"]) == artifacts.arrays_fingerprint(new) and made_from is None
    wm = world_model.load_world_model(old, TASK)
    ds = tasks.load_dataset(TASK, str(tiny_maze_file_module))
    assert world_model.check_dataset(wm, old, ds, artifacts.file_fingerprint(ds.path)) == record
    assert "predates fingerprints: its dataset is checked by file name only" in capsys.readouterr().err
    with pytest.raises(tasks.InputError, match="was trained on umaze_tiny.hdf5, but this run uses d.hdf5"):
        world_model.check_dataset(wm, old, ds._replace(path=str(data)), artifacts.file_fingerprint(data))
    artifacts.check_inputs("checkpoint x.npz", None, {"dataset": artifacts.file_fingerprint(data)}, "")  # an old checkpoint
    assert "checkpoint x.npz predates fingerprints: it cannot be checked against its inputs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 3. metrics.jsonl
# --------------------------------------------------------------------------------------------

ROWS = [{"step": s, "critic_loss": 1.0 / s} for s in (50, 100, 150, 200)]


@pytest.mark.parametrize("case", ["a resume after a torn last line", "a kill during the rewrite",
                                  "evaluate --curve on a torn file"])
def test_3_metrics_log_is_crash_safe(case, tmp_path, entry, capsys):
    """A row cut off by a full disk is dropped with a warning (a resume goes on, keeping the rows
    up to its step); the rewrite at a resume is atomic (a kill during it leaves the old file); a
    learning curve of a torn file is drawn from its whole rows."""
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in ROWS) + '{"step": 250, "critic_lo'  # cut at a byte
    path.write_text(text)
    if case == "a resume after a torn last line":
        log = artifacts.MetricsLog(tmp_path, 150)
        assert "line 5 cut off or not a metrics row" in capsys.readouterr().err
        log.log({"step": 200, "critic_loss": 0.5})
        assert [json.loads(r) for r in path.read_text().splitlines()] == [*ROWS[:3], {"step": 200, "critic_loss": 0.5}]
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~artifacts.umask())
    elif case == "a kill during the rewrite":
        assert killed_before_a_rename(f"from leq_utils import artifacts\nartifacts.MetricsLog({str(tmp_path)!r}, 100)") == -signal.SIGKILL
        assert path.read_text() == text  # the old file, whole; the temp file is removed by the next write
        artifacts.MetricsLog(tmp_path, 1000)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    else:
        p = entry(evaluate, "--curve", path)
        assert p.returncode == 0 and "line 5 cut off or not a metrics row" in p.stderr and "Traceback" not in p.stderr
        assert (tmp_path / "metrics.png").stat().st_size > 0 and path.read_text() == text


# --------------------------------------------------------------------------------------------
# 4. Every flag of every stage, up front
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,flags,message", [
    ("world_model", ["--max-epochs", 0], "--max-epochs must be >= 1, got 0"),
    ("world_model", ["--patience", 0], "--patience must be >= 1, got 0"),
    ("world_model", ["--holdout-size", 0], "--holdout-size must be >= 1, got 0"),
    ("world_model", ["--lr", -1], "--lr must be >= 0, got -1.0"),
    ("world_model", ["--hidden-dims", 0, 0, "--weight-decay", 0, 0, 0], "--hidden-dims must be >= 1 (each), got 0 0"),
    ("world_model", ["--batch-size", 0], "--batch-size must be >= 1, got 0"),
    ("world_model", ["--seed", -1], "--seed must be >= 0, got -1"),
    ("pretrain", ["--gamma", 1.5], "--gamma must be in (0, 1], got 1.5"),
    ("pretrain", ["--fqe-batch-size", -3], "--fqe-batch-size must be >= 1, got -3"),
    ("pretrain", ["--bc-steps", 0], "--bc-steps must be >= 1, got 0"),
    ("pretrain", ["--ema-decay", 2], "--ema-decay must be in [0, 1], got 2.0"),
    ("leq", ["--final-eval-rounds", 0], "--final-eval-rounds must be >= 1, got 0"),
    ("leq", ["--actor-lr", -1], "--actor-lr must be >= 0, got -1.0"),
    ("leq", ["--expand-noise", -0.5], "--expand-noise must be >= 0, got -0.5"),
    ("evaluate", ["--episodes", 0], "--episodes must be >= 1, got 0"),
    ("evaluate", ["--seed", -2], "--seed must be >= 0, got -2"),
    ("tasks", ["--excursion", 1.5], "--excursion must be in [0, 1], got 1.5"),
    ("tasks", ["--dash", -0.1], "--dash must be in [0, 1], got -0.1"),
    ("tasks", ["--env", "pointmaze-large", "--dash", 1, "--noise", 0.5],
     "--noise --dash make other data than the task's own: pass --out FILE.hdf5 (and --dataset-path FILE.hdf5 "
     "to the stages), so that the default dataset is not replaced"),
])
def test_4_every_flag_is_checked_before_any_work(script, flags, message, tmp_path, entry):
    """Out-of-range flags of every script end it at once with one line naming the flag and the
    value (exit 1): nothing trained, nothing written (they used to write untrained models, divide
    by zero, or fail with a TypeError)."""
    (tmp_path / "in").mkdir()
    dataset = tmp_path / "in" / "d.hdf5"
    write_d4rl_file(dataset, np.zeros((10, 4)), np.zeros((10, 2)), np.zeros(10), np.zeros(10))
    actor = tmp_path / "in" / "pt.npz"
    artifacts.save_npz(actor, {"actor/w": np.zeros(2)}, "pretrain", TASK, {})
    common = ["--dataset-path", dataset, "--data-dir", tmp_path / "data"]
    argv = {"world_model": [*common, "--out", tmp_path / "out" / "wm.npz"],
            "pretrain": [*common, "--world-model", tmp_path / "in" / "wm.npz", "--out", tmp_path / "out" / "pt.npz"],
            "leq": [*common, "--run-dir", tmp_path / "out"], "evaluate": ["--checkpoint", actor],
            "tasks": ["--data-dir", tmp_path / "data"]}[script]
    module = {"world_model": world_model, "pretrain": pretrain, "leq": leq, "evaluate": evaluate,
              "tasks": generate_dataset}[script]
    before = snapshot(tmp_path)
    assert last_line(entry(module, *argv, *flags), only=True) == f"error: {message}"
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --------------------------------------------------------------------------------------------
# 5. Checks before any work
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["a resume with only --run-dir", "a read-only run folder",
                                  "the checkpoint's world model is missing"])
def test_5_checks_come_before_any_work(case, half_run, inputs, tmp_path, monkeypatch, entry):
    """Settings that differ from the checkpoint's, a folder the run cannot write and an input of
    the checkpoint that is missing are refused at once, in one line: no dataset generated, no
    upstream stage trained (they used to come after minutes of work)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # default artifact paths (runs/...) are relative to it
    monkeypatch.setattr(mazes, "DATA_DIR", tmp_path / "data")  # where the built-in dataset would be generated
    if case == "a read-only run folder":
        run_dir = tmp_path / "readonly"
        run_dir.mkdir()
        run_dir.chmod(0o555)
        p = run([ROOT / "tests" / "as_plain_user.py", *leq_cmd(inputs, inputs / "umaze_tiny.hdf5", run_dir)], work,
                check=False)
        line = last_line(p, only=True)
        assert line == (f"error: Permission denied [EACCES]: {run_dir / 'run.lock'}; no permission: write somewhere "
                        f"else (--run-dir / --out)"), line
        assert list(run_dir.iterdir()) == []
    else:
        run_dir = copy_run(half_run.dir, tmp_path / "run")
        before = snapshot(run_dir)
        argv = ["--run-dir", run_dir] if case == "a resume with only --run-dir" else \
            [x for x in leq_cmd(inputs, inputs / "umaze_tiny.hdf5", run_dir)[1:] if str(x) != "--world-model"
             and x != inputs / "wm.npz"]
        line = last_line(entry(leq, *argv), only=True)
        newest = artifacts.checkpoints(run_dir)[-1]
        if case == "a resume with only --run-dir":
            assert line.startswith(f"error: checkpoint {newest} was written with other settings (") and \
                "use the same flags (see its config), or delete it to start over" in line, line
        else:
            assert line == (f"error: checkpoint {newest} was made from the world model {inputs / 'wm.npz'}, but "
                            f"{Path('runs/pointmaze-umaze__world_model__s0/world_model.npz')} does not exist: "
                            f"restore it, or start over in another --run-dir"), line
        assert snapshot(run_dir) == before
    assert list(work.iterdir()) == [] and not (tmp_path / "data").exists()


# --------------------------------------------------------------------------------------------
# 6. A corrupt newest checkpoint
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["the newest is corrupt", "every checkpoint is corrupt"])
def test_6_a_corrupt_newest_checkpoint_falls_back_to_the_previous(case, half_run, inputs, uninterrupted, tmp_path):
    """The newest checkpoint cut short: the resume says so and goes on from the previous one, to
    the same end as an uninterrupted run. When none loads: one line listing why, nothing changed."""
    run_dir = copy_run(half_run.dir, tmp_path / "run")
    ckpts = artifacts.checkpoints(run_dir)
    assert len(ckpts) == 2
    for path in ckpts[-1:] if case == "the newest is corrupt" else ckpts:
        path.write_bytes(path.read_bytes()[:5000])
    before = snapshot(run_dir)
    p = run(leq_cmd(inputs, inputs / "umaze_tiny.hdf5", run_dir), inputs, check=False)
    if case == "the newest is corrupt":
        assert p.returncode == 0, p.stderr[-3000:]
        assert (f"[resume] skipping a checkpoint that does not load ({ckpts[1].name}: artifact {ckpts[1]} is not a "
                f"readable .npz file (truncated or corrupt?): BadZipFile); resuming from {ckpts[0].name}") in p.stdout
        assert f"resuming {run_dir} from step 100" in p.stdout and metric_rows(run_dir) == metric_rows(uninterrupted)
        plain, resumed = npz_arrays(uninterrupted / "leq.npz"), npz_arrays(run_dir / "leq.npz")
        assert all(np.array_equal(plain[k], resumed[k]) for k in plain)
    else:
        line = last_line(p, only=True)
        assert line.startswith(f"error: no checkpoint in {run_dir} loads ({ckpts[1].name}: artifact {ckpts[1]} is not "
                               f"a readable .npz file") and line.endswith("; delete them to start over"), line
        assert snapshot(run_dir) == before


# --------------------------------------------------------------------------------------------
# 7. One line instead of a traceback; signals
# --------------------------------------------------------------------------------------------

FILE_LIMIT = """
import os, resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def enospc(args):
    raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["a full disk (a file size limit)", "ENOSPC", "--run-dir is a file",
                                  "--curve of a missing file", "--curve of a broken file", "--out into a missing folder",
                                  "parameters of the wrong shape", "actions is a group", "actions are strings",
                                  "a short buffer in a checkpoint"])
def test_7_failures_end_in_one_line(case, half_run, inputs, tiny_maze_file_module, tmp_path, entry, monkeypatch):
    """Each of these ended in a traceback; now in one line that names the file and says what to do,
    exit code 1, leaving the files already there as they were."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("already here")
    actor = folder / "pt.npz"
    shutil.copy(inputs / "pt.npz", actor)
    if case == "a short buffer in a checkpoint":
        shutil.copy(artifacts.checkpoints(half_run.dir)[0], folder / "checkpoint_00000100.npz")
        rewrite(folder / "checkpoint_00000100.npz", lambda a: a.update({"buffer/observations": a["buffer/observations"][:10]}))
    if case.startswith("actions"):
        group = case == "actions is a group"
        write_d4rl_file(folder / "bad.hdf5", np.zeros((10, 4)), np.zeros((10, 2)), np.zeros(10), np.zeros(10))
        import h5py
        with h5py.File(folder / "bad.hdf5", "a") as f:
            del f["actions"]
            f.create_group("actions") if group else f.create_dataset("actions", data=np.array([b"up", b"down"] * 5))
    if case == "parameters of the wrong shape":
        rewrite(actor, lambda a: a.update({"actor/params/Dense_1/bias": a["actor/params/Dense_1/bias"][:5]}))
    if case == "--curve of a broken file":
        (folder / "m.jsonl").write_bytes(b"\x00\xff garbage\n{\n")
    before = snapshot(folder)
    if case == "a full disk (a file size limit)":
        p = run(["-c", FILE_LIMIT, ROOT / "world_model.py", "--env", ENV, "--dataset-path", tiny_maze_file_module,
                 "--out", folder / "wm.npz", "--hidden-dims", 16, 16, "--weight-decay", 0, 0, 0], folder, check=False)
    elif case == "ENOSPC":
        monkeypatch.setattr(world_model, "train", enospc)
        p = entry(world_model)
    elif case == "--run-dir is a file":
        p = entry(leq, *leq_cmd(inputs, inputs / "umaze_tiny.hdf5", folder / "notes.txt")[1:])
    elif case.startswith("--curve"):
        p = entry(evaluate, "--curve", folder / "m.jsonl")
    elif case in ("--out into a missing folder", "parameters of the wrong shape"):
        out = ["--out", folder / "missing" / "e.json"] if case == "--out into a missing folder" else []
        p = entry(evaluate, "--checkpoint", actor, "--episodes", 1, "--parallel", 1, *out)
    elif case.startswith("actions"):
        p = entry(world_model, "--env", ENV, "--dataset-path", folder / "bad.hdf5", "--out", folder / "wm.npz")
    else:
        p = entry(leq, *leq_cmd(inputs, inputs / "umaze_tiny.hdf5", folder)[1:])
    line = last_line(p, only=case not in ("--curve of a broken file", "a full disk (a file size limit)"))  # a warning, a bar
    want = {
        "a full disk (a file size limit)": f"error: File too large [EFBIG]: {folder / 'wm.ckpt.npz'}; the file size "
                                           f"limit (ulimit -f) was reached; raise it, then run the same command again",
        "ENOSPC": "error: No space left on device [ENOSPC]: runs/x/metrics.jsonl; free some disk space, then run "
                  "the same command again (runs resume from their last checkpoint)",
        "--run-dir is a file": f"error: run folder {folder / 'notes.txt'}: {folder / 'notes.txt'} is a file, not a folder",
        "--curve of a missing file": f"error: metrics file {folder / 'm.jsonl'} does not exist",
        "--curve of a broken file": f"error: {folder / 'm.jsonl'} has no metrics",
        "--out into a missing folder": f"error: cannot write {folder / 'missing' / 'e.json'}: the folder "
                                       f"{folder / 'missing'} does not exist",
        "parameters of the wrong shape": f"error: artifact {actor}: 'actor/params/Dense_1/bias' has shape (5,), "
                                         f"but the network it describes needs (32,)",
        "actions is a group": f"error: dataset file {folder / 'bad.hdf5'}: 'actions' is a group, not an array of numbers",
        "actions are strings": f"error: dataset file {folder / 'bad.hdf5'}: 'actions' is of type |S4, not an array of "
                               f"numbers",
        "a short buffer in a checkpoint": f"error: no checkpoint in {folder} loads (checkpoint_00000100.npz: checkpoint "
                                          f"{folder / 'checkpoint_00000100.npz'}: buffer/observations has shape (10, 4), "
                                          f"but buffer/filled says "}[case]
    assert line.startswith(want), line
    assert snapshot(folder) == before


def test_7_a_signal_after_the_checkpoint_decision_waits_for_the_next_boundary(monkeypatch):
    """A training loop reads STOP.signum once, to decide on a checkpoint, and stops only on that
    reading: a signal that comes between the decision and the stop (CI once saw it) must not stop
    the loop with a message naming a checkpoint that was not written."""
    monkeypatch.setattr(cli.STOP, "signum", int(signal.SIGTERM))  # the signal came after the decision
    cli.stop_if_requested("at step 600, saved in x", 0)          # no stop: the next boundary saves and stops
    with pytest.raises(cli.Interrupted, match="stopped by SIGTERM: at step 700, saved in x; the same command"):
        cli.stop_if_requested("at step 700, saved in x", int(signal.SIGTERM))
    with pytest.raises(cli.Interrupted):  # without a reading, the current one
        cli.stop_if_requested("at step 700, saved in x")


@pytest.mark.slow
@pytest.mark.parametrize("stage,sig", [("world_model", signal.SIGINT), ("pretrain", signal.SIGTERM),
                                       ("leq", signal.SIGINT)])
def test_7_signals_save_a_checkpoint_and_exit_with_one_line(stage, sig, half_run, upstream, tiny_maze_file_module,
                                                            tmp_path):
    """SIGINT/SIGTERM (Ctrl-C, a scheduler's stop) during training: the stage saves a checkpoint at
    its next chunk (epoch) boundary and exits with 128 + the signal's number and one line; the same
    command resumes from that checkpoint. (leq.py: the `half_run` fixture; its resume, bitwise
    equal to an uninterrupted run, is in test_2.)"""
    if stage == "leq":
        p, run_dir = half_run, half_run.dir
        step = int(artifacts.checkpoints(run_dir)[-1].stem.split("_")[1])
        assert step % 50 == 0 and step > 100 and not (run_dir / "leq.npz").exists()
        assert last_line(p, 130) == (f"stopped by SIGINT: at step {step}, saved in {run_dir}/checkpoint_{step:08d}.npz; "
                                     f"the same command resumes from it")
        return
    out = tmp_path / "out.npz"
    ckpt = tmp_path / "out.ckpt.npz"
    common = ["--env", ENV, "--dataset-path", tiny_maze_file_module, "--out", out]
    cmd = ([ROOT / "world_model.py", *common, "--hidden-dims", 16, 16, "--weight-decay", 0, 0, 0, "--ensemble-size", 3,
            "--num-elites", 2, "--max-epochs", 300, "--patience", 1000] if stage == "world_model" else
           [ROOT / "pretrain.py", *common, "--world-model", upstream / "wm.npz", "--hidden-dims", 32, 32, "--bc-steps",
            3000, "--fqe-steps", 3000, "--chunk", 100, "--checkpoint-every", 500, "--bc-batch-size", 64])
    proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not ckpt.exists():  # the training loop is running
        assert proc.poll() is None and time.time() - start < 300, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    unit = "epoch" if stage == "world_model" else "step"
    line = last_line(SimpleNamespace(returncode=proc.returncode, stderr=stderr), 128 + sig)
    assert line.startswith(f"stopped by {sig.name}: {'after epoch' if unit == 'epoch' else 'at step'} ") and \
        line.endswith(f", saved in {ckpt}; the same command resumes from it"), line
    at = int(line.split(unit + " ")[1].split(",")[0])
    f = artifacts.load_artifact(ckpt, TASK)
    assert int(f["progress/epoch" if unit == "epoch" else "progress/step"]) == at and not out.exists()
    assert stage == "world_model" or at % 100 == 0
    p = run(cmd, tmp_path)
    assert f"resuming from {ckpt} at {unit} {at}" in p.stdout and out.exists() and not ckpt.exists()


# --------------------------------------------------------------------------------------------
# 8. Messages that say what happened
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["pretrain's NaN before its first checkpoint", "a pickled entry",
                                  "your broken dataset", "a broken built-in dataset"])
def test_8_messages_say_what_happened(case, upstream, tmp_path, entry, tiny_maze_file_module):
    """No checkpoint is named that does not exist; a pickled entry is called that, not "corrupt";
    "delete it" is advised only for files the project made (the built-in data), not for the user's."""
    folder = tmp_path / "folder"
    folder.mkdir()
    if case == "pretrain's NaN before its first checkpoint":
        p = entry(pretrain, "--env", ENV, "--dataset-path", tiny_maze_file_module, "--world-model", upstream / "wm.npz",
                "--out", folder / "pt.npz", "--hidden-dims", 8, "--bc-steps", 2, "--fqe-steps", 400, "--chunk", 100,
                "--fqe-lr", 1e30)
        line = last_line(p)
        assert line.startswith("error: non-finite FQE loss first at step ") and \
            line.endswith("; stopped; no checkpoint was written before it"), line
        assert 2 < int(line.split("step ")[1].split(";")[0]) <= 402 and list(folder.iterdir()) == []
        return
    if case == "a pickled entry":
        bad = folder / "pickled.npz"
        with np.load(upstream / "pt.npz", allow_pickle=False) as f:
            np.savez(bad, **{k: f[k] for k in f.files}, **{"actor/extra": np.array([{"a": 1}], dtype=object)})
        before = snapshot(folder)
        line = last_line(entry(evaluate, "--checkpoint", bad), only=True)
        assert line == (f"error: artifact {bad}: entry 'actor/extra' is a pickled object, refused for safety (this "
                        f"project never writes pickles); re-create the file with the stage that makes it"), line
    else:
        data = folder / ("mine.hdf5" if case == "your broken dataset" else mazes.builtin_dataset_path(TASK).name)
        data.write_bytes(tiny_maze_file_module.read_bytes()[:3000])
        before = snapshot(folder)
        source = ["--dataset-path", data] if case == "your broken dataset" else ["--data-dir", folder]
        line = last_line(entry(world_model, "--env", ENV, *source, "--out", folder / "wm.npz"), only=True)
        assert line.startswith(f"error: dataset file {data} is not a readable HDF5 file (corrupt or truncated?): ")
        advice = "check or replace the file" if case == "your broken dataset" else "delete it to regenerate it"
        assert line.endswith(f"; {advice}") and "delete" not in line.replace(advice, ""), line
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------
# 9. No longer accepted silently
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["actions outside [-1, 1]", "--inject-nan-at is not a flag", "a NaN actor",
                                  "file modes follow the umask", "a finished run folder", "a finished run, other flags"])
def test_9_no_longer_accepted_silently(case, uninterrupted, upstream, tiny_maze_file_module, tmp_path, entry):
    folder = tmp_path / "folder"
    folder.mkdir()
    if case == "actions outside [-1, 1]":
        rng = np.random.default_rng(0)
        actions = rng.uniform(-1, 1, (800, 2))
        actions[[3, 3, 90], [0, 1, 1]] = [1.5, -7.0, 1.0001]
        from leq_utils import mazes
        layout = mazes.MAZES["umaze"]
        observations = 0.1 * rng.normal(size=(800, 4))  # near the start cell's centre: states inside the maze
        observations[:, :2] += mazes.cell_xy(layout, mazes.maze_cells(layout, "R")[0])
        data = write_d4rl_file(folder / "d.hdf5", observations, actions, np.zeros(800), np.zeros(800))
        before = snapshot(folder)
        p = entry(world_model, "--env", ENV, "--dataset-path", data, "--out", folder / "wm.npz", "--hidden-dims", 8,
                "--weight-decay", 0, 0, "--max-epochs", 1)
        assert p.returncode == 0 and p.stderr.splitlines()[0] == (
            f"warning: dataset {data}: 3 action values (in 2 rows) are outside [-1, 1]; they are clipped to "
            f"[-1 + 1e-5, 1 - 1e-5] like every action")
        assert (folder / "wm.npz").exists() and {k: v for k, v in snapshot(folder).items() if k != "wm.npz"} == before
    elif case == "--inject-nan-at is not a flag":
        assert "inject_nan_at" not in leq.Args.__dataclass_fields__
        p = run([ROOT / "leq.py", "--inject-nan-at", 200, "--run-dir", folder / "r"], folder, check=False)
        assert p.returncode == 2 and "--inject-nan-at" in p.stderr and list(folder.iterdir()) == []
    elif case == "a NaN actor":
        nan = folder / "nan.npz"
        shutil.copy(upstream / "pt.npz", nan)
        rewrite(nan, lambda a: a["actor/params/Dense_0/kernel"].__setitem__((0, 0), np.nan))
        before = snapshot(folder)
        line = last_line(entry(evaluate, "--checkpoint", nan), only=True)
        assert line == (f"error: artifact {nan} has non-finite values in 'actor/params/Dense_0/kernel' (1 of "
                        f"{4 * 32}): refused; re-create it (or resume from an earlier checkpoint)"), line
        assert snapshot(folder) == before
    elif case == "file modes follow the umask":
        for mask in (0o022, 0o077, 0o002):
            old = os.umask(mask)
            try:
                artifacts.save_npz(folder / "a.npz", {"x": np.zeros(2)}, "leq", TASK, {})
                artifacts.write_json(folder / "a.json", {})
                with artifacts.FolderLock(folder / "a.lock", "test"):
                    lock_mode = (folder / "a.lock").stat().st_mode & 0o777
            finally:
                os.umask(old)
            assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} | {oct(lock_mode)} == {oct(0o666 & ~mask)}
            for p in folder.iterdir():
                p.unlink()
    else:
        run_dir = copy_run(uninterrupted, folder / "run")
        before = snapshot(run_dir)
        other = ["--seed", 1] if case == "a finished run, other flags" else []
        p = entry(leq, *leq_cmd(upstream, tiny_maze_file_module, run_dir)[1:], *other)
        if other:
            line = last_line(p, only=True)
            assert line.startswith(f"error: the finished run in {run_dir} was written with other settings (seed 0 "
                                   f"there, 1 now)"), line
        else:
            final = json.loads((run_dir / "final_eval.json").read_text())["score"]
            assert p.returncode == 0 and p.stderr == "" and p.stdout.splitlines()[-1] == (
                f"[leq] {run_dir} holds a finished run (final score {final:.1f}); nothing to do (use another "
                f"--run-dir to train again)")
        assert snapshot(run_dir) == before


# --------------------------------------------------------------------------------------------
# 10. Non-finite imagined states
# --------------------------------------------------------------------------------------------

FAMILIES = ["pointmaze-umaze", "antmaze-large-diverse-v2", "hopper-medium-v2", "walker2d-medium-v2",
            "halfcheetah-medium-v2"]


def written_rule(task, s2) -> bool:
    """docs/ALGORITHM.md's termination rules, one state at a time, in plain Python."""
    if task.family in ("pointmaze", "antmaze"):
        return ((s2[0] - task.goal[0]) ** 2 + (s2[1] - task.goal[1]) ** 2) ** 0.5 < task.goal_radius
    if task.family == "hopper":
        return not (all(np.isfinite(s2)) and all(abs(x) < 100 for x in s2[1:]) and s2[0] > 0.7 and abs(s2[1]) < 0.2)
    if task.family == "walker2d":
        return not (all(abs(x) < 100 for x in s2) and 0.8 < s2[0] < 2.0 and -1 < s2[1] < 1)
    return any(abs(x) >= 100 for x in s2)


@pytest.mark.parametrize("env", FAMILIES)
def test_10_a_non_finite_imagined_state_ends_the_rollout(env):
    """In every task family a next state holding NaN or +-inf in any coordinate is done (the
    written halfcheetah and maze rules call a NaN state "not done"); every finite state is done
    exactly when the written rule says so."""
    task = tasks.get_task(env)
    done = tasks.termination_fn(task)
    rng = np.random.default_rng(1)
    finite = rng.normal(size=(400, task.obs_dim)) * rng.choice([0.3, 3, 150], size=(400, 1))
    finite[:100, 0] = rng.uniform(0.7, 2.1, 100)  # heights around the locomotion bounds
    finite[100:150, :2] = np.asarray(task.goal or (0, 0)) + rng.normal(size=(50, 2)) * 0.3  # near a maze goal
    bad = np.repeat(finite[:1] * 0 + 0.5, 3 * task.obs_dim, axis=0)
    for i, value in enumerate(np.repeat([np.nan, np.inf, -np.inf], task.obs_dim)):
        bad[i, i % task.obs_dim] = value
    states = np.concatenate([finite, bad]).astype(np.float32)
    got = np.asarray(done(None, None, jnp.asarray(states)))
    assert got.dtype == bool and got[len(finite):].all()
    np.testing.assert_array_equal(got[:len(finite)], [written_rule(task, s) for s in states[:len(finite)].tolist()])
    assert 0 < got[:len(finite)].sum() < len(finite)
