"""Runs that survive: kill and resume, atomic checkpoints, the NaN guard, reproducibility and
one-line errors for bad input (the real scripts, in subprocesses)."""

import dataclasses
import json
import signal

import jax
import numpy as np
import pytest

from leq_utils import artifacts
import leq
from leq_utils import mazes
from leq_utils import tasks
from conftest import ENV, ROOT, TINY_PRETRAIN, TINY_WORLD_MODEL, killed_before_a_rename, leq_cmd, metric_rows, npz_arrays, run, run_and_kill_when, run_killed_at_rename


# --------------------------------------------------------------------------------------------
# Kill and resume
# --------------------------------------------------------------------------------------------

def test_leq_killed_and_resumed_equals_an_uninterrupted_run(upstream, tiny_maze_file_module, uninterrupted):
    """SIGKILL after the first checkpoint, rerun the same command: same total, identical weights."""
    run_dir = upstream / "killed"
    run_and_kill_when(leq_cmd(upstream, tiny_maze_file_module, run_dir), upstream,
                      lambda: any(run_dir.glob("checkpoint_*.npz")) and not (run_dir / "leq.npz").exists())
    assert not (run_dir / "leq.npz").exists()
    (run_dir / "checkpoint_00000150.npzkilled.tmp").write_bytes(b"partial")  # as a kill mid-write leaves
    p = run(leq_cmd(upstream, tiny_maze_file_module, run_dir), upstream)
    assert "resuming" in p.stdout
    assert not list(run_dir.glob("*.tmp"))  # orphaned temp files are removed by the next write
    resumed, plain = npz_arrays(run_dir / "leq.npz"), npz_arrays(uninterrupted / "leq.npz")
    assert resumed.keys() == plain.keys() and len(plain) > 10
    for k in plain:  # bitwise: same compiled code, same keys, same data on the same CPU
        np.testing.assert_array_equal(resumed[k], plain[k], err_msg=k)
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows if "critic_loss" in r] == [50, 100, 150, 200, 250, 300]
    assert rows == metric_rows(uninterrupted)
    assert len(list(run_dir.glob("checkpoint_*.npz"))) <= 2  # the last two are kept


@pytest.mark.slow
def test_same_seed_twice_gives_identical_metrics(upstream, tiny_maze_file_module, uninterrupted):
    """Every random draw comes from the seed."""
    run_dir = upstream / "again"
    run(leq_cmd(upstream, tiny_maze_file_module, run_dir), upstream)
    assert metric_rows(run_dir) == metric_rows(uninterrupted)
    other = upstream / "other_seed"
    run(leq_cmd(upstream, tiny_maze_file_module, other, "--seed", 1), upstream)
    assert metric_rows(other) != metric_rows(uninterrupted)


def test_compilation_cache_changes_no_bit(upstream, tiny_maze_file_module, tmp_path):
    """conftest.py shares a JAX persistent compilation cache across the suite's subprocesses: a run
    that loads every program from the cache ends bitwise equal to the run that compiled them."""
    import os
    import subprocess
    import sys
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")  # every program, however small
    for name in ("compiled", "loaded"):
        subprocess.run([sys.executable, *map(str, leq_cmd(upstream, tiny_maze_file_module, tmp_path / name))],
                       cwd=tmp_path, env=env, check=True, capture_output=True)
        entries = sorted(p.name for p in cache.iterdir())
        if name == "compiled":
            written = entries
    assert len(written) >= 3 and entries == written  # the second run compiled nothing new
    compiled, loaded = npz_arrays(tmp_path / "compiled" / "leq.npz"), npz_arrays(tmp_path / "loaded" / "leq.npz")
    assert compiled.keys() == loaded.keys() and len(compiled) > 10
    for k in compiled:
        np.testing.assert_array_equal(loaded[k], compiled[k], err_msg=k)
    assert metric_rows(tmp_path / "loaded") == metric_rows(tmp_path / "compiled")


