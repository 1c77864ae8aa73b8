"""Minari datasets: datasets written here with minari's own DataCollector are read as the plain
HDF5 file says (dict observations mapped as D4RL's, maze rewards relabelled for the evaluation
goal), the termination agrees with the envs, scores, one-line errors, and the whole pipeline on a
Minari PointMaze dataset (the real scripts, in subprocesses)."""

import os
import subprocess
import sys
import warnings

import gymnasium
import h5py
import numpy as np
import pytest

from leq_utils import mazes
from leq_utils import minari_tasks
from leq_utils import tasks
from conftest import ROOT

# a U-maze: data from every cell, evaluation from the start 'r' to the goal 'g'
DATA_MAP = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
EVAL_MAP = [[1, 1, 1, 1, 1], [1, "r", 0, 0, 1], [1, 1, 1, 0, 1], [1, "g", 0, 0, 1], [1, 1, 1, 1, 1]]


def one_line(e):
    text = str(e.value)
    assert "\n" not in text
    return text


def collect(env_id, dataset_id, steps, eval_kwargs, policy, seed=0, **dataset_kwargs):
    """A dataset written by minari's DataCollector from `steps` steps of `policy(obs, rng)`."""
    import minari
    mazes.import_gymnasium_robotics()
    env = minari.DataCollector(gymnasium.make(env_id, **eval_kwargs.get("data", {})), record_infos=False)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(policy(obs, rng))
        if terminated or truncated:
            obs, _ = env.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # author, code_permalink, ... are None
        env.create_dataset(dataset_id=dataset_id, algorithm_name="test",
                           eval_env=gymnasium.make(env_id, **eval_kwargs.get("eval", {})), **dataset_kwargs)
    env.close()


