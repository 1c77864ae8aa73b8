"""What a replay of hostile cases still broke (the reliability issue, round three), one test per
item, through the scripts' entry point cli.run_script in this process: each checks the one-line
message, the exit code and that the files already there are unchanged.

   1 data loss: an existing world model or pretrain.npz is never replaced silently
   2 silent acceptance: seeds >= 2**32, a non-finite --goal, an empty --dataset-path, equal
     episode returns (no reward scale), float64 values beyond float32's range
   3 tracebacks: HDF5 links that do not resolve, a 0-d dataset, artifacts with broken metadata
   4 checks first: world_model.py / pretrain.py --out <a folder>, non-finite numbers (--actor-lr
     inf, nested settings too), a data folder that is a file or read-only, artifacts with an input
     std of 0 or float64 weights beyond float32, before any work
   5 wording: a FIFO, /dev/zero or a symlink loop as dataset
"""

import shutil
from pathlib import Path

import generate_dataset  # scripts/
import h5py
import numpy as np
import pytest
from conftest import ENV, TINY_PRETRAIN, TINY_WORLD_MODEL, write_d4rl_file
from test_faults import last_line, snapshot

import evaluate
import leq
import pretrain
import world_model

# --------------------------------------------------------------------------------------------
# 1. Data loss
# --------------------------------------------------------------------------------------------

def test_1_an_existing_artifact_is_never_replaced_silently(upstream, tiny_maze_file_module, tmp_path, entry):
    """world_model.py and pretrain.py on an --out that exists: with other settings, refused in one
    line naming the file and --overwrite (it used to be replaced, and a LEQ run made from it could
    then never resume); with the same settings and inputs, nothing to do (a finished rerun); with
    --overwrite, replaced."""
    folder = tmp_path / "folder"
    folder.mkdir()
    wm, pt = folder / "wm.npz", folder / "pt.npz"
    shutil.copy(upstream / "wm.npz", wm)  # made with TINY_WORLD_MODEL from tiny_maze_file_module (conftest)
    shutil.copy(upstream / "pt.npz", pt)
    data = ["--env", ENV, "--dataset-path", tiny_maze_file_module]
    wm_argv = [*data, "--out", wm, *TINY_WORLD_MODEL]
    pt_argv = [*data, "--world-model", wm, "--out", pt, *TINY_PRETRAIN, "--chunk", 10]
    keep = "it is kept: pass --overwrite to replace it, or another --out to keep both"
    before = snapshot(folder)
    mtimes = {p: p.stat().st_mtime_ns for p in (wm, pt)}

    line = last_line(entry(world_model, *wm_argv, "--max-epochs", 3), only=True)
    assert line == f"error: world model {wm} already exists, made with other settings (max_epochs 2 there, 3 now); {keep}"
    line = last_line(entry(pretrain, *pt_argv, "--fqe-steps", 30), only=True)
    assert line == f"error: pretrain {pt} already exists, made with other settings (fqe_steps 20 there, 30 now); {keep}"
    for module, argv, what in ((world_model, wm_argv, "world model"), (pretrain, pt_argv, "pretrain")):
        p = entry(module, *argv)  # the same command again
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert p.stdout.splitlines()[-1] == (f"[{module.__name__}] {argv[argv.index('--out') + 1]} already holds this "
                                             f"{what} (same settings and inputs); nothing to do (pass --overwrite to "
                                             f"train it again)")
    assert snapshot(folder) == before and {p: p.stat().st_mtime_ns for p in (wm, pt)} == mtimes

    assert entry(world_model, *wm_argv, "--max-epochs", 1, "--overwrite").returncode == 0  # asked for: replaced
    assert snapshot(folder)["wm.npz"] != before["wm.npz"] and snapshot(folder)["pt.npz"] == before["pt.npz"]
    line = last_line(entry(pretrain, *pt_argv), only=True)  # pt.npz was made from the world model replaced
    assert line.startswith(f"error: pretrain {pt} already exists, made with these settings from another world "
                           f"model (sha256 ") and line.endswith(keep), line
    assert snapshot(folder)["pt.npz"] == before["pt.npz"] and pt.stat().st_mtime_ns == mtimes[pt]