def test_leq_artifact_runs_in_evaluate(uninterrupted):
    """End to end: the leq.npz of a 300-step run on a built-in maze loads and runs in evaluate.py."""
    p = run([ROOT / "evaluate.py", "--checkpoint", uninterrupted / "leq.npz", "--episodes", 2, "--parallel", 2,
             "--no-plot"], uninterrupted)
    result = json.loads((uninterrupted / "leq.eval.json").read_text())
    assert result["env"] == ENV and result["episodes"] == 2 and 0 <= result["success"] <= 1
    assert 1 <= result["length"] <= tasks.get_task(ENV).max_episode_steps
    assert "q_start" in result and np.isfinite(result["q_start"]) and "score" in p.stdout


@pytest.mark.slow
def test_one_compile_per_run(upstream, tiny_maze_file_module, tmp_path, monkeypatch):
    """The chunk of K steps is traced once per run, across expansions, evaluations and checkpoints
    (a Python side effect in the update runs only while JAX traces it)."""
    import tyro
    traces, make_update = [], leq.make_update

    def counting_make_update(*a, **k):
        update = make_update(*a, **k)

        def counted(*args):
            traces.append(1)
            return update(*args)
        return counted
    monkeypatch.setattr(leq, "make_update", counting_make_update)
    args = tyro.cli(leq.Args, args=[str(x) for x in leq_cmd(upstream, tiny_maze_file_module, tmp_path / "run")[1:]])
    leq.train(args)
    assert (tmp_path / "run" / "leq.npz").exists()
    assert len(traces) == 1


@pytest.mark.slow
def test_world_model_killed_and_resumed(upstream, tiny_maze_file_module, tmp_path):
    """world_model.py continues from its per-epoch checkpoint and ends with the same model. The
    kill lands as epoch 4's checkpoint is renamed, so the rerun resumes after epoch 3."""
    def cmd(out):
        return [ROOT / "world_model.py", "--env", ENV, "--dataset-path", tiny_maze_file_module, "--out", out,
                "--hidden-dims", 16, 16, "--weight-decay", 2.5e-5, 5e-5, 1e-4, "--ensemble-size", 3,
                "--num-elites", 2, "--max-epochs", 8, "--patience", 1000]
    run(cmd(tmp_path / "plain.npz"), tmp_path)
    assert run_killed_at_rename(cmd(tmp_path / "killed.npz"), tmp_path, "ckpt", 4) == -signal.SIGKILL
    assert (tmp_path / "killed.ckpt.npz").exists() and not (tmp_path / "killed.npz").exists()
    p = run(cmd(tmp_path / "killed.npz"), tmp_path)
    assert "resuming" in p.stdout and "at epoch 3" in p.stdout and not (tmp_path / "killed.ckpt.npz").exists()
    a, b = npz_arrays(tmp_path / "plain.npz", ("model/",)), npz_arrays(tmp_path / "killed.npz", ("model/",))
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_pretrain_killed_and_resumed(upstream, tiny_maze_file_module, tmp_path):
    """pretrain.py continues from its checkpoint and ends with the same pretrain. The kill lands as
    the step-400 checkpoint is renamed (FQE's step 100), so the rerun resumes from step 300, at the
    switch from BC to FQE."""
    def cmd(out):
        return [ROOT / "pretrain.py", "--env", ENV, "--dataset-path", tiny_maze_file_module, "--world-model",
                upstream / "wm.npz", "--out", out, "--hidden-dims", 32, 32, "--bc-steps", 300, "--fqe-steps",
                300, "--chunk", 50, "--checkpoint-every", 100, "--bc-batch-size", 64]
    run(cmd(tmp_path / "plain.npz"), tmp_path)
    assert run_killed_at_rename(cmd(tmp_path / "killed.npz"), tmp_path, "ckpt", 4) == -signal.SIGKILL
    assert (tmp_path / "killed.ckpt.npz").exists() and not (tmp_path / "killed.npz").exists()
    p = run(cmd(tmp_path / "killed.npz"), tmp_path)
    assert "resuming" in p.stdout and "at step 300" in p.stdout
    a, b = npz_arrays(tmp_path / "plain.npz"), npz_arrays(tmp_path / "killed.npz")
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_flag_added_since_a_run_was_written_counts_as_its_default():
    """A run written before a flag existed resumes when the flag is at its default (new flags keep
    the old behaviour), and is refused with the flag set to anything else."""
    args = leq.Args(seed=3)
    saved = json.loads(json.dumps(dataclasses.asdict(args), default=str))
    del saved["no_expansion"], saved["seed"]  # two settings added since (as far as this config knows)
    assert artifacts.config_diff(saved, leq.Args(seed=0)) == ""  # seed's default is 0
    assert artifacts.config_diff(saved, leq.Args(seed=3)) == "seed 0 there, 3 now"
    assert artifacts.config_diff(saved, dataclasses.replace(args, seed=0, no_expansion=True)) == \
        "no_expansion false there, true now"


