"""Each speed trick the code keeps against its plain JAX form (docs/PERFORMANCE_PLAIN_JAX.md):
the same values and gradients to float32 rounding. Small sizes, fixed seeds, a few seconds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leq_utils import tasks
import world_model

OBS, ACT = 4, 2


def random_elites(seed, members=5, hidden=(32, 32)):
    """Random elites whose outputs clearly differ (spread output biases, per-dimension bounds)."""
    rng = np.random.default_rng(seed)
    params = world_model.init_ensemble(jax.random.PRNGKey(seed), OBS + ACT, OBS + 1, hidden, members)
    for e in range(members):
        last = params[f"member_{e}"][f"layer_{len(hidden)}"]
        last["bias"] = jnp.asarray(np.r_[rng.normal(0, 0.7, OBS + 1), rng.uniform(-3, -0.5, OBS + 1)], jnp.float32)
    params["max_logvar"] = jnp.asarray(rng.uniform(-1, 0.5, OBS + 1), jnp.float32)
    params["min_logvar"] = jnp.asarray(rng.uniform(-8, -5, OBS + 1), jnp.float32)
    return params


def vmapped_ensemble_forward(params, x):
    """The plain form of world_model.ensemble_forward: one jax.vmap of member_forward over the
    members' parameters stacked on a leading axis."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *world_model.members(params))
    out = jax.vmap(world_model.member_forward, in_axes=(0, None if x.ndim == 2 else 0))(stacked, x)
    return world_model.gaussian_head(params, out)


@pytest.mark.parametrize("shared", [True, False])
def test_ensemble_forward_equals_vmapped_members(shared):
    """world_model.ensemble_forward (the members one after another) equals the vmap over the
    stacked members in mean and log-variance, and so does the gradient of the ensemble's loss
    (NLL, log-variance bounds and weight decay, as world_model.loss_grads takes it) w.r.t. every
    parameter and the inputs; x shared by the members (holdout, picked_forward's fallback) or one
    batch each (training), 7 members as the default ensemble."""
    params = random_elites(6, members=7)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(64, OBS + ACT) if shared else (7, 64, OBS + ACT)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(7, 64, OBS + 1)), jnp.float32)
    for got, want in zip(jax.jit(world_model.ensemble_forward)(params, x), jax.jit(vmapped_ensemble_forward)(params, x)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    wd = (2.5e-2, 5e-2, 1e-1)

    def loss(forward):
        def total(params, x):
            mean, logvar = forward(params, x)
            nll = jnp.mean((mean - y) ** 2 * jnp.exp(-logvar), axis=(1, 2)) + jnp.mean(logvar, axis=(1, 2))
            return (jnp.sum(nll) + 0.01 * jnp.sum(params["max_logvar"]) - 0.01 * jnp.sum(params["min_logvar"])
                    + world_model.decay_loss(params, wd))
        return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))

    (got_loss, got), (want_loss, want) = loss(world_model.ensemble_forward)(params, x), loss(vmapped_ensemble_forward)(params, x)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = max(float(jnp.abs(w).max()), 1.0)  # sums over the 64 rows: float32 rounding of the sum
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def members_drawn(case, n, rng):
    if case == "uniform":        # as model_noise draws them: the grouped path
        return rng.integers(0, 5, n)
    return rng.permutation(np.r_[np.zeros(n // 2, int), rng.integers(1, 5, n - n // 2)])  # member 0 over capacity


@pytest.mark.parametrize("case", ["uniform", "over_capacity"])
def test_picked_forward_equals_every_member_then_pick(case):
    """picked_forward (each elite on its own rows) equals every_member_then_pick (every elite on
    every row, then pick) in mean and log-variance and in their gradients w.r.t. the parameters
    and the inputs, at LEQ's model batch of 256 rows and 5 elites, on the grouped path and on the
    fallback."""
    params = random_elites(1)
    rng = np.random.default_rng(2)
    n = 256
    x = jnp.asarray(rng.normal(size=(n, OBS + ACT)), jnp.float32)
    member = jnp.asarray(members_drawn(case, n, rng))
    cot = jnp.asarray(rng.normal(size=(2, n, OBS + 1)), jnp.float32)

    def objective(forward):
        return lambda p, x: sum(jnp.sum(v * c) for v, c in zip(forward(p, x, member), cot))

    for got, want in zip(jax.jit(world_model.picked_forward)(params, x, member),
                         jax.jit(world_model.every_member_then_pick)(params, x, member)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    got = jax.jit(jax.grad(objective(world_model.picked_forward), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(objective(world_model.every_member_then_pick), argnums=(0, 1)))(params, x)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        # a parameter's gradient is a sum over the 256 rows: float32 rounding of that sum, relative
        # to the leaf's largest entry (a small entry can be the difference of large terms)
        scale = max(float(jnp.abs(w).max()), 1.0)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_model_step_through_picked_forward_equals_plain_step():
    """model_step_given (picked_forward inside) equals the step written with every_member_then_pick,
    and so do d(s', r)/d(s, a), for a (10, 256) batch as LEQ's imagination draws it."""
    params = random_elites(3)
    rng = np.random.default_rng(4)
    wm = world_model.WorldModel(params, jnp.asarray(rng.normal(size=OBS + ACT), jnp.float32),
                                jnp.asarray(rng.uniform(0.5, 2, OBS + ACT), jnp.float32), 2.0, -0.5)
    done_fn = tasks.termination_fn(tasks.get_task("pointmaze-umaze"))
    s = jnp.asarray(rng.normal(size=(10, 256, OBS)), jnp.float32)
    a = jnp.asarray(rng.uniform(-1, 1, size=(10, 256, ACT)), jnp.float32)
    member, eps = world_model.model_noise(wm, jax.random.PRNGKey(5), (10, 256))

    def plain_step(wm, s, a, member, eps, done_fn):
        x = (jnp.concatenate([s, a], -1) - wm.input_mean) / wm.input_std
        mu, logvar = world_model.every_member_then_pick(wm.params, x.reshape(-1, x.shape[-1]), member.reshape(-1))
        sample = (mu + jnp.exp(0.5 * logvar) * eps.reshape(mu.shape)).reshape(*s.shape[:-1], -1)
        return s + sample[..., :-1], wm.reward_scale * sample[..., -1] + wm.reward_shift, done_fn(s, a, s + sample[..., :-1])

    def outputs(step):
        return jax.jit(lambda s, a: step(wm, s, a, member, eps, done_fn))

    def summed(step):
        return jax.jit(jax.grad(lambda s, a: sum(jnp.sum(v) for v in step(wm, s, a, member, eps, done_fn)[:2]),
                                argnums=(0, 1)))

    for got, want in zip(outputs(world_model.model_step_given)(s, a), outputs(plain_step)(s, a)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    for got, want in zip(summed(world_model.model_step_given)(s, a), summed(plain_step)(s, a)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
