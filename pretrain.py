"""Stage 2: behaviour cloning of the actor and fitted Q evaluation of its critic
(docs/ALGORITHM.md, section 4).

    python pretrain.py --env pointmaze-umaze

Reads the input statistics from `world_model.npz` (run world_model.py first), clones the
dataset's actions with a deterministic actor, evaluates that actor with FQE, and writes
`pretrain.npz` (actor, critic, EMA critic). leq.py starts from it and imports the networks
defined here.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import artifacts
import networks
import tasks
import world_model

# Per-task defaults for the built-in tasks (D4RL tasks use the paper's 200k + 200k steps).
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


def resolve(args: Args) -> Args:
    """Fill the per-task defaults."""
    bc, fqe = BUILTIN_STEPS.get(args.env, (200_000, 200_000))
    return dataclasses.replace(args, bc_steps=bc if args.bc_steps is None else args.bc_steps,
                               fqe_steps=fqe if args.fqe_steps is None else args.fqe_steps)


# ============================================================================================
# Losses
# ============================================================================================

def bc_loss(actor_params, nets: networks.Nets, s, a):
    """mean((tanh(mean(s)) - a)^2)."""
    return jnp.mean((nets.pi(actor_params, s) - a) ** 2)


def fqe_loss(critic_params, ema_params, actor_params, nets: networks.Nets, batch, gamma, ema_weight):
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


def make_chunks(nets: networks.Nets, bc_opt, fqe_opt, data, args: Args):
    """Two jitted functions (state, keys) -> (state, mean loss), one scan step per key."""
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
        def chunk(state, keys):
            state, losses = jax.lax.scan(step, state, keys)
            return state, losses.mean()
        return chunk
    return chunk_of(bc_step), chunk_of(fqe_step)


# ============================================================================================
# Artifact
# ============================================================================================

def default_path(env: str, seed: int) -> Path:
    return Path("runs") / f"{tasks.run_name(env)}__pretrain__s{seed}" / "pretrain.npz"


def load_pretrained(path, task: tasks.Task):
    """(nets, actor params, critic params, EMA critic params) from a pretrain.npz."""
    f = artifacts.load_artifact(path, task, kinds=("pretrain",))
    actor, critic, ema = (jax.tree.map(jnp.asarray, artifacts.unflatten(f, k))
                          for k in ("actor", "critic", "critic_ema"))
    nets = networks.make_nets(task, networks.hidden_dims_of(actor), (f["stats/mean"], f["stats/std"]))
    return nets, actor, critic, ema


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
    print(f"[pretrain] {args.env}, seed {args.seed}: {args.bc_steps:,} BC steps, then {args.fqe_steps:,} FQE "
          f"steps; {out}")
    wm_path = Path(args.world_model or world_model.default_path(args.env, args.seed))
    if not wm_path.exists():
        raise tasks.InputError(f"world model {wm_path} does not exist: run world_model.py --env {args.env} "
                               f"first, or pass --world-model PATH")
    wm = world_model.load_world_model(wm_path, task)
    ds = tasks.load_dataset(task, args.dataset_path, args.data_dir)
    world_model.check_dataset(wm, wm_path, ds)
    data = tasks.device_dataset(ds)
    nets = networks.make_nets(task, args.hidden_dims, (wm.input_mean, wm.input_std))
    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    actor, critic = networks.init_params(nets, k_init, task.obs_dim, task.act_dim)
    bc_opt, fqe_opt = optax.adam(args.bc_lr), optax.adam(args.fqe_lr)
    state = PretrainState(actor, bc_opt.init(actor), critic, critic, fqe_opt.init(critic))
    step = 0
    if args.resume and ckpt.exists():  # a previous run of this config was interrupted
        f = artifacts.load_artifact(ckpt, task, kinds=("pretrain_checkpoint",))
        artifacts.check_same_config(ckpt, f["meta/config"], args, ignore=("resume", "out"))
        state, step = artifacts.tree_from_arrays(state, f, "state"), int(f["progress/step"])
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
            arrays = {**artifacts.tree_arrays(jax.device_get(state), "state"), "progress/step": np.array(step)}
            artifacts.save_npz(ckpt, arrays, "pretrain_checkpoint", task, args)
        bar.update(n)
        bar.set_postfix_str(f"{phase} loss {float(loss):.4g}")
    bar.close()

    s = data.observations[:4096]
    bc_mse = float(bc_loss(state.actor, nets, s, data.actions[:4096]))
    q_data = float(jnp.mean(nets.q(state.critic, s, nets.pi(state.actor, s))))
    arrays = {**networks.networks_arrays(nets, state.actor, state.critic, state.critic_ema),
              "summary/bc_mse": np.array(bc_mse), "summary/q_data": np.array(q_data)}
    artifacts.save_npz(out, arrays, "pretrain", task, args)
    ckpt.unlink(missing_ok=True)
    print(f"[pretrain] BC mse {bc_mse:.4f}, mean Q(s, pi(s)) on data {q_data:.2f}, "
          f"{time.time() - start:.0f} s; wrote {out}")
    return out


if __name__ == "__main__":
    tasks.run_script(train, Args)  # with an XLA CPU compiler option (deviation, README)
