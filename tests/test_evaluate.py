"""Evaluation (docs/ALGORITHM.md, section 5.8): scripted policies with known outcomes on the built-in mazes,
seeding, the CLI's JSON and pictures, bad checkpoints, video, and compiling the policy once."""

import dataclasses
import json
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

from leq_utils import artifacts
import evaluate
from leq_utils import mazes
import pretrain
from leq_utils import plots, tasks
from conftest import ROOT

UMAZE = tasks.get_task("pointmaze-umaze")
MEDIUM = tasks.get_task("pointmaze-medium")
SUMMARY_FIELDS = {"env", "episodes", "score", "score_stderr", "success", "success_stderr", "return",
                  "return_stderr", "length", "length_stderr", "checkpoint", "seed", "env_goal",
                  "termination_centre", "q_start"}


def waypoint_policy(task):
    """The dataset's waypoint controller driving to the goal cell, batched: (n, 4) -> (n, 2)."""
    layout = mazes.MAZES[task.maze]
    target = mazes.maze_cells(layout, "G")[0]
    dist = mazes.bfs_distances(layout, target)
    return lambda obs: np.stack([mazes.waypoint_action(layout, dist, target, o) for o in obs])


def zero_policy(obs):
    return np.zeros((len(obs), 2))


def goal_of_the_env(task):
    """The goal cell's centre as gymnasium-robotics' own maze computes it (not mazes.cell_xy)."""
    env = tasks.make_env(task)
    env.reset(seed=0)
    return env.unwrapped.maze.cell_rowcol_to_xy(np.array(mazes.maze_cells(mazes.MAZES[task.maze], "G")[0]))


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# Scripted policies with known outcomes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", [UMAZE, MEDIUM], ids=lambda t: t.name)
def test_waypoint_controller_succeeds_every_episode(task):
    """The waypoint controller reaches the goal in every episode: success 1, score 100, return 1
    (reward 1 only on the step that enters the goal region, which ends the episode)."""
    episodes = evaluate.run_episodes(task, waypoint_policy(task), 3, seed=0, parallel=3, record=True)
    goal = goal_of_the_env(task)
    for e in episodes:
        xy = np.asarray(e["xy"])
        dist = np.linalg.norm(xy - goal, axis=1)
        assert e["success"] is True and e["ret"] == 1.0
        assert e["length"] == len(xy) - 1 < task.max_episode_steps
        assert dist[-1] < mazes.GOAL_RADIUS and np.all(dist[:-1] >= mazes.GOAL_RADIUS)
    s = evaluate.summarize(task, episodes)
    assert (s["env"], s["episodes"]) == (task.name, 3)
    assert (s["success"], s["success_stderr"], s["score"], s["score_stderr"]) == (1.0, 0.0, 100.0, 0.0)
    assert (s["return"], s["return_stderr"]) == (1.0, 0.0)
    assert s["length"] == pytest.approx(statistics.mean(e["length"] for e in episodes))


@pytest.mark.parametrize("task", [UMAZE, MEDIUM], ids=lambda t: t.name)
def test_zero_policy_fails_after_the_time_limit(task):
    """A constant zero action never reaches the goal: success 0, score 0, return 0, and every
    episode lasts exactly the task's max_episode_steps."""
    episodes = evaluate.run_episodes(task, zero_policy, 2, seed=0, parallel=2, record=True)
    for e in episodes:
        assert (e["success"], e["ret"], e["length"]) == (False, 0.0, task.max_episode_steps)
        assert len(e["xy"]) == task.max_episode_steps + 1
    s = evaluate.summarize(task, episodes)
    assert (s["success"], s["score"], s["return"]) == (0.0, 0.0, 0.0)
    assert (s["length"], s["length_stderr"]) == (task.max_episode_steps, 0.0)


def test_summarize_means_and_standard_errors():
    """summarize gives the mean and the standard error (sample std / sqrt n) of score (100 x
    success for mazes), success, return and length; one episode has stderr 0."""
    episodes = [dict(ret=1.0, length=120, success=True), dict(ret=0.0, length=300, success=False),
                dict(ret=0.0, length=300, success=False), dict(ret=1.0, length=95, success=True),
                dict(ret=1.0, length=211, success=True)]
    s = evaluate.summarize(UMAZE, episodes)
    columns = {"score": [100.0 * e["success"] for e in episodes],
               "success": [float(e["success"]) for e in episodes],
               "return": [e["ret"] for e in episodes], "length": [e["length"] for e in episodes]}
    for name, values in columns.items():
        assert s[name] == pytest.approx(statistics.mean(values)), name
        assert s[name + "_stderr"] == pytest.approx(statistics.stdev(values) / len(values) ** 0.5), name
    assert s["score"] == pytest.approx(60.0) and s["episodes"] == 5
    one = evaluate.summarize(UMAZE, episodes[:1])
    assert (one["score"], one["score_stderr"]) == (100.0, 0.0)
    assert (one["length"], one["length_stderr"]) == (120.0, 0.0)


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------

