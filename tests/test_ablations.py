"""The ablations of Tables 5/6 (MOBILE's penalty), 21 (a stochastic policy) and 22 (a learned
termination function) against slow, independent references: plain loops over the elites, the
change-of-variables density, the chain rule through jax.jacrev, numpy forward passes, and the
full Jacobian for every new actor objective."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leq_utils import artifacts
import leq
import pretrain
from leq_utils import tasks
import world_model
from conftest import ROOT
from test_leq import GAMMA, LAM, reference_lambda_returns

H, B = 4, 12
TASK = tasks.get_task("pointmaze-umaze")


def done_fn(s, a, s2):  # terminations at various steps for some samples, never for others
    return s2[..., 0] - s[..., 0] > 0.45


@pytest.fixture(scope="module")
def system():
    """Random world model (3 elites), actor with a state-dependent log-std head, critic."""
    stats = (jnp.zeros(6), jnp.ones(6))
    wm = world_model.WorldModel(world_model.init_ensemble(jax.random.PRNGKey(0), 6, 5, (32, 32), 3), *stats, 1.0, -1.0)
    nets = pretrain.make_nets(TASK, (32, 32), stats)
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(1), 4, 2)
    actor = leq.with_log_std_head(nets, actor, jax.random.PRNGKey(2), 4, -0.5)
    head = actor["params"]["log_std"]  # a head that varies with the state (within the clip range)
    actor["params"]["log_std"] = {"kernel": head["kernel"] * 300.0, "bias": head["bias"]}
    s0 = jax.random.normal(jax.random.PRNGKey(3), (B, 4))
    return nets, actor, critic, wm, s0


def two_critics(nets, critic):
    return nets._replace(num_critics=2), leq.critic_ensemble(nets, critic, jax.random.PRNGKey(9), 2, 4, 2)


def loop_uncertainty(nets, actor, critics, wm, s, a, eps):
    """u(s, a) by plain loops: for every sample and every elite, that elite's next state and
    min over the critics of Q(s'_e, tanh(mean(s'_e))); then the population std over the elites."""
    single = pretrain.make_nets(TASK, (32, 32), nets.stats)
    out = []
    for b in range(s.shape[0]):
        x = (jnp.concatenate([s[b], a[b]]) - wm.input_mean) / wm.input_std
        values = []
        for e, member in enumerate(world_model.members(wm.params)):
            mean, logvar = world_model.gaussian_head(wm.params, world_model.member_forward(member, x[None]))
            s2 = s[b] + mean[0, :-1] + np.exp(0.5 * logvar[0, :-1]) * eps[e, b]
            a2 = single.pi(actor, s2[None])
            values.append(min(float(single.q(c, s2[None], a2)[0]) for c in critics))
        out.append(np.std(values))
    return np.array(out)


# --------------------------------------------------------------------------------------------
# MOBILE's penalty
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_critics", [1, 2])
def test_mobile_uncertainty_is_the_std_over_elites_by_a_loop(system, n_critics):
    nets, actor, critic, wm, s0 = system
    if n_critics == 2:
        nets, critic = two_critics(nets, critic)
        critics = [jax.tree.map(lambda x: x[j], critic) for j in range(2)]
    else:
        critics = [critic]
    a = jnp.tanh(jax.random.normal(jax.random.PRNGKey(4), (B, 2)))
    eps = jax.random.normal(jax.random.PRNGKey(5), (3, B, 4))
    got = np.asarray(jax.jit(lambda s, a, e: leq.mobile_uncertainty(nets, actor, critic, wm, s, a, e))(s0, a, eps))
    want = loop_uncertainty(nets, actor, critics, wm, s0, a, eps)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert want.min() > 1e-3  # the elites really disagree


@pytest.mark.slow
def test_mobile_penalty_is_in_every_imagined_reward_and_the_critic_target(system):
    """Same model samples as LEQ's rollout, rewards r_t - beta u(s_t, a_t), and the critic's model
    term is plain squared error against the lambda-returns of the penalised rewards."""
    nets, actor, critic, wm, s0 = system
    beta, key = 0.7, jax.random.PRNGKey(6)
    plain = leq.imagine(nets, actor, wm, done_fn, s0, key, H)
    ro = leq.imagine(nets, actor, wm, done_fn, s0, key, H, critic, leq.Variant(penalty=beta))
    np.testing.assert_array_equal(ro.states, plain.states)
    np.testing.assert_array_equal(ro.dones, plain.dones)
    assert ro.penalty_eps.shape == (H, 3, B, 4)
    u = np.stack([loop_uncertainty(nets, actor, [critic], wm, ro.states[t], ro.actions[t], ro.penalty_eps[t])
                  for t in range(H)])
    np.testing.assert_allclose(ro.penalties, u, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ro.rewards, plain.rewards - beta * u, rtol=1e-5, atol=1e-5)

    args = dataclasses.replace(leq.resolve(leq.Args(horizon=H, expectile=0.1)), conservatism="mobile",
                               mobile_beta=beta, num_critics=1)
    data = tasks.Transitions(s0[:2], ro.actions[0, :2], None, None, None)
    masks = np.asarray(leq.alive_masks(ro.dones))
    _, m = leq.critic_loss(critic, critic, nets, data, jnp.zeros(2), ro, jnp.asarray(masks), args)
    q = np.asarray(nets.q(critic, ro.states, ro.actions))
    rewards = np.asarray(plain.rewards) - beta * u
    G = np.stack([reference_lambda_returns(q[:, b], rewards[:, b], masks[:, b], args.gamma, args.lam)
                  for b in range(B)], 1)
    w = args.gamma ** np.arange(H)[:, None] * masks[:-1]
    assert float(m["loss_model"]) == pytest.approx(np.mean(w * 0.5 * (G[:-1] - q[:-1]) ** 2), rel=1e-4)


VARIANTS = {"mobile": dict(penalty=0.8), "stochastic": dict(stochastic=True),
            "mobile+stochastic": dict(penalty=0.8, stochastic=True)}


# each variant, each objective and the critic ensemble at least once (every case compiles an
# H + 1-pass Jacobian: about a minute of CI each)
@pytest.mark.slow
@pytest.mark.parametrize("variant,objective,n_critics", [
    ("mobile", "hstep", 1), ("stochastic", "lambda", 1), ("mobile+stochastic", "lambda", 2)])
def test_adjoint_action_gradients_equal_the_full_jacobian(system, variant, objective, n_critics):
    nets, actor, critic, wm, s0 = system
    if n_critics == 2:
        nets, critic = two_critics(nets, critic)
    coefficients = leq.return_coefficients(objective, H, LAM)
    v = leq.Variant(**VARIANTS[variant])
    def run(fn):
        return jax.jit(lambda k: fn(nets, actor, critic, wm, done_fn, s0, k, H, coefficients, GAMMA, v))(
            jax.random.PRNGKey(7))
    D_adj, ro, q, masks = run(leq.action_grads_adjoint)
    D_jac, ro2, q2, masks2 = run(leq.action_grads_jacobian)
    np.testing.assert_allclose(ro.states, ro2.states, atol=1e-5)
    np.testing.assert_allclose(ro.rewards, ro2.rewards, atol=1e-5)
    np.testing.assert_array_equal(masks, masks2)
    assert np.asarray(masks)[-1].min() == 0 and np.asarray(masks)[-1].max() == 1  # terminations happen
    scale = float(jnp.abs(D_jac).max())
    np.testing.assert_allclose(D_adj, D_jac, atol=2e-5 * scale, rtol=1e-4)
    assert scale > 1e-3


@pytest.mark.slow
def test_mobile_action_gradient_counts_the_penalty_once(system):
    """H = 1, H-step return G_0 = m_0 (r_0 - beta u(s_0, a_0)) + gamma m_1 q(s_1, pi(s_1)): the
    adjoint's D_0 against central differences of that formula, assembled from the model step, the
    penalty and the critic directly (the release's perturbed pass doubles the du/da part)."""
    nets, actor, critic, wm, s0 = system
    beta, key = 20.0, jax.random.PRNGKey(8)
    v = leq.Variant(penalty=beta)
    D, ro, _, _ = leq.action_grads_adjoint(nets, actor, critic, wm, done_fn, s0, key, 1,
                                           leq.return_coefficients("hstep", 1, LAM), GAMMA, v)

    def G0(a0):
        s1, r, done = world_model.model_step_given(wm, s0, a0, ro.noise.member[0], ro.noise.eps[0], done_fn)
        u = leq.mobile_uncertainty(nets, actor, critic, wm, s0, a0, ro.penalty_eps[0])
        return (r - beta * u) + GAMMA * (1.0 - done) * nets.q(critic, s1, nets.pi(actor, s1))
    G0 = jax.jit(G0)
    a0, h = ro.actions[0], 1e-2
    for i in range(2):
        e = jnp.zeros_like(a0).at[:, i].set(h)
        fd = (G0(a0 + e) - G0(a0 - e)) / (2 * h)
        np.testing.assert_allclose(D[0][:, i], fd, rtol=2e-2, atol=2e-2 * float(jnp.abs(fd).max()))
    # the penalty's share of D_0 is large here, so counting it twice could not pass the check above
    u_grad = jax.grad(lambda a: leq.mobile_uncertainty(nets, actor, critic, wm, s0, a, ro.penalty_eps[0]).sum())(a0)
    assert float(jnp.abs(beta * u_grad).mean()) > 0.2 * float(jnp.abs(D[0]).mean())


def test_critic_ensemble_is_the_min_over_its_critics(system):
    nets, actor, critic, wm, s0 = system
    nets2, critics = two_critics(nets, critic)
    a = nets.pi(actor, s0)
    first, second = (jax.tree.map(lambda x: x[j], critics) for j in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(critic)))
    q1, q2 = np.asarray(nets.q(first, s0, a)), np.asarray(nets.q(second, s0, a))
    assert not np.allclose(q1, q2)  # the second critic is a fresh one
    np.testing.assert_allclose(nets2.q(critics, s0, a), np.minimum(q1, q2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nets2.q_each(critics, s0, a)), np.stack([q1, q2]), rtol=1e-6)
    assert pretrain.num_critics_of(critics) == 2 and pretrain.num_critics_of(critic) == 1


