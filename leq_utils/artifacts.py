"""Artifacts: every file a stage writes is a plain `.npz` (no pickle), written atomically.

  * parameter trees <-> flat arrays named like `actor/params/Dense_0/kernel`   -> flatten / unflatten
  * atomic writes with metadata (env, dims, config, format version, content
    fingerprint, the fingerprints of what it was made from), umask modes      -> save_npz, atomic_write
  * validated loads: format version, kind, env and dims, pickles, non-finite
    values, shapes; one-line errors                                            -> load_artifact, check_shapes
  * fingerprints: sha256 of a dataset file's bytes, of an artifact's arrays    -> file_fingerprint, provenance
  * whole training states as numbered leaves, for checkpoints                 -> tree_arrays / tree_from_arrays
  * a checkpoint is resumed only by the configuration and inputs that wrote it -> check_same_config, check_inputs
  * run folders: a lock, numbered checkpoints (falling back past a broken one),
    ring buffers in them, a crash-safe metrics log, the NaN guard            -> FolderLock, newest_checkpoint,
                                                                                  rows_arrays, MetricsLog, check_finite
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from leq_utils.common import InputError, Task, check_folder_path, check_input_file, warn

FORMAT_VERSION = 1  # of every .npz artifact this project writes (fingerprints are optional metadata)


class CorruptArtifact(InputError):
    """A file that exists but does not load (truncated, not an .npz, pickled, non-finite, cut short)."""


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


# ============================================================================================
# Atomic writes
# ============================================================================================

def umask() -> int:
    """The process's umask (read from /proc on Linux; setting and restoring it elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write(path, write: Callable) -> None:
    """Call write(binary file) on a temp file in the same folder, fsync it and rename it over
    `path`: a kill mid-write leaves the previous file intact. The file gets the mode a plain
    open() would give (0666 minus the umask), not mkstemp's 0600. A failed write names `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, e.filename or str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    for orphan in path.parent.glob(glob.escape(path.name) + "*.tmp"):  # left by writes killed before renaming
        orphan.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


# ============================================================================================
# .npz artifacts and fingerprints
# ============================================================================================

def arrays_fingerprint(arrays: dict) -> str:
    """sha256 of an artifact's content: every non-meta array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for k in sorted(k for k in arrays if not k.startswith("meta/")):
        x = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{x.dtype.str}|{x.shape}|".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def save_npz(path, arrays: dict, kind: str, task: Task, config, inputs: Optional[dict] = None,
             fingerprint: Optional[str] = None) -> None:
    """Write arrays plus metadata to `path` atomically. The metadata holds the content's
    fingerprint (`meta/fingerprint`; `fingerprint` keeps an earlier version's, for an addition
    that leaves what later stages were made from unchanged) and those of the inputs it was made
    from (`meta/inputs`: dataset, world model, pretrain), so later stages and resumes can check
    they match."""
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    meta = {"meta/format_version": np.array(FORMAT_VERSION), "meta/kind": np.array(kind),
            "meta/env": np.array(task.name), "meta/obs_dim": np.array(task.obs_dim),
            "meta/act_dim": np.array(task.act_dim),
            "meta/config": np.array(json.dumps(config, default=str, sort_keys=True)),
            "meta/fingerprint": np.array(fingerprint or arrays_fingerprint(arrays)),
            "meta/inputs": np.array(json.dumps(inputs or {}, sort_keys=True))}
    atomic_write(path, lambda f: np.savez(f, **arrays, **meta))