# --------------------------------------------------------------------------------------------
# 2. Silent acceptance
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["--seed 2**32", "--seed 1e20", "--num-seeds past 2**32", "--goal nan 0",
                                  "--goal inf inf", "--dataset-path ''", "--checkpoint ''", "--data-dir ''"])
def test_2_flags_no_longer_accepted_silently(case, upstream, tmp_path, entry):
    """Seeds wrapped modulo 2**32 (--seed 4294967296 ran as --seed 0) or crashed with an
    OverflowError; a NaN or infinite --goal ran to the end; an empty --dataset-path (an unset shell
    variable) used the built-in data. Each is refused at once in one line by every script that
    takes the flag: nothing generated, nothing written."""
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(upstream / "pt.npz", folder / "pt.npz")
    common = ["--env", ENV, "--data-dir", folder / "data"]  # where the built-in data would be generated
    argv = {world_model: [*common, "--out", folder / "out" / "wm.npz"],
            pretrain: [*common, "--world-model", folder / "pt.npz", "--out", folder / "out" / "pt.npz"],
            leq: [*common, "--run-dir", folder / "out"], evaluate: ["--checkpoint", folder / "pt.npz"]}
    if case.startswith("--seed"):
        seed = 2 ** 32 if case == "--seed 2**32" else 10 ** 20
        cases = [(module, [*a, "--seed", seed], f"--seed must be < 2**32, got {seed}") for module, a in argv.items()]
    elif case == "--num-seeds past 2**32":
        cases = [(leq, [*argv[leq], "--seed", 2 ** 32 - 2, "--num-seeds", 3],
                  "--seed 4294967294 with --num-seeds 3 runs seeds up to 4294967296, but a seed must be < 2**32")]
    elif case.startswith("--goal"):
        goal = case.split()[1:]
        cases = [(leq, [*argv[leq], "--goal", *goal], f"--goal must be a finite number, got {float(goal[0])} {float(goal[1])}")]
    elif case == "--dataset-path ''":
        cases = [(module, [*a, "--dataset-path", ""], ("--dataset-path is empty (an unset shell variable?): give a "
                  "value, or leave the flag out for its default")) for module, a in argv.items() if module is not evaluate]
    elif case == "--checkpoint ''":
        cases = [(evaluate, ["--checkpoint", ""], ("--checkpoint is empty (an unset shell variable?): give a value, "
                  "or leave the flag out for its default"))]
    else:  # the dataset generator too (--data-dir "" was ./data)
        cases = [(module, [*a[2:], "--data-dir", "", "--dataset-path", folder / "d.hdf5"], ("--data-dir is empty (an "
                  "unset shell variable?): give a value, or leave the flag out for its default"))
                 for module, a in argv.items() if module is not evaluate]
        cases.append((generate_dataset, ["--env", ENV, "--data-dir", ""], cases[0][2]))
    before = snapshot(folder)
    for module, a, message in cases:
        assert last_line(entry(module, *a), only=True) == f"error: {message}", module.__name__
        assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["pt.npz"]


