"""How far along the maze do a policy's episodes get, where do the failures stop, and what does
the critic say next to the goal?

    python scripts/route_check.py --checkpoint runs/ant-large-diverse__leq__s0/leq.npz

Built-in mazes only (PointMaze and ant). Runs the checkpoint's deterministic actor for
`--episodes` episodes in the real env, reset seeds seed, seed + 1, ... (by default 100 from the
seed of the run that wrote the checkpoint: the episodes of its final evaluation,
`evaluate.paper_protocol`), and prints

  * for every cell on a shortest route of the grid (the start cell 'R' to the goal cell 'G',
    every cell on ANY shortest route, in order of their distance from the start): in how many
    episodes the point (the ant's torso) entered it, and the step of its first entry (median,
    min, max). A policy that finds the route but is slow, or stops, at a corner shows up as a
    jump in the median step, or a drop in the count, at that corner;
  * the cells where the failed episodes ended, with how many end there, their grid distance to
    the goal in cells, and whether they lie on a shortest route (a dead end does not);
  * how close each failed episode came to the goal (the closest point of its path, the state
    after its last step included): how many came within two and within four goal radii, and the
    median. A failure that came within a radius or two of the goal and walked on is a near miss,
    not a wrong turn;
  * when the checkpoint has a critic (pretrain.npz, leq.npz): what it says next to the goal. For
    the episodes that came within two radii of it, successes and failures apart: the critic's
    Q(s, pi(s)) at the path's state closest to the goal, against that state's Monte-Carlo value
    (the discounted return the episode got from there under the training rewards, -1 per step
    and 0 on the step into the goal), and the path's highest Q and how far from the goal it was.

On the built-in ant mazes it also counts the ants that turned over (the torso's up axis pointing
down, `ant.upside_down`, at some acted state): per group (successes, failures) how many, how many
lie on their backs at their last step (an ant on its back rarely gets up again: it cannot reach
the goal any more), the median step of the first turn-over and the cells where it happened; and,
for a checkpoint with a critic, Q(s, pi(s)) from 30 steps before the first turn-over to 10 after
it. With `--world-model` (the run's world_model.npz) it asks whether the model foresees those
turn-overs: from each failure's real state k steps before its first turn-over (k = `--before`),
  * each elite's mean prediction (no sampling noise) under the episode's own next k actions
    (open loop): the share of elites whose ant is on its back after k steps, as the real one is;
  * LEQ's imagination (`leq.imagine`: the actor acting on the model's states, a random elite and
    its sampling noise per step) for k steps, `--rollouts` per start: the share on their backs
    at step k among those not ended (done) on the way;
how many transitions of the model's training data turn an ant over (upright at s, on its back at
s'), and whether the elites' mean paths foresee those k steps ahead under the data's actions. A
model that sees turn-overs coming only a step or two ahead gives an actor trained on its H-step
imagination no reason to avoid the gait that leads to them.

It writes the same as JSON (default <checkpoint>.route.json). docs/RESULTS.md uses it on the
ant-umaze-diverse and ant-large-diverse runs.
"""

import collections
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from leq_utils import ant, artifacts, cli, mazes, tasks  # noqa: E402
import evaluate  # noqa: E402
import leq  # noqa: E402
import pretrain  # noqa: E402
import world_model  # noqa: E402


@dataclasses.dataclass
class Args:
    checkpoint: str
    """artifact with an actor (pretrain.npz, leq.npz, a leq checkpoint) of a built-in maze task"""
    episodes: int = 100
    """deterministic episodes (100: as many as the final evaluation)"""
    seed: Optional[int] = None
    """episode i is reset with seed + i (default: the seed of the run that wrote the checkpoint,
    which its final evaluation used)"""
    parallel: int = 10
    """environments stepped in lockstep"""
    out: Optional[str] = None
    """JSON output (default: <checkpoint>.route.json)"""
    world_model: Optional[str] = None
    """built-in ant mazes: the run's world_model.npz, to ask whether it foresees the failures'
    turn-overs (none: not asked)"""
    before: tuple[int, ...] = (1, 3, 10)
    """with --world-model: the model is started this many steps before each first turn-over
    (LEQ imagines H = 10 steps)"""
    rollouts: int = 8
    """with --world-model: LEQ imaginations per start"""


