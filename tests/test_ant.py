"""The built-in AntMaze tasks and their tools (issue 37): the walker's world and trainer, the
grid planner, the evaluation env's reward and termination, the dataset generator's format."""

import json
import math
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest

from conftest import ROOT
from leq_utils import ant, artifacts, mazes, tasks


def test_task_names_cannot_be_mistaken_for_d4rl():
    task = tasks.get_task("ant-large-diverse")
    assert (task.family, task.source, task.obs_dim, task.act_dim, task.max_episode_steps) == ("antmaze", "builtin", 29, 8, 1000)
    # the goal cell's centre, 4 units per cell, gymnasium-robotics' centred coordinates
    layout = mazes.MAZES["large"]
    i, j = mazes.maze_cells(layout, "G")[0]
    assert task.goal == (4 * (j + 0.5 - len(layout[0]) / 2), 4 * (len(layout) / 2 - i - 0.5))
    assert tasks.get_task("antmaze-large-diverse-v2").source == "d4rl"
    for bad in ("ant-large", "ant-giant-diverse", "ant-large-diverse-v2"):
        with pytest.raises(tasks.InputError):
            tasks.get_task(bad)


@pytest.mark.parametrize("maze", ["umaze", "medium", "large", "ultra"])
def test_planner_leads_from_every_cell_to_every_goal_cell(maze):
    """Following `waypoint` cell by cell gets one BFS step closer each time, from every free cell to
    every free target; in the target cell it aims at the target's centre."""
    layout = mazes.MAZES[maze]
    free = mazes.maze_cells(layout, ".RG")
    for target in free:
        dist = mazes.bfs_distances(layout, target)
        for cell in free:
            hops = 0
            while cell != target:
                point = ant.waypoint(maze, dist, target, ant.cell_centre(maze, cell) + 0.3)  # off-centre in the cell
                nxt = ant.xy_cell(maze, point)
                assert abs(nxt[0] - cell[0]) + abs(nxt[1] - cell[1]) == 1 and dist[nxt] == dist[cell] - 1
                cell, hops = nxt, hops + 1
            assert np.allclose(ant.waypoint(maze, dist, target, ant.cell_centre(maze, target) + 0.3),
                               ant.cell_centre(maze, target))


@pytest.mark.parametrize("maze", ["umaze", "medium", "large", "ultra"])
def test_play_cells_are_the_mazes_landmarks(maze):
    """Start, goal, dead ends and junctions; the reference counts open neighbours with array shifts."""
    grid = np.array([[c for c in row] for row in mazes.MAZES[maze]])
    free = grid != "#"
    degree = np.zeros(free.shape, int)
    degree[1:-1, 1:-1] = free[:-2, 1:-1].astype(int) + free[2:, 1:-1] + free[1:-1, :-2] + free[1:-1, 2:]
    landmark = free & ((degree != 2) | (grid == "R") | (grid == "G"))
    assert sorted(ant.play_cells(maze)) == sorted(map(tuple, np.argwhere(landmark).tolist()))
    if maze == "umaze":
        assert sorted(ant.play_cells(maze)) == [(1, 1), (3, 1)]  # the U's two ends: the start and the goal


def test_walker_sees_the_goal_in_its_heading_frame():
    """The same goal relative to the ant, at any heading and position, looks the same to it."""
    rng = np.random.default_rng(0)
    state = np.zeros(29)
    state[2] = 0.6
    for _ in range(20):
        yaw, xy, forward = rng.uniform(-np.pi, np.pi), rng.uniform(-20, 20, 2), rng.uniform(-5, 5, 2)
        state[:2] = xy
        state[3:7] = [math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)]
        c, s = math.cos(yaw), math.sin(yaw)
        goal = xy + np.array([c * forward[0] - s * forward[1], s * forward[0] + c * forward[1]])
        obs = ant.walker_obs(state, goal)
        assert obs.shape == (29,) and np.allclose(obs[-2:], forward, atol=1e-5)
        assert np.array_equal(obs[:27], state[2:].astype(np.float32))
    far = ant.walker_obs(np.array(state), state[:2] + 100 * np.array([math.cos(yaw), math.sin(yaw)]))
    assert np.allclose(far[-2:], [ant.GOAL_VECTOR_CLIP, 0], atol=1e-4)


