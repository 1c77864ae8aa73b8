"""Sweeps: a grid of envs x leq.py flag sets, one job per cell, each training its seeds in one
process (`leq.py --num-seeds N`), submitted through submitit; then one table of the results.

    # on one machine (submitit's local executor: the jobs run as subprocesses here)
    python scripts/sweep.py submit --envs pointmaze-umaze pointmaze-medium --seed 0 --num-seeds 3 \
        --sweep-dir sweeps/tau -- --expectile 0.1 0.3 0.5 --total-steps 20000
    # on a Slurm cluster: the same, plus where and how long
    python scripts/sweep.py submit ... --executor slurm --slurm-partition gpu --gpus-per-job 1 --time-min 720
    # when the jobs have finished (or to see the cells so far)
    python scripts/sweep.py collect --sweep-dir sweeps/tau

After `--` come leq.py's flags: a flag given several values is an axis of the grid (the cells are
every combination), one given one value (or a flag with a tuple value, e.g. --goal 1 2 or
--world-model-settings.hidden-dims 64 64) is passed to every cell, and {env} in a value is
replaced by the cell's env (e.g. --dataset-path data/{env}.hdf5).

`submit` first makes every (env, seed)'s world model and pretraining in one job per env (so the
cells of an env do not train them twice at once), then one job per (env, flag set), which waits
for its env's job (a Slurm dependency; with the local executor `submit` waits for the jobs of
each stage, and returns when every cell has ended, naming the ones that failed). The grid is written to
<sweep-dir>/sweep.json. `collect` reads each cell's seeds' final_eval.json and metrics.jsonl and
writes <sweep-dir>/results.csv, results.md (mean final score and a 95% bootstrap interval over
seeds per cell) and curves.png. submitit keeps its own job files (pickled, as submitit works)
under <sweep-dir>/submitit/; nothing this project writes or reads uses pickle.
"""

import dataclasses
import itertools
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from leq_utils import cli  # noqa: E402
from leq_utils import artifacts  # noqa: E402
from leq_utils import tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Submit:
    """Submit the grid."""
    envs: tuple[str, ...] = ("pointmaze-umaze",)
    """tasks of the grid"""
    leq_flags: str = ""
    """leq.py's flags, normally written after `--`: a flag with several values is an axis of the
    grid, {env} in a value becomes the cell's env"""
    seed: int = 0
    """first seed of every cell"""
    num_seeds: int = 3
    """seeds per cell (seed .. seed + num_seeds - 1), trained in one process"""
    sweep_dir: str = "sweeps/sweep"
    """folder of the sweep: sweep.json, the cells' run folders, submitit's job files"""
    executor: Literal["local", "slurm", "debug"] = "local"
    """submitit executor: local (subprocesses on this machine), slurm, or debug (in this process)"""
    slurm_partition: Optional[str] = None
    """Slurm partition of the jobs"""
    gpus_per_job: int = 0
    """GPUs per job (Slurm: --gpus-per-node)"""
    cpus_per_job: int = 2
    """CPUs per job"""
    mem_gb: int = 16
    """memory per job, GB"""
    time_min: int = 720
    """time limit per job, minutes"""


@dataclasses.dataclass
class Collect:
    """Collect the finished cells into a table and curves."""
    sweep_dir: str = "sweeps/sweep"
    """folder of the sweep (as given to submit)"""
    resamples: int = 10_000
    """bootstrap resamples for the 95% interval"""


def tuple_flags() -> set:
    """leq.py's flags whose value is a tuple (their values are one value, not a grid axis)."""
    import typing

    import leq
    found = set()
    for name, hint in typing.get_type_hints(leq.Args).items():
        if dataclasses.is_dataclass(hint):  # the nested --world-model-settings.* / --pretrain-settings.*
            found |= {f"--{name}.{k}".replace("_", "-") for k, h in typing.get_type_hints(hint).items()
                      if "tuple" in str(h)}
        elif "tuple" in str(hint):
            found.add(f"--{name}".replace("_", "-"))
    return found


def grid(words) -> tuple:
    """(flags common to every cell, [flag set of each cell]) of leq.py's flags as written after `--`."""
    groups = []
    for w in words:
        if w.startswith("--"):
            groups.append((w, []))
        elif not groups:
            raise tasks.InputError(f"leq.py's flags after -- start with a flag (--name), not {w!r}")
        else:
            groups[-1][1].append(w)
    whole = tuple_flags()
    is_axis = [len(values) > 1 and flag.replace("_", "-") not in whole for flag, values in groups]
    common = [x for (flag, values), axis in zip(groups, is_axis) if not axis for x in (flag, *values)]
    axes = [[shlex.join([flag, v]) for v in values] for (flag, values), axis in zip(groups, is_axis) if axis]
    return common, [" ".join(cell) for cell in itertools.product(*axes)]


