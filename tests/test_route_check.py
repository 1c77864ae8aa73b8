"""scripts/route_check.py: the shortest-route cells against every shortest path enumerated one by
one, the per-cell counts and first-entry steps on scripted policies with known outcomes, and the
CLI's report and JSON on a real (tiny) actor."""

import json

import numpy as np
import pytest

import evaluate
from leq_utils import ant, mazes, tasks
import route_check
from test_evaluate import waypoint_policy, zero_policy
from conftest import ENV

UMAZE = tasks.get_task("pointmaze-umaze")


def all_shortest_paths(layout):
    """Every shortest path from 'R' to 'G', found by a plain depth-first walk over simple paths
    that gives up on a path as soon as it is longer than the shortest complete one found so far."""
    start, goal = mazes.maze_cells(layout, "R")[0], mazes.maze_cells(layout, "G")[0]
    best, paths = [float("inf")], []

    def walk(path):
        if len(path) - 1 > best[0]:
            return
        if path[-1] == goal:
            if len(path) - 1 < best[0]:
                best[0], paths[:] = len(path) - 1, []
            paths.append(list(path))
            return
        i, j = path[-1]
        for c in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if layout[c[0]][c[1]] != "#" and c not in path:
                walk(path + [c])

    walk([start])
    return paths


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_route_cells_are_the_cells_of_every_shortest_path(maze):
    layout = mazes.MAZES[maze]
    paths = all_shortest_paths(layout)
    route = route_check.route_cells(layout)
    assert set(route) == {c for p in paths for c in p}
    assert len(route) == len(set(route))
    # ordered by distance from the start: position k of every shortest path is a cell k steps out
    steps = {c: k for p in paths for k, c in enumerate(p)}
    assert route == sorted(route, key=lambda c: (steps[c], c))
    assert route[0] == mazes.maze_cells(layout, "R")[0] and route[-1] == mazes.maze_cells(layout, "G")[0]
    if maze == "large":  # two ways round the first block: the top corridor and the left column
        assert len(paths) == 2 and {(1, 2), (2, 1)} <= set(route)


def test_route_progress_of_the_waypoint_controller():
    """The controller drives the one shortest route of umaze: every episode succeeds, enters every
    route cell, in order, and no failure ends anywhere."""
    episodes = evaluate.run_episodes(UMAZE, waypoint_policy(UMAZE), 3, seed=0, parallel=3, record=True)
    r = route_check.route_progress(UMAZE, episodes)
    assert (r["episodes"], r["successes"], r["failure_ends"]) == (3, 3, [])
    assert [tuple(row["cell"]) for row in r["route"]] == [(1, 1), (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1)]
    assert [row["from_start"] for row in r["route"]] == list(range(7))
    assert all(row["entered"] == 3 for row in r["route"])
    medians = [row["first_step"]["median"] for row in r["route"]]
    assert medians[0] == 0 and all(a < b for a, b in zip(medians, medians[1:]))
    assert r["mean_length"] == pytest.approx(np.mean([e["length"] for e in episodes]))


def test_run_episodes_records_the_observations_acted_on():
    """record_obs: one observation per action, the first the reset's, their xy the path's points
    before each step (the path has one more point: the state after the last action)."""
    episodes = evaluate.run_episodes(UMAZE, waypoint_policy(UMAZE), 3, seed=0, parallel=2, record=True, record_obs=True)
    for e in episodes:
        assert e["obs"].shape == (e["length"], UMAZE.obs_dim) and e["obs"].dtype == np.float32
        assert np.allclose(e["obs"][0], e["obs0"]) and np.allclose(e["obs"][:, :2], np.asarray(e["xy"])[:-1])


def test_route_progress_of_a_policy_that_stays_put():
    episodes = evaluate.run_episodes(UMAZE, zero_policy, 3, seed=0, parallel=3, record=True)
    r = route_check.route_progress(UMAZE, episodes)
    assert r["successes"] == 0 and r["mean_length"] == UMAZE.max_episode_steps
    assert r["route"][0] == dict(cell=[1, 1], from_start=0, entered=3, first_step=dict(median=0.0, min=0, max=0))
    assert all(row["entered"] == 0 and row["first_step"] is None for row in r["route"][1:])
    assert r["failure_ends"] == [dict(cell=[1, 1], episodes=3, to_goal=6, on_route=True)]