# --------------------------------------------------------------------------------------------
# The stochastic policy
# --------------------------------------------------------------------------------------------

def mean_log_std(nets, actor, s):
    return nets.actor.apply(actor, s, nets.stats, True)


def test_log_prob_is_the_tanh_gaussian_density(system):
    """log pi(a | s) = log N(z; mu, sigma^2) - sum log(1 - tanh(z)^2), z = atanh(a), in float64."""
    nets, actor, _, _, s0 = system
    eps = jax.random.normal(jax.random.PRNGKey(10), (B, 2))
    mu, log_std = (np.asarray(x, np.float64) for x in mean_log_std(nets, actor, s0))
    assert np.ptp(log_std) > 0.1  # the log-std depends on the state
    z = mu + np.exp(log_std) * np.asarray(eps, np.float64)
    gauss = -0.5 * ((z - mu) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
    want = np.sum(gauss - np.log(1 - np.tanh(z) ** 2), -1)
    np.testing.assert_allclose(nets.log_prob(actor, s0, eps), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(nets.act(actor, s0, eps), np.tanh(z), rtol=1e-5, atol=1e-6)


def per_sample_jacobians(nets, actor, s):
    """d mu / d theta and d log_std / d theta of one state, by jax.jacrev: trees of (act, ...)."""
    return (jax.jacrev(lambda p: mean_log_std(nets, p, s[None])[0][0])(actor),
            jax.jacrev(lambda p: mean_log_std(nets, p, s[None])[1][0])(actor))


@pytest.mark.slow
def test_entropy_bonus_and_reparameterised_surrogate_gradients_by_the_chain_rule(system):
    """With z = mu + sigma eps and a = tanh(z), by hand: d log pi / d mu = 2 tanh(z),
    d log pi / d log_std = -1 + 2 tanh(z) sigma eps, da/d mu = 1 - a^2, da/d log_std = (1 - a^2)
    sigma eps; chained with jacrev's d mu / d theta and d log_std / d theta for every state."""
    nets, actor, _, _, _ = system
    states = jax.random.normal(jax.random.PRNGKey(11), (2, 3, 4))    # (H + 1, B, obs)
    eps = jax.random.normal(jax.random.PRNGKey(12), (2, 3, 2))
    W = jnp.array([[0.1, 0.9, 0.1], [0.5, 0.5, 0.5]])
    D = jax.random.normal(jax.random.PRNGKey(13), (2, 3, 2))
    alpha = 0.3
    g_bonus = jax.grad(leq.entropy_bonus_loss)(actor, nets, states, eps, alpha)
    g_surr = jax.grad(leq.actor_surrogate_loss)(actor, nets, states, W, D, eps)
    ref_bonus = jax.tree.map(jnp.zeros_like, actor)
    ref_surr = jax.tree.map(jnp.zeros_like, actor)
    for t in range(2):
        for b in range(3):
            s, e = states[t, b], eps[t, b]
            mu, log_std = (x[0] for x in mean_log_std(nets, actor, s[None]))
            sigma, a = jnp.exp(log_std), jnp.tanh(mu + jnp.exp(log_std) * e)
            J_mu, J_ls = per_sample_jacobians(nets, actor, s)
            d_mu, d_ls = 2 * a, -1 + 2 * a * sigma * e                 # of log pi
            ref_bonus = jax.tree.map(lambda acc, jm, jl: acc + alpha / 3 * (
                jnp.tensordot(d_mu, jm, 1) + jnp.tensordot(d_ls, jl, 1)), ref_bonus, J_mu, J_ls)
            c = W[t, b] * D[t, b] * (1 - a ** 2)                        # of -W D . a, per action dim
            ref_surr = jax.tree.map(lambda acc, jm, jl: acc - (
                jnp.tensordot(c, jm, 1) + jnp.tensordot(c * sigma * e, jl, 1)) / 3, ref_surr, J_mu, J_ls)
    for got, want in ((g_bonus, ref_bonus), (g_surr, ref_surr)):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_bonus["params"]["log_std"]["kernel"]).max()) > 1e-3


