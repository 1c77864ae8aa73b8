"""Pictures and video of evaluations (support code): maze trajectory PNGs, learning curves from a
run's metrics.jsonl, and an MP4 of one episode. evaluate.py and scripts/compare_bc_leq.py call these."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from leq_utils import artifacts, tasks


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_name(path) -> str:
    """A run's name for picture titles: runs/<run>/leq.npz -> '<run>/leq.npz'."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def trajectory_figure(task: tasks.Task, episodes: list, title: str = ""):
    """The maze's walls, start and goal region, and every trajectory (green: success, red:
    failure), titled with `title` (the run) and the task's success count."""
    import textwrap
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy
    walls, start, goal, cell, radius = tasks.maze_geometry(task)
    width, height = (walls.max(0) - walls.min(0)) / cell + 1  # in cells
    fig_width = max(4.8, 1 + 0.5 * width)  # wide enough for the title and the legend below the maze
    fig, ax = plt.subplots(figsize=(fig_width, 2.2 + 0.5 * height))
    for x, y in walls:
        ax.add_patch(plt.Rectangle((x - cell / 2, y - cell / 2), cell, cell, color="0.35"))
    for e in episodes:
        xy = np.asarray(e["xy"])
        ax.plot(xy[:, 0], xy[:, 1], color="tab:green" if e["success"] else "tab:red", lw=1, alpha=0.7)
    ax.add_patch(plt.Circle(goal, radius, color="gold", zorder=3))
    ax.plot(*start, "bo", ms=8, zorder=3)
    ax.set_aspect("equal")
    ax.autoscale_view()
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    wins = sum(e["success"] for e in episodes)
    lines = textwrap.wrap(title, int(fig_width * 100 / 6)) + [f"{task.name}: {wins}/{len(episodes)} episodes reach the goal"]
    ax.set_title("\n".join(lines), fontsize=9)
    ax.legend(handles=[Line2D([], [], color="tab:green", label="success"),
                       Line2D([], [], color="tab:red", label="failure"),
                       Line2D([], [], color="b", marker="o", ls="", label="start"),
                       Patch(color="gold", label="goal region")],
              loc="upper center", bbox_to_anchor=(0.5, 0), ncol=4, fontsize=8, frameon=False,
              bbox_transform=offset_copy(ax.transAxes, fig, y=-0.42, units="inches"))  # below the x label
    fig.tight_layout()
    return fig


def plot_trajectories(task: tasks.Task, episodes: list, path, title: str = "") -> None:
    fig = trajectory_figure(task, episodes, title)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)  # no blank margins around the maze
    pyplot().close(fig)


# The learning curve's panels: metrics.jsonl key -> y-axis label
CURVE_PANELS = {"score": "score (normalised; mazes: success %)", "critic_loss": "critic loss",
                "actor_loss": "actor loss (surrogate)", "q_data": "mean Q(s, a), dataset batch",
                "q_model": "mean Q(s0, pi(s0)), imagination starts"}


def curve_figure(rows: list, title: str):
    """One panel per metric of CURVE_PANELS present in `rows` against the gradient step; the
    score panel also shows the final evaluation (mean +- std over its rounds)."""
    plt = pyplot()
    final = [r for r in rows if "final_score" in r]
    keys = [k for k in CURVE_PANELS if any(k in r for r in rows) or (k == "score" and final)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if k == "score" else None, ms=3, label="periodic evaluation")
        if k == "score" and final:
            ax.errorbar([r["step"] for r in final], [r["final_score"] for r in final],
                        [r.get("final_score_std", 0.0) for r in final], fmt="s", color="C3", ms=5,
                        capsize=3, label="final evaluation")
            ax.legend(fontsize=7, loc="best")
        if k == "score" and all(0 <= v <= 100 for _, v in pts) and all(0 <= r["final_score"] <= 100 for r in final):
            ax.set_ylim(-3, 103)  # success rates (and most normalised scores): the whole range
        ax.set_xlabel("gradient step")
        ax.set_ylabel(CURVE_PANELS[k])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curve(metrics_path, png_path) -> None:
    """The learning curve of a run's metrics.jsonl, titled with the run folder and its env."""
    metrics_path = Path(metrics_path)
    rows = artifacts.read_metrics(metrics_path)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    plotted = ("step", *CURVE_PANELS, "final_score", "final_score_std")
    good = [r for r in rows if all(number(r[k]) for k in plotted if k in r)]
    if len(good) < len(rows):  # a hand-edited or foreign file: the rows that can be drawn, and a warning
        tasks.warn(f"{metrics_path}: {len(rows) - len(good)} row(s) hold something other than a finite number in "
                   f"{', '.join(sorted({k for r in rows for k in plotted if k in r and not number(r[k])}))}; "
                   f"left out of the curve")
    rows = good
    if not rows:
        raise tasks.InputError(f"{metrics_path} has no metrics")
    run = metrics_path.resolve().parent
    config = run / "config.json"
    env = json.loads(config.read_text()).get("env", "") if config.exists() else ""
    title = f"LEQ run {run.name}" + (f" ({env})" if env and env not in run.name else "")
    fig = curve_figure(rows, title)
    fig.savefig(png_path, dpi=100)
    pyplot().close(fig)


def save_video(task: tasks.Task, policy: Callable, path, seed: int = 0) -> None:
    """MP4 of one episode rendered by MuJoCo; one-line errors that name what is missing: the MP4
    writer, or what the env's renderer needs (tasks.render_help)."""
    try:
        import imageio
        import imageio_ffmpeg  # noqa: F401  (the MP4 writer: fail before rendering, not after)
    except ImportError as e:
        raise tasks.InputError(f"--video needs the MP4 writer ({e}): pip install imageio==2.38.1 "
                               f"imageio-ffmpeg==0.8.1 (both in requirements.txt)") from None
    try:
        env = tasks.make_env(task, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
        for _ in range(task.max_episode_steps):
            obs, r, terminated, truncated, _ = env.step(policy(obs[None])[0])
            frames.append(env.render())
            if terminated or truncated:
                break
    except tasks.InputError:
        raise
    except Exception as e:
        raise tasks.InputError(f"cannot render a video here ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); {tasks.render_help(task)}") from None
    with warnings.catch_warnings():  # JAX's warning about fork: imageio's ffmpeg child execs at once
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        # macro_block_size=1 keeps the frame size (mujoco-py's 500 x 500) instead of resizing with a warning
        imageio.mimsave(path, frames, fps=50, macro_block_size=1)
