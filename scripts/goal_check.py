"""What do the critic and the world model make of the dataset's own goal reaches?

    python scripts/goal_check.py --checkpoint runs/ant-large-diverse__leq__s0/leq.npz \
        --world-model runs/ant-large-diverse__world_model__s0/world_model.npz

Maze tasks with a fixed goal (built-in PointMaze and ant, D4RL AntMaze). On a step that ends the
episode (a terminal transition: the next state is in the goal) the Bellman target is the
transformed reward alone, whatever the policy: 0 on AntMaze and the PointMazes (r - 1, docs/
ALGORITHM.md, section 2). So there the critic's right answer is known. The script counts the
dataset's terminal transitions, the ones among them that ENTER the goal (their state is outside
the radius), and the near misses (non-terminal steps that end within two radii of the goal), and
prints:

  * the checkpoint's critic on the entering transitions and on all terminal ones: Q(s, a) of the
    data's action and Q(s, pi(s)) of the checkpoint's actor (median, 10th and 90th percentile),
    against the target;
  * with --world-model: for each elite, the share of entering transitions whose predicted next
    state (from the real state and action) the task's true termination marks done, from the
    mean prediction and from a sampled one (as in imagination), and the same share on the near
    misses, where it should be 0. An imagination that does not see the goal reached where the
    data does would make the critic pessimistic there;
  * with --world-model, LEQ's imagination from the data's states k steps before each goal entry
    (k in --before; `leq.imagine`, the checkpoint's actor, H, lambda, gamma and tau of the run
    that wrote it, or leq.py's defaults and tau 0.1), --rollouts rollouts from each: the share
    that reach the goal within H steps, the lambda-returns G_0 (median, and the median over the
    start states of each one's tau-expectile of its rollouts' G_0: what LEQ's model loss pulls
    Q(s_0, a_0) towards if only these rollouts trained it), against the critic's Q(s, pi(s)).

It writes the same as JSON (default <checkpoint>.goal.json). docs/RESULTS.md uses it on the
ant-umaze-diverse and ant-large-diverse runs.
"""

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from leq_utils import artifacts, cli, tasks  # noqa: E402
import leq  # noqa: E402
import pretrain  # noqa: E402
import world_model  # noqa: E402


@dataclasses.dataclass
class Args:
    checkpoint: str
    """artifact with an actor and a critic (pretrain.npz, leq.npz, a leq checkpoint) of a maze task"""
    world_model: Optional[str] = None
    """world_model.npz of the same task: also check its predictions on the goal reaches"""
    dataset_path: Optional[str] = None
    """a D4RL-format HDF5 file to use instead of the task's own dataset"""
    data_dir: Optional[str] = None
    """folder of the built-in datasets (default: $LEQ_DATA_DIR or ./data)"""
    seed: int = 0
    """seed of the sampled predictions' and the imagined rollouts' noise"""
    before: tuple[int, ...] = (0, 5, 20)
    """with --world-model: imagine from the data's states this many steps before each goal entry"""
    rollouts: int = 8
    """with --world-model: imagined rollouts from each start state"""
    out: Optional[str] = None
    """JSON output (default: <checkpoint>.goal.json)"""


def goal_transitions(task: tasks.Task, ds: tasks.Dataset) -> dict:
    """Indices of the dataset's terminal transitions, of those entering the goal (their state
    outside the radius), and of the near misses (not terminal, next state within two radii)."""
    goal = np.asarray(task.goal)
    now = np.linalg.norm(ds.observations[:, :2] - goal, axis=1)
    after = np.linalg.norm(ds.next_observations[:, :2] - goal, axis=1)
    terminal = ds.terminals > 0
    outside = now > task.goal_radius if task.goal_inclusive else now >= task.goal_radius  # not already in the goal
    return {"terminal": np.flatnonzero(terminal), "entering": np.flatnonzero(terminal & outside),
            "near_misses": np.flatnonzero(~terminal & (after <= 2 * task.goal_radius))}


def spread(x) -> Optional[dict]:
    x = np.asarray(x, np.float64)
    return dict(median=float(np.median(x)), p10=float(np.percentile(x, 10)), p90=float(np.percentile(x, 90))) \
        if x.size else None


def critic_on(nets: pretrain.Nets, actor, critic, ds: tasks.Dataset, idx) -> dict:
    """The critic's Q(s, a_data) and Q(s, pi(s)) on transitions idx, with their targets
    (the transformed rewards: these transitions are terminal)."""
    s, a = jnp.asarray(ds.observations[idx]), jnp.asarray(ds.actions[idx])
    return dict(transitions=int(len(idx)), target=spread(ds.reward_scale * ds.rewards[idx] + ds.reward_shift),
                q_data_action=spread(nets.q(critic, s, a)), q_actor=spread(nets.q(critic, s, nets.pi(actor, s))))