def test_route_check_cli_on_a_tiny_actor(upstream, tmp_path, capsys):
    out = tmp_path / "route.json"
    report = route_check.main(route_check.Args(checkpoint=str(upstream / "pt.npz"), episodes=4, parallel=2,
                                               out=str(out)))
    assert json.loads(out.read_text()) == report
    assert report["env"] == ENV and report["episodes"] == 4 and report["seed"] == 0
    assert report["route"][0]["entered"] == 4 and report["route"][0]["first_step"]["max"] == 0
    assert sum(row["episodes"] for row in report["failure_ends"]) == 4 - report["successes"]
    near = report["critic_near_goal"]  # pt.npz has a critic
    assert near["within"] == 2 * tasks.get_task(ENV).goal_radius and near["gamma"] > 0
    # the same episodes as the evaluation's: success counts agree with evaluate.py's on the same seeds
    task, nets, actor = route_check.pretrain.load_actor(str(upstream / "pt.npz"))
    again = evaluate.evaluate(task, nets, actor, episodes=4, seed=0, parallel=2)
    assert again["success"] * 4 == report["successes"]
    printed = capsys.readouterr().out
    assert f"{report['successes']} of 4 episodes reach the goal" in printed and f"wrote {out}" in printed


def test_route_progress_on_hand_made_ant_episodes():
    """Episodes written by hand on ant-large (4-unit cells) through cell centres, with known
    first entries: one that succeeds along the top corridor, one that ends in the dead end (7, 6)
    below the junction (off every shortest route, 7 cells from the goal), one whose last point lies
    outside the maze (no grid distance)."""
    task = tasks.get_task("ant-large-diverse")
    layout = mazes.MAZES["large"]
    centre = lambda c: ant.SCALE * mazes.cell_xy(layout, c)  # noqa: E731
    top = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 4), (3, 4), (3, 5), (3, 6), (4, 6), (5, 6)]
    rest = [(5, 7), (5, 8), (6, 8), (7, 8), (7, 9)]
    path = lambda cells, stay: [centre(c).tolist() for c in cells for _ in range(stay)]  # noqa: E731
    episodes = [dict(xy=path(top + rest, 2), success=True, length=2 * 15 - 1),
                dict(xy=path(top + [(6, 6), (7, 6)], 3), success=False, length=1000),
                dict(xy=path(top[:3], 1) + [[0.0, 100.0]], success=False, length=1000)]
    r = route_check.route_progress(task, episodes)
    rows = {tuple(row["cell"]): row for row in r["route"]}
    assert rows[(1, 4)]["entered"] == 2 and rows[(1, 4)]["first_step"] == dict(median=7.5, min=6, max=9)
    assert rows[(1, 3)]["first_step"] == dict(median=4.0, min=2, max=6)  # steps 4, 6 and 2
    assert rows[(2, 1)]["entered"] == 0 and rows[(7, 9)]["entered"] == 1 and rows[(7, 9)]["first_step"]["min"] == 28
    assert rows[(5, 6)]["entered"] == 2
    assert r["failure_ends"] == [dict(cell=[-21, 6], episodes=1, to_goal=None, on_route=False),
                                 dict(cell=[7, 6], episodes=1, to_goal=7, on_route=False)]
    with pytest.raises(ValueError):
        route_check.route_progress(task, [])


def test_closest_approach_of_failures_on_hand_made_ant_episodes():
    """Failures' closest approach to the goal, ant-large (4-unit cells, radius 0.5): a near miss
    that passes 0.8 from the goal and walks on into (7, 10); one that passes 1.5 from it; a wrong
    turn into the dead end (7, 6), three cells (12 units) left of the goal at its closest; a
    success through the goal, which is not a failure and is not counted."""
    task = tasks.get_task("ant-large-diverse")
    centre = lambda c: ant.SCALE * mazes.cell_xy(mazes.MAZES["large"], c)  # noqa: E731
    goal = np.asarray(task.goal)
    assert np.allclose(goal, centre((7, 9))) and task.goal_radius == 0.5
    episodes = [dict(xy=[centre((7, 8)), goal + [0.0, 0.8], centre((7, 10))], success=False, length=1000),
                dict(xy=[centre((7, 8)), goal + [1.5, 0.0], centre((7, 8))], success=False, length=1000),
                dict(xy=[centre((5, 6)), centre((6, 6)), centre((7, 6))], success=False, length=1000),
                dict(xy=[centre((7, 8)), goal], success=True, length=1)]
    c = route_check.route_progress(task, episodes)["failure_closest"]
    assert c["goal"] == pytest.approx(goal.tolist()) and c["radius"] == 0.5
    assert c["distances"] == pytest.approx([0.8, 1.5, 12.0])
    assert (c["within_2_radii"], c["within_4_radii"]) == (1, 2)