def read_npz(path) -> dict:
    """All arrays of an .npz without pickle; a pickled entry or a broken file is CorruptArtifact."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {}
            for k in f.files:
                try:
                    arrays[k] = f[k]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise CorruptArtifact(f"artifact {path}: entry '{k}' is a pickled object, refused for safety "
                                          f"(this project never writes pickles); re-create the file with the "
                                          f"stage that makes it") from None
            return arrays
    except CorruptArtifact:
        raise
    except IsADirectoryError:
        raise InputError(f"artifact {path} is a folder, not a file") from None
    except Exception as e:
        raise CorruptArtifact(f"artifact {path} is not a readable .npz file (truncated or corrupt?): "
                              f"{type(e).__name__}") from None


META_TYPES = {"meta/format_version": "i", "meta/kind": "U", "meta/env": "U", "meta/obs_dim": "i",
              "meta/act_dim": "i", "meta/config": "U"}  # what every artifact's metadata holds: one value each


def check_metadata(path, arrays: dict, keys) -> None:
    """Every metadata entry there and one value of its type (integer, text; meta/config JSON), in
    one line: a damaged or foreign file used to give a traceback (a format version of 1.5, no kind)."""
    for k in keys:
        x, kind = arrays.get(k), META_TYPES[k]
        if x is None or x.ndim != 0 or x.dtype.kind != kind and not (kind == "i" and x.dtype.kind == "u"):
            what = "missing" if x is None else f"{x.dtype} of shape {x.shape}, not {'an integer' if kind == 'i' else 'text'}"
            raise InputError(f"artifact {path} has broken metadata ('{k}' is {what}): not written by this project, "
                             f"or damaged; re-create it")
    for k in ("meta/config", "meta/inputs"):
        try:
            if k in arrays and not isinstance(json.loads(str(arrays[k])), dict if k == "meta/config" else (dict, type(None))):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise InputError(f"artifact {path} has broken metadata ('{k}' is not a JSON object: {e}); re-create it") from None


def load_artifact(path, task: Optional[Task] = None, kinds: tuple = (), need: str = "") -> dict:
    """Load an artifact, checking format version, kind, env and dims, and that every parameter
    array is finite; one-line errors. meta/config and meta/inputs come back as dicts."""
    path = Path(path)
    check_input_file(path, "artifact")
    arrays = read_npz(path)
    if "meta/format_version" not in arrays:
        raise InputError(f"artifact {path} has no metadata: not written by this project")
    check_metadata(path, arrays, ("meta/format_version",))
    if int(arrays["meta/format_version"]) != FORMAT_VERSION:
        raise InputError(f"artifact {path} has format version {int(arrays['meta/format_version'])}, "
                         f"this code reads version {FORMAT_VERSION}; re-run the stage that made it")
    check_metadata(path, arrays, META_TYPES)
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
    for k, x in arrays.items():  # buffer rows are data (imagined states), not parameters
        if x.dtype.kind == "f" and not k.startswith(("meta/", "buffer/")) and not np.isfinite(x).all():
            raise CorruptArtifact(f"artifact {path} has non-finite values in '{k}' ({int((~np.isfinite(x)).sum())} "
                                  f"of {x.size}): refused; re-create it (or resume from an earlier checkpoint)")
        big = int((np.abs(x) > np.finfo(np.float32).max).sum()) if x.dtype.kind == "f" and not k.startswith("meta/") else 0
        if big:
            raise CorruptArtifact(f"artifact {path} has values beyond float32's range in '{k}' ({big} of {x.size}; "
                                  f"the stages compute in float32): refused; re-create it")
        if k.endswith(("model/input_std", "stats/std")) and (x <= 0).any():  # input scales: the stages divide by them
            # (constant inputs get 1)
            raise CorruptArtifact(f"artifact {path} has standard deviations <= 0 in '{k}' ({int((x <= 0).sum())} of "
                                  f"{x.size}; the stages divide by them): refused; re-create it")
    arrays["meta/config"] = json.loads(str(arrays["meta/config"]))
    arrays["meta/inputs"] = json.loads(str(arrays["meta/inputs"])) if "meta/inputs" in arrays else None
    return arrays


def recorded_config(path) -> dict:
    """The configuration an artifact was written with (reads only its meta/config entry)."""
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["meta/config"])) if "meta/config" in f.files else {}


def provenance(path) -> tuple:
    """({"sha256", "path"} of the artifact at `path`, the inputs it records or None), reading only
    its metadata; an artifact from before fingerprints gets its fingerprint computed here."""
    with np.load(path, allow_pickle=False) as f:
        if "meta/fingerprint" in f.files:
            sha, inputs = str(f["meta/fingerprint"]), json.loads(str(f["meta/inputs"]))
        else:
            sha, inputs = arrays_fingerprint({k: f[k] for k in f.files if not k.startswith("meta/")}), None
    return {"sha256": sha, "path": os.path.realpath(path)}, inputs


_FILE_FINGERPRINTS: list = []  # this process's, so a file is hashed at most once per process


def file_fingerprint(path, known=()) -> dict:
    """{"sha256", "path", "size", "mtime_ns", "ctime_ns", "inode"} of a file's bytes. A record in
    `known` (read from an artifact's metadata) or from earlier in this process whose real path,
    size, times and inode all equal the file's is reused instead of hashing it again (a changed
    file gets a new ctime, which nothing can set back). Relative and absolute paths of one file
    give the same record."""
    st = os.stat(path)
    key = dict(path=os.path.realpath(path), size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
               inode=st.st_ino)
    for record in [*_FILE_FINGERPRINTS, *known]:
        if record and all(record.get(k) == v for k, v in key.items()):
            return dict(record)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    record = {"sha256": h.hexdigest(), **key}
    _FILE_FINGERPRINTS.append(record)
    return dict(record)


def check_inputs(path, recorded: Optional[dict], current: dict, remedy: str) -> None:
    """Refuse, in one line, an input whose content differs from the one `path` records having
    been made from (recorded, current: {"dataset" | "world_model" | "pretrain": fingerprint}).
    recorded None: `path` was written before fingerprints, and nothing can be checked (a warning)."""
    if recorded is None:
        warn(f"{path} predates fingerprints: it cannot be checked against its inputs (re-create it to have them checked)")
    for name, now in current.items():
        then = (recorded or {}).get(name)
        if then and now and then["sha256"] != now["sha256"]:
            now_is = ("that file is now" if then["path"] == now["path"] else f"this run's {now['path']} is")
            raise InputError(f"{path} was made from the {name.replace('_', ' ')} {then['path']} (sha256 "
                             f"{then['sha256'][:12]}), but {now_is} {now['sha256'][:12]}: {remedy}")


def config_diff(saved: dict, args, ignore=()) -> str:
    """The settings in which `args` differ from a recorded config, as "k <then> there, <now> now; ...",
    or "" (paths of inputs are not compared: their fingerprints are, by check_inputs). A setting the
    recorded config lacks (a flag added since) counts as its default: new flags default to the old behaviour."""
    now = json.loads(json.dumps(dataclasses.asdict(args), default=str, sort_keys=True))
    added = {f.name: f.default for f in dataclasses.fields(args) if f.name not in saved and f.default is not dataclasses.MISSING}
    saved = {**json.loads(json.dumps(added, default=str)), **saved}
    ignore = (*ignore, "dataset_path", "data_dir", "world_model", "pretrain")
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    shown = "; ".join(f"{k} {json.dumps(saved.get(k))} there, {json.dumps(now.get(k))} now" for k in diff[:4])
    return shown + ("; ..." if len(diff) > 4 else "")


def check_same_config(path, saved: dict, args, ignore=()) -> None:
    """A checkpoint may only be resumed by the configuration that wrote it."""
    diff = config_diff(saved, args, ignore)
    if diff:
        raise InputError(f"{path} was written with other settings ({diff}); "
                         f"use the same flags (see its config), or delete it to start over")


# ============================================================================================
# A stage's output file: never replaced silently
# ============================================================================================

KEEP = "it is kept: pass --overwrite to replace it, or another --out to keep both"


def check_output_file(out: Path, kind: str) -> None:
    """A stage's output is a file: a folder at its path is refused at once, in one line (before
    any work; it used to fail only when the trained artifact was written)."""
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: give the file to write, e.g. {out / (kind + '.npz')}")


def existing_output(out: Path, what: str, task: Task, kind: str, args, ignore=()) -> Optional[dict]:
    """What is at a stage's output path (world_model.py, pretrain.py), looked at before any work:
    None when nothing is there, or when args.overwrite asks to replace it; else the artifact there,
    made with the same settings (the stage then compares its inputs: `finished_output`). A file
    there that is not such an artifact, or one made with other settings, is refused in one line
    that names it and --overwrite: an artifact is never replaced silently (a LEQ run made
    from it could not resume). ignore: settings that do not change the artifact (as --resume)."""
    if not out.exists() or args.overwrite:
        return None
    try:
        f = load_artifact(out, task, kinds=(kind,))
    except InputError as e:
        raise InputError(f"{what} {out} already exists and does not load as one ({e}); {KEEP}") from None
    diff = config_diff(f["meta/config"], args, (*ignore, "out", "overwrite"))
    if diff:
        raise InputError(f"{what} {out} already exists, made with other settings ({diff}); {KEEP}")
    return f


def finished_output(out: Path, what: str, f: dict, inputs: dict) -> bool:
    """The artifact `f` at `out` (from existing_output: same settings) made from `inputs` too
    ({"dataset" | "world_model": fingerprint}) is what this run would write again: say so in one
    line, and return True (nothing to do). Made from other inputs: refused in one line."""
    recorded = f["meta/inputs"] or {}
    for name, now in inputs.items():
        then = recorded.get(name) or {}
        if not then:  # written before fingerprints: what it was made from is unknown
            raise InputError(f"{what} {out} already exists, made with these settings, but it records no fingerprint "
                             f"of its {name.replace('_', ' ')} (it predates them); {KEEP}")
        if then["sha256"] != now["sha256"]:
            raise InputError(f"{what} {out} already exists, made with these settings from another "
                             f"{name.replace('_', ' ')} (sha256 {then['sha256'][:12]}, this run's {now['path']} is "
                             f"{now['sha256'][:12]}); {KEEP}")
    print(f"[{f['meta/kind']}] {out} already holds this {what} (same settings and inputs); nothing to do "
          f"(pass --overwrite to train it again)")
    return True


def check_shapes(tree, template, path, prefix: str) -> None:
    """One line for the first array of `tree` whose presence or shape differs from `template`'s
    (a tree of arrays or ShapeDtypeStructs, e.g. from jax.eval_shape of the initialiser)."""
    def shapes(node, name):
        if not isinstance(node, dict):
            return {name: tuple(getattr(node, "shape", np.shape(node)))}
        return {k: v for key, child in node.items() for k, v in shapes(child, f"{name}/{key}").items()}
    have, want = shapes(tree, prefix), shapes(template, prefix)
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise CorruptArtifact(f"artifact {path}: '{name}' has shape {have.get(name, 'none (missing)')}, but the "
                                  f"network it describes needs {want.get(name, 'none (an extra entry)')}")


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
            raise CorruptArtifact(f"checkpoint does not match this configuration at {prefix}/{i:04d} "
                                  f"(shape {None if x is None else x.shape} vs {np.shape(leaf)})")
        new.append(jnp.asarray(x, dtype=jnp.asarray(leaf).dtype))
    return jax.tree.unflatten(treedef, new)


# ============================================================================================
# Run folders: a lock, numbered checkpoints (the last few kept), the metrics log
# ============================================================================================

class FolderLock:
    """`with FolderLock(lock_file, what):` -- only one process at a time writes what the lock
    guards. The lock is fcntl.flock on `lock_file` (which holds the holder's pid, host and
    start time, for the message): the kernel drops it when its process ends in any way, SIGKILL
    included, so a lock file left behind is stale by construction and is simply taken over;
    an O_EXCL lock file would need a guess (is that pid still alive, on that host?) and a
    take-over that races with other processes. Creating the file also proves the folder is
    writable, before any work."""

    def __init__(self, lock_file, what: str):
        self.path, self.what, self.fd = Path(lock_file), what, None

    def __enter__(self):
        check_folder_path(self.path.parent, self.what)
        self.created = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise InputError(f"{self.what} is in use by {holder} (lock file {self.path}); wait for it to "
                                 f"end, or write somewhere else") from None
            try:  # the holder may have removed the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = os.read(fd, 4096).decode(errors="replace").strip()
        if stale:
            print(f"[lock] {self.path} was left by {stale}, which has ended; taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                      .encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)  # while still holding it (see the inode check above)
        os.close(self.fd)
        for folder in self.created:  # a run refused before writing anything leaves no empty folders
            try:
                folder.rmdir()
            except OSError:
                break


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:08d}.npz"


def save_checkpoint(run_dir: Path, step: int, arrays: dict, kind: str, task: Task, config, keep: int = 2,
                    inputs: Optional[dict] = None) -> Path:
    """Write <run_dir>/checkpoint_<step>.npz atomically and keep only the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    save_npz(path, arrays, kind, task, config, inputs)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink()
    for orphan in Path(run_dir).glob("checkpoint_*.tmp"):  # temp files of writes killed before their rename
        orphan.unlink()
    return path


