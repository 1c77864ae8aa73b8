"""Speed of one LEQ gradient step at the paper's sizes, with random parameters and data.

    python benchmarks/leq_step.py              # adjoint (default) and Jacobian action gradients
    python benchmarks/leq_step.py --quick      # fewer repetitions
    python benchmarks/leq_step.py --no-jacobian --out step.json   # the default path only, JSON also to a file

AntMaze dims (obs 29, action 8), 7 x 4 x 200 ensemble with 5 elites, actor/critic 3 x 256,
batch 256 + 256, H = 10, expansion of 50000 x 5. Prints one JSON object: compile time, median
ms per full step (K steps per call, as leq.py runs them), ms for the actor and critic parts,
the expansion time, steps/s, device and jax version, for both ways of computing dG_t/da_t.
The size flags (--horizon, --batch-size, --hidden, --model-hidden, --expand-size, --dataset-size)
shrink the problem for a quick run on a CPU (benchmarks/gpu_check.sh --cpu); their defaults are
the paper's sizes. `compile_s` is JAX's own trace + lowering + XLA compile time of the first
call; `compiles_while_timed` counts XLA compilations during the timed calls (0 unless a shape or
a static argument changes between calls).
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

import leq  # noqa: E402
import pretrain  # noqa: E402
from leq_utils import tasks  # noqa: E402
import world_model  # noqa: E402


@dataclasses.dataclass
class Args:
    quick: bool = False
    """fewer repetitions (a rough number in about a minute)"""
    steps_per_call: int = 100
    """steps fused per jitted call (leq.py uses up to 1000; 100 is enough to amortise dispatch)"""
    calls: int = 5
    """timed calls after warm-up (the median is reported)"""
    dataset_size: int = 1_000_000
    """random dataset rows on device"""
    jacobian: bool = True
    """also time the release's full-Jacobian action gradients"""
    out: Optional[str] = None
    """also write the JSON object to this file, rewritten after each measurement (a run stopped by a
    time limit leaves what it had measured)"""
    # --- Sizes (defaults: the paper's AntMaze sizes) ---
    horizon: int = 10
    """imagination length H"""
    batch_size: int = 256
    """dataset batch B_D and imagination batch B_M"""
    hidden: int = 256
    """width of the actor's and the critic's 3 hidden layers"""
    model_hidden: int = 200
    """width of the world model's 4 hidden layers (7 members, 5 elites kept)"""
    expand_size: int = 50_000
    """dataset states rolled out (5 steps) per expansion"""


PAPER_SIZES = dict(horizon=10, batch_size=256, hidden=256, model_hidden=200, expand_size=50_000)


def sizes_of(a) -> dict:
    """The size flags of an Args (this file's or benchmarks/many_seeds.py's)."""
    return {k: getattr(a, k) for k in PAPER_SIZES}


def describe(sizes: dict) -> str:
    s = {**PAPER_SIZES, **sizes}
    return (f"obs 29, act 8, 7x4x{s['model_hidden']} ensemble (5 elites), actor/critic 3x{s['hidden']}, "
            f"B {s['batch_size']}+{s['batch_size']}, H {s['horizon']}, expansion {s['expand_size']}x5"
            + ("" if s == PAPER_SIZES else " (NOT the paper's sizes)"))


