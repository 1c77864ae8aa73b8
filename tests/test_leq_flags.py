"""Every ablation switch of docs/ALGORITHM.md, section 7 changes the computation it names, and nothing else."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from leq_utils import artifacts
import leq
import pretrain
from leq_utils import tasks
import world_model

H, B = 4, 16


@pytest.fixture(scope="module")
def setup():
    task = tasks.get_task("pointmaze-umaze")
    stats = (jnp.zeros(6), jnp.ones(6))
    wm = world_model.WorldModel(world_model.init_ensemble(jax.random.PRNGKey(0), 6, 5, (16,), 3), *stats, 1.0, -1.0)
    nets = pretrain.make_nets(task, (16, 16), stats)
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(1), 4, 2)
    ema = jax.tree.map(lambda x: x * 0.9, critic)  # an EMA copy that differs from the critic
    st = leq.LEQState(actor, critic, ema, None, None)
    s0 = jax.random.normal(jax.random.PRNGKey(2), (B, 4))
    batch = tasks.Transitions(jax.random.normal(jax.random.PRNGKey(3), (B, 4)),
                              jnp.tanh(jax.random.normal(jax.random.PRNGKey(4), (B, 2))),
                              -jnp.ones(B), jax.random.normal(jax.random.PRNGKey(5), (B, 4)), jnp.ones(B))

    def done_fn(s, a, s2):
        return s2[..., 0] - s[..., 0] > 0.4
    return task, wm, nets, st, s0, batch, done_fn


def parts(setup, nets=None, st=None, **flags):
    """Actor gradient and critic gradient + loss terms under the given flags (and networks)."""
    task, wm, nets_, st_, s0, batch, done_fn = setup
    nets, st = nets or nets_, st or st_
    args = dataclasses.replace(leq.resolve(leq.Args(horizon=H, expectile=0.2)), **flags)
    key_a, key_c = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    g_actor, m_actor = jax.jit(leq.make_actor_grads(nets, wm, done_fn, args))(st, s0, key_a)
    g_critic, m_critic = jax.jit(leq.make_critic_grads(nets, wm, done_fn, args))(st, batch, s0, key_c)
    return g_actor, g_critic, {**m_actor, **m_critic}


def same(a, b):
    return all(np.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def base(setup):
    return parts(setup)


@pytest.mark.parametrize("target", ["hstep", "1step"])
def test_critic_target_changes_only_the_model_term(setup, base, target):
    g_actor, g_critic, m = parts(setup, critic_target=target)
    assert same(g_actor, base[0]) and not same(g_critic, base[1])
    assert m["loss_model"] != pytest.approx(float(base[2]["loss_model"]))
    for k in ("loss_data", "loss_ema", "q_data"):
        assert m[k] == pytest.approx(float(base[2][k]))


@pytest.mark.parametrize("objective", ["hstep", "q"])
def test_actor_objective_changes_only_the_actor(setup, base, objective):
    g_actor, g_critic, m = parts(setup, actor_objective=objective)
    assert not same(g_actor, base[0]) and same(g_critic, base[1])


def test_no_ema(setup, base):
    g_actor, g_critic, m = parts(setup, no_ema=True)
    assert float(m["loss_ema"]) == 0.0 and float(base[2]["loss_ema"]) > 0
    assert same(g_actor, base[0]) and not same(g_critic, base[1])
    for k in ("loss_data", "loss_model"):
        assert m[k] == pytest.approx(float(base[2][k]))
    beta = 0.25
    assert float(m["critic_loss"]) == pytest.approx(
        (1 - beta) * float(base[2]["loss_data"]) + beta * float(base[2]["loss_model"]))


def test_no_data_loss(setup, base):
    g_actor, g_critic, m = parts(setup, no_data_loss=True)
    assert same(g_actor, base[0]) and not same(g_critic, base[1])
    for k in ("loss_data", "loss_model", "loss_ema"):
        assert m[k] == pytest.approx(float(base[2][k]))
    assert float(m["critic_loss"]) == pytest.approx(0.25 * float(base[2]["loss_model"]) + float(base[2]["loss_ema"]))


def test_data_expectile(setup, base):
    g_actor, g_critic, m = parts(setup, data_expectile=True)
    assert same(g_actor, base[0]) and not same(g_critic, base[1])
    assert m["loss_data"] != pytest.approx(float(base[2]["loss_data"]))
    for k in ("loss_model", "loss_ema"):
        assert m[k] == pytest.approx(float(base[2][k]))


@pytest.mark.slow
def test_jacobian_action_gradients_give_the_same_update(setup, base):
    g_actor, g_critic, m = parts(setup, action_grad="jacobian")
    for x, y in zip(jax.tree.leaves(g_actor), jax.tree.leaves(base[0])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert same(g_critic, base[1])


def test_horizon_changes_the_imagination(setup, base):
    task, wm, nets, st, s0, batch, done_fn = setup
    args = dataclasses.replace(leq.resolve(leq.Args(horizon=H)), horizon=H + 2)
    D, ro, q, masks = jax.jit(lambda k: leq.action_grads_adjoint(
        nets, st.actor, st.critic, wm, done_fn, s0, k, args.horizon,
        leq.return_coefficients("lambda", args.horizon, args.lam), args.gamma))(jax.random.PRNGKey(7))
    assert ro.states.shape[0] == H + 3 and D.shape[0] == H + 3


@pytest.mark.slow
def test_independent_rollouts(setup):
    task, wm, nets, st, s0, batch, done_fn = setup
    data = tasks.Transitions(*(jnp.concatenate([x] * 4) for x in batch))
    results = {}
    for independent in (True, False):
        args = dataclasses.replace(leq.resolve(leq.Args(horizon=H, batch_size=B, model_batch_size=B)),
                                   independent_rollouts=independent)
        opt = optax.adam(1e-3)
        state = st._replace(actor_opt=opt.init(st.actor), critic_opt=opt.init(st.critic))
        update = leq.make_update(nets, wm, done_fn, opt, opt, args)
        results[independent] = jax.jit(update)(state, data, s0, B, jax.random.PRNGKey(9))
    (st_ind, _), (st_same, _) = results[True], results[False]
    assert same(st_ind.actor, st_same.actor)            # the actor's side is untouched
    assert not same(st_ind.critic, st_same.critic)      # the critic imagines with other samples


def test_no_expansion_draws_starts_from_the_dataset():
    data = tasks.Transitions(jnp.arange(10.0)[:, None], *([None] * 4))
    buf = leq.empty_buffer(20, 1, 1)._replace(filled=jnp.array(7))
    args = leq.resolve(leq.Args())
    starts, n = leq.start_states(args, data, buf)
    assert starts is buf.observations and int(n) == 7
    starts, n = leq.start_states(dataclasses.replace(args, no_expansion=True), data, buf)
    assert starts is data.observations and n == 10


def test_no_pretrain_starts_from_fresh_networks(tmp_path):
    task = tasks.get_task("pointmaze-umaze")
    stats = (np.zeros(6, np.float32), np.ones(6, np.float32))
    nets = pretrain.make_nets(task, (256, 256, 256), stats)
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(11), 4, 2)
    actor = jax.tree.map(lambda x: x + 1.0, actor)  # a "trained" actor
    arrays = {**artifacts.flatten(actor, "actor"), **artifacts.flatten(critic, "critic"),
              **artifacts.flatten(critic, "critic_ema"), "stats/mean": stats[0], "stats/std": stats[1]}
    path = tmp_path / "pretrain.npz"
    artifacts.save_npz(path, arrays, "pretrain", task, {})
    wm = world_model.WorldModel({}, jnp.asarray(stats[0]), jnp.asarray(stats[1]), 1.0, -1.0)
    args = leq.resolve(leq.Args())
    _, a_pre, c_pre = leq.initial_networks(args, task, wm, path, jax.random.PRNGKey(0))
    _, a_new, c_new = leq.initial_networks(dataclasses.replace(args, no_pretrain=True), task, wm, path,
                                           jax.random.PRNGKey(0))
    assert same(a_pre, actor) and same(c_pre, critic)
    assert not same(a_new, actor) and jax.tree.structure(a_new) == jax.tree.structure(actor)


# --------------------------------------------------------------------------------------------
# The ablations of Tables 5/6 (MOBILE's penalty), 21 (stochastic policy), 22 (learned termination)
# --------------------------------------------------------------------------------------------

MOBILE = dict(conservatism="mobile", num_critics=1)


def test_num_critics_default_follows_the_conservatism():
    assert leq.resolve(leq.Args()).num_critics == 1
    assert leq.resolve(leq.Args(conservatism="mobile")).num_critics == 2      # MOBILE's default
    assert leq.resolve(leq.Args(conservatism="mobile", num_critics=1)).num_critics == 1


@pytest.mark.slow
def test_mobile_without_penalty_is_the_expectile_one_half(setup):
    """MOBILE's conservatism with beta = 0 and one critic is LEQ with tau = 1/2 (plain squared
    error) in the critic's model term and the actor's weights, exactly."""
    g_actor, g_critic, m = parts(setup, mobile_beta=0.0, **MOBILE)
    ref = parts(setup, expectile=0.5)
    assert same(g_actor, ref[0]) and same(g_critic, ref[1])
    for k in ("loss_data", "loss_model", "loss_ema", "return_model"):
        assert m[k] == pytest.approx(float(ref[2][k]), rel=1e-6)


@pytest.mark.slow
def test_mobile_penalty_changes_only_the_imagined_rewards(setup):
    zero = parts(setup, mobile_beta=0.0, **MOBILE)
    g_actor, g_critic, m = parts(setup, mobile_beta=0.5, **MOBILE)
    assert float(m["penalty"]) > 1e-3 and float(zero[2]["penalty"]) == float(m["penalty"])
    assert not same(g_actor, zero[0]) and not same(g_critic, zero[1])
    assert m["loss_model"] != pytest.approx(float(zero[2]["loss_model"]))
    assert m["target_model"] < float(zero[2]["target_model"])  # a penalty lowers the targets
    for k in ("loss_data", "loss_ema", "q_data", "q_model", "done_rate"):
        assert m[k] == pytest.approx(float(zero[2][k]), rel=1e-6)


@pytest.mark.slow
def test_mobile_penalty_does_not_reach_the_q_objective(setup):
    """The q actor objective has no reward terms: the penalty changes only the critic there."""
    g_actor, g_critic, _ = parts(setup, mobile_beta=0.5, actor_objective="q", **MOBILE)
    ref = parts(setup, mobile_beta=0.0, actor_objective="q", **MOBILE)
    assert same(g_actor, ref[0]) and not same(g_critic, ref[1])


@pytest.mark.slow
def test_two_identical_critics_train_like_one(setup, base):
    """An ensemble of two copies of the critic: the min of equal values is that value, the loss
    sums the critics' terms, so each copy gets the single critic's gradient and the actor's is unchanged."""
    task, wm, nets, st, s0, batch, done_fn = setup
    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)  # noqa: E731
    st2 = st._replace(critic=stack(st.critic), critic_ema=stack(st.critic_ema))
    g_actor, g_critic, m = parts(setup, nets=nets._replace(num_critics=2), st=st2, num_critics=2)
    assert same(g_actor, base[0])
    for j in range(2):
        assert same(jax.tree.map(lambda x: x[j], g_critic), base[1])
    for k in ("loss_data", "loss_model", "loss_ema"):
        assert m[k] == pytest.approx(2 * float(base[2][k]), rel=1e-6)
    assert m["q_data"] == pytest.approx(float(base[2]["q_data"]), rel=1e-6)


