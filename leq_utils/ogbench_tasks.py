"""OGBench single-task mazes (the `ogbench` package): dataset files, the success rule, the
evaluation env, and a local `navigate` dataset generator for PointMaze.

OGBench (pip `ogbench`, MuJoCo 3, gymnasium API) names a single-task offline problem
`{agent}-{maze}-{type}-singletask[-task{1..5}]-v0`, e.g. `pointmaze-giant-navigate-singletask-v0`
(no task number = task 1). tasks.py calls this module only for such names:
  * the static facts (dims, goal, tolerance, episode limit)      -> describe
  * where the .npz file is, in ogbench's own layout                 -> dataset_file
  * the file as this project's transitions (docs/TASKS.md)        -> transitions
  * the evaluation env (ogbench's, seeded resets)                    -> make_env
  * walls, start and goal for trajectory pictures                    -> maze_geometry
  * a `navigate`-style PointMaze dataset made here, no download      -> generate, controller_success

Conventions (docs/TASKS.md): ogbench's relabelling gives every dataset row the
success of its CURRENT state s_t (reward success - 1, mask 1 - success); this project, as for
D4RL, flags the transition INTO the goal: terminal = success(s_{t+1}), reward = terminal - 1 (raw,
kept as it is: the reward transform is the identity), and imagination terminates with the same
rule on s'. Success is ogbench's own `compute_success`: ||xy - goal|| <= tolerance (1.0 for the
point, 0.5 for ant and humanoid), with xy = observation[:2] for every agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from leq_utils import mazes
from leq_utils import common

# agent -> (obs_dim, act_dim, goal tolerance of ogbench's MazeEnv)
AGENTS = {"pointmaze": (2, 2, 1.0), "antmaze": (29, 8, 0.5), "humanoidmaze": (69, 21, 0.5)}
# ogbench's five tasks per maze as (start cell, goal cell) (row i, column j); cell (i, j) has
# its centre at (4 j - 4, 4 i - 4). tests/test_ogbench.py checks them against the env.
TASK_CELLS = {
    "medium": [((1, 1), (6, 6)), ((6, 1), (1, 6)), ((5, 3), (4, 2)), ((6, 5), (6, 1)), ((2, 6), (1, 1))],
    "large": [((1, 1), (7, 10)), ((5, 4), (7, 1)), ((7, 4), (1, 10)), ((3, 8), (5, 4)), ((1, 1), (5, 4))],
    "giant": [((1, 1), (10, 14)), ((1, 14), (10, 1)), ((8, 14), (1, 1)), ((8, 3), (5, 12)), ((5, 9), (3, 8))],
}
OFFICIAL_DIR = Path("~/.ogbench/data").expanduser()  # where ogbench.download_datasets puts files
GENERATED_DIR = mazes.DATA_DIR / "ogbench"            # where `python scripts/generate_dataset.py --env ...` writes
NAVIGATE_NOISE = 0.5      # ogbench's action noise for its pointmaze data
GENERATOR_VERSION = 2     # v2: in the goal's cell, aim at its centre as ogbench does (v1 aimed at the goal)


def cell_xy(ij) -> tuple:
    return (4.0 * ij[1] - 4.0, 4.0 * ij[0] - 4.0)


def describe(name: str) -> common.Task:
    agent, maze = name.split("-")[:2]
    task_id = int(name.split("-task")[1].split("-")[0]) if "-task" in name else 1
    obs_dim, act_dim, tol = AGENTS[agent]
    limit = 1000 if agent != "humanoidmaze" else (4000 if maze == "giant" else 2000)
    return common.Task(name, agent, obs_dim, act_dim, limit, maze, cell_xy(TASK_CELLS[maze][task_id - 1][1]),
                      tol, source="ogbench", goal_inclusive=True)


def env_id(task: common.Task) -> str:
    """The env of a dataset name: drop the dataset type (`pointmaze-giant-singletask-v0`)."""
    parts = task.name.split("-")
    return "-".join(parts[:2] + parts[3:])


def dataset_name(task: common.Task) -> str:
    """The file ogbench stores the data in: no `singletask`, no task number (`pointmaze-giant-navigate-v0`)."""
    return "-".join(p for p in task.name.split("-") if p != "singletask" and not p.startswith("task"))


def generated_file(task: common.Task, folder=None, size=None, seed=0) -> Path:
    size = size or 1_000_000
    return Path(folder or GENERATED_DIR) / f"{dataset_name(task)}_{size // 1000}k_seed{seed}_v{GENERATOR_VERSION}.npz"


def dataset_file(task: common.Task, dataset_path=None, data_dir=None) -> Path:
    """--dataset-path, else ogbench's file in --data-dir (default ~/.ogbench/data), else (PointMaze)
    the default generated file in --data-dir (default data/ogbench)."""
    if dataset_path:
        common.check_input_file(dataset_path, "dataset file")
        return Path(dataset_path)
    official = Path(data_dir or OFFICIAL_DIR) / f"{dataset_name(task)}.npz"
    generated = generated_file(task, data_dir)
    for path in (official, generated) if task.family == "pointmaze" else (official,):
        if path.exists():
            print(f"[tasks] {task.name}: dataset {path}")
            return path
    how = (f"; or generate one here with `python scripts/generate_dataset.py --env {task.name}"
           f"{' --data-dir ' + str(data_dir) if data_dir else ''}`" if task.family == "pointmaze" else "")
    raise common.InputError(
        f"no dataset for {task.name}: put ogbench's {official.name} (and {official.stem}-val.npz) in "
        f"{official.parent} (on a machine with internet: python -c \"import ogbench; "
        f"ogbench.download_datasets(['{dataset_name(task)}'], '{official.parent}')\"), or pass "
        f"--dataset-path FILE.npz{how}")


def transitions(task: common.Task, path: Path) -> dict:
    """The file through ogbench's own loader (its pairing of s_t with s_{t+1} inside each
    trajectory), then this project's flags: terminal = success(s_{t+1}), reward = terminal - 1."""
    from ogbench.utils import load_dataset
    try:
        d = load_dataset(str(path), ob_dtype=np.float32, action_dtype=np.float32)
    except Exception as e:  # a truncated file, a missing key, not an .npz
        raise common.InputError(f"dataset file {path} is not a readable OGBench .npz ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for k in ("observations", "actions", "next_observations"):
        if d[k].ndim != 2 or not np.isfinite(d[k]).all() or len(d[k]) < 1:
            raise common.InputError(f"dataset file {path}: '{k}' is empty, not 2-d or not finite")
    # ogbench's relabelling flags success(s_t); here success(s_{t+1}), as this project's other
    # mazes and its imagination (choice, docs/DEVIATIONS.md: OGBench and Minari)
    done = np.asarray(common.termination_fn(task)(d["observations"], d["actions"], d["next_observations"]))
    terminals = done.astype(np.float32)
    return dict(observations=d["observations"],
                actions=np.clip(d["actions"], -1 + 1e-5, 1 - 1e-5).astype(np.float32),
                rewards=terminals - 1.0, next_observations=d["next_observations"], terminals=terminals)


# ============================================================================================
# The evaluation environment
# ============================================================================================

@contextlib.contextmanager
def numpy_seed(seed: int):
    """ogbench's maze draws its start and goal noise from numpy's global generator: seed it for
    the duration and restore it after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def make_env(task: common.Task, render_mode: Optional[str] = None):
    """ogbench's single-task env (its goal, tolerance, 'pre' success timing, episode end at the
    goal), whose reset(seed=s) is repeatable."""
    import gymnasium
    import ogbench  # noqa: F401  (registers the envs)

    class SeededReset(gymnasium.Wrapper):
        def reset(self, *, seed=None, options=None):
            if seed is None:
                return self.env.reset(options=options)
            self.env.action_space.seed(seed)
            with numpy_seed(seed):
                return self.env.reset(seed=seed, options=options)

    kwargs = dict(render_mode=render_mode, width=400, height=400) if render_mode else {}
    return SeededReset(gymnasium.make(env_id(task), **kwargs))


def maze_geometry(task: common.Task):
    """(wall cell centres (n, 2), start xy, goal xy, cell size) in the env's coordinates."""
    env = make_env(task)
    walls = [cell_xy(ij) for ij in zip(*np.nonzero(env.unwrapped.maze_map == 1))]
    task_id = int(task.name.split("-task")[1].split("-")[0]) if "-task" in task.name else 1
    env.close()
    return np.array(walls), np.array(cell_xy(TASK_CELLS[task.maze][task_id - 1][0])), np.asarray(task.goal), 4.0