def test_seeds_make_episodes_repeatable():
    """Same seed: identical per-episode results and trajectories, however many run in lockstep;
    episode i uses seed + i; another seed gives other start positions and trajectories."""
    policy = waypoint_policy(UMAZE)
    first = evaluate.run_episodes(UMAZE, policy, 3, seed=7, parallel=3, record=True)
    again = evaluate.run_episodes(UMAZE, policy, 3, seed=7, parallel=3, record=True)
    one_at_a_time = evaluate.run_episodes(UMAZE, policy, 3, seed=7, parallel=1, record=True)
    assert first == again == one_at_a_time
    shifted = evaluate.run_episodes(UMAZE, policy, 2, seed=8, parallel=2, record=True)
    assert shifted == first[1:]  # episode i is reset with seed + i
    other = evaluate.run_episodes(UMAZE, policy, 3, seed=100, parallel=3, record=True)
    starts = np.array([e["xy"][0] for e in first + other])
    assert len({tuple(xy) for xy in starts}) == 6  # every episode starts somewhere else
    for a, b in zip(first, other):
        assert a["xy"] != b["xy"]
    # all starts are in the start cell, within the documented +-0.25 noise of its centre
    start = mazes.cell_xy(mazes.MAZES["umaze"], mazes.maze_cells(mazes.MAZES["umaze"], "R")[0])
    assert np.abs(starts - start).max() <= 0.25 + 1e-9


# --------------------------------------------------------------------------------------------
# The CLI: JSON, trajectory picture, learning curve
# --------------------------------------------------------------------------------------------

HIDDEN = (16, 16)


def np_policy(actor, mean, std):
    """tanh(MLP(symlog((s - mu_s) / std_s))) clipped to [-1, 1], in float64 numpy."""
    layers = actor["params"]
    n = len(layers)

    def policy(obs):
        x = (np.asarray(obs, np.float64) - mean[:4]) / std[:4]
        x = np.sign(x) * np.log1p(np.abs(x))
        for i in range(n):
            x = x @ np.asarray(layers[f"Dense_{i}"]["kernel"], np.float64) + layers[f"Dense_{i}"]["bias"]
            x = np.maximum(x, 0.0) if i < n - 1 else x
        return np.clip(np.tanh(x), -1.0, 1.0)
    return policy


def save_actor_artifact(path, task, hidden=HIDDEN, seed=0):
    """An artifact laid out as pretrain.py writes it (kind 'pretrain')."""
    rng = np.random.default_rng(seed)
    mean = np.concatenate([rng.normal(size=2) * 0.5, np.zeros(4)]).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
    nets = pretrain.make_nets(task, hidden, (mean, std))
    actor, critic = pretrain.init_params(nets, jax.random.PRNGKey(seed), task.obs_dim, task.act_dim)
    actor, critic = jax.device_get((actor, critic))
    arrays = {**artifacts.flatten(actor, "actor"), **artifacts.flatten(critic, "critic"),
              **artifacts.flatten(critic, "critic_ema"), "stats/mean": mean, "stats/std": std}
    artifacts.save_npz(path, arrays, "pretrain", task, pretrain.Args(env=task.name, hidden_dims=hidden))
    return actor, mean, std


def test_main_writes_json_and_trajectory_picture(tmp_path):
    """evaluate.main on a pretrain artifact writes <stem>.eval.json with the documented fields,
    the numbers of a float64 numpy re-implementation of the policy, the env's real goal (= the
    termination centre), and a trajectory PNG."""
    path = tmp_path / "pretrain.npz"
    actor, mean, std = save_actor_artifact(path, UMAZE)
    summary = evaluate.main(evaluate.Args(checkpoint=str(path), episodes=3, parallel=3, seed=0))
    written = json.loads((tmp_path / "pretrain.eval.json").read_text())
    assert set(written) == SUMMARY_FIELDS and written == summary
    assert (written["env"], written["episodes"], written["seed"]) == (UMAZE.name, 3, 0)
    assert written["checkpoint"] == str(path)
    # the reference: the same episodes with a numpy policy built from the saved arrays
    want = evaluate.summarize(UMAZE, evaluate.run_episodes(UMAZE, np_policy(actor, mean, std), 3, 0, 3))
    for k in ("score", "success", "return", "length"):
        assert written[k] == pytest.approx(want[k]), k
        assert written[k + "_stderr"] == pytest.approx(want[k + "_stderr"]), k
    # q_start: the saved critic at the 3 episodes' reset observations and the actor's actions
    nets = pretrain.make_nets(UMAZE, HIDDEN, (mean, std))
    f = np.load(path, allow_pickle=False)
    critic = jax.tree.map(jnp.asarray, artifacts.unflatten(f, "critic"))
    s0 = np.stack([tasks.make_env(UMAZE).reset(seed=i)[0] for i in range(3)]).astype(np.float32)
    want_q = np.mean(np.asarray(nets.q(critic, s0, jnp.asarray(np_policy(actor, mean, std)(s0), jnp.float32))))
    assert written["q_start"] == pytest.approx(float(want_q), rel=1e-4, abs=1e-4)
    # the env's goal is the termination centre (section 8: report it so a user can check)
    goal = goal_of_the_env(UMAZE)
    assert written["env_goal"] == pytest.approx(list(goal))
    assert written["termination_centre"] == pytest.approx(list(goal))
    assert written["termination_centre"] == pytest.approx(list(UMAZE.goal))
    # the trajectory picture: a real PNG with something drawn on it
    png = tmp_path / "pretrain.trajectories.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 5  # not a blank canvas


