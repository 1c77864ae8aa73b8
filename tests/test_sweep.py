"""scripts/sweep.py: a 2 x 2 grid (envs x flag sets) of tiny --num-seeds runs through submitit's
local executor, end to end, then the collected table."""

import csv
import json
import shutil
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_PRETRAIN, TINY_WORLD_MODEL, run

from leq_utils import mazes
from leq_utils import tasks

sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402

ENVS, CELLS, SEEDS = ("pointmaze-umaze", "pointmaze-medium"), ("expectile_0.1", "expectile_0.3"), 2


def nested(prefix, flags):
    return [f"--{prefix}.{x[2:]}" if str(x).startswith("--") else x for x in flags]


def test_bootstrap_interval_against_a_loop():
    x = np.array([3.0, 7.0, 1.0, 9.0, 4.0])
    rng = np.random.default_rng(0)  # the same draws, one resample at a time
    means = [np.mean(x[rng.integers(0, len(x), len(x))]) for _ in range(2000)]
    low, high = sweep.bootstrap_interval(x, 2000, seed=0)
    assert (low, high) == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)))
    assert low < x.mean() < high


def test_grid_of_flags():
    common, cells = sweep.grid(["--expectile", "0.1", "0.3", "--horizon", "5", "10", "--total-steps", "20",
                                "--pretrain-settings.hidden-dims", "16", "16", "--no-ema"])
    assert common == ["--total-steps", "20", "--pretrain-settings.hidden-dims", "16", "16", "--no-ema"]
    assert cells == ["--expectile 0.1 --horizon 5", "--expectile 0.1 --horizon 10", "--expectile 0.3 --horizon 5",
                     "--expectile 0.3 --horizon 10"]
    assert [sweep.cell_name(c) for c in cells[:1]] == ["expectile_0.1_horizon_5"]
    assert sweep.grid(["--total-steps", "20"]) == (["--total-steps", "20"], [""]) and sweep.cell_name("") == "defaults"


@pytest.mark.slow
def test_sweep_2x2_grid_with_the_local_executor(tmp_path, tiny_maze_file_module):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_maze_file_module, data / "pointmaze-umaze.hdf5")
    mazes.generate_pointmaze(tasks.get_task("pointmaze-medium"), data / "pointmaze-medium.hdf5", size=6000, seed=3,
                             episode_len=1000)
    leq_flags = ["--dataset-path", f"{data}/{{env}}.hdf5", "--expectile", 0.1, 0.3, "--total-steps", 100,
                 "--chunk", 50, "--eval-every", 50, "--eval-episodes", 1, "--final-eval-rounds", 1, "--expand-every", 100,
                 "--expand-size", 64, "--batch-size", 32, "--model-batch-size", 32, "--horizon", 3,
                 *nested("world-model-settings", TINY_WORLD_MODEL), *nested("pretrain-settings", TINY_PRETRAIN)]
    sweep_dir = tmp_path / "sweep"
    p = run([ROOT / "scripts" / "sweep.py", "submit", "--envs", *ENVS, "--num-seeds", SEEDS, "--seed", 0,
             "--sweep-dir", sweep_dir, "--executor", "local", "--cpus-per-job", 1, "--", *leq_flags], tmp_path, timeout=1800)
    assert p.stdout.count("submitted") == 4
    p = run([ROOT / "scripts" / "sweep.py", "collect", "--sweep-dir", sweep_dir, "--resamples", 1000], tmp_path)
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["env"], r["cell"]) for r in rows) == sorted(
        (env, cell) for env in ENVS for cell in CELLS)
    for r in rows:  # each cell: both seeds done, the mean and interval of their final scores
        scores = [json.loads((sweep_dir / r["env"] / r["cell"] / f"seed_{k}" / "final_eval.json").read_text())["score"]
                  for k in range(SEEDS)]
        assert int(r["seeds_done"]) == SEEDS
        assert float(r["mean"]) == pytest.approx(np.mean(scores))
        assert min(scores) <= float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) <= max(scores)
    md = (sweep_dir / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and all(f"| {env} |" in "\n".join(md) for env in ENVS)
    assert (sweep_dir / "curves.png").stat().st_size > 1000
