"""Has the world model learnt the walls at speed? Its one-step error on the dataset's own impacts.

    python scripts/wall_impact_check.py --env pointmaze-large \
        --world-model runs/pointmaze-large__world_model__s0/world_model.npz

Built-in PointMazes only. The dataset's transitions are sorted, per axis (x, y) and direction,
into three kinds by the speed v along that axis and the distance d the point covers along it in
the step (the env's time step dt): an IMPACT covers less than half of v * dt (a wall stopped
it), FREE MOTION more than 80% of it. The script prints, for fast impacts (v > --speed), slower
impacts (2 < v <= --speed) and fast free motion, their number and the world model's one-step
error on them: each elite's mean prediction of the next position along that axis from the real
state and action, against the real one, averaged over the elites (mean and 90th percentile over
up to --samples transitions of each kind). A model that has learnt the walls has errors on
impacts about as small as on free motion; one that lets the point through has an error near
v * dt (about 0.05 at top speed), the distance it would have gone without the wall.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from leq_utils import cli  # noqa: E402
from leq_utils import tasks  # noqa: E402
import world_model  # noqa: E402


@dataclasses.dataclass
class Args(tasks.TaskArgs):
    world_model: str = ""
    """world_model.npz of the task (required)"""
    speed: float = 4.5
    """speed along an axis above which an impact or a free move counts as fast (the point's top speed is about 5.2)"""
    samples: int = 2000
    """at most this many transitions of each kind are predicted (drawn with --seed)"""


def transitions_by_kind(ds: tasks.Dataset, dt: float, speed: float) -> dict:
    """{kind: (indices, axes)}: each transition once per axis along which it is of that kind."""
    kinds = {"fast impacts": [], "slower impacts": [], "fast free motion": []}
    for axis in (0, 1):
        v = np.abs(ds.observations[:, 2 + axis])
        d = (ds.next_observations[:, axis] - ds.observations[:, axis]) * np.sign(ds.observations[:, 2 + axis])
        impact, free = d < 0.5 * v * dt, d > 0.8 * v * dt
        for kind, mask in (("fast impacts", impact & (v > speed)), ("slower impacts", impact & (v > 2) & (v <= speed)),
                           ("fast free motion", free & (v > speed))):
            kinds[kind].append(np.stack([np.flatnonzero(mask), np.full(mask.sum(), axis)], 1))
    return {k: np.concatenate(v) for k, v in kinds.items()}


def one_step_errors(wm: world_model.WorldModel, ds: tasks.Dataset, done_fn, idx, axes) -> np.ndarray:
    """|elite's mean next position - real next position| along each transition's axis, averaged over elites."""
    s, a = jnp.asarray(ds.observations[idx]), jnp.asarray(ds.actions[idx])
    no_noise = jnp.zeros((len(idx), ds.observations.shape[1] + 1))
    errors = []
    for e in range(len(world_model.members(wm.params))):
        pred = np.asarray(world_model.model_step_given(wm, s, a, jnp.full(len(idx), e), no_noise, done_fn)[0])
        errors.append(np.abs(pred[np.arange(len(idx)), axes] - ds.next_observations[idx, axes]))
    return np.mean(errors, 0)


def main(a: Args):
    task = tasks.get_task(a.env)
    if not (task.source == "builtin" and task.family == "pointmaze"):
        raise tasks.InputError(f"wall_impact_check.py is for the built-in PointMazes, not {task.name}")
    if not a.world_model:
        raise tasks.InputError("pass the world model to check with --world-model")
    wm = world_model.load_world_model(a.world_model, task)
    ds = tasks.load_dataset(task, a.dataset_path, a.data_dir)
    dt = tasks.make_env(task).unwrapped.point_env.dt
    rng = np.random.default_rng(a.seed)
    print(f"{task.name}, {len(ds.observations):,} transitions of {ds.path}, dt {dt}; one-step error along the "
          f"axis, mean over the elites of {a.world_model}")
    done_fn = tasks.termination_fn(task)
    for kind, rows in transitions_by_kind(ds, dt, a.speed).items():
        if len(rows) == 0:
            print(f"{kind:>16}: none in the data")
            continue
        picked = rows[rng.permutation(len(rows))[:a.samples]]
        err = one_step_errors(wm, ds, done_fn, picked[:, 0], picked[:, 1])
        print(f"{kind:>16}: {len(rows):>7,} in the data ({len(picked):,} predicted): mean error "
              f"{err.mean():.4f}, 90th percentile {np.quantile(err, 0.9):.4f}")


if __name__ == "__main__":
    cli.run_script(main, Args)