# --------------------------------------------------------------------------------------------
# Atomic writes and the NaN guard
# --------------------------------------------------------------------------------------------

def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    """save_npz writes a temp file and renames it: a kill before the rename changes nothing."""
    task = tasks.get_task(ENV)
    path = tmp_path / "checkpoint.npz"
    artifacts.save_npz(path, {"x": np.zeros(3)}, "leq_checkpoint", task, {})
    killed_before_a_rename(f"import numpy as np\nfrom leq_utils import artifacts, tasks\nartifacts.save_npz({str(path)!r}, "
                           f"{{'x': np.ones(5_000_000)}}, 'leq_checkpoint', tasks.get_task({ENV!r}), {{}})")
    f = artifacts.load_artifact(path, task)
    np.testing.assert_array_equal(f["x"], np.zeros(3))
    assert [p.name for p in tmp_path.glob("*.tmp")]  # the orphan temp file, never read
    artifacts.save_npz(path, {"x": np.ones(3)}, "leq_checkpoint", task, {})  # the next write of that file
    assert not list(tmp_path.glob("*.tmp"))  # removes it
    # and a crash inside the write (an exception) removes its temp file
    with pytest.raises(RuntimeError):
        artifacts.save_npz(tmp_path / "y.npz", {"x": np.zeros(2), "bad": Unsavable()}, "leq", task, {})
    assert not (tmp_path / "y.npz").exists() and len(list(tmp_path.glob("y.npz*.tmp"))) == 0


class Unsavable:
    def __array__(self, *a, **k):
        raise RuntimeError("cannot be saved")