@pytest.fixture(scope="module")
def stochastic_state(setup):
    task, wm, nets, st, s0, batch, done_fn = setup
    return st._replace(actor=leq.with_log_std_head(nets, st.actor, jax.random.PRNGKey(12), 4, 0.0))


def test_stochastic_policy_with_zero_noise_is_the_deterministic_actor(setup, base, stochastic_state, monkeypatch):
    """With eps = 0 every sample is tanh(mean): without the entropy bonus the stochastic switch
    gives the trunk and mean head the deterministic actor's gradient, the log-std head none, and
    the critic the deterministic critic's gradient (so it changes only the actions' noise and the bonus)."""
    monkeypatch.setattr(leq, "policy_noise", lambda key, shape: jnp.zeros(shape))
    g_actor, g_critic, m = parts(setup, st=stochastic_state, policy="stochastic", entropy_coef=0.0)
    head = g_actor["params"].pop("log_std")
    assert same(g_actor, base[0]) and same(g_critic, base[1])
    assert not np.any(np.asarray(head["kernel"])) and not np.any(np.asarray(head["bias"]))


@pytest.mark.slow
def test_stochastic_policy_samples_and_its_entropy_coefficient_changes_only_the_actor(setup, base, stochastic_state):
    g0 = parts(setup, st=stochastic_state, policy="stochastic", entropy_coef=0.0)
    g1 = parts(setup, st=stochastic_state, policy="stochastic", entropy_coef=0.5)
    assert not same(g0[1], base[1])  # sampled actions in the critic's rollout and target
    assert not same(g0[0], g1[0]) and same(g0[1], g1[1])
    assert float(g1[2]["entropy_loss"]) != 0.0 and float(g0[2]["entropy_loss"]) == 0.0
