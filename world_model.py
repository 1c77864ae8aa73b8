"""Stage 1: the ensemble world model of LEQ (docs/ALGORITHM.md, section 3), all in JAX.

    python world_model.py --env pointmaze-umaze

An ensemble of 7 Gaussian MLPs predicts [s' - s, r] from standardised [s, a]; each member trains
on its own bootstrap resample; after every epoch each member keeps a snapshot of its best
holdout parameters; training stops after 5 epochs without improvement; the 5 best members are
the elites. Writes `world_model.npz`; later stages import `load_world_model` and `model_step`.
With --learn-termination (or --termination-only, for an existing file) it also trains the
termination classifier of leq.py's --learned-termination ablation and stores it in the same file.
The authors trained this part with OfflineRL-Kit (PyTorch); this file reproduces that trainer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from leq_utils import artifacts, cli, tasks  # support package: data, artifacts, CLI (TRY NOT TO MODIFY)


@dataclasses.dataclass
class Settings:
    """The world model's hyperparameters (leq.py takes them as --world-model-settings.* for the
    world model it trains when none exists)."""
    # --- Ensemble ---
    ensemble_size: int = 7
    """number of members trained"""
    num_elites: int = 5
    """members kept for imagination (lowest holdout MSE)"""
    hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    """hidden layer sizes of each member (swish activations)"""
    weight_decay: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    """L2 coefficients per layer (hidden layers, then the output layer), weights only"""
    # --- Training ---
    lr: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 256
    """minibatch size per member"""
    holdout_size: int = 1000
    """holdout transitions: min(int(0.2 N), this)"""
    improvement: float = 0.01
    """relative holdout improvement that counts as improving: (best - new) / best > this"""
    patience: int = 5
    """stop after this many epochs without any member improving"""
    max_epochs: Optional[int] = None
    """hard cap on epochs (default: none, early stopping only)"""


@dataclasses.dataclass
class Args(Settings, tasks.TaskArgs):
    # --env, --dataset-path, --data-dir, --seed (tasks.TaskArgs), the hyperparameters (Settings), then:
    # --- Experiment ---
    out: Optional[str] = None
    """output file (default: runs/<env>__world_model__s<seed>/world_model.npz)"""
    resume: bool = True
    """continue from <out>.ckpt.npz if a previous run of the same config left one"""
    overwrite: bool = False
    """replace an existing <out> (without it, an existing file is never replaced: another config's is
    refused, naming it; the same config's, made from the same dataset, is left as it is)"""
    # --- Termination classifier (for leq.py --learned-termination, the paper's Table 22) ---
    learn_termination: bool = False
    """also train a classifier of the dataset's terminals from s' (MLP 3 x 256) and store it in the output"""
    termination_only: bool = False
    """add that classifier to the existing --out file (its ensemble unchanged) instead of training an ensemble"""
    termination_lr: float = 1e-3
    """termination classifier: Adam learning rate (minibatches of --batch-size)"""
    termination_holdout_size: int = 10_000
    """termination classifier: holdout transitions, min(int(0.2 N), this) (terminals are rare)"""
    termination_max_epochs: int = 50
    """termination classifier: cap on epochs (early stopping on the holdout cross-entropy with
    --patience and --improvement)"""


def resolve(args: Args) -> Args:
    """Check the flags before any work; one-line errors for values out of range."""
    tasks.check_task_args(args)
    tasks.check_flags(args, (">= 1", "ensemble_size hidden_dims batch_size holdout_size patience max_epochs"),
                      (">= 0", "weight_decay lr improvement"))
    if not 0 < args.num_elites <= args.ensemble_size:
        raise tasks.InputError(f"--num-elites must be in [1, ensemble size], got {args.num_elites}")
    if len(args.weight_decay) != len(args.hidden_dims) + 1:
        raise tasks.InputError("--weight-decay needs one value per hidden layer plus the output layer")
    return args


# ============================================================================================
# Data: inputs [s, a], targets [s' - s, r] (the dataset's raw reward: the task's reward transform
# is applied to the model's sampled reward, in model_step_given), holdout split, input statistics
# ============================================================================================

def make_training_data(ds: tasks.Dataset, holdout_size: int, rng: np.random.Generator):
    inputs = np.concatenate([ds.observations, ds.actions], 1)
    targets = np.concatenate([ds.next_observations - ds.observations, ds.rewards[:, None]], 1)
    n_hold = min(int(0.2 * len(inputs)), holdout_size)
    perm = rng.permutation(len(inputs))
    train, hold = perm[n_hold:], perm[:n_hold]
    mean = inputs[train].mean(0)
    std = inputs[train].std(0)
    std = np.where(std < 1e-12, 1.0, std)  # constant inputs: leave unscaled
    return inputs[train], targets[train], inputs[hold], targets[hold], mean, std


# ============================================================================================
# Network: E Gaussian MLPs, one parameter dict per member (member_0 .. member_{E-1})
# ============================================================================================

def init_ensemble(key, in_dim: int, out_dim: int, hidden_dims, ensemble_size: int) -> dict:
    """{member_e: {layer_i: {kernel, bias}}, max_logvar, min_logvar}. Weights ~ N(0, (1 / (2
    sqrt(fan_in)))^2), biases 0; log-variance bounds start at 0.5 / -10 (shared by the members)."""
    dims = [in_dim, *hidden_dims, 2 * out_dim]
    params = {}
    for e, k_member in enumerate(jax.random.split(key, ensemble_size)):
        keys = jax.random.split(k_member, len(dims) - 1)
        params[f"member_{e}"] = {
            f"layer_{i}": {"kernel": jax.random.normal(keys[i], (fan_in, fan_out)) / (2 * np.sqrt(fan_in)),
                           "bias": jnp.zeros(fan_out)}
            for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:]))}
    params["max_logvar"] = jnp.full((out_dim,), 0.5, jnp.float32)
    params["min_logvar"] = jnp.full((out_dim,), -10.0, jnp.float32)
    return params


