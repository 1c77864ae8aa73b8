"""Stage 2 (docs/ALGORITHM.md, section 4): the networks against hand-written numpy forward passes,
behaviour cloning of a known policy, FQE against the exact Q of a small chain MDP, and the
pretrain.npz artifact."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from leq_utils import artifacts
import pretrain
from leq_utils import tasks
import world_model
from conftest import ROOT, write_d4rl_file

TASK = tasks.get_task("pointmaze-umaze")  # obs 4, action 2
GAMMA = 0.997
# Small networks, and few distinct layer shapes: JAX compiles once per shape (orthogonal init
# runs a QR decomposition per kernel shape), which dominates this file's time.
HIDDEN = (32, 32)
DEEP = (32, 32, 32)  # the paper's depth, same kernel shapes


# --------------------------------------------------------------------------------------------
# Slow references: the networks of docs/ALGORITHM.md, section 4 written out in numpy (float64)
# --------------------------------------------------------------------------------------------

def np_symlog(x):
    return np.sign(x) * np.log1p(np.abs(x))


def dense_layers(params):
    layers = params["params"]
    return [(np.asarray(layers[f"Dense_{i}"]["kernel"], np.float64),
             np.asarray(layers[f"Dense_{i}"]["bias"], np.float64))
            for i in range(sum(k.startswith("Dense_") for k in layers))]


def np_layer_norm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_actor_mean(params, s, mean, std, squash=np_symlog):
    """symlog((s - mu_s) / std_s) -> [Dense, ReLU] x n -> Dense: the pre-tanh mean."""
    s, mean, std = (np.asarray(v, np.float64) for v in (s, mean, std))
    d = s.shape[-1]
    x = squash((s - mean[:d]) / std[:d])
    *hidden, (k_out, b_out) = dense_layers(params)
    for k, b in hidden:
        x = np.maximum(x @ k + b, 0.0)
    return x @ k_out + b_out


def np_critic(params, s, a, mean, std):
    """symlog(((s, a) - mu) / std) -> [Dense, LayerNorm, ReLU] x n -> Dense(1)."""
    x = np_symlog((np.concatenate([s, a], -1).astype(np.float64) - mean) / std)
    *hidden, (k_out, b_out) = dense_layers(params)
    for i, (k, b) in enumerate(hidden):
        ln = params["params"][f"LayerNorm_{i}"]
        x = np.maximum(np_layer_norm(x @ k + b, np.asarray(ln["scale"], np.float64),
                                     np.asarray(ln["bias"], np.float64)), 0.0)
    return (x @ k_out + b_out)[..., 0]


def perturbed(params, seed, scale=0.3):
    """Every parameter moved by N(0, scale^2): non-zero biases, non-unit LayerNorm scales."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + scale * rng.normal(size=x.shape), jnp.float32), params)


def random_stats(rng, obs_dim=4, act_dim=2):
    return (rng.normal(size=obs_dim + act_dim).astype(np.float32),
            rng.uniform(0.3, 3.0, size=obs_dim + act_dim).astype(np.float32))


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# Networks (docs/ALGORITHM.md, section 4)
# --------------------------------------------------------------------------------------------