POISON = """
import sys
sys.path.insert(0, {root!r})
import jax.numpy as jnp
import leq
from leq_utils import cli
def poison(step, st, data):  # one NaN reward in the data, from step {at} on
    return st, (data._replace(rewards=data.rewards.at[{row}].set(jnp.nan)) if step == {at} else data)
leq.before_chunk = poison
sys.argv = ["leq.py", *sys.argv[1:]]
cli.run_script(leq.train, leq.Args)
"""


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(upstream, tiny_maze_file_module):
    """A NaN reward in one data row, put there at step 200 (leq.before_chunk, a test hook), stops
    LEQ with one line naming the first non-finite quantities and the first step whose batch drew
    that row, found here by replaying the data sampling (the keys of make_update) in a plain loop;
    the last good checkpoint is kept and leq.npz is not written."""
    n = tasks.load_dataset(tasks.get_task(ENV), str(tiny_maze_file_module)).observations.shape[0]
    k_train = jax.random.split(jax.random.PRNGKey(0), 3)[1]
    batches = [set(np.asarray(jax.random.randint(jax.random.split(jax.random.fold_in(k_train, s), 4)[0], (32,), 0, n)).tolist())
               for s in range(200, 250)]  # the data rows of the batches of steps 201..250
    first = next(i for i in range(10, 50) if batches[i] - set().union(*batches[:i]))  # mid-chunk
    row = min(batches[first] - set().union(*batches[:first]))
    run_dir = upstream / "nan"
    cmd = ["-c", POISON.format(root=str(ROOT), at=200, row=row), *leq_cmd(upstream, tiny_maze_file_module, run_dir)[1:]]
    p = run(cmd, upstream, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr  # the progress bar, then one line
    message = p.stderr.strip().splitlines()[-1]
    assert message == (f"error: non-finite critic_loss first at step {200 + first + 1} (with loss_data); stopped; "
                       f"the last good checkpoint, {run_dir / 'checkpoint_00000200.npz'}, is kept"), message
    good = artifacts.load_artifact(run_dir / "checkpoint_00000200.npz", tasks.get_task(ENV))
    assert all(np.isfinite(v).all() for k, v in good.items() if k.startswith("state/"))
    assert not (run_dir / "leq.npz").exists()


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    ({"expectile": 0.0}, "--expectile must be in (0, 1)"),
    ({"expectile": 1.2}, "--expectile must be in (0, 1)"),
    ({"horizon": 0}, "--horizon must be >= 1"),
    ({"total_steps": -5}, "--total-steps must be >= 0"),
    ({"lam": 1.5}, "--lam must be in [0, 1], got 1.5"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"num_critics": 0}, "--num-critics must be >= 1, got 0"),
    ({"mobile_beta": -0.1}, "--mobile-beta must be >= 0, got -0.1"),
    ({"entropy_coef": -1.0}, "--entropy-coef must be >= 0, got -1.0"),
    ({"learned_termination": True, "goal": (1.0, 2.0)}, "no effect with --learned-termination"),
])
def test_flags_out_of_range(flags, message):
    with pytest.raises(tasks.InputError) as e:
        leq.resolve(leq.Args(**flags))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_errors_are_one_line(upstream, tiny_maze_file_module):
    """Wrong env for an artifact, out-of-range flag, unknown env: one line on stderr, non-zero exit."""
    cases = [
        (["--env", "pointmaze-medium", "--world-model", upstream / "wm.npz", "--pretrain", upstream / "pt.npz"],
         "made for env 'pointmaze-umaze', not 'pointmaze-medium'"),
        (["--env", ENV, "--expectile", 2], "--expectile must be in (0, 1)"),
        (["--env", "antmaze-huge-v9"], "unknown env 'antmaze-huge-v9'"),
        (["--env", ENV, "--world-model", upstream / "missing.npz"], "does not exist"),
    ]
    for extra, message in cases:
        p = run([ROOT / "leq.py", "--dataset-path", tiny_maze_file_module, "--run-dir", upstream / "bad", *extra],
                upstream, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and message in lines[0], (extra, p.stderr[-2000:])


def nested(prefix, flags):
    return [f"--{prefix}.{f[2:]}" if str(f).startswith("--") else f for f in flags]


@pytest.mark.slow
def test_one_leq_command_runs_shrunk_upstream_stages(upstream, tiny_maze_file_module, tmp_path):
    """leq.py without upstream artifacts runs world_model.py and pretrain.py with the nested
    --world-model-settings.* / --pretrain-settings.*: the world model is the one world_model.py
    makes with the same flags, array for array; a later run with other nested settings uses the
    existing artifacts and says so in one line each where they differ from the settings it would
    have used; artifacts passed by path are compared with the nested settings given only."""
    cmd = [ROOT / "leq.py", "--env", ENV, "--dataset-path", tiny_maze_file_module, "--total-steps", 0,
           "--eval-episodes", 1, "--final-eval-rounds", 1]
    p = run([*cmd, "--run-dir", "r1", *nested("world-model-settings", TINY_WORLD_MODEL),
             *nested("pretrain-settings", TINY_PRETRAIN)], tmp_path)
    assert "running world_model.py --ensemble-size 3 --num-elites 2 --hidden-dims 16 16" in p.stdout, p.stdout
    wm = tmp_path / "runs" / f"{ENV}__world_model__s0" / "world_model.npz"
    pt = tmp_path / "runs" / f"{ENV}__pretrain__s0" / "pretrain.npz"
    ours, theirs = (npz_arrays(path, ("model/params", "model/input", "model/elites")) for path in (wm, upstream / "wm.npz"))
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    config = artifacts.recorded_config(pt)
    assert (config["hidden_dims"], config["bc_steps"], config["fqe_steps"], config["bc_batch_size"]) == ([32, 32], 20, 20, 64)
    assert npz_arrays(pt, ("actor/params/Dense_0/kernel",))["actor/params/Dense_0/kernel"].shape == (4, 32)

    # the existing artifacts at leq.py's default paths: a note where they differ from the settings
    # leq.py would use (world model: the max_epochs given; pretraining: the defaults, no flags given)
    p = run([*cmd, "--run-dir", "r2", *nested("world-model-settings", TINY_WORLD_MODEL[:-2]),
             "--world-model-settings.max-epochs", 3], tmp_path)
    notes = [line for line in p.stdout.splitlines() if line.startswith("[leq] note:")]
    assert "running" not in p.stdout and len(notes) == 2, p.stdout
    assert f"{wm.relative_to(tmp_path)} as it is, made with max_epochs 2 (not 3);" in notes[0]
    assert (f"{pt.relative_to(tmp_path)} as it is, made with hidden_dims [32, 32] (not [256, 256, 256]), bc_steps "
            f"20 (not 20000), bc_batch_size 64 (not 4096), fqe_steps 20 (not 20000);") in notes[1]
    # artifacts passed by path: compared with the nested settings given only (none here: no note)
    p = run([*cmd, "--run-dir", "r3", "--world-model", wm, "--pretrain", pt], tmp_path)
    assert "note:" not in p.stdout and "running" not in p.stdout, p.stdout


@pytest.mark.slow
def test_world_model_of_other_data_is_refused(upstream, tiny_maze_file_module, tmp_path):
    """pretrain.py and leq.py refuse a world model fitted to other data, even under the same file
    name (the content's sha256 is compared), in one line that says what to do; the same data under
    another name is accepted."""
    other = tmp_path / "other" / tiny_maze_file_module.name  # the same name, other data
    mazes.generate_pointmaze(tasks.get_task(ENV), other, size=6000, seed=4, episode_len=1000)
    common = ["--env", ENV, "--dataset-path", other, "--world-model", upstream / "wm.npz"]
    for cmd in ([ROOT / "pretrain.py", *common, "--out", tmp_path / "pt.npz"],
                [ROOT / "leq.py", *common, "--pretrain", upstream / "pt.npz", "--run-dir", tmp_path / "r"]):
        p = run(cmd, tmp_path, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert lines[-1].startswith(f"error: world model {upstream / 'wm.npz'} was made from the dataset "
                                    f"{tiny_maze_file_module} (sha256 ") and f"this run's {other} is" in lines[-1]
        assert "pass the world model of this dataset with --world-model, or retrain it" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    renamed = tmp_path / "renamed.hdf5"
    renamed.write_bytes(tiny_maze_file_module.read_bytes())
    run([ROOT / "pretrain.py", *common[:2], "--dataset-path", renamed, *common[4:], "--out", tmp_path / "pt.npz",
         "--hidden-dims", 8, "--bc-steps", 2, "--fqe-steps", 2, "--chunk", 2], tmp_path)
    assert (tmp_path / "pt.npz").exists()


def test_artifact_format_version_and_dims(tmp_path):
    task = tasks.get_task(ENV)
    path = tmp_path / "a.npz"
    artifacts.save_npz(path, {"actor/w": np.zeros(2)}, "pretrain", task, {})
    with np.load(path) as f:
        arrays = dict(f)
    np.savez(tmp_path / "old.npz", **{**arrays, "meta/format_version": np.array(0)})
    with pytest.raises(tasks.InputError) as e:
        artifacts.load_artifact(tmp_path / "old.npz", task)
    assert "format version 0" in str(e.value)
    np.savez(tmp_path / "dims.npz", **{**arrays, "meta/obs_dim": np.array(29)})
    with pytest.raises(tasks.InputError) as e:
        artifacts.load_artifact(tmp_path / "dims.npz", task)
    assert "obs/action dims (29, 2)" in str(e.value)


def test_empty_dataset(tmp_path):
    from conftest import write_d4rl_file
    path = write_d4rl_file(tmp_path / "e.hdf5", np.zeros((1, 4)), np.zeros((1, 2)), np.zeros(1), np.zeros(1))
    with pytest.raises(tasks.InputError) as e:
        tasks.read_hdf5(path)
    assert "is empty" in str(e.value)
