"""Evaluation speed on the built-in mazes: episodes per second in the real MuJoCo envs.

    python benchmarks/evaluate_speed.py --episodes 20

A freshly initialised actor (random parameters) is run with evaluate.run_episodes (10 envs in
lockstep, one jitted policy call per step); such an actor rarely reaches the goal, so episodes
run to the time limit: the worst case, and the speed that matters during training.
"""

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import evaluate  # noqa: E402
import pretrain  # noqa: E402
from leq_utils import tasks  # noqa: E402


@dataclasses.dataclass
class Args:
    episodes: int = 20
    """episodes per maze"""
    mazes: tuple[str, ...] = ("umaze", "medium", "large", "ultra")
    """built-in mazes to time"""


def main(a: Args):
    out = {}
    for maze in a.mazes:
        task = tasks.get_task(f"pointmaze-{maze}")
        stats = (np.zeros(task.obs_dim + task.act_dim), np.ones(task.obs_dim + task.act_dim))
        nets = pretrain.make_nets(task, (256, 256, 256), stats)
        actor, _ = pretrain.init_params(nets, jax.random.PRNGKey(0), task.obs_dim, task.act_dim)
        policy = evaluate.actor_policy(nets, actor)
        evaluate.run_episodes(task, policy, 10, seed=1000)  # make the envs, compile the policy
        t = time.perf_counter()
        eps = evaluate.run_episodes(task, policy, a.episodes, seed=0)
        seconds = time.perf_counter() - t
        steps = sum(e["length"] for e in eps)
        out[task.name] = {"episodes_per_s": a.episodes / seconds, "env_steps_per_s": steps / seconds,
                          "mean_length": steps / a.episodes, "success": float(np.mean([e["success"] for e in eps]))}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
