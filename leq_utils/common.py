"""What every module of leq_utils shares: the user-error type, flag checks, the static facts of a
task, and the tasks' TRUE termination functions (docs/ALGORITHM.md, section 2). It imports no
other module of the project, so the data sources (mazes, d4rl_tasks, ogbench_tasks,
minari_tasks) and tasks.py, which dispatches to them, can all import it without a circle."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import sys
from pathlib import Path
from typing import Callable, Optional

import jax.numpy as jnp

class InputError(ValueError):
    """Bad input from the user (env name, file, flag). Scripts print it as one line and exit."""


def warn(message: str) -> None:
    """A one-line warning on stderr (something was accepted, but the user should know)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


SEED_LIMIT = 2 ** 32  # numpy's and JAX's seeds are 32-bit: JAX would wrap a larger one (2**32 runs as 0), numpy raise

RULES = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "in (0, 1)": lambda v: 0 < v < 1,
         "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1,
         "< 2**32": lambda v: v < SEED_LIMIT, "finite": math.isfinite}


def check_flags(args, *rules) -> None:
    """Refuse, in one line, the first flag out of its range. rules: (rule, "field field ..."), a
    rule being a key of RULES; a tuple-valued flag needs at least one value and checks each;
    None (a per-task default not yet filled) passes."""
    for rule, names in rules:
        for name in names.split():
            value = getattr(args, name)
            values = value if isinstance(value, tuple) else (value,)
            if value is not None and not (values and all(RULES[rule](v) for v in values)):
                raise InputError(f"--{name.replace('_', '-')} must be {rule}{' (each)' if isinstance(value, tuple) else ''}, "
                                 f"got {' '.join(map(str, values)) if isinstance(value, tuple) else value}")


def check_common(args) -> None:
    """The checks every script's flags get, before any work (called by tasks.check_task_args, which
    every stage calls, by evaluate.py, scripts/generate_dataset.py and scripts/train_ant_walker.py;
    one line each): no flag whose default is None (a path,
    an env) given as an empty string, which would otherwise count as not given and pick the
    default silently (an unset shell variable: --dataset-path "$DATA" would use the built-in
    data); every number finite (--actor-lr inf would otherwise compile and run a step before the
    loss turns non-finite; nested settings included, named as tyro names them); and a seed, where
    there is one, in [0, 2**32)."""
    def fields(obj, prefix=""):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if dataclasses.is_dataclass(value):
                yield from fields(value, f"{prefix}{field.name.replace('_', '-')}.")
            else:
                yield field, f"--{prefix}{field.name.replace('_', '-')}", value

    for field, flag, value in fields(args):
        if field.default is None and isinstance(value, str) and not value.strip():
            raise InputError(f"{flag} is empty (an unset shell variable?): give a value, "
                             f"or leave the flag out for its default")
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise InputError(f"{flag} must be a finite number, got {' '.join(map(str, numbers))}")
    if hasattr(args, "seed"):
        check_flags(args, (">= 0", "seed"), ("< 2**32", "seed"))


def check_input_file(path, what: str) -> None:
    """An input file must be a regular file: one line for each other thing at the path (a FIFO or
    /dev/zero used to be reported as "does not exist")."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except OSError as e:  # a symlink loop, a path through a file, no permission
        raise InputError(f"{what} {path} cannot be opened: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise InputError(f"{what} {path} is {kind}, not a file: give a file")


def check_folder_path(folder, what: str, advice: str = "") -> Path:
    """A folder to write in (a run folder, an artifact's folder): refuse in one line a path through
    a file, or through a symbolic link that leads nowhere (a loop was reported as "File exists").
    Returns the nearest part of the path that exists (the folder itself, or the one it goes in)."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.is_symlink() and not p.exists():
            raise InputError(f"{what}: {p} is a symbolic link that leads nowhere (a loop, or its target is missing); "
                             f"remove it or point it at a folder")
        if p.exists() or p == Path(p.anchor):
            if not p.is_dir():
                raise InputError(f"{what}: {p} is a file, not a folder{advice}")
            return p


def check_writable_folder(folder, what: str) -> None:
    """Before minutes of work whose result goes into `folder` (a dataset generated on first use):
    refuse in one line a folder that is a file, or sits under one, or cannot be written (it used
    to fail only when the finished file was written)."""
    existing = check_folder_path(folder, f"{what} {folder}", "; point it at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {folder}: {existing} is not writable; point it at a folder you can write")


def check_output_folder(out, advice: str = "") -> None:
    """Before the work whose result is the file `out` (a report, an evaluation): refuse in one
    line when its folder does not exist or cannot be written (not create it: a mistyped --out
    should not leave folders behind). advice ends the message, e.g. "; pass --out"."""
    folder = Path(out).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {out}: the folder {folder} "
                         f"{'is not writable' if folder.is_dir() else 'does not exist'}{advice}")


# ============================================================================================
# Task descriptions
# ============================================================================================

# AntMaze termination centres and radius used in imagination (docs/ALGORITHM.md, section 2).
ANTMAZE_CENTRES = {"umaze": (0.75, 8.75), "medium": (20.75, 20.75), "large": (32.75, 24.75),
                   "ultra": (52.75, 36.75)}