def members(params: dict) -> list:
    """The members' parameter dicts, in order."""
    return [params[f"member_{e}"] for e in range(sum(k.startswith("member_") for k in params))]


def member_forward(member: dict, x):
    """One member's MLP on x (N, in): swish hidden layers, raw output [mean, logvar] (N, 2 out)."""
    n_layers = len(member)
    for i in range(n_layers):
        x = x @ member[f"layer_{i}"]["kernel"] + member[f"layer_{i}"]["bias"]
        if i < n_layers - 1:
            x = jax.nn.swish(x)
    return x


def gaussian_head(params: dict, out):
    """Split [mean, logvar] and soft-clamp the log-variance between the learnable bounds:
    lv = max - softplus(max - lv); lv = min + softplus(lv - min)."""
    mean, logvar = jnp.split(out, 2, axis=-1)
    hi, lo = params["max_logvar"], params["min_logvar"]
    logvar = hi - jax.nn.softplus(hi - logvar)
    return mean, lo + jax.nn.softplus(logvar - lo)


def ensemble_forward(params: dict, x):
    """Every member on x: (B, in) shared, or (E, B, in) one batch per member -> mean, logvar
    (E, B, out). The members run one after another as E independent chains of matrix products.
    The plain form, its reference in tests/test_plain_references.py, is one jax.vmap of
    member_forward over the members' parameters stacked on a leading axis. What this form buys, measured with
    benchmarks/plain_vs_tuned.py on the shared 2-core CPU: with the vmap form a world-model epoch
    takes 12.8% more wall time (9.7% more CPU time; medians over 76 paired rounds in 5 runs, run
    medians 5-35%), close to the 10% a kept trick must buy (docs/PERFORMANCE_PLAIN_JAX.md)."""
    out = jnp.stack([member_forward(m, x if x.ndim == 2 else x[e]) for e, m in enumerate(members(params))])
    return gaussian_head(params, out)


def every_member_then_pick(params: dict, x, member):
    """mean, logvar (N, out) of member[n] at row n, the plain way: every member on every row, then
    each row keeps its own member's output. The reference of `picked_forward`."""
    mean, logvar = ensemble_forward(params, x)
    pick = lambda v: jnp.take_along_axis(v, member[None, :, None], axis=0)[0]  # noqa: E731
    return pick(mean), pick(logvar)


