"""Stage 2: behaviour cloning of the actor and fitted Q evaluation of its critic
(docs/ALGORITHM.md, section 4). The actor and the critic LEQ trains are defined here.

    python pretrain.py --env pointmaze-umaze

Reads the input statistics from `world_model.npz` (run world_model.py first), clones the
dataset's actions with a deterministic actor, evaluates that actor with FQE, and writes
`pretrain.npz` (actor, critic, EMA critic). leq.py starts from its actor and critic (its own EMA
critic starts as a copy of the critic; the saved EMA critic is not used) and imports the networks
defined here; evaluate.py runs the actor.

Reading order: Args -> networks (actor, critic) -> losses (BC, FQE) -> the update steps and their
lax.scan -> main. The artifact section and the `leq_utils` calls are plumbing (TRY NOT TO MODIFY).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import world_model
from leq_utils import artifacts, cli, tasks  # support package: data, artifacts, CLI (TRY NOT TO MODIFY)


# Per-task defaults for the built-in tasks; every other task (D4RL, OGBench, Minari) gets the paper's
# 200k + 200k steps.
BUILTIN_STEPS = {"pointmaze-umaze": (20_000, 20_000), "pointmaze-medium": (30_000, 30_000),
                 "pointmaze-large": (40_000, 40_000), "pointmaze-ultra": (50_000, 50_000)}


@dataclasses.dataclass
class Settings:
    """BC's and FQE's hyperparameters (leq.py takes them as --pretrain-settings.* for the
    pretraining it runs when no pretrain.npz exists)."""
    # --- Networks ---
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the actor and the critic"""
    # --- Behaviour cloning ---
    bc_steps: Annotated[Optional[int], tyro.conf.arg(help_behavior_hint="", help=tasks.per_task_help(
        "BC gradient steps", BUILTIN_STEPS, 0, "200,000 as the paper"))] = None
    bc_batch_size: int = 4096
    """BC minibatch size"""
    bc_lr: float = 3e-5
    """BC Adam learning rate (constant)"""
    # --- Fitted Q evaluation ---
    fqe_steps: Annotated[Optional[int], tyro.conf.arg(help_behavior_hint="", help=tasks.per_task_help(
        "FQE gradient steps", BUILTIN_STEPS, 1, "200,000 as the paper"))] = None
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


@dataclasses.dataclass
class Args(Settings, tasks.TaskArgs):
    # --env, --dataset-path, --data-dir, --seed (tasks.TaskArgs), the hyperparameters (Settings), then:
    # --- Experiment ---
    world_model: Optional[str] = None
    """world_model.npz to take the input statistics from (default: runs/<env>__world_model__s<seed>/)"""
    out: Optional[str] = None
    """output file (default: runs/<env>__pretrain__s<seed>/pretrain.npz)"""
    # --- Plumbing ---
    chunk: int = 1000
    """gradient steps fused into one jitted call (lax.scan)"""
    checkpoint_every: int = 10_000
    """steps between checkpoints (<out>.ckpt.npz, removed when the stage finishes)"""
    resume: bool = True
    """continue from <out>.ckpt.npz if a previous run of the same config left one"""
    overwrite: bool = False
    """replace an existing <out> (without it, an existing file is never replaced: another config's is
    refused, naming it; the same config's, made from the same inputs, is left as it is)"""


def resolve(args: Args) -> Args:
    """Fill the per-task defaults and check the flags before any work (one-line errors)."""
    tasks.check_task_args(args)
    bc, fqe = BUILTIN_STEPS.get(args.env, (200_000, 200_000))
    args = dataclasses.replace(args, bc_steps=bc if args.bc_steps is None else args.bc_steps,
                               fqe_steps=fqe if args.fqe_steps is None else args.fqe_steps)
    tasks.check_flags(args, (">= 1", "hidden_dims bc_steps fqe_steps bc_batch_size fqe_batch_size chunk checkpoint_every"),
                      (">= 0", "bc_lr fqe_lr ema_weight"), ("in (0, 1]", "gamma"), ("in [0, 1]", "ema_decay"))
    return args


# ============================================================================================
# Networks: the actor and the critic
# ============================================================================================

