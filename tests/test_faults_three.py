"""What a replay of hostile cases still broke (the reliability issue, round three), one test per
item, through the scripts' entry point cli.run_script in this process: each checks the one-line
message, the exit code and that the files already there are unchanged.

   1 data loss: an existing world model or pretrain.npz is never replaced silently
   2 silent acceptance: seeds >= 2**32, a non-finite --goal, an empty --dataset-path, equal
     episode returns (no reward scale), float64 values beyond float32's range
   4 checks first: world_model.py / pretrain.py --out <a folder>, before any work
"""

import shutil

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
        cases = [(leq, [*argv[leq], "--goal", *goal], f"--goal must be finite (each), got {float(goal[0])} {float(goal[1])}")]
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