def test_actor_and_critic_match_numpy_forward_passes():
    """Actor = MLP on symlog((s - mu_s) / std_s) with ReLU, no LayerNorm; critic = [Dense, LN,
    ReLU] x 3 -> Dense(1) on symlog(((s, a) - mu) / std): both equal a numpy forward pass."""
    rng = np.random.default_rng(0)
    mean, std = random_stats(rng)
    nets = pretrain.make_nets(TASK, DEEP, (mean, std))
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(0), 4, 2)
    actor, critic = perturbed(actor, 1), perturbed(critic, 2)
    # states far outside the statistics' range too, where symlog differs most from the identity
    s = (rng.normal(size=(64, 4)) * np.array([1.0, 1.0, 30.0, 300.0])).astype(np.float32)
    a = rng.uniform(-1, 1, size=(64, 2)).astype(np.float32)
    got_mean = np.asarray(nets.actor.apply(actor, jnp.asarray(s), nets.stats))
    np.testing.assert_allclose(got_mean, np_actor_mean(actor, s, mean, std), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(nets.pi(actor, jnp.asarray(s))),
                               np.tanh(np_actor_mean(actor, s, mean, std)), rtol=1e-4, atol=1e-5)
    got_q = np.asarray(nets.q(critic, jnp.asarray(s), jnp.asarray(a)))
    assert got_q.shape == (64,)
    np.testing.assert_allclose(got_q, np_critic(critic, s, a, mean, std), rtol=1e-4, atol=1e-4)
    # without the symlog the reference would be far off: the comparison has teeth
    assert np.abs(np_actor_mean(actor, s, mean, std, squash=lambda x: x)
                  - np_actor_mean(actor, s, mean, std)).max() > 1.0


def test_layernorm_only_in_the_critic():
    """Parameter names: the actor has Dense layers only; the critic has one LayerNorm (scale,
    bias) after each hidden Dense and none after the output layer."""
    nets = pretrain.make_nets(TASK, DEEP, (np.zeros(6), np.ones(6)))
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(0), 4, 2)
    assert sorted(actor["params"]) == ["Dense_0", "Dense_1", "Dense_2", "Dense_3"]
    assert sorted(critic["params"]) == ["Dense_0", "Dense_1", "Dense_2", "Dense_3",
                                        "LayerNorm_0", "LayerNorm_1", "LayerNorm_2"]
    for i in range(3):
        ln = critic["params"][f"LayerNorm_{i}"]
        assert sorted(ln) == ["bias", "scale"] and ln["scale"].shape == ln["bias"].shape == (32,)
    assert actor["params"]["Dense_0"]["kernel"].shape == (4, 32)
    assert actor["params"]["Dense_3"]["kernel"].shape == (32, 2)
    assert critic["params"]["Dense_0"]["kernel"].shape == (6, 32)
    assert critic["params"]["Dense_3"]["kernel"].shape == (32, 1)
    assert pretrain.hidden_dims_of(actor) == DEEP
    # the default networks are the paper's 3 x 256
    assert pretrain.Args().hidden_dims == (256, 256, 256)


def test_deterministic_action_is_inside_the_box():
    """tanh(mean) lies in (-1, 1) on ordinary states and stays finite in [-1, 1] on huge ones."""
    rng = np.random.default_rng(1)
    nets = pretrain.make_nets(TASK, HIDDEN, random_stats(rng))
    actor, _ = pretrain.init_params(nets, jax.random.PRNGKey(3), 4, 2)
    a = np.asarray(nets.pi(actor, jnp.asarray(rng.normal(size=(1000, 4)), jnp.float32)))
    assert a.shape == (1000, 2) and np.all(np.abs(a) < 1.0) and np.abs(a).max() > 0.1
    huge = np.asarray(nets.pi(actor, jnp.asarray(rng.normal(size=(100, 4)) * 1e30, jnp.float32)))
    assert np.all(np.isfinite(huge)) and np.all(np.abs(huge) <= 1.0)


def test_orthogonal_init_with_scale_sqrt2_and_zero_biases():
    """Every Dense kernel K (in, out) of actor and critic has K^T K = 2 I (in >= out) or
    K K^T = 2 I (in < out); every bias starts at 0."""
    nets = pretrain.make_nets(TASK, DEEP, (np.zeros(6), np.ones(6)))
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(5), 4, 2)
    shapes = []
    for params in (actor, critic):
        for k, b in dense_layers(params):
            shapes.append(k.shape)
            gram = k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T
            np.testing.assert_allclose(gram, 2.0 * np.eye(len(gram)), atol=1e-5)
            assert np.all(b == 0.0)
    # wide, square and tall kernels all covered
    assert {(4, 32), (6, 32), (32, 32), (32, 2), (32, 1)} <= set(shapes)