# The actor and the critic of LEQ (docs/ALGORITHM.md, section 4); pretraining, LEQ and evaluation
# all use these:
#   * Actor: MLP 3 x 256, ReLU, input symlog((s - mu_s) / std_s); action tanh(mean); for the
#     stochastic-policy ablation also a log-std head, action tanh(mean + sigma eps)
#   * Critic: [Dense, LayerNorm, ReLU] x 3 -> Dense(1), input symlog(((s, a) - mu) / std); for the
#     MOBILE ablation an ensemble of them (min over the critics)
#   * Nets: both as pure functions of (params, inputs) with the input statistics fixed

ACTOR_LOG_STD = 0.0  # the release's state-independent log-std never gets a gradient: exactly 0
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the stochastic actor's log-std is clipped to this range (as the release)


def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def dense(features):
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(np.sqrt(2)),
                    bias_init=nn.initializers.zeros)


class Actor(nn.Module):
    """MLP, ReLU on every hidden layer, no LayerNorm; input symlog((s - mu_s) / std_s).
    Returns the pre-tanh mean; the deterministic action is tanh(mean). With `with_log_std` (the
    stochastic-policy ablation) it also returns a state-dependent log-std from a Dense head named
    `log_std` on the last hidden layer (orthogonal init with scale 1e-3, as the release's
    policy), clipped to [LOG_STD_MIN, LOG_STD_MAX]; the mean and the head share the trunk. A
    deterministic call ignores that head, so every actor runs in evaluation as tanh(mean)."""
    act_dim: int
    hidden_dims: Sequence[int] = (256, 256, 256)

    @nn.compact
    def __call__(self, s, stats, with_log_std: bool = False):
        mean, std = stats  # statistics of [s, a] from the world model; the actor uses the s part
        x = symlog((s - mean[: s.shape[-1]]) / std[: s.shape[-1]])
        for h in self.hidden_dims:
            x = nn.relu(dense(h)(x))
        mu = dense(self.act_dim)(x)  # the pre-tanh mean
        if not with_log_std:
            return mu
        log_std = nn.Dense(self.act_dim, kernel_init=nn.initializers.orthogonal(1e-3),
                           bias_init=nn.initializers.zeros, name="log_std")(x)
        return mu, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def tanh_gaussian_log_prob(log_std, z, eps):
    """log pi(a | s) of a = tanh(z), z = mean + exp(log_std) eps, eps ~ N(0, I), summed over the
    action dimensions: sum_i [-eps_i^2 / 2 - log_std_i - log(2 pi) / 2 - log(1 - tanh(z_i)^2)],
    with log(1 - tanh(z)^2) = 2 (log 2 - z - softplus(-2 z)) (stable for large |z|)."""
    log_det = 2.0 * (jnp.log(2.0) - z - jax.nn.softplus(-2.0 * z))
    return jnp.sum(-0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi) - log_det, -1)


class Critic(nn.Module):
    """[Dense, LayerNorm, ReLU] x 3 -> Dense(1); input symlog(((s, a) - mu) / std)."""
    hidden_dims: Sequence[int] = (256, 256, 256)

    @nn.compact
    def __call__(self, s, a, stats):
        mean, std = stats
        x = symlog((jnp.concatenate([s, a], -1) - mean) / std)
        for h in self.hidden_dims:
            x = nn.relu(nn.LayerNorm(epsilon=1e-6)(dense(h)(x)))
        return dense(1)(x)[..., 0]


class Nets(NamedTuple):
    """The two networks as pure functions of (params, inputs); stats are constants of a run.
    With num_critics > 1 the critic parameters are N stacked critics (leading axis N)."""
    actor: Actor
    critic: Critic
    stats: tuple
    num_critics: int = 1

    def pi(self, params, s):  # deterministic action tanh(mean)
        return jnp.tanh(self.actor.apply(params, s, self.stats))

    def act(self, params, s, eps=None):
        """The action of the actor: tanh(mean) when eps is None (LEQ's deterministic actor), else
        the reparameterised sample tanh(mean + exp(log_std) eps) of the stochastic actor."""
        if eps is None:
            return self.pi(params, s)
        mean, log_std = self.actor.apply(params, s, self.stats, True)
        return jnp.tanh(mean + jnp.exp(log_std) * eps)

    def log_prob(self, params, s, eps):
        """log pi(a | s) of the stochastic actor's sample a = act(params, s, eps)."""
        mean, log_std = self.actor.apply(params, s, self.stats, True)
        return tanh_gaussian_log_prob(log_std, mean + jnp.exp(log_std) * eps, eps)

    def q(self, params, s, a):
        """Q(s, a); of an ensemble, the minimum over its critics."""
        if self.num_critics == 1:
            return self.critic.apply(params, s, a, self.stats)
        return jnp.min(self.q_each(params, s, a), 0)

    def q_each(self, params, s, a):
        """Every critic's Q(s, a): a sequence of N arrays (one for a single critic)."""
        if self.num_critics == 1:
            return [self.critic.apply(params, s, a, self.stats)]
        return jax.vmap(lambda p: self.critic.apply(p, s, a, self.stats))(params)


