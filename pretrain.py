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
import json
import time
from pathlib import Path
from typing import Annotated, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import cli
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
    """Fill the per-task defaults and check the flags before any work (one-line errors)."""
    tasks.check_task_args(args)
    bc, fqe = BUILTIN_STEPS.get(args.env, (200_000, 200_000))
    args = dataclasses.replace(args, bc_steps=bc if args.bc_steps is None else args.bc_steps,
                               fqe_steps=fqe if args.fqe_steps is None else args.fqe_steps)
    tasks.check_flags(args, (">= 1", "hidden_dims bc_steps fqe_steps bc_batch_size fqe_batch_size chunk checkpoint_every"),
                      (">= 0", "bc_lr fqe_lr ema_weight"), ("in (0, 1]", "gamma"), ("in [0, 1]", "ema_decay"))
    return args


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
        def chunk(state, keys):  # also the index of the first non-finite loss (len(keys) if none)
            state, losses = jax.lax.scan(step, state, keys)
            return state, losses.mean(), jnp.where(jnp.isfinite(losses).all(), len(keys), jnp.argmin(jnp.isfinite(losses)))
        return chunk
    return chunk_of(bc_step), chunk_of(fqe_step)


# ============================================================================================
# Artifact
# ============================================================================================

def default_path(env: str, seed: int) -> Path:
    return Path("runs") / f"{tasks.run_name(env)}__pretrain__s{seed}" / "pretrain.npz"


def path_or_default(path, env: str, seed: int) -> Path:
    """pretrain.npz at `path` (a flag's value) if given, else at the default path of (env, seed)."""
    return Path(path) if path else default_path(env, seed)


def load_pretrained(path, task: tasks.Task):
    """(nets, actor params, critic params, EMA critic params) from a pretrain.npz."""
    f = artifacts.load_artifact(path, task, kinds=("pretrain",))
    task, nets, actor = networks.actor_from_artifact(f, task, path)
    critic, ema = (jax.tree.map(jnp.asarray, artifacts.unflatten(f, k)) for k in ("critic", "critic_ema"))
    template = jax.eval_shape(lambda: networks.init_params(nets, jax.random.PRNGKey(0), task.obs_dim, task.act_dim))[1]
    artifacts.check_shapes(critic, template, path, "critic")
    artifacts.check_shapes(ema, template, path, "critic_ema")
    return nets, actor, critic, ema


def given_settings(settings) -> dict:
    """The nested settings given on the command line: those that differ from their defaults."""
    default = dataclasses.asdict(type(settings)())
    return {k: v for k, v in dataclasses.asdict(settings).items() if v != default[k]}


def note_other_settings(path: Path, flag: str, wanted: dict) -> None:
    """One line when an existing upstream artifact was made with other values of the `wanted`
    settings (the --<flag>.* apply only to an artifact leq.py makes)."""
    recorded = artifacts.recorded_config(path)
    diff = [f"{k} {recorded.get(k)} (not {v})" for k, v in json.loads(json.dumps(wanted)).items() if recorded.get(k) != v]
    if diff:
        print(f"[leq] note: using the existing {path} as it is, made with {', '.join(diff)}; --{flag}.* "
              f"apply only to an artifact leq.py makes (delete this one to make it so)")


def upstream(task: tasks.Task, args, resume) -> tuple:
    """What a later stage (leq.py, its Args `args`) starts from: the dataset, world_model.npz and
    pretrain.npz, checked against each other and against the checkpoint being resumed BEFORE
    any training. A missing stage runs first, with leq.py's task, data and seed, its nested
    --world-model-settings.* / --pretrain-settings.* and its flags checked up front, unless the
    checkpoint was made from the file that is missing. An existing one is used as it is, with a
    note where it differs from the nested settings given, or, at the default path (leq.py's own),
    from all of them (e.g. the shrunk stages of a smoke run). resume: None or (checkpoint path,
    its arrays). Returns (dataset, world model, pretrain path or None, fingerprints)."""
    ckpt, saved = resume or (None, {"meta/inputs": {}})
    recorded = saved["meta/inputs"] or {}
    common = dict(env=args.env, dataset_path=args.dataset_path, data_dir=args.data_dir, seed=args.seed)
    wm_path = world_model.path_or_default(args.world_model, args.env, args.seed)
    pt_path = None if args.no_pretrain else path_or_default(args.pretrain, args.env, args.seed)
    wm_settings, pt_settings = args.world_model_settings, args.pretrain_settings
    wm_args = world_model.resolve(world_model.Args(**common, **dataclasses.asdict(wm_settings), out=str(wm_path),
                                                   learn_termination=getattr(args, "learned_termination", False)))
    pt_args = resolve(Args(**common, **dataclasses.asdict(pt_settings), world_model=str(wm_path), out=str(pt_path)))
    stages = (("world_model", wm_path, args.world_model, wm_settings, wm_args),
              ("pretrain", pt_path, args.pretrain, pt_settings, pt_args))
    loaded = {}
    for name, path, flag, settings, stage_args in stages:
        if path and not path.exists() and (flag or recorded.get(name)):
            raise tasks.InputError(f"--{name.replace('_', '-')} {path} does not exist" if flag else
                                   f"checkpoint {ckpt} was made from the {name.replace('_', ' ')} "
                                   f"{recorded[name]['path']}, but {path} does not exist: restore it, or start "
                                   f"over in another --run-dir")
        if path and path.exists():  # env, dims, shapes; and what it was made with
            loaded[name] = (world_model.load_world_model if name == "world_model" else load_pretrained)(path, task)
            note_other_settings(path, f"{name.replace('_', '-')}-settings", given_settings(settings) if flag else
                                {k: getattr(stage_args, k) for k in dataclasses.asdict(settings)})
    ds = tasks.load_dataset(task, args.dataset_path, args.data_dir)
    inputs = {"dataset": artifacts.file_fingerprint(ds.path, [recorded.get("dataset")])}
    remedy = "restore the files it was made from, or start over in another --run-dir"

    def announce(path: Path, name: str, settings) -> None:
        flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                         for k, v in given_settings(settings).items())
        print(f"[leq] no {path.name} at {path}: running {name}.py {flags or 'with its defaults'}")

    if not wm_path.exists():
        announce(wm_path, "world_model", wm_settings)
        world_model.train(wm_args)
    wm = loaded.get("world_model") or world_model.load_world_model(wm_path, task)
    inputs["world_model"] = world_model.check_dataset(wm, wm_path, ds, inputs["dataset"])
    if ckpt:
        artifacts.check_inputs(f"checkpoint {ckpt}", saved["meta/inputs"], inputs, remedy)
    if pt_path and not pt_path.exists():
        announce(pt_path, "pretrain", pt_settings)
        train(pt_args)
    if pt_path:
        inputs["pretrain"], made_from = artifacts.provenance(pt_path)
        artifacts.check_inputs(f"pretrain {pt_path}", made_from, {k: inputs[k] for k in ("dataset", "world_model")},
                               f"pass the pretrain.npz made from them, or rerun pretrain.py --world-model {wm_path}")
        if ckpt:
            artifacts.check_inputs(f"checkpoint {ckpt}", recorded, {"pretrain": inputs["pretrain"]}, remedy)
    return ds, wm, pt_path, inputs