def test_upside_down_is_the_torso_up_axis_pointing_down():
    """up_axis_z and upside_down checked against MuJoCo's own rotation matrix of the torso
    quaternion (its z axis' z)."""
    import mujoco
    rng = np.random.default_rng(0)
    q = rng.normal(size=(200, 4))
    q[:50, 1:3] *= 0.1   # near upright: tilts about x and y small
    q[50:100, 0] *= 0.1  # mostly turned over: the quaternion's x, y dominate
    q[100:110] = [0, 0, 0, 1]  # a pure yaw of pi: upright
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    state = np.zeros((200, 29))
    state[:, 3:7] = q
    expected = []
    for quat in q:
        m = np.zeros(9)
        mujoco.mju_quat2Mat(m, quat)
        expected.append(m[8])  # row-major 3x3: element (2, 2), the body z axis' world z
    np.testing.assert_allclose(ant.up_axis_z(state), expected, atol=1e-12)
    expected = [z < 0 for z in expected]
    assert np.array_equal(ant.upside_down(state), expected)
    assert 20 < sum(expected) < 180  # both kinds are checked


def turned_over_share(model, n=8, steps=500, seed=0):
    """Share of n ants (standing start, reset noise) that lie on their back at some step under
    uniformly random actions, a new one every step."""
    import mujoco
    rng, over = np.random.default_rng(seed), 0
    for _ in range(n):
        d = mujoco.MjData(model)
        d.qpos[:] = d.qpos + rng.uniform(-0.1, 0.1, 15)
        for _ in range(steps):
            d.ctrl[:] = rng.uniform(-1, 1, 8)
            mujoco.mj_step(model, d, nstep=5)
            if ant.upside_down(np.concatenate([d.qpos, d.qvel]))[0]:
                over += 1
                break
    return over / n


def test_the_ant_has_d4rls_motors_time_step_and_contacts_on_ant_v5s_body():
    """The walker's floor and the evaluation maze both load D4RL AntMaze's ant: torque 30 per unit
    action, 5 x 0.02 s per step, D4RL's softer contacts; its legs, masses and joints are Ant-v5's.
    Under random actions none of 8 such ants turns over in 500 steps, while Ant-v5's strong motors
    turn most of them (the cause of the Ant-v5 data's ants on their backs, docs/TASKS.md)."""
    from gymnasium.envs.mujoco.ant_v5 import AntEnv
    v5 = AntEnv().model
    floor, _, _, frame_skip = ant.ant_model()
    maze_env = tasks.make_env(tasks.get_task("ant-umaze-diverse")).unwrapped
    for model, dt in ((floor, frame_skip * floor.opt.timestep), (maze_env.model, maze_env.ant_env.dt)):
        assert model.opt.timestep == 0.02 and dt == pytest.approx(ant.DT) and ant.DT == 0.1
        assert np.all(model.actuator_gear[:, 0] == 30.0) and np.all(np.abs(model.actuator_ctrlrange) == 1.0)
        torso_and_legs = [i for i in range(model.ngeom) if model.geom_bodyid[i] > 0]
        assert np.allclose(model.geom_solimp[torso_and_legs, :3], [0.8, 0.8, 0.01])
    for field in ("body_mass", "body_inertia", "geom_size", "geom_friction", "jnt_range", "dof_armature", "dof_damping"):
        assert np.array_equal(getattr(floor, field), getattr(v5, field)), field
    assert floor.opt.integrator == v5.opt.integrator and v5.opt.timestep == 0.01 and np.all(v5.actuator_gear[:, 0] == 150)
    assert turned_over_share(floor) == 0.0 and turned_over_share(v5) >= 0.5


def put_on_its_back(ants, i):
    """Ant i of a GoalAnts, at rest on its back (rotated by pi about its x axis), torso at a healthy 0.4."""
    import mujoco
    d = ants.data[i]
    d.qpos[2], d.qpos[3:7], d.qvel[:] = 0.4, [0.0, 1.0, 0.0, 0.0], 0.0
    mujoco.mj_forward(ants.model, d)
    ants.states[i] = ant.ant_state(d)