def cell_name(flags: str) -> str:
    """A folder name for a flag set: "--expectile 0.3" -> "expectile_0.3"; "" -> "defaults"."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", flags.replace("--", " ")).strip("_") or "defaults"


# ============================================================================================
# submit
# ============================================================================================

def executor_for(s: Submit, folder: Path, name: str):
    import submitit
    ex = submitit.AutoExecutor(folder=folder, cluster=s.executor)
    ex.update_parameters(name=name, timeout_min=s.time_min, cpus_per_task=s.cpus_per_job, mem_gb=s.mem_gb,
                         gpus_per_node=s.gpus_per_job)
    if s.executor == "slurm" and s.slurm_partition:
        ex.update_parameters(slurm_partition=s.slurm_partition)
    return ex


def submit(s: Submit) -> None:
    import submitit
    if s.num_seeds < 1 or not s.envs:
        raise tasks.InputError("--num-seeds must be >= 1 and --envs must not be empty")
    for env in s.envs:
        tasks.get_task(env)  # unknown names fail now, not inside a job
    common_flags, flag_sets = grid(shlex.split(s.leq_flags))
    names = [cell_name(f) for f in flag_sets]
    if len(set(names)) != len(names):
        raise tasks.InputError(f"two flag sets give the same cell name: {names}")
    sweep = Path(s.sweep_dir).resolve()
    python, seeds = sys.executable, [str(k) for k in range(s.seed, s.seed + s.num_seeds)]
    common = {env: [w.replace("{env}", env) for w in common_flags] for env in s.envs}
    for env in s.envs:  # every cell's leq.py flags parse and pass leq.resolve now, not inside a job
        for flags in flag_sets:
            leq_args(env, s.seed, [*common[env], *shlex.split(flags), "--num-seeds", str(s.num_seeds)])
    sweep.mkdir(parents=True, exist_ok=True)
    prep_jobs = {}
    for env in s.envs:  # the upstream stages of every seed, once per env, in the folder the cells run in
        prep = submitit.helpers.CommandFunction(
            [python, str(ROOT / "scripts" / "sweep.py"), "prepare", "--env", env, "--seeds", *seeds,
             f"--leq-flags={shlex.join(common[env])}"], cwd=sweep)
        prep_jobs[env] = executor_for(s, sweep / "submitit", f"prepare-{env}").submit(prep)
    if s.executor != "slurm":  # local/debug: no dependencies, so wait here
        wait([(f"prepare {env}", job) for env, job in prep_jobs.items()])
    cells, jobs = [], []
    for env in s.envs:
        for flags, name in zip(flag_sets, names):
            run_dir = sweep / env / name
            command = [python, str(ROOT / "leq.py"), "--env", env, "--seed", str(s.seed), "--num-seeds",
                       str(s.num_seeds), "--run-dir", str(run_dir), *common[env], *shlex.split(flags)]
            ex = executor_for(s, sweep / "submitit", f"{env}-{name}")
            if s.executor == "slurm":
                ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{prep_jobs[env].job_id}"})
            job = ex.submit(submitit.helpers.CommandFunction(command, cwd=sweep))
            jobs.append((f"{env} / {name}", job))
            cells.append(dict(env=env, flags=flags, name=name, run_dir=str(run_dir), seeds=list(map(int, seeds)),
                              job_id=str(job.job_id), command=command))
            print(f"submitted {env} / {name}: job {job.job_id}")
    (sweep / "sweep.json").write_text(json.dumps({"cells": cells, "submit": dataclasses.asdict(s)}, indent=2))
    print(f"wrote {sweep / 'sweep.json'}")
    if s.executor != "slurm":
        wait(jobs)
    print(f"{'when the jobs are done' if s.executor == 'slurm' else 'done'}: python scripts/sweep.py collect "
          f"--sweep-dir {s.sweep_dir}")


def wait(jobs) -> None:
    """Wait for local jobs; one line naming those that failed (their logs are in submitit's folder)."""
    failed = []
    for name, job in jobs:
        try:
            job.result()
        except Exception as e:  # submitit re-raises the job's failure here
            failed.append(f"{name} ({type(e).__name__}; log {job.paths.stderr})")
    if failed:
        raise tasks.InputError(f"{len(failed)} job(s) failed: {'; '.join(failed)}")


@dataclasses.dataclass
class Prepare:
    """(Used by submit's jobs.) Make the world model and pretraining of each seed when missing."""
    env: str = "pointmaze-umaze"
    """task"""
    seeds: tuple[int, ...] = (0,)
    """seeds"""
    leq_flags: str = ""
    """the leq.py flags of the env's cells (data, --world-model-settings.*, --pretrain-settings.*)"""


def leq_args(env: str, seed: int, flags):
    """leq.py's resolved Args of these flags (tyro's message and exit on a flag it does not know)."""
    import tyro

    import leq
    return leq.resolve(tyro.cli(leq.Args, args=["--env", env, "--seed", str(seed), *flags]))


def prepare(p: Prepare) -> None:
    import pretrain
    import world_model
    from leq_utils import upstream
    for seed in p.seeds:
        upstream.prepare(tasks.get_task(p.env), leq_args(p.env, seed, shlex.split(p.leq_flags)), None,
                         world_model, pretrain)


# ============================================================================================
# collect
# ============================================================================================

def bootstrap_interval(x, resamples: int, seed: int = 0) -> tuple:
    """The 95% percentile bootstrap interval of the mean of x."""
    x = np.asarray(x, float)
    means = np.random.default_rng(seed).choice(x, (resamples, len(x))).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def seed_folders(run_dir: Path, seeds) -> dict:
    """{seed: folder holding that seed's final_eval.json / metrics.jsonl} of a cell's run folder."""
    if len(seeds) == 1 and (run_dir / "final_eval.json").exists():
        return {seeds[0]: run_dir}
    return {k: run_dir / f"seed_{k}" for k in seeds}


def collect(c: Collect) -> None:
    sweep = Path(c.sweep_dir)
    manifest = sweep / "sweep.json"
    if not manifest.exists():
        raise tasks.InputError(f"{manifest} does not exist: run 'python scripts/sweep.py submit --sweep-dir {c.sweep_dir}' first")
    cells, rows = json.loads(manifest.read_text())["cells"], []
    for cell in cells:
        finals, curves = [], []
        for seed, folder in seed_folders(Path(cell["run_dir"]), cell["seeds"]).items():
            if (folder / "final_eval.json").exists():
                finals.append(json.loads((folder / "final_eval.json").read_text())["score"])
                metrics = artifacts.read_metrics(folder / "metrics.jsonl")  # drops a row cut off by a crash
                curves.append([(r["step"], r["score"]) for r in metrics if "score" in r])
        low, high = bootstrap_interval(finals, c.resamples) if finals else (float("nan"), float("nan"))
        rows.append(dict(env=cell["env"], cell=cell["name"], flags=cell["flags"], seeds_done=len(finals),
                         seeds=len(cell["seeds"]), mean=float(np.mean(finals)) if finals else float("nan"),
                         ci_low=low, ci_high=high, scores=finals, curves=curves))
    header = ["env", "cell", "flags", "seeds_done", "seeds", "mean", "ci_low", "ci_high"]
    lines = [",".join(header)] + [",".join(json.dumps(r[k]) if k == "flags" else str(r[k]) for k in header) for r in rows]
    (sweep / "results.csv").write_text("\n".join(lines) + "\n")
    md = ["| env | cell | flags | seeds done | final score: mean [95% bootstrap CI] | per seed |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['env']} | {r['cell']} | `{r['flags'] or '(defaults)'}` | {r['seeds_done']}/{r['seeds']} | "
           f"{r['mean']:.1f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}] | {', '.join(f'{s:.0f}' for s in r['scores'])} |"
           for r in rows]
    (sweep / "results.md").write_text("\n".join(md) + "\n")
    plot_curves(rows, sweep / "curves.png")
    print("\n".join(md))
    print(f"wrote {sweep / 'results.csv'}, {sweep / 'results.md'} and {sweep / 'curves.png'}")


def plot_curves(rows, path) -> None:
    """One panel per env: each cell's mean periodic score over its seeds against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    envs = sorted({r["env"] for r in rows})
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for r in (r for r in rows if r["env"] == env and r["curves"]):
            length = min(len(c) for c in r["curves"])
            steps = [p[0] for p in r["curves"][0][:length]]
            mean = np.mean([[p[1] for p in c[:length]] for c in r["curves"]], axis=0)
            ax.plot(steps, mean, marker="o", ms=3, label=f"{r['cell']} ({len(r['curves'])} seeds)")
        ax.set_title(env)
        ax.set_xlabel("LEQ gradient step")
        ax.set_ylabel("score, mean over seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(command: Union[Submit, Collect, Prepare]) -> None:
    {Submit: submit, Collect: collect, Prepare: prepare}[type(command)](command)


if __name__ == "__main__":
    if "--" in sys.argv:  # leq.py's flags: into --leq-flags, one string
        cut = sys.argv.index("--")
        sys.argv[cut:] = [f"--leq-flags={shlex.join(sys.argv[cut + 1:])}"]
    cli.run_script(main, Union[Submit, Collect, Prepare])
