"""leq.py --num-seeds N: seed k of one N-seed process against a single-seed run of seed S + k
(the reference: the unvmapped default path), fresh and killed-and-resumed."""

import json

import numpy as np
import pytest
from conftest import (ENV, ROOT, TINY_PRETRAIN, TINY_WORLD_MODEL, metric_rows, npz_arrays, run,
                      run_and_kill_when)

import leq
from leq_utils import tasks

S, N = 1, 2  # seeds 1 and 2: not starting at 0, so a seed offset error shows


def nested(prefix, flags):
    return [f"--{prefix}.{x[2:]}" if isinstance(x, str) and x.startswith("--") else x for x in flags]


def cmd(data, run_dir, *extra):
    """A tiny LEQ run whose upstream artifacts are at the default paths (made when missing)."""
    return [ROOT / "leq.py", "--env", ENV, "--dataset-path", data, "--run-dir", run_dir, "--total-steps", 300,
            "--chunk", 50, "--checkpoint-every", 100, "--eval-every", 150, "--eval-episodes", 1,
            "--final-eval-rounds", 1, "--expand-every", 100, "--expand-size", 64, "--batch-size", 32,
            "--model-batch-size", 32, "--horizon", 3, *nested("world-model-settings", TINY_WORLD_MODEL),
            *nested("pretrain-settings", TINY_PRETRAIN), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_maze_file_module):
    """One N-seed run (making every seed's world model and pretraining), and one single-seed run per seed."""
    d = tmp_path_factory.mktemp("many")
    p = run(cmd(tiny_maze_file_module, d / "many", "--seed", S, "--num-seeds", N), d, timeout=1500)
    for k in range(N):
        run(cmd(tiny_maze_file_module, d / f"single_{S + k}", "--seed", S + k), d, timeout=1500)
    return d, p


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


# The vmapped program does not round exactly as the unvmapped one (XLA's batched matrix products
# on CPU sum in another order): after 300 steps the largest parameter difference measured was
# 2.4e-7 (float32, parameters of order 1), so seeds are compared to 1e-5 and metrics to 1e-4.
TOLERANCE = 1e-5


def assert_seed_equals_single(seed_dir, single_dir):
    many, one = npz_arrays(seed_dir / "leq.npz"), npz_arrays(single_dir / "leq.npz")
    diff = largest_difference(many, one)
    print(f"{seed_dir.name} vs {single_dir.name}: largest parameter difference {diff:g}")
    assert diff <= TOLERANCE, f"largest parameter difference {diff:g} between {seed_dir} and {single_dir}"
    rows_many, rows_one = metric_rows(seed_dir), metric_rows(single_dir)
    assert [sorted(r) for r in rows_many] == [sorted(r) for r in rows_one]
    for a, b in zip(rows_many, rows_one):
        assert a == {k: pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in b.items()}
    final_many, final_one = (json.loads((x / "final_eval.json").read_text()) for x in (seed_dir, single_dir))
    assert final_many == {k: pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in final_one.items()}


@pytest.mark.slow
def test_each_seed_of_a_many_seed_run_equals_its_single_seed_run(runs):
    d, p = runs
    for k in range(N):  # each seed made its own upstream artifacts, at its default path
        assert (d / "runs" / f"{ENV}__world_model__s{S + k}" / "world_model.npz").exists()
        assert (d / "runs" / f"{ENV}__pretrain__s{S + k}" / "pretrain.npz").exists()
        assert f"world_model.npz at runs/{ENV}__world_model__s{S + k}" in p.stdout
    seeds = [npz_arrays(d / "many" / f"seed_{S + k}" / "leq.npz") for k in range(N)]
    assert largest_difference(seeds[0], seeds[1]) > 1e-3  # the seeds really differ
    for k in range(N):
        assert_seed_equals_single(d / "many" / f"seed_{S + k}", d / f"single_{S + k}")
    # the seed's leq.npz records the settings of the single-seed run it equals
    config = json.loads((d / "many" / f"seed_{S + 1}" / "config.json").read_text())
    assert config["seed"] == S + 1 and config["num_seeds"] == 1
    # the run's one stream: the seeds' mean and min score at every evaluation
    stream = metric_rows(d / "many")
    per_seed = [metric_rows(d / "many" / f"seed_{S + k}") for k in range(N)]
    evals = [i for i, r in enumerate(stream) if "score" in r]
    assert [stream[i]["step"] for i in evals] == [150, 300]
    for i in evals:
        scores = [rows[i]["score"] for rows in per_seed]
        assert stream[i]["scores"] == scores and stream[i]["score_min"] == min(scores)
        assert stream[i]["score"] == pytest.approx(np.mean(scores))
        assert stream[i]["critic_loss"] == pytest.approx(np.mean([rows[i]["critic_loss"] for rows in per_seed]))
    assert stream[-1]["final_score"] == pytest.approx(np.mean([rows[-1]["final_score"] for rows in per_seed]))


