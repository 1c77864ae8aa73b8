"""scripts/goal_check.py: the dataset's goal reaches, counted by hand; the critic and the world
model on them against plain state-by-state references."""

import json

import numpy as np
import pytest

from leq_utils import artifacts, tasks
import goal_check
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
    assert idx["near misses"].tolist() == [3]


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
    for name, rows in (("entering", entering), ("near misses", near)):
        s, a = ds.observations[rows], ds.actions[rows]
        x = (np.concatenate([s, a], 1) - np.asarray(wm.input_mean)) / np.asarray(wm.input_std)
        mean = np.asarray(world_model.ensemble_forward(wm.params, x)[0])  # (elites, n, obs_dim + 1): every elite
        want = [np.mean(np.linalg.norm(s[:, :2] + mean[e, :, :2] - goal, axis=1) < task.goal_radius)
                for e in range(mean.shape[0])]
        assert r["model"][name]["mean_prediction"] == pytest.approx(want)
        assert all(0.0 <= x <= 1.0 for x in r["model"][name]["sampled"])
    assert r["model"]["entering"]["mean_prediction"] != r["model"]["near misses"]["mean_prediction"]
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