def picked_forward(params: dict, x, member):
    """`every_member_then_pick`, computing each member only on its own rows: the rows of member e
    are gathered into a block of fixed capacity C (the mean count plus 4 standard deviations of the
    binomial count), each block goes through its member, and row n reads its result back from its
    block. If some member drew more than C rows (about 2e-4 per call at N = 256) it falls back to
    `every_member_then_pick`. The same numbers at about 1/3 of the work (5 elites, N = 256: 5 blocks
    of 78 rows instead of 5 x 256), forward and backward. What it buys, measured with
    benchmarks/plain_vs_tuned.py on the shared 2-core CPU: with `every_member_then_pick` the LEQ
    step takes 31% more wall time (34% more CPU time; medians over 36 paired rounds in 4 runs,
    run medians 27-39%; docs/PERFORMANCE_PLAIN_JAX.md). world_model.py's training does not use it."""
    n, n_members = x.shape[0], len(members(params))
    p = 1.0 / n_members
    capacity = min(n, math.ceil(n * p + 4 * math.sqrt(n * p * (1 - p))) + 1)
    counts = jax.nn.one_hot(member, n_members, dtype=jnp.int32).sum(0)  # rows per member

    def grouped(x):
        order = jnp.argsort(member, stable=True)                   # rows sorted by member
        earlier = jnp.arange(n_members)[None, :] < jnp.arange(n_members)[:, None]
        first = (earlier * counts).sum(1)                          # where each member's rows start
        rank = jnp.argsort(order) - first[member]                  # row n is the rank-th of its member
        blocks = [member_forward(m, x[order[jnp.minimum(first[e] + jnp.arange(capacity), n - 1)]])
                  for e, m in enumerate(members(params))]
        return gaussian_head(params, jnp.concatenate(blocks)[member * capacity + rank])

    return jax.lax.cond(jnp.max(counts) <= capacity, grouped,
                        lambda x: every_member_then_pick(params, x, member), x)


# ============================================================================================
# Loss: Gaussian NLL per member, summed; weight decay; log-variance bound regulariser
# ============================================================================================

def ensemble_loss(params: dict, x, y):
    """sum_e [mean((mu - y)^2 exp(-lv)) + mean(lv)] + 0.01 sum(max_logvar) - 0.01 sum(min_logvar),
    for x: (E, B, in), y: (E, B, out). The weight decay, the loss's third part, is `decay_loss`."""
    mean, logvar = ensemble_forward(params, x)
    nll = jnp.mean((mean - y) ** 2 * jnp.exp(-logvar), axis=(1, 2)) + jnp.mean(logvar, axis=(1, 2))
    return jnp.sum(nll) + 0.01 * jnp.sum(params["max_logvar"]) - 0.01 * jnp.sum(params["min_logvar"])


def decay_loss(params: dict, weight_decay):
    """sum_e sum_l 0.5 wd_l sum(W_l^2) over the kernels (not the biases) of every member."""
    return sum(0.5 * wd * jnp.sum(m[f"layer_{i}"]["kernel"] ** 2)
               for m in members(params) for i, wd in enumerate(weight_decay))


def loss_grads(params: dict, x, y, weight_decay):
    """(ensemble_loss, gradient of ensemble_loss + decay_loss). The decay's value is left out of
    the returned loss (the progress bar shows it on its own)."""
    def loss(params):
        nll = ensemble_loss(params, x, y)
        return nll + decay_loss(params, weight_decay), nll
    (_, nll), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return nll, grads


def holdout_mse(params: dict, x, y):
    """Per-member MSE of the mean prediction over all obs+1 target dims: (E,)."""
    mean, _ = ensemble_forward(params, x)
    return jnp.mean((mean - y[None]) ** 2, axis=(1, 2))


# ============================================================================================
# Update: one jitted call per epoch (lax.scan over minibatches)
# ============================================================================================

class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    best_params: dict        # per-member snapshot at its best holdout MSE
    best_mse: jnp.ndarray    # (E,)


def make_epoch_fn(args: Args, optimizer, x_train, y_train):
    """x_train, y_train: standardised inputs and raw targets on device."""

    def sgd_step(carry, idx):  # idx: (E, batch), one minibatch per member
        params, opt_state = carry
        loss, grads = loss_grads(params, x_train[idx], y_train[idx], args.weight_decay)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train_epoch(state: TrainState, shuffled_idx):
        """shuffled_idx: (E, N) every member's bootstrap sample in this epoch's order; walk it in
        minibatches (the last partial one is dropped: deviation, docs/DEVIATIONS.md)."""
        n_batches = shuffled_idx.shape[1] // args.batch_size
        batches = shuffled_idx[:, :n_batches * args.batch_size].reshape(shuffled_idx.shape[0], n_batches, -1)
        (params, opt_state), losses = jax.lax.scan(sgd_step, (state.params, state.opt_state),
                                                   batches.swapaxes(0, 1))
        return state._replace(params=params, opt_state=opt_state), losses.mean()

    return train_epoch