def test_stochastic_imagination_samples_reparameterised_actions(system):
    nets, actor, critic, wm, s0 = system
    key = jax.random.PRNGKey(14)
    ro = leq.imagine(nets, actor, wm, done_fn, s0, key, H, variant=leq.Variant(stochastic=True))
    plain = leq.imagine(nets, actor, wm, done_fn, s0, key, H)
    np.testing.assert_array_equal(ro.noise.member, plain.noise.member)  # LEQ's model draws are unchanged
    np.testing.assert_array_equal(ro.noise.eps, plain.noise.eps)
    s = s0
    for t in range(H + 1):  # the loop: a_t = tanh(mu(s_t) + sigma(s_t) eps_t), s_{t+1} from the model
        mu, log_std = mean_log_std(nets, actor, s)
        a = jnp.tanh(mu + jnp.exp(log_std) * ro.policy_eps[t])
        np.testing.assert_allclose(ro.actions[t], a, atol=1e-5)
        if t < H:
            s = world_model.model_step_given(wm, s, a, ro.noise.member[t], ro.noise.eps[t], done_fn)[0]
            np.testing.assert_allclose(ro.states[t + 1], s, atol=1e-5)
    assert not np.allclose(ro.actions, plain.actions, atol=0.05)
    again = leq.imagine(nets, actor, wm, done_fn, s0, key, H, variant=leq.Variant(stochastic=True))
    np.testing.assert_array_equal(again.actions, ro.actions)  # the noise comes from the key