def read_checkpoint(path, task: Task, kind: str, args, ignore=()) -> dict:
    """A stage's single checkpoint file, read before any work: refused in one line if it does not
    load or was written with other settings."""
    try:
        f = load_artifact(path, task, kinds=(kind,))
    except CorruptArtifact as e:
        raise InputError(f"{e}; delete it to start over") from None
    check_same_config(f"checkpoint {path}", f["meta/config"], args, ignore)
    return f


def finished_run(artifact: Path, task: Task, args, ignore=(), checkpoint_dir: Optional[Path] = None) -> bool:
    """A run folder whose final artifact (written last) exists is finished: say so, and refuse
    other settings, instead of training again. A final artifact that does not load (truncated,
    corrupt) is moved aside to <name>.corrupt, with a warning, when a checkpoint is there to make it
    again from (the run resumes exactly: the same artifact); with none, one line says what to do."""
    if not artifact.exists():
        return False
    try:
        f = load_artifact(artifact, task)
    except CorruptArtifact as e:
        found = checkpoints(checkpoint_dir or artifact.parent)
        if not found:
            raise CorruptArtifact(f"{e}; the run folder has no checkpoint to make it again from: start over in "
                                  f"another --run-dir") from None
        bad = artifact.with_name(artifact.name + ".corrupt")
        os.replace(artifact, bad)
        warn(f"the finished run's {artifact.name} does not load ({e}); moved to {bad.name}; resuming from "
             f"{found[-1].name} to write it again")
        return False
    check_same_config(f"the finished run in {artifact.parent}", f["meta/config"], args, ignore)
    print(f"[{f['meta/kind']}] {artifact.parent} holds a finished run (final score "
          f"{float(f['summary/final_score']):.1f}); nothing to do (use another --run-dir to train again)")
    return True


