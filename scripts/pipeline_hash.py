"""Hashes of every array a tiny seeded pipeline writes: the check that a refactor changed nothing.

    python scripts/pipeline_hash.py                   # default path: dataset, world model, BC/FQE, LEQ
    python scripts/pipeline_hash.py -- --critic-target 1step   # extra leq.py flags (an ablation)

Generates a small built-in pointmaze-umaze dataset, runs world_model.py, pretrain.py and leq.py on
it with every stage shrunk (but LEQ's horizon, lambda, tau and expansion as by default), each in a
subprocess as a user runs them, and prints one sha256 (first 16 hex digits) per array of each
artifact, per metrics row of leq.py (its wall-clock field left out) and of final_eval.json. Run it
before and after a change and diff the two outputs: a line that differs names what changed.
"""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORLD_MODEL = ["--hidden-dims", "32", "32", "--weight-decay", "2.5e-5", "5e-5", "1e-4", "--ensemble-size", "4",
               "--num-elites", "3", "--max-epochs", "3"]
PRETRAIN = ["--hidden-dims", "32", "32", "--bc-steps", "200", "--fqe-steps", "200", "--bc-batch-size", "64",
            "--chunk", "100"]
LEQ = ["--total-steps", "200", "--chunk", "50", "--eval-every", "100", "--eval-episodes", "2",
       "--final-eval-rounds", "1", "--expand-every", "100", "--expand-size", "128", "--batch-size", "64",
       "--model-batch-size", "64"]


def digest(a) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def npz_lines(name: str, path: Path):
    with np.load(path, allow_pickle=False) as f:
        for k in sorted(f.files):
            if not k.startswith("meta/") and k != "model/dataset_path":  # paths and configs differ per run
                yield f"{name} {k} {digest(f[k])}"


def run(args, cwd):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{args[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def main(extra_leq_flags):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        data = d / "umaze.hdf5"
        run([ROOT / "scripts" / "generate_dataset.py", "--env", "pointmaze-umaze", "--size", "6000", "--seed", "3",
             "--out", data, "--expert-episodes", "0"], d)
        common = ["--env", "pointmaze-umaze", "--dataset-path", data, "--seed", "0"]
        run([ROOT / "world_model.py", *common, "--out", d / "wm.npz", *WORLD_MODEL], d)
        run([ROOT / "pretrain.py", *common, "--world-model", d / "wm.npz", "--out", d / "pt.npz", *PRETRAIN], d)
        run([ROOT / "leq.py", *common, "--world-model", d / "wm.npz", "--pretrain", d / "pt.npz",
             "--run-dir", d / "leq", *LEQ, *extra_leq_flags], d)
        import h5py
        with h5py.File(data, "r") as f:
            lines = [f"dataset {k} {digest(f[k][()])}" for k in sorted(f.keys()) if isinstance(f[k], h5py.Dataset)]
        lines += [*npz_lines("world_model", d / "wm.npz"), *npz_lines("pretrain", d / "pt.npz"),
                  *npz_lines("leq", d / "leq" / "leq.npz")]
        for row in map(json.loads, (d / "leq" / "metrics.jsonl").read_text().splitlines()):
            row.pop("steps_per_s", None)
            lines.append(f"metrics step {row['step']} {digest(np.frombuffer(json.dumps(row, sort_keys=True).encode(), np.uint8))}")
        final = json.loads((d / "leq" / "final_eval.json").read_text())
        lines.append(f"final_eval {digest(np.frombuffer(json.dumps(final, sort_keys=True).encode(), np.uint8))}")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("leq_flags", nargs="*", help="extra leq.py flags, after a lone -- (e.g. -- --critic-target 1step)")
    main(parser.parse_args().leq_flags)
