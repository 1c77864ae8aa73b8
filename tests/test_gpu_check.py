"""benchmarks/gpu_check.sh in its CPU mode, end to end (this interpreter, no install): every part
writes its JSON with sane figures, and the summary merges them. The GPU figures themselves can
only come from a GPU (docs/PERFORMANCE.md, "GPU")."""

import json
import math
import os
import subprocess
import sys
import time

from conftest import ROOT


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_check_cpu_mode(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable}
    env.pop("OUT", None)
    t = time.time()
    p = subprocess.run(["bash", ROOT / "benchmarks" / "gpu_check.sh", "--cpu", "--out", out],
                       env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - t
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "gpu_check summary" in p.stdout and "| LEQ step, ms" in p.stdout

    # $OUT holds the JSON of every part and the log, nothing else (the device tool brings back 8 files)
    names = {f.name for f in out.iterdir()}
    assert names == {"leq_step.json", "pipeline.json", "world_model_epoch.json", "many_seeds.json",
                     "plain_vs_kept.json", "summary.json", "gpu_check.log"}, names
    load = lambda name: json.loads((out / name).read_text())  # noqa: E731

    step = load("leq_step.json")
    assert step["device"].startswith("cpu") and "NOT the paper's sizes" in step["sizes"]
    a = step["adjoint"]
    for k in ("compile_s", "compile_and_first_call_s", "step_ms", "actor_ms", "critic_ms", "expansion_s"):
        assert positive(a[k]), (k, a)
    assert a["compiles_while_timed"] == 0  # no shape or static argument changes between chunks
    assert "jacobian" not in step           # the default path only

    epoch = load("world_model_epoch.json")
    assert positive(epoch["epoch_s"]) and positive(epoch["compile_s"]) and epoch["transitions"] > 0

    seeds = load("many_seeds.json")
    rows = {str(r["n"]).split()[0]: r for r in seeds["rows"]}
    assert sorted(rows, key=int) == ["1", "2"]  # the CPU mode's list (on a GPU: 1, 2, 4, 8, 16)
    assert all(positive(r["ms_per_step"]) for r in rows.values())
    assert positive(rows["2"]["ratio"])

    pipe = load("pipeline.json")
    assert set(pipe["stage_s"]) == {"dataset", "world_model", "pretrain", "leq"}
    assert all(positive(s) for s in pipe["stage_s"].values()), pipe["stage_s"]
    assert positive(pipe["leq_steps_per_s"]) and 0 <= pipe["final_success_pct"] <= 100
    assert pipe["final_episodes"] >= 1

    kept = load("plain_vs_kept.json")  # the kept formulations against their plain forms, each workload
    assert kept["small"] and kept["base"] == "module (after)"
    assert set(kept["leq"]["wall"]) == {"module (after)", "all plain", "kept -picked"}
    assert set(kept["epoch"]["wall"]) == {"module (after)", "all plain"}
    assert all(positive(v["ms"]) and positive(v["vs_base"]) for part in ("leq", "epoch") for v in kept[part]["wall"].values())
    assert kept["leq"]["wall"]["module (after)"]["vs_base"] == 1.0

    summary = load("summary.json")
    assert summary["mode"] == "cpu" and "NOT evidence for a GPU" in summary["note"]
    assert {k: v["status"] for k, v in summary["parts"].items()} == {
        k: "ok" for k in ("devices", "leq_step", "pipeline", "world_model_epoch", "many_seeds", "plain_vs_kept")}
    assert summary["devices"]["platform"] == "cpu" and summary["devices"]["jax_pinned"]
    f = summary["figures"]
    assert f["step_ms"] == a["step_ms"] and f["epoch_s"] == epoch["epoch_s"]
    assert sorted(f["seeds"], key=int) == ["1", "2"] and f["seeds"]["1"]["ratio"] == 1.0
    assert f["plain_over_kept"]["leq: kept -picked"] == kept["leq"]["wall"]["kept -picked"]["vs_base"]
    assert set(f["plain_over_kept"]) == {"leq: all plain", "leq: kept -picked", "epoch: all plain"}
    assert all(v is None for v in summary["goals"].values())  # goals are judged on a GPU only
    assert summary["wall_s"] <= wall + 1