def test_plot_curve_makes_a_png(tmp_path):
    """plot_curve draws one panel per metric present (400 px each at 100 dpi) from a
    metrics.jsonl; --curve alone writes metrics.png; an empty file is a one-line error."""
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "critic_loss": 1.0 / (1 + s), "actor_loss": -0.1 * s} for s in range(0, 5000, 500)]
    rows += [{"step": s, "score": 10.0 * i} for i, s in enumerate(range(0, 5000, 1000))]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = tmp_path / "curve.png"
    plots.plot_curve(metrics, png)
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert png.stat().st_size > 0 and image.shape[:2] == (350, 3 * 400)  # score, critic_loss, actor_loss
    assert evaluate.main(evaluate.Args(curve=str(metrics))) is None
    assert (tmp_path / "metrics.png").stat().st_size > 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(tasks.InputError) as e:
        plots.plot_curve(empty, tmp_path / "empty.png")
    assert "has no metrics" in one_line(e)


def outside_the_figure(fig) -> list:
    """The parts of a drawn figure that reach outside it, i.e. that its PNG would cut off: each
    axes with its tick labels, axis labels, title and legend, and the figure's title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)  # as savefig draws it (also for a figure already closed)
    canvas.draw()
    renderer = canvas.get_renderer()
    parts = [(f"axes {ax.get_title()!r}", ax.get_tightbbox(renderer)) for ax in fig.axes]
    if fig.get_suptitle():
        parts.append(("suptitle", fig._suptitle.get_window_extent(renderer)))
    box = fig.bbox
    return [name for name, b in parts
            if b.x0 < box.x0 - 0.5 or b.y0 < box.y0 - 0.5 or b.x1 > box.x1 + 0.5 or b.y1 > box.y1 + 0.5]


def labelled(fig) -> bool:
    return all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


@pytest.mark.parametrize("name", ["pointmaze-umaze", "pointmaze-ultra", "antmaze-umaze-v2"])
def test_trajectory_picture_is_labelled_titled_and_fits(name):
    """The trajectory picture: axis labels, the run and the task with its success count in the
    title, a legend; nothing reaches outside the figure (the narrowest maze included)."""
    task = tasks.get_task(name)
    _, start, goal, _ = mazes.maze_geometry(task)
    episodes = [{"xy": [start.tolist(), goal.tolist()], "success": True},
                {"xy": [start.tolist(), (start + 1).tolist()], "success": False}]
    run = f"{name}__leq__s0__20250101-000000/leq.npz"
    fig = plots.trajectory_figure(task, episodes, run)
    title = fig.axes[0].get_title()
    assert run in title.replace("\n", "") and f"{name}: 1/2 episodes reach the goal" in title
    assert labelled(fig) and fig.axes[0].get_legend() is not None
    assert outside_the_figure(fig) == []
    plots.pyplot().close(fig)


def test_learning_curve_is_labelled_titled_and_fits(tmp_path, monkeypatch):
    """evaluate.py --curve: every panel has axis labels, the figure's title names the run
    folder and its env (from config.json), the score panel shows the final evaluation too, and
    nothing reaches outside the figure."""
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"env": "pointmaze-medium"}))
    rows = [{"step": s, "critic_loss": 1.0 / s, "actor_loss": -0.1 * s, "q_data": -s / 100.0,
             "q_model": -s / 90.0} for s in range(1000, 6000, 1000)]
    rows += [{"step": 5000, "score": 80.0}, {"step": 5000, "final_score": 90.0, "final_score_std": 3.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    make = plots.curve_figure
    monkeypatch.setattr(plots, "curve_figure", lambda *a: figures.append(make(*a)) or figures[-1])
    evaluate.main(evaluate.Args(curve=str(run_dir / "metrics.jsonl")))
    fig, = figures
    assert fig.get_suptitle() == "LEQ run my-run (pointmaze-medium)"
    assert [ax.get_ylabel() for ax in fig.axes] == list(plots.CURVE_PANELS.values()) and labelled(fig)
    score_axes = fig.axes[0]
    assert [t.get_text() for t in score_axes.get_legend().get_texts()] == ["periodic evaluation", "final evaluation"]
    assert outside_the_figure(fig) == []
    assert (run_dir / "metrics.png").stat().st_size > 0


def test_comparison_plot_is_labelled_titled_and_fits():
    """scripts/compare_bc_leq.py's picture, drawn from the committed umaze results (written
    before ablation runs existed) plus an ablation run: axis labels, env and seeds in the title,
    the legend beside the plot, nothing cut off."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_bc_leq
    summary = json.loads((ROOT / "docs" / "pointmaze-umaze_leq_vs_bc.json").read_text())
    summary["ablations"] = [{**summary["per_seed"][0], "label": "1step"}]
    fig = compare_bc_leq.figure(summary)
    title = fig.axes[0].get_title()
    assert "pointmaze-umaze" in title and "seeds 0, 1, 2" in title and labelled(fig)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == 2 * len(summary["per_seed"]) + 1 and legend[-1] == "1step (seed 0)"
    assert outside_the_figure(fig) == []
    plots.pyplot().close(fig)


