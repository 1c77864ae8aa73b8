"""The world model (docs/ALGORITHM.md, section 3) against known ground truths and slow, independent references.

Everything here is small (hidden layers of 32, 3 members, a few thousand transitions) so that the
file runs in well under a minute on a 2-core CPU; every random number comes from a fixed seed.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from leq_utils import artifacts
from leq_utils import mazes
from leq_utils import tasks
import world_model
from conftest import write_d4rl_file

ENV = "pointmaze-umaze"             # obs 4, action 2, reward transform r -> r - 1
TASK = tasks.get_task(ENV)
OBS, ACT, OUT = 4, 2, 5             # OUT = obs + reward
SMALL = dict(env=ENV, ensemble_size=3, num_elites=2, hidden_dims=(32, 32),
             weight_decay=(2.5e-5, 5e-5, 1e-4), resume=False)


# --------------------------------------------------------------------------------------------
# Slow references, written from docs/ALGORITHM.md, section 3 (float64 numpy, loops where it helps clarity)
# --------------------------------------------------------------------------------------------

def np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def softplus(z):
    return np.logaddexp(0.0, z)


def ref_member(member, x):
    """One member on one or many rows: swish hidden layers, linear output [mean, raw logvar]."""
    n_layers = len(member)
    for i in range(n_layers):
        x = x @ member[f"layer_{i}"]["kernel"] + member[f"layer_{i}"]["bias"]
        if i < n_layers - 1:
            x = x / (1.0 + np.exp(-x))  # swish(x) = x sigmoid(x)
    return x


def ref_head(params, out):
    """[mean, logvar] with lv = max - softplus(max - lv); lv = min + softplus(lv - min)."""
    mean, lv = out[..., :OUT], out[..., OUT:]
    hi, lo = params["max_logvar"], params["min_logvar"]
    lv = hi - softplus(hi - lv)
    return mean, lo + softplus(lv - lo)


def n_members(params):
    return sum(k.startswith("member_") for k in params)


def ref_every_member(params, x):
    """mean, logvar (E, N, OUT): every member on every row, one row at a time."""
    p = np_tree(params)
    means, logvars = np.zeros((n_members(p), len(x), OUT)), np.zeros((n_members(p), len(x), OUT))
    for e in range(n_members(p)):
        for n in range(len(x)):
            means[e, n], logvars[e, n] = ref_head(p, ref_member(p[f"member_{e}"], np.asarray(x[n], np.float64)))
    return means, logvars


def ref_picked(params, x, member):
    means, logvars = ref_every_member(params, x)
    rows = np.arange(len(x))
    return means[member, rows], logvars[member, rows]


def ref_step(wm, s, a, member, eps):
    """(s', raw reward, transformed reward) for given randomness, row by row, from the spec:
    standardise [s, a], take the picked elite's Gaussian, s' = s + mu + eps exp(lv / 2)."""
    s, a = np.asarray(s, np.float64).reshape(-1, OBS), np.asarray(a, np.float64).reshape(-1, ACT)
    member, eps = np.asarray(member).reshape(-1), np.asarray(eps, np.float64).reshape(-1, OUT)
    x = (np.concatenate([s, a], 1) - np.asarray(wm.input_mean)) / np.asarray(wm.input_std)
    mu, lv = ref_picked(wm.params, x, member)
    sample = mu + np.exp(0.5 * lv) * eps
    return s + sample[:, :OBS], sample[:, OBS], wm.reward_scale * sample[:, OBS] + wm.reward_shift


def random_world_model(seed=0, members=3, scale=2.0, shift=-0.5):
    """Random elites whose Gaussians clearly differ (output biases spread the means and the
    log-variances), with non-trivial input statistics and per-dimension log-variance bounds."""
    rng = np.random.default_rng(seed)
    params = world_model.init_ensemble(jax.random.PRNGKey(seed), OBS + ACT, OUT, (32, 32), members)
    for e in range(members):
        bias = np.concatenate([rng.normal(0, 0.7, OUT), rng.uniform(-3.0, -0.5, OUT)])
        params[f"member_{e}"]["layer_2"]["bias"] = jnp.asarray(bias, jnp.float32)
    params["max_logvar"] = jnp.asarray([0.5, 0.2, 0.0, 0.4, 0.3], jnp.float32)
    params["min_logvar"] = jnp.asarray([-10.0, -8.0, -6.0, -9.0, -7.0], jnp.float32)
    mean = jnp.asarray([0.5, -1.0, 0.2, 0.0, 0.1, -0.2], jnp.float32)
    std = jnp.asarray([2.0, 0.5, 1.5, 1.0, 0.6, 0.8], jnp.float32)
    return world_model.WorldModel(params, mean, std, scale, shift)


def capacity_from_docstring(n, members):
    """picked_forward's block capacity: mean count + 4 binomial standard deviations (+1), <= n."""
    p = 1.0 / members
    return min(n, math.ceil(n * p + 4 * math.sqrt(n * p * (1 - p))) + 1)


# --------------------------------------------------------------------------------------------
# A known linear-Gaussian system, written as a D4RL file of independent (s, a, s') pairs
# --------------------------------------------------------------------------------------------

_sys_rng = np.random.default_rng(1234)
LIN_A = np.eye(OBS) + 0.2 * _sys_rng.normal(size=(OBS, OBS))
LIN_B = 0.5 * _sys_rng.normal(size=(OBS, ACT))
LIN_C = 0.5 * _sys_rng.normal(size=OBS)
LIN_D = 0.5 * _sys_rng.normal(size=ACT)
SIGMA = np.array([0.1, 0.15, 0.2, 0.25, 0.2])  # true noise std of s'[0..3] and of the raw reward


def linear_inputs(rng, n):
    return rng.normal(size=(n, OBS)), rng.uniform(-0.99, 0.99, size=(n, ACT))


def linear_mean(s, a):
    """True conditional mean of [s' - s, r] given (s, a)."""
    return np.concatenate([s @ (LIN_A - np.eye(OBS)).T + a @ LIN_B.T, (s @ LIN_C + a @ LIN_D)[:, None]], 1)


def write_linear_file(path, n, seed):
    """n transitions: rows 2k = (s, a, r), rows 2k+1 = s' with a timeout (so the pair (s', next s)
    is dropped by qlearning_dataset)."""
    rng = np.random.default_rng(seed)
    s, a = linear_inputs(rng, n)
    y = linear_mean(s, a) + SIGMA * rng.normal(size=(n, OUT))
    obs, act, rew = np.zeros((2 * n, OBS)), np.zeros((2 * n, ACT)), np.zeros(2 * n)
    obs[0::2], obs[1::2], act[0::2], rew[0::2] = s, s + y[:, :OBS], a, y[:, OBS]
    timeouts = np.zeros(2 * n, bool)
    timeouts[1::2] = True
    return write_d4rl_file(path, obs, act, rew, np.zeros(2 * n, bool), timeouts)


def train_recording(args):
    """world_model.train(args), observing from the outside what every epoch gave: the holdout MSE
    and the parameters handed to snapshot_improved, and the parameters handed to the saver."""
    epochs, saved = [], {}
    snapshot, save = world_model.snapshot_improved, world_model.save_world_model

    def spy_snapshot(state, mse, improvement):
        epochs.append(dict(params=jax.device_get(state.params), mse=np.asarray(mse)))
        return snapshot(state, mse, improvement)

    def spy_save(path, task, args, params, *rest):
        saved["params"] = jax.device_get(params)
        return save(path, task, args, params, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(world_model, "snapshot_improved", spy_snapshot)
        mp.setattr(world_model, "save_world_model", spy_save)
        out = world_model.train(args)
    return out, epochs, saved


LIN_N, LIN_SEED, LIN_MAX_EPOCHS = 4000, 0, 100


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """The real trainer (default patience 5, threshold 1%) on the linear-Gaussian file."""
    folder = tmp_path_factory.mktemp("linear")
    data = write_linear_file(folder / "linear.hdf5", LIN_N, seed=7)
    args = world_model.Args(**SMALL, dataset_path=str(data), out=str(folder / "wm.npz"), seed=LIN_SEED,
                            batch_size=128, max_epochs=LIN_MAX_EPOCHS)
    out, epochs, saved = train_recording(args)
    return dict(args=args, out=out, epochs=epochs, saved=saved, data=data)


# --------------------------------------------------------------------------------------------
# 0. The spec's initialisation, loss and holdout metric, term by term
# --------------------------------------------------------------------------------------------

def test_init_loss_and_holdout_mse_follow_the_spec():
    """init_ensemble, ensemble_loss, decay_loss, loss_grads and holdout_mse equal docs/ALGORITHM.md section 3's formulas (init statistically, the rest exactly)."""
    big = world_model.init_ensemble(jax.random.PRNGKey(0), 50, OUT, (400,), 2)
    for e in range(2):
        for i, fan_in in enumerate((50, 400)):
            k = np.asarray(big[f"member_{e}"][f"layer_{i}"]["kernel"])
            assert k.shape == (fan_in, (400, 2 * OUT)[i])
            # 20000 / 4000 normal draws: sample std within 3% / 6% of 1 / (2 sqrt(fan_in)), mean ~ 0
            assert abs(k.std() / (0.5 / math.sqrt(fan_in)) - 1) < (0.03, 0.06)[i]
            assert abs(k.mean()) < 4 * (0.5 / math.sqrt(fan_in)) / math.sqrt(k.size)
            np.testing.assert_array_equal(big[f"member_{e}"][f"layer_{i}"]["bias"], 0.0)
    assert not np.array_equal(big["member_0"]["layer_0"]["kernel"], big["member_1"]["layer_0"]["kernel"])
    np.testing.assert_array_equal(big["max_logvar"], np.full(OUT, 0.5))
    np.testing.assert_array_equal(big["min_logvar"], np.full(OUT, -10.0))

    wm = random_world_model(seed=8)
    p = np_tree(wm.params)
    rng = np.random.default_rng(14)
    wd = (2e-2, 3e-2, 5e-2)
    x, y = rng.normal(size=(3, 16, OBS + ACT)), rng.normal(size=(3, 16, OUT))
    want_nll = 0.01 * p["max_logvar"].sum() - 0.01 * p["min_logvar"].sum()
    for e in range(3):
        mu, lv = ref_every_member(wm.params, x[e])
        want_nll += ((mu[e] - y[e]) ** 2 * np.exp(-lv[e])).mean() + lv[e].mean()
    want_decay = sum(0.5 * wd[i] * (p[f"member_{e}"][f"layer_{i}"]["kernel"] ** 2).sum() for e in range(3) for i in range(3))
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    assert float(world_model.ensemble_loss(wm.params, xj, yj)) == pytest.approx(want_nll, rel=1e-5)
    assert float(world_model.decay_loss(wm.params, wd)) == pytest.approx(want_decay, rel=1e-5)

    # loss_grads: the gradient of the WHOLE loss (NLL + bounds + decay), checked against autodiff of
    # a from-scratch reference of that loss (plain loops, no world_model code)
    def ref_total(params):
        total = 0.01 * jnp.sum(params["max_logvar"]) - 0.01 * jnp.sum(params["min_logvar"])
        for e in range(3):
            h = xj[e]
            for i in range(3):
                h = h @ params[f"member_{e}"][f"layer_{i}"]["kernel"] + params[f"member_{e}"][f"layer_{i}"]["bias"]
                h = h * jax.nn.sigmoid(h) if i < 2 else h
            mu, lv = h[:, :OUT], h[:, OUT:]
            lv = params["max_logvar"] - jnp.log1p(jnp.exp(params["max_logvar"] - lv))
            lv = params["min_logvar"] + jnp.log1p(jnp.exp(lv - params["min_logvar"]))
            total += jnp.mean((mu - yj[e]) ** 2 * jnp.exp(-lv)) + jnp.mean(lv)
            total += sum(0.5 * wd[i] * jnp.sum(params[f"member_{e}"][f"layer_{i}"]["kernel"] ** 2) for i in range(3))
        return total
    want_grads = jax.grad(ref_total)(wm.params)
    loss, grads = world_model.loss_grads(wm.params, xj, yj, wd)
    assert float(loss) == pytest.approx(want_nll, rel=1e-5)  # the decay's value is not in it
    want_by_path = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(g, want_by_path[path], rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    mu, _ = ref_every_member(wm.params, x[0])
    got = world_model.holdout_mse(wm.params, jnp.asarray(x[0], jnp.float32), jnp.asarray(y[0], jnp.float32))
    np.testing.assert_allclose(got, ((mu - y[0][None]) ** 2).mean((1, 2)), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 1. Learning a known system: mean and variance
# --------------------------------------------------------------------------------------------

def test_learns_linear_gaussian_mean_and_variance(linear_run):
    """Trained elites predict the true conditional mean of [s'-s, r] and the true noise std of a linear-Gaussian system."""
    wm = world_model.load_world_model(linear_run["out"], TASK)
    assert n_members(wm.params) == 2
    assert len(tasks.load_dataset(TASK, str(linear_run["data"])).rewards) == LIN_N
    s, a = linear_inputs(np.random.default_rng(99), 2000)  # fresh inputs from the training distribution
    truth = linear_mean(s, a)
    x = (np.concatenate([s, a], 1) - np.asarray(wm.input_mean)) / np.asarray(wm.input_std)
    mu, lv = jax.jit(world_model.ensemble_forward)(wm.params, jnp.asarray(x, jnp.float32))
    mu, lv = np.asarray(mu, np.float64), np.asarray(lv, np.float64)
    ref_mu, ref_lv = ref_every_member(wm.params, x[:50])  # the public forward is the spec's network
    np.testing.assert_allclose(mu[:, :50], ref_mu, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lv[:, :50], ref_lv, atol=2e-5, rtol=1e-4)
    for e in range(2):
        # tolerance: mean |predicted mean - true mean| below 0.3 noise std, in every dimension
        mean_err = np.abs(mu[e] - truth).mean(0)
        assert np.all(mean_err < 0.3 * SIGMA), (e, mean_err / SIGMA)
        # tolerance: predicted std, averaged over the inputs, within 30% of the true std per dimension
        std_ratio = np.exp(0.5 * lv[e]).mean(0) / SIGMA
        assert np.all(np.abs(std_ratio - 1) < 0.3), (e, std_ratio)
    # the step function applies the maze reward transform r -> r - 1 to the learned raw reward
    assert (wm.reward_scale, wm.reward_shift) == (1.0, -1.0)
    s_j, a_j = jnp.asarray(s[:500], jnp.float32), jnp.asarray(a[:500], jnp.float32)
    member = jnp.asarray(np.arange(500) % 2)
    s2, r, _ = world_model.model_step_given(wm, s_j, a_j, member, jnp.zeros((500, OUT)),
                                            tasks.termination_fn(TASK))
    true_r = truth[:500, OBS] - 1.0
    assert np.abs(np.asarray(r) - true_r).mean() < 0.3 * SIGMA[OBS]
    assert np.all(np.abs(np.asarray(s2) - s[:500] - truth[:500, :OBS]).mean(0) < 0.3 * SIGMA[:OBS])


# --------------------------------------------------------------------------------------------
# 2. Snapshots, early stopping, elites
# --------------------------------------------------------------------------------------------

def make_state(params, best_params, best_mse):
    opt = optax.adam(1e-3)
    return world_model.TrainState(params, opt.init(params), best_params, jnp.asarray(best_mse, jnp.float32))


def test_epoch_shuffle_is_a_fresh_permutation_of_each_bootstrap_sample():
    """Each epoch walks every member's own bootstrap sample (the same multiset of rows) in a new order, repeatable from (seed, epoch)."""
    boot = np.random.default_rng(3).integers(0, 50, (3, 40)).astype(np.int32)
    a = np.asarray(world_model.shuffle_bootstrap(boot, seed=0, epoch=4))
    for e in range(3):
        np.testing.assert_array_equal(np.sort(a[e]), np.sort(boot[e]))
    assert not np.array_equal(a, boot)
    np.testing.assert_array_equal(a, np.asarray(world_model.shuffle_bootstrap(boot, seed=0, epoch=4)))
    assert not np.array_equal(a, np.asarray(world_model.shuffle_bootstrap(boot, seed=0, epoch=5)))
    assert not np.array_equal(a, np.asarray(world_model.shuffle_bootstrap(boot, seed=1, epoch=4)))
    # uniform: over many epochs, row 0's first slot holds each of its 40 positions about equally often
    firsts = np.array([np.asarray(world_model.shuffle_bootstrap(np.arange(40)[None], 0, k))[0, 0] for k in range(4000)])
    counts = np.bincount(firsts, minlength=40)
    assert counts.min() > 100 - 4 * 10 and counts.max() < 100 + 4 * 10  # 100 expected, sd about 9.9


def test_snapshot_improved_keeps_best_members_and_not_the_logvar_bounds():
    """Only members whose holdout MSE improved by more than 1% relative take a snapshot; the shared log-variance bounds are always the trained ones."""
    params = world_model.init_ensemble(jax.random.PRNGKey(0), 6, OUT, (8,), 4)
    best = world_model.init_ensemble(jax.random.PRNGKey(1), 6, OUT, (8,), 4)
    params["max_logvar"], params["min_logvar"] = jnp.full(OUT, 0.3), jnp.full(OUT, -9.0)  # moved since
    # member 0: +5% relative but only 5e-4 absolute -> improves
    # member 1: +0.5% relative but 5.0 absolute    -> does not improve
    # member 2: worse                               -> does not improve
    # member 3: the trainer's initial 1e10          -> any finite loss improves
    best_mse = np.array([0.01, 1000.0, 1.0, 1e10], np.float32)
    mse = np.array([0.0095, 995.0, 1.2, 3.0], np.float32)
    state = make_state(params, best, best_mse)
    new, improved = world_model.snapshot_improved(state, jnp.asarray(mse), 0.01)
    np.testing.assert_array_equal(improved, [True, False, False, True])
    np.testing.assert_array_equal(new.best_mse, np.array([0.0095, 1000.0, 1.0, 3.0], np.float32))
    for e, took in enumerate([True, False, False, True]):
        want = params if took else best
        jax.tree.map(np.testing.assert_array_equal, new.best_params[f"member_{e}"], want[f"member_{e}"])
    for k in ("max_logvar", "min_logvar"):  # as trained, never the old snapshot's
        np.testing.assert_array_equal(new.best_params[k], params[k])
        assert not np.array_equal(new.best_params[k], best[k])
    jax.tree.map(np.testing.assert_array_equal, new.params, params)  # the training state is untouched
    # nobody improves: every member keeps its snapshot, the bounds still follow training
    new2, improved2 = world_model.snapshot_improved(new, jnp.asarray(new.best_mse) * 1.001, 0.01)
    assert not np.asarray(improved2).any()
    jax.tree.map(np.testing.assert_array_equal, new2.best_params, new.best_params)
    np.testing.assert_array_equal(new2.best_mse, new.best_mse)


def test_training_run_snapshots_stops_and_picks_elites(linear_run):
    """In a real run the saved members are each one's best-epoch parameters, the run stops after 5 epochs without improvement, and the elites have the lowest holdout MSE."""
    epochs, args = linear_run["epochs"], linear_run["args"]
    f = np.load(linear_run["out"], allow_pickle=False)
    saved = artifacts.unflatten(dict(f), "model/params")
    E = args.ensemble_size
    # reference stopping/snapshot rule over the observed per-epoch holdout MSEs
    best, since, best_epoch = np.full(E, 1e10), 0, [None] * E
    for t, rec in enumerate(epochs):
        rel = (best - rec["mse"].astype(np.float64)) / best
        # the trainer does this in float32: best - new is exact (Sterbenz), the division is off by
        # <1e-7 relative, so a margin of 1e-6 from the threshold makes the comparison decisive
        assert np.all(np.abs(rel - args.improvement) > 1e-6), "too close to the threshold to be decisive"
        improved = rel > args.improvement
        for e in np.flatnonzero(improved):
            best[e], best_epoch[e] = rec["mse"][e], t
        since = 0 if improved.any() else since + 1
        if t < len(epochs) - 1:
            assert since < args.patience, f"should have stopped after epoch {t + 1}"
    assert since == args.patience and len(epochs) < LIN_MAX_EPOCHS  # stopped early, not by the cap
    assert int(f["model/epochs"]) == len(epochs)
    np.testing.assert_allclose(f["model/holdout_mse"], best, rtol=1e-6)
    for e in range(E):
        # the saved member is exactly the snapshot of its best epoch ...
        jax.tree.map(np.testing.assert_array_equal, saved[f"member_{e}"], epochs[best_epoch[e]]["params"][f"member_{e}"])
        # ... which is not the last epoch's parameters (the last `patience` epochs did not improve)
        assert best_epoch[e] <= len(epochs) - 1 - args.patience
        assert not np.array_equal(saved[f"member_{e}"]["layer_0"]["kernel"],
                                  epochs[-1]["params"][f"member_{e}"]["layer_0"]["kernel"])
    for k in ("max_logvar", "min_logvar"):  # the bounds: as at the end of training
        np.testing.assert_array_equal(saved[k], epochs[-1]["params"][k])
    # elites = the num_elites lowest saved holdout losses
    mse = f["model/holdout_mse"]
    np.testing.assert_array_equal(f["model/elites"], np.sort(np.argsort(mse)[:args.num_elites]))
    others = np.setdiff1d(np.arange(E), f["model/elites"])
    assert mse[f["model/elites"]].max() <= mse[others].min()
    # the saved losses are the holdout MSE (mean prediction, all obs+1 dims) of the saved members;
    # the holdout split is the trainer's: make_training_data with a fresh default_rng(seed)
    ds = tasks.load_dataset(TASK, str(linear_run["data"]))
    _, _, x_ho, y_ho, mean, std = world_model.make_training_data(ds, args.holdout_size, np.random.default_rng(args.seed))
    assert len(x_ho) == min(int(0.2 * LIN_N), args.holdout_size)
    np.testing.assert_allclose(f["model/input_mean"], mean)
    means, _ = ref_every_member(saved, (x_ho - mean) / std)
    np.testing.assert_allclose(mse, ((means - y_ho[None]) ** 2).mean((1, 2)), rtol=1e-4)


@pytest.mark.parametrize("lr, improvement, patience, max_epochs, expected", [
    (0.0, 0.01, 3, None, 4),    # epoch 1 improves on 1e10, then p identical epochs -> 1 + p
    (0.0, 0.01, 1, None, 2),
    (0.0, 0.01, 3, 2, 2),       # the cap wins
    (1e-3, 1e9, 2, None, 2),    # an unreachable threshold: nobody ever improves -> p epochs
])
def test_early_stopping_rule(tmp_path, lr, improvement, patience, max_epochs, expected):
    """Training stops after exactly `patience` consecutive epochs without any member improving (or at max_epochs)."""
    # With lr = 0 Adam's updates are exactly zero, so every epoch's holdout MSE is bitwise the
    # same: epoch 1 improves (on the initial 1e10), epochs 2.. have relative improvement 0.
    data = write_linear_file(tmp_path / "d.hdf5", 700, seed=3)
    args = world_model.Args(**SMALL, dataset_path=str(data), out=str(tmp_path / "wm.npz"), batch_size=256,
                            lr=lr, improvement=improvement, patience=patience, max_epochs=max_epochs)
    f = np.load(world_model.train(args), allow_pickle=False)
    assert int(f["model/epochs"]) == expected
    assert not (tmp_path / "wm.ckpt.npz").exists()


# --------------------------------------------------------------------------------------------
# 3. The step function
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["random", "fallback", "at_capacity", "one_over_capacity"])
def test_picked_forward_equals_every_member_then_pick(case):
    """picked_forward equals running every member on every row and picking, on the grouped path, at capacity, and on the dense fallback."""
    wm = random_world_model(seed=1)
    rng = np.random.default_rng(5)
    n = 256 if case == "random" else 64
    cap = capacity_from_docstring(n, 3)
    if case == "random":
        member = rng.integers(0, 3, n)
        assert np.bincount(member, minlength=3).max() <= cap
    elif case == "fallback":   # member 0 gets more rows than the capacity (38 of 64), the others the rest
        member = rng.permutation(np.r_[np.zeros(48, int), rng.integers(1, 3, n - 48)])
        assert np.bincount(member, minlength=3).max() > cap and len(np.unique(member)) == 3
    elif case == "at_capacity":  # one member exactly at capacity (grouped path), one with none
        member = rng.permutation(np.r_[np.zeros(cap, int), np.ones(n - cap, int)])
    else:                        # one row more than the capacity: must not use the grouped path
        member = rng.permutation(np.r_[np.zeros(cap + 1, int), rng.integers(1, 3, n - cap - 1)])
    x = rng.normal(size=(n, OBS + ACT)).astype(np.float32)
    mu, lv = jax.jit(world_model.picked_forward)(wm.params, jnp.asarray(x), jnp.asarray(member))
    ref_mu, ref_lv = ref_picked(wm.params, x, member)
    np.testing.assert_allclose(mu, ref_mu, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lv, ref_lv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_shape", [(7,), (2, 3), (2, 1, 4)])
def test_step_shapes_and_values_for_batches(batch_shape):
    """model_noise/model_step handle any leading batch shape, and each sample equals the spec's step for its own elite and noise."""
    wm = random_world_model(seed=2)
    rng = np.random.default_rng(6)
    s = jnp.asarray(rng.normal(size=(*batch_shape, OBS)), jnp.float32)
    a = jnp.asarray(rng.uniform(-1, 1, size=(*batch_shape, ACT)), jnp.float32)
    key = jax.random.PRNGKey(11)
    done_fn = tasks.termination_fn(TASK)
    member, eps = world_model.model_noise(wm, key, batch_shape)
    assert member.shape == batch_shape and eps.shape == (*batch_shape, OUT)
    assert np.asarray(member).min() >= 0 and np.asarray(member).max() < 3
    s2, r, done = jax.jit(lambda s, a, k: world_model.model_step(wm, s, a, k, done_fn))(s, a, key)
    assert s2.shape == (*batch_shape, OBS) and r.shape == batch_shape and done.shape == batch_shape
    assert done.dtype == jnp.bool_
    want_s2, _, want_r = ref_step(wm, s, a, member, eps)
    np.testing.assert_allclose(np.asarray(s2).reshape(-1, OBS), want_s2, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r).reshape(-1), want_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale, shift", [(1.0, -1.0), (2.5, 0.75), (0.01, 0.0)])
def test_reward_gets_the_task_transform(scale, shift):
    """The step's reward is scale * (picked elite's sampled raw reward) + shift."""
    wm = random_world_model(seed=3, scale=scale, shift=shift)
    rng = np.random.default_rng(7)
    s = jnp.asarray(rng.normal(size=(40, OBS)), jnp.float32)
    a = jnp.asarray(rng.uniform(-1, 1, size=(40, ACT)), jnp.float32)
    member = jnp.asarray(rng.integers(0, 3, 40))
    eps = jnp.asarray(rng.normal(size=(40, OUT)), jnp.float32)
    _, r, _ = world_model.model_step_given(wm, s, a, member, eps, tasks.termination_fn(TASK))
    _, raw, _ = ref_step(wm, s, a, member, eps)
    np.testing.assert_allclose(r, scale * raw + shift, atol=1e-5, rtol=1e-5)


def test_done_follows_the_termination_function_without_gradient():
    """`done` is the given termination function of (s, a, s'), and carries no gradient."""
    wm = random_world_model(seed=4)
    rng = np.random.default_rng(8)
    goal = np.asarray(TASK.goal)
    s = jnp.asarray(np.concatenate([goal + rng.normal(0, 0.6, (300, 2)), rng.normal(size=(300, 2))], 1), jnp.float32)
    a = jnp.asarray(rng.uniform(-1, 1, size=(300, ACT)), jnp.float32)
    key = jax.random.PRNGKey(3)
    s2, _, done = world_model.model_step(wm, s, a, key, tasks.termination_fn(TASK))
    want = np.linalg.norm(np.asarray(s2)[:, :2] - goal, axis=1) < mazes.GOAL_RADIUS
    np.testing.assert_array_equal(done, want)
    assert 0 < want.sum() < 300
    custom = lambda s, a, s2: s2[..., 0] > s[..., 1] + a[..., 0]  # noqa: E731
    s2, _, done = world_model.model_step(wm, s, a, key, custom)
    np.testing.assert_array_equal(done, np.asarray(s2)[:, 0] > np.asarray(s)[:, 1] + np.asarray(a)[:, 0])
    assert 0 < np.asarray(done).sum() < 300
    # a float-valued termination function: its value comes through, its gradient does not
    smooth = lambda s, a, s2: jnp.sum(s2 ** 2, -1) + jnp.sum(a, -1)  # noqa: E731
    grads = jax.grad(lambda s, a: world_model.model_step(wm, s, a, key, smooth)[2].sum(), (0, 1))(s, a)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)
    s2, _, done = world_model.model_step(wm, s, a, key, smooth)
    np.testing.assert_allclose(done, (np.asarray(s2) ** 2).sum(1) + np.asarray(a).sum(1), rtol=1e-6)


def test_sampled_steps_have_the_elite_mixture_moments():
    """Many steps at one (s, a): elites are picked uniformly and s'-s and the raw reward have the mean and variance of the uniform mixture of the elites' Gaussians."""
    wm = random_world_model(seed=5, scale=2.0, shift=-0.5)
    M = 200_000
    s0, a0 = np.array([0.3, -0.8, 1.1, 0.2]), np.array([0.4, -0.6])
    s = jnp.asarray(np.tile(s0, (M, 1)), jnp.float32)
    a = jnp.asarray(np.tile(a0, (M, 1)), jnp.float32)
    key = jax.random.PRNGKey(21)
    step = jax.jit(lambda s, a, k: world_model.model_step(wm, s, a, k, tasks.termination_fn(TASK)))
    s2, r, _ = step(s, a, key)
    samples = np.concatenate([np.asarray(s2, np.float64) - s0, (np.asarray(r, np.float64)[:, None] - wm.reward_shift) / wm.reward_scale], 1)
    # uniform picks: every elite's count within 5 binomial standard deviations of M / 3
    member, _ = world_model.model_noise(wm, key, (M,))
    counts = np.bincount(np.asarray(member), minlength=3)
    assert np.all(np.abs(counts - M / 3) < 5 * math.sqrt(M * (1 / 3) * (2 / 3))), counts
    # the mixture's moments, exactly, from the reference forward
    x = ((np.r_[s0, a0] - np.asarray(wm.input_mean)) / np.asarray(wm.input_std))[None]
    mu, lv = ref_every_member(wm.params, x)
    mu, var = mu[:, 0], np.exp(lv[:, 0])                              # (3, OUT)
    m = mu.mean(0)
    v = (var + mu ** 2).mean(0) - m ** 2
    d = mu - m
    m4 = (d ** 4 + 6 * d ** 2 * var + 3 * var ** 2).mean(0)           # 4th central moment
    assert np.all(np.ptp(mu, 0) > 20 * np.sqrt(v / M))  # the elites differ: the test can tell them apart
    # tolerances: 5 standard errors of the sample mean and of the sample variance
    np.testing.assert_array_less(np.abs(samples.mean(0) - m), 5 * np.sqrt(v / M))
    np.testing.assert_array_less(np.abs(samples.var(0) - v), 5 * np.sqrt((m4 - v ** 2) / M))


@pytest.mark.parametrize("path", ["grouped", "fallback"])
def test_gradients_match_central_differences(path):
    """d(s', r)/d(s, a) with fixed randomness is finite, non-zero and equals float32 central differences."""
    wm = random_world_model(seed=6)
    rng = np.random.default_rng(9)
    n = 64
    s = jnp.asarray(rng.normal(size=(n, OBS)), jnp.float32)
    a = jnp.asarray(rng.uniform(-0.9, 0.9, size=(n, ACT)), jnp.float32)
    member = rng.integers(0, 3, n) if path == "grouped" else np.r_[np.zeros(48, int), rng.integers(1, 3, n - 48)]
    member = jnp.asarray(rng.permutation(member))
    eps = jnp.asarray(rng.normal(size=(n, OUT)), jnp.float32)
    assert (np.bincount(np.asarray(member), minlength=3).max() > capacity_from_docstring(n, 3)) == (path == "fallback")
    w_s = jnp.asarray([0.7, -1.3, 0.4, 1.1], jnp.float32)
    w_r = 0.9
    done_fn = tasks.termination_fn(TASK)

    @jax.jit
    def per_row(s, a):  # one scalar per row; rows do not interact
        s2, r, _ = world_model.model_step_given(wm, s, a, member, eps, done_fn)
        return s2 @ w_s + w_r * r

    g_s, g_a = jax.jit(jax.grad(lambda s, a: per_row(s, a).sum(), (0, 1)))(s, a)
    h = 1e-2
    for x, g, which in ((s, g_s, 0), (a, g_a, 1)):
        assert np.all(np.isfinite(g))
        fd = np.zeros(x.shape)
        for j in range(x.shape[1]):
            plus, minus = x.at[:, j].add(h), x.at[:, j].add(-h)
            args_p = (plus, a) if which == 0 else (s, plus)
            args_m = (minus, a) if which == 0 else (s, minus)
            fd[:, j] = (np.asarray(per_row(*args_p), np.float64) - np.asarray(per_row(*args_m), np.float64)) / (2 * h)
        # float32 differences: rounding ~1e-7 |f| / h, truncation ~h^2 |f'''|
        np.testing.assert_allclose(g, fd, atol=3e-3, rtol=1e-2)
    # non-zero through the network: for s beyond the identity path s' = s + ..., for a at all
    assert np.all(np.linalg.norm(np.asarray(g_s) - np.asarray(w_s), axis=1) > 1e-3)
    assert np.all(np.linalg.norm(np.asarray(g_a), axis=1) > 1e-3)


def poison(src, dst, value):
    """Copy an artifact, setting every non-elite member's parameters to `value`."""
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    elites = set(arrays["model/elites"].tolist())
    hit = 0
    for k in arrays:
        if k.startswith("model/params/member_") and int(k.split("/")[2].split("_")[1]) not in elites:
            arrays[k] = np.full_like(arrays[k], value)
            hit += 1
    assert hit > 0
    np.savez(dst, **arrays)
    return dst


def test_only_elites_are_used(linear_run, tmp_path):
    """load_world_model keeps exactly the elites, in order: poisoning the non-elites (huge values) leaves every step finite and unchanged
    (a NaN anywhere is refused: no artifact with non-finite parameters loads)."""
    clean = world_model.load_world_model(linear_run["out"], TASK)
    with np.load(linear_run["out"], allow_pickle=False) as f:
        saved, elites = artifacts.unflatten(dict(f), "model/params"), f["model/elites"]
    assert n_members(clean.params) == len(elites) == 2
    for j, e in enumerate(elites):
        jax.tree.map(np.testing.assert_array_equal, clean.params[f"member_{j}"], saved[f"member_{e}"])
    rng = np.random.default_rng(10)
    s = jnp.asarray(rng.normal(size=(256, OBS)), jnp.float32)
    a = jnp.asarray(rng.uniform(-1, 1, size=(256, ACT)), jnp.float32)
    key = jax.random.PRNGKey(4)
    step = lambda wm: world_model.model_step(wm, s, a, key, tasks.termination_fn(TASK))  # noqa: E731
    want = step(clean)
    with pytest.raises(tasks.InputError, match="has non-finite values in 'model/params/member_"):
        world_model.load_world_model(poison(linear_run["out"], tmp_path / "pnan.npz", np.nan), TASK)
    for value in (1e30,):
        wm = world_model.load_world_model(poison(linear_run["out"], tmp_path / f"p{value}.npz", value), TASK)
        got = step(wm)
        for g, w in zip(got, want):
            assert np.all(np.isfinite(np.asarray(g, np.float64)))
            np.testing.assert_array_equal(g, w)


# --------------------------------------------------------------------------------------------
# 4. Artifacts: round trip, refusals
# --------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_run(tmp_path):
    """Two epochs of training on a small file whose second action is constant."""
    rng = np.random.default_rng(12)
    n = 800
    obs = rng.normal(size=(n, OBS))
    act = np.c_[rng.uniform(-1, 1, n), np.full(n, 0.25)]
    path = write_d4rl_file(tmp_path / "tiny.hdf5", obs, act, rng.normal(size=n), np.zeros(n, bool))
    args = world_model.Args(**SMALL, dataset_path=str(path), out=str(tmp_path / "wm.npz"), max_epochs=2)
    out, epochs, saved = train_recording(args)
    return out, epochs, saved


def test_save_load_round_trip(tiny_run):
    """Two loads of a saved model equal each other and the trainer's in-memory best parameters (elites only), and predict identically."""
    out, epochs, saved = tiny_run
    assert len(epochs) == 2
    f = np.load(out, allow_pickle=False)
    elites = f["model/elites"]
    wm1, wm2 = world_model.load_world_model(out, TASK), world_model.load_world_model(out, TASK)
    for wm in (wm1, wm2):
        for j, e in enumerate(elites):
            jax.tree.map(np.testing.assert_array_equal, wm.params[f"member_{j}"], saved["params"][f"member_{e}"])
        for k in ("max_logvar", "min_logvar"):
            np.testing.assert_array_equal(wm.params[k], saved["params"][k])
    # a constant input column is left unscaled (std -> 1), the others standardised
    assert float(wm1.input_std[OBS + 1]) == 1.0 and float(wm1.input_mean[OBS + 1]) == pytest.approx(0.25)
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(50, OBS + ACT)), jnp.float32)
    for a, b in zip(world_model.ensemble_forward(wm1.params, x), world_model.ensemble_forward(wm2.params, x)):
        np.testing.assert_array_equal(a, b)
    s, a = x[:, :OBS], x[:, OBS:]
    key = jax.random.PRNGKey(5)
    out1 = world_model.model_step(wm1, s, a, key, tasks.termination_fn(TASK))
    out2 = world_model.model_step(wm2, s, a, key, tasks.termination_fn(TASK))
    for u, v in zip(out1, out2):
        np.testing.assert_array_equal(u, v)
    # and the loaded model computes what the in-memory elites compute (reference forward)
    mem = {"max_logvar": saved["params"]["max_logvar"], "min_logvar": saved["params"]["min_logvar"],
           **{f"member_{j}": saved["params"][f"member_{e}"] for j, e in enumerate(elites)}}
    member, eps = world_model.model_noise(wm1, key, (50,))
    want_s2, _, want_r = ref_step(wm1._replace(params=mem), s, a, member, eps)
    np.testing.assert_allclose(out1[0], want_s2, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out1[1], want_r, atol=1e-5, rtol=1e-5)


def test_mismatched_artifacts_and_inputs_are_refused(tiny_run, tmp_path):
    """Loading for another env or other dims, or a non-world-model artifact, fails with a one-line InputError naming the problem."""
    out = tiny_run[0]
    cases = [
        (tasks.get_task("pointmaze-medium"), out, "was made for env 'pointmaze-umaze', not 'pointmaze-medium'"),
        (tasks.get_task("hopper-medium-v2"), out, "was made for env 'pointmaze-umaze', not 'hopper-medium-v2'"),
        (dataclasses.replace(TASK, obs_dim=5), out, "has obs/action dims (4, 2), but pointmaze-umaze needs (5, 2)"),
        (TASK, tmp_path / "missing.npz", "does not exist"),
    ]
    other = tmp_path / "other.npz"
    artifacts.save_npz(other, {"actor/w": np.zeros(3)}, "pretrain", TASK, {})
    cases.append((TASK, other, "is a 'pretrain' artifact; expected one of ['world_model']"))
    for task, path, message in cases:
        with pytest.raises(tasks.InputError) as e:
            world_model.load_world_model(path, task)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    # training: a dataset with other dims, and inconsistent flags
    bad = write_d4rl_file(tmp_path / "bad.hdf5", np.zeros((50, 3)), np.zeros((50, 2)), np.zeros(50), np.zeros(50))
    for kwargs, message in [
        (dict(dataset_path=str(bad)), "has obs/action dims (3, 2), but pointmaze-umaze needs (4, 2)"),
        (dict(num_elites=4), "--num-elites must be in [1, ensemble size], got 4"),
        (dict(weight_decay=(1e-4,)), "--weight-decay needs one value per hidden layer plus the output layer"),
    ]:
        args = world_model.Args(**{**SMALL, "dataset_path": str(bad), "out": str(tmp_path / "x.npz"), **kwargs})
        with pytest.raises(tasks.InputError) as e:
            world_model.train(args)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "x.npz").exists()
