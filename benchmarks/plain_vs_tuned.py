"""What each hand-written derivative and CPU trick buys: plain JAX against the tuned forms, in one process.

    nice -n 5 python benchmarks/plain_vs_tuned.py               # both workloads, 9 rounds
    nice -n 5 python benchmarks/plain_vs_tuned.py --part epoch  # the world-model minibatches only
    python benchmarks/plain_vs_tuned.py --base "module (after)" --variants "all plain" "kept -picked"
                                        # the code as it is against plain JAX only (what gpu_check.sh runs)

The eight tricks this code carried until commit bda72a6 are re-implemented here ("tuned"), next to
their plain JAX forms ("plain"):

    layer_norm  the critic's LayerNorm with a hand-written VJP      (plain: flax.linen.LayerNorm)
    swish       the world model's swish with a hand-written VJP     (plain: jax.nn.swish, autodiff)
    softplus    softplus without log1p, custom JVP                  (plain: jax.nn.softplus)
    ens_fwd     ensemble forward as a Python loop over the members  (plain: jax.vmap over stacked members)
    ens_loss    ensemble NLL summed one member at a time            (plain: one batched forward, then the sum)
    decay_grad  the weight decay's gradient wd W added by hand      (plain: autodiff of 0.5 wd sum(W^2))
    picked      each elite computed only on the rows that drew it   (plain: every elite on every row, then pick)
    xla_flag    --xla_cpu_experimental_ynn_fusion_type= (Eigen)    (plain: XLA's default CPU fusions)

Each variant sets every trick to tuned or plain, is compiled once (AOT, with the XLA flag given as
a per-compilation option, so one process holds both), and then all variants are timed in turns
(each round every variant once, in a new random order), so that a shared machine's drift falls on
all of them alike. Each reports its median wall and process CPU time (both cores: the work,
which other processes' load changes much less than the wall time) per step, and the median over
rounds of its ratio to "all tuned" in the same round. The variants: all tuned (the code before),
all plain, every trick plain alone with the rest tuned ("-trick": what it buys on top of the
others), then the tricks the code keeps alone with the rest plain ("kept"), each of them plain on
top of that ("kept -trick": what it buys on top of plain JAX), "kept +xla_flag", and `module` (the
stage files as they are, unpatched: the code after, which should time as "kept").

Workloads, at the paper's AntMaze sizes (obs 29, action 8, 7 x 4 x 200 ensemble, 5 elites, actor
and critic 3 x 256, B 256 + 256, H = 10), random parameters and data (1M rows):
- `leq`: ms per LEQ step, leq.py's own jitted chunk of --leq-steps steps per call;
- `epoch`: ms per world-model minibatch (all 7 members, Adam, weight decay), --epoch-minibatches
  per call in a lax.scan as world_model.py's epoch runs them; a 1M-transition epoch is 3906 of
  them (the host-side shuffle and the 1000-row holdout pass, the same for every variant, are left out).
Tricks off a workload's path are not varied there (e.g. picked in `epoch`). Prints a table and
one JSON line. Compiling the LEQ variants takes most of a run (20-100 s each on a 2-core CPU); with
JAX_COMPILATION_CACHE_DIR=<folder> a second run loads them from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import leq  # noqa: E402
import pretrain  # noqa: E402
import world_model  # noqa: E402
from leq_utils import tasks  # noqa: E402
from leq_step import write_json  # noqa: E402  (benchmarks/leq_step.py)

TRICKS = ("layer_norm", "swish", "softplus", "ens_fwd", "ens_loss", "decay_grad", "picked", "xla_flag")
ON_PATH = {"leq": ("layer_norm", "swish", "softplus", "ens_fwd", "picked", "xla_flag"),
           "epoch": ("swish", "softplus", "ens_fwd", "ens_loss", "decay_grad", "xla_flag")}
XLA_FLAG = {"xla_cpu_experimental_ynn_fusion_type": ""}
EPOCH_MINIBATCHES = 1_000_000 // 256
# The paper's AntMaze sizes; `--small` replaces them (see `use_small_sizes`).
SIZES = dict(rows=1_000_000, leq={}, world_model={}, hidden=(256, 256, 256))


def use_small_sizes():
    SIZES.update(rows=5000, leq=dict(horizon=3, batch_size=32, model_batch_size=32),
                 world_model=dict(hidden_dims=(32, 32), weight_decay=(2.5e-5, 5e-5, 1e-4), batch_size=32),
                 hidden=(32, 32))


@dataclasses.dataclass
class Args:
    part: str = "both"
    """leq, epoch or both"""
    rounds: int = 9
    """timed calls of every variant, taken in turns (the median is reported)"""
    leq_steps: int = 10
    """LEQ steps per timed call"""
    epoch_minibatches: int = 50
    """world-model minibatches per timed call"""
    variants: tuple[str, ...] = ()
    """time only these variants (names as in the table; --base is always timed)"""
    module_xla_flag: bool = False
    """compile the `module` variant with the XLA flag (set when the stage scripts still set it)"""
    base: str = "all tuned (before)"
    """the variant every ratio is taken against (always timed); benchmarks/gpu_check.sh uses
    "module (after)", the stage files as they are"""
    small: bool = False
    """tiny sizes (hidden 32, horizon 3, batches of 32, 5000 rows): a check that the script runs
    (gpu_check.sh --cpu); its figures say nothing"""
    out: Optional[str] = None
    """also write the JSON object to this file, again after each workload"""


# ============================================================================================
# The tuned forms (as the code had them until commit bda72a6)
# ============================================================================================

@jax.custom_vjp
def swish_tuned(x):
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    s = jax.nn.sigmoid(x)
    return x * s, (x, s)


def _swish_bwd(residuals, g):
    x, s = residuals
    return (g * s * (1.0 + x * (1.0 - s)),)


swish_tuned.defvjp(_swish_fwd, _swish_bwd)


@jax.custom_jvp
def softplus_tuned(x):
    return jnp.maximum(x, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


softplus_tuned.defjvps(lambda g, ans, x: g * jax.nn.sigmoid(x))


@jax.custom_vjp
def layer_norm_tuned(x, scale, bias):
    return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_fwd(x, scale, bias):
    centred = x - x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + 1e-6)
    normed = centred * rstd
    return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(residuals, g):
    normed, rstd, scale = residuals
    g_normed = g * scale
    g_x = rstd * (g_normed - g_normed.mean(-1, keepdims=True)
                  - normed * (g_normed * normed).mean(-1, keepdims=True))
    batch_axes = tuple(range(g.ndim - 1))
    return g_x, (g * normed).sum(batch_axes), g.sum(batch_axes)


layer_norm_tuned.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNormTuned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return layer_norm_tuned(x, scale, bias)


# ============================================================================================
# One variant: every world-model and critic function built from the chosen forms
# ============================================================================================

def members(params):
    return [params[f"member_{e}"] for e in range(sum(k.startswith("member_") for k in params))]


class Variant:
    """The functions of one setting of the tricks (`tuned`: the set of tricks in their tuned form)."""

    def __init__(self, tuned: frozenset):
        self.tuned = tuned
        self.swish = swish_tuned if "swish" in tuned else jax.nn.swish
        self.softplus = softplus_tuned if "softplus" in tuned else jax.nn.softplus
        self.compiler_options = XLA_FLAG if "xla_flag" in tuned else None
        tuned_ln = "layer_norm" in tuned

        class Critic(nn.Module):  # pretrain.Critic, with the chosen LayerNorm (same parameter names)
            hidden_dims: Sequence[int] = (256, 256, 256)

            @nn.compact
            def __call__(self, s, a, stats):
                mean, std = stats
                x = pretrain.symlog((jnp.concatenate([s, a], -1) - mean) / std)
                for i, h in enumerate(self.hidden_dims):
                    norm = LayerNormTuned(name=f"LayerNorm_{i}") if tuned_ln else nn.LayerNorm(epsilon=1e-6, name=f"LayerNorm_{i}")
                    x = nn.relu(norm(pretrain.dense(h)(x)))
                return pretrain.dense(1)(x)[..., 0]
        self.Critic = Critic

    def member_forward(self, member, x):
        n_layers = len(member)
        for i in range(n_layers):
            x = x @ member[f"layer_{i}"]["kernel"] + member[f"layer_{i}"]["bias"]
            if i < n_layers - 1:
                x = self.swish(x)
        return x

    def gaussian_head(self, params, out):
        mean, logvar = jnp.split(out, 2, axis=-1)
        hi, lo = params["max_logvar"], params["min_logvar"]
        logvar = hi - self.softplus(hi - logvar)
        return mean, lo + self.softplus(logvar - lo)

    def raw_ensemble(self, params, x):
        """(E, B, 2 out): every member on x (B, in) shared or (E, B, in) one batch per member."""
        if "ens_fwd" in self.tuned:
            return jnp.stack([self.member_forward(m, x if x.ndim == 2 else x[e]) for e, m in enumerate(members(params))])
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members(params))
        return jax.vmap(self.member_forward, in_axes=(0, None if x.ndim == 2 else 0))(stacked, x)

    def ensemble_forward(self, params, x):
        return self.gaussian_head(params, self.raw_ensemble(params, x))

    def ensemble_loss(self, params, x, y):
        if "ens_loss" in self.tuned:
            loss = 0.01 * jnp.sum(params["max_logvar"]) - 0.01 * jnp.sum(params["min_logvar"])
            for e, m in enumerate(members(params)):
                mean, logvar = self.gaussian_head(params, self.member_forward(m, x[e]))
                loss += jnp.mean((mean - y[e]) ** 2 * jnp.exp(-logvar)) + jnp.mean(logvar)
            return loss
        mean, logvar = self.ensemble_forward(params, x)
        nll = jnp.mean((mean - y) ** 2 * jnp.exp(-logvar), axis=(1, 2)) + jnp.mean(logvar, axis=(1, 2))
        return jnp.sum(nll) + 0.01 * jnp.sum(params["max_logvar"]) - 0.01 * jnp.sum(params["min_logvar"])

    def loss_grads(self, params, x, y, weight_decay):
        if "decay_grad" in self.tuned:
            loss, grads = jax.value_and_grad(self.ensemble_loss)(params, x, y)
            for e, m in enumerate(members(params)):
                for i, wd in enumerate(weight_decay):
                    g = grads[f"member_{e}"][f"layer_{i}"]
                    g["kernel"] = g["kernel"] + wd * m[f"layer_{i}"]["kernel"]
            return loss, grads

        def total(params):
            nll = self.ensemble_loss(params, x, y)
            decay = sum(0.5 * wd * jnp.sum(m[f"layer_{i}"]["kernel"] ** 2)
                        for m in members(params) for i, wd in enumerate(weight_decay))
            return nll + decay, nll
        (_, nll), grads = jax.value_and_grad(total, has_aux=True)(params)
        return nll, grads

    def picked_forward(self, params, x, member):
        """mean, logvar (N, out) of member[n] at row n."""
        if "picked" not in self.tuned:
            out = jnp.take_along_axis(self.raw_ensemble(params, x), member[None, :, None], axis=0)[0]
            return self.gaussian_head(params, out)
        n, n_members = x.shape[0], len(members(params))
        p = 1.0 / n_members
        capacity = min(n, math.ceil(n * p + 4 * math.sqrt(n * p * (1 - p))) + 1)
        counts = jax.nn.one_hot(member, n_members, dtype=jnp.int32).sum(0)

        def grouped(x):
            order = jnp.argsort(member, stable=True)
            earlier = jnp.arange(n_members)[None, :] < jnp.arange(n_members)[:, None]
            first = (earlier * counts).sum(1)
            rank = jnp.argsort(order) - first[member]
            blocks = [self.member_forward(m, x[order[jnp.minimum(first[e] + jnp.arange(capacity), n - 1)]])
                      for e, m in enumerate(members(params))]
            return jnp.concatenate(blocks)[member * capacity + rank]

        def everyone(x):
            outs = jnp.stack([self.member_forward(m, x) for m in members(params)])
            return jnp.take_along_axis(outs, member[None, :, None], axis=0)[0]

        return self.gaussian_head(params, jax.lax.cond(jnp.max(counts) <= capacity, grouped, everyone, x))

    def model_step_given(self, wm, s, a, member, eps, done_fn):
        x = (jnp.concatenate([s, a], -1) - wm.input_mean) / wm.input_std
        mu, logvar = self.picked_forward(wm.params, x.reshape(-1, x.shape[-1]), member.reshape(-1))
        sample = (mu + jnp.exp(0.5 * logvar) * eps.reshape(mu.shape)).reshape(*s.shape[:-1], -1)
        s2 = s + sample[..., :-1]
        r = wm.reward_scale * sample[..., -1] + wm.reward_shift
        done = jax.lax.stop_gradient(done_fn(s, a, s2))
        return s2, r, done

    @contextmanager
    def patched(self):
        """leq.py's imagination and expansion call model_step_given through these two names, and
        pretrain.make_nets builds pretrain.Critic: point them at this variant while it compiles."""
        saved = leq.model_step_given, world_model.model_step_given, pretrain.Critic
        leq.model_step_given = world_model.model_step_given = self.model_step_given
        pretrain.Critic = self.Critic
        try:
            yield
        finally:
            leq.model_step_given, world_model.model_step_given, pretrain.Critic = saved


# ============================================================================================
# The two workloads: build and compile one variant, return a zero-argument timed call
# ============================================================================================

def leq_data():
    n = SIZES["rows"]
    task = tasks.get_task("antmaze-large-diverse-v2")  # obs 29, action 8
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, task.obs_dim)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(n, task.act_dim)).astype(np.float32)
    data = tasks.Transitions(*(jnp.asarray(x) for x in (obs, act, rng.normal(size=n).astype(np.float32),
                                                        obs + 0.01, np.ones(n, np.float32))))
    return task, data


def build_leq(variant, task, data, k, module_flag):
    """leq.py's make_update + chunk at AntMaze sizes; `variant` None: the module as it is."""
    args = leq.resolve(leq.Args(env=task.name, **SIZES["leq"]))
    wm_args = world_model.Args(**SIZES["world_model"])
    params = world_model.init_ensemble(jax.random.PRNGKey(1), task.obs_dim + task.act_dim,
                                       task.obs_dim + 1, wm_args.hidden_dims, wm_args.ensemble_size)
    for e in range(wm_args.num_elites, wm_args.ensemble_size):  # 5 elites, as loaded for LEQ
        del params[f"member_{e}"]
    stats = (jnp.zeros(task.obs_dim + task.act_dim), jnp.ones(task.obs_dim + task.act_dim))
    wm = world_model.WorldModel(params, *stats, 1.0, -1.0)
    with variant.patched() if variant else nullcontext():
        nets = pretrain.make_nets(task, SIZES["hidden"], stats)
        actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(2), task.obs_dim, task.act_dim)
        actor_opt = optax.adam(optax.cosine_decay_schedule(args.actor_lr, args.total_steps))
        critic_opt = optax.adam(args.critic_lr)
        st = leq.LEQState(actor, critic, jax.tree.map(jnp.copy, critic), actor_opt.init(actor), critic_opt.init(critic))
        update = leq.make_update(nets, wm, tasks.termination_fn(task), actor_opt, critic_opt, args)
        options = variant.compiler_options if variant else (XLA_FLAG if module_flag else None)
        chunk = jax.jit(leq.chunk_of(update), static_argnums=6, donate_argnums=0, compiler_options=options)
        key = jax.random.PRNGKey(3)
        compiled = chunk.lower(st, data, data.observations, data.observations.shape[0], key, 0, k).compile()
    holder = {"st": st, "step": 0}

    def call():
        holder["st"], metrics, _, _ = compiled(holder["st"], data, data.observations, data.observations.shape[0],
                                               key, holder["step"])
        holder["step"] += k
        return metrics
    return call