def test_critic_near_goal_on_hand_made_ant_episodes():
    """A hand-made critic, Q = -10 x |distance to the goal - 0.9| (highest 0.9 from the goal), on
    ant-large episodes written by hand (only xy is filled in): a success through a state 0.9
    from the goal (its highest Q, 0) whose last acted state is 0.6 from it (Q -3, Monte-Carlo
    value 0: the next step enters the goal); a failure that passes 0.8 from it and has two steps
    left to the limit (Q -1, value -(1 + gamma)); a failure whose closest acted state is 1.5 from
    it, beyond two radii, and one that never comes near: both left out."""
    task = tasks.get_task("ant-large-diverse")
    centre = lambda c: ant.SCALE * mazes.cell_xy(mazes.MAZES["large"], c)  # noqa: E731
    goal, gamma = np.asarray(task.goal), 0.99

    def states(*xy):
        obs = np.zeros((len(xy), 29), np.float32)
        obs[:, :2] = xy
        return obs

    episodes = [dict(obs=states(centre((7, 8)), goal + [0.9, 0.0], goal + [0.6, 0.0]), success=True, length=3),
                dict(obs=states(centre((7, 8)), goal + [0.0, 0.8], centre((7, 10))), success=False, length=3),
                dict(obs=states(centre((7, 8)), goal + [1.5, 0.0]), success=False, length=2),
                dict(obs=states(centre((5, 6))), success=False, length=1)]
    q_fn = lambda s: -10 * np.abs(np.linalg.norm(s[:, :2] - goal, axis=1) - 0.9)  # noqa: E731
    c = route_check.critic_near_goal(task, episodes, q_fn, gamma)
    assert c["within"] == 1.0 and c["gamma"] == gamma
    assert c["successes"] == pytest.approx(dict(episodes=1, q_closest=-3.0, mc_closest=0.0, q_max=0.0,
                                                q_max_distance=0.9), abs=1e-5)
    assert c["failures"] == pytest.approx(dict(episodes=1, q_closest=-1.0, mc_closest=-(1 + gamma), q_max=-1.0,
                                               q_max_distance=0.8), abs=1e-5)
    none = route_check.critic_near_goal(task, episodes[2:], q_fn, gamma)
    assert none["successes"]["episodes"] == 0 and none["successes"]["q_closest"] is None


def test_critic_near_goal_with_a_real_critic(upstream):
    """The artifact's own critic (critic_from_artifact, critic_q_fn: its input statistics,
    Q(s, pi(s)) of its actor) on the waypoint controller's umaze episodes, all successes: each
    median equals one computed state by state, one network call per state, from the artifact's
    arrays."""
    artifact = route_check.artifacts.load_artifact(upstream / "pt.npz", None, need="actor")
    task, nets, actor = route_check.pretrain.actor_from_artifact(artifact)
    episodes = evaluate.run_episodes(task, waypoint_policy(task), 3, seed=0, parallel=3, record=True, record_obs=True)
    gamma = float(artifact["meta/config"]["gamma"])
    q_fn = route_check.critic_q_fn(route_check.pretrain.critic_from_artifact(artifact), nets, actor)
    c = route_check.critic_near_goal(task, episodes, q_fn, gamma)
    critic = route_check.artifacts.unflatten(artifact, "critic")
    q_one = lambda o: float(nets.q(critic, o[None], nets.pi(actor, o[None]))[0])  # noqa: E731
    rows = []
    for e in episodes:
        dist = np.linalg.norm(e["obs"][:, :2] - np.asarray(task.goal), axis=1)
        k, qs = int(np.argmin(dist)), [q_one(o) for o in e["obs"]]
        rows.append((qs[k], -(1 - gamma ** (e["length"] - 1 - k)) / (1 - gamma), max(qs), dist[int(np.argmax(qs))]))
    assert all(e["success"] for e in episodes) and c["failures"]["episodes"] == 0
    want = dict(episodes=3, **{key: float(np.median([r[i] for r in rows]))
                               for i, key in enumerate(("q_closest", "mc_closest", "q_max", "q_max_distance"))})
    assert c["successes"] == pytest.approx(want, rel=1e-4, abs=1e-4)