def test_log_std_head_keeps_the_bc_actor_and_evaluation_is_deterministic(system):
    import evaluate
    nets, actor, _, _, s0 = system
    bc, _ = pretrain.init_params(nets, jax.random.PRNGKey(1), 4, 2)
    stochastic = leq.with_log_std_head(nets, bc, jax.random.PRNGKey(15), 4, -1.0)
    np.testing.assert_array_equal(nets.pi(stochastic, s0), nets.pi(bc, s0))
    log_std = np.asarray(mean_log_std(nets, stochastic, s0 * 3)[1])
    assert np.abs(log_std + 1.0).max() < 0.05  # starts at init_log_std in every state
    policy = evaluate.actor_policy(nets, actor)
    np.testing.assert_allclose(policy(np.asarray(s0)), nets.pi(actor, s0), atol=1e-6)
    f = {**artifacts.flatten(jax.device_get(actor), "actor"), "stats/mean": np.asarray(nets.stats[0]),
         "stats/std": np.asarray(nets.stats[1])}  # an artifact's arrays: evaluate.py reads it the same way
    _, loaded_nets, loaded = pretrain.actor_from_artifact(f, TASK)
    np.testing.assert_allclose(loaded_nets.pi(loaded, s0), nets.pi(actor, s0), atol=1e-6)