def epoch_data(obs_dim=29, act_dim=8):
    n = SIZES["rows"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, obs_dim + act_dim)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(n, obs_dim + 1)).astype(np.float32))
    return x, y


def build_epoch(variant, x, y, minibatches, module_flag):
    """`minibatches` steps of world_model.py's epoch; `variant` None: world_model.make_epoch_fn itself."""
    args = world_model.Args(**SIZES["world_model"])
    params = world_model.init_ensemble(jax.random.PRNGKey(0), x.shape[1], y.shape[1], args.hidden_dims,
                                       args.ensemble_size)
    optimizer = optax.adam(args.lr)
    state = world_model.TrainState(params, optimizer.init(params), params,
                                   jnp.full(args.ensemble_size, 1e10, jnp.float32))
    if variant is None:
        epoch = jax.jit(world_model.make_epoch_fn(args, optimizer, x, y),
                        compiler_options=XLA_FLAG if module_flag else None)
    else:
        def sgd_step(carry, idx):  # as world_model.make_epoch_fn's
            params, opt_state = carry
            loss, grads = variant.loss_grads(params, x[idx], y[idx], args.weight_decay)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def run(state, shuffled_idx):
            n_batches = shuffled_idx.shape[1] // args.batch_size
            batches = shuffled_idx[:, :n_batches * args.batch_size].reshape(shuffled_idx.shape[0], n_batches, -1)
            (params, opt_state), losses = jax.lax.scan(sgd_step, (state.params, state.opt_state), batches.swapaxes(0, 1))
            return state._replace(params=params, opt_state=opt_state), losses.mean()
        epoch = jax.jit(run, compiler_options=variant.compiler_options)
    rng = np.random.default_rng(1)
    idx = [jnp.asarray(rng.integers(0, x.shape[0], (args.ensemble_size, minibatches * args.batch_size)), jnp.int32)
           for _ in range(2)]
    compiled = epoch.lower(state, idx[0]).compile()
    holder = {"st": state, "i": 0}

    def call():
        holder["st"], loss = compiled(holder["st"], idx[holder["i"] % 2])
        holder["i"] += 1
        return loss
    return call


