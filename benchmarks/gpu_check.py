"""The Python half of benchmarks/gpu_check.sh (standard library only, so it runs even where jax
does not import):

    python benchmarks/gpu_check.py pipeline --mode gpu --work DIR --out pipeline.json
    python benchmarks/gpu_check.py summary --mode gpu --out OUT --parts parts.txt

`pipeline`: a real pipeline slice on the built-in pointmaze-umaze, every stage shrunk: the
dataset generator, world_model.py, pretrain.py and leq.py, each as its own command (as a user
runs them; leq.py would run the first three itself). It records the seconds of each stage (its
process start, JAX's start-up and compilations included), LEQ's steps/s (the chunks after the
first, which compiles) and the final evaluation's success and score, so that a broken GPU path
shows (a crash, a NaN, a success of 0 where the CPU mode reaches more), not only a fast one.
The JSON is rewritten after each stage: a stage stopped by gpu_check.sh's time limit leaves the
stages before it. The stages' own output goes to the console (gpu_check.sh's log).

`summary`: merges the parts' JSON files of OUT into OUT/summary.json and prints a table with
the issue's goals (docs/PERFORMANCE.md, "GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = "pointmaze-umaze"

# Every stage shrunk. gpu: the networks at their default sizes, a short run of each stage;
# cpu: the tests' tiny settings (tests/conftest.py), for a quick end-to-end check on 2 cores.
SLICES = {
    "gpu": {
        "dataset": ["--size", "50000"],
        "world_model": ["--max-epochs", "3"],
        "pretrain": ["--bc-steps", "2000", "--fqe-steps", "2000"],
        "leq": ["--total-steps", "5000", "--chunk", "1000", "--eval-every", "5000", "--checkpoint-every", "5000",
                "--expand-every", "5000", "--eval-episodes", "10", "--final-eval-rounds", "1"],
    },
    "cpu": {
        "dataset": ["--size", "4000"],
        "world_model": ["--hidden-dims", "16", "16", "--weight-decay", "2.5e-5", "5e-5", "1e-4",
                        "--ensemble-size", "3", "--num-elites", "2", "--max-epochs", "2"],
        "pretrain": ["--hidden-dims", "32", "32", "--bc-steps", "20", "--fqe-steps", "20", "--bc-batch-size", "64",
                     "--chunk", "10"],
        "leq": ["--total-steps", "150", "--chunk", "50", "--eval-every", "150", "--checkpoint-every", "150",
                "--expand-every", "150", "--expand-size", "64", "--batch-size", "32", "--model-batch-size", "32",
                "--horizon", "3", "--eval-episodes", "2", "--final-eval-rounds", "1"],
    },
}


def write_json(path, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pipeline(mode: str, work: Path, out: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    s = SLICES[mode]
    data, wm, pt, run_dir = work / "umaze.hdf5", work / "wm.npz", work / "pt.npz", work / "leq"
    common = ["--env", ENV, "--dataset-path", str(data)]
    stages = [
        ("dataset", [ROOT / "scripts" / "generate_dataset.py", "--env", ENV, "--expert-episodes", "0",
                     "--out", data, *s["dataset"]]),
        ("world_model", [ROOT / "world_model.py", *common, "--out", wm, *s["world_model"]]),
        ("pretrain", [ROOT / "pretrain.py", *common, "--world-model", wm, "--out", pt, *s["pretrain"]]),
        ("leq", [ROOT / "leq.py", *common, "--world-model", wm, "--pretrain", pt, "--run-dir", run_dir,
                 *s["leq"]]),
    ]
    result = {"env": ENV, "mode": mode, "stage_s": {}, "flags": {name: [str(x) for x in cmd[1:]]
                                                                for name, cmd in stages}}
    for name, cmd in stages:
        print(f"[pipeline] {name}: {' '.join(str(x) for x in cmd)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, *map(str, cmd)], cwd=work).returncode
        result["stage_s"][name] = round(time.perf_counter() - t, 2)
        if rc:
            result["failed"] = f"{name} exited with {rc}"
            write_json(out, result)
            print(f"[pipeline] {name} failed (exit code {rc})", flush=True)
            return 1
        write_json(out, result)
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    speeds = [r["steps_per_s"] for r in rows if "steps_per_s" in r]
    final = read_json(run_dir / "final_eval.json") or {}
    result.update(
        total_s=round(sum(result["stage_s"].values()), 2),
        leq_steps_per_s=statistics.median(speeds[1:] or speeds),  # the first chunk compiles
        leq_first_chunk_steps_per_s=speeds[0],
        final_success_pct=100.0 * final["success"], final_score=final["score"],
        final_episodes=final["episodes"])
    write_json(out, result)
    print(f"[pipeline] {json.dumps({k: v for k, v in result.items() if k != 'flags'})}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

# plain_vs_kept.json's (workload, variant) pairs the summary reports, with their table labels
PLAIN_VS_KEPT = {("leq", "all plain"): "LEQ step, both plain", ("leq", "kept -picked"): "LEQ step, every_member_then_pick",
                 ("epoch", "all plain"): "WM minibatch, vmap members"}
GOALS = {"step_ms": 1.0, "compile_s": 10.0, "t8_over_t1": 2.0, "epoch_s": 3.0}  # the issue's, on an H200


def read_parts(path: Path) -> dict:
    """gpu_check.sh's parts.txt: one line `name status seconds` per part."""
    parts = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, seconds = line.split()
            parts[name] = {"status": status, "wall_s": int(seconds)}
    return parts


