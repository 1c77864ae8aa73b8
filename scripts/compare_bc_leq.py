"""The learning result: LEQ's final success against the BC actor it starts from, over seeds.

    python scripts/compare_bc_leq.py --env pointmaze-umaze --seeds 0 1 2
    python scripts/compare_bc_leq.py --env pointmaze-large --seeds 0 1 2 --eval-every 5000 \
        --ablations "1step=--critic-target 1step" "mean=--expectile 0.5"
    python scripts/compare_bc_leq.py --env pointmaze-large-navigate-singletask-v0 --seeds 0 --total-steps 40000 \
        --eval-every 5000 --flags="--pretrain-settings.bc-steps 40000 --pretrain-settings.fqe-steps 40000"

For each seed: runs leq.py (which runs the world model and pretraining first when their
artifacts are missing; a run folder that already holds leq.npz is reused, one with a checkpoint
resumes), then evaluates LEQ's final actor and the BC actor of pretrain.npz with the paper's
protocol (10 x 10 episodes, `evaluate.paper_protocol`). Each ablation is a leq.py run of seed
`--ablation-seed` with extra flags, on that seed's world model and pretraining. Writes
<out>.json (per run: success, score and its sd over the rounds, steps, episode lengths, the
critic's Q(s0, pi(s0)) against the Monte-Carlo value of the episodes driven, wall time per
stage), <out>.png (periodic success against steps; BC dashed) and, for the first seed,
<out>_{bc,leq}_trajectories.png on maze tasks.

With --keep, a run whose folder is gone (made on another machine) keeps its row of the earlier
<out>.json, so seeds run at different times end up in one table.

Wall times: the time of the leq.py call this script made (null for a reused run), and, when
`--log` names the run's log file, each stage's time as the stages printed it there.
"""

import dataclasses
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from leq_utils import cli  # noqa: E402
from leq_utils import artifacts  # noqa: E402
import evaluate  # noqa: E402
import leq  # noqa: E402
import pretrain  # noqa: E402
from leq_utils import plots, tasks  # noqa: E402


@dataclasses.dataclass
class Args:
    env: str = "pointmaze-umaze"
    """task name"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds (each one a full pipeline: world model, pretraining, LEQ)"""
    total_steps: Optional[int] = None
    """LEQ steps (default: leq.py's default for the task)"""
    eval_every: Optional[int] = None
    """LEQ's evaluation interval (default: leq.py's default for the task)"""
    ablations: tuple[str, ...] = ()
    """extra runs, each "label=leq.py flags" (e.g. "1step=--critic-target 1step"), of --ablation-seed"""
    ablation_seed: int = 0
    """seed of the ablation runs (they reuse its world model and pretraining)"""
    flags: str = ""
    """extra leq.py flags for every run it makes, seeds and ablations, written with "=" since they
    start with "--" (e.g. --flags="--pretrain-settings.bc-steps 40000" on a task without built-in
    step counts); recorded in the JSON"""
    dataset_path: Optional[str] = None
    """passed to leq.py (and the stages it runs): a dataset file instead of the task's own"""
    data_dir: Optional[str] = None
    """passed to leq.py: the folder of the task's datasets"""
    run_dir: str = "runs/{env}__leq__s{seed}"
    """LEQ run folder per seed (a format string with {env} and {seed}; ablations add __<label>)"""
    pretrain: str = "runs/{env}__pretrain__s{seed}/pretrain.npz"
    """pretrain.npz per seed (format string; made by leq.py when missing)"""
    world_model: str = "runs/{env}__world_model__s{seed}/world_model.npz"
    """world_model.npz per seed (format string; made by leq.py when missing)"""
    log: Optional[str] = None
    """the run's log file per seed (format string with {env}, {seed}, {run}), to read stage times from"""
    out: str = "docs/{env}_leq_vs_bc"
    """output stem for .json, .md (the results table) and .png (format string with {env})"""
    keep: bool = False
    """reuse <out>.json's row for a run whose folder holds no leq.npz (made on another machine, its
    folder gone) when its seed, label, flags, steps and evaluation interval match, instead of
    running it again"""
    replot: bool = False
    """run and evaluate nothing: redraw <out>.png and rewrite <out>.md from an existing <out>.json"""


