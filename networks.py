"""The actor and the critic of LEQ (docs/ALGORITHM.md, section 4), and reading them from artifacts.

pretrain.py trains them first (BC, FQE), leq.py goes on training them, evaluate.py runs the actor;
all three import them from here, so a change to a network is made in one place.
  * Actor: MLP 3 x 256, ReLU, input symlog((s - mu_s) / std_s); action tanh(mean)
  * Critic: [Dense, LayerNorm, ReLU] x 3 -> Dense(1), input symlog(((s, a) - mu) / std)
  * Nets: both as pure functions of (params, inputs) with the input statistics fixed
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


def actor_from_artifact(f: dict, task: Optional[tasks.Task] = None, path="artifact"):
    """load_actor for an artifact already read with artifacts.load_artifact; the actor's arrays
    and statistics must have the shapes of an actor of its hidden sizes (one line if not)."""
    task = task or tasks.get_task(str(f["meta/env"]))
    actor = jax.tree.map(jnp.asarray, artifacts.unflatten(f, "actor"))
    try:
        hidden = hidden_dims_of(actor)
    except (KeyError, IndexError):
        raise artifacts.CorruptArtifact(f"artifact {path}: its actor has no Dense layers") from None
    nets = make_nets(task, hidden, (f["stats/mean"], f["stats/std"]))
    template = jax.eval_shape(lambda: init_params(nets, jax.random.PRNGKey(0), task.obs_dim, task.act_dim))[0]
    artifacts.check_shapes(actor, template, path, "actor")
    if f["stats/mean"].shape != (task.obs_dim + task.act_dim,) or f["stats/std"].shape != f["stats/mean"].shape:
        raise artifacts.CorruptArtifact(f"artifact {path}: input statistics of shape {f['stats/mean'].shape}, "
                                        f"but {task.name} needs ({task.obs_dim + task.act_dim},)")
    return task, nets, actor