class CompileClock:
    """JAX's own compile-time events (trace, lowering to MLIR, XLA compile), summed since `reset`."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    seconds, compiles = 0.0, 0
    _registered = False

    @classmethod
    def reset(cls):
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._on_event)
            cls._registered = True
        cls.seconds, cls.compiles = 0.0, 0

    @classmethod
    def _on_event(cls, event, duration, **kwargs):
        if event in cls.EVENTS:
            cls.seconds += duration
            cls.compiles += event == cls.EVENTS[2]


def write_json(path: Optional[str], obj) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)


def build(action_grad: str, dataset_size: int, horizon: int = 10, batch_size: int = 256, hidden: int = 256,
          model_hidden: int = 200, expand_size: int = 50_000):
    task = tasks.get_task("antmaze-large-diverse-v2")  # obs 29, action 8
    args = leq.resolve(leq.Args(env=task.name, action_grad=action_grad, horizon=horizon, batch_size=batch_size,
                                model_batch_size=batch_size, expand_size=expand_size))
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(dataset_size, task.obs_dim)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(dataset_size, task.act_dim)).astype(np.float32)
    data = tasks.Transitions(*(jnp.asarray(x) for x in (obs, act, rng.normal(size=dataset_size).astype(np.float32),
                                                        obs + 0.01, np.ones(dataset_size, np.float32))))
    wm_args = world_model.Args(hidden_dims=(model_hidden,) * 4)
    params = world_model.init_ensemble(jax.random.PRNGKey(1), task.obs_dim + task.act_dim,
                                       task.obs_dim + 1, wm_args.hidden_dims, wm_args.ensemble_size)
    for e in range(wm_args.num_elites, wm_args.ensemble_size):  # keep 5 elites, as loaded for LEQ
        del params[f"member_{e}"]
    stats = (jnp.zeros(task.obs_dim + task.act_dim), jnp.ones(task.obs_dim + task.act_dim))
    wm = world_model.WorldModel(params, *stats, 1.0, -1.0)
    nets = pretrain.make_nets(task, (hidden,) * 3, stats)
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(2), task.obs_dim, task.act_dim)
    actor_opt = optax.adam(optax.cosine_decay_schedule(args.actor_lr, args.total_steps))
    critic_opt = optax.adam(args.critic_lr)
    st = leq.LEQState(actor, critic, jax.tree.map(jnp.copy, critic), actor_opt.init(actor),
                      critic_opt.init(critic))
    done_fn = tasks.termination_fn(task)
    return task, args, data, wm, nets, st, done_fn, actor_opt, critic_opt


def timed(fn, calls):
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(action_grad: str, a: Args, k: int, calls: int, out: dict, save=lambda: None) -> dict:
    """Fills `out` (calling `save` after each measurement) and returns it."""
    task, args, data, wm, nets, st, done_fn, actor_opt, critic_opt = build(action_grad, a.dataset_size, **sizes_of(a))
    update = leq.make_update(nets, wm, done_fn, actor_opt, critic_opt, args)
    train_chunk = leq.make_train_chunk(update)
    starts = data.observations[:1_250_000]
    key = jax.random.PRNGKey(3)

    CompileClock.reset()
    t = time.perf_counter()
    state, metrics, _, _ = train_chunk(st, data, starts, starts.shape[0], key, 0, k)
    jax.block_until_ready(state)
    out["compile_and_first_call_s"] = time.perf_counter() - t
    out["compile_s"] = CompileClock.seconds
    holder = {"st": state, "step": k}
    CompileClock.reset()

    def full():
        holder["st"], m, _, _ = train_chunk(holder["st"], data, starts, starts.shape[0], key, holder["step"], k)
        holder["step"] += k
        return m
    out["step_ms"] = 1000 * timed(full, calls) / k
    out["steps_per_s"] = 1000 / out["step_ms"]
    out["compiles_while_timed"] = CompileClock.compiles
    out["timed_steps_per_call"], out["timed_calls"] = k, calls
    save()

    # the two halves of a step, each K times in a scan
    actor_grads = leq.make_actor_grads(nets, wm, done_fn, args)
    critic_grads = leq.make_critic_grads(nets, wm, done_fn, args)
    s0 = data.observations[:args.model_batch_size]
    batch = tasks.Transitions(*(x[:args.batch_size] for x in data))

    @jax.jit
    def actor_part(st, keys):
        return jax.lax.scan(lambda c, kk: (c, actor_grads(st, s0, kk)[0]), 0, keys)[1]

    @jax.jit
    def critic_part(st, keys):
        return jax.lax.scan(lambda c, kk: (c, critic_grads(st, batch, s0, kk)[0]), 0, keys)[1]

    keys = jax.random.split(key, k)
    st = holder["st"]
    for name, part in (("actor_ms", actor_part), ("critic_ms", critic_part)):
        jax.block_until_ready(part(st, keys))
        out[name] = 1000 * timed(lambda: part(st, keys), calls) / k
        save()

    # one dataset expansion of 50000 x 5
    expand = leq.make_expand(nets, wm, done_fn, args)
    buf = leq.empty_buffer(args.expand_retain * args.expand_size * args.expand_length, task.obs_dim, task.act_dim)
    buf = expand(buf, st.actor, data.observations, key)
    jax.block_until_ready(buf)
    holder["buf"] = buf

    def one_expansion():
        holder["buf"] = expand(holder["buf"], st.actor, data.observations, key)
        return holder["buf"].filled
    out["expansion_s"] = timed(one_expansion, max(3, calls // 2))
    save()
    return out


def main(a: Args):
    if a.quick:
        a = dataclasses.replace(a, calls=3, steps_per_call=50)
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cpu_count": os.cpu_count(),
              "sizes": describe(sizes_of(a)), "dataset_size": a.dataset_size,
              "steps_per_call": a.steps_per_call, "adjoint": {}}
    save = lambda: write_json(a.out, result)  # noqa: E731
    bench("adjoint", a, a.steps_per_call, a.calls, result["adjoint"], save)
    if a.jacobian:  # slower: fewer steps per timed call
        result["jacobian"] = {}
        bench("jacobian", a, max(a.steps_per_call // 10, 5), max(a.calls // 2, 3), result["jacobian"], save)
        result["jacobian_over_adjoint"] = {k: result["jacobian"][k] / result["adjoint"][k]
                                           for k in ("step_ms", "actor_ms")}
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
