"""Time per LEQ gradient step with N seeds in one program (leq.py --num-seeds N), at the paper's
AntMaze sizes with random parameters and data (as benchmarks/leq_step.py builds them).

    python benchmarks/many_seeds.py                  # N = 1, 2, 4, 8
    python benchmarks/many_seeds.py --seeds 1 2 --steps-per-call 5 --calls 2

For each N: the median ms per step of the vmapped chunk (K steps per jitted call, as leq.py runs
them), t(N)/t(1) and t(N)/(N t(1)) (below 1: one program with N seeds beats N processes one after
another). N = 1 is also timed through leq.py's plain (unvmapped) chunk, the default path. The
expansion is not timed (once per 5000 steps). Prints a markdown table and one JSON object.
"""

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from leq_utils import cli  # noqa: E402
import leq  # noqa: E402
from leq_utils import many_seeds  # noqa: E402
from leq_step import build, timed  # noqa: E402


@dataclasses.dataclass
class Args:
    seeds: tuple[int, ...] = (1, 2, 4, 8)
    """numbers of seeds N to time"""
    steps_per_call: int = 10
    """steps fused per jitted call"""
    calls: int = 3
    """timed calls after warm-up (the median is reported)"""
    dataset_size: int = 1_000_000
    """random dataset rows on device (shared by the seeds)"""
    start_rows: int = 250_000
    """rows of each seed's start-state pool (the expansion buffer; its size does not change a step's cost)"""


def time_chunk(call, st, k: int, calls: int) -> tuple:
    """(compile + first call s, median ms per step) of call(st, step0) -> (st, ...)."""
    t = time.perf_counter()
    holder = {"st": jax.block_until_ready(call(st, 0)[0]), "step": k}
    compile_s = time.perf_counter() - t

    def once():
        holder["st"], metrics, *_ = call(holder["st"], holder["step"])
        holder["step"] += k
        return metrics
    return compile_s, 1000 * timed(once, calls) / k


def main(a: Args):
    task, args, data, wm, nets, st, done_fn, actor_opt, critic_opt = build("adjoint", a.dataset_size)
    starts = data.observations[:a.start_rows]
    key, k = jax.random.PRNGKey(3), a.steps_per_call
    rows = []

    plain = leq.make_train_chunk(leq.make_update(nets, wm, done_fn, actor_opt, critic_opt, args), args)
    compile_s, ms = time_chunk(lambda s, step: plain(s, data, starts, starts.shape[0], key, step, k),
                               jax.tree.map(jnp.copy, st), k, a.calls)
    rows.append(dict(n="1 (plain)", ms_per_step=ms, compile_s=compile_s))
    t1 = ms
    seed = many_seeds.Seed(None, wm, done_fn, nets, st, key, key, {})
    for n in a.seeds:
        train_chunk, _ = many_seeds.make_many(nets, wm, done_fn, actor_opt, critic_opt, args)
        models = many_seeds.seed_models([seed] * n)
        keys = jax.random.split(key, n)
        pool, filled = jnp.stack([starts] * n), jnp.full(n, starts.shape[0])
        compile_s, ms = time_chunk(lambda s, step: train_chunk(s, models, data, pool, filled, keys, step, k),
                                   many_seeds.stack([st] * n), k, a.calls)
        rows.append(dict(n=n, ms_per_step=ms, compile_s=compile_s, ratio=ms / t1, per_seed=ms / (n * t1)))

    print("| N | ms per step | t(N)/t(1) | t(N)/(N t(1)) | compile + first call, s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['ms_per_step']:.1f} | {r.get('ratio', 1.0):.2f} | {r.get('per_seed', 1.0):.2f} | "
              f"{r['compile_s']:.1f} |")
    print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, "cpu_count": os.cpu_count(),
                      "sizes": "obs 29, act 8, 7x4x200 ensemble (5 elites), actor/critic 3x256, B 256+256, H 10",
                      "steps_per_call": k, "calls": a.calls, "rows": rows}, indent=2))


if __name__ == "__main__":
    import tyro
    cli.use_fast_cpu_kernels()  # as the stages do (docs/PERFORMANCE.md)
    main(tyro.cli(Args))
