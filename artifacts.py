"""Artifacts: every file a stage writes is a plain `.npz` (no pickle), written atomically.

  * parameter trees <-> flat arrays named like `actor/params/Dense_0/kernel`   -> flatten / unflatten
  * atomic writes with metadata (env, dims, config, format version)          -> save_npz
  * validated loads: format version, kind, env and dims, one-line errors      -> load_artifact
  * whole training states as numbered leaves, for checkpoints                 -> tree_arrays / tree_from_arrays
  * a checkpoint is resumed only by the configuration that wrote it           -> check_same_config
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tasks import InputError, Task

FORMAT_VERSION = 1  # of every .npz artifact this project writes


def flatten(tree, prefix: str) -> dict:
    """{'a': {'b': x}} -> {'prefix/a/b': np.asarray(x)}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        out.update(flatten(value, name) if isinstance(value, dict) else {name: np.asarray(value)})
    return out


def unflatten(flat: dict, prefix: str) -> dict:
    """Inverse of `flatten` for the entries under `prefix/`."""
    tree = {}
    for name, value in flat.items():
        if name.startswith(prefix + "/"):
            *path, leaf = name[len(prefix) + 1:].split("/")
            node = tree
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = value
    return tree


def save_npz(path, arrays: dict, kind: str, task: Task, config) -> None:
    """Write arrays plus metadata to `path` atomically (temp file in the same folder, fsync,
    rename): a kill mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    meta = {"meta/format_version": np.array(FORMAT_VERSION), "meta/kind": np.array(kind),
            "meta/env": np.array(task.name), "meta/obs_dim": np.array(task.obs_dim),
            "meta/act_dim": np.array(task.act_dim),
            "meta/config": np.array(json.dumps(config, default=str, sort_keys=True))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for orphan in path.parent.glob(glob.escape(path.name) + "*.tmp"):  # left by writes killed before renaming
        orphan.unlink(missing_ok=True)


def load_artifact(path, task: Optional[Task] = None, kinds: tuple = (), need: str = "") -> dict:
    """Load an artifact, checking format version, kind, env and dims; one-line errors."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"artifact {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise InputError(f"artifact {path} is not a readable .npz file (truncated or corrupt?): "
                         f"{type(e).__name__}") from None
    if "meta/format_version" not in arrays:
        raise InputError(f"artifact {path} has no metadata: not written by this project")
    if int(arrays["meta/format_version"]) != FORMAT_VERSION:
        raise InputError(f"artifact {path} has format version {int(arrays['meta/format_version'])}, "
                         f"this code reads version {FORMAT_VERSION}; re-run the stage that made it")
    kind = str(arrays["meta/kind"])
    if kinds and kind not in kinds:
        raise InputError(f"artifact {path} is a '{kind}' artifact; expected one of {list(kinds)}")
    if need and not any(k.startswith(need + "/") for k in arrays):
        raise InputError(f"artifact {path} ('{kind}') has no {need} parameters")
    if task is not None:
        env, dims = str(arrays["meta/env"]), (int(arrays["meta/obs_dim"]), int(arrays["meta/act_dim"]))
        if env != task.name:
            raise InputError(f"artifact {path} was made for env '{env}', not '{task.name}'")
        if dims != (task.obs_dim, task.act_dim):
            raise InputError(f"artifact {path} has obs/action dims {dims}, but {task.name} "
                             f"needs {(task.obs_dim, task.act_dim)}")
    arrays["meta/config"] = json.loads(str(arrays["meta/config"]))
    return arrays


def recorded_config(path) -> dict:
    """The configuration an artifact was written with (reads only its meta/config entry)."""
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["meta/config"])) if "meta/config" in f.files else {}


def tree_arrays(tree, prefix: str) -> dict:
    """Any pytree (optimiser states, training states) as numbered leaves: {prefix/0000: leaf}."""
    return {f"{prefix}/{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def tree_from_arrays(template, arrays: dict, prefix: str):
    """Inverse of `tree_arrays`, with `template` giving the structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(template)
    new = []
    for i, leaf in enumerate(leaves):
        x = arrays.get(f"{prefix}/{i:04d}")
        if x is None or x.shape != np.shape(leaf):
            raise InputError(f"checkpoint does not match this configuration at {prefix}/{i:04d} "
                             f"(shape {None if x is None else x.shape} vs {np.shape(leaf)})")
        new.append(jnp.asarray(x, dtype=jnp.asarray(leaf).dtype))
    return jax.tree.unflatten(treedef, new)


def check_same_config(path, saved: dict, args, ignore=()) -> None:
    """A checkpoint may only be resumed by the configuration that wrote it."""
    now = json.loads(json.dumps(dataclasses.asdict(args), default=str, sort_keys=True))
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        raise InputError(f"checkpoint {path} was written with other settings ({', '.join(diff)}); "
                         f"use the same flags, or delete it to start over")


# ============================================================================================
# Run folders: numbered checkpoints (the last few kept) and the metrics log
# ============================================================================================

def save_checkpoint(run_dir: Path, step: int, arrays: dict, kind: str, task: Task, config, keep: int = 2) -> Path:
    """Write <run_dir>/checkpoint_<step>.npz atomically and keep only the newest `keep`."""
    path = Path(run_dir) / f"checkpoint_{step:08d}.npz"
    save_npz(path, arrays, kind, task, config)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink()
    for orphan in Path(run_dir).glob("checkpoint_*.tmp"):  # temp files of writes killed before their rename
        orphan.unlink()
    return path


def checkpoints(run_dir) -> list:
    """The run folder's checkpoints, oldest first."""
    return sorted(Path(run_dir).glob("checkpoint_*.npz"))


class MetricsLog:
    """<run_dir>/metrics.jsonl, one JSON row per line (and the same rows to W&B when tracked); on a resume, the rows written after the
    checkpoint's step are dropped so the file matches the training state again."""

    def __init__(self, run_dir: Path, resume_step: int, tracker=None):
        self.path, self.tracker = Path(run_dir) / "metrics.jsonl", tracker  # tracker: a W&B run
        if self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker:
            self.tracker.log(row, step=row["step"])
