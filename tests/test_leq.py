"""LEQ's maths against slow, independent references (docs/ALGORITHM.md, sections 5 and 7)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import leq
import pretrain
from leq_utils import tasks
import world_model

GAMMA, LAM = 0.997, 0.95


# --------------------------------------------------------------------------------------------
# lambda-returns: the closed form sum_n lam^n Q^(n) / sum_n lam^n, by plain loops
# --------------------------------------------------------------------------------------------

def n_step_return(q, r, m, t, n, gamma):
    """Q^(0)_t = q_t; Q^(n)_t = sum_{k<n} gamma^k m_{t+k} r_{t+k} + gamma^n m_{t+n} q_{t+n} for
    n >= 1 (0/1 alive masks: rewards after a termination and the bootstrap are dropped)."""
    if n == 0:
        return q[t]
    total = sum(gamma ** k * m[t + k] * r[t + k] for k in range(n))
    return total + gamma ** n * m[t + n] * q[t + n]


def reference_lambda_returns(q, r, m, gamma, lam):
    H = len(r)
    out = []
    for t in range(H + 1):
        num = sum(lam ** n * n_step_return(q, r, m, t, n, gamma) for n in range(H - t + 1))
        out.append(num / sum(lam ** n for n in range(H - t + 1)))
    return np.array(out)


def random_trajectories(rng, H, B):
    q = rng.normal(size=(H + 1, B)) * 5
    r = rng.normal(size=(H, B))
    dones = np.zeros((H, B))
    for b in range(B):  # terminate half the samples somewhere inside the horizon
        if b % 2 == 0:
            dones[rng.integers(H), b] = 1
    return q, r, dones


def test_lambda_returns_match_closed_form():
    rng = np.random.default_rng(0)
    H, B = 10, 6
    q, r, dones = random_trajectories(rng, H, B)
    masks = np.asarray(leq.alive_masks(jnp.asarray(dones)))
    for b in range(B):  # masks: 1 up to and including the terminal step's state, 0 after
        t_done = np.flatnonzero(dones[:, b])
        want = np.ones(H + 1) if not len(t_done) else (np.arange(H + 1) <= t_done[0]).astype(float)
        np.testing.assert_array_equal(masks[:, b], want)
    got = np.asarray(leq.lambda_returns(jnp.asarray(q), jnp.asarray(r), jnp.asarray(masks), GAMMA, LAM))
    for b in range(B):
        want = reference_lambda_returns(q[:, b], r[:, b], masks[:, b], GAMMA, LAM)
        np.testing.assert_allclose(got[:, b], want, rtol=1e-5, atol=1e-5)


def test_hstep_and_one_step_targets():
    rng = np.random.default_rng(1)
    H, B = 5, 4
    q, r, dones = random_trajectories(rng, H, B)
    masks = np.asarray(leq.alive_masks(jnp.asarray(dones)))
    args = leq.resolve(leq.Args(horizon=H))
    hstep = np.asarray(leq.critic_targets("hstep", jnp.asarray(q), jnp.asarray(r), jnp.asarray(masks), args))
    one = np.asarray(leq.critic_targets("1step", jnp.asarray(q), jnp.asarray(r), jnp.asarray(masks), args))
    for b in range(B):
        for t in range(H):
            assert hstep[t, b] == pytest.approx(n_step_return(q[:, b], r[:, b], masks[:, b], t, H - t, GAMMA), rel=1e-5)
            assert one[t, b] == pytest.approx(n_step_return(q[:, b], r[:, b], masks[:, b], t, 1, GAMMA), rel=1e-5)


# --------------------------------------------------------------------------------------------
# A tiny but complete LEQ system (random networks and world model) for the gradient tests
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def system():
    task = tasks.get_task("pointmaze-umaze")
    key = jax.random.PRNGKey(0)
    wm_params = world_model.init_ensemble(key, 6, 5, (32, 32), 3)
    stats = (jnp.zeros(6), jnp.ones(6))
    wm = world_model.WorldModel(wm_params, *stats, 1.0, -1.0)
    nets = pretrain.make_nets(task, (32, 32), stats)
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(1), 4, 2)

    def done_fn(s, a, s2):  # terminations at various steps for some samples, never for others
        return s2[..., 0] - s[..., 0] > 0.45
    s0 = jax.random.normal(jax.random.PRNGKey(2), (24, 4))
    return nets, actor, critic, wm, done_fn, s0


@pytest.mark.parametrize("objective", ["lambda", "hstep", "q"])
def test_adjoint_action_gradients_equal_the_full_jacobian_diagonal(system, objective):
    nets, actor, critic, wm, done_fn, s0 = system
    H = 4
    coefficients = leq.return_coefficients(objective, H, LAM)
    key = jax.random.PRNGKey(3)
    run = lambda fn: jax.jit(lambda k: fn(nets, actor, critic, wm, done_fn, s0, k, H, coefficients, GAMMA))(key)  # noqa: E731
    D_adj, ro, q, masks = run(leq.action_grads_adjoint)
    D_jac, ro2, q2, masks2 = run(leq.action_grads_jacobian)
    np.testing.assert_allclose(ro.states, ro2.states, atol=1e-6)
    np.testing.assert_array_equal(masks, masks2)
    # terminations really happen inside the horizon, at several steps
    died_at = (np.asarray(masks)[1:] == 0).argmax(0)
    assert len(set(died_at[np.asarray(masks)[-1] == 0].tolist())) >= 2 and np.asarray(masks)[-1].sum() >= 1
    scale = float(jnp.abs(D_jac).max())
    np.testing.assert_allclose(D_adj, D_jac, atol=1e-5 * scale, rtol=1e-5)
    assert scale > 1e-3


@pytest.mark.slow
def test_one_grad_of_the_summed_returns_is_not_the_action_gradient(system):
    """The tempting shortcut jax.grad(sum_t G_t) mixes in how a_t moves later G_s."""
    nets, actor, critic, wm, done_fn, s0 = system
    H = 4
    coefficients = leq.return_coefficients("lambda", H, LAM)
    D, ro, q, masks = leq.action_grads_adjoint(nets, actor, critic, wm, done_fn, s0, jax.random.PRNGKey(3), H,
                                               coefficients, GAMMA)
    def summed(deltas):
        return leq.returns_of_perturbation(nets, actor, critic, wm, done_fn, ro, masks, coefficients,
                                           GAMMA, deltas).sum()
    shortcut = jax.grad(summed)(jnp.zeros_like(ro.actions))
    assert not np.allclose(shortcut, D, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Losses against hand computations
# --------------------------------------------------------------------------------------------

class LinearNets:
    """Q(s, a) = w * s[0] + a[0]; pi(s) = 0: simple enough to compute the losses by hand."""
    num_critics = 1

    def q(self, params, s, a):
        return params["w"] * s[..., 0] + a[..., 0]

    def q_each(self, params, s, a):
        return [self.q(params, s, a)]

    def pi(self, params, s):
        return jnp.zeros(s.shape[:-1] + (1,))


def test_expectile_weight_is_conservative():
    G = jnp.array([2.0, 0.0])
    q = jnp.array([1.0, 1.0])
    # target above the prediction -> tau (small): the fit leans to the lower targets
    np.testing.assert_allclose(leq.expectile_weights(G, q, 0.1), [0.1, 0.9])


@pytest.mark.parametrize("data_expectile", [False, True])
def test_critic_loss_terms_by_hand(data_expectile):
    tau, beta, gamma = 0.3, 0.25, 0.9
    args = dataclasses.replace(leq.resolve(leq.Args(horizon=2, lam=0.5, gamma=gamma, expectile=tau, beta=beta)),
                               critic_target="1step", data_expectile=data_expectile)
    nets, critic, ema = LinearNets(), {"w": jnp.array(2.0)}, {"w": jnp.array(1.5)}
    # data: two transitions with constant targets y
    data = tasks.Transitions(jnp.array([[1.0], [3.0]]), jnp.array([[0.5], [-0.5]]), None, None, None)
    y = jnp.array([4.0, 4.0])
    # imagination: one sample, H = 2, terminating at t = 1
    states = jnp.array([[[1.0]], [[2.0]], [[4.0]]])
    actions = jnp.zeros((3, 1, 1))
    ro = leq.Rollout(states, actions, jnp.array([[1.0], [3.0]]), jnp.array([[0.0], [1.0]]), None)
    masks = leq.alive_masks(ro.dones)
    loss, m = leq.critic_loss(critic, ema, nets, data, y, ro, masks, args)

    # by hand
    q_data = [2 * 1 + 0.5, 2 * 3 - 0.5]                     # [2.5, 5.5]
    wd = [(tau if yy > qq else 1 - tau) if data_expectile else 0.5 for yy, qq in zip([4, 4], q_data)]
    L_data = np.mean([w * (4 - qq) ** 2 for w, qq in zip(wd, q_data)])
    q_model = [2.0, 4.0, 8.0]                               # Q(s_t, 0) = 2 s_t
    m_ = [1, 1, 0]                                          # alive weights m_0..m_2
    G = [m_[0] * 1 + gamma * m_[1] * q_model[1], m_[1] * 3 + gamma * m_[2] * q_model[2]]  # 1-step
    w = [gamma ** t * m_[t] for t in range(2)]
    L_model = np.mean([w[t] * (tau if G[t] > q_model[t] else 1 - tau) * (G[t] - q_model[t]) ** 2 for t in range(2)])
    q_ema_model, q_ema_data = [1.5, 3.0], [2.0, 4.0]
    L_ema = (beta * np.mean([w[t] * (q_ema_model[t] - q_model[t]) ** 2 for t in range(2)])
             + (1 - beta) * np.mean([(qe - qd) ** 2 for qe, qd in zip(q_ema_data, q_data)]))
    assert float(m["loss_data"]) == pytest.approx(L_data)
    assert float(m["loss_model"]) == pytest.approx(L_model)
    assert float(m["loss_ema"]) == pytest.approx(L_ema)
    assert float(loss) == pytest.approx((1 - beta) * L_data + beta * L_model + L_ema)

    # gradients flow only through Q_phi: dL/dw by finite differences of the hand formula
    grad = jax.grad(lambda c: leq.critic_loss(c, ema, nets, data, y, ro, masks, args)[0])(critic)["w"]

    def hand(wv):
        qd = [wv * 1 + 0.5, wv * 3 - 0.5]
        qm = [wv * 1, wv * 2]
        ld = np.mean([ww * (4 - qq) ** 2 for ww, qq in zip(wd, qd)])
        lm = np.mean([w[t] * (tau if G[t] > q_model[t] else 1 - tau) * (G[t] - qm[t]) ** 2 for t in range(2)])
        le = (beta * np.mean([w[t] * (q_ema_model[t] - qm[t]) ** 2 for t in range(2)])
              + (1 - beta) * np.mean([(qe - qq) ** 2 for qe, qq in zip(q_ema_data, qd)]))
        return (1 - beta) * ld + beta * lm + le
    assert float(grad) == pytest.approx((hand(2 + 1e-4) - hand(2 - 1e-4)) / 2e-4, rel=1e-3)


def test_actor_surrogate_is_the_weighted_policy_gradient():
    nets = pretrain.make_nets(tasks.get_task("pointmaze-umaze"), (8,), (jnp.zeros(6), jnp.ones(6)))
    actor, _ = pretrain.init_params(nets, jax.random.PRNGKey(0), 4, 2)
    states = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 4))
    W = jnp.array([[0.1] * 5, [0.9] * 5, [0.5] * 5])
    D = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 2))
    g = jax.grad(leq.actor_surrogate_loss)(actor, nets, states, W, D)
    # reference: -(1/N) sum_b sum_t W_t (dpi/dtheta)^T D_t, one vector-Jacobian product per sample
    per_sample = jax.jit(lambda s, d: jax.vjp(lambda p: nets.pi(p, s), actor)[1](d)[0])
    ref = jax.tree.map(jnp.zeros_like, actor)
    for t in range(3):
        for b in range(5):
            ref = jax.tree.map(lambda acc, x: acc - W[t, b] * x / 5, ref, per_sample(states[t, b], D[t, b]))
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Dataset expansion
# --------------------------------------------------------------------------------------------

def test_ring_buffer_keeps_exactly_the_newest_rows():
    buf = leq.empty_buffer(capacity=12, obs_dim=1, act_dim=1)
    written = []
    for i in range(7):  # 7 writes of 4 rows into 12 rows: wraps around twice
        rows = jnp.arange(4 * i, 4 * i + 4, dtype=jnp.float32)
        buf = leq.buffer_add(buf, rows[:, None], rows[:, None], rows, rows[:, None], jnp.ones(4))
        written += rows.tolist()
        newest = written[-12:]
        assert int(buf.filled) == min(len(written), 12)
        assert sorted(np.asarray(buf.observations[: int(buf.filled), 0]).tolist()) == sorted(newest)
    # the next write overwrites the oldest block (rows 16..19), not the newest
    assert int(buf.ptr) == (7 * 4) % 12 and float(buf.observations[int(buf.ptr), 0]) == 16.0


def test_expansion_rollouts(system):
    nets, actor, critic, wm, done_fn, s0 = system
    args = dataclasses.replace(leq.resolve(leq.Args()), expand_size=10, expand_length=3, expand_retain=2)
    expand = leq.make_expand(nets, wm, done_fn, args)
    buf = leq.empty_buffer(60, 4, 2)
    data_obs = jax.random.normal(jax.random.PRNGKey(5), (100, 4))
    buf = expand(buf, actor, data_obs, jax.random.PRNGKey(6))
    assert int(buf.filled) == 30 and int(buf.ptr) == 30
    obs, nxt = np.asarray(buf.observations[:30]).reshape(3, 10, 4), np.asarray(buf.next_observations[:30]).reshape(3, 10, 4)
    # 10 rollouts of 3 consecutive steps from dataset states, not cut at terminations
    np.testing.assert_array_equal(obs[1:], nxt[:-1])
    assert all(any(np.allclose(o, d) for d in np.asarray(data_obs)) for o in obs[0])
    # noisy actions tanh(mean + N(0, 1)) differ from the deterministic ones, and stay in (-1, 1)
    acts = np.asarray(buf.actions[:30])
    assert np.abs(acts).max() < 1 and not np.allclose(acts, np.asarray(nets.pi(actor, buf.observations[:30])), atol=0.05)
    masks = np.asarray(buf.masks[:30])
    np.testing.assert_array_equal(masks, 1 - np.asarray(done_fn(buf.observations[:30], None, buf.next_observations[:30])))