def np_layer_norm_grads(x, scale, bias, cot, h=1e-6):
    """Gradients of sum(np_layer_norm(x, scale, bias) * cot) w.r.t. x, scale and bias by central
    differences in float64."""
    f = lambda x, scale, bias: np.sum(np_layer_norm(x, scale, bias) * cot)  # noqa: E731
    grads = []
    for i, v in enumerate((x, scale, bias)):
        g = np.zeros_like(v)
        for j in np.ndindex(v.shape):
            args_plus, args_minus = [x, scale, bias], [x, scale, bias]
            plus, minus = v.copy(), v.copy()
            plus[j] += h
            minus[j] -= h
            args_plus[i], args_minus[i] = plus, minus
            g[j] = (f(*args_plus) - f(*args_minus)) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("shape", [(16,), (7, 16), (3, 5, 16)])
def test_critic_layernorm_equals_float64_reference(shape):
    """The critic's LayerNorm (flax.linen.LayerNorm, eps 1e-6) equals the float64 formula in value
    and in the gradients w.r.t. input, scale and bias (central differences), for 0, 1 and 2 batch
    axes, with uneven features and a row of variance ~1e-4 where eps shows."""
    rng = np.random.default_rng(len(shape))
    x = rng.normal(size=shape) * 3.0 + 1.5
    x[..., -1] *= 1e-3  # uneven features
    if x.ndim > 1:
        x[0] = 1e-2 * rng.normal(size=shape[-1])  # variance ~1e-4: eps = 1e-6 shows at 1e-2
    x = np.asarray(x, np.float32)
    scale = np.asarray(rng.normal(size=shape[-1]) + 1.0, np.float32)
    bias = np.asarray(rng.normal(size=shape[-1]), np.float32)
    cot = np.asarray(rng.normal(size=shape), np.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    module = nn.LayerNorm(epsilon=1e-6)
    x64, scale64, bias64, cot64 = (v.astype(np.float64) for v in (x, scale, bias, cot))

    want = np_layer_norm(x64, scale64, bias64)
    np.testing.assert_allclose(module.apply(params, jnp.asarray(x)), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(module.apply)(params, jnp.asarray(x)), want, rtol=1e-4, atol=1e-4)
    g_params, g_x = jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * cot), argnums=(0, 1))(params, jnp.asarray(x))
    want_x, want_scale, want_bias = np_layer_norm_grads(x64, scale64, bias64, cot64)
    np.testing.assert_allclose(g_params["params"]["scale"], want_scale, rtol=1e-4, atol=1e-4, err_msg="scale")
    np.testing.assert_allclose(g_params["params"]["bias"], want_bias, rtol=1e-4, atol=1e-4, err_msg="bias")
    np.testing.assert_allclose(g_x, want_x, rtol=1e-3, atol=1e-3 * np.abs(want_x).max(), err_msg="input")


# --------------------------------------------------------------------------------------------
# Behaviour cloning (docs/ALGORITHM.md, section 4)
# --------------------------------------------------------------------------------------------

BC_TOLERANCE = 0.025  # RMS action error on held-out states after 4000 steps at lr 3e-3


def chunks_for(nets, actor, critic, data, args, bc_opt, fqe_opt):
    state = pretrain.PretrainState(actor, bc_opt.init(actor), critic, critic, fqe_opt.init(critic))
    return (state, *pretrain.make_chunks(nets, bc_opt, fqe_opt, data, args))