def shuffle_bootstrap(boot_idx: np.ndarray, seed: int, epoch: int):
    """Every member's bootstrap sample in a fresh uniform order, drawn on the host from (seed,
    epoch), so a resumed run repeats it. numpy takes about 0.1 s for 7 x 1M indices where
    XLA's CPU sort (jax.random.permutation) takes about 3.3 s; the result goes to the device once
    per epoch (28 MB for 7 x 1M)."""
    return jnp.asarray(np.random.default_rng((seed, epoch)).permuted(boot_idx, axis=1))


@jax.jit
def snapshot_improved(state: TrainState, mse, improvement):
    """Members with (best - new) / best > improvement take a snapshot of their parameters.
    The log-variance bounds are shared by all members and not snapshotted (as OfflineRL-Kit;
    a deviation from the per-member snapshot of docs/ALGORITHM.md, listed in docs/DEVIATIONS.md)."""
    improved = (state.best_mse - mse) / state.best_mse > improvement

    best = dict(state.params)  # the shared log-variance bounds: as trained
    for e in range(improved.shape[0]):
        best[f"member_{e}"] = jax.tree.map(lambda new, old: jnp.where(improved[e], new, old),
                                           state.params[f"member_{e}"], state.best_params[f"member_{e}"])
    return state._replace(best_params=best, best_mse=jnp.where(improved, mse, state.best_mse)), improved


# ============================================================================================
# The step function later stages import: elites only, one random elite per sample
# ============================================================================================

class WorldModel(NamedTuple):
    params: dict             # the ELITE members only, renumbered member_0 .. member_{num_elites-1}
    input_mean: jnp.ndarray  # statistics of [s, a] (also used by the actor and critic)
    input_std: jnp.ndarray
    reward_scale: float      # task reward transform: r -> scale * r + shift
    reward_shift: float
    dataset: str = ""        # the HDF5 file it was trained on (checked by later stages)


class ModelNoise(NamedTuple):
    """The randomness of model steps, for any batch shape (...,)."""
    member: jnp.ndarray  # (...,) which elite predicts each sample
    eps: jnp.ndarray     # (..., obs + 1) N(0, 1) noise for [s' - s, r]


def model_noise(wm: WorldModel, key, batch_shape) -> ModelNoise:
    """The randomness of one model step: an elite per sample, and N(0, 1) noise for [s' - s, r]."""
    k_member, k_eps = jax.random.split(key)
    n_elites, out_dim = len(members(wm.params)), wm.params["max_logvar"].shape[0]
    return ModelNoise(jax.random.randint(k_member, batch_shape, 0, n_elites),
                      jax.random.normal(k_eps, (*batch_shape, out_dim)))


def model_step_given(wm: WorldModel, s, a, member, eps, done_fn):
    """(s, a) -> (s', r, done) for given randomness: sample [s' - s, r] = mu + eps * exp(lv / 2)
    from elite `member` (deviation, docs/DEVIATIONS.md: sampling only the picked member's Gaussian is the
    same distribution as sampling every member and then picking, at about 1/3 of the work at
    a batch of 256, see picked_forward).
    Reparameterised, so s' and r are differentiable in (s, a) through mean and std; `done` (the
    task's true termination) carries no gradient. Works on any leading batch shape."""
    x = (jnp.concatenate([s, a], -1) - wm.input_mean) / wm.input_std
    mu, logvar = picked_forward(wm.params, x.reshape(-1, x.shape[-1]), member.reshape(-1))
    sample = (mu + jnp.exp(0.5 * logvar) * eps.reshape(mu.shape)).reshape(*s.shape[:-1], -1)
    s2 = s + sample[..., :-1]
    r = wm.reward_scale * sample[..., -1] + wm.reward_shift  # the task's reward transform
    done = jax.lax.stop_gradient(done_fn(s, a, s2))
    return s2, r, done


def model_step(wm: WorldModel, s, a, key, done_fn):
    """The step later stages import: (wm, s, a, key, done_fn) -> (s', r, done) for a batch, one
    uniformly chosen elite per sample."""
    member, eps = model_noise(wm, key, s.shape[:-1])
    return model_step_given(wm, s, a, member, eps, done_fn)


