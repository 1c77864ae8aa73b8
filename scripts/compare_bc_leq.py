"""The learning result: LEQ's final success against the BC actor it starts from, over seeds.

    python scripts/compare_bc_leq.py --env pointmaze-umaze --seeds 0 1 2
    python scripts/compare_bc_leq.py --env pointmaze-medium --seeds 0 --total-steps 30000

For each seed: runs leq.py (which runs the world model and pretraining first when their
artifacts are missing; a run folder that already holds leq.npz is reused, one with a
checkpoint resumes), evaluates the BC actor of pretrain.npz with the same protocol as LEQ's
final evaluation (10 x 10 episodes), and records the wall time of the leq.py call (with the
stages it ran first) when this call made the run (null for a reused one). Writes
<out>.json (per-seed and mean numbers) and <out>.png (LEQ's periodic success per seed against
steps, BC as dashed lines).
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import artifacts  # noqa: E402
import evaluate  # noqa: E402
import leq  # noqa: E402
import networks  # noqa: E402
import tasks  # noqa: E402


@dataclasses.dataclass
class Args:
    env: str = "pointmaze-umaze"
    """task name"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds (each one a full pipeline: world model, pretraining, LEQ)"""
    total_steps: Optional[int] = None
    """LEQ steps (default: leq.py's default for the task)"""
    expectile: Optional[float] = None
    """LEQ's tau (default: leq.py's default for the task)"""
    run_dir: str = "runs/{env}__leq__s{seed}"
    """LEQ run folder per seed (a format string with {env} and {seed})"""
    pretrain: str = "runs/{env}__pretrain__s{seed}/pretrain.npz"
    """pretrain.npz per seed (format string; made by leq.py when missing)"""
    world_model: str = "runs/{env}__world_model__s{seed}/world_model.npz"
    """world_model.npz per seed (format string; made by leq.py when missing)"""
    out: str = "docs/{env}_leq_vs_bc"
    """output stem for .json and .png (format string with {env})"""


def main(a: Args):
    task = tasks.get_task(a.env)
    results = []
    for seed in a.seeds:
        fmt = dict(env=a.env, seed=seed)
        run_dir = Path(a.run_dir.format(**fmt))
        pt_path, wm_path = a.pretrain.format(**fmt), a.world_model.format(**fmt)
        wall = None  # a reused run's time is not known here (None in the JSON, not a near-zero number)
        if not (run_dir / "leq.npz").exists():
            start = time.time()
            leq.train(leq.Args(env=a.env, seed=seed, run_dir=str(run_dir), total_steps=a.total_steps,
                               expectile=a.expectile, pretrain=None if not Path(pt_path).exists() else pt_path,
                               world_model=None if not Path(wm_path).exists() else wm_path))
            wall = time.time() - start
        config = json.loads((run_dir / "config.json").read_text())
        final = json.loads((run_dir / "final_eval.json").read_text())
        _, nets, bc_actor = networks.load_actor(config["pretrain"] or pt_path, task)
        bc = evaluate.paper_protocol(task, nets, bc_actor, config["final_eval_rounds"], config["eval_episodes"],
                                     config["seed"])
        rows = artifacts.read_metrics(run_dir / "metrics.jsonl")
        results.append(dict(
            seed=seed, run_dir=str(run_dir), steps=config["total_steps"], expectile=config["expectile"],
            leq_success=final["success"], leq_score=final["score"], leq_score_std=final["score_std"],
            bc_success=bc["success"], bc_score=bc["score"], bc_score_std=bc["score_std"],
            leq_length=final["length"], bc_length=bc["length"],
            wall_s_this_call=wall, curve=[(r["step"], r["success"]) for r in rows if "success" in r]))
        print(f"seed {seed}: LEQ success {final['success']:.2f} (score {final['score']:.1f} +- "
              f"{final['score_std']:.1f}), BC {bc['success']:.2f}; mean length LEQ {final['length']:.0f}, "
              f"BC {bc['length']:.0f}")
    summary = {"env": a.env, "seeds": list(a.seeds),
               "leq_success_mean": float(np.mean([r["leq_success"] for r in results])),
               "bc_success_mean": float(np.mean([r["bc_success"] for r in results])), "per_seed": results}
    out = Path(a.out.format(env=a.env))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    plot(summary, out.with_suffix(".png"))
    print(f"LEQ {summary['leq_success_mean']:.2f} vs BC {summary['bc_success_mean']:.2f} success over "
          f"{len(results)} seeds; wrote {out}.json and {out}.png")


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, r in enumerate(summary["per_seed"]):
        colour = f"C{i}"
        steps, success = zip(*([(0, r["bc_success"])] + r["curve"]))  # step 0 = the BC actor
        ax.plot(steps, 100 * np.asarray(success), marker="o", ms=3, color=colour, label=f"LEQ seed {r['seed']}")
        ax.axhline(100 * r["bc_success"], ls="--", color=colour, alpha=0.6, label=f"BC seed {r['seed']}")
    ax.set_xlabel("LEQ gradient step")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"{summary['env']}: LEQ vs the BC actor it starts from")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    tasks.run_script(main, Args)  # with an XLA CPU compiler option (deviation, README)