def make_nets(task: tasks.Task, hidden_dims, stats, num_critics: int = 1) -> Nets:
    return Nets(Actor(task.act_dim, tuple(hidden_dims)), Critic(tuple(hidden_dims)),
                (jnp.asarray(stats[0]), jnp.asarray(stats[1])), num_critics)


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
    loss = mean((Q(s, a) - y)^2) + ema_weight * mean((Q(s, a) - Q_ema(s, a))^2). The rewards are the
    task's transformed ones (tasks.device_dataset applies the transform)."""
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


def make_chunks(nets: Nets, bc_opt, fqe_opt, data, args: Args):
    """Two jitted functions (state, keys) -> (state, mean loss, index of the first non-finite loss
    or len(keys)), one scan step per key."""
    def bc_step(st: PretrainState, key):
        batch = tasks.sample(data, key, args.bc_batch_size)
        loss, grads = jax.value_and_grad(bc_loss)(st.actor, nets, batch.observations, batch.actions)
        updates, opt = bc_opt.update(grads, st.actor_opt, st.actor)
        return st._replace(actor=optax.apply_updates(st.actor, updates), actor_opt=opt), loss

    def fqe_step(st: PretrainState, key):
        batch = tasks.sample(data, key, args.fqe_batch_size)
        loss, grads = jax.value_and_grad(fqe_loss)(st.critic, st.critic_ema, st.actor, nets, batch,
                                                   args.gamma, args.ema_weight)
        updates, opt = fqe_opt.update(grads, st.critic_opt, st.critic)
        critic = optax.apply_updates(st.critic, updates)
        return st._replace(critic=critic, critic_ema=ema_update(st.critic_ema, critic, args.ema_decay),
                           critic_opt=opt), loss

    def chunk_of(step):
        @jax.jit
        def chunk(state, keys):  # also the index of the first non-finite loss (len(keys) if none)
            state, losses = jax.lax.scan(step, state, keys)
            return state, losses.mean(), jnp.where(jnp.isfinite(losses).all(), len(keys), jnp.argmin(jnp.isfinite(losses)))
        return chunk
    return chunk_of(bc_step), chunk_of(fqe_step)


# ============================================================================================
# Artifact: pretrain.npz, and reading an actor back from any artifact (TRY NOT TO MODIFY)
# ============================================================================================

def default_path(env: str, seed: int) -> Path:
    return Path("runs") / f"{tasks.run_name(env)}__pretrain__s{seed}" / "pretrain.npz"


def path_or_default(path, env: str, seed: int) -> Path:
    """pretrain.npz at `path` (a flag's value) if given, else at the default path of (env, seed)."""
    return Path(path) if path else default_path(env, seed)


def networks_arrays(nets: Nets, actor, critic, critic_ema) -> dict:
    """The arrays pretrain.npz and leq.npz hold: the three parameter trees and the statistics."""
    return {**artifacts.flatten(jax.device_get(actor), "actor"),
            **artifacts.flatten(jax.device_get(critic), "critic"),
            **artifacts.flatten(jax.device_get(critic_ema), "critic_ema"),
            "stats/mean": np.asarray(nets.stats[0]), "stats/std": np.asarray(nets.stats[1])}