def route_cells(layout) -> list:
    """The cells on any shortest grid route from 'R' to 'G' (a cell is on one exactly when its
    distance from the start plus its distance to the goal is the route's length), ordered by
    their distance from the start, then by (row, column)."""
    start, goal = mazes.maze_cells(layout, "R")[0], mazes.maze_cells(layout, "G")[0]
    from_start, to_goal = mazes.bfs_distances(layout, start), mazes.bfs_distances(layout, goal)
    length = to_goal[start]
    cells = [c for c in mazes.maze_cells(layout, ".RG") if from_start[c] + to_goal[c] == length]
    return sorted(cells, key=lambda c: (from_start[c], c))


def trajectory_cells(task: tasks.Task, xy) -> list:
    """The maze cell (row, column) of every point of an xy trajectory (n, 2)."""
    i, j = tasks.maze_cells_of(task, np.asarray(xy, float))
    return list(zip(i.tolist(), j.tolist()))


def route_progress(task: tasks.Task, episodes: list) -> dict:
    """From episodes recorded by evaluate.run_episodes(..., record=True): per route cell the
    number of episodes that entered it and the steps of their first entries (step t: the
    position after t actions; step 0 is the reset state); the end cells of the failures and
    their closest approach to the goal (Euclidean, in the env's xy units; how many within two
    and within four radii, and every distance, sorted)."""
    if not episodes:
        raise ValueError("route_progress needs at least one episode")
    layout = mazes.MAZES[task.maze]
    route = route_cells(layout)
    from_start = mazes.bfs_distances(layout, route[0])
    to_goal = mazes.bfs_distances(layout, route[-1])
    first = {c: [] for c in route}
    ends = collections.Counter()
    closest = []
    for e in episodes:
        cells = trajectory_cells(task, e["xy"])
        seen = {}
        for t, c in enumerate(cells):
            seen.setdefault(c, t)
        for c in route:
            if c in seen:
                first[c].append(seen[c])
        if not e["success"]:
            ends[cells[-1]] += 1
            closest.append(float(np.linalg.norm(np.asarray(e["xy"], float) - np.asarray(task.goal), axis=1).min()))

    def steps(v):
        return dict(median=float(np.median(v)), min=int(min(v)), max=int(max(v))) if v else None

    def reachable(c):  # a free cell of the maze: the point's centre never leaves them in the real env
        return 0 <= c[0] < len(layout) and 0 <= c[1] < len(layout[0]) and bool(np.isfinite(to_goal[c]))

    return {
        "env": task.name, "episodes": len(episodes), "successes": int(sum(e["success"] for e in episodes)),
        "mean_length": float(np.mean([e["length"] for e in episodes])),
        "route": [dict(cell=list(c), from_start=int(from_start[c]), entered=len(first[c]), first_step=steps(first[c]))
                  for c in route],
        "failure_ends": [dict(cell=list(c), episodes=n, to_goal=int(to_goal[c]) if reachable(c) else None,
                              on_route=c in first) for c, n in sorted(ends.items(), key=lambda x: (-x[1], x[0]))],
        "failure_closest": dict(goal=list(task.goal), radius=task.goal_radius,
                                within_2_radii=sum(d <= 2 * task.goal_radius for d in closest),
                                within_4_radii=sum(d <= 4 * task.goal_radius for d in closest),
                                distances=sorted(round(d, 3) for d in closest)),
    }


