"""OGBench single-task mazes: the task table, the success rule against ogbench's env, a file in
ogbench's layout read as this project's transitions, the local generator, one-line errors, and
the whole pipeline on a generated dataset (the real scripts, in subprocesses)."""

import subprocess
import sys

import gymnasium
import numpy as np
import ogbench  # noqa: F401  (registers the envs)
import pytest

from leq_utils import ogbench_tasks
from leq_utils import tasks
import generate_dataset  # noqa: E402  (scripts/, on the path through conftest)
from conftest import ROOT

POINT = "pointmaze-medium-navigate-singletask-v0"


def one_line(e):
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("maze", ["medium", "large", "giant"])
def test_tasks_goals_and_limits_are_the_envs(maze):
    for k in range(1, 6):
        name = f"pointmaze-{maze}-navigate-singletask-task{k}-v0"
        task = tasks.get_task(name)
        env = ogbench_tasks.make_env(task)
        obs, _ = env.reset(seed=0)
        u = env.unwrapped
        assert u.cur_goal_xy == pytest.approx(task.goal) and u._goal_tol == task.goal_radius
        assert u.task_infos[k - 1]["init_xy"] == pytest.approx(ogbench_tasks.cell_xy(ogbench_tasks.TASK_CELLS[maze][k - 1][0]))
        assert obs.shape == (task.obs_dim,) and env.spec.max_episode_steps == task.max_episode_steps
        assert env.spec.id == f"pointmaze-{maze}-singletask-task{k}-v0"
    assert tasks.get_task(f"pointmaze-{maze}-navigate-singletask-v0").goal == tasks.get_task(
        f"pointmaze-{maze}-navigate-singletask-task1-v0").goal  # no number = task 1, as ogbench


@pytest.mark.parametrize("name", ["antmaze-large-navigate-singletask-task3-v0",
                                  "humanoidmaze-giant-navigate-singletask-v0"])
def test_ant_and_humanoid_dims_tolerance_and_limits(name):
    task = tasks.get_task(name)
    env = tasks.make_env(task)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (task.obs_dim,) and env.action_space.shape == (task.act_dim,)
    assert env.unwrapped._goal_tol == task.goal_radius and env.unwrapped.cur_goal_xy == pytest.approx(task.goal)
    assert env.spec.max_episode_steps == task.max_episode_steps
    assert np.allclose(obs[:2], env.unwrapped.get_xy())  # the rule reads xy from observation[:2]


@pytest.mark.parametrize("agent", ["pointmaze", "antmaze"])
def test_termination_is_the_envs_success_on_states_it_produced(agent):
    """Random steps around task 1's goal (start in its cell, +-1 noise) in the goal-conditioned
    env with the same goal: info['success'] after each step is ogbench's compute_success on the
    state the step produced; the JAX rule on that observation must agree, at the exact tolerance too."""
    task = tasks.get_task(f"{agent}-medium-navigate-singletask-v0")
    done = tasks.termination_fn(task)
    env = gymnasium.make(f"{agent}-medium-v0", terminate_at_goal=False, add_noise_to_goal=False)
    rng = np.random.default_rng(0)
    cell = ogbench_tasks.TASK_CELLS["medium"][0][1]
    got, want = [], []
    for episode in range(6):
        with ogbench_tasks.numpy_seed(episode):
            env.reset(seed=episode, options=dict(task_info=dict(init_ij=cell, goal_ij=cell)))
        for _ in range(40):
            obs, _, _, _, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
            got.append(bool(done(None, None, obs.astype(np.float32))))
            want.append(bool(info["success"]))
    assert got == want and 0 < sum(want) < len(want)
    u, goal = env.unwrapped, np.asarray(task.goal)
    for offset, inside in ((task.goal_radius, True), (task.goal_radius + 1e-3, False)):
        u.set_xy(goal + np.array([offset, 0.0]))
        assert u.compute_success() == inside == bool(done(None, None, u.get_ob().astype(np.float32)))


