"""Stage 2: behaviour cloning of the actor and fitted Q evaluation of its critic
(LEQ.md sections 4 and 5).

    python pretrain.py --env pointmaze-umaze

Reads the input statistics from `world_model.npz` (run world_model.py first), clones the
dataset's actions with a deterministic actor, evaluates that actor with FQE, and writes
`pretrain.npz` (actor, critic, EMA critic). leq.py starts from it and imports the networks
defined here.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tasks
import world_model

# Per-task defaults for the built-in tasks (D4RL tasks use the paper's 200k + 200k steps).
BUILTIN_STEPS = {"pointmaze-umaze": (20_000, 20_000), "pointmaze-medium": (30_000, 30_000),
                 "pointmaze-large": (40_000, 40_000), "pointmaze-ultra": (50_000, 50_000)}


@dataclasses.dataclass
class Args:
    # --- Experiment ---
    env: str = "pointmaze-umaze"
    """task name (see tasks.py / README for the supported names)"""
    dataset_path: Optional[str] = None
    """a D4RL-format HDF5 file to use instead of the task's own dataset"""
    data_dir: Optional[str] = None
    """folder of the built-in datasets (default: $LEQ_DATA_DIR or ./data)"""
    seed: int = 0
    """random seed (init, minibatches)"""
    world_model: Optional[str] = None
    """world_model.npz to take the input statistics from (default: runs/<env>__world_model__s<seed>/)"""
    out: Optional[str] = None
    """output file (default: runs/<env>__pretrain__s<seed>/pretrain.npz)"""
    # --- Networks ---
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the actor and the critic"""
    # --- Behaviour cloning ---
    bc_steps: Optional[int] = None
    """BC gradient steps (default: 200k for D4RL tasks as the paper; per-task for built-in tasks)"""
    bc_batch_size: int = 4096
    """BC minibatch size"""
    bc_lr: float = 3e-5
    """BC Adam learning rate (constant)"""
    # --- Fitted Q evaluation ---
    fqe_steps: Optional[int] = None
    """FQE gradient steps (default: 200k for D4RL tasks as the paper; per-task for built-in tasks)"""
    fqe_batch_size: int = 256
    """FQE minibatch size"""
    fqe_lr: float = 1e-4
    """FQE Adam learning rate"""
    gamma: float = 0.997
    """discount factor"""
    ema_decay: float = 0.995
    """decay of the critic's exponential moving average"""
    ema_weight: float = 1.0
    """weight of the EMA regulariser mean((Q - Q_ema)^2)"""
    # --- Plumbing ---
    chunk: int = 1000
    """gradient steps fused into one jitted call (lax.scan)"""
    checkpoint_every: int = 10_000
    """steps between checkpoints (<out>.ckpt.npz, removed when the stage finishes)"""
    resume: bool = True
    """continue from <out>.ckpt.npz if a previous run of the same config left one"""


def resolve(args: Args) -> Args:
    """Fill the per-task defaults."""
    bc, fqe = BUILTIN_STEPS.get(args.env, (200_000, 200_000))
    return dataclasses.replace(args, bc_steps=bc if args.bc_steps is None else args.bc_steps,
                               fqe_steps=fqe if args.fqe_steps is None else args.fqe_steps)


# ============================================================================================
# Networks (LEQ.md section 4); leq.py imports these
# ============================================================================================

ACTOR_LOG_STD = 0.0  # the release's state-independent log-std never gets a gradient: exactly 0


def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def dense(features):
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(np.sqrt(2)),
                    bias_init=nn.initializers.zeros)


LN_EPS = 1e-6  # as flax.linen.LayerNorm