# ============================================================================================
# One run: evaluate LEQ's and BC's actors with the paper's protocol
# ============================================================================================

def monte_carlo_values(episodes: list, gamma: float) -> list:
    """The discounted return each episode actually got under the training rewards (r - 1: -1 per
    step, 0 on the step into the goal): -(1 - gamma^(L - 1)) / (1 - gamma) for a success in L
    steps; -(1 - gamma^L) / (1 - gamma) for an episode cut at the limit (a truncated value)."""
    return [-(1 - gamma ** (e["length"] - 1 if e["success"] else e["length"])) / (1 - gamma) for e in episodes]


def protocol(task, nets, actor, critic, config: dict, record: bool = False) -> dict:
    """evaluate.paper_protocol's numbers plus the critic's Q(s0, pi(s0)) over the episodes' start
    states and their Monte-Carlo values; with `record` the episodes' xy paths as well."""
    rounds, n, seed = config["final_eval_rounds"], config["eval_episodes"], config["seed"]
    episodes = evaluate.run_episodes(task, evaluate.actor_policy(nets, actor), rounds * n, seed, record=record)
    scores = [evaluate.summarize(task, episodes[i * n:(i + 1) * n])["score"] for i in range(rounds)]
    s0 = jnp.asarray([e["obs0"] for e in episodes], jnp.float32)
    out = {**evaluate.summarize(task, episodes), "round_scores": scores, "score_std": float(np.std(scores)),
           "q_start": float(jnp.mean(nets.q(critic, s0, nets.pi(actor, s0)))),
           "mc_value": float(np.mean(monte_carlo_values(episodes, config["gamma"])))}
    return out, episodes


# A tqdm bar's elapsed time (its clock restarts in each process): "[MM:SS" or "[H:MM:SS"
CLOCK = r"\[(?:(\d+):)?(\d+):(\d+)"
STEP_BAR = r"{} [^|]*\|[^|]*\| *\d+/\d+ " + CLOCK + "<"           # pretrain, LEQ: "n/total [elapsed<left"
EPOCH_BAR = r"world model [^:\n]*: \d+epoch " + CLOCK + r"[,\]]"  # world_model.py: "Nepoch [elapsed,"


def segment_seconds(text: str, resumed: str, bar: str, closing: Optional[str] = None) -> float:
    """A stage's time summed over a log's resumed segments (split at the `resumed` line): a
    segment's closing time (regex `closing`, when it counts that segment only), else the last
    stamp of its bar (regex `bar` with CLOCK's three groups)."""
    total = 0.0
    for segment in text.split(resumed):
        closed, stamps = re.findall(closing, segment) if closing else [], re.findall(bar, segment)
        if closed:
            total += float(closed[-1])
        elif stamps:
            h, m, s = stamps[-1]
            total += 3600 * int(h or 0) + 60 * int(m) + int(s)
    return total


def stage_times(log_path: Optional[Path]) -> dict:
    """Each stage's wall time in seconds as printed in a run's log, summed over resumed segments:
    world_model.py's closing "N epochs in X s" (which counts its segment only) or, for a segment
    stopped before it, its bar; the pretrain and LEQ bars' elapsed times (a pretraining stopped and
    resumed prints its closing "X s" for the last segment only, so its bar is read)."""
    if not log_path or not log_path.exists():
        return {}
    text = log_path.read_text(errors="replace").replace("\r", "\n")
    times = {"world_model_s": segment_seconds(text, "[world_model] resuming", EPOCH_BAR,
                                              closing=r"\[world_model\] \d+ epochs in (\d+) s"),
             "pretrain_s": segment_seconds(text, "[pretrain] resuming", STEP_BAR.format("pretrain")),
             "leq_s": segment_seconds(text, "[leq] resuming", STEP_BAR.format("LEQ"))}
    return {k: v or None for k, v in times.items()}