def write_ogbench_file(path, starts, length, seed=0):
    """Trajectories of random steps recorded in ogbench's layout by a plain loop (one row per
    step, plus the final observation with terminal = 1), and what the env said about each step:
    info['success'] ('post' timing, task 1's goal, no goal noise) = success of the next state."""
    env = gymnasium.make("pointmaze-medium-v0", terminate_at_goal=False, add_noise_to_goal=False,
                         max_episode_steps=length + 1)
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    success = []
    for i, start in enumerate(starts):
        with ogbench_tasks.numpy_seed(seed + i):
            ob, _ = env.reset(seed=seed + i, options=dict(task_info=dict(init_ij=start, goal_ij=(6, 6))))
        done = False
        while not done:
            action = rng.uniform(-1, 1, 2).astype(np.float32)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            for k, v in zip(rows, (ob, action, done, info["prev_qpos"], info["prev_qvel"])):
                rows[k].append(v)
            if not done:
                success.append(bool(info["success"]))
            ob = next_ob
    np.savez_compressed(path, **{k: np.asarray(v, bool if k == "terminals" else np.float32) for k, v in rows.items()})
    return success


def test_a_file_in_ogbenchs_layout_is_read_with_the_envs_success(tmp_path):
    path = tmp_path / "pointmaze-medium-navigate-v0.npz"
    success = write_ogbench_file(path, starts=[(6, 6), (6, 5), (5, 6)], length=60)
    task = tasks.get_task(POINT)
    ds = tasks.load_dataset(task, str(path))
    f = np.load(path)
    # the plain reference: row i and row i + 1 inside a trajectory (the row with terminal 1 holds
    # only the final observation)
    keep = [i for i in range(len(f["terminals"]) - 1) if not f["terminals"][i]]
    np.testing.assert_array_equal(ds.observations, f["observations"][keep])
    np.testing.assert_array_equal(ds.next_observations, f["observations"][[i + 1 for i in keep]])
    np.testing.assert_allclose(ds.actions, np.clip(f["actions"][keep], -1 + 1e-5, 1 - 1e-5))
    assert len(ds.rewards) == 3 * 60 and 0 < sum(success) < len(success)
    np.testing.assert_array_equal(ds.terminals, np.asarray(success, np.float32))  # the success of s'
    np.testing.assert_array_equal(ds.rewards, np.asarray(success, np.float32) - 1)  # 0 into the goal, else -1
    assert (ds.reward_scale, ds.reward_shift) == (1.0, 0.0)
    # ogbench's own loader and single-task relabelling flag the success of s_t: the same flags one row later
    np.savez_compressed(tmp_path / "pointmaze-medium-navigate-v0-val.npz", **f)
    _, train, _ = ogbench.make_env_and_datasets(POINT, dataset_path=str(path))
    inside = train["terminals"][:-1] == 0  # t and t + 1 in the same trajectory
    np.testing.assert_array_equal(ds.terminals[:-1][inside], 1 - train["masks"][1:][inside])
    np.testing.assert_array_equal(ds.rewards[:-1][inside], train["rewards"][1:][inside])


def test_generator_layout_determinism_and_ogbenchs_loader(tmp_path):
    task = tasks.get_task(POINT)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for path in (a, b):
        ogbench_tasks.generate(task, path, size=2000, seed=4, episode_len=500)
    fa, fb = np.load(a), np.load(b)
    for k in ("observations", "actions", "terminals", "qpos", "qvel"):
        np.testing.assert_array_equal(fa[k], fb[k])
    assert fa["observations"].shape == (4 * 501, 2) and fa["terminals"].dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(fa["terminals"]), np.arange(500, 4 * 501, 501))
    np.testing.assert_array_equal(fa["qpos"], fa["observations"])  # the point's observation is its qpos
    steps = np.linalg.norm(np.diff(fa["observations"], axis=0), axis=1)[~fa["terminals"][:-1]]
    assert steps.max() <= 0.2 * np.sqrt(2) + 1e-5  # qpos += 0.2 * action, actions in [-1, 1]
    assert np.load(tmp_path / "a-val.npz")["observations"].shape == (501, 2)
    _, train, val = ogbench.make_env_and_datasets(POINT, dataset_path=str(a))  # ogbench reads it
    assert len(train["observations"]) == 2000 and len(val["observations"]) == 500
    # the controller drives from goal to goal: its trajectories cover the maze, not one corridor
    cells = {tuple(np.floor((xy + 6) / 4).astype(int)) for xy in fa["observations"]}
    assert len(cells) >= 12