def model_done_shares(wm: world_model.WorldModel, done_fn, ds: tasks.Dataset, idx, key) -> dict:
    """Per elite, the share of transitions idx whose predicted next state (from the real state
    and action) done_fn marks done: from the mean prediction and from one sampled prediction."""
    if len(idx) == 0:
        return dict(transitions=0, mean_prediction=[], sampled=[])
    s, a = jnp.asarray(ds.observations[idx]), jnp.asarray(ds.actions[idx])
    mean, sampled = [], []
    for e in range(len(world_model.members(wm.params))):
        member = jnp.full((len(idx),), e)
        for eps, out in ((jnp.zeros((len(idx), s.shape[1] + 1)), mean),
                         (jax.random.normal(jax.random.fold_in(key, e), (len(idx), s.shape[1] + 1)), sampled)):
            out.append(float(np.mean(np.asarray(world_model.model_step_given(wm, s, a, member, eps, done_fn)[2]))))
    return dict(transitions=int(len(idx)), mean_prediction=mean, sampled=sampled)


def expectile(x, tau: float, axis: int = -1):
    """The tau-expectile of samples x along `axis`: the m with tau sum (x - m)_+ = (1 - tau) sum (m - x)_+
    (the minimiser of sum |tau - 1(x < m)| (x - m)^2), by 60 bisection steps."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    lo, hi = x.min(-1), x.max(-1)
    for _ in range(60):
        m = (lo + hi) / 2
        above = tau * np.clip(x - m[..., None], 0, None).sum(-1) > (1 - tau) * np.clip(m[..., None] - x, 0, None).sum(-1)
        lo, hi = np.where(above, m, lo), np.where(above, hi, m)
    return (lo + hi) / 2


def starts_before(ds: tasks.Dataset, entering, k: int):
    """The transitions k steps before each entering one, where the k steps in between are one
    chain (each step's next state is the following step's state: the same recorded episode; the
    built-in data go on after a goal reach, so a chain may pass through an earlier one)."""
    chain = np.all(ds.next_observations[:-1] == ds.observations[1:], axis=1)  # i -> i + 1 continues
    broken = np.concatenate([[0], np.cumsum(~chain)])  # breaks among the links before i
    j = entering - k
    ok = (j >= 0) & (broken[np.maximum(j, 0)] == broken[entering])
    return j[ok]


def imagination_from(nets, actor, critic, wm, done_fn, ds, starts, goal, key, rollouts, horizon, lam, gamma,
                     tau) -> dict:
    """LEQ's imagination (leq.imagine) from ds states `starts`, `rollouts` each: their median
    distance to `goal`, the share of rollouts reaching the goal within `horizon` steps (ended by
    done_fn: in the goal, or a non-finite state), G_0's median, the median of each start's
    tau-expectile of its G_0, and Q(s, pi(s))'s median. The default LEQ path's imagination and
    returns (deterministic actor, lambda-returns, no MOBILE penalty), whatever variant the
    checkpoint's run used."""
    if len(starts) == 0:
        return dict(starts=0)
    s0 = jnp.asarray(np.repeat(ds.observations[starts], rollouts, 0))
    ro = leq.imagine(nets, actor, wm, done_fn, s0, key, horizon)
    masks = leq.alive_masks(ro.dones)
    q = nets.q(critic, ro.states.reshape(-1, s0.shape[1]), ro.actions.reshape(-1, ro.actions.shape[-1]))
    q = q.reshape(horizon + 1, -1)
    g0 = np.asarray(leq.lambda_returns(q, ro.rewards, masks, gamma, lam)[0]).reshape(len(starts), rollouts)
    return dict(starts=int(len(starts)),
                distance=float(np.median(np.linalg.norm(ds.observations[starts, :2] - goal, axis=1))),
                reach=float(1 - np.asarray(masks[-1]).mean()), g0_median=float(np.median(g0)),
                g0_expectile=float(np.median(expectile(g0, tau))),
                q_start=float(np.median(np.asarray(q[0]).reshape(len(starts), rollouts)[:, 0])))