def towards_random_points(obs, rng):
    """PD control towards a random point near the point's position, so that it visits the goal."""
    if rng.random() < 0.05 or not hasattr(towards_random_points, "aim"):
        towards_random_points.aim = obs["achieved_goal"] + rng.uniform(-1.5, 1.5, 2)
    return np.clip(10 * (towards_random_points.aim - obs["achieved_goal"]) - obs["observation"][2:], -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(folder)
    maze = dict(data=dict(maze_map=DATA_MAP, continuing_task=True, reset_target=True, max_episode_steps=300),
                eval=dict(maze_map=EVAL_MAP, continuing_task=True, reset_target=False))
    collect("PointMaze_UMaze-v3", "test/pointmaze/umaze-v0", 1500, maze, towards_random_points)
    collect("AntMaze_UMaze-v4", "test/antmaze/umaze-v0", 150,
            dict(data=dict(max_episode_steps=100), eval=dict(maze_map=EVAL_MAP)), lambda o, rng: rng.uniform(-1, 1, 8).astype(np.float32))
    hop = lambda o, rng: rng.uniform(-1, 1, 3).astype(np.float32)  # noqa: E731  (falls within tens of steps)
    collect("Hopper-v5", "test/hopper/medium-v0", 300, {}, hop, ref_min_score=-20.0, ref_max_score=3000.0)
    collect("Hopper-v5", "test/hopper/norefs-v0", 100, {}, hop, seed=1)
    yield folder
    if old is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


def plain_episodes(root, dataset_id):
    """The episodes straight from minari's HDF5 file, with h5py."""
    with h5py.File(root / dataset_id / "data" / "main_data.hdf5", "r") as f:
        return [{k: (f[g][k][()] if not isinstance(f[g][k], h5py.Group)
                     else {j: f[g][k][j][()] for j in f[g][k]}) for k in f[g]}
                for g in sorted(f, key=lambda g: int(g.split("_")[1]))]


def test_pointmaze_episodes_become_transitions_relabelled_for_the_evaluation_goal(root):
    task = tasks.get_task("minari:test/pointmaze/umaze-v0")
    assert (task.family, task.obs_dim, task.act_dim, task.max_episode_steps) == ("pointmaze", 4, 2, 300)
    assert task.goal == (-1.0, -1.0)  # the centre of the 'g' cell (row 3, column 1) of a scale-1 5 x 5 maze
    ds = tasks.load_dataset(task)
    obs, next_obs, actions, terminals = [], [], [], []
    for ep in plain_episodes(root, "test/pointmaze/umaze-v0"):
        o = ep["observations"]["observation"]
        for t in range(len(ep["actions"])):
            obs.append(o[t])
            next_obs.append(o[t + 1])
            actions.append(ep["actions"][t])
            terminals.append(float(np.hypot(*(o[t + 1][:2] - np.array([-1.0, -1.0]))) <= 0.45))
    np.testing.assert_allclose(ds.observations, np.float32(obs))
    np.testing.assert_allclose(ds.next_observations, np.float32(next_obs))
    np.testing.assert_allclose(ds.actions, np.clip(actions, -1 + 1e-5, 1 - 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(ds.terminals, terminals)
    np.testing.assert_array_equal(ds.rewards, terminals)
    assert len(ds.rewards) == 1500 and 0 < sum(terminals) < 1500
    assert (ds.reward_scale, ds.reward_shift) == (1.0, -1.0)


def test_maze_termination_is_the_envs_success_and_evaluation_ends_at_the_goal(root):
    """In the evaluation env, driven to its goal: info['success'] (gymnasium-robotics' <= 0.45 of
    its goal) equals the JAX rule with that goal, on every observation; the episode ends at the
    first success; the env's noisy goal lies within +-0.25 cells of the termination centre."""
    task = tasks.get_task("minari:test/pointmaze/umaze-v0")
    env = tasks.make_env(task)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        goal = tasks.env_goal(env)
        assert np.abs(goal - np.asarray(task.goal)).max() <= 0.25
        done = tasks.termination_fn(task, tuple(goal))
        route = [np.array(p) for p in ((1.0, 1.0), (1.0, -1.0), tuple(goal))]
        got, want = [], []
        for step in range(task.max_episode_steps):
            while len(route) > 1 and np.linalg.norm(route[0] - obs[:2]) < 0.3:
                route.pop(0)
            obs, r, terminated, truncated, info = env.step(mazes.pd_action(obs, route[0]))
            got.append(bool(done(None, None, obs.astype(np.float32))))
            want.append(bool(info["success"]))
            if terminated or truncated:
                break
        assert got == want and want[-1] and terminated and sum(want) == 1 and r == 1.0


def test_antmaze_observations_are_d4rls_xy_then_qpos_qvel(root):
    task = tasks.get_task("minari:test/antmaze/umaze-v0")
    assert (task.family, task.obs_dim, task.act_dim, task.max_episode_steps) == ("antmaze", 29, 8, 700)
    assert task.goal == (-4.0, -4.0)  # 'g' at row 3, column 1 of a 5 x 5 maze scaled by 4
    ds = tasks.load_dataset(task)
    ep = plain_episodes(root, "test/antmaze/umaze-v0")[0]
    n = len(ep["actions"])
    np.testing.assert_allclose(ds.observations[:n, :2], ep["observations"]["achieved_goal"][:-1].astype(np.float32))
    np.testing.assert_allclose(ds.observations[:n, 2:], ep["observations"]["observation"][:-1].astype(np.float32))
    env = tasks.make_env(task)
    obs, _ = env.reset(seed=0)
    u = env.unwrapped
    np.testing.assert_allclose(obs, np.concatenate([u.ant_env.data.qpos, u.ant_env.data.qvel]))  # D4RL's 29


def test_hopper_terminals_scaling_termination_and_scores(root):
    task = tasks.get_task("minari:test/hopper/medium-v0")
    assert (task.family, task.obs_dim, task.act_dim, task.max_episode_steps, task.is_maze) == ("hopper", 11, 3, 1000, False)
    ds = tasks.load_dataset(task)
    episodes = plain_episodes(root, "test/hopper/medium-v0")
    np.testing.assert_array_equal(ds.terminals, np.concatenate([e["terminations"] for e in episodes]))
    np.testing.assert_allclose(ds.rewards, np.concatenate([e["rewards"] for e in episodes]).astype(np.float32))
    returns = [e["rewards"].sum() for e in episodes]
    assert ds.reward_scale == pytest.approx(1000 / (max(returns) - min(returns)), rel=1e-5) and ds.reward_shift == 0
    done = tasks.termination_fn(task)
    ends = [bool(done(None, None, e["observations"][-1].astype(np.float32))) for e in episodes]
    assert ends == [bool(e["terminations"][-1]) for e in episodes] and any(ends)  # the env's own end
    inner = np.concatenate([e["observations"][1:-1] for e in episodes]).astype(np.float32)
    assert not np.asarray(done(None, None, inner)).any()
    assert tasks.normalized_score(task, 100.0, 0.0) == pytest.approx(100 * (100 + 20) / 3020)
    assert tasks.normalized_score(tasks.get_task("minari:test/hopper/norefs-v0"), 55.5, 0.0) == 55.5  # raw return


def test_missing_dataset_and_bad_flags_give_one_line(root, tmp_path):
    with pytest.raises(tasks.InputError) as e:
        tasks.get_task("minari:D4RL/antmaze/large-diverse-v1")
    assert "minari download D4RL/antmaze/large-diverse-v1" in one_line(e) and str(root) in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        tasks.load_dataset(tasks.get_task("minari:test/hopper/medium-v0"), data_dir=str(tmp_path))
    assert "MINARI_DATASETS_PATH" in one_line(e)
    p = subprocess.run([sys.executable, "world_model.py", "--env", "minari:D4RL/pointmaze/large-v2"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "MINARI_DATASETS_PATH": str(tmp_path)})
    assert p.returncode != 0 and p.stderr.strip().startswith("error: Minari dataset D4RL/pointmaze/large-v2 is not in")
    assert len(p.stderr.strip().splitlines()) == 1 and "minari download" in p.stderr


@pytest.mark.slow
def test_end_to_end_on_a_minari_pointmaze_dataset(root, tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root)}

    def run(*args):
        p = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return p
    common = ["--env", "minari:test/pointmaze/umaze-v0"]  # default artifact paths: runs/minari_test_...
    run(ROOT / "world_model.py", *common, "--hidden-dims", 16, 16, "--weight-decay", 2.5e-5, 5e-5, 1e-4,
        "--ensemble-size", 3, "--num-elites", 2, "--max-epochs", 2)
    assert (tmp_path / "runs" / "minari_test_pointmaze_umaze-v0__world_model__s0" / "world_model.npz").exists()
    run(ROOT / "pretrain.py", *common, "--hidden-dims", 32, 32, "--bc-steps", 20, "--fqe-steps", 20,
        "--chunk", 10, "--bc-batch-size", 64)
    run(ROOT / "leq.py", *common, "--total-steps", 40, "--chunk", 20, "--eval-every", 40, "--eval-episodes", 2,
        "--final-eval-rounds", 1, "--expand-every", 20, "--expand-size", 64, "--batch-size", 32,
        "--model-batch-size", 32, "--horizon", 3, "--run-dir", "leq")
    p = run(ROOT / "evaluate.py", "--checkpoint", "leq/leq.npz", "--episodes", 2)
    assert "termination centre [-1.0, -1.0]" in p.stdout
    assert (tmp_path / "leq" / "leq.trajectories.png").stat().st_size > 1000


def test_the_check_layer_covers_minari_tasks(root, tmp_path):
    """A bad input of the reliability issue under a Minari task: a dataset whose observations are
    all zero gets the same one-line refusal as the other sources (the check is in the shared layer)."""
    import shutil
    copy = tmp_path / "test" / "pointmaze" / "umaze-v0"
    shutil.copytree(root / "test" / "pointmaze" / "umaze-v0", copy)
    with h5py.File(copy / "data" / "main_data.hdf5", "a") as f:
        for episode in f.values():
            for k in episode["observations"]:
                episode["observations"][k][...] = 0.0
    os.environ["MINARI_DATASETS_PATH"] = str(tmp_path)  # the module's fixture puts it back afterwards
    try:
        task = tasks.get_task("minari:test/pointmaze/umaze-v0")
        with pytest.raises(tasks.InputError) as e:
            tasks.load_dataset(task)
    finally:
        os.environ["MINARI_DATASETS_PATH"] = str(root)
    assert one_line(e).startswith("dataset file ") and "every observation is the same ([0. 0. 0. 0.]): not a recording of" in one_line(e)