def test_in_the_goal_cell_the_data_controller_aims_at_the_centre_as_ogbench():
    """Generator v2's rule (issue 38), against a value derived from it, not from data: goals are
    the cell centre plus uniform +-1 noise per axis (the env's own set_goal), success needs
    ||xy - goal|| <= 1.0; the noise-free data controller started AT the centre stays within one
    0.2 step of it, so it succeeds exactly for goals within 1.0 of the centre: a fraction pi/4
    (0.785) of the area of the +-1 square. The evaluation reference (aim_at_goal) reaches every goal."""
    env = gymnasium.make("pointmaze-large-v0", terminate_at_goal=False).unwrapped
    cell, n, reached, within = (7, 10), 400, {False: 0, True: 0}, 0
    centre = np.array(ogbench_tasks.cell_xy(cell))
    with ogbench_tasks.numpy_seed(0):
        env.reset(options=dict(task_info=dict(init_ij=cell, goal_ij=cell)))
        for _ in range(n):
            env.set_goal(goal_ij=cell)
            within += np.linalg.norm(np.asarray(env.cur_goal_xy) - centre) <= 1.0
            for aim in (False, True):
                env.set_xy(centre)
                for _ in range(20):
                    _, _, _, _, info = env.step(ogbench_tasks.oracle_action(env, {}, aim_at_goal=aim))
                    reached[aim] += bool(info["success"])
                    if info["success"] or not aim and np.linalg.norm(env.get_xy() - centre) > 0.2 + 1e-9:
                        break  # the data controller never leaves the centre's 0.2 neighbourhood
                assert aim or np.linalg.norm(env.get_xy() - centre) <= 0.2 + 1e-9
    p, sd = np.pi / 4, np.sqrt(np.pi / 4 * (1 - np.pi / 4) / n)
    assert reached[False] == within                           # exactly the goals within 1.0 of the centre
    assert abs(reached[False] / n - p) < 3.5 * sd, reached    # 0.785 +- 0.072 (measured: 304/400 = 0.760)
    assert reached[True] == n


def test_generated_data_hover_only_at_goal_cell_centres(tmp_path):
    """A small generated set: the data controller parks the point only where a goal is (the centre
    of a vertex cell), so every long stay near one centre (a hover, the statistic of
    navigate_statistics) is at a vertex cell, and hovers occur (v1 data had none: the point always
    went on to the goal)."""
    task = tasks.get_task("pointmaze-large-navigate-singletask-v0")
    path = tmp_path / "g.npz"
    ogbench_tasks.generate(task, path, size=20_000, seed=1)
    stats = ogbench_tasks.navigate_statistics(task, path)
    assert stats["trajectories"] == 20 and stats["trajectories_with_hover"] >= 1, stats
    xy = np.load(path)["observations"].astype(np.float64)
    ji = np.rint((xy + 4.0) / 4.0).astype(int)
    near = np.linalg.norm(xy - (4.0 * ji - 4.0), axis=1) <= 0.5
    env = gymnasium.make("pointmaze-large-v0").unwrapped
    vertex = set(ogbench_tasks.vertex_cells(env.maze_map))
    run = 0
    for t in range(len(xy)):
        run = run + 1 if near[t] and t and near[t - 1] and (ji[t] == ji[t - 1]).all() else int(near[t])
        if run >= 50:
            assert (int(ji[t, 1]), int(ji[t, 0])) in vertex, (t, ji[t])


def test_oracle_controller_reaches_the_evaluation_goal():
    task = tasks.get_task(POINT)
    rate, steps = ogbench_tasks.controller_success(task, episodes=3, noise=0.0)
    assert rate == 1.0 and steps < task.max_episode_steps / 2


def test_dataset_lookup_order(tmp_path, monkeypatch):
    task = tasks.get_task(POINT)
    official, generated = tmp_path / "official", tmp_path / "generated"
    monkeypatch.setattr(ogbench_tasks, "OFFICIAL_DIR", official)
    monkeypatch.setattr(ogbench_tasks, "GENERATED_DIR", generated)
    with pytest.raises(tasks.InputError) as e:
        tasks.load_dataset(task)
    assert "download_datasets(['pointmaze-medium-navigate-v0']" in one_line(e) and "python scripts/generate_dataset.py --env" in one_line(e)
    mine = ogbench_tasks.generated_file(task)
    assert mine == generated / "pointmaze-medium-navigate-v0_1000k_seed0_v2.npz"
    generated.mkdir()
    write_ogbench_file(mine, [(6, 6)], 20)
    assert tasks.load_dataset(task).path == str(mine)
    official.mkdir()
    write_ogbench_file(official / "pointmaze-medium-navigate-v0.npz", [(6, 6)], 30)
    assert tasks.load_dataset(task).path == str(official / "pointmaze-medium-navigate-v0.npz")  # ogbench's first
    assert tasks.load_dataset(task, data_dir=str(generated)).path == str(mine)  # --data-dir: only there
    ant = tasks.get_task("antmaze-large-navigate-singletask-v0")
    with pytest.raises(tasks.InputError) as e:
        tasks.load_dataset(ant)
    assert "antmaze-large-navigate-v0.npz" in one_line(e) and "tasks.py" not in one_line(e)