def critic_near_goal(task: tasks.Task, episodes: list, q_fn, gamma: float) -> dict:
    """From episodes recorded with record_obs: for those whose acted states come within two goal
    radii of the goal, per group (successes, failures): the episodes, the median of Q at the
    acted state closest to the goal (q_fn: (n, obs_dim) states -> (n,) Q(s, pi(s))), of that
    state's Monte-Carlo value (a success in L steps from state k: -(1 - gamma^(L-1-k)) / (1 - gamma),
    the last step's reward being 0; a failure cut at the limit: -(1 - gamma^(L-k)) / (1 - gamma),
    a truncated value), of the path's highest Q, and of its distance to the goal."""
    groups = {"successes": [], "failures": []}
    for e in episodes:
        obs = np.asarray(e["obs"], np.float32)
        dist = np.linalg.norm(obs[:, :2] - np.asarray(task.goal), axis=1)
        k = int(np.argmin(dist))
        if dist[k] > 2 * task.goal_radius:
            continue
        q = np.asarray(q_fn(obs), np.float64).reshape(-1)
        steps_left = e["length"] - 1 - k if e["success"] else e["length"] - k
        groups["successes" if e["success"] else "failures"].append(
            dict(q=q[k], mc=-(1 - gamma ** steps_left) / (1 - gamma), q_max=q.max(), at=dist[int(np.argmax(q))]))

    def summary(rows):
        med = lambda key: float(np.median([r[key] for r in rows])) if rows else None  # noqa: E731
        return dict(episodes=len(rows), q_closest=med("q"), mc_closest=med("mc"), q_max=med("q_max"),
                    q_max_distance=med("at"))

    return dict(within=2 * task.goal_radius, gamma=gamma, **{g: summary(rows) for g, rows in groups.items()})


OFFSETS = (-30, -10, -3, -1, 0, 10)  # steps around the first turn-over at which the critic is read


def first_turn_over(e: dict) -> Optional[int]:
    """The first acted step at which the ant lies on its back (episodes with record_obs), or None."""
    back = ant.upside_down(np.asarray(e["obs"]))
    return int(np.argmax(back)) if back.any() else None


def turn_overs(task: tasks.Task, episodes: list, q_fn=None) -> dict:
    """From ant episodes recorded with record and record_obs, per group (successes, failures):
    the episodes, how many turned over at some acted step, how many were on their backs at the
    last one, the median step of the first turn-over, the cells where it happened (most first);
    with q_fn (states -> Q(s, pi(s))) the median Q at each of OFFSETS steps from it (over the
    episodes whose path has that step)."""
    groups = {}
    for g, want in (("successes", True), ("failures", False)):
        rows = [e for e in episodes if bool(e["success"]) == want]
        firsts, cells, at_end, q_at = [], collections.Counter(), 0, {o: [] for o in OFFSETS}
        for e in rows:
            t = first_turn_over(e)
            if t is None:
                continue
            firsts.append(t)
            cells[trajectory_cells(task, np.asarray(e["xy"])[t:t + 1])[0]] += 1
            at_end += bool(ant.upside_down(np.asarray(e["obs"])[-1])[0])
            if q_fn is not None:
                q = np.asarray(q_fn(np.asarray(e["obs"], np.float32)), np.float64).reshape(-1)
                for o in OFFSETS:
                    if 0 <= t + o < len(q):
                        q_at[o].append(q[t + o])
        groups[g] = dict(episodes=len(rows), turned_over=len(firsts), on_back_at_end=at_end,
                         first_step=float(np.median(firsts)) if firsts else None,
                         cells=[dict(cell=list(c), episodes=n) for c, n in sorted(cells.items(),
                                                                                  key=lambda x: (-x[1], x[0]))])
        if q_fn is not None:
            groups[g]["critic"] = {str(o): float(np.median(v)) if v else None for o, v in q_at.items()}
    return groups


def data_turn_overs(ds: tasks.Dataset) -> dict:
    """Transitions of a dataset that turn an ant over (upright at s, on its back at s'), that
    right it, and the share of states on their backs."""
    back, back2 = ant.upside_down(ds.observations), ant.upside_down(ds.next_observations)
    return dict(transitions=int(len(back)), on_back=float(back.mean()), turning_over=int((~back & back2).sum()),
                righting=int((back & ~back2).sum()))


