"""The task layer: D4RL-format reading, termination functions, built-in mazes, bad input."""

import subprocess
import sys

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from leq_utils import artifacts
from leq_utils import mazes
from leq_utils import tasks
from conftest import ROOT, write_d4rl_file


# --------------------------------------------------------------------------------------------
# Reading D4RL files: compared with a plain loop written the way d4rl's qlearning_dataset is
# --------------------------------------------------------------------------------------------

def reference_qlearning(obs, act, rew, term, timeouts):
    """d4rl.qlearning_dataset, as a loop: pair i with i+1, skip timed-out last steps."""
    out = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    for i in range(len(rew) - 1):
        if timeouts[i]:
            continue
        out["observations"].append(obs[i])
        out["actions"].append(np.clip(act[i], -1 + 1e-5, 1 - 1e-5))
        out["rewards"].append(rew[i])
        out["next_observations"].append(obs[i + 1])
        out["terminals"].append(float(term[i]))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def test_reader_matches_qlearning_dataset(tmp_path):
    rng = np.random.default_rng(0)
    n = 57
    obs = rng.normal(size=(n, 3))
    act = rng.uniform(-1.5, 1.5, size=(n, 2))  # out of range: must be clipped
    rew = rng.normal(size=n)
    term = np.zeros(n, bool)
    term[[5, 30]] = True                       # terminals: kept, mask 0
    timeouts = np.zeros(n, bool)
    timeouts[[19, 44]] = True                  # timeouts: that step has no next obs, dropped
    path = write_d4rl_file(tmp_path / "d.hdf5", obs, act, rew, term, timeouts)
    got = tasks.qlearning_transitions(tasks.read_hdf5(path))
    want = reference_qlearning(obs.astype(np.float32), act.astype(np.float32), rew.astype(np.float32),
                               term, timeouts)
    assert len(got["rewards"]) == n - 1 - 2
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["actions"].max() == np.float32(1 - 1e-5) and got["actions"].min() == np.float32(-1 + 1e-5)
    assert got["terminals"].sum() == 2  # the two terminals survive, the timeouts are not terminals


def test_missing_timeouts_use_the_episode_limit(tmp_path):
    n = 30
    path = write_d4rl_file(tmp_path / "d.hdf5", np.arange(n)[:, None] * np.ones((1, 3)),
                           np.zeros((n, 2)), np.zeros(n), np.zeros(n))
    data = tasks.read_hdf5(path, max_episode_steps=10)
    np.testing.assert_array_equal(np.flatnonzero(data["timeouts"]), [9, 19, 29])
    assert len(tasks.qlearning_transitions(data)["rewards"]) == 27


def test_reward_transforms():
    maze = tasks.get_task("antmaze-umaze-v2")
    t = {"rewards": np.array([0.0, 1.0]), "terminals": np.array([0.0, 1.0]),
         "observations": np.zeros((2, 1)), "next_observations": np.zeros((2, 1))}
    assert tasks.reward_transform(maze, t) == (1.0, -1.0)
    assert tasks.reward_transform(tasks.get_task("pointmaze-large"), t) == (1.0, -1.0)
    # locomotion: 1000 / (max - min) episode return; episodes split at terminals and at breaks
    obs = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    nxt = np.array([[1.0], [2.0], [3.0], [11.0], [12.0], [13.0]])  # row 2 -> 3 is a break
    t = {"observations": obs, "next_observations": nxt, "rewards": np.array([1.0, 2, 3, 4, 5, 6]),
         "terminals": np.array([0.0, 0, 0, 0, 1, 0])}
    returns = [1 + 2 + 3, 4 + 5, 6]
    scale, shift = tasks.reward_transform(tasks.get_task("hopper-medium-v2"), t)
    assert scale == pytest.approx(1000 / (max(returns) - min(returns))) and shift == 0.0
    assert tasks.reward_transform(tasks.get_task("hopper-random-v2"), t) == (1.0, 0.0)


# --------------------------------------------------------------------------------------------
# Termination functions on hand-made states
# --------------------------------------------------------------------------------------------

def done_of(name, next_states, **kw):
    task = tasks.get_task(name)
    s2 = jnp.asarray(next_states, jnp.float32)
    return np.asarray(tasks.termination_fn(task, **kw)(s2, jnp.zeros((len(s2), task.act_dim)), s2)).tolist()


@pytest.mark.parametrize("maze,centre", [("umaze", (0.75, 8.75)), ("medium", (20.75, 20.75)),
                                         ("large", (32.75, 24.75)), ("ultra", (52.75, 36.75))])