# ============================================================================================
# Termination classifier (the learned-termination ablation): T_psi(s') -> logit of done
# (only with --learn-termination: a first reading can skip to the Artifact section)
# ============================================================================================

class TerminationClassifier(nn.Module):
    """The learned termination function: MLP (3 x 256, ReLU, as the actor) on symlog((s' - mu_s)
    / std_s) -> the logit of done(s'); done when the logit >= 0 (probability >= 1/2). Layers and
    initialisation as pretrain.py's actor (orthogonal sqrt(2), zero biases)."""
    hidden_dims: Sequence[int] = (256, 256, 256)

    @nn.compact
    def __call__(self, s2, stats):
        mean, std = stats  # the world model's statistics of [s, a]; s' uses the s part
        x = (s2 - mean[: s2.shape[-1]]) / std[: s2.shape[-1]]
        x = jnp.sign(x) * jnp.log1p(jnp.abs(x))  # symlog
        dense = lambda n: nn.Dense(n, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))  # noqa: E731
        for h in self.hidden_dims:
            x = nn.relu(dense(h)(x))
        return dense(1)(x)[..., 0]


def termination_loss(params, clf: TerminationClassifier, s2, labels, stats):
    """Binary cross-entropy with logits, mean over the batch: mean(log(1 + e^z) - y z), z = T_psi(s').
    No class weights (the paper names none)."""
    z = clf.apply(params, s2, stats)
    return jnp.mean(jnp.logaddexp(0.0, z) - labels * z)


def train_termination(args: Args, ds: tasks.Dataset, stats):
    """Fit T_psi(s') to the dataset's terminals (a choice, docs/DEVIATIONS.md: the paper gives only the 3 x 256
    MLP). Input s' alone, as every true termination function here; its own holdout split and
    minibatch order from (seed, 1), so the ensemble's draws are untouched; Adam; early stopping as
    the ensemble's, keeping the best holdout parameters. Returns (params, summary arrays)."""
    from tqdm import tqdm
    rng = np.random.default_rng((args.seed, 1))
    n_hold = min(int(0.2 * len(ds.terminals)), args.termination_holdout_size)
    perm = rng.permutation(len(ds.terminals))
    train, hold = perm[n_hold:], perm[:n_hold]
    x_train, y_train = jnp.asarray(ds.next_observations[train]), jnp.asarray(ds.terminals[train], jnp.float32)
    x_hold, y_hold = jnp.asarray(ds.next_observations[hold]), jnp.asarray(ds.terminals[hold], jnp.float32)
    stats = (jnp.asarray(stats[0]), jnp.asarray(stats[1]))
    clf = TerminationClassifier()
    params = clf.init(jax.random.fold_in(jax.random.PRNGKey(args.seed), 1), x_train[:1], stats)
    optimizer = optax.adam(args.termination_lr)

    @jax.jit
    def epoch(params, opt_state, batches):
        def step(carry, idx):
            loss, grads = jax.value_and_grad(termination_loss)(carry[0], clf, x_train[idx], y_train[idx], stats)
            updates, opt_state = optimizer.update(grads, carry[1], carry[0])
            return (optax.apply_updates(carry[0], updates), opt_state), loss
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses.mean()
    holdout_bce = jax.jit(lambda p: termination_loss(p, clf, x_hold, y_hold, stats))

    opt_state, best, best_bce, since, epochs = optimizer.init(params), params, 1e10, 0, 0
    n_batches = len(train) // args.batch_size
    bar = tqdm(desc="termination classifier", unit="epoch", total=args.termination_max_epochs)
    while since < args.patience and epochs < args.termination_max_epochs:
        batches = rng.permutation(len(train))[:n_batches * args.batch_size].reshape(n_batches, -1)
        params, opt_state, loss = epoch(params, opt_state, jnp.asarray(batches))
        bce, epochs = float(holdout_bce(params)), epochs + 1
        if (best_bce - bce) / best_bce > args.improvement:
            best, best_bce, since = params, bce, 0
        else:
            since += 1
        bar.update(1)
        bar.set_postfix_str(f"loss {float(loss):.4f} | holdout bce {bce:.4f} | since {since}")
    bar.close()
    done, y = np.asarray(clf.apply(best, x_hold, stats) >= 0), np.asarray(y_hold) > 0.5
    summary = {"termination/holdout_bce": np.array(best_bce), "termination/epochs": np.array(epochs),
               "termination/holdout_recall": np.array((done & y).sum() / max(y.sum(), 1)),
               "termination/holdout_precision": np.array((done & y).sum() / max(done.sum(), 1)),
               "termination/positive_rate": np.array(float(np.mean(ds.terminals)))}
    recall, precision = (float(summary[f"termination/holdout_{k}"]) for k in ("recall", "precision"))
    print(f"[world_model] termination classifier: {epochs} epochs, holdout BCE {best_bce:.4f}, recall {recall:.3f}, "
          f"precision {precision:.3f} at p >= 1/2 ({int(y.sum())} terminals of {len(y)} holdout transitions)")
    return best, summary