def rows_arrays(buf, prefix: str = "buffer") -> dict:
    """A ring buffer (NamedTuple: row arrays, then ptr and filled) as arrays, its filled rows only."""
    filled = int(buf.filled)
    return {**{f"{prefix}/{k}": np.asarray(getattr(buf, k)[:filled]) for k in buf._fields[:-2]},
            f"{prefix}/ptr": np.asarray(buf.ptr), f"{prefix}/filled": np.asarray(buf.filled)}


def check_rows(empty, f: dict, path, prefix: str = "buffer") -> None:
    """The saved rows of `rows_arrays` fit the empty buffer of this configuration (CorruptArtifact if not)."""
    filled, ptr, capacity = int(f[f"{prefix}/filled"]), int(f[f"{prefix}/ptr"]), empty[0].shape[0]
    for k in empty._fields[:-2]:
        shape = f[f"{prefix}/{k}"].shape
        if shape != (filled, *getattr(empty, k).shape[1:]) or filled > capacity or not 0 <= ptr < max(capacity, 1):
            raise CorruptArtifact(f"checkpoint {path}: {prefix}/{k} has shape {shape}, but {prefix}/filled says "
                                  f"{filled} rows (of {capacity}, next at {ptr})")


def rows_from_arrays(empty, f: dict, prefix: str = "buffer"):
    """Inverse of `rows_arrays`, into the empty buffer (checked by check_rows)."""
    filled = int(f[f"{prefix}/filled"])
    rows = [getattr(empty, k).at[:filled].set(f[f"{prefix}/{k}"]) for k in empty._fields[:-2]]
    return type(empty)(*rows, jnp.asarray(f[f"{prefix}/ptr"]), jnp.asarray(f[f"{prefix}/filled"]))


