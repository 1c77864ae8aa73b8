"""Does the world model agree with the real environment along a policy's own path?

    python scripts/model_rollout_check.py --checkpoint runs/pointmaze-umaze__leq__s0/leq.npz \
        --world-model runs/pointmaze-umaze__world_model__s0/world_model.npz

Runs the checkpoint's deterministic actor from the env's start state (reset seed) for `--steps`
steps in the real env, and from the same state through each elite's MEAN prediction (no
sampling noise), and prints the xy positions side by side. A policy that exploits a model error
shows up as elites that all go where the real env does not (e.g. through a wall): then the
ensemble has no spread there, and the lower expectile cannot be conservative about it.

On the built-in mazes (PointMaze and ant) it also counts impossible states: positions inside a
wall cell (marked * in the path table; the real point's centre, or the ant's torso's, never enters one), along the path and in
imagination as LEQ does it (`--imagined N` dataset states, `--horizon` steps under the actor,
each step from a uniformly drawn elite with its sampling noise, `world_model.model_step`).
On every task it prints the largest |coordinate| of those imagined states at each step, against
the dataset's: a model that runs away off the data shows up as values growing step after step
(pointmaze-ultra seed 2's world model under its BC actor: 6.93 at step 1, 316 at step 4, 1.4e6
at step 10). On the built-in ant mazes it also prints the share of imagined ants lying on their
backs at each step, against the start states': a real ant that turned over rarely gets up again,
so a share that falls step after step is a model that lets the actor right it (ant-umaze-diverse
seed 0 after 10k LEQ steps, on Ant-v5's body, data version 1: 24.5% at the start, 23.7% after 10 steps;
24.9% under its BC actor).

It also prints the one-step error along the real path: each elite's mean prediction of the next
xy from the REAL state and action, against the real next xy (largest over the path and the
elites). Small one-step errors with open-loop paths that leave the real one mean the model is
right on the path and errs by compounding, off it.
"""

import dataclasses
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from leq_utils import ant, cli  # noqa: E402
import pretrain  # noqa: E402
from leq_utils import tasks  # noqa: E402
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
    """reset seed of the real env, and of the imagined rollouts' start states and noise"""
    every: int = 10
    """print every this many steps"""
    imagined: int = 10_000
    """imagined rollouts to count states inside walls in (built-in mazes) and to measure
    the largest imagined coordinate in (0: none)"""
    horizon: int = 10
    """steps per imagined rollout (LEQ's H)"""
    dataset_path: Optional[str] = None
    """the dataset the world model was trained on, when it was not the task's own (the imagined
    rollouts start from its states)"""


def in_wall_fn(task):
    """xy (..., 2) -> True where the point's (the ant's torso's) centre is inside a wall cell or
    outside the maze (built-in mazes only; the real env keeps the centre out of walls)."""
    return lambda xy: tasks.in_wall(task, xy, jnp)


def on_back_fn(task):
    """states (n, d) -> True where a built-in ant lies on its back; None on other tasks."""
    return (lambda s: ant.upside_down(s, jnp)) if ant.is_builtin_ant(task) else None


def imagined_rollouts(observations: np.ndarray, wm, nets, actor, done_fn, in_wall, a: Args, on_back=None):
    """LEQ's imagination as the critic sees it: N start states from the dataset, H steps of the
    actor in the sampled model (each step from a uniformly drawn elite with its sampling noise).
    States after a done are not counted. Returns (the fraction of imagined states inside a wall
    cell; the largest |coordinate| of the imagined states at each step; the dataset's largest;
    the share of the start states for which `on_back` (states -> bool) holds, then of the
    imagined states at each step; all 0 without `on_back`).
    A model whose states run away off the data (growing step after step far past the dataset's
    range) feeds the lambda-returns values and rewards of states it never saw."""
    rng = np.random.default_rng(a.seed)
    s = jnp.asarray(observations[rng.choice(len(observations), a.imagined)])
    on_back = on_back or (lambda s: jnp.zeros(s.shape[0], bool))

    @jax.jit
    def rollout(s, key):
        def step(carry, k):
            s, alive = carry
            s2, _, done = world_model.model_step(wm, s, nets.pi(actor, s), k, done_fn)
            bad = in_wall(s2[:, :2]) & alive
            back = (on_back(s2) & alive).sum() / jnp.maximum(alive.sum(), 1)
            return (s2, alive & ~done.astype(bool)), (bad, alive, jnp.where(alive[:, None], jnp.abs(s2), 0.0).max(), back)
        _, (bad, alive, largest, back) = jax.lax.scan(step, (s, jnp.ones(s.shape[0], bool)), jax.random.split(key, a.horizon))
        return bad.sum(), alive.sum(), largest, jnp.concatenate([on_back(s).mean()[None], back])
    bad, alive, largest, back = rollout(s, jax.random.PRNGKey(a.seed))
    return float(bad) / max(float(alive), 1.0), np.asarray(largest), float(np.abs(observations).max()), np.asarray(back)