def test_stochastic_expansion_uses_the_actors_sigma(system):
    nets, actor, _, wm, _ = system
    data_obs = jax.random.normal(jax.random.PRNGKey(16), (50, 4))
    spread = {}
    for bias in (-5.0, 0.0):
        params = jax.tree.map(lambda x: x, actor)
        params["params"]["log_std"] = {"kernel": jnp.zeros((32, 2)), "bias": jnp.full(2, bias)}
        args = dataclasses.replace(leq.resolve(leq.Args()), expand_size=20, expand_length=2, policy="stochastic")
        expand = leq.make_expand(nets, wm, done_fn, args)
        buf = expand(leq.empty_buffer(40, 4, 2), params, data_obs, jax.random.PRNGKey(17))
        spread[bias] = float(jnp.abs(buf.actions - nets.pi(params, buf.observations)).max())
    assert spread[-5.0] < 0.02 < 0.3 < spread[0.0]  # sigma e^-5 against sigma 1


# --------------------------------------------------------------------------------------------
# The learned termination function
# --------------------------------------------------------------------------------------------

def numpy_logits(params, s2, stats):
    """The classifier by hand: symlog((s' - mu_s) / std_s), ReLU layers, linear output."""
    layers = params["params"]
    x = (s2 - stats[0][:s2.shape[-1]]) / stats[1][:s2.shape[-1]]
    x = np.sign(x) * np.log1p(np.abs(x))
    names = sorted(layers, key=lambda k: int(k.split("_")[1]))
    for i, name in enumerate(names):
        x = x @ np.asarray(layers[name]["kernel"], np.float64) + np.asarray(layers[name]["bias"], np.float64)
        if i < len(names) - 1:
            x = np.maximum(x, 0)
    return x[..., 0]


@pytest.fixture(scope="module")
def classifier():
    stats = (np.array([0.5, -0.2, 0, 0, 0, 0], np.float32), np.array([2.0, 1.5, 1, 1, 1, 1], np.float32))
    clf = world_model.TerminationClassifier((32, 32, 32))
    params = clf.init(jax.random.PRNGKey(20), jnp.zeros((1, 4)), stats)
    return clf, params, stats


def test_termination_loss_is_the_binary_cross_entropy_by_a_loop(classifier):
    clf, params, stats = classifier
    rng = np.random.default_rng(0)
    s2, y = rng.normal(size=(20, 4)).astype(np.float32) * 3, (rng.random(20) < 0.3).astype(np.float32)
    z = numpy_logits(params, s2.astype(np.float64), stats)
    want = np.mean([-(yy * np.log(1 / (1 + np.exp(-zz))) + (1 - yy) * np.log(1 - 1 / (1 + np.exp(-zz))))
                    for zz, yy in zip(z, y)])
    got = world_model.termination_loss(params, clf, jnp.asarray(s2), jnp.asarray(y), stats)
    assert float(got) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(clf.apply(params, s2, stats), z, rtol=1e-4, atol=1e-5)


def test_classifier_learns_the_dataset_terminals():
    """Terminals where the next state's xy is within 0.5 of (1, 1): the classifier recovers them."""
    rng = np.random.default_rng(1)
    n = 12_000
    s2 = rng.uniform(-2, 2, size=(n, 4)).astype(np.float32)
    terminals = (np.linalg.norm(s2[:, :2] - 1.0, axis=1) < 0.5).astype(np.float32)
    ds = tasks.Dataset(s2, np.zeros((n, 2), np.float32), np.zeros(n, np.float32), s2, terminals, 1.0, -1.0, "x")
    args = world_model.Args(termination_max_epochs=40, termination_lr=3e-3, termination_holdout_size=3000, patience=8)
    stats = (np.zeros(6, np.float32), np.ones(6, np.float32) * 1.2)
    params, summary = world_model.train_termination(args, ds, stats)
    assert 0.04 < float(summary["termination/positive_rate"]) < 0.06
    # predicting "never done" would give recall 0 and a cross-entropy of about 0.2
    assert float(summary["termination/holdout_recall"]) > 0.8 and float(summary["termination/holdout_precision"]) > 0.85
    assert float(summary["termination/holdout_bce"]) < 0.05