def hidden_dims_of(actor_params) -> tuple:
    """The hidden sizes of a saved actor, read off its Dense kernels."""
    layers = actor_params["params"]
    names = sorted((k for k in layers if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    return tuple(int(layers[k]["kernel"].shape[1]) for k in names[:-1])


def num_critics_of(critic_params) -> int:
    """1 for a single critic, N for N stacked critics (their kernels have a leading axis)."""
    kernel = critic_params["params"]["Dense_0"]["kernel"]
    return 1 if kernel.ndim == 2 else int(kernel.shape[0])


def load_actor(path, task: Optional[tasks.Task] = None):
    """(task, nets, actor params) from ANY artifact holding an actor (pretrain.npz, leq.npz, a
    leq checkpoint); the task comes from the artifact when not given."""
    return actor_from_artifact(artifacts.load_artifact(path, task, need="actor"), task, path)


def actor_from_artifact(f: dict, task: Optional[tasks.Task] = None, path="artifact"):
    """load_actor for an artifact already read with artifacts.load_artifact; the actor's arrays
    and statistics must have the shapes of an actor of its hidden sizes (with the stochastic
    actor's log_std head when it has one; one line if not). The Nets get as many critics as
    the artifact holds."""
    task = task or tasks.get_task(str(f["meta/env"]))
    actor = jax.tree.map(jnp.asarray, artifacts.unflatten(f, "actor"))
    try:
        hidden = hidden_dims_of(actor)
    except (KeyError, IndexError):
        raise artifacts.CorruptArtifact(f"artifact {path}: its actor has no Dense layers") from None
    critic = critic_from_artifact(f)
    critics = 1 if critic is None else num_critics_of(critic)
    nets = make_nets(task, hidden, (f["stats/mean"], f["stats/std"]), critics)
    if f["stats/mean"].shape != (task.obs_dim + task.act_dim,) or f["stats/std"].shape != f["stats/mean"].shape:
        raise artifacts.CorruptArtifact(f"artifact {path}: input statistics of shape {f['stats/mean'].shape}, "
                                        f"but {task.name} needs ({task.obs_dim + task.act_dim},)")
    stochastic = isinstance(actor.get("params"), dict) and "log_std" in actor["params"]
    template = jax.eval_shape(lambda: nets.actor.init(jax.random.PRNGKey(0), jnp.zeros((1, task.obs_dim)),
                                                      nets.stats, stochastic))
    artifacts.check_shapes(actor, template, path, "actor")
    return task, nets, actor


def critic_from_artifact(f: dict):
    """The critic's parameters of an artifact already read with artifacts.load_artifact
    (pretrain.npz, leq.npz, a LEQ checkpoint), as device arrays; None when it has no critic."""
    if "critic/params/Dense_0/kernel" not in f:
        return None
    return jax.tree.map(jnp.asarray, artifacts.unflatten(f, "critic"))


def load_pretrained(path, task: tasks.Task):
    """(nets, actor params, critic params, EMA critic params) from a pretrain.npz."""
    f = artifacts.load_artifact(path, task, kinds=("pretrain",))
    task, nets, actor = actor_from_artifact(f, task, path)
    critic, ema = (jax.tree.map(jnp.asarray, artifacts.unflatten(f, k)) for k in ("critic", "critic_ema"))
    template = jax.eval_shape(lambda: init_params(nets, jax.random.PRNGKey(0), task.obs_dim, task.act_dim))[1]
    artifacts.check_shapes(critic, template, path, "critic")
    artifacts.check_shapes(ema, template, path, "critic_ema")
    return nets, actor, critic, ema


# ============================================================================================
# Main
# ============================================================================================

def train(args: Args) -> Path:
    from tqdm import tqdm
    args = resolve(args)
    # TRY NOT TO MODIFY: the output (locked), a checkpoint to resume, the inputs and their fingerprints
    task = tasks.get_task(args.env)
    out = path_or_default(args.out, args.env, args.seed)
    artifacts.check_output_file(out, "pretrain")
    ckpt = out.with_name(out.name.replace(".npz", "") + ".ckpt.npz")
    print(f"[pretrain] {args.env}, seed {args.seed}: {args.bc_steps:,} BC steps, then {args.fqe_steps:,} FQE "
          f"steps; {out}")
    wm_path = world_model.path_or_default(args.world_model, args.env, args.seed)
    if not wm_path.exists():
        raise tasks.InputError(f"world model {wm_path} does not exist: run world_model.py --env {args.env} "
                               f"first, or pass --world-model PATH")
    with artifacts.FolderLock(out.with_name(out.name + ".lock"), f"pretraining {out}"):
        existing = artifacts.existing_output(out, "pretrain", task, "pretrain", args, ("resume", "checkpoint_every"))
        saved = (artifacts.read_checkpoint(ckpt, task, "pretrain_checkpoint", args, ("resume", "overwrite", "out"))
                 if args.resume and ckpt.exists() else None)  # before any work
        wm = world_model.load_world_model(wm_path, task)
        ds = tasks.load_dataset(task, args.dataset_path, args.data_dir)
        recorded = saved["meta/inputs"] if saved else {}
        inputs = {"dataset": artifacts.file_fingerprint(ds.path, [(recorded or {}).get("dataset")])}
        inputs["world_model"] = world_model.check_dataset(wm, wm_path, ds, inputs["dataset"])
        if existing and artifacts.finished_output(out, "pretrain", existing, inputs):
            return out  # the same command again: its file is there
        if saved:
            artifacts.check_inputs(f"checkpoint {ckpt}", recorded, inputs,
                                   "use the inputs it was made from, or delete the checkpoint to start over")
        # ALGO LOGIC: the networks (input statistics from the world model), Adam, K steps per call
        data = tasks.device_dataset(ds)
        nets = make_nets(task, args.hidden_dims, (wm.input_mean, wm.input_std))
        k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
        actor, critic = init_params(nets, k_init, task.obs_dim, task.act_dim)
        bc_opt, fqe_opt = optax.adam(args.bc_lr), optax.adam(args.fqe_lr)
        state = PretrainState(actor, bc_opt.init(actor), critic, critic, fqe_opt.init(critic))
        step = 0
        if saved:  # a previous run of this config was interrupted
            state, step = artifacts.tree_from_arrays(state, saved, "state"), int(saved["progress/step"])
            print(f"[pretrain] resuming from {ckpt} at step {step}")
        bc_chunk, fqe_chunk = make_chunks(nets, bc_opt, fqe_opt, data, args)

        # BC for steps [0, bc_steps), then FQE of the cloned actor for [bc_steps, bc_steps + fqe_steps)
        total, start = args.bc_steps + args.fqe_steps, time.time()
        bar = tqdm(total=total, initial=step, desc=f"pretrain {args.env}", unit="step", mininterval=2)
        cli.STOP.armed = True  # a SIGINT/SIGTERM stops at the next chunk boundary, with a checkpoint
        while step < total:
            phase, end = ("BC", args.bc_steps) if step < args.bc_steps else ("FQE", total)
            n = min(args.chunk, end - step)
            keys = jax.random.split(jax.random.fold_in(k_train, step), n)
            state, loss, first_bad = (bc_chunk if phase == "BC" else fqe_chunk)(state, keys)
            # TRY NOT TO MODIFY: the NaN guard, checkpoints, progress, signals
            artifacts.check_finite({f"{phase} loss": first_bad}, n, step, True, ckpt)
            step += n
            stop = cli.STOP.signum  # read once: the checkpoint and the stop below agree
            if step % args.checkpoint_every < n or step == total or stop:
                arrays = {**artifacts.tree_arrays(jax.device_get(state), "state"), "progress/step": np.array(step)}
                artifacts.save_npz(ckpt, arrays, "pretrain_checkpoint", task, args, inputs)
            bar.update(n)
            bar.set_postfix_str(f"{phase} loss {float(loss):.4g}")
            cli.stop_if_requested(f"at step {step}, saved in {ckpt}", stop)
        cli.STOP.armed = False
        bar.close()

        s = data.observations[:4096]
        bc_mse = float(bc_loss(state.actor, nets, s, data.actions[:4096]))
        q_data = float(jnp.mean(nets.q(state.critic, s, nets.pi(state.actor, s))))
        arrays = {**networks_arrays(nets, state.actor, state.critic, state.critic_ema),
                  "summary/bc_mse": np.array(bc_mse), "summary/q_data": np.array(q_data)}
        artifacts.save_npz(out, arrays, "pretrain", task, args, inputs)
        ckpt.unlink(missing_ok=True)
    print(f"[pretrain] BC mse {bc_mse:.4f}, mean Q(s, pi(s)) on data {q_data:.2f}, "
          f"{time.time() - start:.0f} s; wrote {out}")
    return out


if __name__ == "__main__":
    cli.run_script(train, Args)