def summary(mode: str, out: Path, parts_file: Path, devices_file: Path, budget_s: int, wall_s: int) -> int:
    parts = read_parts(parts_file)
    step = read_json(out / "leq_step.json") or {}
    epoch = read_json(out / "world_model_epoch.json") or {}
    seeds = read_json(out / "many_seeds.json") or {}
    pipe = read_json(out / "pipeline.json") or {}
    kept = read_json(out / "plain_vs_kept.json") or {}
    devices = read_json(devices_file) or {}
    adjoint = step.get("adjoint", {})
    rows = {int(str(r["n"]).split()[0]): r for r in seeds.get("rows", [])}  # "1 (plain)": N = 1, the default path
    rows = {n: {"ratio": 1.0, **r} for n, r in sorted(rows.items())}
    result = {
        "mode": mode, "wall_s": wall_s, "budget_s": budget_s, "parts": parts, "devices": devices,
        "leq_step": step, "world_model_epoch": epoch, "many_seeds": seeds, "pipeline": pipe, "plain_vs_kept": kept,
        "figures": {
            "step_ms": adjoint.get("step_ms"), "compile_s": adjoint.get("compile_s"),
            "actor_ms": adjoint.get("actor_ms"), "critic_ms": adjoint.get("critic_ms"),
            "expansion_s": adjoint.get("expansion_s"), "compiles_while_timed": adjoint.get("compiles_while_timed"),
            "epoch_s": epoch.get("epoch_s"), "epoch_transitions": epoch.get("transitions"),
            "seeds": {str(n): {"ms_per_step": r["ms_per_step"], "ratio": r["ratio"]} for n, r in rows.items()},
            "t8_over_t1": rows[8]["ratio"] if 8 in rows else None,
            "pipeline_stage_s": pipe.get("stage_s"), "leq_steps_per_s": pipe.get("leq_steps_per_s"),
            "final_success_pct": pipe.get("final_success_pct"),
            # median time of a plain form / the code as it is, in the same round (> 1: the kept form is faster)
            "plain_over_kept": {f"{part}: {name}": kept[part]["wall"][name]["vs_base"]
                                for part, name in PLAIN_VS_KEPT if name in kept.get(part, {}).get("wall", {})},
        },
    }
    on_gpu = mode == "gpu" and devices.get("platform") == "gpu"
    result["goals"] = {k: (None if not on_gpu or result["figures"][k] is None else result["figures"][k] <= v)
                       for k, v in GOALS.items()}
    result["note"] = ("measured on a GPU" if on_gpu else
                      "CPU mode at reduced sizes: a check that the script works, NOT evidence for a GPU"
                      if mode == "cpu" else "GPU mode, but jax ran on no GPU: no figure here is a GPU figure")
    write_json(out / "summary.json", result)

    f = result["figures"]
    num = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    def goal(k):
        return {None: "", True: "met", False: "NOT met"}[result["goals"][k]]
    print(f"\n== gpu_check summary ({result['note']}) ==")
    print(f"device {devices.get('devices', '?')}, jax {devices.get('jax', '?')}"
          f"{'' if devices.get('jax_pinned', True) else ' (NOT the pinned 0.10.2)'}; "
          f"wall {wall_s} s of a {budget_s} s budget")
    print(f"sizes: {step.get('sizes', '-')}")
    table = [
        ("LEQ step, ms", num(f["step_ms"], ".3f"), "<= 1 ms", goal("step_ms")),
        ("  actor / critic part, ms", f"{num(f['actor_ms'], '.3f')} / {num(f['critic_ms'], '.3f')}", "", ""),
        ("  compile (first call), s", num(f["compile_s"], ".1f"), "< 10 s", goal("compile_s")),
        ("  expansion (x5 rollouts), s", num(f["expansion_s"], ".3f"), "", ""),
        ("  compilations while timed", num(f["compiles_while_timed"], "d"), "0", ""),
        (f"world-model epoch ({num(f['epoch_transitions'], ',d')} transitions), s", num(f["epoch_s"], ".3f"),
         "< 3 s (1M)", goal("epoch_s")),
    ]
    for n, r in f["seeds"].items():
        table.append((f"N = {n} seeds: ms per step (t(N)/t(1))", f"{num(r['ms_per_step'], '.3f')} ({r['ratio']:.2f})",
                      "t(8)/t(1) <= 2" if n == "8" else "", goal("t8_over_t1") if n == "8" else ""))
    stage_s = f["pipeline_stage_s"] or {}
    table += [
        ("pipeline " + ENV + ": dataset / world model / pretrain / LEQ, s",
         " / ".join(num(stage_s.get(k), ".1f") for k in ("dataset", "world_model", "pretrain", "leq")), "", ""),
        ("  LEQ steps/s (after the first chunk)", num(f["leq_steps_per_s"], ".1f"), "", ""),
        ("  final success, %", num(f["final_success_pct"], ".0f"), "", ""),
    ]
    for (part, name), label in PLAIN_VS_KEPT.items():
        if f"{part}: {name}" in f["plain_over_kept"]:
            table.append((f"plain form / kept form: {label}", num(f["plain_over_kept"][f"{part}: {name}"], ".3f"), "", ""))
    width = max(len(r[0]) for r in table)
    print(f"| {'figure'.ljust(width)} | value | goal (H200) | |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for name, value, target, met in table:
        print(f"| {name.ljust(width)} | {value} | {target} | {met} |")
    print("parts: " + ", ".join(f"{k} {v['status']} ({v['wall_s']} s)" for k, v in parts.items()))
    print(f"JSON: {out / 'summary.json'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pipeline")
    a.add_argument("--mode", choices=sorted(SLICES), required=True)
    a.add_argument("--work", type=Path, required=True, help="folder for the datasets, models and runs")
    a.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    b = sub.add_parser("summary")
    b.add_argument("--mode", choices=sorted(SLICES), required=True)
    b.add_argument("--out", type=Path, required=True, help="gpu_check.sh's $OUT")
    b.add_argument("--parts", type=Path, required=True, help="gpu_check.sh's parts.txt")
    b.add_argument("--devices", type=Path, required=True, help="the devices JSON")
    b.add_argument("--budget", type=int, default=0)
    b.add_argument("--wall", type=int, default=0)
    args = p.parse_args()
    if args.command == "pipeline":
        return pipeline(args.mode, args.work, args.out)
    return summary(args.mode, args.out, args.parts, args.devices, args.budget, args.wall)


if __name__ == "__main__":
    sys.exit(main())