ANTMAZE_RADIUS = 0.25
ANTMAZE_LIMITS = {"umaze": 700, "medium": 1000, "large": 1000, "ultra": 2000}

LOCOMOTION_DIMS = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6)}
NAME_PATTERNS = [  # (name, source)
    (r"pointmaze-(umaze|medium|large|ultra)", "builtin"),
    (r"ant-(umaze|medium|large|ultra)-(diverse|play)", "builtin"),
    (r"antmaze-umaze(-diverse)?-v[0-2]", "d4rl"),
    (r"antmaze-(medium|large)-(play|diverse)-v[0-2]", "d4rl"),
    (r"antmaze-ultra-(play|diverse)-v0", "d4rl"),
    (r"(hopper|walker2d|halfcheetah)-(random|medium|expert|medium-replay|medium-expert|full-replay)-v[0-2]", "d4rl"),
    (r"(pointmaze|antmaze|humanoidmaze)-(medium|large|giant)-(navigate|stitch)-singletask(-task[1-5])?-v0", "ogbench"),
    (r"antmaze-(medium|large|giant)-explore-singletask(-task[1-5])?-v0", "ogbench"),
    (r"minari:.+", "minari"),
]
SUPPORTED = ("pointmaze-{umaze,medium,large,ultra}, ant-{umaze,medium,large,ultra}-{diverse,play}, antmaze-umaze[-diverse]-v2, "
             "antmaze-{medium,large}-{play,diverse}-v2, antmaze-ultra-{play,diverse}-v0, "
             "{hopper,walker2d,halfcheetah}-{random,medium,medium-replay,medium-expert,expert}-v2, "
             "OGBench {pointmaze,antmaze,humanoidmaze}-{medium,large,giant}-navigate-singletask[-task1..5]-v0 "
             "(also -stitch-, antmaze -explore-), minari:<dataset id>")
MAZE_FAMILIES = ("pointmaze", "antmaze", "humanoidmaze")


@dataclasses.dataclass(frozen=True)
class Task:
    """Static facts of a task (hashable, so jitted functions can close over it)."""
    name: str
    family: str              # pointmaze | antmaze | humanoidmaze | hopper | walker2d | halfcheetah
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    maze: str = ""           # umaze | medium | large | ultra | giant (maze families only)
    goal: tuple = ()         # termination centre (maze families only)
    goal_radius: float = 0.0
    source: str = "builtin"  # builtin | d4rl | ogbench | minari: the module data and envs come from
    goal_inclusive: bool = False  # the goal region is ||xy - goal|| <= radius (else < radius)

    @property
    def is_maze(self) -> bool:
        return self.family in MAZE_FAMILIES


# ============================================================================================
# True termination functions (JAX, batched over leading axes), evaluated on the next state
# ============================================================================================

def termination_fn(task: Task, goal: Optional[tuple] = None) -> Callable:
    """done(s, a, s') for a batch, as docs/ALGORITHM.md, section 2. `goal` overrides the maze centre.
    A non-finite s' (NaN or inf anywhere) is done in every family (deviation, docs/DEVIATIONS.md: the
    written rules of the mazes and of halfcheetah would call a NaN state "not done"; hopper's
    and walker2d's already end there, and the authors' release ends halfcheetah's too)."""
    rule = family_termination(task, goal)
    return lambda s, a, s2: rule(s, a, s2) | ~jnp.all(jnp.isfinite(s2), -1)


def family_termination(task: Task, goal: Optional[tuple] = None) -> Callable:
    """The task family's rule of docs/ALGORITHM.md, section 2, as written."""
    if task.is_maze:
        centre, radius = jnp.asarray(goal if goal is not None else task.goal), task.goal_radius
        inside = jnp.less_equal if task.goal_inclusive else jnp.less

        def done(s, a, s2):  # reached the goal region: ||xy' - centre|| < radius (OGBench, Minari: <=)
            return inside(jnp.linalg.norm(s2[..., :2] - centre, axis=-1), radius)
    elif task.family == "hopper":
        def done(s, a, s2):  # alive iff finite, |s'[1:]| < 100, height > 0.7, |angle| < 0.2
            alive = (jnp.all(jnp.isfinite(s2), -1) & jnp.all(jnp.abs(s2[..., 1:]) < 100, -1)
                     & (s2[..., 0] > 0.7) & (jnp.abs(s2[..., 1]) < 0.2))
            return ~alive
    elif task.family == "walker2d":
        def done(s, a, s2):  # alive iff |s'| < 100, 0.8 < height < 2, -1 < angle < 1
            alive = (jnp.all(jnp.abs(s2) < 100, -1) & (s2[..., 0] > 0.8) & (s2[..., 0] < 2.0)
                     & (s2[..., 1] > -1.0) & (s2[..., 1] < 1.0))
            return ~alive
    else:  # halfcheetah
        def done(s, a, s2):  # done iff any |s'| >= 100
            return jnp.any(jnp.abs(s2) >= 100, -1)
    return done