# ============================================================================================
# The oracle controller and the navigate dataset generator (PointMaze)
# ============================================================================================

def oracle_action(env, cache: dict, aim_at_goal: bool = False) -> np.ndarray:
    """Unit step towards the env's oracle subgoal (`get_oracle_subgoal`: the centre of the next
    cell on a shortest path to the goal; in the goal's own cell, that cell's centre). This is
    ogbench's data rule, and it makes the point HOVER: a goal is its cell centre plus uniform
    +-1 noise per axis and success needs ||xy - goal|| <= 1.0, so for a fraction 1 - pi/4 = 21.5%
    of goals the centre the controller settles on is not a success, and the point jitters there
    until its action noise carries it within 1.0 of the goal (docs/TASKS.md, generator v2).
    `aim_at_goal=True` aims at the goal itself once in its cell (the evaluation reference,
    `controller_success`; generator v1 used this for its data). Subgoals depend only on the two
    cells, so they are cached per (cell, goal cell)."""
    xy, goal = env.get_xy(), np.asarray(env.cur_goal_xy)
    key = (env.xy_to_ij(xy), env.xy_to_ij(goal))
    if key[0] == key[1] and aim_at_goal:
        target = goal
    else:
        if key not in cache:
            cache[key] = np.asarray(env.get_oracle_subgoal(xy, goal)[0], float)
        target = cache[key]
    d = target - xy
    return d / (np.linalg.norm(d) + 1e-6)