def load_learned_termination(path, task: tasks.Task, stats):
    """done(s, a, s') = 1(T_psi(s') >= 0) from the classifier in a world_model.npz (no gradient:
    a comparison). A file without one (older, or trained without --learn-termination) is refused
    in one line that names the command adding one."""
    f = artifacts.load_artifact(path, task, kinds=("world_model",))
    if "termination/params/Dense_0/kernel" not in f:
        raise tasks.InputError(
            f"world model {path} has no termination classifier, which --learned-termination needs: add one "
            f"with python world_model.py --env {task.name} --dataset-path {f['model/dataset_path']} --out {path} "
            f"--termination-only")
    params = {"params": jax.tree.map(jnp.asarray, artifacts.unflatten(f, "termination/params"))}
    layers = params["params"]
    clf = TerminationClassifier(tuple(layers[f"Dense_{i}"]["kernel"].shape[1] for i in range(len(layers) - 1)))
    stats = (jnp.asarray(stats[0]), jnp.asarray(stats[1]))
    return lambda s, a, s2: clf.apply(params, s2, stats) >= 0.0


def add_termination(args: Args, task: tasks.Task, out: Path, ds: tasks.Dataset) -> Path:
    """--termination-only: train the classifier on the data of an existing world_model.npz and add
    it to that file; every other array (and the config) stays as it was."""
    if not out.exists():
        raise tasks.InputError(f"--termination-only adds a classifier to an existing world model, but {out} "
                               f"does not exist: train one first (without --termination-only)")
    f = artifacts.load_artifact(out, task, kinds=("world_model",))
    check_dataset(load_world_model(out, task), out, ds, artifacts.file_fingerprint(ds.path))
    params, summary = train_termination(args, ds, (f["model/input_mean"], f["model/input_std"]))
    arrays = {k: v for k, v in f.items() if not k.startswith(("meta/", "termination/"))}
    # the ensemble is unchanged: the file keeps its fingerprint and inputs, so the pretrain.npz
    # and LEQ checkpoints made from it still match it
    record, inputs = artifacts.provenance(out)
    artifacts.save_npz(out, {**arrays, **artifacts.flatten(jax.device_get(params), "termination"), **summary},
                       "world_model", task, f["meta/config"], inputs, fingerprint=record["sha256"])
    print(f"[world_model] added the termination classifier to {out}")
    return out


# ============================================================================================
# Artifact
# ============================================================================================

def default_path(env: str, seed: int) -> Path:
    return Path("runs") / f"{tasks.run_name(env)}__world_model__s{seed}" / "world_model.npz"


def path_or_default(path, env: str, seed: int) -> Path:
    """The world model at `path` (a flag's value) if given, else at the default path of (env, seed)."""
    return Path(path) if path else default_path(env, seed)


