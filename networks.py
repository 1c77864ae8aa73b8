"""The actor and the critic of LEQ (docs/ALGORITHM.md, section 4), and reading them from artifacts.

pretrain.py trains them first (BC, FQE), leq.py goes on training them, evaluate.py runs the actor;
all three import them from here, so a change to a network is made in one place.
  * Actor: MLP 3 x 256, ReLU, input symlog((s - mu_s) / std_s); action tanh(mean); for the
    stochastic-policy ablation also a log-std head, action tanh(mean + sigma eps)
  * Critic: [Dense, LayerNorm, ReLU] x 3 -> Dense(1), input symlog(((s, a) - mu) / std); for the
    MOBILE ablation an ensemble of them (min over the critics)
  * Nets: both as pure functions of (params, inputs) with the input statistics fixed
  * TerminationClassifier: MLP 3 x 256 -> logit of done(s'), for the learned-termination ablation
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import artifacts
import tasks

ACTOR_LOG_STD = 0.0  # the release's state-independent log-std never gets a gradient: exactly 0
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the stochastic actor's log-std is clipped to this range (as the release)


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
            x = nn.relu(LayerNorm()(dense(h)(x)))
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


def critic_ensemble(nets: Nets, first, key, num_critics: int, obs_dim: int, act_dim: int):
    """N stacked critics: `first` (a single critic's parameters, e.g. the FQE critic) and N - 1
    freshly initialised ones (as MOBILE's critics, which differ by their initialisation only)."""
    s, a = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    others = [nets.critic.init(k, s, a, nets.stats) for k in jax.random.split(key, num_critics - 1)]
    return jax.tree.map(lambda *x: jnp.stack(x), first, *others)


def with_log_std_head(nets: Nets, actor, key, obs_dim: int, init_log_std: float):
    """A deterministic actor's parameters plus the stochastic actor's `log_std` head: kernel
    orthogonal with scale 1e-3 (the release's init; tiny, so log_std starts near init_log_std in
    every state) and bias init_log_std. The trunk and the mean head are kept as they are (the BC
    actor's), so tanh(mean) is unchanged."""
    fresh = nets.actor.init(key, jnp.zeros((1, obs_dim)), nets.stats, True)
    head = {"kernel": fresh["params"]["log_std"]["kernel"],
            "bias": jnp.full(nets.actor.act_dim, init_log_std, jnp.float32)}
    return {**actor, "params": {**actor["params"], "log_std": head}}


class TerminationClassifier(nn.Module):
    """The learned termination function: MLP (3 x 256, ReLU, as the actor) on symlog((s' - mu_s)
    / std_s) -> the logit of done(s'); done when the logit >= 0 (probability >= 1/2)."""
    hidden_dims: Sequence[int] = (256, 256, 256)

    @nn.compact
    def __call__(self, s2, stats):
        mean, std = stats  # the world model's statistics of [s, a]; s' uses the s part
        x = symlog((s2 - mean[: s2.shape[-1]]) / std[: s2.shape[-1]])
        for h in self.hidden_dims:
            x = nn.relu(dense(h)(x))
        return dense(1)(x)[..., 0]



# ============================================================================================
# Reading the networks back from an artifact
# ============================================================================================

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



def load_actor(path, task: Optional[tasks.Task] = None):
    """(task, nets, actor params) from ANY artifact holding an actor (pretrain.npz, leq.npz, a
    leq checkpoint); the task comes from the artifact when not given."""
    return actor_from_artifact(artifacts.load_artifact(path, task, need="actor"), task, path)


def num_critics_of(critic_params) -> int:
    """1 for a single critic, N for N stacked critics (their kernels have a leading axis)."""
    kernel = critic_params["params"]["Dense_0"]["kernel"]
    return 1 if kernel.ndim == 2 else int(kernel.shape[0])


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
    critics = num_critics_of(artifacts.unflatten(f, "critic")) if "critic/params/Dense_0/kernel" in f else 1
    nets = make_nets(task, hidden, (f["stats/mean"], f["stats/std"]), critics)
    if f["stats/mean"].shape != (task.obs_dim + task.act_dim,) or f["stats/std"].shape != f["stats/mean"].shape:
        raise artifacts.CorruptArtifact(f"artifact {path}: input statistics of shape {f['stats/mean'].shape}, "
                                        f"but {task.name} needs ({task.obs_dim + task.act_dim},)")
    stochastic = isinstance(actor.get("params"), dict) and "log_std" in actor["params"]
    template = jax.eval_shape(lambda: nets.actor.init(jax.random.PRNGKey(0), jnp.zeros((1, task.obs_dim)),
                                                      nets.stats, stochastic))
    artifacts.check_shapes(actor, template, path, "actor")
    return task, nets, actor