@pytest.mark.parametrize("case", ["equal episode returns", "float64 beyond float32's range", "terminals of 7.0"])
def test_2_datasets_no_longer_accepted_silently(case, tmp_path, entry):
    """Locomotion data whose episodes all have one return gave reward_scale = inf (1000 / 0), which
    the next stage called a corrupt artifact; float64 values finite but beyond float32's range
    passed the NaN check and failed an epoch later as a non-finite loss that never named the
    dataset; terminals of 7.0 were taken as terminals. Each is refused when the dataset is read, in
    one line that names it."""
    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = folder / "d.hdf5"
    if case == "equal episode returns":  # hopper: 11-d states, 3-d actions; 4 episodes of 50 steps, all rewards 1
        env, n = "hopper-medium-v2", 200
        write_d4rl_file(data, rng.normal(size=(n, 11)), rng.uniform(-1, 1, (n, 3)), np.ones(n), np.zeros(n),
                        np.arange(n) % 50 == 49)
        message = (f"dataset {data}: its 4 episodes all have the return 49, so hopper's reward scale 1000 / (max "
                   f"return - min return) is undefined; use a dataset with episodes of different returns")
    elif case == "terminals of 7.0":
        env, n = ENV, 200
        terminals = np.zeros(n)
        terminals[[30, 90]] = 7.0
        write_d4rl_file(data, rng.normal(size=(n, 4)), rng.uniform(-1, 1, (n, 2)), np.zeros(n), np.zeros(n))
        with h5py.File(data, "r+") as f:  # write_d4rl_file stores terminals as bool
            del f["terminals"]
            f.create_dataset("terminals", data=terminals)
        message = (f"dataset file {data}: 'terminals' must be 0/1 (or true/false), but 2 rows hold other values "
                   f"(first at row 30: 7); fix the file")
    else:
        env, n = ENV, 200
        obs = rng.normal(size=(n, 4))
        obs[7, 1] = 1e300
        with h5py.File(data, "w") as f:
            for k, v in {"observations": obs, "actions": rng.uniform(-1, 1, (n, 2)), "rewards": np.zeros(n),
                         "terminals": np.zeros(n, bool)}.items():
                f.create_dataset(k, data=v)
        message = (f"dataset file {data}: 'observations' has values beyond float32's range (|x| > 3.4e38) in 1 rows "
                   f"(first at row 7); the stages compute in float32: clean or rescale the file")
    before = snapshot(folder)
    line = last_line(entry(world_model, "--env", env, "--dataset-path", data, "--out", folder / "wm.npz"), only=True)
    assert line == f"error: {message}"
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------
# 4. Checks first
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [world_model, pretrain], ids=lambda m: m.__name__)
def test_4_out_a_folder_is_refused_before_any_work(stage, upstream, tiny_maze_file_module, tmp_path, entry):
    """world_model.py --out <a folder> trained first and failed when it wrote the artifact; now
    world_model.py and pretrain.py refuse it at once, in one line, the folder as it was."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("already here")
    before = snapshot(tmp_path)
    argv = ["--env", ENV, "--dataset-path", tiny_maze_file_module, "--world-model", upstream / "wm.npz"]
    line = last_line(entry(stage, *argv[:4 if stage is world_model else 6], "--out", folder), only=True)
    assert line == f"error: --out {folder} is a folder: give the file to write, e.g. {folder / stage.__name__}.npz"
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


@pytest.mark.parametrize("flag", ["--actor-lr inf", "--critic-lr nan", "--world-model-settings.lr inf",
                                  "--pretrain-settings.bc-lr -inf", "world_model.py --lr inf", "pretrain.py --fqe-lr nan"])
def test_4_non_finite_numbers_are_refused_before_any_work(flag, upstream, tiny_maze_file_module, tmp_path, entry):
    """leq.py --actor-lr inf compiled and ran a step before its loss turned non-finite; every number
    flag of every stage, nested settings included, must now be finite, checked before any work."""
    folder = tmp_path / "folder"
    folder.mkdir()
    before = snapshot(tmp_path)
    *script, name, value = flag.split()
    stage = {"world_model.py": world_model, "pretrain.py": pretrain}.get(script[0] if script else "", leq)
    argv = {world_model: ["--out", folder / "wm.npz"], pretrain: ["--world-model", upstream / "wm.npz", "--out", folder / "pt.npz"],
            leq: ["--run-dir", folder / "run"]}[stage]
    line = last_line(entry(stage, "--env", ENV, "--dataset-path", tiny_maze_file_module, *argv, name, value), only=True)
    assert line == f"error: {name} must be a finite number, got {float(value)}"
    assert snapshot(tmp_path) == before and sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("case", ["a file", "read-only"])
def test_4_a_data_folder_that_cannot_hold_the_dataset_is_refused_before_generating(case, tmp_path, entry):
    """LEQ_DATA_DIR (or --data-dir) pointing at a file, or at a folder that cannot be written, was
    refused only after the built-in dataset had been generated (minutes); now before, in one line,
    by every stage and the generator."""
    import os
    if case == "a file":
        (tmp_path / "notes.txt").write_text("a file")
        data_dir, blocker, why = tmp_path / "notes.txt" / "data", tmp_path / "notes.txt", "is a file, not a folder; point it at a folder"
    else:  # as root (CI), chmod does not stop writing: a folder of a read-only file system does
        if os.access("/proc/sys", os.W_OK):
            pytest.skip("/proc/sys is writable here: no read-only folder to test with")
        data_dir, blocker, why = Path("/proc/sys/leq-data"), Path("/proc/sys"), "is not writable; point it at a folder you can write"
    before = snapshot(tmp_path)
    folder = tmp_path / "out"
    for module, argv, what in [
            (world_model, ["--out", folder / "wm.npz"], "the data folder (--data-dir or LEQ_DATA_DIR)"),
            (leq, ["--run-dir", folder], "the data folder (--data-dir or LEQ_DATA_DIR)"),
            (generate_dataset, [], "the output folder (--out, --data-dir or LEQ_DATA_DIR)")]:
        line = last_line(entry(module, "--env", ENV, "--data-dir", data_dir, *argv), only=True)
        assert line == f"error: {what} {data_dir}: {blocker} {why}", module.__name__
        assert snapshot(tmp_path) == before and not folder.exists()


# --------------------------------------------------------------------------------------------
# 3. Tracebacks instead of one line; 5. wording
# --------------------------------------------------------------------------------------------

def write_with(path, source, change):
    """A copy of the hdf5 dataset or .npz artifact `source` at `path`, `change` applied."""
    if str(source).endswith(".npz"):
        arrays = dict(np.load(source))
        change(arrays)
        np.savez(path, **arrays)
    else:
        shutil.copy(source, path)
        with h5py.File(path, "a") as f:
            change(f)
    return path


@pytest.mark.parametrize("case", ["a dangling soft link", "an external link to a missing file", "a 0-d dataset",
                                  "a FIFO", "/dev/zero", "a symlink loop"])
def test_3_5_a_broken_dataset_file_gets_one_line(case, tiny_maze_file_module, tmp_path, entry):
    """HDF5 'observations' as a soft link to nowhere, an external link to a missing file, or a
    single number gave a traceback; a FIFO or /dev/zero was reported as "does not exist", a symlink
    loop as "File exists". Each is now one line that says what is there."""
    import os
    path = tmp_path / "d.hdf5"
    if case == "a dangling soft link":
        write_with(path, tiny_maze_file_module, lambda f: (f.__delitem__("observations"), f.__setitem__(
            "observations", h5py.SoftLink("/nowhere"))))
        tail = f"dataset file {path}: 'observations' is a link that does not resolve"
    elif case == "an external link to a missing file":
        write_with(path, tiny_maze_file_module, lambda f: (f.__delitem__("observations"), f.__setitem__(
            "observations", h5py.ExternalLink(str(tmp_path / "missing.h5"), "/observations"))))
        tail = f"dataset file {path}: 'observations' is a link that does not resolve"
    elif case == "a 0-d dataset":
        write_with(path, tiny_maze_file_module, lambda f: (f.__delitem__("observations"), f.__setitem__(
            "observations", np.float32(3.0))))
        tail = f"dataset file {path}: 'observations' is a single number, not an array (one row per step)"
    elif case == "a FIFO":
        os.mkfifo(path)
        tail = f"--dataset-path {path} is a named pipe (FIFO), not a file: give a file"
    elif case == "/dev/zero":
        path, tail = Path("/dev/zero"), "--dataset-path /dev/zero is a device, not a file: give a file"
    else:
        os.symlink(tmp_path / "loop2", tmp_path / "loop1")
        os.symlink(tmp_path / "loop1", tmp_path / "loop2")
        path, tail = tmp_path / "loop1", f"--dataset-path {tmp_path / 'loop1'} cannot be opened: Too many levels of symbolic links"
    before = snapshot(tmp_path) if case not in ("a FIFO", "a symlink loop") else None
    line = last_line(entry(world_model, "--env", ENV, "--dataset-path", path, "--out", tmp_path / "out" / "wm.npz"), only=True)
    assert line.startswith(f"error: {tail}"), line
    assert not (tmp_path / "out").exists() and (before is None or snapshot(tmp_path) == before)


@pytest.mark.parametrize("case", ["format version 1.5", "no meta/kind", "meta/config not JSON", "input std 0",
                                  "float64 weights beyond float32"])
def test_3_4_a_broken_artifact_gets_one_line_before_any_work(case, upstream, tiny_maze_file_module, tmp_path, entry):
    """evaluate.py on an artifact whose meta/format_version is not an integer or that lacks
    meta/kind gave a traceback; a world model whose input std is 0 or whose float64 weights
    overflow float32 failed 17-63 s later with a message about gradients. Each is now refused on
    loading, in one line naming the file and the entry."""
    wm, pt = tmp_path / "wm.npz", tmp_path / "pt.npz"
    for path, std, kernel in ((wm, "model/input_std", "model/params/member_0/layer_0/kernel"),
                              (pt, "stats/std", "actor/params/Dense_0/kernel")):
        change = {"format version 1.5": lambda a: a.__setitem__("meta/format_version", np.array(1.5)),
                  "no meta/kind": lambda a: a.pop("meta/kind"),
                  "meta/config not JSON": lambda a: a.__setitem__("meta/config", np.array("{oops")),
                  "input std 0": lambda a: a[std].__setitem__(0, 0.0),
                  "float64 weights beyond float32": lambda a: a.__setitem__(kernel, a[kernel].astype(np.float64) * 1e300)}[case]
        write_with(path, upstream / path.name, change)
    expected = {"format version 1.5": "has broken metadata ('meta/format_version' is float64 of shape (), not an integer)",
                "no meta/kind": "has broken metadata ('meta/kind' is missing)",
                "meta/config not JSON": "has broken metadata ('meta/config' is not a JSON object",
                "input std 0": "has standard deviations <= 0 in '{std}' (1 of",
                "float64 weights beyond float32": "has values beyond float32's range in '{kernel}'"}[case]
    before = snapshot(tmp_path)
    for module, argv, path, std, kernel in [
            (evaluate, ["--checkpoint", pt, "--episodes", 1], pt, "stats/std", "actor/params/Dense_0/kernel"),
            (pretrain, ["--env", ENV, "--dataset-path", tiny_maze_file_module, "--world-model", wm, "--out", tmp_path / "new.npz"],
             wm, "model/input_std", "model/params/member_0/layer_0/kernel")]:
        line = last_line(entry(module, *argv))
        assert line.startswith(f"error: artifact {path} {expected.format(std=std, kernel=kernel)}"), (module.__name__, line)
        assert snapshot(tmp_path) == before


SIGNAL_SCRIPT = """
import atexit, os, signal, sys, time
sys.path.insert(0, {root!r})
from leq_utils import cli