def run_dir_of(a: Args, seed: int, label: str = "") -> Path:
    return Path(a.run_dir.format(env=tasks.run_name(a.env), seed=seed) + (f"__{label}" if label else ""))


def kept_row(a: Args, old: Optional[dict], seed: int, label: str = "", flags: str = "") -> Optional[dict]:
    """With --keep: the earlier JSON's row of this run, if its folder has no leq.npz and the row
    matches the run asked for (seed, label, flags, --flags, and --total-steps / --eval-every when given)."""
    if not a.keep or old is None or (run_dir_of(a, seed, label) / "leq.npz").exists():
        return None
    if old.get("flags", "") != a.flags:  # rows made with other --flags are other runs
        return None
    for r in old["per_seed"] + old.get("ablations", []):
        same_run = (r["seed"], r.get("label", "LEQ"), r.get("flags", "")) == (seed, label or "LEQ", flags)
        steps_ok = a.total_steps is None or r["steps"] == a.total_steps
        every_ok = a.eval_every is None or [s for s, _ in r["curve"]] == list(
            range(a.eval_every, r["steps"] + 1, a.eval_every))
        if same_run and steps_ok and every_ok:
            return r
    return None


def run_one(a: Args, task, seed: int, label: str = "", flags: str = ""):
    fmt = dict(env=tasks.run_name(a.env), seed=seed)
    run_dir = run_dir_of(a, seed, label)
    pt_path, wm_path = Path(a.pretrain.format(**fmt)), Path(a.world_model.format(**fmt))
    wall = None  # a reused run's time is not known here (null in the JSON, not a near-zero number)
    if not (run_dir / "leq.npz").exists():
        base = ["--env", a.env, "--seed", str(seed), "--run-dir", str(run_dir)]
        base += ["--total-steps", str(a.total_steps)] if a.total_steps else []
        base += ["--eval-every", str(a.eval_every)] if a.eval_every else []
        base += ["--dataset-path", a.dataset_path] if a.dataset_path else []
        base += ["--data-dir", a.data_dir] if a.data_dir else []
        base += ["--world-model", str(wm_path)] if wm_path.exists() else []
        base += ["--pretrain", str(pt_path)] if pt_path.exists() else []
        start = time.time()
        leq.train(tyro.cli(leq.Args, args=base + shlex.split(a.flags) + shlex.split(flags)))
        wall = time.time() - start
    config = json.loads((run_dir / "config.json").read_text())
    f = artifacts.load_artifact(run_dir / "leq.npz", task, kinds=("leq",))
    _, nets, actor = pretrain.actor_from_artifact(f, task)
    critic = pretrain.critic_from_artifact(f)
    leq_eval, leq_eps = protocol(task, nets, actor, critic, config, record=True)
    bc_nets, bc_actor, bc_critic, _ = pretrain.load_pretrained(config["pretrain"] or pt_path, task)
    bc_eval, bc_eps = protocol(task, bc_nets, bc_actor, bc_critic, config, record=True)
    rows = artifacts.read_metrics(run_dir / "metrics.jsonl")
    log = Path(a.log.format(**fmt, run=run_dir.name)) if a.log else None
    result = dict(
        seed=seed, label=label or "LEQ", flags=flags, run_dir=str(run_dir), steps=config["total_steps"],
        expectile=config["expectile"], critic_target=config["critic_target"],
        leq_success=leq_eval["success"], leq_score=leq_eval["score"], leq_score_std=leq_eval["score_std"],
        bc_success=bc_eval["success"], bc_score=bc_eval["score"], bc_score_std=bc_eval["score_std"],
        leq_length=leq_eval["length"], bc_length=bc_eval["length"],
        leq_q_start=leq_eval["q_start"], leq_mc_value=leq_eval["mc_value"],
        bc_q_start=bc_eval["q_start"], bc_mc_value=bc_eval["mc_value"],
        wall_s_this_call=wall, **stage_times(log),
        curve=[(r["step"], r["success"]) for r in rows if "success" in r])
    print(f"{a.env} seed {seed} {label or 'LEQ'}: success {leq_eval['success']:.2f} (score {leq_eval['score']:.1f} "
          f"+- {leq_eval['score_std']:.1f}), BC {bc_eval['success']:.2f}; length {leq_eval['length']:.0f} vs "
          f"{bc_eval['length']:.0f}; Q(s0) {leq_eval['q_start']:.1f} vs Monte-Carlo {leq_eval['mc_value']:.1f}")
    return result, leq_eps, bc_eps