def test_learned_termination_replaces_only_the_done_of_imagination(system, classifier, tmp_path):
    """From a world_model.npz: done_t = 1(T(s_{t+1}) >= 0) for every imagined step (a numpy loop),
    with the same states and rewards as the true termination's rollout."""
    nets, actor, critic, wm, s0 = system
    clf, params, stats = classifier
    layers = params["params"]  # shift the output so that about half of the states terminate
    z0 = numpy_logits(params, np.asarray(s0, np.float64), stats)
    params = {"params": {**layers, "Dense_3": {**layers["Dense_3"], "bias": layers["Dense_3"]["bias"] - np.median(z0)}}}
    path = tmp_path / "world_model.npz"
    artifacts.save_npz(path, {**artifacts.flatten(params, "termination"), "model/dataset_path": np.array("d.hdf5"),
                              "termination/holdout_bce": np.array(0.1)}, "world_model", TASK, {})
    learned = world_model.load_learned_termination(path, TASK, stats)
    key = jax.random.PRNGKey(21)
    ro = leq.imagine(nets, actor, wm, learned, s0, key, H)
    plain = leq.imagine(nets, actor, wm, done_fn, s0, key, H)
    np.testing.assert_array_equal(ro.states, plain.states)
    np.testing.assert_array_equal(ro.rewards, plain.rewards)
    want = np.array([[numpy_logits(params, np.asarray(ro.states[t + 1, b], np.float64), stats) >= 0
                      for b in range(B)] for t in range(H)])
    np.testing.assert_array_equal(np.asarray(ro.dones) > 0.5, want)
    assert 0 < want.mean() < 1


def test_world_model_without_classifier_loads_and_refuses_learned_termination(tmp_path):
    wm_params = world_model.init_ensemble(jax.random.PRNGKey(0), 6, 5, (8,), 2)
    ds = tasks.Dataset(*([np.zeros((3, 1))] * 5), 1.0, -1.0, "data/umaze.hdf5")
    path = tmp_path / "old.npz"
    world_model.save_world_model(path, TASK, {}, wm_params, np.zeros(6), np.ones(6), np.array([0, 1]),
                                 np.zeros(2), ds, 1, None)
    wm = world_model.load_world_model(path, TASK)
    assert len(world_model.members(wm.params)) == 2
    with pytest.raises(tasks.InputError, match="--termination-only") as e:
        world_model.load_learned_termination(path, TASK, (wm.input_mean, wm.input_std))
    assert "\n" not in str(e.value) and f"--out {path}" in str(e.value)


# --------------------------------------------------------------------------------------------
# End to end: the real scripts in subprocesses, tiny settings
# --------------------------------------------------------------------------------------------