def test_an_ant_on_its_back_is_a_fall_only_with_upside_down_falls():
    """An ant put on its back (rotated by pi about its x axis) at a healthy torso height: the height
    rule lets it go on; with upside_down_falls its episode ends (reward 0 but the control cost)."""
    for flag in (False, True):
        ants = ant.GoalAnts(1, seed=0, upside_down_falls=flag)
        put_on_its_back(ants, 0)
        _, r, terminated, _, _, next_obs = ants.step(np.zeros((1, 8)))
        on_back = np.concatenate([[0, 0], next_obs[0, :27]])  # next_obs holds qpos[2:] before any reset
        assert ant.upside_down(on_back)[0] and ant.HEALTHY_Z[0] <= on_back[2] <= ant.HEALTHY_Z[1]
        assert terminated[0] == flag and (r[0] == 0.0) == flag


def test_long_walks_count_an_ant_on_its_back_once_and_its_goals():
    """ant.long_walks: of two ants standing still, the one put on its back counts, the other
    does not; standing still reaches no goal. Then scripts/ant_walker_check.py runs on the shipped walker."""
    ants = ant.GoalAnts(2, seed=0, max_steps=100)
    put_on_its_back(ants, 0)
    result = ant.long_walks(lambda obs: np.zeros((len(obs), 8)), ants, steps=5)
    assert (result["upside_down_rate"], result["fall_rate"], result["goals_per_ant"]) == (0.5, 0.0, 0.0)
    from conftest import run
    out = run([ROOT / "scripts" / "ant_walker_check.py", "--trials", 2, "--ants", 2, "--steps", 20, "--noises", 0.2],
              ROOT)
    checked = json.loads(out.stdout)
    assert checked["walker"].endswith("ant_walker.npz") and checked["reach"]["trials"] == 2
    assert [w["noise"] for w in checked["long_walks"]] == [0.2] and checked["long_walks"][0]["steps"] == 20


def test_goal_ants_reward_is_the_speed_towards_the_goal():
    ants = ant.GoalAnts(3, seed=0, alive_bonus=0.5, ctrl_cost=0.1)
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(30):
        before, goals = ants.states[:, :2].copy(), ants.goals.copy()
        a = rng.uniform(-1, 1, (3, 8))
        _, r, terminated, truncated, reached, next_obs = ants.step(a)
        after = np.stack([ant.ant_state(d) for d in ants.data])[:, :2] if not (terminated | truncated).any() else None
        if after is None:
            continue
        expected = (np.linalg.norm(goals - before, axis=1) - np.linalg.norm(goals - after, axis=1)) / ant.DT + 0.5 \
            - 0.1 * (a ** 2).sum(1)
        assert np.allclose(r, expected, atol=1e-4)
        assert np.allclose(next_obs, ant.walker_obs(np.stack([ant.ant_state(d) for d in ants.data]), ants.goals), atol=1e-6)
        assert np.array_equal(ants.goals != goals, np.repeat(reached[:, None], 2, 1))  # only a reached goal moves
        checked += 1
    assert checked >= 25


def test_antmaze_env_state_reward_and_termination():
    """D4RL's 29-d state (qpos, qvel of the env's own MuJoCo data); reward 1 and the end exactly when
    ||xy - goal|| <= 0.5, which holds whenever gymnasium-robotics' own success (<= 0.45) does; the
    JAX termination function says the same on the same states."""
    task = tasks.get_task("ant-umaze-diverse")
    env = tasks.make_env(task)
    state, _ = env.reset(seed=0)
    inner = env.unwrapped
    assert state.shape == (29,) and np.array_equal(state, np.concatenate([inner.data.qpos, inner.data.qvel]))
    start = ant.cell_centre("umaze", mazes.maze_cells(mazes.MAZES["umaze"], "R")[0])
    assert np.abs(state[:2] - start).max() <= 1.0 + 1e-9  # the env's +-0.25 cell noise
    done_fn = jax.jit(tasks.termination_fn(task))
    goal = np.asarray(task.goal)
    seen = set()
    for offset in (0.0, 0.3, 0.44, 0.47, 0.49, 0.52, 0.6, 2.0):
        env.reset(seed=1)
        qpos, qvel = inner.data.qpos.copy(), inner.data.qvel.copy()
        qpos[:2] = goal + [offset, 0.0]
        inner.ant_env.set_state(qpos, 0 * qvel)
        state, r, terminated, truncated, info = env.step(np.zeros(8))
        d = np.linalg.norm(state[:2] - goal)
        assert (r == 1.0) == terminated == info["success"] == (d <= 0.5)
        own = np.linalg.norm(inner.data.qpos[:2] - inner.goal) <= 0.45  # gymnasium-robotics' success rule
        assert not own or terminated
        assert bool(done_fn(state[None], np.zeros((1, 8)), state[None])[0]) == terminated
        seen.add(terminated)
    assert seen == {True, False}