@pytest.mark.slow
def test_killed_many_seed_run_resumes_to_the_same_result(runs, tiny_maze_file_module):
    d, _ = runs
    run_dir = d / "killed"
    command = cmd(tiny_maze_file_module, run_dir, "--seed", S, "--num-seeds", N)
    # killed after its step-200 checkpoint, in the middle of the last stretch
    run_and_kill_when(command, d, lambda: (run_dir / "checkpoint_00000200.npz").exists())
    assert not (run_dir / f"seed_{S}" / "leq.npz").exists()
    p = run(command, d)
    assert "resuming" in p.stdout and "from step 200" in p.stdout
    for k in range(N):  # the same program as the uninterrupted N-seed run: bitwise equal to it
        seed_dir = run_dir / f"seed_{S + k}"
        assert largest_difference(npz_arrays(seed_dir / "leq.npz"), npz_arrays(d / "many" / seed_dir.name / "leq.npz")) == 0
        assert metric_rows(seed_dir) == metric_rows(d / "many" / seed_dir.name)
        assert_seed_equals_single(seed_dir, d / f"single_{S + k}")
    # finished: running it again does nothing
    assert "nothing to do" in run(command, d).stdout


@pytest.mark.slow
def test_a_resume_refuses_one_seeds_changed_world_model(runs, tiny_maze_file_module, tmp_path):
    """A killed N-seed run whose seed S+1 world model was replaced (same settings, other content)
    before the resume: refused in one line that names the seed's world model and both
    fingerprints, the run folder and the artifacts as they were (reliability issue, round three)."""
    import shutil
    d, _ = runs
    shutil.copytree(d / "runs", tmp_path / "runs")  # this run's own default upstream paths
    run_dir = tmp_path / "killed"
    command = cmd(tiny_maze_file_module, run_dir, "--seed", S, "--num-seeds", N)
    run_and_kill_when(command, tmp_path, lambda: (run_dir / "checkpoint_00000100.npz").exists())
    changed = tmp_path / "runs" / f"{ENV}__world_model__s{S + 1}" / "world_model.npz"
    shutil.copy(tmp_path / "runs" / f"{ENV}__world_model__s{S}" / "world_model.npz", changed)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*.npz"))}
    p = run(command, tmp_path, check=False)
    line = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert line.startswith(f"error: checkpoint {run_dir / 'checkpoint_00000100.npz'} was made from the world model "
                           f"{changed.resolve()} (sha256 "), line
    assert "restore the files it was made from, or start over in another --run-dir" in line
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*.npz"))} == before


@pytest.mark.slow
def test_evaluate_reads_a_seed_of_a_many_seed_run(runs):
    d, _ = runs
    path = d / "many" / f"seed_{S + N - 1}" / "leq.npz"
    run([ROOT / "evaluate.py", "--checkpoint", path, "--episodes", 2, "--no-plot", "--out", d / "eval.json"], d)
    assert set(json.loads((d / "eval.json").read_text())) >= {"score"}


@pytest.mark.parametrize("extra, message", [
    (dict(world_model="wm.npz"), "path with {seed}"),
    (dict(pretrain="runs/pt.npz"), "path with {seed}"),
    (dict(learned_termination=True), "not supported with --num-seeds"),
    (dict(num_seeds=0), "--num-seeds must be >= 1"),
])
def test_bad_many_seed_flags_end_in_one_line(extra, message):
    with pytest.raises(tasks.InputError, match=message.replace("{", r"\{").replace("}", r"\}")):
        leq.resolve(leq.Args(env=ENV, **{"num_seeds": 2, **extra}))