# ============================================================================================
# Main: all runs, the JSON and the pictures
# ============================================================================================

def main(a: Args):
    out = Path(a.out.format(env=tasks.run_name(a.env)))
    if a.replot:
        if not out.with_suffix(".json").exists():
            raise tasks.InputError(f"--replot needs {out}.json; run without --replot first to make it")
        return write_outputs(json.loads(out.with_suffix(".json").read_text()), out)
    task = tasks.get_task(a.env)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.with_suffix(".json").read_text()) if a.keep and out.with_suffix(".json").exists() else None
    results, ablations = [], []

    def run_or_keep(seed, label="", flags=""):
        row = kept_row(a, old, seed, label, flags)
        if row is None:
            return run_one(a, task, seed, label, flags)
        print(f"{a.env} seed {seed} {label or 'LEQ'}: kept from {out}.json ({run_dir_of(a, seed, label)} "
              f"has no leq.npz): success {row['leq_success']:.2f}, BC {row['bc_success']:.2f}")
        return row, None, None

    for i, seed in enumerate(a.seeds):
        result, leq_eps, bc_eps = run_or_keep(seed)
        results.append(result)
        if i == 0 and leq_eps is not None and task.family in ("pointmaze", "antmaze"):  # kept: pictures stay
            plots.plot_trajectories(task, leq_eps, f"{out}_leq_trajectories.png", title=f"LEQ, seed {seed}")
            plots.plot_trajectories(task, bc_eps, f"{out}_bc_trajectories.png", title=f"BC actor, seed {seed}")
    for spec in a.ablations:
        label, _, flags = spec.partition("=")
        if not label or not flags:
            raise tasks.InputError(f"--ablations takes 'label=leq.py flags', got '{spec}'")
        ablations.append(run_or_keep(a.ablation_seed, label, flags)[0])
    summary = {"env": a.env, "seeds": list(a.seeds), "flags": a.flags,
               "leq_success_mean": float(np.mean([r["leq_success"] for r in results])),
               "bc_success_mean": float(np.mean([r["bc_success"] for r in results])),
               "per_seed": results, "ablations": ablations}
    artifacts.write_json(out.with_suffix(".json"), summary)
    write_outputs(summary, out)


def write_outputs(summary, out: Path):
    plot(summary, out.with_suffix(".png"))
    artifacts.atomic_write(out.with_suffix(".md"), lambda f: f.write(table(summary).encode()))
    print(table(summary))
    print(f"LEQ {summary['leq_success_mean']:.2f} vs BC {summary['bc_success_mean']:.2f} success over "
          f"{len(summary['per_seed'])} seed(s); wrote {out}.json, {out}.md and {out}.png")