@jax.custom_vjp
def layer_norm(x, scale, bias):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis: flax's LayerNorm, with a
    hand-written VJP (one fused pass each way instead of autodiff's many small operations, which
    is what costs time on a CPU; tests/ check it against flax.linen.LayerNorm)."""
    return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_fwd(x, scale, bias):
    centred = x - x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + LN_EPS)
    normed = centred * rstd
    return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(residuals, g):
    normed, rstd, scale = residuals
    g_normed = g * scale
    g_x = rstd * (g_normed - g_normed.mean(-1, keepdims=True)
                  - normed * (g_normed * normed).mean(-1, keepdims=True))
    batch_axes = tuple(range(g.ndim - 1))
    return g_x, (g * normed).sum(batch_axes), g.sum(batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """Same parameters (scale, bias) and function as flax.linen.LayerNorm; see `layer_norm`."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return layer_norm(x, scale, bias)


class Actor(nn.Module):
    """MLP, ReLU on every hidden layer, no LayerNorm; input symlog((s - mu_s) / std_s).
    Returns the pre-tanh mean; the deterministic action is tanh(mean)."""
    act_dim: int
    hidden_dims: Sequence[int] = (256, 256, 256)

    @nn.compact
    def __call__(self, s, stats):
        mean, std = stats  # statistics of [s, a] from the world model; the actor uses the s part
        x = symlog((s - mean[: s.shape[-1]]) / std[: s.shape[-1]])
        for h in self.hidden_dims:
            x = nn.relu(dense(h)(x))
        return dense(self.act_dim)(x)


class Critic(nn.Module):
    """[Dense, LayerNorm, ReLU] x 3 -> Dense(1); input symlog(((s, a) - mu) / std)."""
    hidden_dims: Sequence[int] = (256, 256, 256)

    @nn.compact
    def __call__(self, s, a, stats):
        mean, std = stats
        x = symlog((jnp.concatenate([s, a], -1) - mean) / std)
        for h in self.hidden_dims:
            x = nn.relu(LayerNorm()(dense(h)(x)))
        return dense(1)(x)[..., 0]


class Nets(NamedTuple):
    """The two networks as pure functions of (params, inputs); stats are constants of a run."""
    actor: Actor
    critic: Critic
    stats: tuple

    def pi(self, params, s):  # deterministic action tanh(mean)
        return jnp.tanh(self.actor.apply(params, s, self.stats))

    def q(self, params, s, a):
        return self.critic.apply(params, s, a, self.stats)


def make_nets(task: tasks.Task, hidden_dims, stats) -> Nets:
    return Nets(Actor(task.act_dim, tuple(hidden_dims)), Critic(tuple(hidden_dims)),
                (jnp.asarray(stats[0]), jnp.asarray(stats[1])))


def init_params(nets: Nets, key, obs_dim: int, act_dim: int):
    k_actor, k_critic = jax.random.split(key)
    s, a = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    return nets.actor.init(k_actor, s, nets.stats), nets.critic.init(k_critic, s, a, nets.stats)


# ============================================================================================
# Losses
# ============================================================================================

def bc_loss(actor_params, nets: Nets, s, a):
    """mean((tanh(mean(s)) - a)^2)."""
    return jnp.mean((nets.pi(actor_params, s) - a) ** 2)


def fqe_loss(critic_params, ema_params, actor_params, nets: Nets, batch, gamma, ema_weight):
    """y = r + gamma * mask * Q(s', pi(s')) with the CURRENT critic, no gradient through y;
    loss = mean((Q(s, a) - y)^2) + ema_weight * mean((Q(s, a) - Q_ema(s, a))^2)."""
    s, a, r, s2, mask = batch
    y = jax.lax.stop_gradient(r + gamma * mask * nets.q(critic_params, s2, nets.pi(actor_params, s2)))
    q = nets.q(critic_params, s, a)
    q_ema = nets.q(ema_params, s, a)
    return jnp.mean((q - y) ** 2) + ema_weight * jnp.mean((q - q_ema) ** 2)


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


# ============================================================================================
# Update steps: K steps per jitted call, batches sampled on device
# ============================================================================================

class PretrainState(NamedTuple):
    actor: dict
    actor_opt: optax.OptState
    critic: dict
    critic_ema: dict
    critic_opt: optax.OptState