WALKER_FLAGS = ["--eval-every", "24", "--start-steps", "16", "--batch-size", "16", "--buffer-size", "200",
                "--num-envs", "4", "--hidden-dims", "16", "16", "--eval-trials", "2"]


def test_the_generator_takes_a_walker_trained_here_before_the_shipped_one(tmp_path):
    assert ant.default_walker_path(tmp_path) == ant.SHIPPED_WALKER  # nothing trained in this data folder
    ant.trained_walker_path(tmp_path).write_bytes(b"")
    assert ant.default_walker_path(tmp_path) == tmp_path / "ant_walker.npz"


def test_a_walker_for_ant_v5s_body_is_refused(tmp_path):
    """Walkers of data version 1 (trained on Ant-v5's strong motors, recorded as env 'ant-walker')
    walk another body: one line that says to train one, and the walker artifacts now record the body."""
    old = tmp_path / "ant_walker.npz"
    np.savez(old, **{"meta/env": np.asarray("ant-walker"), "meta/kind": np.asarray(ant.WALKER_KIND)})
    with pytest.raises(tasks.InputError, match="Ant-v5's body.*train_ant_walker"):
        ant.load_walker(old)
    assert ant.WALKER_TASK.name == "ant-walker-d4rl-body"
    broken = tmp_path / "broken.npz"
    broken.write_bytes(ant.SHIPPED_WALKER.read_bytes()[:1000])  # a cut-off copy: still the one-line error
    with pytest.raises(tasks.InputError):
        ant.load_walker(broken)


def test_a_dataset_of_the_version_1_generator_is_refused(tmp_path):
    """Data made on Ant-v5's body (generator mark 'ant.generate v1') are refused, also when passed
    with --dataset-path; this version's mark and files without one pass."""
    task = tasks.get_task("ant-umaze-diverse")
    for mark, refused in (("ant.generate v1", True), (f"ant.generate v{ant.DATA_VERSION}", False), (None, False)):
        path = tmp_path / f"{mark}.hdf5"
        with h5py.File(path, "w") as f:
            if mark:
                f.attrs["generator"] = mark
        if refused:
            with pytest.raises(tasks.InputError, match="Ant-v5's body"):
                tasks.d4rl_format_file(task, str(path), None)
        else:
            assert tasks.d4rl_format_file(task, str(path), None)[0] == path


def test_the_shipped_walker_reaches_issue_37s_target():
    """The walker that comes with the project (leq_utils/ant_walker.npz, trained on D4RL's ant body;
    docs/TASKS.md says how it was trained and measured: 99% of 100 fresh trials, issue 37's target
    is 90%) loads, and on 24 trials it was not measured on it reaches goals 4-8 units away within
    100 steps at least 90% of the time (22 of 24), without turning over."""
    act, f = ant.load_walker(ant.SHIPPED_WALKER)
    assert float(f["summary/reach_rate"]) >= 0.9 and int(f["summary/steps"]) >= 1_000_000
    result = ant.reach_trials(act, 24, seed=777)
    assert result["reach_rate"] >= 22 / 24 and result["upside_down_rate"] == 0.0, result
    assert result["fall_rate"] <= 1 / 24, result