TINY_WM = ["--hidden-dims", 16, 16, "--weight-decay", 2.5e-5, 5e-5, 1e-4, "--ensemble-size", 3, "--num-elites", 2,
           "--max-epochs", 2]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny dataset, world model (wm_plain.npz; wm.npz: the same plus a termination classifier
    added by --termination-only) and BC/FQE pretrain."""
    import shutil

    from leq_utils import mazes
    from test_robustness import run
    d = tmp_path_factory.mktemp("ablations")
    data = d / "umaze_tiny.hdf5"
    mazes.generate_pointmaze(TASK, data, size=6000, seed=3, episode_len=1000)
    common = ["--env", TASK.name, "--dataset-path", data]
    run([ROOT / "world_model.py", *common, "--out", d / "wm_plain.npz", *TINY_WM], d)
    shutil.copy(d / "wm_plain.npz", d / "wm.npz")
    p = run([ROOT / "world_model.py", *common, "--out", d / "wm.npz", "--termination-only",
             "--termination-max-epochs", 3], d)
    assert "added the termination classifier" in p.stdout
    run([ROOT / "pretrain.py", *common, "--world-model", d / "wm.npz", "--out", d / "pt.npz", "--hidden-dims", 32, 32,
         "--bc-steps", 20, "--fqe-steps", 20, "--chunk", 10, "--bc-batch-size", 64], d)
    return d, data


def leq_run(d, data, run_dir, *extra, world_model="wm.npz", check=True):
    from test_robustness import run
    return run([ROOT / "leq.py", "--env", TASK.name, "--dataset-path", data, "--world-model", d / world_model,
                "--pretrain", d / "pt.npz", "--run-dir", run_dir, "--total-steps", 100, "--chunk", 50,
                "--checkpoint-every", 50, "--eval-every", 100, "--eval-episodes", 1, "--final-eval-rounds", 1,
                "--expand-every", 50, "--expand-size", 64, "--batch-size", 32, "--model-batch-size", 32,
                "--horizon", 3, *extra], d, check=check)


def model_arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if not k.startswith("meta/")}


@pytest.mark.slow
def test_termination_classifier_leaves_the_ensemble_as_it_is(pipeline):
    """--termination-only adds termination/* to the file and changes nothing else; training the
    ensemble with --learn-termination gives the very same ensemble as without it."""
    from test_robustness import run
    d, data = pipeline
    plain, added = model_arrays(d / "wm_plain.npz"), model_arrays(d / "wm.npz")
    assert {k for k in added if not k.startswith("termination/")} == set(plain)
    assert any(k.startswith("termination/params/") for k in added) and 0 < float(added["termination/positive_rate"]) < 1
    for k in plain:
        np.testing.assert_array_equal(added[k], plain[k], err_msg=k)
    run([ROOT / "world_model.py", "--env", TASK.name, "--dataset-path", data, "--out", d / "wm_learn.npz", *TINY_WM,
         "--learn-termination", "--termination-max-epochs", 2], d)
    learned = model_arrays(d / "wm_learn.npz")
    for k in plain:
        np.testing.assert_array_equal(learned[k], plain[k], err_msg=k)
    assert "termination/params/Dense_0/kernel" in learned


@pytest.mark.slow
def test_learned_termination_needs_a_classifier_in_one_line(pipeline, tmp_path):
    d, data = pipeline
    p = leq_run(d, data, tmp_path / "r", "--learned-termination", world_model="wm_plain.npz", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "--termination-only" in lines[0], p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("flags,metric", [
    (("--conservatism", "mobile"), "penalty"),
    (("--policy", "stochastic", "--entropy-coef", 0.05), "entropy_loss"),
    (("--learned-termination",), "done_rate")])
def test_each_ablation_runs_end_to_end(pipeline, tmp_path, flags, metric):
    import json
    d, data = pipeline
    leq_run(d, data, tmp_path / "run", *flags)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r[metric]) for r in rows if "critic_loss" in r)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_critics"] == (2 if "mobile" in flags else 1)
    assert (tmp_path / "run" / "leq.npz").exists() and (tmp_path / "run" / "final_eval.json").exists()


@pytest.mark.slow
def test_all_three_ablations_resume_exactly(pipeline, tmp_path):
    """A run with the three switches, and the same run resumed from its step-50 checkpoint: the
    same final networks (the ablations' noise comes from each step's key). Its leq.npz (two
    critics, an actor with a log-std head) runs in evaluate.py."""
    import shutil

    from test_robustness import metric_rows, run
    d, data = pipeline
    flags = ("--conservatism", "mobile", "--policy", "stochastic", "--learned-termination")
    leq_run(d, data, tmp_path / "full", *flags)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for name in ("leq.npz", "final_eval.json"):
        (tmp_path / "resumed" / name).unlink(missing_ok=True)
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint_*.npz")] == ["checkpoint_00000050.npz"]
    p = leq_run(d, data, tmp_path / "resumed", *flags)
    assert "resuming" in p.stdout
    a, b = model_arrays(tmp_path / "full" / "leq.npz"), model_arrays(tmp_path / "resumed" / "leq.npz")
    assert a.keys() == b.keys() and "actor/params/log_std/kernel" in a and a["critic/params/Dense_0/kernel"].ndim == 3
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert metric_rows(tmp_path / "resumed") == metric_rows(tmp_path / "full")
    p = run([ROOT / "evaluate.py", "--checkpoint", tmp_path / "full" / "leq.npz", "--episodes", 1, "--parallel", 1,
             "--no-plot"], tmp_path)
    assert "critic's value of the start states" in p.stdout