def test_compare_table_and_replot(tmp_path):
    """compare_bc_leq's markdown table from the committed pointmaze-large JSON plus an ablation
    without wall times: one row per run with the numbers of the JSON; --replot rewrites the .md
    and .png from a JSON alone and, without one, stops in one line."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_bc_leq
    summary = json.loads((ROOT / "docs" / "pointmaze-large-40k_leq_vs_bc.json").read_text())
    summary["ablations"] = [{**summary["per_seed"][0], "label": "1step", "flags": "--critic-target 1step",
                             "leq_success": 0.3, "leq_score_std": 4.56, "world_model_s": None, "pretrain_s": None,
                             "curve": [[2500, 1.0], [5000, 0.5]]}]
    lines, n = compare_bc_leq.table(summary).splitlines(), len(summary["per_seed"])
    assert len(lines) == 2 + n + 1 and all(line.count("|") == 9 for line in lines)
    leq_row, ablation_row = lines[2].split("|")[1:-1], lines[2 + n].split("|")[1:-1]
    assert [c.strip() for c in leq_row[:4]] == ["LEQ, seed 0", "40k", "0% (sd 0.0)", "**100% (sd 0.0)**"]
    assert "15k: 0%" in leq_row[4] and leq_row[5].strip() == "800 / 235"
    seed0 = summary["per_seed"][0]  # wall times from the JSON: a resumed stage's time grows as runs are added
    walls = " / ".join(f"{seed0[k]:.0f} s" for k in ("world_model_s", "pretrain_s", "leq_s"))
    assert leq_row[6].strip() == "-151.3 / -190.7 (-168.1)" and leq_row[7].strip() == walls
    assert ablation_row[0].strip() == "1step (`--critic-target 1step`), seed 0"
    assert ablation_row[3].strip() == "**30% (sd 4.6)**" and ablation_row[4].strip() == "2.5k: 100%, 5k: 50%"
    assert ablation_row[7].strip().startswith("seed 0's / seed 0's / ")  # it reused seed 0's upstream stages
    summary["ablations"][0]["flags"] = "--no-pretrain"  # no BC/FQE stage at all: its time is "none"
    assert compare_bc_leq.table(summary).splitlines()[2 + n].split("|")[8].strip().startswith("seed 0's / none / ")
    summary["ablations"][0]["flags"] = "--critic-target 1step"
    (tmp_path / "x.json").write_text(json.dumps(summary))
    compare_bc_leq.main(compare_bc_leq.Args(env="pointmaze-large", out=str(tmp_path / "x"), replot=True))
    assert (tmp_path / "x.md").read_text() == compare_bc_leq.table(summary) and (tmp_path / "x.png").stat().st_size
    with pytest.raises(tasks.InputError) as e:
        compare_bc_leq.main(compare_bc_leq.Args(env="pointmaze-large", out=str(tmp_path / "y"), replot=True))
    assert "--replot needs" in one_line(e) and not (tmp_path / "y.md").exists()


def test_compare_keep_reuses_rows_of_runs_gone(tmp_path, monkeypatch):
    """--keep: a run whose folder holds no leq.npz keeps its row of the earlier JSON when seed, label,
    flags, steps and evaluation interval match; a mismatch (or no --keep) would run it instead."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_bc_leq
    old = json.loads((ROOT / "docs" / "pointmaze-large-40k_leq_vs_bc.json").read_text())
    (tmp_path / "x.json").write_text(json.dumps(old))
    ran = []
    monkeypatch.setattr(compare_bc_leq, "run_one", lambda a, task, seed, label="", flags="": ran.append(seed))
    seeds = tuple(r["seed"] for r in old["per_seed"])
    ablations = tuple(f"{r['label']}={r['flags']}" for r in old["ablations"])  # 1step, mean
    args = compare_bc_leq.Args(env="pointmaze-large", seeds=seeds, total_steps=40000, eval_every=5000, keep=True,
                               ablations=ablations, out=str(tmp_path / "x"),
                               run_dir=str(tmp_path / "runs" / "{env}__leq__s{seed}"))
    compare_bc_leq.main(args)
    new = json.loads((tmp_path / "x.json").read_text())
    assert ran == [] and new["per_seed"] == old["per_seed"] and new["ablations"] == old["ablations"]
    assert (tmp_path / "x.md").read_text() == compare_bc_leq.table(old)
    seed0, ablation = old["per_seed"][0], old["ablations"][0]
    for changes in [dict(keep=False), dict(total_steps=30000), dict(eval_every=10000), dict(flags="--horizon 5")]:
        assert compare_bc_leq.kept_row(dataclasses.replace(args, **changes), old, 0) is None, changes
    assert compare_bc_leq.kept_row(args, old, 0) == seed0 and compare_bc_leq.kept_row(args, old, 5) is None
    assert compare_bc_leq.kept_row(args, old, 0, "1step", "--critic-target 1step") == ablation
    assert compare_bc_leq.kept_row(args, old, 0, "1step", "--critic-target lambda") is None
    leq_npz = tmp_path / "runs" / "pointmaze-large__leq__s0" / "leq.npz"  # a folder that is here: it is used
    leq_npz.parent.mkdir(parents=True)
    leq_npz.write_bytes(b"")
    assert compare_bc_leq.kept_row(args, old, 0) is None