def elites_open_loop(wm, done_fn, s0, actions):
    """Each elite's mean prediction (no sampling noise) from states s0 (n, d) under given actions
    (n, k, act), step by step: the states after k steps, (elites, n, d)."""
    n_el = len(world_model.members(wm.params))
    s = jnp.broadcast_to(jnp.asarray(s0), (n_el, *s0.shape))
    member = jnp.broadcast_to(jnp.arange(n_el)[:, None], s.shape[:2])
    no_noise = jnp.zeros((*s.shape[:2], wm.params["max_logvar"].shape[0]))
    for j in range(actions.shape[1]):
        a = jnp.broadcast_to(jnp.asarray(actions[:, j]), (n_el, *actions[:, j].shape))
        s = world_model.model_step_given(wm, s, a, member, no_noise, done_fn)[0]
    return np.asarray(s)


def model_foresight(task: tasks.Task, wm, nets: pretrain.Nets, actor, episodes: list, before, rollouts: int,
                    key, done_fn=None) -> dict:
    """For the failed episodes (recorded with record_obs) whose ant turned over at acted step t,
    per k in `before` (starts with t - k >= 0 only): the share of (start, elite) pairs whose
    elite's mean prediction (`elites_open_loop`), from the real state s_{t-k} under the episode's
    actions pi(s_{t-k}) .. pi(s_{t-1}), lies on its back after k steps, and the median of their
    `ant.up_axis_z`; and for LEQ's imagination (leq.imagine, `rollouts` per start) the rollouts
    not ended by a done on any of their k steps ('alive'), the share of them on their backs at
    step k and the median of their up_axis_z. done_fn: the termination (default: the task's)."""
    done_fn = done_fn or tasks.termination_fn(task)
    paths = [(np.asarray(e["obs"], np.float32), first_turn_over(e)) for e in episodes if not e["success"]]
    paths = [(obs, t) for obs, t in paths if t is not None]
    result = {}
    for k in before:
        starts = [(obs, t) for obs, t in paths if t - k >= 0]
        if not starts:
            result[str(k)] = dict(starts=0)
            continue
        s0 = np.stack([obs[t - k] for obs, t in starts])                                   # (n, d)
        acts = np.stack([np.asarray(nets.pi(actor, jnp.asarray(obs[t - k:t]))) for obs, t in starts])  # (n, k, act)
        s = elites_open_loop(wm, done_fn, s0, acts).reshape(-1, task.obs_dim)
        ro = leq.imagine(nets, actor, wm, done_fn, jnp.repeat(jnp.asarray(s0), rollouts, 0),
                         jax.random.fold_in(key, k), k)
        alive = np.asarray(leq.alive_masks(ro.dones)[k]) > 0
        imagined = np.asarray(ro.states[k])[alive]
        result[str(k)] = dict(starts=len(starts), elites_on_back=float(ant.upside_down(s).mean()),
                              elites_up_z=float(np.median(ant.up_axis_z(s))), rollouts=int(alive.size),
                              alive=int(alive.sum()),
                              imagined_on_back=float(ant.upside_down(imagined).mean()) if alive.any() else None,
                              imagined_up_z=float(np.median(ant.up_axis_z(imagined))) if alive.any() else None)
    return result


def data_foresight(task: tasks.Task, wm, ds: tasks.Dataset, before) -> dict:
    """The same question on the model's own training data: for each transition i that turns an
    ant over (upright at s_i, on its back at s'_i) and each k in `before`, from the row k - 1
    before it (when rows i - k + 1 .. i are one chain: s' of each row is the next row's s),
    each elite's mean prediction under the data's own k actions: the starts, the share of
    (start, elite) pairs on their backs after k steps, the median of their up_axis_z."""
    done_fn = tasks.termination_fn(task)
    back, back2 = ant.upside_down(ds.observations), ant.upside_down(ds.next_observations)
    flips = np.flatnonzero(~back & back2)
    result = {}
    for k in before:
        firsts = [i - k + 1 for i in flips if i - k + 1 >= 0 and np.array_equal(
            ds.next_observations[i - k + 1:i], ds.observations[i - k + 2:i + 1])]
        if not firsts:
            result[str(k)] = dict(starts=0)
            continue
        s0 = ds.observations[firsts]
        acts = np.stack([ds.actions[j:j + k] for j in firsts])
        s = elites_open_loop(wm, done_fn, s0, acts).reshape(-1, task.obs_dim)
        result[str(k)] = dict(starts=len(firsts), elites_on_back=float(ant.upside_down(s).mean()),
                              elites_up_z=float(np.median(ant.up_axis_z(s))))
    return result