def device_dataset(ds: tasks.Dataset):
    """Transitions on device with the task's reward transform applied and masks = 1 - terminals."""
    r = ds.reward_scale * ds.rewards + ds.reward_shift
    return tuple(jnp.asarray(x) for x in
                 (ds.observations, ds.actions, r, ds.next_observations, 1.0 - ds.terminals))


def sample(data, key, batch_size):
    idx = jax.random.randint(key, (batch_size,), 0, data[0].shape[0])
    return tuple(x[idx] for x in data)


def make_chunks(nets: Nets, bc_opt, fqe_opt, data, args: Args):
    """Two jitted functions (state, keys) -> (state, mean loss), one scan step per key."""
    def bc_step(st: PretrainState, key):
        s, a, *_ = sample(data, key, args.bc_batch_size)
        loss, grads = jax.value_and_grad(bc_loss)(st.actor, nets, s, a)
        updates, opt = bc_opt.update(grads, st.actor_opt, st.actor)
        return st._replace(actor=optax.apply_updates(st.actor, updates), actor_opt=opt), loss

    def fqe_step(st: PretrainState, key):
        batch = sample(data, key, args.fqe_batch_size)
        loss, grads = jax.value_and_grad(fqe_loss)(st.critic, st.critic_ema, st.actor, nets, batch,
                                                   args.gamma, args.ema_weight)
        updates, opt = fqe_opt.update(grads, st.critic_opt, st.critic)
        critic = optax.apply_updates(st.critic, updates)
        return st._replace(critic=critic, critic_ema=ema_update(st.critic_ema, critic, args.ema_decay),
                           critic_opt=opt), loss

    def chunk_of(step):
        @jax.jit
        def chunk(state, keys):
            state, losses = jax.lax.scan(step, state, keys)
            return state, losses.mean()
        return chunk
    return chunk_of(bc_step), chunk_of(fqe_step)


# ============================================================================================
# Artifact
# ============================================================================================

def default_path(env: str, seed: int) -> Path:
    return Path("runs") / f"{env}__pretrain__s{seed}" / "pretrain.npz"