def test_compare_flags_reach_every_leq_run(tmp_path, monkeypatch):
    """--flags (given with "=", as the README writes it) is added to the leq.py flags of a seed's run
    and, before its own flags, of an ablation's."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_bc_leq

    class Called(Exception):
        pass

    def train(args):
        raise Called(args)
    monkeypatch.setattr(compare_bc_leq.leq, "train", train)
    a = tyro.cli(compare_bc_leq.Args, args=["--env", "pointmaze-umaze", "--run-dir", str(tmp_path / "r{seed}"),
                                            "--flags=--horizon 5 --pretrain-settings.bc-steps 300"])
    for label, flags, horizon in [("", "", 5), ("h3", "--horizon 3", 3)]:
        with pytest.raises(Called) as e:
            compare_bc_leq.run_one(a, None, 1, label, flags)
        args, = e.value.args
        assert (args.seed, args.horizon, args.pretrain_settings.bc_steps) == (1, horizon, 300)


def test_compare_stage_times_sum_resumed_segments(tmp_path):
    """compare_bc_leq.stage_times on a log written like a real one (tqdm's carriage returns,
    the world model, a pretraining and an LEQ run each stopped once and resumed): each stage's
    time is the sum of its segments' last bar stamps (the world model's: a stopped segment's bar,
    then the closing line of the segment that finished), not the last segment's closing line alone."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_bc_leq
    bar = "{} pointmaze-large:  {}%|x         | {}/80000 [{}<1:46:34, 12.35step/s, BC loss 0.6297]"
    wm_bar = "world model pointmaze-large: {}epoch [{}, 46.89s/epoch, loss -56.698 + decay 0.354 | holdout mse 1.06e-02]"
    log = "\n".join([
        "\r".join([wm_bar.format(11, "08:36"), wm_bar.format(12, "1:09:25")]),  # stopped: 4165 s
        "[world_model] resuming from w.ckpt.npz at epoch 12",
        "\r".join([wm_bar.format(13, "00:25"), wm_bar.format(21, "07:09")]),
        "[world_model] 21 epochs in 2656 s; elites [0, 1, 3, 4, 6] holdout mse 2.0e-02; wrote w.npz",
        "\r".join(bar.format("pretrain", 1, n, t) for n, t in [(1000, "01:20"), (11000, "1:02:05")]),
        "[pretrain] resuming from p.ckpt.npz at step 10000",
        "\r".join(bar.format("pretrain", 2, n, t) for n, t in [(20000, "10:00"), (80000, "15:25")]),
        "[pretrain] BC mse 0.5792, mean Q(s, pi(s)) on data -151.64, 925 s; wrote p.npz",
        bar.format("LEQ", 25, 10000, "2:10:09") + "[leq] resuming r from step 10000",
        bar.format("LEQ", 100, 40000, "1:05:00")])
    (tmp_path / "run.log").write_text(log)
    times = compare_bc_leq.stage_times(tmp_path / "run.log")
    assert times == {"world_model_s": 4165.0 + 2656.0, "pretrain_s": 3725.0 + 925.0,
                     "leq_s": 7809.0 + 3900.0}
    assert compare_bc_leq.stage_times(tmp_path / "missing.log") == {}


# --------------------------------------------------------------------------------------------
# Bad checkpoints: one-line errors
# --------------------------------------------------------------------------------------------