def main(args):
    case = {case!r}
    if case == "second signal while armed":  # a training loop: the first asks for a checkpoint, the second stops
        cli.STOP.armed = True
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    elif case == "second signal while unwinding":
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:  # cleaning up after the first, the second comes inside a weakref callback (where an
            # exception is printed as "Exception ignored" and dropped): it stops at once
            import weakref
            class Thing: pass
            thing = Thing()
            ref = weakref.ref(thing, lambda r: (os.kill(os.getpid(), signal.SIGTERM), sum(range(10 ** 6))))
            del thing
            time.sleep(5)
    else:  # while exiting: an atexit function gets the signal
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))
        print("done")
    time.sleep(5)

if __name__ == "__main__":
    import dataclasses
    @dataclasses.dataclass
    class Args:
        pass
    cli.run_script(main, Args)
"""


@pytest.mark.parametrize("case,code,line", [
    ("second signal while armed", 130, "stopped by SIGINT at once: nothing was saved since the last checkpoint (if any); "
                                       "the same command resumes from it"),
    ("second signal while unwinding", 143, "stopped by SIGTERM at once: nothing was saved since the last checkpoint (if any); "
                                           "the same command resumes from it"),
    ("a signal while exiting", 130, "stopped by SIGINT while exiting (the work had ended)")])
def test_3_a_second_signal_or_one_at_exit_stops_at_once_in_one_line(case, code, line, tmp_path):
    """A second SIGINT/SIGTERM shortly after the first was raised inside a weakref callback and did
    not stop the script; SIGINT while a script exited gave an atexit traceback. Now the second
    signal (or one after the work ended) ends the process at once with one line and 128 + signum."""
    import subprocess
    import sys
    from conftest import ROOT
    script = tmp_path / "s.py"
    script.write_text(SIGNAL_SCRIPT.format(root=str(ROOT), case=case))
    p = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert p.returncode == code and "Traceback" not in p.stderr and "ignored" not in p.stderr, (p.returncode, p.stderr)
    assert p.stderr.strip().splitlines()[-1] == line


@pytest.mark.parametrize("flag,value,message", [
    ("--world-model-settings.num-elites", 9, "--world-model-settings.num-elites must be in [1, ensemble size], got 9"),
    ("--world-model-settings.weight-decay", 1e-4, "--world-model-settings.weight-decay needs one value per hidden layer "
                                                   "plus the output layer"),
    ("--pretrain-settings.gamma", 1.5, "--pretrain-settings.gamma must be in (0, 1], got 1.5")])
def test_5_a_nested_flag_is_named_as_leq_takes_it(flag, value, message, tiny_maze_file_module, tmp_path, entry):
    """leq.py --world-model-settings.num-elites 9 was refused as "--num-elites must be ...", a flag
    leq.py does not have; the world model's and pretrain's own checks now name the nested flag."""
    before = snapshot(tmp_path)
    line = last_line(entry(leq, "--env", ENV, "--dataset-path", tiny_maze_file_module, "--run-dir", tmp_path / "run",
                           flag, value), only=True)
    assert line == f"error: {message}"
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_3_out_of_memory_is_one_line(upstream, tiny_maze_file_module, tmp_path, entry):
    """leq.py --expand-size 100000000 ended in a RESOURCE_EXHAUSTED traceback; running out of memory
    is now one line that names the sizes to lower (a buffer of petabytes: it fails on any machine)."""
    before = snapshot(tmp_path)
    p = entry(leq, "--env", ENV, "--dataset-path", tiny_maze_file_module, "--world-model", upstream / "wm.npz",
              "--pretrain", upstream / "pt.npz", "--run-dir", tmp_path / "run", "--expand-size", 10 ** 11)
    line = last_line(p)
    assert line.startswith("error: out of memory (RESOURCE_EXHAUSTED: ") and "lower the sizes behind it (--expand-size" in line
    assert snapshot(tmp_path) == before


def test_3_a_curve_of_rows_with_wrong_types(tmp_path, entry):
    """evaluate.py --curve on metrics rows whose step or score is not a number gave a traceback from
    matplotlib; such rows are now left out with a one-line warning, and a file of only such rows
    is one error line."""
    path = tmp_path / "metrics.jsonl"
    good = '{"step": 100, "score": 10.0}\n{"step": 200, "score": 30.0}\n'
    path.write_text('{"step": "abc", "score": 5}\n' + good + '{"step": 300, "score": "high"}\n{"step": true, "score": 1}\n')
    p = entry(evaluate, "--curve", path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == f"warning: {path}: 3 row(s) hold something other than a finite number in score, step; left out of the curve"
    assert (tmp_path / "metrics.png").stat().st_size > 0
    (tmp_path / "metrics.png").unlink()
    path.write_text('{"step": "abc", "score": 5}\n')
    assert last_line(entry(evaluate, "--curve", path)).startswith(f"error: {path} has no metrics")
    assert not (tmp_path / "metrics.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--bogus-flag", "3"], "Unrecognized options: --bogus-flag, 3"),
    (["--ensemble-siz", "3"], "Unrecognized options: --ensemble-siz, 3; did you mean --ensemble-size?"),
    (["--lr", "abc"], "Error parsing --lr: could not convert string to float: 'abc'")])
def test_5_a_bad_command_line_is_one_line(argv, message, tmp_path, entry):
    """An unknown flag or a value that does not parse printed tyro's multi-line box; now one line
    (with tyro's guess, if any) and exit code 2, as a usage error; --help is tyro's as before."""
    before = snapshot(tmp_path)
    p = entry(world_model, "--env", ENV, "--out", tmp_path / "wm.npz", *argv)
    assert last_line(p, code=2, only=True) == f"error: {message}; python world_model.py --help lists the flags"
    assert snapshot(tmp_path) == before
    for module in (leq, pretrain, evaluate, generate_dataset):
        line = last_line(entry(module, "--bogus-flag", "3"), code=2, only=True)
        assert line == f"error: Unrecognized options: --bogus-flag, 3; python {module.__name__}.py --help lists the flags"


@pytest.mark.parametrize("case", ["all-zero observations", "umaze data under --env pointmaze-medium",
                                  "umaze data without its record"])
def test_2_data_that_cannot_be_the_tasks_are_refused(case, tiny_maze_file_module, tmp_path, entry):
    """A dataset whose observations are all zero, and umaze data under --env pointmaze-medium (the
    same dimensions), were trained on without a word. Now the first is refused on loading, in one
    line, by every stage; so is a file the built-in generator made for another task (it records its
    task); other data whose states lie in the maze's walls get a one-line warning."""
    out = tmp_path / "out"
    if case == "umaze data without its record":
        path = write_with(tmp_path / "d.hdf5", tiny_maze_file_module, lambda f: f.attrs.__delitem__("env"))
        p = entry(world_model, "--env", "pointmaze-medium", "--dataset-path", path, "--out", out / "wm.npz", *TINY_WORLD_MODEL)
        assert p.returncode == 0, p.stderr
        warning = p.stderr.strip().splitlines()[0]
        assert warning.startswith(f"warning: dataset file {path}: ") and warning.endswith(
            "% of its states lie inside walls or outside the medium maze: data of another maze? (pass the --env it was "
            "recorded in)") and int(warning.split(": ")[2].split("%")[0]) > 1
        return
    if case == "all-zero observations":
        path = write_with(tmp_path / "zeros.hdf5", tiny_maze_file_module,
                          lambda f: f["observations"].__setitem__(slice(None), 0.0))
        env, message = ENV, f"dataset file {path}: every observation is the same ([0. 0. 0. 0.]): not a recording of {ENV}; check the file"
    else:
        path, env = tiny_maze_file_module, "pointmaze-medium"
        message = (f"dataset file {path} was generated for pointmaze-umaze, not pointmaze-medium: pass --env pointmaze-umaze, "
                   f"or the file made for pointmaze-medium")
    before = snapshot(tmp_path)
    for module, argv in [(world_model, ["--out", out / "wm.npz"]), (leq, ["--run-dir", out])]:
        line = last_line(entry(module, "--env", env, "--dataset-path", path, *argv), only=True)
        assert line == f"error: {message}"
        assert snapshot(tmp_path) == before and not out.exists()


def test_5_a_world_model_through_a_relative_or_an_absolute_path_is_the_same(tiny_maze_file_module, tmp_path,
                                                                            entry, monkeypatch):
    """The world model stored the dataset path as typed, so one model trained through a relative
    and through an absolute path had different fingerprints (and the later stages' records of it
    differed); it now stores the file's real path."""
    shutil.copy(tiny_maze_file_module, tmp_path / "d.hdf5")
    monkeypatch.chdir(tmp_path)
    fingerprints = []
    for data, out in (("d.hdf5", "rel.npz"), (tmp_path / "d.hdf5", tmp_path / "abs.npz")):
        p = entry(world_model, "--env", ENV, "--dataset-path", data, "--out", out, *TINY_WORLD_MODEL)
        assert p.returncode == 0, p.stderr
        with np.load(tmp_path / Path(out).name) as f:
            assert str(f["model/dataset_path"]) == str((tmp_path / "d.hdf5").resolve())
            fingerprints.append(str(f["meta/fingerprint"]))
    assert fingerprints[0] == fingerprints[1]


def test_5_a_dataset_of_only_timeouts_is_one_line(tiny_maze_file_module, tmp_path, entry):
    """A dataset in which every step is a timeout has no transitions (a timed-out step has no next
    observation): world_model.py printed five numpy warnings, then an error about batches; now it
    is the one line that says why, from every stage."""
    path = write_with(tmp_path / "timeouts.hdf5", tiny_maze_file_module, lambda f: f["timeouts"].__setitem__(slice(None), True))
    before = snapshot(tmp_path)
    for module, argv in [(world_model, ["--out", tmp_path / "out" / "wm.npz"]), (leq, ["--run-dir", tmp_path / "out"])]:
        line = last_line(entry(module, "--env", ENV, "--dataset-path", path, *argv), only=True)
        assert line == (f"error: dataset file {path} gives no transitions: every step ends its episode by a timeout or is "
                        f"the file's last (a timed-out step has no next observation); check its timeouts")
        assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("checkpoint", ["kept", "none"])
def test_5_a_finished_run_with_a_corrupt_leq_npz(checkpoint, upstream, tiny_maze_file_module, uninterrupted, tmp_path):
    """A finished run whose leq.npz is corrupt got a bare "not readable" line, no advice and no
    use of its intact checkpoints. Now the corrupt file is moved aside and the run resumes from its
    newest checkpoint, writing the same leq.npz again; with no checkpoint, one line says to start over."""
    from conftest import leq_cmd, metric_rows, npz_arrays, run
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    good = (run_dir / "leq.npz").read_bytes()
    (run_dir / "leq.npz").write_bytes(good[:len(good) // 2])  # cut short
    if checkpoint == "none":
        for p in run_dir.glob("checkpoint_*.npz"):
            p.unlink()
        before = snapshot(run_dir)
        p = run(leq_cmd(upstream, tiny_maze_file_module, run_dir), tmp_path, check=False)
        assert last_line(p).startswith(f"error: artifact {run_dir / 'leq.npz'} is not a readable .npz file")
        assert last_line(p).endswith("; the run folder has no checkpoint to make it again from: start over in another --run-dir")
        assert snapshot(run_dir) == before
        return
    newest = sorted(run_dir.glob("checkpoint_*.npz"))[-1].name
    p = run(leq_cmd(upstream, tiny_maze_file_module, run_dir), tmp_path)
    assert f"warning: the finished run's leq.npz does not load (artifact {run_dir / 'leq.npz'} is not a readable" in p.stderr
    assert f"moved to leq.npz.corrupt; resuming from {newest} to write it again" in p.stderr
    assert (run_dir / "leq.npz.corrupt").read_bytes() == good[:len(good) // 2]
    plain, again = npz_arrays(uninterrupted / "leq.npz"), npz_arrays(run_dir / "leq.npz")
    assert plain.keys() == again.keys() and all(np.array_equal(plain[k], again[k]) for k in plain)
    assert metric_rows(run_dir) == metric_rows(uninterrupted)


def test_5_a_symlink_loop_as_run_folder_is_named_as_such(upstream, tiny_maze_file_module, tmp_path, entry):
    """A symlink loop as the run folder (or as an artifact's folder) was reported as "File exists";
    now one line says it is a symbolic link that leads nowhere, before any work."""
    import os
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop_b", loop)
    os.symlink(loop, tmp_path / "loop_b")
    common = ["--env", ENV, "--dataset-path", tiny_maze_file_module]
    why = f"{loop} is a symbolic link that leads nowhere (a loop, or its target is missing); remove it or point it at a folder"
    for module, argv, what in [
            (leq, ["--world-model", upstream / "wm.npz", "--pretrain", upstream / "pt.npz", "--run-dir", loop], f"run folder {loop}"),
            (world_model, ["--out", loop / "wm.npz"], f"world model {loop / 'wm.npz'}"),
            (pretrain, ["--world-model", upstream / "wm.npz", "--out", loop / "pt.npz"], None)]:
        line = last_line(entry(module, *common, *argv), only=True)
        assert line.startswith("error: ") and line.endswith(f": {why}"), line
        assert what is None or line == f"error: {what}: {why}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "loop_b"]