def test_bc_clones_a_known_deterministic_policy():
    """The real BC chunk (bc_loss, Adam, minibatches sampled on device) clones
    a = tanh(W s + b) to an RMS error below BC_TOLERANCE on held-out states."""
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(2, 4)) * 0.7, np.array([0.3, -0.2])

    def policy(s):
        return np.tanh(s @ W.T + b)

    n = 4096
    s = rng.normal(size=(n, 4)).astype(np.float32)
    a = policy(s).astype(np.float32)
    sa = np.concatenate([s, a], 1)
    stats = (sa.mean(0), sa.std(0))  # as the world model's input statistics
    ds = tasks.Dataset(s, a, np.zeros(n, np.float32), s, np.zeros(n, np.float32), 1.0, 0.0, "bc")
    nets = pretrain.make_nets(TASK, HIDDEN, stats)
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(0), 4, 2)
    args = pretrain.Args(hidden_dims=HIDDEN, bc_batch_size=256, bc_lr=3e-3)
    state, bc_chunk, _ = chunks_for(nets, actor, critic, tasks.device_dataset(ds), args,
                                    optax.adam(args.bc_lr), optax.adam(args.fqe_lr))

    # bc_loss is mean((tanh(mean(s)) - a)^2), checked against the numpy forward pass
    want = np.mean((np.tanh(np_actor_mean(actor, s[:512], *stats)) - a[:512]) ** 2)
    assert float(pretrain.bc_loss(actor, nets, jnp.asarray(s[:512]), jnp.asarray(a[:512]))) == \
        pytest.approx(want, rel=1e-4)

    s_test = rng.normal(size=(2000, 4)).astype(np.float32)

    def rms_error(params):
        actions = np.asarray(nets.pi(params, jnp.asarray(s_test)))
        return float(np.sqrt(np.mean((actions - policy(s_test)) ** 2)))

    assert rms_error(state.actor) > 0.3  # untrained: far from the policy
    key = jax.random.PRNGKey(1)
    for i in range(8):
        state, loss, _ = bc_chunk(state, jax.random.split(jax.random.fold_in(key, i), 500))
    assert rms_error(state.actor) < BC_TOLERANCE
    assert float(loss) < BC_TOLERANCE ** 2
    # BC leaves the critic alone
    for x, y in zip(jax.tree.leaves(state.critic), jax.tree.leaves(critic)):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# Fitted Q evaluation (docs/ALGORITHM.md, section 4)
# --------------------------------------------------------------------------------------------

FQE_TOLERANCE = 0.02  # max |Q - Q_true| over the chain (|Q_true| up to ~9)


def linear_actor(W, b, hidden):
    """Actor parameters whose pre-tanh mean is exactly W x + b, x = symlog((s - mu_s) / std_s):
    the first layer holds [x, -x], the next copies them, and relu(x) - relu(-x) = x."""
    k0 = np.zeros((4, hidden[0]))
    k0[:, :4], k0[:, 4:8] = np.eye(4), -np.eye(4)
    k1 = np.zeros(hidden)
    k1[:8, :8] = np.eye(8)
    k2 = np.zeros((hidden[1], 2))
    k2[:4], k2[4:8] = W.T, -W.T
    layers = {"Dense_0": {"kernel": k0, "bias": np.zeros(hidden[0])},
              "Dense_1": {"kernel": k1, "bias": np.zeros(hidden[1])},
              "Dense_2": {"kernel": k2, "bias": b}}
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), {"params": layers})