def test_checkpoint_without_actor_or_for_another_env_fails(tmp_path):
    """A world-model artifact (no actor), an artifact evaluated in another env, a missing file,
    and no checkpoint at all each stop evaluate.main with a one-line InputError, writing nothing."""
    wm_like = tmp_path / "world_model.npz"
    artifacts.save_npz(wm_like, {"model/input_mean": np.zeros(6, np.float32),
                             "model/input_std": np.ones(6, np.float32)}, "world_model", UMAZE, {})
    with pytest.raises(tasks.InputError) as e:
        evaluate.main(evaluate.Args(checkpoint=str(wm_like), episodes=1, parallel=1))
    assert "('world_model') has no actor parameters" in one_line(e) and str(wm_like) in one_line(e)
    actor_path = tmp_path / "pretrain.npz"
    save_actor_artifact(actor_path, UMAZE)
    with pytest.raises(tasks.InputError) as e:
        evaluate.main(evaluate.Args(checkpoint=str(actor_path), env=MEDIUM.name, episodes=1, parallel=1))
    assert "made for env 'pointmaze-umaze', not 'pointmaze-medium'" in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        evaluate.main(evaluate.Args(checkpoint=str(tmp_path / "nope.npz")))
    assert "does not exist" in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        evaluate.main(evaluate.Args())
    assert "--checkpoint" in one_line(e)
    with pytest.raises(tasks.InputError) as e:
        evaluate.main(evaluate.Args(checkpoint=str(actor_path), episodes=0))
    assert "--episodes" in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain.npz", "world_model.npz"]


# the child execs at once, so JAX's warning about forking a threaded process does not apply
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_cli_prints_one_line_error_for_a_checkpoint_without_actor(tmp_path):
    """`python evaluate.py --checkpoint world_model.npz` exits non-zero with one 'error:' line."""
    wm_like = tmp_path / "world_model.npz"
    artifacts.save_npz(wm_like, {"model/input_mean": np.zeros(6, np.float32)}, "world_model", UMAZE, {})
    p = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(wm_like)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: artifact")
    assert "has no actor parameters" in lines[0]


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------

VIDEO_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
import evaluate
from leq_utils import mazes, plots, tasks
task = tasks.get_task("pointmaze-umaze")
layout = mazes.MAZES["umaze"]
target = mazes.maze_cells(layout, "G")[0]
dist = mazes.bfs_distances(layout, target)
policy = lambda obs: np.stack([mazes.waypoint_action(layout, dist, target, o) for o in obs])
try:
    plots.save_video(task, policy, sys.argv[1], seed=0)
    print("WROTE")
except tasks.InputError as e:
    print("INPUTERROR " + str(e))
