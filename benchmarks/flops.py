"""FLOPs of one LEQ gradient step at the paper's sizes, from XLA's cost analysis, for the GPU
projection in docs/PERFORMANCE.md (a count of the compiled program, not a timing).

    python benchmarks/flops.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

import leq  # noqa: E402
from leq_step import build  # noqa: E402  (random LEQ state at paper sizes)


def gflop(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"] / 1e9


def main():
    out = {}
    for action_grad in ("adjoint", "jacobian"):
        task, args, data, wm, nets, st, done_fn, actor_opt, critic_opt = build(action_grad, 10_000)
        update = leq.make_update(nets, wm, done_fn, actor_opt, critic_opt, args)
        actor_grads = leq.make_actor_grads(nets, wm, done_fn, args)
        key, starts = jax.random.PRNGKey(0), data.observations
        out[action_grad] = {
            "step_gflop": gflop(update, st, data, starts, starts.shape[0], key),
            "actor_gflop": gflop(lambda s, k: actor_grads(s, starts[:args.model_batch_size], k)[0], st, key)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    import tyro
    tyro.cli(main, description=__doc__)  # no flags; --help prints the docstring