# ============================================================================================
# Variants, turns, table
# ============================================================================================

KEPT = frozenset({"picked", "ens_fwd"})  # the tricks the stage files keep (docs/PERFORMANCE_PLAIN_JAX.md)


def variants_for(part):
    """all tuned, all plain, each trick on the workload's path plain alone ("-trick"); then the
    kept tricks alone with the rest plain ("kept", the code after), each kept trick plain on top of
    that ("kept -trick"), and "kept +xla_flag". "-ens_fwd" is not one of them: the tuned ens_loss
    and picked never call the ensemble forward, so it would change nothing."""
    all_tuned, on_path = frozenset(TRICKS), ON_PATH[part]
    out = {"all tuned (before)": all_tuned, "all plain": frozenset()}
    out.update({f"-{t}": all_tuned - {t} for t in on_path if t != "ens_fwd"})
    out["kept"] = KEPT
    # on each path one kept trick does the work: picked in `leq` (ens_fwd only in its fallback),
    # ens_fwd in `epoch`; plain, it leaves the other workload's code as "kept"
    out["kept -picked" if part == "leq" else "kept -ens_fwd"] = KEPT - {"picked" if part == "leq" else "ens_fwd"}
    out["kept +xla_flag"] = KEPT | {"xla_flag"}
    return out