def critic_q_fn(critic, nets: pretrain.Nets, actor):
    """A critic (pretrain.critic_from_artifact) as states (n, obs_dim) -> Q(s, pi(s)) (n,) (an
    ensemble's minimum). Not jitted: every episode length would compile anew."""
    return lambda s: np.asarray(nets.q(critic, jnp.asarray(s), nets.pi(actor, jnp.asarray(s))))


def print_report(r: dict) -> None:
    print(f"{r['env']}: {r['successes']} of {r['episodes']} episodes reach the goal, mean length {r['mean_length']:.1f}")
    print(f"{'route cell':>11} {'from start':>10} {'entered':>8}   first entry step: median [min, max]")
    for row in r["route"]:
        s = row["first_step"]
        when = f"{s['median']:.0f} [{s['min']}, {s['max']}]" if s else "-"
        print(f"{str(tuple(row['cell'])):>11} {row['from_start']:>10} {row['entered']:>8}   {when}")
    print(f"failures' end cells ({r['episodes'] - r['successes']} episodes):")
    print(f"{'cell':>11} {'episodes':>8} {'to goal':>8}  on a shortest route")
    for row in r["failure_ends"]:
        print(f"{str(tuple(row['cell'])):>11} {row['episodes']:>8} {str(row['to_goal']):>8}  "
              f"{'yes' if row['on_route'] else 'no'}")
    near = r["failure_closest"]
    if near["distances"]:
        print(f"failures' closest approach to the goal (radius {near['radius']:g}): {near['within_2_radii']} within "
              f"{2 * near['radius']:g}, {near['within_4_radii']} within {4 * near['radius']:g}, "
              f"median {np.median(near['distances']):.2f}")
    if "critic_near_goal" in r:
        critic = r["critic_near_goal"]
        print(f"critic next to the goal (medians over the episodes whose path came within {critic['within']:g} of "
              f"it; 'closest': the acted state nearest the goal):")
        print(f"{'':>22} {'episodes':>8} {'Q closest':>10} {'its MC value':>12} {'path max Q':>10} {'at distance':>11}")
        for g in ("successes", "failures"):
            row = critic[g]
            if row["episodes"]:
                label = f"{g} within {critic['within']:g}"
                print(f"{label:>22} {row['episodes']:>8} {row['q_closest']:>10.1f} {row['mc_closest']:>12.1f} "
                      f"{row['q_max']:>10.1f} {row['q_max_distance']:>11.2f}")


