"""Evaluation: run an actor in the real environment, report scores, draw pictures (docs/ALGORITHM.md, section 5.8).

    python evaluate.py --checkpoint runs/<run>/leq.npz            # 10 episodes, table + JSON
    python evaluate.py --checkpoint pretrain.npz --episodes 100   # any artifact with an actor
    python evaluate.py --curve runs/<run>/metrics.jsonl           # learning-curve PNG
    MUJOCO_GL=egl python evaluate.py --checkpoint leq.npz --video # MP4 of one episode

Episodes are seeded (seed + i) and run in lockstep: one batched, jitted policy call per step
(the policy is compiled once, with its parameters as an argument). leq.py calls `evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import pretrain
from leq_utils import artifacts, cli, plots, tasks  # support package: data, artifacts, CLI, pictures (TRY NOT TO MODIFY)


@dataclasses.dataclass
class Args:
    checkpoint: Optional[str] = None
    """artifact holding an actor: pretrain.npz, leq.npz or a leq checkpoint"""
    env: Optional[str] = None
    """task to evaluate in (default: the one the checkpoint was trained on)"""
    episodes: int = 10
    """number of episodes"""
    seed: int = 0
    """episode i is reset with seed + i"""
    parallel: int = 10
    """environments stepped in lockstep"""
    out: Optional[str] = None
    """JSON output (default: <checkpoint>.eval.json)"""
    plot: bool = True
    """maze tasks: save a PNG of the trajectories on the maze (<checkpoint>.trajectories.png)"""
    video: bool = False
    """save an MP4 of the first episode (needs off-screen rendering: built-in tasks MUJOCO_GL=egl or
    osmesa, D4RL tasks OSMesa or EGL through mujoco-py; see docs/TASKS.md)"""
    curve: Optional[str] = None
    """a run's metrics.jsonl: plot its learning curve to metrics.png (no checkpoint needed)"""


# ============================================================================================
# Policies
# ============================================================================================

@functools.partial(jax.jit, static_argnames="actor")
def deterministic_action(actor: pretrain.Actor, params, stats, obs):
    """tanh(mean(s)), clipped to [-1, 1]. Compiled once per network shape: parameters and
    statistics are arguments, so new parameters never trigger a re-trace."""
    return jnp.clip(jnp.tanh(actor.apply(params, obs, stats)), -1.0, 1.0)


def actor_policy(nets: pretrain.Nets, params) -> Callable:
    """A batched numpy policy obs (n, obs_dim) -> actions (n, act_dim) from an actor."""
    return lambda obs: np.asarray(
        deterministic_action(nets.actor, params, nets.stats, jnp.asarray(obs, jnp.float32)))


# ============================================================================================
# Episodes in lockstep
# ============================================================================================

_ENVS: dict = {}  # task name -> list of envs, reused across evaluations (env creation is slow)


def get_envs(task: tasks.Task, n: int) -> list:
    envs = _ENVS.setdefault(task.name, [])
    while len(envs) < n:
        envs.append(tasks.make_env(task))
    return envs[:n]


def run_episodes(task: tasks.Task, policy: Callable, episodes: int, seed: int = 0, parallel: int = 10,
                 record: bool = False, record_obs: bool = False) -> list:
    """Run `episodes` seeded episodes; returns per-episode dicts (return, length, success, and
    the xy trajectory when `record`; with `record_obs` the observations the policy acted on, one
    per action: "obs", (length, obs_dim))."""
    results = []
    for first in range(0, episodes, parallel):
        envs = get_envs(task, min(parallel, episodes - first))
        obs = np.stack([env.reset(seed=seed + first + i)[0] for i, env in enumerate(envs)])
        alive = np.ones(len(envs), bool)
        eps = [dict(ret=0.0, length=0, success=False, obs0=o.tolist(), xy=[o[:2].tolist()] if record else None)
               for o in obs]
        acted = [[] for _ in envs]
        while alive.any():
            actions = policy(obs)
            for i in np.flatnonzero(alive):
                if record_obs:
                    acted[i].append(obs[i].copy())
                o, r, terminated, truncated, info = envs[i].step(actions[i])
                ep = eps[i]
                ep["ret"] += float(r)
                ep["length"] += 1
                ep["success"] |= bool(info.get("success", False)) or (task.is_maze and r > 0)
                if record:
                    ep["xy"].append(o[:2].tolist())
                obs[i] = o
                alive[i] = not (terminated or truncated)
        if record_obs:
            for ep, rows in zip(eps, acted):
                ep["obs"] = np.asarray(rows, np.float32)
        results += eps
    return results