"""


def run_save_video(path, mujoco_gl):
    """plots.save_video in a fresh process (the GL backend is fixed at MuJoCo's import)."""
    env = dict(os.environ, MUJOCO_GL=mujoco_gl)
    p = subprocess.run([sys.executable, "-c", VIDEO_SCRIPT.format(root=str(ROOT)), str(path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()


# the child execs at once, so JAX's warning about forking a threaded process does not apply
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_video_is_written_or_fails_naming_mujoco_gl(tmp_path):
    """save_video writes an MP4 holding the whole episode (length + 1 frames) where MuJoCo can
    render (MUJOCO_GL as set, else osmesa), else raises a one-line InputError naming MUJOCO_GL;
    with an unusable backend it always raises that error and writes nothing."""
    path = tmp_path / "episode.mp4"
    out = run_save_video(path, os.environ.get("MUJOCO_GL", "osmesa"))
    if out[-1] == "WROTE":
        data = path.read_bytes()
        assert len(data) > 1000 and data[4:8] == b"ftyp"  # an MP4 container
        import imageio.v2 as imageio
        with imageio.get_reader(path) as reader:
            frames = sum(1 for _ in reader)
        length = evaluate.run_episodes(UMAZE, waypoint_policy(UMAZE), 1, seed=0, parallel=1)[0]["length"]
        assert frames == length + 1  # the reset frame, then one per step
    else:
        assert len(out) == 1 and out[0].startswith("INPUTERROR cannot render a video here")
        assert "MUJOCO_GL" in out[0] and not path.exists()
    bad = tmp_path / "bad.mp4"
    out = run_save_video(bad, "no-such-backend")
    assert len(out) == 1 and out[0].startswith("INPUTERROR cannot render a video here")
    assert "MUJOCO_GL" in out[0] and not bad.exists()


# --------------------------------------------------------------------------------------------
# The policy is compiled once per network shape
# --------------------------------------------------------------------------------------------

def test_policy_compiles_once_per_network_shape():
    """New parameters and statistics for the same network shape reuse the compiled
    deterministic_action (its cache does not grow) and give the new parameters' actions; a
    new shape does compile (the count can move)."""
    obs = np.random.default_rng(0).normal(size=(7, 4))  # float64 as from the envs; a batch no other test uses

    def build(hidden, seed):
        rng = np.random.default_rng(seed)
        mean, std = rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)
        nets = pretrain.make_nets(UMAZE, hidden, (mean, std))
        actor, _ = pretrain.init_params(nets, jax.random.PRNGKey(seed), 4, 2)
        return nets, actor, np_policy(jax.device_get(actor), mean, std)

    nets, actor, reference = build(HIDDEN, 1)
    before = evaluate.deterministic_action._cache_size()
    np.testing.assert_allclose(evaluate.actor_policy(nets, actor)(obs), reference(obs), atol=1e-5)
    compiled = evaluate.deterministic_action._cache_size()
    assert compiled == before + 1
    outputs = []
    for seed in (2, 3, 4):
        nets_b, actor_b, reference_b = build(HIDDEN, seed)
        got = evaluate.actor_policy(nets_b, actor_b)(obs)
        np.testing.assert_allclose(got, reference_b(obs), atol=1e-5)  # the new parameters are used
        outputs.append(got)
        got32 = evaluate.actor_policy(nets_b, actor_b)(obs.astype(np.float32))
        np.testing.assert_array_equal(got32, got)
    assert not np.allclose(outputs[0], outputs[1])
    assert evaluate.deterministic_action._cache_size() == compiled
    other, actor_c, _ = build((8,), 5)
    evaluate.actor_policy(other, actor_c)(obs)
    assert evaluate.deterministic_action._cache_size() == compiled + 1


@pytest.mark.parametrize("env", ["pointmaze-umaze", "pointmaze-large", "ant-umaze-diverse", "ant-large-play"])
def test_model_rollout_check_finds_states_inside_walls(env):
    """scripts/model_rollout_check.py's wall test against the layout read cell by cell: points near
    each corner of every cell (placed by mazes.cell_xy, times 4 for the ant's 4-unit cells) are
    inside a wall exactly when the cell is '#', and points beyond the maze's edge are too."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import model_rollout_check
    task = tasks.get_task(env)
    in_wall = model_rollout_check.in_wall_fn(task)
    layout, unit = mazes.MAZES[task.maze], 4.0 if env.startswith("ant") else 1.0
    points, expected = [], []
    for i, row in enumerate(layout):
        for j, char in enumerate(row):
            centre = mazes.cell_xy(layout, (i, j))
            for dx in (-0.45, 0.45):
                for dy in (-0.45, 0.45):
                    points.append(unit * (centre + [dx, dy]))
                    expected.append(char == "#")
    height, width = len(layout), len(layout[0])
    points += [[unit * (-width / 2 - 0.2), 0.0], [unit * (width / 2 + 0.2), 0.0], [0.0, unit * (height / 2 + 0.2)],
               [0.0, unit * (-height / 2 - 0.2)]]
    expected += [True] * 4
    assert np.asarray(in_wall(jnp.asarray(np.array(points), jnp.float32))).tolist() == expected
    assert 0 < sum(expected) < len(expected)


def test_model_rollout_check_one_step_error(upstream, capsys):
    """model_rollout_check.py's one-step error line against a plain loop: the real path driven
    again, each elite's mean prediction from each real state made one elite at a time."""
    import re
    sys.path.insert(0, str(ROOT / "scripts"))
    import model_rollout_check
    import world_model
    steps = 6
    model_rollout_check.main(model_rollout_check.Args(checkpoint=str(upstream / "pt.npz"), steps=steps, every=3,
                                                      world_model=str(upstream / "wm.npz"), imagined=0))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("one-step error"))
    printed, worst = re.search(r": ([0-9.]+) \(step (\d+)\)$", line).groups()
    task, nets, actor = pretrain.load_actor(str(upstream / "pt.npz"))
    wm = world_model.load_world_model(str(upstream / "wm.npz"), task)
    done_fn, env = tasks.termination_fn(task), tasks.make_env(task)
    obs, _ = env.reset(seed=0)
    errors = []
    for _ in range(steps):
        action = np.asarray(nets.pi(actor, jnp.asarray(obs[None], jnp.float32)))[0]
        predictions = [np.asarray(world_model.model_step_given(
            wm, jnp.asarray(obs[None], jnp.float32), jnp.asarray(action[None]), jnp.asarray([e]),
            jnp.zeros((1, task.obs_dim + 1)), done_fn)[0])[0, :2] for e in range(len(world_model.members(wm.params)))]
        obs = env.step(action)[0]
        errors.append(max(float(np.abs(p - obs[:2]).max()) for p in predictions))
    assert float(printed) == pytest.approx(max(errors), abs=1e-4) and int(worst) == 1 + int(np.argmax(errors))


def test_model_rollout_check_largest_imagined_coordinate(upstream, tiny_maze_file_module, capsys):
    """model_rollout_check.imagined_rollouts' largest |coordinate| per step against a plain loop:
    the same start states and per-step keys through world_model.model_step, one step at a time,
    states after a done left out; and its wall share against the same loop's count. The script
    (main, with --dataset-path) prints those numbers."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import model_rollout_check
    import world_model
    task, nets, actor = pretrain.load_actor(str(upstream / "pt.npz"))
    wm = world_model.load_world_model(str(upstream / "wm.npz"), task)
    done_fn, in_wall = tasks.termination_fn(task), model_rollout_check.in_wall_fn(task)
    obs = tasks.load_dataset(task, str(tiny_maze_file_module)).observations
    a = model_rollout_check.Args(checkpoint="", world_model="", imagined=50, horizon=4, seed=3)
    rate, largest, data_largest, back = model_rollout_check.imagined_rollouts(obs, wm, nets, actor, done_fn, in_wall, a)
    s = obs[np.random.default_rng(3).choice(len(obs), 50)]
    alive, expected, bad, counted = np.ones(50, bool), [], 0, 0
    for k in jax.random.split(jax.random.PRNGKey(3), 4):
        s2, _, done = world_model.model_step(wm, jnp.asarray(s), nets.pi(actor, jnp.asarray(s)), k, done_fn)
        s2 = np.asarray(s2)
        expected.append(max(abs(float(x)) for row, live in zip(s2, alive) if live for x in row))
        bad += sum(bool(w) and live for w, live in zip(np.asarray(in_wall(jnp.asarray(s2[:, :2]))), alive))
        counted += int(alive.sum())
        alive = alive & ~np.asarray(done).astype(bool)
        s = s2
    assert largest.tolist() == pytest.approx(expected, rel=1e-5)
    assert rate == pytest.approx(bad / counted) and data_largest == float(np.abs(obs).max())
    assert back.tolist() == [0.0] * 5  # no on_back: a point mass never lies on its back
    model_rollout_check.main(model_rollout_check.Args(
        checkpoint=str(upstream / "pt.npz"), world_model=str(upstream / "wm.npz"), steps=2, every=2, imagined=50,
        horizon=4, seed=3, dataset_path=str(tiny_maze_file_module)))
    out = capsys.readouterr().out
    assert f"sampled model): {100 * bad / counted:.3f}%" in out
    assert (f"steps 1..4 (the dataset's: {float(np.abs(obs).max()):.3g}): " + " ".join(f"{x:.3g}" for x in expected)) in out


def test_wall_impact_check_against_a_loop(upstream, tiny_maze_file_module, capsys):
    """wall_impact_check.py's counts and mean errors against a plain loop over the transitions and
    axes, with each elite's prediction of the whole dataset made one elite at a time."""
    import re
    sys.path.insert(0, str(ROOT / "scripts"))
    import wall_impact_check
    import world_model
    speed = 3.0  # the tiny data has few impacts faster than the default 4.5
    wall_impact_check.main(wall_impact_check.Args(env="pointmaze-umaze", dataset_path=str(tiny_maze_file_module),
                                                  world_model=str(upstream / "wm.npz"), speed=speed, samples=10**6))
    printed = {m[0]: (int(m[1].replace(",", "")), float(m[2])) for m in
               re.findall(r"^ *([a-z ]+): +([0-9,]+) in the data \(.*\): mean error ([0-9.]+)", capsys.readouterr().out, re.M)}
    task = tasks.get_task("pointmaze-umaze")
    ds = tasks.load_dataset(task, str(tiny_maze_file_module))
    wm = world_model.load_world_model(str(upstream / "wm.npz"), task)
    n = len(world_model.members(wm.params))
    preds = [np.asarray(world_model.model_step_given(
        wm, jnp.asarray(ds.observations), jnp.asarray(ds.actions), jnp.full(len(ds.actions), e),
        jnp.zeros((len(ds.actions), 5)), tasks.termination_fn(task))[0]) for e in range(n)]
    errors = {"fast impacts": [], "slower impacts": [], "fast free motion": []}
    for t in range(len(ds.observations)):
        for axis in (0, 1):
            v = ds.observations[t, 2 + axis]
            d = (ds.next_observations[t, axis] - ds.observations[t, axis]) * (1 if v > 0 else -1)
            kind = ("fast impacts" if d < 0.005 * abs(v) and abs(v) > speed else
                    "slower impacts" if d < 0.005 * abs(v) and 2 < abs(v) <= speed else
                    "fast free motion" if d > 0.008 * abs(v) and abs(v) > speed else None)
            if kind:
                errors[kind].append(sum(abs(p[t, axis] - ds.next_observations[t, axis]) for p in preds) / n)
    assert all(len(e) >= 5 for e in errors.values()), {k: len(e) for k, e in errors.items()}
    assert set(printed) == set(errors)
    for kind, e in errors.items():
        assert printed[kind][0] == len(e) and printed[kind][1] == pytest.approx(np.mean(e), abs=1e-4), kind