def test_bad_names_and_files_give_one_line(tmp_path):
    for name in ("pointmaze-huge-navigate-singletask-v0", "pointmaze-large-navigate-singletask-task6-v0",
                 "pointmaze-teleport-navigate-singletask-v0"):
        with pytest.raises(tasks.InputError) as e:
            tasks.get_task(name)
        assert one_line(e).startswith(f"unknown env '{name}'")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(tasks.InputError) as e:
        tasks.load_dataset(tasks.get_task(POINT), str(bad))
    assert "not a readable OGBench .npz" in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        tasks.load_dataset(tasks.get_task(POINT), str(tmp_path / "missing.npz"))
    assert "does not exist" in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        generate_dataset.main(generate_dataset.Args(env="antmaze-large-navigate-singletask-v0"))
    assert "only built-in pointmaze and ant tasks and OGBench pointmaze" in one_line(e)


@pytest.mark.slow
def test_end_to_end_on_a_generated_dataset(tmp_path):
    """tasks.py generates a small navigate dataset; all stages run on it and evaluate in ogbench's env."""
    def run(*args):
        p = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return p
    p = run(ROOT / "scripts" / "generate_dataset.py", "--env", POINT, "--size", 3000, "--episode-len", 500, "--data-dir", "d",
            "--expert-episodes", 1)
    assert "controller (noise 0.0) on the evaluation task: success 100%" in p.stdout
    common = ["--env", POINT, "--dataset-path", f"d/pointmaze-medium-navigate-v0_3k_seed0_v{ogbench_tasks.GENERATOR_VERSION}.npz"]
    run(ROOT / "world_model.py", *common, "--out", "wm.npz", "--hidden-dims", 16, 16, "--weight-decay",
        2.5e-5, 5e-5, 1e-4, "--ensemble-size", 3, "--num-elites", 2, "--max-epochs", 2)
    run(ROOT / "pretrain.py", *common, "--world-model", "wm.npz", "--out", "pt.npz", "--hidden-dims", 32, 32,
        "--bc-steps", 20, "--fqe-steps", 20, "--chunk", 10, "--bc-batch-size", 64)
    run(ROOT / "leq.py", *common, "--world-model", "wm.npz", "--pretrain", "pt.npz", "--run-dir", "leq",
        "--total-steps", 40, "--chunk", 20, "--eval-every", 40, "--eval-episodes", 2, "--final-eval-rounds", 1,
        "--expand-every", 20, "--expand-size", 64, "--batch-size", 32, "--model-batch-size", 32, "--horizon", 3)
    p = run(ROOT / "evaluate.py", "--checkpoint", "leq/leq.npz", "--episodes", 2)
    assert "env goal [20.0, 20.0], termination centre [20.0, 20.0]" in p.stdout
    assert (tmp_path / "leq" / "leq.trajectories.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["a FIFO", "all-zero observations", "a single number as observations"])
def test_the_check_layer_covers_ogbench_tasks(case, tmp_path):
    """The bad inputs of the reliability issue under an OGBench task: a FIFO as --dataset-path, a
    file whose observations are all zero, and one whose observations are a single number get the
    same one-line refusals as the other tasks (the checks are in the shared layer, not per source)."""
    import os
    path = tmp_path / "d.npz"
    if case == "a FIFO":
        os.mkfifo(path)
    else:
        write_ogbench_file(path, [(1, 1), (6, 1)], 20)
        arrays = dict(np.load(path))
        arrays["observations"] = np.zeros_like(arrays["observations"]) if case == "all-zero observations" else np.float32(3)
        np.savez(path, **arrays)
    p = subprocess.run([sys.executable, ROOT / "world_model.py", "--env", POINT, "--dataset-path", path,
                        "--out", tmp_path / "wm.npz"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    expected = {"a FIFO": f"error: --dataset-path {path} is a named pipe (FIFO), not a file: give a file",
                "all-zero observations": f"error: dataset file {path}: every observation is the same ([0. 0.]): not a "
                                         f"recording of {POINT}; check the file",
                "a single number as observations": f"error: dataset file {path} is not a readable OGBench .npz"}[case]
    assert p.stderr.strip().startswith(expected), p.stderr
    assert not (tmp_path / "wm.npz").exists()