def print_turn_overs(r: dict) -> None:
    print("ants that turned over (on their backs at some step; 'at the end': still on their backs at the last step):")
    print(f"{'':>10} {'episodes':>8} {'turned over':>11} {'at the end':>10} {'first step':>10}  where (cell: episodes)")
    for g in ("successes", "failures"):
        row = r["turn_overs"][g]
        first = f"{row['first_step']:.0f}" if row["first_step"] is not None else "-"
        where = ", ".join(f"{tuple(c['cell'])}: {c['episodes']}" for c in row["cells"][:6])
        print(f"{g:>10} {row['episodes']:>8} {row['turned_over']:>11} {row['on_back_at_end']:>10} {first:>10}  {where}")
    critic = r["turn_overs"]["failures"].get("critic")
    if critic and r["turn_overs"]["failures"]["turned_over"]:
        print("critic's Q(s, pi(s)) around the failures' first turn-over (median; step 0: first on its back): "
              + ", ".join(f"{int(o):+d}: {q:.1f}" for o, q in critic.items() if q is not None))
    if "model_foresight" in r:
        d = r["data_turn_overs"]
        print(f"the world model's data: {d['transitions']:,} transitions, {100 * d['on_back']:.2f}% of states on "
              f"their backs, {d['turning_over']} transitions turn an ant over, {d['righting']} right one")
        print("does the world model foresee the failures' turn-overs? From the real state k steps before "
              "(share on their backs after k steps; median up-axis z, 1 upright, -1 on the back):")
        print(f"{'k':>4} {'starts':>7} {'elites, real actions':>21} {'up z':>6} {'imagined, actor':>16} {'up z':>6} "
              f"{'alive':>11}   " + "the data's own turn-overs: starts, elites, up z".rjust(47))
        for k, row in r["model_foresight"].items():
            if row["starts"]:
                d = r["data_foresight"][k]
                im = (f"{row['imagined_on_back']:>16.3f} {row['imagined_up_z']:>6.2f}"
                      if row["imagined_on_back"] is not None else f"{'-':>16} {'-':>6}")
                own = f"{d['starts']:>5} {d['elites_on_back']:>6.3f} {d['elites_up_z']:>6.2f}" if d["starts"] else "-"
                print(f"{k:>4} {row['starts']:>7} {row['elites_on_back']:>21.3f} {row['elites_up_z']:>6.2f} {im} "
                      f"{row['alive']:>5}/{row['rollouts']:<5}   {own:>47}")


def main(a: Args) -> dict:
    tasks.check_common(a)
    tasks.check_flags(a, (">= 1", "episodes parallel"))
    out = Path(a.out or str(a.checkpoint).removesuffix(".npz") + ".route.json")
    tasks.check_output_folder(out, "; pass --out")  # before 100 episodes, not after
    artifact = artifacts.load_artifact(a.checkpoint, None, need="actor")
    task, nets, actor = pretrain.actor_from_artifact(artifact, path=a.checkpoint)
    if task.source != "builtin" or not task.is_maze:
        raise tasks.InputError(f"{a.checkpoint} is an actor for {task.name}; route_check.py needs one of a built-in "
                               f"maze task (pointmaze-*, ant-*): pass such a checkpoint")
    seed = a.seed if a.seed is not None else int(artifact["meta/config"].get("seed", 0))
    is_ant = ant.is_builtin_ant(task)
    if a.world_model and not is_ant:
        raise tasks.InputError(f"--world-model asks about ants turning over; {task.name} is not a built-in ant maze: "
                               f"leave it out")
    if not a.before or any(k < 1 for k in a.before) or a.rollouts < 1:
        raise tasks.InputError("--before needs steps >= 1 and --rollouts >= 1")
    wm = world_model.load_world_model(a.world_model, task) if a.world_model else None
    critic = pretrain.critic_from_artifact(artifact)
    q_fn = critic_q_fn(critic, nets, actor) if critic is not None else None
    episodes = evaluate.run_episodes(task, evaluate.actor_policy(nets, actor), a.episodes, seed, a.parallel,
                                     record=True, record_obs=critic is not None or is_ant)
    report = {**route_progress(task, episodes), "checkpoint": str(a.checkpoint), "seed": seed}
    if critic is not None:
        report["critic_near_goal"] = critic_near_goal(task, episodes, q_fn, float(artifact["meta/config"]["gamma"]))
    if is_ant:
        report["turn_overs"] = turn_overs(task, episodes, q_fn)
    if wm is not None:
        ds = tasks.load_dataset(task, wm.dataset)
        report.update(world_model=str(a.world_model), data_turn_overs=data_turn_overs(ds),
                      data_foresight=data_foresight(task, wm, ds, a.before),
                      model_foresight=model_foresight(task, wm, nets, actor, episodes, a.before, a.rollouts,
                                                      jax.random.PRNGKey(seed)))
    print_report(report)
    if is_ant:
        print_turn_overs(report)
    artifacts.write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    cli.run_script(main, Args)