def main(a: Args):
    task, nets, actor = pretrain.load_actor(a.checkpoint)
    wm = world_model.load_world_model(a.world_model, task)
    done_fn = tasks.termination_fn(task)
    walls = task.source == "builtin"
    in_wall = in_wall_fn(task) if walls else (lambda xy: jnp.zeros(xy.shape[:-1], bool))
    env = tasks.make_env(task)
    obs, _ = env.reset(seed=a.seed)
    n = len(world_model.members(wm.params))
    s = jnp.asarray(np.repeat(obs[None], n, 0), jnp.float32)  # one row per elite
    member, no_noise = jnp.arange(n), jnp.zeros((n, task.obs_dim + 1))
    pi = jax.jit(nets.pi)
    mean_step = jax.jit(lambda s: world_model.model_step_given(wm, s, nets.pi(actor, s), member, no_noise, done_fn)[0])
    first_in_wall, one_step_error, worst_step = [None] * n, 0.0, 0
    print(f"{'step':>4}  {'real env xy':>16}  " + "  ".join(f"{f'elite {e} xy':>17}" for e in range(n)))
    for t in range(1, a.steps + 1):
        action = np.asarray(pi(actor, jnp.asarray(obs[None], jnp.float32)))[0]
        from_real = mean_step(jnp.asarray(np.repeat(obs[None], n, 0), jnp.float32))  # pi(real obs): the same action
        obs = env.step(action)[0]
        error = float(np.abs(np.asarray(from_real[:, :2]) - obs[:2]).max())
        one_step_error, worst_step = max((one_step_error, worst_step), (error, t))
        s = mean_step(s)
        bad = np.asarray(in_wall(s[:, :2]))
        first_in_wall = [f if f is not None or not b else t for f, b in zip(first_in_wall, bad)]
        if t % a.every == 0 or t == a.steps:
            xy = np.asarray(s[:, :2])
            print(f"{t:>4}  {np.array2string(obs[:2], precision=2):>16}  "
                  + "  ".join(f"{np.array2string(p, precision=2):>16}{'*' if b else ' '}" for p, b in zip(xy, bad)))
    print(f"one-step error from the real states (each elite's mean next xy vs the real one), largest over "
          f"the {a.steps} steps: {one_step_error:.4f} (step {worst_step})")
    if walls:
        print("first step inside a wall, per elite's mean path: "
              + ", ".join(f"elite {e}: {f if f is not None else 'never'}" for e, f in enumerate(first_in_wall)))
    if a.imagined:
        observations = tasks.load_dataset(task, a.dataset_path).observations
        rate, largest, data_largest, back = imagined_rollouts(observations, wm, nets, actor, done_fn, in_wall, a,
                                                              on_back_fn(task))
        if walls:
            print(f"imagined states inside a wall ({a.imagined:,} dataset starts x {a.horizon} steps, sampled "
                  f"model): {100 * rate:.3f}%")
        print(f"largest |coordinate| of the imagined states at steps 1..{a.horizon} (the dataset's: "
              f"{data_largest:.3g}): " + " ".join(f"{x:.3g}" for x in largest))
        if ant.is_builtin_ant(task):
            print(f"imagined ants on their backs at steps 1..{a.horizon} (of the start states: {100 * back[0]:.1f}%): "
                  + " ".join(f"{100 * x:.1f}%" for x in back[1:]))


if __name__ == "__main__":
    cli.run_script(main, Args)