def test_antmaze_termination(maze, centre):
    name = f"antmaze-{maze}-v2" if maze == "umaze" else (
        f"antmaze-{maze}-diverse-v2" if maze != "ultra" else "antmaze-ultra-diverse-v0")
    cx, cy = centre
    states = np.zeros((4, 29))
    states[:, :2] = [(cx, cy), (cx + 0.24, cy), (cx, cy - 0.26), (0.0, 0.0)]
    assert done_of(name, states) == [True, True, False, False]
    # the centre is a flag: a moved centre moves the region
    assert done_of(name, states, goal=(0.0, 0.0)) == [False, False, False, True]


def test_pointmaze_termination_matches_the_env_goal():
    for maze in ("umaze", "medium", "large", "ultra"):
        task = tasks.get_task(f"pointmaze-{maze}")
        env = tasks.make_env(task)
        env.reset(seed=0)
        gx, gy = tasks.env_goal(env)
        assert (gx, gy) == pytest.approx(task.goal)
        s = [[gx, gy, 0, 0], [gx + 0.49, gy, 1, 1], [gx, gy + 0.51, 0, 0]]
        assert done_of(task.name, s) == [True, True, False]


def test_hopper_termination():
    ok = np.zeros(11)
    ok[0] = 1.25
    cases = {"alive": (ok, False)}
    for name, idx, value in [("low", 0, 0.7), ("tilted", 1, 0.2), ("tilted_neg", 1, -0.21),
                             ("big", 5, 100.0), ("big_neg", 7, -100.0), ("nan", 3, np.nan),
                             ("inf", 4, np.inf)]:
        s = ok.copy()
        s[idx] = value
        cases[name] = (s, True)
    big_height = ok.copy()
    big_height[0] = 150.0  # s[0] is not bound by the |s[1:]| < 100 rule, only by height > 0.7
    cases["tall"] = (big_height, False)
    got = done_of("hopper-medium-v2", [c[0] for c in cases.values()])
    assert dict(zip(cases, got)) == {k: v[1] for k, v in cases.items()}


def test_walker2d_termination():
    ok = np.zeros(17)
    ok[0] = 1.2
    states, want = [ok], [False]
    for idx, value in [(0, 0.8), (0, 2.0), (1, 1.0), (1, -1.0), (9, 100.0), (9, -100.0)]:
        s = ok.copy()
        s[idx] = value
        states.append(s)
        want.append(True)
    s = ok.copy()
    s[1] = 0.99
    states.append(s)
    want.append(False)
    assert done_of("walker2d-medium-v2", states) == want


def test_halfcheetah_termination():
    s = np.zeros((4, 17))
    s[1, 3] = 100.0
    s[2, 16] = -100.0
    s[3, 0] = 99.9
    assert done_of("halfcheetah-medium-v2", s) == [False, True, True, False]


# --------------------------------------------------------------------------------------------
# Built-in tasks
# --------------------------------------------------------------------------------------------

def test_generator_schema_and_determinism(tmp_path, tiny_maze_file):
    task = tasks.get_task("pointmaze-umaze")
    again = tmp_path / "again.hdf5"
    other = tmp_path / "other.hdf5"
    mazes.generate_pointmaze(task, again, size=6000, seed=3, episode_len=1000)
    mazes.generate_pointmaze(task, other, size=6000, seed=4, episode_len=1000)
    with h5py.File(tiny_maze_file) as f, h5py.File(again) as g, h5py.File(other) as h:
        assert set(f.keys()) == {"observations", "actions", "rewards", "terminals", "timeouts", "infos"}
        assert f["observations"].shape == (6000, 4) and f["observations"].dtype == np.float32
        assert f["actions"].shape == (6000, 2) and f["actions"].dtype == np.float32
        assert f["rewards"].shape == (6000,) and f["terminals"].dtype == bool
        assert np.flatnonzero(f["timeouts"][()]).tolist() == [999, 1999, 2999, 3999, 4999, 5999]
        assert np.abs(f["actions"][()]).max() <= 1.0
        # rewards/terminals are relabelled for the evaluation goal from the NEXT position
        xy_next = f["observations"][1:, :2]
        near = np.linalg.norm(xy_next - np.asarray(task.goal), axis=1) < mazes.GOAL_RADIUS
        keep = ~f["timeouts"][:-1]
        np.testing.assert_array_equal(f["rewards"][:-1][keep], near[keep])
        np.testing.assert_array_equal(f["terminals"][:-1], f["rewards"][:-1] > 0)
        assert f["rewards"][()].sum() > 0  # the data does visit the goal
        for k in ("observations", "actions", "rewards"):
            np.testing.assert_array_equal(f[k][()], g[k][()])  # same seed: same bytes
        assert not np.array_equal(f["observations"][()], h["observations"][()])
    # and it loads through the same reader as D4RL files
    ds = tasks.load_dataset(task, str(tiny_maze_file))
    assert ds.observations.shape == (6000 - 6, 4) and (ds.reward_scale, ds.reward_shift) == (1.0, -1.0)


