"""Time per LEQ gradient step with N seeds in one program (leq.py --num-seeds N), at the paper's
AntMaze sizes with random parameters and data (as benchmarks/leq_step.py builds them).

    python benchmarks/many_seeds.py                  # N = 1, 2, 4, 8
    python benchmarks/many_seeds.py --seeds 1 2 --steps-per-call 5 --calls 2
    python benchmarks/many_seeds.py --seeds 1 2 4 8 16 --no-plain --out seeds.json

For each N: the median ms per step of the vmapped chunk (K steps per jitted call, as leq.py runs
them), t(N)/t(1) and t(N)/(N t(1)) (below 1: one program with N seeds beats N processes one after
another). N = 1 is also timed through leq.py's plain (unvmapped) chunk, the default path. The
expansion is not timed (once per 5000 steps). Prints a markdown table and one JSON object.
With --no-plain, t(1) is the vmapped N = 1 (one compilation less). The size flags are
benchmarks/leq_step.py's (defaults: the paper's sizes); --out also writes the JSON to a file,
rewritten after each N (a run stopped by a time limit leaves the rows it had measured).
"""

import dataclasses
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import leq  # noqa: E402
from leq_utils import many_seeds  # noqa: E402
from leq_step import PAPER_SIZES, CompileClock, build, describe, sizes_of, timed, write_json  # noqa: E402


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
    plain: bool = True
    """also time N = 1 through leq.py's plain (unvmapped) chunk, and take it as t(1)"""
    out: Optional[str] = None
    """also write the JSON object to this file (rewritten after each N)"""
    # --- Sizes (defaults: the paper's AntMaze sizes; as benchmarks/leq_step.py) ---
    horizon: int = PAPER_SIZES["horizon"]
    """imagination length H"""
    batch_size: int = PAPER_SIZES["batch_size"]
    """dataset batch B_D and imagination batch B_M"""
    hidden: int = PAPER_SIZES["hidden"]
    """width of the actor's and the critic's 3 hidden layers"""
    model_hidden: int = PAPER_SIZES["model_hidden"]
    """width of the world model's 4 hidden layers"""
    expand_size: int = PAPER_SIZES["expand_size"]
    """dataset states per expansion (not timed here; sizes the buffer only through --start-rows)"""


def time_chunk(call, st, k: int, calls: int) -> tuple:
    """(compile + first call s, median ms per step) of call(st, step0) -> (st, ...)."""
    CompileClock.reset()
    t = time.perf_counter()
    holder = {"st": jax.block_until_ready(call(st, 0)[0]), "step": k}
    compile_s = time.perf_counter() - t

    def once():
        holder["st"], metrics, *_ = call(holder["st"], holder["step"])
        holder["step"] += k
        return metrics
    return compile_s, 1000 * timed(once, calls) / k


def main(a: Args):
    if not a.plain and a.seeds[:1] != (1,):
        raise SystemExit("--no-plain takes t(1) from the vmapped N = 1: make 1 the first of --seeds")
    task, args, data, wm, nets, st, done_fn, actor_opt, critic_opt = build("adjoint", a.dataset_size, **sizes_of(a))
    starts = data.observations[:a.start_rows]
    key, k = jax.random.PRNGKey(3), a.steps_per_call
    rows = []
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cpu_count": os.cpu_count(),
              "sizes": describe(sizes_of(a)), "dataset_size": a.dataset_size, "steps_per_call": k,
              "calls": a.calls, "rows": rows}

    t1 = None
    if a.plain:
        plain = leq.make_train_chunk(leq.make_update(nets, wm, done_fn, actor_opt, critic_opt, args))
        compile_s, ms = time_chunk(lambda s, step: plain(s, data, starts, starts.shape[0], key, step, k),
                                   jax.tree.map(jnp.copy, st), k, a.calls)
        rows.append(dict(n="1 (plain)", ms_per_step=ms, compile_s=compile_s))
        t1 = ms
        write_json(a.out, result)
    seed = many_seeds.Seed(None, wm, done_fn, nets, st, key, key, {})
    for n in a.seeds:
        train_chunk, _ = many_seeds.make_many(leq, nets, wm, done_fn, actor_opt, critic_opt, args)
        models = many_seeds.seed_models([seed] * n)
        keys = jax.random.split(key, n)
        pool, filled = jnp.stack([starts] * n), jnp.full(n, starts.shape[0])
        compile_s, ms = time_chunk(lambda s, step: train_chunk(s, models, data, pool, filled, keys, step, k),
                                   many_seeds.stack([st] * n), k, a.calls)
        t1 = ms if t1 is None else t1  # --no-plain: the vmapped N = 1
        rows.append(dict(n=n, ms_per_step=ms, compile_s=compile_s, ratio=ms / t1, per_seed=ms / (n * t1)))
        write_json(a.out, result)

    print("| N | ms per step | t(N)/t(1) | t(N)/(N t(1)) | compile + first call, s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['ms_per_step']:.1f} | {r.get('ratio', 1.0):.2f} | {r.get('per_seed', 1.0):.2f} | "
              f"{r['compile_s']:.1f} |")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