def load_world_model(path, task: tasks.Task) -> WorldModel:
    f = artifacts.load_artifact(path, task, kinds=("world_model",))
    params = artifacts.unflatten(f, "model/params")
    n_members = sum(k.startswith("member_") for k in params)
    member = params.get("member_0", {})
    hidden = tuple(np.shape(member.get(f"layer_{i}", {}).get("kernel"))[-1] for i in range(len(member) - 1))
    in_dim, out_dim = task.obs_dim + task.act_dim, task.obs_dim + 1
    artifacts.check_shapes(params, jax.eval_shape(lambda: init_ensemble(jax.random.PRNGKey(0), in_dim, out_dim, hidden,
                                                                        n_members)), path, "model/params")
    elites = f["model/elites"]
    if f["model/input_mean"].shape != (in_dim,) or f["model/input_std"].shape != (in_dim,) or not (
            elites.ndim == 1 and len(set(elites.tolist())) == len(elites) > 0 and 0 <= elites.min() <= elites.max() < n_members):
        raise artifacts.CorruptArtifact(f"artifact {path}: input statistics or elites {elites.tolist()} do not fit "
                                        f"its {n_members} members and input size {in_dim}")
    params = {"max_logvar": params["max_logvar"], "min_logvar": params["min_logvar"],
              **{f"member_{j}": params[f"member_{e}"] for j, e in enumerate(elites)}}  # elites only, renumbered
    # 0 .. num_elites - 1 (ModelNoise.member indexes these); their ids among all members are model/elites
    params = jax.tree.map(jnp.asarray, params)
    return WorldModel(params, jnp.asarray(f["model/input_mean"]), jnp.asarray(f["model/input_std"]),
                      float(f["model/reward_scale"]), float(f["model/reward_shift"]), str(f["model/dataset_path"]))


def check_dataset(wm: WorldModel, wm_path, ds: tasks.Dataset, ds_fingerprint: dict):
    """Later stages must train on the data the model was fitted to: compare the dataset's content
    (sha256) with the one the model records. A model from before fingerprints is checked by file
    name only (the built-in files carry the generator version, so a model of older data is caught)."""
    record, inputs = artifacts.provenance(wm_path)
    if inputs is None:
        tasks.warn(f"world model {wm_path} predates fingerprints: its dataset is checked by file name only "
                   f"(retrain it to have the content checked)")
        if wm.dataset and Path(wm.dataset).name != Path(ds.path).name:
            raise tasks.InputError(f"world model {wm_path} was trained on {Path(wm.dataset).name}, but this run "
                                   f"uses {Path(ds.path).name}: delete it to retrain, or pass --world-model")
        return record
    artifacts.check_inputs(f"world model {wm_path}", inputs, {"dataset": ds_fingerprint},
                           "pass the world model of this dataset with --world-model, or retrain it")
    return record


def save_world_model(path, task, args, params, mean, std, elites, mse, ds: tasks.Dataset, epochs, inputs, extra=None):
    arrays = {**(extra or {}), **artifacts.flatten(jax.device_get(params), "model/params"),
              "model/input_mean": mean, "model/input_std": std, "model/elites": np.asarray(elites),
              "model/holdout_mse": np.asarray(mse), "model/epochs": np.array(epochs),
              "model/reward_scale": np.array(ds.reward_scale),
              "model/reward_shift": np.array(ds.reward_shift),
              "model/dataset_path": np.array(os.path.realpath(ds.path))}  # one path per file: same content, same fingerprint
    artifacts.save_npz(path, arrays, "world_model", task, args, inputs)


# ============================================================================================
# Main
# ============================================================================================

# settings a world-model checkpoint may be resumed with changed (the classifier trains after the ensemble)
CHECKPOINT_IGNORES = ("resume", "overwrite", "max_epochs", "out", "learn_termination", "termination_only", "termination_lr",
                      "termination_holdout_size", "termination_max_epochs")