def run_part(part, a: Args):
    names = {n: v for n, v in variants_for(part).items() if not a.variants or n in a.variants or n == a.base}
    with_module = not a.variants or "module (after)" in (*a.variants, a.base)
    t0 = time.perf_counter()
    if part == "leq":
        task, data = leq_data()
        calls = {n: build_leq(Variant(v), task, data, a.leq_steps, False) for n, v in names.items()}
        if with_module:
            calls["module (after)"] = build_leq(None, task, data, a.leq_steps, a.module_xla_flag)
        per_call = a.leq_steps
    else:
        x, y = epoch_data()
        calls = {n: build_epoch(Variant(v), x, y, a.epoch_minibatches, False) for n, v in names.items()}
        if with_module:
            calls["module (after)"] = build_epoch(None, x, y, a.epoch_minibatches, a.module_xla_flag)
        per_call = a.epoch_minibatches
    compile_s = time.perf_counter() - t0
    for call in calls.values():  # one untimed call each (first-run allocations)
        jax.block_until_ready(call())
    wall, cpu = {n: [] for n in calls}, {n: [] for n in calls}
    order = np.random.default_rng(0)
    for _ in range(a.rounds):
        for n in order.permutation(list(calls)):  # a new order each round: no variant always follows another
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(calls[n]())
            wall[n].append(1000 * (time.perf_counter() - t) / per_call)
            cpu[n].append(1000 * (time.process_time() - c) / per_call)
    return wall, cpu, compile_s