def train_walker(out, run_dir, steps):
    """The trainer itself, tiny sizes: a real (barely trained) walker artifact."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_ant_walker.py"), "--total-steps", str(steps),
                          *WALKER_FLAGS, "--out", str(out), "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return artifacts.read_npz(out)


@pytest.mark.slow
def test_walker_training_resumes_exactly_then_generates_d4rl_format(tmp_path):
    """Trained in one go, or trained to 48 steps and then on to 96 from its checkpoint (a run may
    be extended): the same walker, bit for bit. Then the generator with it: D4RL's keys and
    dtypes, 1000-step episodes with timeouts, rewards = terminals = (the next state within 0.5 of
    the goal), torso positions inside the maze's free cells, deterministic for a seed."""
    one = train_walker(tmp_path / "one.npz", tmp_path / "a", 96)
    train_walker(tmp_path / "half.npz", tmp_path / "b", 48)  # leaves its checkpoint of step 24
    two = train_walker(tmp_path / "two.npz", tmp_path / "b", 96)
    actor_keys = [k for k in one if k.startswith("actor/")]
    assert actor_keys and all(np.array_equal(one[k], two[k]) for k in actor_keys)
    assert int(one["summary/steps"]) == 96

    task = tasks.get_task("ant-umaze-play")  # its places: the start and goal cells, so some episodes start at the goal
    for name in ("g1.hdf5", "g2.hdf5"):
        ant.generate(task, tmp_path / name, tmp_path / "one.npz", size=2500, seed=3, n_ants=2)
    with h5py.File(tmp_path / "g1.hdf5") as f, h5py.File(tmp_path / "g2.hdf5") as g:
        assert f.attrs["env"] == "ant-umaze-play"
        for k in ("observations", "actions", "rewards", "terminals", "timeouts", "infos/goal"):
            assert np.array_equal(f[k][()], g[k][()]), k
        obs, acts, rew, term, timeouts = (f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts"))
    assert obs.shape == (2500, 29) and acts.shape == (2500, 8) and obs.dtype == np.float32
    assert term.dtype == bool and timeouts.dtype == bool and np.abs(acts).max() <= 1.0
    assert list(np.flatnonzero(timeouts)) == [999, 1999, 2499]
    goal = np.asarray(task.goal)
    same_episode = ~timeouts[:-1]
    next_xy = obs[1:, :2][same_episode]
    assert np.array_equal(rew[:-1][same_episode] > 0, np.linalg.norm(next_xy - goal, axis=1) <= 0.5)
    assert np.array_equal(rew > 0, term) and 0 < (rew > 0).sum() < len(rew)  # both kinds of rows are checked
    layout = mazes.MAZES["umaze"]
    i, j = mazes.xy_cells(layout, obs[:, :2] / ant.SCALE)
    assert all(layout[a][b] != "#" for a, b in zip(i, j))  # the torso never enters a wall cell
    ds = tasks.load_dataset(task, str(tmp_path / "g1.hdf5"))  # the stages read it
    assert ds.observations.shape[1] == 29 and (ds.reward_scale, ds.reward_shift) == (1.0, -1.0)


@pytest.mark.slow
def test_every_stage_runs_on_a_built_in_ant_maze(tmp_path):
    """A tiny pipeline on an ant maze as a user runs it: the shipped walker makes the data, then
    world_model.py, pretrain.py and leq.py (its evaluation in gymnasium-robotics' AntMaze, 29-d
    states and 8-d actions through every stage), then evaluate.py on LEQ's artifact."""
    from conftest import TINY_PRETRAIN, TINY_WORLD_MODEL, run
    env = "ant-umaze-diverse"
    data = tmp_path / "ant.hdf5"
    ant.generate(tasks.get_task(env), data, ant.SHIPPED_WALKER, size=3000, seed=1, n_ants=2)
    common = ["--env", env, "--dataset-path", data]
    run([ROOT / "world_model.py", *common, "--out", tmp_path / "wm.npz", *TINY_WORLD_MODEL], tmp_path)
    run([ROOT / "pretrain.py", *common, "--world-model", tmp_path / "wm.npz", "--out", tmp_path / "pt.npz",
         *TINY_PRETRAIN, "--chunk", 10], tmp_path)
    run([ROOT / "leq.py", *common, "--world-model", tmp_path / "wm.npz", "--pretrain", tmp_path / "pt.npz",
         "--run-dir", tmp_path / "leq", "--total-steps", 40, "--chunk", 20, "--eval-every", 40,
         "--eval-episodes", 1, "--final-eval-rounds", 1, "--expand-every", 20, "--expand-size", 32,
         "--batch-size", 32, "--model-batch-size", 32, "--horizon", 3], tmp_path)
    f = artifacts.read_npz(tmp_path / "leq" / "leq.npz")
    assert any(k.startswith("actor/") for k in f) and 0.0 <= float(f["summary/final_score"]) <= 100.0
    run([ROOT / "evaluate.py", "--checkpoint", tmp_path / "leq" / "leq.npz", "--episodes", 1], tmp_path)
    result = json.loads((tmp_path / "leq" / "leq.eval.json").read_text())
    assert result["env"] == env and result["env_goal"] == list(tasks.get_task(env).goal)
    assert result["length"] == 700 or (result["success"] == 1.0 and result["length"] < 700)  # D4RL umaze's limit
    check_imagined_on_back(env, data, tmp_path / "wm.npz", tmp_path / "leq" / "leq.npz")
    check_model_foresight(data, tmp_path / "wm.npz", tmp_path / "leq" / "leq.npz", tmp_path)


def check_imagined_on_back(env, data, wm_path, actor_path):
    """model_rollout_check's share of imagined ants on their backs per step against a plain loop:
    start states of which every other one is turned on its back (quaternion (0, 1, 0, 0)), the same
    per-step keys through world_model.model_step, ant.upside_down on each step's live states."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import jax.numpy as jnp
    import model_rollout_check
    import pretrain
    import world_model
    task, nets, actor = pretrain.load_actor(str(actor_path))
    wm = world_model.load_world_model(str(wm_path), task)
    obs = tasks.load_dataset(task, str(data)).observations.copy()
    obs[::2, 2], obs[::2, 3:7] = 0.4, [0.0, 1.0, 0.0, 0.0]
    done_fn = tasks.termination_fn(task)
    a = model_rollout_check.Args(checkpoint="", world_model="", imagined=40, horizon=3, seed=5)
    *_, back = model_rollout_check.imagined_rollouts(obs, wm, nets, actor, done_fn, model_rollout_check.in_wall_fn(task),
                                                     a, model_rollout_check.on_back_fn(task))
    s = obs[np.random.default_rng(5).choice(len(obs), 40)]
    alive, expected = np.ones(40, bool), [float(np.mean(ant.upside_down(s)))]
    for k in jax.random.split(jax.random.PRNGKey(5), 3):
        s2, _, done = world_model.model_step(wm, jnp.asarray(s), nets.pi(actor, jnp.asarray(s)), k, done_fn)
        s = np.asarray(s2)
        expected.append(sum(bool(b) for b, live in zip(ant.upside_down(s), alive) if live) / max(alive.sum(), 1))
        alive = alive & ~np.asarray(done).astype(bool)
    assert 0.2 < expected[0] < 0.8 and back.tolist() == pytest.approx(expected, abs=1e-6)


def check_model_foresight(data, wm_path, actor_path, tmp_path):
    """route_check.model_foresight and data_foresight against plain loops, on the tiny model made
    to turn ants over: elite e's mean step adds 0.2 (e + 1) to qx (its output bias for that
    coordinate), so that after 1, 3 and 10 steps some, not all, of its predictions lie on their
    backs. Hand-made failed episodes (the data's states, on their backs from step t on) give the
    starts; a success and a failure that never turns over are left out. Imagination ends by a
    hand-made done (an up-axis z below -15: qx above 2.8, after about 10 tilted steps), so that
    some rollouts end on the way. Shares, the continuous up-axis medians and the rollouts left are
    compared. Then the CLI with --world-model on 2 episodes."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import jax.numpy as jnp
    import pretrain
    import route_check
    import world_model
    task, nets, actor = pretrain.load_actor(str(actor_path))
    wm = world_model.load_world_model(str(wm_path), task)
    n_el = len(world_model.members(wm.params))
    last = f"layer_{len(wm.params['member_0']) - 1}"
    params = {k: v for k, v in wm.params.items()}
    for e in range(n_el):
        layer = dict(params[f"member_{e}"][last])
        layer["bias"] = layer["bias"].at[4].add(0.2 * (e + 1))
        params[f"member_{e}"] = {**params[f"member_{e}"], last: layer}
    wm = wm._replace(params=params)
    ds = tasks.load_dataset(task, str(data))
    obs, done_fn = ds.observations, tasks.termination_fn(task)
    tipped = lambda s, a, s2: ant.up_axis_z(s2) < -15  # noqa: E731
    firsts = (12, 20, 2, 30)
    episodes = []
    for i, t in enumerate(firsts):
        o = obs[40 * i:40 * i + 40].copy()
        o[t:, 3:7] = [0.0, 1.0, 0.0, 0.0]
        episodes.append(dict(obs=o, success=False))
    episodes += [dict(obs=obs[200:240], success=False), dict(obs=episodes[0]["obs"], success=True)]
    key, rollouts = jax.random.PRNGKey(3), 4
    got = route_check.model_foresight(task, wm, nets, actor, episodes, (1, 3, 10), rollouts, key, tipped)

    def elite_paths(starts, actions):  # one elite, one start, one step at a time
        out = []
        for s0, acts in zip(starts, actions):
            for e in range(n_el):
                s = jnp.asarray(s0[None])
                for a in acts:
                    s = world_model.model_step_given(wm, s, jnp.asarray(a[None]), jnp.asarray([e]),
                                                     jnp.zeros((1, 30)), done_fn)[0]
                out.append(np.asarray(s)[0])
        return np.stack(out)

    for k in (1, 3, 10):
        starts = [(e["obs"], t) for e, t in zip(episodes[:4], firsts) if t >= k]
        ends = elite_paths([o[t - k] for o, t in starts],
                           [[np.asarray(nets.pi(actor, jnp.asarray(o[j][None])))[0] for j in range(t - k, t)]
                            for o, t in starts])
        s = jnp.asarray(np.repeat(np.stack([o[t - k] for o, t in starts]), rollouts, 0))
        noise, alive = world_model.model_noise(wm, jax.random.fold_in(key, k), (k, s.shape[0])), np.ones(s.shape[0], bool)
        for j in range(k):
            s, _, done = world_model.model_step_given(wm, s, nets.pi(actor, s), noise.member[j], noise.eps[j], tipped)
            alive &= ~np.asarray(done).astype(bool)
        imagined = np.asarray(s)[alive]
        row = got[str(k)]
        assert row["starts"] == len(starts) == (4 if k == 1 else 3)
        assert (row["rollouts"], row["alive"]) == (len(alive), alive.sum())
        if k == 10:
            assert 0 < alive.sum() < len(alive)  # some rollouts ended on the way, some did not
        assert row["elites_on_back"] == pytest.approx(np.mean(ant.upside_down(ends)), abs=1e-9)
        assert row["elites_up_z"] == pytest.approx(np.median(ant.up_axis_z(ends)), abs=1e-4)
        assert row["imagined_on_back"] == pytest.approx(np.mean(ant.upside_down(imagined)), abs=1e-9)
        assert row["imagined_up_z"] == pytest.approx(np.median(ant.up_axis_z(imagined)), abs=1e-4)
    assert 0 < got["3"]["elites_on_back"] < 1 and got["1"]["elites_on_back"] < got["10"]["elites_on_back"]
    # the data's own turn-overs: a chain of 60 rows turned over at row 30 (transition 29); a second
    # turned over at row 50 after a break in the chain at row 45 (too close for k = 10)
    o, o2 = obs[:60].copy(), obs[1:61].copy()
    o2[44] = obs[300]
    o[30:45, 3:7] = o2[29:44, 3:7] = o[50:, 3:7] = o2[49:, 3:7] = [0.0, 1.0, 0.0, 0.0]
    chain = tasks.Dataset(o, ds.actions[:60], ds.rewards[:60], o2, ds.terminals[:60], 1.0, -1.0, "hand-made")
    own = route_check.data_foresight(task, wm, chain, (1, 3, 10))
    for k, flips in ((1, (29, 49)), (3, (29, 49)), (10, (29,))):
        ends = elite_paths([o[i - k + 1] for i in flips], [chain.actions[i - k + 1:i + 1] for i in flips])
        assert own[str(k)]["starts"] == len(flips)
        assert own[str(k)]["elites_on_back"] == pytest.approx(np.mean(ant.upside_down(ends)), abs=1e-9)
        assert own[str(k)]["elites_up_z"] == pytest.approx(np.median(ant.up_axis_z(ends)), abs=1e-4)
    out = tmp_path / "route.json"
    report = route_check.main(route_check.Args(checkpoint=str(actor_path), world_model=str(wm_path), episodes=2,
                                               parallel=2, out=str(out)))
    assert report["data_turn_overs"]["transitions"] == len(obs) and set(report["model_foresight"]) == {"1", "3", "10"}
    assert set(report["data_foresight"]) == {"1", "3", "10"}
    assert report["turn_overs"]["failures"]["episodes"] + report["turn_overs"]["successes"]["episodes"] == 2