def hidden_dims_of(actor_params) -> tuple:
    """The hidden sizes of a saved actor, read off its Dense kernels."""
    layers = actor_params["params"]
    names = sorted((k for k in layers if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    return tuple(int(layers[k]["kernel"].shape[1]) for k in names[:-1])


def load_pretrained(path, task: tasks.Task):
    """(nets, actor params, critic params, EMA critic params) from a pretrain.npz."""
    f = tasks.load_artifact(path, task, kinds=("pretrain",))
    actor, critic, ema = (jax.tree.map(jnp.asarray, tasks.unflatten(f, k))
                          for k in ("actor", "critic", "critic_ema"))
    nets = make_nets(task, hidden_dims_of(actor), (f["stats/mean"], f["stats/std"]))
    return nets, actor, critic, ema


def load_actor(path, task: Optional[tasks.Task] = None):
    """(task, nets, actor params) from ANY artifact holding an actor (pretrain.npz, leq.npz, a
    leq checkpoint); the task comes from the artifact when not given."""
    return actor_from_artifact(tasks.load_artifact(path, task, need="actor"), task)


def actor_from_artifact(f: dict, task: Optional[tasks.Task] = None):
    """load_actor for an artifact already read with tasks.load_artifact."""
    task = task or tasks.get_task(str(f["meta/env"]))
    actor = jax.tree.map(jnp.asarray, tasks.unflatten(f, "actor"))
    return task, make_nets(task, hidden_dims_of(actor), (f["stats/mean"], f["stats/std"])), actor


# ============================================================================================
# Main
# ============================================================================================

def train(args: Args) -> Path:
    from tqdm import tqdm
    args = resolve(args)
    if min(args.bc_steps, args.fqe_steps) < 0 or args.chunk < 1:
        raise tasks.InputError("--bc-steps/--fqe-steps must be >= 0 and --chunk >= 1")
    task = tasks.get_task(args.env)
    out = Path(args.out) if args.out else default_path(args.env, args.seed)
    ckpt = out.with_name(out.name.replace(".npz", "") + ".ckpt.npz")
    wm_path = Path(args.world_model or world_model.default_path(args.env, args.seed))
    if not wm_path.exists():
        raise tasks.InputError(f"world model {wm_path} does not exist: run world_model.py --env {args.env} "
                               f"first, or pass --world-model PATH")
    wm = world_model.load_world_model(wm_path, task)
    ds = tasks.load_dataset(task, args.dataset_path, args.data_dir)
    world_model.check_dataset(wm, wm_path, ds)
    data = device_dataset(ds)
    nets = make_nets(task, args.hidden_dims, (wm.input_mean, wm.input_std))
    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    actor, critic = init_params(nets, k_init, task.obs_dim, task.act_dim)
    bc_opt, fqe_opt = optax.adam(args.bc_lr), optax.adam(args.fqe_lr)
    state = PretrainState(actor, bc_opt.init(actor), critic, critic, fqe_opt.init(critic))
    step = 0
    if args.resume and ckpt.exists():  # a previous run of this config was interrupted
        f = tasks.load_artifact(ckpt, task, kinds=("pretrain_checkpoint",))
        tasks.check_same_config(ckpt, f["meta/config"], args, ignore=("resume", "out"))
        state, step = tasks.tree_from_arrays(state, f, "state"), int(f["progress/step"])
        print(f"[pretrain] resuming from {ckpt} at step {step}")
    bc_chunk, fqe_chunk = make_chunks(nets, bc_opt, fqe_opt, data, args)

    # BC for steps [0, bc_steps), then FQE of the cloned actor for [bc_steps, bc_steps + fqe_steps)
    total, start = args.bc_steps + args.fqe_steps, time.time()
    bar = tqdm(total=total, initial=step, desc=f"pretrain {args.env}", unit="step", mininterval=2)
    while step < total:
        phase, end = ("BC", args.bc_steps) if step < args.bc_steps else ("FQE", total)
        n = min(args.chunk, end - step)
        keys = jax.random.split(jax.random.fold_in(k_train, step), n)
        state, loss = (bc_chunk if phase == "BC" else fqe_chunk)(state, keys)
        step += n
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"{phase} loss is {float(loss)} at step {step}; the last "
                                     f"good checkpoint is {ckpt}")
        if step % args.checkpoint_every < n or step == total:
            arrays = {**tasks.tree_arrays(jax.device_get(state), "state"), "progress/step": np.array(step)}
            tasks.save_npz(ckpt, arrays, "pretrain_checkpoint", task, args)
        bar.update(n)
        bar.set_postfix_str(f"{phase} loss {float(loss):.4g}")
    bar.close()

    s = data[0][:4096]
    bc_mse = float(bc_loss(state.actor, nets, s, data[1][:4096]))
    q_data = float(jnp.mean(nets.q(state.critic, s, nets.pi(state.actor, s))))
    arrays = {**tasks.flatten(jax.device_get(state.actor), "actor"),
              **tasks.flatten(jax.device_get(state.critic), "critic"),
              **tasks.flatten(jax.device_get(state.critic_ema), "critic_ema"),
              "stats/mean": np.asarray(wm.input_mean), "stats/std": np.asarray(wm.input_std),
              "summary/bc_mse": np.array(bc_mse), "summary/q_data": np.array(q_data)}
    tasks.save_npz(out, arrays, "pretrain", task, args)
    ckpt.unlink(missing_ok=True)
    print(f"[pretrain] BC mse {bc_mse:.4f}, mean Q(s, pi(s)) on data {q_data:.2f}, "
          f"{time.time() - start:.0f} s; wrote {out}")
    return out


if __name__ == "__main__":
    import tyro
    try:
        train(tyro.cli(Args))
    except (tasks.InputError, FloatingPointError) as e:  # bad input, or a non-finite loss: one line
        sys.exit(f"error: {e}")