def checkpoints(run_dir) -> list:
    """The run folder's checkpoints, oldest first."""
    return sorted(Path(run_dir).glob("checkpoint_*.npz"))


def newest_checkpoint(run_dir, load: Callable):
    """(path, load(path)) for the newest checkpoint that loads, or None when there is none. A
    newer one that does not load (CorruptArtifact) is skipped, saying so; other refusals (other
    settings) stop at once; when none loads, one line lists why."""
    problems = []
    for path in reversed(checkpoints(run_dir)):
        try:
            loaded = load(path)
        except CorruptArtifact as e:
            problems.append(f"{path.name}: {e}")
            continue
        if problems:
            print(f"[resume] skipping a checkpoint that does not load ({problems[0]}); resuming from {path.name}")
        return path, loaded
    if problems:
        raise InputError(f"no checkpoint in {run_dir} loads ({'; '.join(problems)}); delete them to start over")
    return None


def read_metrics(path) -> list:
    """The rows of a metrics.jsonl; lines that are not JSON objects with a step (a row cut off
    by a crash or a full disk) are dropped with a warning."""
    path = Path(path)
    check_input_file(path, "metrics file")
    rows, bad = [], []
    for i, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").split("\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
            else:
                bad.append(i)
    if bad:
        warn(f"{path}: line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))} cut off or not a "
             f"metrics row (a crash or a full disk mid-write?); dropped")
    return rows