def test_fqe_matches_the_exact_q_of_a_chain():
    """The real FQE chunk on an on-policy chain s_0 -> ... -> s_K (terminal, mask 0) learns
    Q(s_k, pi(s_k)) = sum_j gamma^j r_{k+j} (gamma 0.997, cut at the terminal) within
    FQE_TOLERANCE, the policy being the actor's."""
    rng = np.random.default_rng(0)
    K, hidden = 20, HIDDEN
    k = np.arange(K + 1)
    S = np.stack([k / K * 4 - 2, np.sin(k), np.cos(1.3 * k), 0.5 + 0.1 * k], 1).astype(np.float32)
    W, b = rng.normal(size=(2, 4)) * 0.7, np.array([0.3, -0.2])
    s_mean, s_std = S.mean(0), S.std(0)

    def policy(s):
        return np.tanh(np_symlog((s - s_mean) / s_std) @ W.T + b)

    A = policy(S[:K]).astype(np.float32)  # on-policy: the data's actions are the policy's
    raw_r = rng.uniform(0, 1, K).astype(np.float32)
    terminals = np.zeros(K, np.float32)
    terminals[-1] = 1.0
    ds = tasks.Dataset(S[:K], A, raw_r, S[1:], terminals, 1.0, -1.0, "chain")  # r -> r - 1

    q_true, after = np.zeros(K), 0.0  # plain loop, backwards from the terminal
    for i in reversed(range(K)):
        q_true[i] = (raw_r[i] - 1.0) + GAMMA * (1.0 - terminals[i]) * after
        after = q_true[i]
    q_undiscounted = np.cumsum((raw_r - 1.0)[::-1])[::-1]
    assert np.abs(q_true - q_undiscounted).max() > 5 * FQE_TOLERANCE  # gamma matters here

    sa = np.concatenate([S[:K], A], 1)
    stats = (np.concatenate([s_mean, sa[:, 4:].mean(0)]), np.concatenate([s_std, sa[:, 4:].std(0)]))
    nets = pretrain.make_nets(TASK, hidden, stats)
    _, critic = pretrain.init_params(nets, jax.random.PRNGKey(0), 4, 2)
    actor = linear_actor(W, b, hidden)
    np.testing.assert_allclose(np.asarray(nets.pi(actor, jnp.asarray(S))), policy(S), atol=1e-5)

    args = pretrain.Args(hidden_dims=hidden, fqe_batch_size=64, fqe_lr=1e-3, gamma=GAMMA)
    steps, per_call = 10_000, 500
    # Adam with the lr annealed to 0 so the critic settles (the chunk takes any optax optimiser)
    fqe_opt = optax.adam(optax.cosine_decay_schedule(args.fqe_lr, steps))
    state, _, fqe_chunk = chunks_for(nets, actor, critic, tasks.device_dataset(ds), args,
                                     optax.adam(args.bc_lr), fqe_opt)

    def q_error(params):
        return np.abs(np.asarray(nets.q(params, jnp.asarray(S[:K]), jnp.asarray(A))) - q_true).max()

    assert q_error(state.critic) > 1.0
    key = jax.random.PRNGKey(1)
    for i in range(steps // per_call):
        state, _, _ = fqe_chunk(state, jax.random.split(jax.random.fold_in(key, i), per_call))
    assert q_error(state.critic) < FQE_TOLERANCE
    assert q_error(state.critic_ema) < 2 * FQE_TOLERANCE
    for x, y in zip(jax.tree.leaves(state.actor), jax.tree.leaves(actor)):  # FQE leaves the actor
        np.testing.assert_array_equal(x, y)


def test_fqe_loss_is_a_semi_gradient_with_ema_term():
    """fqe_loss equals mean((Q - y)^2) + w mean((Q - Q_ema)^2), y = r + gamma m Q(s', pi(s'))
    from numpy forward passes; its gradient holds y fixed; one FQE step moves the EMA as
    ema <- d ema + (1 - d) critic."""
    rng = np.random.default_rng(2)
    mean, std = random_stats(rng)
    nets = pretrain.make_nets(TASK, HIDDEN, (mean, std))
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(0), 4, 2)
    actor, critic = perturbed(actor, 1), perturbed(critic, 2)
    ema = perturbed(critic, 3, 0.1)
    n, w = 32, 0.7
    s, s2 = rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n, 4)).astype(np.float32)
    a = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    r = rng.normal(size=n).astype(np.float32)
    m = (rng.uniform(size=n) > 0.3).astype(np.float32)
    batch = tasks.Transitions(*(jnp.asarray(v) for v in (s, a, r, s2, m)))

    a2 = np.tanh(np_actor_mean(actor, s2, mean, std))
    y = r + GAMMA * m * np_critic(critic, s2, a2, mean, std)
    q, q_ema = np_critic(critic, s, a, mean, std), np_critic(ema, s, a, mean, std)
    want = np.mean((q - y) ** 2) + w * np.mean((q - q_ema) ** 2)
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda c: pretrain.fqe_loss(c, ema, actor, nets, batch, GAMMA, w)))
    got, got_grad = loss_and_grad(critic)
    assert float(got) == pytest.approx(want, rel=1e-4)

    # semi-gradient: d/dtheta of the loss with y and Q_ema held as constants, i.e. the VJP of
    # Q(s, a; theta) with the cotangent dloss/dQ = 2 (Q - y) / n + 2 w (Q - Q_ema) / n
    cot = jnp.asarray(2 * (q - y) / n + 2 * w * (q - q_ema) / n, jnp.float32)
    want_grad = jax.jit(lambda c: jax.vjp(lambda p: nets.q(p, batch[0], batch[1]), c)[1](cot)[0])(critic)
    for g, h in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(g, h, rtol=1e-3, atol=1e-4 * float(np.abs(h).max()) + 1e-6)
    # the full (residual) gradient through y is clearly different: the check has teeth
    full = jax.jit(jax.grad(lambda p: jnp.mean(
        (nets.q(p, batch[0], batch[1]) - batch[2]
         - GAMMA * batch[4] * nets.q(p, batch[3], nets.pi(actor, batch[3]))) ** 2)
        + w * jnp.mean((nets.q(p, batch[0], batch[1]) - q_ema) ** 2)))(critic)
    assert max(float(jnp.abs(f - g).max())
               for f, g in zip(jax.tree.leaves(full), jax.tree.leaves(got_grad))) > 1e-2

    # one step of the real chunk: the EMA follows the new critic with decay 0.995
    ds = tasks.Dataset(s, a, r, s2, 1 - m, 1.0, 0.0, "batch")
    args = pretrain.Args(hidden_dims=HIDDEN, fqe_batch_size=16)
    fqe_opt = optax.adam(args.fqe_lr)
    state = pretrain.PretrainState(actor, optax.adam(1e-3).init(actor), critic, ema, fqe_opt.init(critic))
    _, fqe_chunk = pretrain.make_chunks(nets, optax.adam(1e-3), fqe_opt, tasks.device_dataset(ds), args)
    new, _, _ = fqe_chunk(state, jax.random.split(jax.random.PRNGKey(0), 1))
    trees = (new.critic_ema, ema, new.critic, critic)
    for e_new, e_old, c_new, c_old in zip(*(jax.tree.leaves(t) for t in trees)):
        assert float(jnp.abs(c_new - c_old).max()) > 0  # the critic did move
        np.testing.assert_allclose(e_new, 0.995 * np.asarray(e_old) + 0.005 * np.asarray(c_new),
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The artifact: pretrain.train end to end on a tiny problem
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny D4RL-format pointmaze-umaze file, a 1-epoch world model, a 2+2-step pretrain.npz."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    n = 600
    obs = np.cumsum(rng.normal(size=(n, 4)) * 0.05, 0)
    act = rng.uniform(-1, 1, (n, 2))
    rew = (rng.uniform(size=n) < 0.05).astype(np.float32)
    data = write_d4rl_file(root / "tiny.hdf5", obs, act, rew, rew > 0, np.arange(n) % 200 == 199)
    wm = world_model.train(world_model.Args(
        env=TASK.name, dataset_path=str(data), out=str(root / "wm" / "world_model.npz"),
        hidden_dims=(16, 16), weight_decay=(2.5e-5, 5e-5, 1e-4), ensemble_size=3, num_elites=2,
        max_epochs=1))
    args = pretrain.Args(env=TASK.name, dataset_path=str(data), world_model=str(wm),
                         out=str(root / "pt" / "pretrain.npz"), hidden_dims=HIDDEN, bc_steps=2,
                         fqe_steps=2, chunk=2, bc_batch_size=64, fqe_batch_size=32)
    out = pretrain.train(args)
    return dict(root=root, data=data, wm=wm, out=out, args=args)


def test_train_writes_a_loadable_artifact_that_round_trips(trained):
    """pretrain.npz loads without pickle; load_pretrained/load_actor give back exactly the saved
    arrays, the world model's statistics and the trained hidden sizes; the saved BC mse
    (computed in memory before saving) is reproduced from the loaded actor."""
    out = trained["out"]
    assert out.exists() and not out.with_name("pretrain.ckpt.npz").exists()  # checkpoint removed
    with np.load(out, allow_pickle=False) as f:
        raw = {k: f[k] for k in f.files}
    assert str(raw["meta/kind"]) == "pretrain" and str(raw["meta/env"]) == TASK.name
    for prefix in ("actor/", "critic/", "critic_ema/"):
        assert any(k.startswith(prefix) for k in raw), prefix
    nets, actor, critic, ema = pretrain.load_pretrained(out, TASK)
    nets2, actor2, critic2, ema2 = pretrain.load_pretrained(out, TASK)
    for prefix, tree, again in (("actor", actor, actor2), ("critic", critic, critic2),
                                ("critic_ema", ema, ema2)):
        flat = artifacts.flatten(jax.device_get(tree), prefix)
        assert set(flat) == {k for k in raw if k.startswith(prefix + "/")}
        for name, value in flat.items():
            np.testing.assert_array_equal(value, raw[name], err_msg=name)
            assert value.dtype == raw[name].dtype
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(again)):
            np.testing.assert_array_equal(x, y)
    # structure as the networks define it
    fresh_actor, fresh_critic = pretrain.init_params(nets, jax.random.PRNGKey(0), 4, 2)
    assert jax.tree.structure(actor) == jax.tree.structure(fresh_actor)
    assert jax.tree.structure(critic) == jax.tree.structure(ema) == jax.tree.structure(fresh_critic)
    assert pretrain.hidden_dims_of(actor) == HIDDEN
    wm = world_model.load_world_model(trained["wm"], TASK)
    np.testing.assert_array_equal(nets.stats[0], wm.input_mean)
    np.testing.assert_array_equal(nets.stats[1], wm.input_std)
    # the loaded actor is the trained one: it reproduces the BC mse train() computed in memory
    ds = tasks.load_dataset(TASK, str(trained["data"]))
    s, a = jnp.asarray(ds.observations[:4096]), jnp.asarray(ds.actions[:4096])
    assert float(pretrain.bc_loss(actor, nets, s, a)) == pytest.approx(float(raw["summary/bc_mse"]), rel=1e-6)
    np.testing.assert_allclose(np.asarray(nets.pi(actor, s)),
                               np.tanh(np_actor_mean(actor, ds.observations[:4096], *nets.stats)),
                               rtol=1e-4, atol=1e-5)
    # load_actor reads the task from the artifact and gives the same actor and statistics
    task, nets3, actor3 = pretrain.load_actor(out)
    assert task == TASK
    for x, y in zip(jax.tree.leaves(actor3), jax.tree.leaves(actor)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(nets3.stats[0], nets.stats[0])
    # critic_from_artifact (evaluate.py and the scripts) gives the saved critic, and None without one
    f = artifacts.load_artifact(out, TASK, kinds=("pretrain",))
    for x, y in zip(jax.tree.leaves(pretrain.critic_from_artifact(f)), jax.tree.leaves(critic), strict=True):
        np.testing.assert_array_equal(x, y)
    assert pretrain.critic_from_artifact({k: v for k, v in f.items() if not k.startswith("critic/")}) is None
    # the config is kept: the hidden sizes saved are the ones asked for
    assert tuple(json.loads(str(raw["meta/config"]))["hidden_dims"]) == HIDDEN


def test_hand_saved_parameters_round_trip_exactly(tmp_path):
    """Known parameters saved as pretrain.py saves them come back bit for bit through
    load_pretrained and load_actor, with the hidden sizes read off the kernels in layer order
    (11 uneven hidden layers: Dense_10 must come after Dense_9, not after Dense_1)."""
    rng = np.random.default_rng(4)
    mean, std = random_stats(rng)
    hidden = [5, 9, 3, 14, 6, 11, 2, 8, 13, 4, 7]

    def mlp(in_dim, out_dim, layer_norm):  # random arrays in the networks' parameter layout
        dims = [in_dim, *hidden, out_dim]
        layers = {f"Dense_{i}": {"kernel": rng.normal(size=(a, b)).astype(np.float32),
                                 "bias": rng.normal(size=b).astype(np.float32)}
                  for i, (a, b) in enumerate(zip(dims, dims[1:]))}
        if layer_norm:
            layers.update({f"LayerNorm_{i}": {"scale": rng.normal(size=h).astype(np.float32),
                                              "bias": rng.normal(size=h).astype(np.float32)}
                           for i, h in enumerate(hidden)})
        return {"params": layers}

    actor, critic, ema = mlp(4, 2, False), mlp(6, 1, True), mlp(6, 1, True)
    path = tmp_path / "p.npz"
    artifacts.save_npz(path, {**artifacts.flatten(actor, "actor"), **artifacts.flatten(critic, "critic"),
                          **artifacts.flatten(ema, "critic_ema"), "stats/mean": mean, "stats/std": std},
                   "pretrain", TASK, pretrain.Args(hidden_dims=tuple(hidden)))
    got_nets, got_actor, got_critic, got_ema = pretrain.load_pretrained(path, TASK)
    _, actor_nets, only_actor = pretrain.load_actor(path, TASK)
    for want, got in ((actor, got_actor), (critic, got_critic), (ema, got_ema), (actor, only_actor)):
        assert jax.tree.structure(want) == jax.tree.structure(got)
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(x, np.asarray(y))
            assert np.asarray(y).dtype == np.float32
    for nets in (got_nets, actor_nets):
        assert nets.actor.hidden_dims == tuple(hidden) and nets.critic.hidden_dims == tuple(hidden)
        np.testing.assert_array_equal(nets.stats[0], mean)
        np.testing.assert_array_equal(nets.stats[1], std)


def test_loading_for_another_env_fails_with_one_line(trained):
    """A pretrain.npz made for pointmaze-umaze is refused for pointmaze-medium, naming both."""
    other = tasks.get_task("pointmaze-medium")
    for load in (pretrain.load_pretrained, pretrain.load_actor):
        with pytest.raises(tasks.InputError) as e:
            load(trained["out"], other)
        assert "made for env 'pointmaze-umaze', not 'pointmaze-medium'" in one_line(e)


def test_missing_or_foreign_world_model_fails_clearly(trained, tmp_path):
    """--world-model pointing at a missing file, or at another env's world model, stops
    pretrain.train with a one-line InputError before anything is written."""
    missing = tmp_path / "nowhere" / "world_model.npz"
    out = tmp_path / "out" / "pretrain.npz"
    args = pretrain.Args(env=TASK.name, dataset_path=str(trained["data"]), world_model=str(missing),
                         out=str(out), hidden_dims=HIDDEN, bc_steps=2, fqe_steps=2, chunk=2)
    with pytest.raises(tasks.InputError) as e:
        pretrain.train(args)
    assert str(missing) in one_line(e) and "does not exist" in one_line(e)
    medium = pretrain.Args(env="pointmaze-medium", dataset_path=str(trained["data"]),
                           world_model=str(trained["wm"]), out=str(out), hidden_dims=HIDDEN,
                           bc_steps=2, fqe_steps=2, chunk=2)
    with pytest.raises(tasks.InputError) as e:
        pretrain.train(medium)
    assert "made for env 'pointmaze-umaze', not 'pointmaze-medium'" in one_line(e)
    assert not out.parent.exists()


# the child execs at once, so JAX's warning about forking a threaded process does not apply
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_cli_missing_world_model_prints_one_line(tmp_path):
    """`python pretrain.py --world-model MISSING` exits non-zero with one 'error: ...' line."""
    missing = tmp_path / "missing.npz"
    p = subprocess.run([sys.executable, "pretrain.py", "--env", "pointmaze-umaze", "--world-model",
                        str(missing), "--out", str(tmp_path / "p.npz")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: world model") and "run world_model.py" in lines[0] and str(missing) in lines[0]
    assert not (tmp_path / "p.npz").exists()