def print_report(r: dict) -> None:
    n = r["transitions"]
    print(f"{r['env']}: {n:,} transitions; {r['terminal']:,} terminal ({100 * r['terminal'] / n:.2f}%), "
          f"{r['entering']:,} of them entering the goal; {r['near_misses']:,} near misses (within "
          f"{2 * r['radius']:g} of the goal, not in it)")
    print(f"{'critic on':>22} {'n':>7} {'target':>7} {'Q(s, a_data) median [p10, p90]':>32} {'Q(s, pi(s)) median':>19}")
    for name, c in r["critic"].items():
        if c["transitions"]:
            qd, qa = c["q_data_action"], c["q_actor"]
            print(f"{name + ' transitions':>22} {c['transitions']:>7} {c['target']['median']:>7.2f} "
                  f"{qd['median']:>14.2f} [{qd['p10']:.2f}, {qd['p90']:.2f}]{'':>4} {qa['median']:>19.2f}")
    for name, m in r.get("model", {}).items():
        label = {"entering": "entering", "near_misses": "near-miss"}[name]
        print(f"world model on the {m['transitions']} {label} transitions, share done per elite: mean prediction "
              f"{np.round(m['mean_prediction'], 3).tolist()}, sampled {np.round(m['sampled'], 3).tolist()}")
    if "imagination" in r:
        im = r["imagination"]
        print(f"LEQ's imagination (H {im['horizon']}, lambda {im['lam']}, "
              f"tau {im['tau']}, {im['rollouts']} rollouts each) from the data's states k steps before a goal entry:")
        print(f"{'k':>4} {'starts':>7} {'distance':>8} {'reach goal':>10} {'G_0 median':>10} "
              f"{'tau-expectile of G_0':>20} {'Q(s, pi(s))':>11}")
        for k, row in im["before"].items():
            if row["starts"]:
                print(f"{k:>4} {row['starts']:>7} {row['distance']:>8.2f} {row['reach']:>10.3f} {row['g0_median']:>10.1f} "
                      f"{row['g0_expectile']:>20.1f} {row['q_start']:>11.1f}")


def main(a: Args) -> dict:
    tasks.check_common(a)
    out = Path(a.out or str(a.checkpoint).removesuffix(".npz") + ".goal.json")
    tasks.check_output_folder(out, "; pass --out")  # before the work, as route_check.py
    artifact = artifacts.load_artifact(a.checkpoint, None, need="actor")
    task, nets, actor = pretrain.actor_from_artifact(artifact, path=a.checkpoint)
    if not task.is_maze or not task.goal or task.source not in ("builtin", "d4rl"):
        raise tasks.InputError(f"{a.checkpoint} is for {task.name}; goal_check.py needs a maze task with a fixed goal "
                               f"(pointmaze-*, ant-*, antmaze-*)")
    critic = pretrain.critic_from_artifact(artifact)
    if critic is None:
        raise tasks.InputError(f"{a.checkpoint} has no critic; pass pretrain.npz, leq.npz or a leq checkpoint")
    wm = world_model.load_world_model(a.world_model, task) if a.world_model else None
    ds = tasks.load_dataset(task, a.dataset_path, a.data_dir)
    idx = goal_transitions(task, ds)
    report = {"env": task.name, "checkpoint": str(a.checkpoint), "dataset": ds.path, "radius": task.goal_radius,
              "transitions": int(len(ds.rewards)), "terminal": int(len(idx["terminal"])),
              "entering": int(len(idx["entering"])), "near_misses": int(len(idx["near_misses"])),
              "critic": {name: critic_on(nets, actor, critic, ds, idx[name]) for name in ("entering", "terminal")}}
    if wm is not None:
        done_fn, key = tasks.termination_fn(task), jax.random.PRNGKey(a.seed)
        report.update(world_model=str(a.world_model), model={
            name: model_done_shares(wm, done_fn, ds, idx[name], jax.random.fold_in(key, i))
            for i, name in enumerate(("entering", "near_misses"))})
        config, defaults = artifact["meta/config"], leq.Args()
        horizon, lam, gamma = (config.get(k, getattr(defaults, k)) for k in ("horizon", "lam", "gamma"))
        tau = config.get("expectile") or 0.1
        report["imagination"] = dict(horizon=horizon, lam=lam, gamma=gamma, tau=tau, rollouts=a.rollouts, before={
            str(k): imagination_from(nets, actor, critic, wm, done_fn, ds, starts_before(ds, idx["entering"], k),
                                     np.asarray(task.goal), jax.random.fold_in(key, 100 + k), a.rollouts, horizon,
                                     lam, gamma, tau) for k in a.before})
    print_report(report)
    artifacts.write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    cli.run_script(main, Args)