def vertex_cells(maze_map) -> list:
    """Free cells that are not the middle of a straight corridor (ogbench's navigate goals)."""
    out = []
    for i, j in zip(*np.nonzero(maze_map == 0)):
        up, down, left, right = (maze_map[i - 1, j] == 0, maze_map[i + 1, j] == 0,
                                 maze_map[i, j - 1] == 0, maze_map[i, j + 1] == 0)
        if not ((up and down and not left and not right) or (left and right and not up and not down)):
            out.append((int(i), int(j)))
    return out


def generate(task: common.Task, path: Path, size=None, seed=0, noise=NAVIGATE_NOISE, episode_len=None) -> float:
    """A `navigate` dataset the way ogbench describes its own: each trajectory starts in a random
    free cell (+-1 uniform noise) and drives to random goal cells (corners, junctions and dead
    ends, goal +-1 noise) one after another, a new one on each success, with the oracle
    controller plus N(0, noise^2) action noise clipped to [-1, 1]. `size` transitions in
    trajectories of `episode_len` steps (default 1000, giant 2000), plus a tenth as many
    trajectories in the -val file. Written in ogbench's layout (observations, actions,
    terminals = trajectory end, qpos, qvel; one extra row per trajectory holding its last
    observation), deterministic for a seed, atomically. Returns the seconds it took."""
    import gymnasium
    import ogbench  # noqa: F401
    from tqdm import tqdm
    if task.family != "pointmaze":
        raise common.InputError(f"only OGBench pointmaze datasets can be generated here, not {task.name}")
    size, episode_len = size or 1_000_000, episode_len or (2000 if task.maze == "giant" else 1000)
    episodes = max(1, size // episode_len)
    env = gymnasium.make(f"pointmaze-{task.maze}-v0", terminate_at_goal=False).unwrapped  # goal-conditioned, 'post'
    free = [(int(i), int(j)) for i, j in zip(*np.nonzero(env.maze_map == 0))]
    goals, rng, cache = vertex_cells(env.maze_map), np.random.default_rng(seed), {}
    start_time = time.time()
    with numpy_seed(seed), tqdm(total=(episodes + max(1, episodes // 10)) * episode_len, unit="step",
                                desc=f"generate {dataset_name(task)}", mininterval=1) as bar:
        for split, n in (("", episodes), ("-val", max(1, episodes // 10))):
            rows = n * (episode_len + 1)
            out = dict(observations=np.zeros((rows, 2), np.float32), actions=np.zeros((rows, 2), np.float32),
                       terminals=np.zeros(rows, bool), qpos=np.zeros((rows, 2), np.float32),
                       qvel=np.zeros((rows, 2), np.float32))
            t = 0
            for _ in range(n):
                init, goal = free[rng.integers(len(free))], goals[rng.integers(len(goals))]
                ob, _ = env.reset(seed=int(rng.integers(2**31)), options=dict(task_info=dict(init_ij=init, goal_ij=goal)))
                for step in range(episode_len + 1):
                    action = np.clip(oracle_action(env, cache) + noise * rng.normal(size=2), -1.0, 1.0)
                    out["observations"][t], out["actions"][t] = ob, action
                    out["qpos"][t], out["qvel"][t] = env.data.qpos, env.data.qvel
                    out["terminals"][t], t = step == episode_len, t + 1
                    if step == episode_len:  # the last row only holds the final observation
                        break
                    ob, _, _, _, info = env.step(action)
                    if info["success"]:
                        env.set_goal(goal_ij=goals[rng.integers(len(goals))])
                bar.update(episode_len)
            out["generator"] = np.array(json.dumps(dict(
                env=task.name, size=size, seed=seed, noise=noise, episode_len=episode_len, split=split or "train",
                generator=f"ogbench_tasks.generate v{GENERATOR_VERSION}")))
            target = path if not split else path.with_name(path.name.replace(".npz", "-val.npz"))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **out)
            os.replace(tmp, target)
    env.close()
    return time.time() - start_time


def navigate_statistics(task: common.Task, path: Path, hover_rows=50, hover_radius=0.5) -> dict:
    """What tells ogbench's navigate data from a controller that never pauses (issue 38, docs/TASKS.md):
    trajectories with a hover (>= `hover_rows` consecutive rows within `hover_radius` of one cell
    centre), the fraction of rows in such hovers, the fraction of rows within 0.25 of a cell
    centre, and the number of states within 1.0 of the task's goal. `path` is an .npz in
    ogbench's layout (a generated one or ogbench's own)."""
    with np.load(path) as f:
        xy, ends = f["observations"][:, :2].astype(np.float64), f["terminals"].astype(bool)
    ji = np.rint((xy + 4.0) / 4.0)                  # (column j, row i): the nearest centre is (4 j - 4, 4 i - 4)
    dist = np.linalg.norm(xy - (4.0 * ji - 4.0), axis=1)
    near = dist <= hover_radius
    starts = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])
    hovers, hover_total = [], 0
    for a, b in zip(starts, np.flatnonzero(ends) + 1):          # one trajectory: rows a..b-1
        run, best, in_hover = 0, 0, 0
        for t in range(a, b):                                   # consecutive rows near ONE centre
            same = t > a and near[t - 1] and (ji[t] == ji[t - 1]).all()
            run = (run + 1 if same else 1) if near[t] else 0
            if run == hover_rows:
                in_hover += hover_rows
            elif run > hover_rows:
                in_hover += 1
            best = max(best, run)
        hovers.append(best)
        hover_total += in_hover
    hovers = np.array(hovers)
    return dict(trajectories=len(hovers), rows=len(xy),
                trajectories_with_hover=int((hovers >= hover_rows).sum()),
                trajectories_with_hover_200=int((hovers >= 200).sum()), longest_hover=int(hovers.max()),
                hover_row_fraction=hover_total / len(xy), centre_025_fraction=float((dist <= 0.25).mean()),
                states_near_goal=int((np.linalg.norm(xy - np.asarray(task.goal), axis=1) <= 1.0).sum()))


def controller_success(task: common.Task, episodes=50, noise=0.0, seed=0):
    """The oracle controller in the evaluation env (the task's 'expert' reference): (success
    rate, mean steps of the successful episodes)."""
    env, rng, cache = make_env(task), np.random.default_rng(seed), {}
    wins, lengths = 0, []
    for i in range(episodes):
        env.reset(seed=seed + i)
        for step in range(task.max_episode_steps):
            action = np.clip(oracle_action(env.unwrapped, cache, aim_at_goal=True) + noise * rng.normal(size=2), -1, 1)
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        wins += bool(info["success"])
        lengths += [step + 1] if info["success"] else []
    return wins / episodes, float(np.mean(lengths)) if lengths else float("nan")