def train(args: Args) -> Path:
    from tqdm import tqdm
    args = resolve(args)
    # TRY NOT TO MODIFY: the output (locked), a checkpoint to resume, the dataset and its fingerprint
    task = tasks.get_task(args.env)
    out = path_or_default(args.out, args.env, args.seed)
    artifacts.check_output_file(out, "world_model")
    ckpt = out.with_name(out.name.replace(".npz", "") + ".ckpt.npz")
    with artifacts.FolderLock(out.with_name(out.name + ".lock"), f"world model {out}"):
        if args.termination_only:
            return add_termination(args, task, out, tasks.load_dataset(task, args.dataset_path, args.data_dir))
        existing = artifacts.existing_output(out, "world model", task, "world_model", args, ("resume",))
        saved = (artifacts.read_checkpoint(ckpt, task, "world_model_checkpoint", args, CHECKPOINT_IGNORES)
                 if args.resume and ckpt.exists() else None)  # before any work
        ds = tasks.load_dataset(task, args.dataset_path, args.data_dir)
        recorded = saved["meta/inputs"] if saved else {}
        inputs = {"dataset": artifacts.file_fingerprint(ds.path, [(recorded or {}).get("dataset")])}
        if existing and artifacts.finished_output(out, "world model", existing, inputs):
            return out  # the same command again: its file is there
        if saved:
            artifacts.check_inputs(f"checkpoint {ckpt}", recorded, inputs,
                                   "use the dataset it was made from, or delete the checkpoint to start over")
        # ALGO LOGIC: holdout split, bootstrap resamples, standardised inputs, the ensemble and Adam
        rng = np.random.default_rng(args.seed)
        x_tr, y_tr, x_ho, y_ho, mean, std = make_training_data(ds, args.holdout_size, rng)
        boot_idx = rng.integers(0, len(x_tr), (args.ensemble_size, len(x_tr))).astype(np.int32)
        if len(x_tr) < args.batch_size or len(x_ho) < 1:
            raise tasks.InputError(f"dataset has {len(x_tr)} training transitions, fewer than a batch, "
                                   f"or no holdout ({len(x_ho)})")
        x_train, y_train = jnp.asarray((x_tr - mean) / std), jnp.asarray(y_tr)
        x_hold, y_hold = jnp.asarray((x_ho - mean) / std), jnp.asarray(y_ho)

        key_init = jax.random.PRNGKey(args.seed)
        params = init_ensemble(key_init, x_tr.shape[1], y_tr.shape[1], args.hidden_dims, args.ensemble_size)
        optimizer = optax.adam(args.lr)
        state = TrainState(params, optimizer.init(params), params, jnp.full(args.ensemble_size, 1e10, jnp.float32))
        epoch, since = 0, 0
        if saved:  # a previous run of this config was interrupted
            state = artifacts.tree_from_arrays(state, saved, "state")
            epoch, since = int(saved["progress/epoch"]), int(saved["progress/since"])
            print(f"[world_model] resuming from {ckpt} at epoch {epoch}")
        train_epoch = make_epoch_fn(args, optimizer, x_train, y_train)

        start = time.time()
        bar = tqdm(desc=f"world model {args.env}", unit="epoch", total=args.max_epochs, initial=epoch)
        cli.STOP.armed = True  # a SIGINT/SIGTERM stops after the epoch's checkpoint
        while since < args.patience and (args.max_epochs is None or epoch < args.max_epochs):
            state, loss = train_epoch(state, shuffle_bootstrap(boot_idx, args.seed, epoch))
            mse = holdout_mse(state.params, x_hold, y_hold)
            state, improved = snapshot_improved(state, mse, args.improvement)
            since = 0 if bool(improved.any()) else since + 1
            # TRY NOT TO MODIFY: the NaN guard, checkpoint, progress, signals
            artifacts.check_finite({"loss": np.isfinite(float(loss)), "holdout mse": np.isfinite(np.asarray(mse)).all()},
                                   1, epoch, True, ckpt, "epoch")  # index 1 = finite, 0 = at this epoch
            epoch += 1
            save_checkpoint(ckpt, task, args, state, epoch, since, inputs)
            bar.update(1)
            decay = float(decay_loss(state.params, args.weight_decay))  # the loss's third part, at epoch end
            bar.set_postfix_str(f"loss {float(loss):.3f} + decay {decay:.3f} | holdout mse "
                                f"{' '.join(f'{m:.2e}' for m in np.asarray(mse))} | since {since}")
            cli.stop_if_requested(f"after epoch {epoch}, saved in {ckpt}")
        cli.STOP.armed = False
        bar.close()
        best_mse = np.asarray(state.best_mse)
        elites = np.sort(np.argsort(best_mse)[:args.num_elites])
        extra = None
        if args.learn_termination:
            params, summary = train_termination(args, ds, (mean, std))
            extra = {**artifacts.flatten(jax.device_get(params), "termination"), **summary}
        save_world_model(out, task, args, state.best_params, mean, std, elites, best_mse, ds, epoch, inputs, extra)
        ckpt.unlink(missing_ok=True)
    print(f"[world_model] {epoch} epochs in {time.time() - start:.0f} s; elites {elites.tolist()} "
          f"holdout mse {' '.join(f'{m:.3e}' for m in best_mse[elites])}; wrote {out}")
    return out


def save_checkpoint(path, task, args, state: TrainState, epoch, since, inputs):
    arrays = artifacts.tree_arrays(jax.device_get(state), "state")
    arrays.update({"progress/epoch": np.array(epoch), "progress/since": np.array(since)})
    artifacts.save_npz(path, arrays, "world_model_checkpoint", task, args, inputs)


if __name__ == "__main__":
    cli.run_script(train, Args)