# ============================================================================================
# Main
# ============================================================================================

def train(args: Args) -> Path:
    from tqdm import tqdm
    args = resolve(args)
    task = tasks.get_task(args.env)
    out = path_or_default(args.out, args.env, args.seed)
    ckpt = out.with_name(out.name.replace(".npz", "") + ".ckpt.npz")
    print(f"[pretrain] {args.env}, seed {args.seed}: {args.bc_steps:,} BC steps, then {args.fqe_steps:,} FQE "
          f"steps; {out}")
    wm_path = world_model.path_or_default(args.world_model, args.env, args.seed)
    if not wm_path.exists():
        raise tasks.InputError(f"world model {wm_path} does not exist: run world_model.py --env {args.env} "
                               f"first, or pass --world-model PATH")
    with artifacts.FolderLock(out.with_name(out.name + ".lock"), f"pretraining {out}"):
        saved = (artifacts.read_checkpoint(ckpt, task, "pretrain_checkpoint", args, ("resume", "out"))
                 if args.resume and ckpt.exists() else None)  # before any work
        wm = world_model.load_world_model(wm_path, task)
        ds = tasks.load_dataset(task, args.dataset_path, args.data_dir)
        recorded = saved["meta/inputs"] if saved else {}
        inputs = {"dataset": artifacts.file_fingerprint(ds.path, [(recorded or {}).get("dataset")])}
        inputs["world_model"] = world_model.check_dataset(wm, wm_path, ds, inputs["dataset"])
        if saved:
            artifacts.check_inputs(f"checkpoint {ckpt}", recorded, inputs,
                                   "use the inputs it was made from, or delete the checkpoint to start over")
        data = tasks.device_dataset(ds)
        nets = networks.make_nets(task, args.hidden_dims, (wm.input_mean, wm.input_std))
        k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
        actor, critic = networks.init_params(nets, k_init, task.obs_dim, task.act_dim)
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
            artifacts.check_finite({f"{phase} loss": first_bad}, n, step, True, ckpt)
            step += n
            if step % args.checkpoint_every < n or step == total or cli.STOP.signum:
                arrays = {**artifacts.tree_arrays(jax.device_get(state), "state"), "progress/step": np.array(step)}
                artifacts.save_npz(ckpt, arrays, "pretrain_checkpoint", task, args, inputs)
            bar.update(n)
            bar.set_postfix_str(f"{phase} loss {float(loss):.4g}")
            cli.stop_if_requested(f"at step {step}, saved in {ckpt}")
        cli.STOP.armed = False
        bar.close()

        s = data.observations[:4096]
        bc_mse = float(bc_loss(state.actor, nets, s, data.actions[:4096]))
        q_data = float(jnp.mean(nets.q(state.critic, s, nets.pi(state.actor, s))))
        arrays = {**networks.networks_arrays(nets, state.actor, state.critic, state.critic_ema),
                  "summary/bc_mse": np.array(bc_mse), "summary/q_data": np.array(q_data)}
        artifacts.save_npz(out, arrays, "pretrain", task, args, inputs)
        ckpt.unlink(missing_ok=True)
    print(f"[pretrain] BC mse {bc_mse:.4f}, mean Q(s, pi(s)) on data {q_data:.2f}, "
          f"{time.time() - start:.0f} s; wrote {out}")
    return out


if __name__ == "__main__":
    cli.run_script(train, Args)  # with an XLA CPU compiler option (deviation, README)
