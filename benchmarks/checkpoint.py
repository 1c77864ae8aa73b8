"""Size and write/read time of a LEQ checkpoint at the paper's sizes (issue: runs that survive).

    python benchmarks/checkpoint.py

AntMaze dims, actor/critic 3 x 256, a full expansion buffer (5 x 50000 x 5 = 1.25M rows, the
worst case: leq.py stores only the filled part). Prints JSON: file size, median write time
(atomic: temp file + rename), load time (= the resume overhead before the first step), and the
write time as a fraction of a 5000-step checkpoint interval at the measured step speed.
"""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from leq_utils import artifacts  # noqa: E402
import leq  # noqa: E402
from leq_step import build  # noqa: E402  (benchmarks/leq_step.py: random LEQ state at paper sizes)

STEP_MS = 88.0  # measured by benchmarks/leq_step.py on this 2-core CPU (adjoint, median)


def main():
    task, args, data, wm, nets, st, done_fn, *_ = build("adjoint", 1000)
    capacity = args.expand_retain * args.expand_size * args.expand_length
    rng = np.random.default_rng(0)
    buf = leq.empty_buffer(capacity, task.obs_dim, task.act_dim)
    full = leq.buffer_add(buf, *(jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
                                 for x in buf[:5]))
    stats = (np.zeros(task.obs_dim + task.act_dim), np.ones(task.obs_dim + task.act_dim))
    out = {"buffer_rows": int(full.filled)}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        writes, loads = [], []
        for i in range(3):
            t = time.perf_counter()
            path = artifacts.save_leq_checkpoint(run_dir, task, args, st, full, 5000 * (i + 1), stats)
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded = artifacts.load_leq_checkpoint(artifacts.read_leq_checkpoint(path, task, args, buf), st, buf)
            jax.block_until_ready(loaded[1].observations)
            loads.append(time.perf_counter() - t)
        out["size_mb"] = path.stat().st_size / 1e6
        out["files_kept"] = len(list(run_dir.glob("checkpoint_*.npz")))
    out["write_s"], out["load_s"] = statistics.median(writes), statistics.median(loads)
    out["write_fraction_of_5000_steps"] = out["write_s"] / (5000 * STEP_MS / 1000)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    import tyro
    tyro.cli(main, description=__doc__)  # no flags; --help prints the docstring