def table(summary) -> str:
    """The results as a markdown table, one row per run (the results tables of README.md and docs/RESULTS.md are pasted from it)."""
    def pct(success, std):  # the score of these tasks is success x 100; std over the 10 rounds
        return f"{100 * success:.0f}% (sd {std:.1f})"

    def num(r, key, spec=".1f", unit=""):  # "?" for what a run did not record (older JSONs, no --log)
        return "?" if r.get(key) is None else format(r[key], spec) + unit

    def upstream(r, key):  # an ablation reuses its seed's world model and BC/FQE: their time is that run's
        if r.get(key) is not None or r.get("label", "LEQ") == "LEQ":
            return num(r, key, ".0f", " s")
        return "none" if key == "pretrain_s" and "--no-pretrain" in r["flags"] else f"seed {r['seed']}'s"

    def k(steps):  # 2500 -> 2.5k
        return f"{steps / 1000:g}k"
    rows = ["| run | LEQ steps | BC actor: success | LEQ: success | periodic evaluations (step: success) "
            "| episode length BC / LEQ | Q(s0, pi(s0)) BC / LEQ (Monte-Carlo value of LEQ's path) "
            "| wall time: world model / BC+FQE / LEQ |", "|" + "---|" * 8]
    for r in summary["per_seed"] + summary.get("ablations", []):
        label = r.get("label", "LEQ")
        name = f"LEQ, seed {r['seed']}" if label == "LEQ" else f"{label} (`{r['flags']}`), seed {r['seed']}"
        curve = ", ".join(f"{k(step)}: {100 * success:.0f}%" for step, success in r["curve"])
        rows.append(f"| {name} | {k(r['steps'])} | {pct(r['bc_success'], r['bc_score_std'])} "
                    f"| **{pct(r['leq_success'], r['leq_score_std'])}** | {curve} "
                    f"| {num(r, 'bc_length', '.0f')} / {num(r, 'leq_length', '.0f')} "
                    f"| {num(r, 'bc_q_start')} / {num(r, 'leq_q_start')} ({num(r, 'leq_mc_value')}) "
                    f"| {upstream(r, 'world_model_s')} / {upstream(r, 'pretrain_s')} "
                    f"/ {num(r, 'leq_s', '.0f', ' s')} |")
    return "\n".join(rows) + "\n"


def figure(summary):
    """Each run's LEQ success at its periodic evaluations (step 0: the BC actor it starts from;
    ablations dotted) and, dashed, each seed's BC actor in the 10 x 10 evaluation."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    runs = summary["per_seed"] + summary.get("ablations", [])
    for i, r in enumerate(runs):
        label = r.get("label", "LEQ")  # JSONs written before ablations existed have no label
        colour, wider = f"C{i}", max(len(summary["per_seed"]) - 1 - i, 0)  # earlier seeds wider: equal curves stay visible
        name = f"LEQ seed {r['seed']}" if label == "LEQ" else f"{label} (seed {r['seed']})"
        steps, success = zip(*([(0, r["bc_success"])] + [tuple(p) for p in r["curve"]]))  # step 0 = the BC actor
        ax.plot(steps, 100 * np.asarray(success), marker="o", ms=3 + 1.5 * wider, lw=1.2 + wider, color=colour,
                label=name, ls="-" if label == "LEQ" else ":")
        if label == "LEQ":
            ax.axhline(100 * r["bc_success"], ls="--", lw=1 + 0.8 * wider, color=colour, alpha=0.6,
                       label=f"BC seed {r['seed']}")
    ax.set_xlabel("LEQ gradient step (0: the BC actor)")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(-3, 103)
    seeds = ", ".join(str(r["seed"]) for r in summary["per_seed"])
    plural = "s" if len(summary["per_seed"]) > 1 else ""
    ax.set_title(f"{summary['env']}: LEQ vs the BC actor it starts from (seed{plural} {seeds})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, over no line
    fig.tight_layout()
    return fig


def plot(summary, path):
    fig = figure(summary)
    fig.savefig(path, dpi=110)
    plots.pyplot().close(fig)


if __name__ == "__main__":
    cli.run_script(main, Args)