def test_generator_excursions_push_into_walls(tmp_path):
    """The excursions put the point against walls: count, with a plain loop over the transitions,
    those that end within 0.13 of a wall square while a strong action barely moves the point."""
    task = tasks.get_task("pointmaze-umaze")
    layout = mazes.MAZES[task.maze]
    walls = [mazes.cell_xy(layout, c) for c in mazes.maze_cells(layout, "#")]

    def pushes(path):
        with h5py.File(path) as f:
            obs, act = f["observations"][()], f["actions"][()]
        count = 0
        for t in range(len(obs) - 1):
            if t % 1000 == 999:  # the last step of an episode has no next observation
                continue
            xy, xy_next = obs[t, :2], obs[t + 1, :2]
            gap = min(np.linalg.norm(np.maximum(np.abs(xy_next - w) - 0.5, 0.0)) for w in walls)
            count += gap < 0.13 and np.linalg.norm(act[t]) > 0.5 and np.linalg.norm(xy_next - xy) < 0.02
        return count

    for excursion in (0.0, mazes.DATA_EXCURSION):
        mazes.generate_pointmaze(task, tmp_path / f"{excursion}.hdf5", size=6000, seed=3, excursion=excursion)
    without, with_ = pushes(tmp_path / "0.0.hdf5"), pushes(tmp_path / f"{mazes.DATA_EXCURSION}.hdf5")
    assert with_ > 3 * without and with_ > 300, (without, with_)  # measured: 124 and 516


def test_generator_dashes_hit_walls_fast(tmp_path):
    """Dashes (`dash`: an excursion at full throttle) make the point hit walls at top speed: count,
    with a plain loop, the transitions moving faster than 4.5 along an axis that cover less than
    half the distance their speed implies (an impact)."""
    task = tasks.get_task("pointmaze-large")

    def impacts(path):
        with h5py.File(path) as f:
            obs = f["observations"][()]
        count = 0
        for t in range(len(obs) - 1):
            if t % 1000 == 999:
                continue
            for axis in (0, 1):
                speed, moved = obs[t, 2 + axis], obs[t + 1, axis] - obs[t, axis]
                count += abs(speed) > 4.5 and moved * np.sign(speed) < 0.5 * abs(speed) * 0.01
        return count

    for dash in (0.0, 1.0):
        mazes.generate_pointmaze(task, tmp_path / f"{dash}.hdf5", size=6000, seed=3, dash=dash)
    without, with_ = impacts(tmp_path / "0.0.hdf5"), impacts(tmp_path / "1.0.hdf5")
    assert with_ > 3 * without and with_ >= 10, (without, with_)  # measured: 1 and 14


def test_builtin_env_reward_and_termination_at_the_goal():
    task = tasks.get_task("pointmaze-medium")
    env = tasks.make_env(task)
    obs, _ = env.reset(seed=1)
    start = mazes.cell_xy(mazes.MAZES["medium"], mazes.maze_cells(mazes.MAZES["medium"], "R")[0])
    assert obs.shape == (4,) and np.abs(obs[:2] - start).max() <= 0.25 + 1e-9
    obs, r, terminated, truncated, info = env.step(np.zeros(2))
    assert (r, terminated, info["success"]) == (0.0, False, False)
    # put the point next to the goal, moving into it
    inner = env.unwrapped
    goal = np.asarray(task.goal)
    inner.point_env.set_state(np.array([goal[0] - 0.55, goal[1]]), np.array([3.0, 0.0]))
    for _ in range(5):
        obs, r, terminated, truncated, info = env.step(np.array([1.0, 0.0]))
        if terminated:
            break
    assert (r, terminated, info["success"]) == (1.0, True, True)
    assert np.linalg.norm(obs[:2] - goal) < 0.5