def ant_states(xy, on_back=()):
    """(len(xy), 29) ant states at the given positions: upright (quaternion (1, 0, 0, 0)), and on
    their backs (quaternion (0, 1, 0, 0)) at the rows in on_back."""
    obs = np.zeros((len(xy), 29), np.float32)
    obs[:, :2], obs[:, 2], obs[:, 3] = xy, 0.55, 1.0
    obs[list(on_back), 3:7] = [0.0, 1.0, 0.0, 0.0]
    return obs


def test_turn_overs_on_hand_made_ant_episodes():
    """ant-umaze episodes written by hand: a success that stays upright; a failure on its back from
    acted step 3, in cell (1, 2), to its end; one on its back at step 1 only, in (1, 1), upright
    again at its end; one that never turns over. A hand-made critic Q = x (the torso's x) gives
    the medians around each first turn-over that the path has."""
    task = tasks.get_task("ant-umaze-diverse")
    centre = lambda c: ant.SCALE * mazes.cell_xy(mazes.MAZES["umaze"], c)  # noqa: E731
    cells = lambda *cs: [centre(c) for c in cs]  # noqa: E731
    f1 = [centre((1, 1)), centre((1, 1)) + [1.0, 0.0], centre((1, 2)) - [1.0, 0.0], centre((1, 2)),
          centre((1, 2)) + [1.0, 0.0], centre((1, 3))]
    f2 = [centre((1, 1)), centre((1, 1)) + [0.5, 0.0], centre((1, 2))]
    episodes = [dict(obs=ant_states(cells((1, 1), (1, 2), (1, 3))), xy=cells((1, 1), (1, 2), (1, 3), (2, 3)),
                     success=True, length=3),
                dict(obs=ant_states(f1, on_back=(3, 4, 5)), xy=f1 + [centre((1, 3))], success=False, length=6),
                dict(obs=ant_states(f2, on_back=(1,)), xy=f2 + [centre((1, 2))], success=False, length=3),
                dict(obs=ant_states(cells((1, 1), (1, 2))), xy=cells((1, 1), (1, 2), (1, 2)), success=False, length=2)]
    r = route_check.turn_overs(task, episodes, q_fn=lambda s: s[:, 0])
    assert r["successes"] == dict(episodes=1, turned_over=0, on_back_at_end=0, first_step=None, cells=[],
                                  critic={str(o): None for o in route_check.OFFSETS})
    f = r["failures"]
    assert (f["episodes"], f["turned_over"], f["on_back_at_end"], f["first_step"]) == (3, 2, 1, 2.0)
    assert f["cells"] == [dict(cell=[1, 1], episodes=1), dict(cell=[1, 2], episodes=1)]
    x = lambda xy: float(xy[0])  # noqa: E731
    assert f["critic"] == pytest.approx({"-30": None, "-10": None, "-3": x(f1[0]),
                                         "-1": np.median([x(f1[2]), x(f2[0])]), "0": np.median([x(f1[3]), x(f2[1])]),
                                         "10": None})
    assert "critic" not in route_check.turn_overs(task, episodes)["failures"]


def test_data_turn_overs_counts_transitions():
    """Four hand-made transitions: upright to on its back, on its back twice, back upright, upright twice."""
    up, back = ant_states([[0.0, 0.0]])[0], ant_states([[0.0, 0.0]], on_back=(0,))[0]
    s, s2 = np.stack([up, back, back, up]), np.stack([back, back, up, up])
    ds = tasks.Dataset(s, np.zeros((4, 8), np.float32), np.zeros(4, np.float32), s2, np.zeros(4, np.float32),
                       1.0, -1.0, "hand-made")
    assert route_check.data_turn_overs(ds) == dict(transitions=4, on_back=0.5, turning_over=1, righting=1)


def test_route_check_refuses_bad_flags_before_any_episode(upstream, tmp_path):
    for args, words in ((dict(episodes=0), "--episodes"), (dict(out=str(tmp_path / "no" / "r.json")), "does not exist"),
                        (dict(world_model=str(upstream / "wm.npz")), "not a built-in ant maze"),
                        (dict(before=(0,)), "--before"), (dict(before=()), "--before"),
                        (dict(rollouts=0), "--rollouts")):
        with pytest.raises(tasks.InputError, match=words) as e:
            route_check.main(route_check.Args(checkpoint=str(upstream / "pt.npz"), **args))
        assert "\n" not in str(e.value)