def summary(times, base_name="all tuned (before)"):
    """Per variant: the median ms, and the median over rounds of its time / the base variant's time
    in the same round (a round takes well under a minute, so a shared machine's load is much the
    same in it)."""
    base = times[base_name]
    return {n: {"ms": statistics.median(v), "min": min(v),
                "vs_base": statistics.median(x / b for x, b in zip(v, base))} for n, v in times.items()}


def table(part, wall, cpu, base):
    unit = "ms/step" if part == "leq" else "ms/minibatch"
    lines = [f"## {part} ({unit}, medians; vs {base}: median over rounds of the ratio to it in the same round)",
             f"| variant | wall {unit} | wall min | wall vs {base} | CPU {unit} (both cores) | CPU vs {base} |",
             "|---|---|---|---|---|---|"]
    for n in wall:
        lines.append(f"| {n} | {wall[n]['ms']:.2f} | {wall[n]['min']:.2f} | {100 * (wall[n]['vs_base'] - 1):+.1f}% "
                     f"| {cpu[n]['ms']:.2f} | {100 * (cpu[n]['vs_base'] - 1):+.1f}% |")
    return "\n".join(lines)


def main(a: Args):
    assert "ynn_fusion" not in os.environ.get("XLA_FLAGS", ""), "run without XLA_FLAGS: the flag is varied per variant"
    if a.small:
        use_small_sizes()
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cpu_count": os.cpu_count(),
              "load_avg_start": os.getloadavg(), "rounds": a.rounds, "base": a.base, "small": a.small}
    for part in (("leq", "epoch") if a.part == "both" else (a.part,)):
        wall, cpu, compile_s = run_part(part, a)
        sw, sc = summary(wall, a.base), summary(cpu, a.base)
        print(table(part, sw, sc, a.base), flush=True)
        if part == "epoch" and "module (after)" in sw and not a.small:
            print(f"(a 1M-transition epoch is {EPOCH_MINIBATCHES} minibatches: {a.base} "
                  f"{sw[a.base]['ms'] * EPOCH_MINIBATCHES / 1000:.0f} s, module "
                  f"{sw['module (after)']['ms'] * EPOCH_MINIBATCHES / 1000:.0f} s wall at this load)", flush=True)
        result[part] = {"wall": sw, "cpu": sc, "wall_all": wall, "cpu_all": cpu, "compile_s": compile_s}
        write_json(a.out, result)  # after each workload: a run stopped by a time limit keeps the first
    result["load_avg_end"] = os.getloadavg()
    write_json(a.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