def test_waypoint_controller_reaches_the_goal():
    for maze in ("umaze", "medium"):
        rate, steps = mazes.controller_success(tasks.get_task(f"pointmaze-{maze}"), episodes=3)
        assert rate == 1.0 and steps < mazes.POINTMAZE_LIMITS[maze] / 2


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the problem
# --------------------------------------------------------------------------------------------

def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unknown_env():
    with pytest.raises(tasks.InputError) as e:
        tasks.get_task("antmaze-giant-v9")
    assert "unknown env 'antmaze-giant-v9'" in one_line(e) and "pointmaze-" in one_line(e)
    with pytest.raises(tasks.InputError):
        tasks.get_task("ant-medium-v2")  # 'ant' is not 'antmaze'


def test_missing_file(tmp_path):
    with pytest.raises(tasks.InputError) as e:
        tasks.read_hdf5(tmp_path / "nope.hdf5")
    assert "does not exist" in one_line(e) and "nope.hdf5" in one_line(e)


def test_corrupt_file(tmp_path, tiny_maze_file):
    path = tmp_path / "cut.hdf5"
    path.write_bytes(tiny_maze_file.read_bytes()[:5000])  # a truncated download
    with pytest.raises(tasks.InputError) as e:
        tasks.read_hdf5(path)
    assert "not a readable HDF5 file" in one_line(e)
    path.write_text("hello")
    with pytest.raises(tasks.InputError):
        tasks.read_hdf5(path)


def test_missing_key(tmp_path):
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.zeros((5, 3)))
        f.create_dataset("actions", data=np.zeros((5, 1)))
        f.create_dataset("terminals", data=np.zeros(5))
    with pytest.raises(tasks.InputError) as e:
        tasks.read_hdf5(path)
    assert "['rewards']" in one_line(e)


def test_nan_in_observations(tmp_path):
    obs = np.zeros((10, 3))
    obs[7, 1] = np.nan
    path = write_d4rl_file(tmp_path / "d.hdf5", obs, np.zeros((10, 1)), np.zeros(10), np.zeros(10))
    with pytest.raises(tasks.InputError) as e:
        tasks.read_hdf5(path)
    assert "'observations' has NaN/inf in 1 rows (first at row 7)" in one_line(e)


def test_wrong_shapes_and_dims(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", np.zeros((10, 3)), np.zeros((10, 1)), np.zeros(9),
                           np.zeros(10))
    with pytest.raises(tasks.InputError) as e:
        tasks.read_hdf5(path)
    assert "'rewards' has shape (9,)" in one_line(e)
    path = write_d4rl_file(tmp_path / "e.hdf5", np.zeros((10, 3)), np.zeros((10, 1)), np.zeros(10),
                           np.zeros(10))
    with pytest.raises(tasks.InputError) as e:
        tasks.load_dataset(tasks.get_task("pointmaze-umaze"), str(path))
    assert "dims (3, 1)" in one_line(e)


def test_cli_prints_one_line_errors():
    p = subprocess.run([sys.executable, "scripts/generate_dataset.py", "--env", "hopper-gigantic-v2"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert p.stderr.strip().startswith("error: unknown env") and len(p.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

def test_artifact_round_trip_and_mismatch(tmp_path):
    task = tasks.get_task("pointmaze-umaze")
    tree = {"Dense_0": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.ones(3)}}
    path = tmp_path / "a.npz"
    artifacts.save_npz(path, artifacts.flatten(tree, "actor"), "pretrain", task, {"lr": 0.1})
    np.load(path, allow_pickle=False)  # no pickle anywhere
    f = artifacts.load_artifact(path, task, kinds=("pretrain",))
    back = artifacts.unflatten(f, "actor")
    np.testing.assert_array_equal(back["Dense_0"]["kernel"], tree["Dense_0"]["kernel"])
    assert f["meta/config"] == {"lr": 0.1} and list(path.parent.iterdir()) == [path]
    for bad, message in [(tasks.get_task("pointmaze-large"), "made for env 'pointmaze-umaze'")]:
        with pytest.raises(tasks.InputError) as e:
            artifacts.load_artifact(path, bad)
        assert message in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        artifacts.load_artifact(path, task, kinds=("world_model",))
    assert "is a 'pretrain' artifact" in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        artifacts.load_artifact(path, task, need="critic")
    assert "has no critic parameters" in one_line(e)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(tasks.InputError) as e:
        artifacts.load_artifact(cut, task)
    assert "not a readable .npz" in one_line(e)