def wandb_run(run_dir: Path, args):
    """A Weights & Biases run (resumed under the run folder's name) when args.track, else None."""
    if not args.track:
        return None
    try:
        import wandb
    except ImportError:
        raise InputError("--track needs Weights & Biases: pip install wandb") from None
    return wandb.init(project=args.wandb_project, name=run_dir.name, config=dataclasses.asdict(args),
                      resume="allow", id=run_dir.name)


class MetricsLog:
    """<run_dir>/metrics.jsonl, one JSON row per line (and the same rows to W&B when tracked). On
    a resume the rows after the checkpoint's step, and any torn line, are dropped, rewriting the
    file atomically (a kill during the rewrite leaves the old file)."""

    def __init__(self, run_dir: Path, resume_step: int, tracker=None):
        self.path, self.tracker = Path(run_dir) / "metrics.jsonl", tracker  # tracker: a W&B run
        if self.path.exists():
            text = self.path.read_bytes()
            rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            new = "".join(json.dumps(r) + "\n" for r in rows).encode()
            if new != text:
                atomic_write(self.path, lambda f: f.write(new))

    def log(self, row: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self.tracker:
            self.tracker.log(row, step=row["step"])


def check_finite(first_bad: dict, n: int, step0: int, state_finite: bool, last_good, unit: str = "step") -> None:
    """The NaN guard: raise FloatingPointError naming the first non-finite quantity and the first
    step (1-based, after step0) where it appeared. first_bad: {quantity: index of its first
    non-finite step among the chunk's n, n if none}; last_good: the checkpoint a resume would use."""
    bad = {k: int(i) for k, i in first_bad.items() if int(i) < n}
    if not bad and state_finite:
        return
    if bad:
        first = min(bad.values())
        names = [k for k, i in bad.items() if i == first]
        what = f"{names[0]} first at {unit} {step0 + first + 1}" + (
            f" (with {', '.join(names[1:3])}{' and more' if len(names) > 3 else ''})" if names[1:] else "")
    else:
        what = f"parameters after {unit} {step0} (every logged quantity was finite)"
    good = (f"the last good checkpoint, {last_good}, is kept" if last_good and Path(last_good).exists()
            else "no checkpoint was written before it")
    raise FloatingPointError(f"non-finite {what}; stopped; {good}")


# ============================================================================================
# LEQ run checkpoints: the training state (LEQState), the expansion buffer, the input statistics
# ============================================================================================

def leq_checkpoint_arrays(st, buf, stats, prefix: str = "") -> dict:
    """One seed's training state (the filled part of its buffer) as named arrays."""
    return {**tree_arrays(jax.device_get(st), prefix + "state"),
            **flatten(jax.device_get(st.actor), prefix + "actor"), **rows_arrays(buf, prefix + "buffer"),
            prefix + "stats/mean": np.asarray(stats[0]), prefix + "stats/std": np.asarray(stats[1])}


def save_leq_checkpoint(run_dir: Path, task, args, st, buf, step: int, stats, inputs=None):
    """The whole training state, atomically; keeps the last two."""
    arrays = {**leq_checkpoint_arrays(st, buf, stats), "progress/step": np.array(step)}
    return save_checkpoint(run_dir, step, arrays, "leq_checkpoint", task, args, inputs=inputs)


LEQ_RESUME_IGNORES = ("run_dir", "track", "inject_nan_at",  # settings a resume may change (inject_nan_at: a removed flag)
           "world_model_settings", "pretrain_settings")  # the upstream settings act before LEQ


def read_leq_checkpoint(path: Path, task, args, empty, prefixes=("",)) -> dict:
    """A checkpoint's arrays, checked before any work: its settings, and buffers that fit them
    (prefixes: the seeds' names in a --num-seeds checkpoint)."""
    f = load_artifact(path, task, kinds=("leq_checkpoint",))
    check_same_config(f"checkpoint {path}", f["meta/config"], args, ignore=LEQ_RESUME_IGNORES)
    for prefix in prefixes:
        check_rows(empty, f, path, prefix + "buffer")
    return f


def load_leq_checkpoint(f: dict, template, empty, prefix: str = ""):
    """(state, buffer, step) from the arrays of read_checkpoint."""
    return (tree_from_arrays(template, f, prefix + "state"), rows_from_arrays(empty, f, prefix + "buffer"),
            int(f["progress/step"]))
