"""Does the world model agree with the real environment along a policy's own path?

    python scripts/model_rollout_check.py --checkpoint runs/pointmaze-umaze__leq__s0/leq.npz \
        --world-model runs/pointmaze-umaze__world_model__s0/world_model.npz

Runs the checkpoint's deterministic actor from the env's start state (reset seed) for `--steps`
steps in the real env, and from the same state through each elite's MEAN prediction (no
sampling noise), and prints the xy positions side by side. A policy that exploits a model error
shows up as elites that all go where the real env does not (e.g. through a wall): then the
ensemble has no spread there, and the lower expectile cannot be conservative about it.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cli  # noqa: E402
import networks  # noqa: E402
import tasks  # noqa: E402
import world_model  # noqa: E402


@dataclasses.dataclass
class Args:
    checkpoint: str
    """artifact with an actor (pretrain.npz, leq.npz, a leq checkpoint)"""
    world_model: str
    """world_model.npz of the same task"""
    steps: int = 40
    """steps to roll out"""
    seed: int = 0
    """reset seed of the real env"""
    every: int = 10
    """print every this many steps"""


def main(a: Args):
    task, nets, actor = networks.load_actor(a.checkpoint)
    wm = world_model.load_world_model(a.world_model, task)
    done_fn = tasks.termination_fn(task)
    env = tasks.make_env(task)
    obs, _ = env.reset(seed=a.seed)
    n = len(world_model.members(wm.params))
    s = jnp.asarray(np.repeat(obs[None], n, 0), jnp.float32)  # one row per elite
    member, no_noise = jnp.arange(n), jnp.zeros((n, task.obs_dim + 1))
    print(f"{'step':>4}  {'real env xy':>16}  " + "  ".join(f"{f'elite {e} xy':>16}" for e in range(n)))
    for t in range(1, a.steps + 1):
        action = np.asarray(nets.pi(actor, jnp.asarray(obs[None], jnp.float32)))[0]
        obs = env.step(action)[0]
        s = world_model.model_step_given(wm, s, nets.pi(actor, s), member, no_noise, done_fn)[0]
        if t % a.every == 0 or t == a.steps:
            xy = np.asarray(s[:, :2])
            print(f"{t:>4}  {np.array2string(obs[:2], precision=2):>16}  "
                  + "  ".join(f"{np.array2string(p, precision=2):>16}" for p in xy))


if __name__ == "__main__":
    cli.run_script(main, Args)  # with an XLA CPU compiler option (deviation, README)
