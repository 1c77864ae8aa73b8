"""Seconds per world-model training epoch over 1M synthetic transitions at the paper's sizes.

    python benchmarks/world_model_epoch.py            # obs 29, action 8, 7 x 4 x 200, batch 256

Runs world_model.py's own epoch (the host-side shuffle, then the jitted scan over minibatches of all
7 bootstrap members with Adam and weight decay) on random data, once to compile and then `--epochs`
more times, and prints the median as JSON (`--out FILE`: also to a file). `compile_s` is JAX's own
trace + lowering + XLA compile time of the first epoch.
"""

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import world_model  # noqa: E402
from leq_step import CompileClock, write_json  # noqa: E402


@dataclasses.dataclass
class Args:
    transitions: int = 1_000_000
    """training transitions per epoch"""
    obs_dim: int = 29
    """observation size (AntMaze)"""
    act_dim: int = 8
    """action size (AntMaze)"""
    epochs: int = 3
    """timed epochs after the first (compiling) one"""
    out: Optional[str] = None
    """also write the JSON object to this file"""


def main(a: Args):
    args = world_model.Args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.transitions, a.obs_dim + a.act_dim)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(a.transitions, a.obs_dim + 1)).astype(np.float32))
    params = world_model.init_ensemble(jax.random.PRNGKey(0), a.obs_dim + a.act_dim, a.obs_dim + 1,
                                       args.hidden_dims, args.ensemble_size)
    optimizer = optax.adam(args.lr)
    state = world_model.TrainState(params, optimizer.init(params), params,
                                   jnp.full(args.ensemble_size, 1e10, jnp.float32))
    boot = rng.integers(0, a.transitions, (args.ensemble_size, a.transitions)).astype(np.int32)
    epoch = world_model.make_epoch_fn(args, optimizer, x, y)
    CompileClock.reset()
    t = time.perf_counter()
    state, loss = epoch(state, world_model.shuffle_bootstrap(boot, 0, 0))
    loss.block_until_ready()
    first = time.perf_counter() - t
    compile_s = CompileClock.seconds
    times = []
    for i in range(a.epochs):
        t = time.perf_counter()  # an epoch as world_model.py runs it: shuffle on the host, then the jitted scan
        state, loss = epoch(state, world_model.shuffle_bootstrap(boot, 0, i + 1))
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "transitions": a.transitions,
              "sizes": f"obs {a.obs_dim}, act {a.act_dim}, {args.ensemble_size} x {args.hidden_dims}, "
                       f"batch {args.batch_size} per member",
              "first_epoch_s (with compile)": round(first, 2), "compile_s": round(compile_s, 2),
              "epoch_s": round(statistics.median(times), 3),
              "epoch_s_all": [round(t, 3) for t in times]}
    write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
