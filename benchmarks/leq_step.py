"""Speed of one LEQ gradient step at the paper's sizes, with random parameters and data.

    python benchmarks/leq_step.py              # adjoint (default) and Jacobian action gradients
    python benchmarks/leq_step.py --quick      # fewer repetitions

AntMaze dims (obs 29, action 8), 7 x 4 x 200 ensemble with 5 elites, actor/critic 3 x 256,
batch 256 + 256, H = 10, expansion of 50000 x 5. Prints one JSON object: compile time, median
ms per full step (K steps per call, as leq.py runs them), ms for the actor and critic parts,
the expansion time, steps/s, device and jax version, for both ways of computing dG_t/da_t.
"""

import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from leq_utils import cli  # noqa: E402
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


def build(action_grad: str, dataset_size: int):
    task = tasks.get_task("antmaze-large-diverse-v2")  # obs 29, action 8
    args = leq.resolve(leq.Args(env=task.name, action_grad=action_grad))
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(dataset_size, task.obs_dim)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(dataset_size, task.act_dim)).astype(np.float32)
    data = tasks.Transitions(*(jnp.asarray(x) for x in (obs, act, rng.normal(size=dataset_size).astype(np.float32),
                                                        obs + 0.01, np.ones(dataset_size, np.float32))))
    wm_args = world_model.Args()
    params = world_model.init_ensemble(jax.random.PRNGKey(1), task.obs_dim + task.act_dim,
                                       task.obs_dim + 1, wm_args.hidden_dims, wm_args.ensemble_size)
    for e in range(wm_args.num_elites, wm_args.ensemble_size):  # keep 5 elites, as loaded for LEQ
        del params[f"member_{e}"]
    stats = (jnp.zeros(task.obs_dim + task.act_dim), jnp.ones(task.obs_dim + task.act_dim))
    wm = world_model.WorldModel(params, *stats, 1.0, -1.0)
    nets = pretrain.make_nets(task, (256, 256, 256), stats)
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


def bench(action_grad: str, a: Args, k: int, calls: int) -> dict:
    task, args, data, wm, nets, st, done_fn, actor_opt, critic_opt = build(action_grad, a.dataset_size)
    update = leq.make_update(nets, wm, done_fn, actor_opt, critic_opt, args)
    train_chunk = leq.make_train_chunk(update, args)
    starts = data.observations[:1_250_000]
    key = jax.random.PRNGKey(3)
    out = {}

    t = time.perf_counter()
    state, metrics, _, _ = train_chunk(st, data, starts, starts.shape[0], key, 0, k)
    jax.block_until_ready(state)
    out["compile_and_first_call_s"] = time.perf_counter() - t
    holder = {"st": state, "step": k}

    def full():
        holder["st"], m, _, _ = train_chunk(holder["st"], data, starts, starts.shape[0], key, holder["step"], k)
        holder["step"] += k
        return m
    out["step_ms"] = 1000 * timed(full, calls) / k
    out["steps_per_s"] = 1000 / out["step_ms"]

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
    out["timed_steps_per_call"], out["timed_calls"] = k, calls
    return out


def main(a: Args):
    if a.quick:
        a = dataclasses.replace(a, calls=3, steps_per_call=50)
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cpu_count": os.cpu_count(),
              "sizes": "obs 29, act 8, 7x4x200 ensemble (5 elites), actor/critic 3x256, B 256+256, H 10",
              "steps_per_call": a.steps_per_call, "adjoint": bench("adjoint", a, a.steps_per_call, a.calls)}
    if a.jacobian:  # slower: fewer steps per timed call
        result["jacobian"] = bench("jacobian", a, max(a.steps_per_call // 10, 5), max(a.calls // 2, 3))
        result["jacobian_over_adjoint"] = {k: result["jacobian"][k] / result["adjoint"][k]
                                           for k in ("step_ms", "actor_ms")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    import tyro
    cli.use_fast_cpu_kernels()  # as the stages do (docs/PERFORMANCE.md)
    main(tyro.cli(Args))
