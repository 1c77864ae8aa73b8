"""scripts/goal_check.py: the dataset's goal reaches, counted by hand; the critic and the world
model on them against plain state-by-state references."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leq_utils import artifacts, tasks
import goal_check
import leq
import pretrain
import world_model
from conftest import ENV

UMAZE = tasks.get_task("pointmaze-umaze")   # success when ||xy - goal|| < 0.5 (not inclusive)
ANT = tasks.get_task("ant-large-diverse")   # success when ||xy - goal|| <= 0.5 (inclusive)


def hand_made(task, rows):
    """A Dataset whose transitions move the point from xy to xy2 (goal-relative offsets), with
    the given terminal flags; other state entries 0."""
    goal = np.asarray(task.goal)
    n = len(rows)
    obs, nxt = np.zeros((n, task.obs_dim), np.float32), np.zeros((n, task.obs_dim), np.float32)
    obs[:, :2] = [goal + r[0] for r in rows]
    nxt[:, :2] = [goal + r[1] for r in rows]
    term = np.asarray([r[2] for r in rows], np.float32)
    return tasks.Dataset(obs, np.zeros((n, task.act_dim), np.float32), term, nxt, term, 1.0, -1.0, "hand-made")


@pytest.mark.parametrize("task", [UMAZE, ANT])
def test_goal_transitions_on_hand_made_rows(task):
    """Rows: 0 enters the goal from 0.8 away; 1 moves inside it; 2 starts exactly on the radius
    (inside for the ant's inclusive goal, outside for the point's); 3 ends 0.9 away, not in it (a
    near miss); 4 ends 1.2 away (beyond two radii); 5 stays far."""
    rows = [((0.8, 0.0), (0.3, 0.0), 1), ((0.2, 0.0), (0.1, 0.0), 1), ((0.0, 0.5), (0.0, 0.2), 1),
            ((1.5, 0.0), (0.0, 0.9), 0), ((2.0, 0.0), (1.2, 0.0), 0), ((5.0, 5.0), (5.0, 4.9), 0)]
    idx = goal_check.goal_transitions(task, hand_made(task, rows))
    assert idx["terminal"].tolist() == [0, 1, 2]
    assert idx["entering"].tolist() == ([0] if task.goal_inclusive else [0, 2])
    assert idx["near_misses"].tolist() == [3]


def test_goal_check_cli_against_state_by_state_references(upstream, tiny_maze_file_module, tmp_path, capsys):
    """On the tiny pipeline's pointmaze-umaze data, actor/critic and world model: the counts
    equal a plain recount; the critic's medians equal Q computed one transition at a time; each
    elite's done shares equal a check of ||predicted xy - goal|| < radius, one transition at a
    time."""
    out = tmp_path / "goal.json"
    r = goal_check.main(goal_check.Args(checkpoint=str(upstream / "pt.npz"), world_model=str(upstream / "wm.npz"),
                                        dataset_path=str(tiny_maze_file_module), out=str(out)))
    assert json.loads(out.read_text()) == r and r["env"] == ENV
    task = tasks.get_task(ENV)
    ds = tasks.load_dataset(task, str(tiny_maze_file_module))
    goal = np.asarray(task.goal)
    entering = [i for i in range(len(ds.rewards)) if ds.terminals[i] > 0
                and np.linalg.norm(ds.observations[i, :2] - goal) >= task.goal_radius]
    near = [i for i in range(len(ds.rewards)) if ds.terminals[i] == 0
            and np.linalg.norm(ds.next_observations[i, :2] - goal) <= 2 * task.goal_radius]
    assert (r["transitions"], r["terminal"]) == (len(ds.rewards), int((ds.terminals > 0).sum()))
    assert (r["entering"], r["near_misses"]) == (len(entering), len(near)) and len(entering) > 0 and len(near) > 0

    _, nets, actor = pretrain.load_actor(str(upstream / "pt.npz"))
    critic = artifacts.unflatten(artifacts.load_artifact(str(upstream / "pt.npz"), None, need="actor"), "critic")
    one = lambda s, a: float(nets.q(critic, s[None], a[None])[0])  # noqa: E731
    q_data = [one(ds.observations[i], ds.actions[i]) for i in entering]
    q_actor = [one(ds.observations[i], np.asarray(nets.pi(actor, ds.observations[i][None]))[0]) for i in entering]
    c = r["critic"]["entering"]
    assert c["target"]["median"] == pytest.approx(0.0) and c["transitions"] == len(entering)
    assert c["q_data_action"]["median"] == pytest.approx(float(np.median(q_data)), rel=1e-4, abs=1e-4)
    assert c["q_actor"]["median"] == pytest.approx(float(np.median(q_actor)), rel=1e-4, abs=1e-4)

    wm = world_model.load_world_model(str(upstream / "wm.npz"), task)
    for name, rows in (("entering", entering), ("near_misses", near)):
        s, a = ds.observations[rows], ds.actions[rows]
        x = (np.concatenate([s, a], 1) - np.asarray(wm.input_mean)) / np.asarray(wm.input_std)
        mean = np.asarray(world_model.ensemble_forward(wm.params, x)[0])  # (elites, n, obs_dim + 1): every elite
        want = [np.mean(np.linalg.norm(s[:, :2] + mean[e, :, :2] - goal, axis=1) < task.goal_radius)
                for e in range(mean.shape[0])]
        assert r["model"][name]["mean_prediction"] == pytest.approx(want)
        assert all(0.0 <= x <= 1.0 for x in r["model"][name]["sampled"])
    assert r["model"]["entering"]["mean_prediction"] != r["model"]["near_misses"]["mean_prediction"]
    im = r["imagination"]  # pt.npz's config has no H, lambda or tau: leq.py's defaults and tau 0.1
    assert (im["horizon"], im["lam"], im["tau"], im["rollouts"]) == (leq.Args().horizon, leq.Args().lam, 0.1, 8)
    assert im["before"]["0"]["starts"] == len(entering) and 0 <= im["before"]["5"]["reach"] <= 1
    printed = capsys.readouterr().out
    assert f"{r['terminal']:,} terminal" in printed and f"wrote {out}" in printed


def test_goal_check_refuses_an_artifact_without_a_critic_or_actor(upstream, tmp_path):
    with pytest.raises(tasks.InputError) as e:  # a world model: no actor
        goal_check.main(goal_check.Args(checkpoint=str(upstream / "wm.npz")))
    assert "\n" not in str(e.value)
    f = artifacts.load_artifact(str(upstream / "pt.npz"), None, need="actor")
    actor_only = {k: v for k, v in f.items() if k.startswith(("actor/", "stats/"))}
    path = tmp_path / "actor_only.npz"
    artifacts.save_npz(path, actor_only, "pretrain", tasks.get_task(ENV), pretrain.Args(env=ENV))
    with pytest.raises(tasks.InputError, match="has no critic") as e:
        goal_check.main(goal_check.Args(checkpoint=str(path)))
    assert "\n" not in str(e.value)
    with pytest.raises(tasks.InputError, match="does not exist") as e:
        goal_check.main(goal_check.Args(checkpoint=str(upstream / "pt.npz"), out=str(tmp_path / "no" / "g.json")))
    assert "\n" not in str(e.value)


def brute_expectile(x, tau):
    """argmin_m sum |tau - 1(x < m)| (x - m)^2 over a grid of 200,001 points from min to max."""
    grid = np.linspace(x.min(), x.max(), 200_001)
    loss = [np.sum(np.where(x < m, 1 - tau, tau) * (x - m) ** 2) for m in grid[::100]]
    coarse = grid[::100][int(np.argmin(loss))]
    fine = grid[(grid > coarse - 2 * (grid[100] - grid[0])) & (grid < coarse + 2 * (grid[100] - grid[0]))]
    return fine[int(np.argmin([np.sum(np.where(x < m, 1 - tau, tau) * (x - m) ** 2) for m in fine]))]


def test_expectile_against_a_brute_force_minimum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 9)) * 10 - 5
    for tau in (0.1, 0.5, 0.9):
        got = goal_check.expectile(x, tau)
        want = [brute_expectile(row, tau) for row in x]
        assert got == pytest.approx(want, abs=1e-3)
    assert goal_check.expectile(x, 0.5) == pytest.approx(x.mean(1))  # tau 1/2: the mean
    assert np.all(goal_check.expectile(x, 0.1) < x.mean(1))         # a lower expectile lies below it


def test_starts_before_stays_in_one_episode():
    """Two episodes of 4 steps (states 0..3 then 10..13; their next states 1..4 and 11..14); an
    entry at the second episode's third step (index 6): 1 and 2 steps before are in its episode
    (indices 5, 4), 3 steps before would cross into the first one (dropped); an entry at index 0
    has nothing before it."""
    obs = np.asarray([[0], [1], [2], [3], [10], [11], [12], [13]], np.float32)
    ds = tasks.Dataset(obs, obs, np.zeros(8), obs + 1, np.zeros(8), 1.0, -1.0, "hand-made")
    entering = np.asarray([0, 6])
    assert goal_check.starts_before(ds, entering, 0).tolist() == [0, 6]
    assert goal_check.starts_before(ds, entering, 1).tolist() == [5]
    assert goal_check.starts_before(ds, entering, 2).tolist() == [4]
    assert goal_check.starts_before(ds, entering, 3).tolist() == []


@pytest.mark.parametrize("horizon", [1, 5])
def test_imagination_from_against_a_plain_loop(upstream, tiny_maze_file_module, horizon):
    """imagination_from on 5 of the tiny data's goal entries, 4 rollouts each, H 1 and 5, against the
    same rollouts (leq.imagine, same key) read plainly: a rollout reaches the goal when one of its
    next states lies within the radius; G_0 = sum_n lam^n Q^(n)_0 / sum_n lam^n with the n-step
    returns written out, Q one state at a time; the tau-expectile by brute force."""
    task = tasks.get_task(ENV)
    ds = tasks.load_dataset(task, str(tiny_maze_file_module))
    _, nets, actor = pretrain.load_actor(str(upstream / "pt.npz"))
    critic = artifacts.unflatten(artifacts.load_artifact(str(upstream / "pt.npz"), None, need="actor"), "critic")
    wm = world_model.load_world_model(str(upstream / "wm.npz"), task)
    goal, done_fn = np.asarray(task.goal), tasks.termination_fn(task)
    starts = goal_check.goal_transitions(task, ds)["entering"][:5]
    n, lam, gamma, tau, key = 4, 0.9, 0.99, 0.1, jax.random.PRNGKey(3)
    got = goal_check.imagination_from(nets, actor, critic, wm, done_fn, ds, starts, goal, key, n, horizon, lam,
                                      gamma, tau)
    ro = leq.imagine(nets, actor, wm, done_fn, jnp.asarray(np.repeat(ds.observations[starts], n, 0)), key, horizon)
    states, actions, rewards = np.asarray(ro.states), np.asarray(ro.actions), np.asarray(ro.rewards)
    g0, reached, q0 = [], [], []
    for b in range(states.shape[1]):
        inside = [np.linalg.norm(states[t, b, :2] - goal) < task.goal_radius for t in range(1, horizon + 1)]
        masks = [1.0] + [float(not any(inside[:t])) for t in range(1, horizon + 1)]
        q = [float(nets.q(critic, states[t, b][None], actions[t, b][None])[0]) for t in range(horizon + 1)]
        n_step = [sum(gamma ** i * masks[i] * rewards[i, b] for i in range(k)) + gamma ** k * masks[k] * q[k]
                  for k in range(horizon + 1)]
        g0.append(sum(lam ** k * n_step[k] for k in range(horizon + 1)) / sum(lam ** k for k in range(horizon + 1)))
        reached.append(any(inside))
        q0.append(float(nets.q(critic, states[0, b][None], nets.pi(actor, states[0, b][None]))[0]))  # Q(s0, pi(s0))
    g0 = np.asarray(g0).reshape(len(starts), n)
    assert 0 < np.mean(reached) < 1  # some rollouts reach the goal (with H 1: on their only step), some do not
    assert got["starts"] == 5 and got["reach"] == pytest.approx(np.mean(reached))
    assert got["g0_median"] == pytest.approx(float(np.median(g0)), rel=1e-4, abs=1e-4)
    assert got["g0_expectile"] == pytest.approx(float(np.median([brute_expectile(row, tau) for row in g0])),
                                                rel=1e-3, abs=1e-3)
    assert got["q_start"] == pytest.approx(float(np.median(np.asarray(q0).reshape(len(starts), n)[:, 0])),
                                           rel=1e-4, abs=1e-4)
    assert got["distance"] == pytest.approx(float(np.median(np.linalg.norm(ds.observations[starts, :2] - goal,
                                                                           axis=1))))