def summarize(task: tasks.Task, episodes: list) -> dict:
    """Mean and standard error of the normalised score, success, return and length."""
    def stat(x):
        x = np.asarray(x, float)
        return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    scores = [tasks.normalized_score(task, e["ret"], float(e["success"])) for e in episodes]
    out = {"env": task.name, "episodes": len(episodes)}
    for name, values in (("score", scores), ("success", [e["success"] for e in episodes]),
                         ("return", [e["ret"] for e in episodes]),
                         ("length", [e["length"] for e in episodes])):
        out[name], out[name + "_stderr"] = stat(values)
    return out


def evaluate(task: tasks.Task, nets: pretrain.Nets, params, episodes: int = 10, seed: int = 0,
             parallel: int = 10) -> dict:
    """The function leq.py calls: summary of `episodes` deterministic episodes."""
    return summarize(task, run_episodes(task, actor_policy(nets, params), episodes, seed, parallel))


def paper_protocol(task: tasks.Task, nets: pretrain.Nets, params, rounds: int = 10, episodes: int = 10,
                   seed: int = 0) -> dict:
    """The paper's final evaluation: `rounds` x `episodes` episodes (seeds seed, seed + 1, ...);
    the summary of all of them plus each round's score and their standard deviation."""
    eps = run_episodes(task, actor_policy(nets, params), rounds * episodes, seed)
    round_scores = [summarize(task, eps[i * episodes:(i + 1) * episodes])["score"] for i in range(rounds)]
    return {**summarize(task, eps), "round_scores": round_scores, "score_std": float(np.std(round_scores))}


# ============================================================================================
# Main
# ============================================================================================

def check_outputs(args: Args) -> None:
    """Before any episode: the flags, and the folders the outputs go to exist and are writable."""
    tasks.check_flags(args, (">= 1", "episodes parallel"))
    stem = Path(str(args.checkpoint).removesuffix(".npz"))
    outs = [Path(args.out or f"{stem}.eval.json")] + [stem] * (args.plot or args.video)
    for out in outs:
        tasks.check_output_folder(out)


def main(args: Args) -> Optional[dict]:
    tasks.check_common(args)  # no empty path flag, a seed in [0, 2**32)
    if args.curve:
        png = Path(args.curve).with_suffix(".png")
        plots.plot_curve(args.curve, png)
        print(f"wrote {png}")
        if not args.checkpoint:
            return None
    if not args.checkpoint:
        raise tasks.InputError("pass --checkpoint PATH (an artifact with an actor) or --curve FILE")
    check_outputs(args)
    artifact = artifacts.load_artifact(args.checkpoint, tasks.get_task(args.env) if args.env else None, need="actor")
    task, nets, params = pretrain.actor_from_artifact(artifact, path=args.checkpoint)
    maze = task.is_maze
    episodes = run_episodes(task, actor_policy(nets, params), args.episodes, args.seed, args.parallel,
                            record=maze and args.plot)
    summary = summarize(task, episodes)
    summary.update(checkpoint=str(args.checkpoint), seed=args.seed)
    if maze:  # the goal the env used (the first env's last episode) beside the one imagination uses
        summary.update(env_goal=tasks.env_goal(get_envs(task, 1)[0]).tolist(), termination_centre=list(task.goal))
    critic = pretrain.critic_from_artifact(artifact)
    if critic is not None:  # pretrain.npz, leq.npz: Q of the start states
        s0 = jnp.asarray([e["obs0"] for e in episodes], jnp.float32)
        summary["q_start"] = float(jnp.mean(nets.q(critic, s0, nets.pi(params, s0))))
    stem = str(args.checkpoint).removesuffix(".npz")
    out = Path(args.out or stem + ".eval.json")
    artifacts.write_json(out, summary)
    print(f"{'metric':>10} {'mean':>10} {'stderr':>10}")
    for k in ("score", "success", "return", "length"):
        print(f"{k:>10} {summary[k]:>10.3f} {summary[k + '_stderr']:>10.3f}")
    if "q_start" in summary:
        print(f"critic's value of the start states, mean Q(s0, pi(s0)): {summary['q_start']:.2f}")
    if maze:
        print(f"env goal {np.round(summary['env_goal'], 2).tolist()}, termination centre "
              f"{np.round(task.goal, 2).tolist()}")
    print(f"wrote {out}")
    if maze and args.plot:
        plots.plot_trajectories(task, episodes, stem + ".trajectories.png", title=plots.run_name(args.checkpoint))
        print(f"wrote {stem}.trajectories.png")
    if args.video:
        plots.save_video(task, actor_policy(nets, params), stem + ".mp4", args.seed)
        print(f"wrote {stem}.mp4")
    return summary


if __name__ == "__main__":
    cli.run_script(main, Args)
