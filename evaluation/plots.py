"""Figures of rollouts (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.metrics import EEF_POS, OBJECT_POS, Agreement, SuccessSummary  # noqa: E402
from evaluation.records import EpisodeRecord  # noqa: E402

SUCCESS_COLOR, FAILURE_COLOR = "tab:green", "tab:red"
ENV_COLORS = {"dream": "tab:blue", "real": "tab:orange"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories_3d(records: Sequence[EpisodeRecord], path: Path, title: str, max_episodes: int = 8) -> Path:
    """End-effector paths (solid) and object paths (dashed) in 3-D, coloured by outcome.

    Markers: o = start of the end effector, x = its last position, s = object start, * = object at the end.
    """
    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(projection="3d")
    for record in list(records)[:max_episodes]:
        color = SUCCESS_COLOR if record.success else FAILURE_COLOR
        eef, obj = record.states[:, EEF_POS], record.states[:, OBJECT_POS]
        ax.plot(*eef.T, color=color, lw=1.2, alpha=0.8)
        ax.plot(*obj.T, color=color, lw=1.0, ls="--", alpha=0.6)
        ax.scatter(*eef[0], color="k", marker="o", s=18)
        ax.scatter(*eef[-1], color=color, marker="x", s=30)
        ax.scatter(*obj[0], color="k", marker="s", s=18)
        ax.scatter(*obj[-1], color=color, marker="*", s=60)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_zlabel("z (m)")
    ax.plot([], [], color=SUCCESS_COLOR, label="success (eef solid, object dashed)")
    ax.plot([], [], color=FAILURE_COLOR, label="failure")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_dream_vs_real(dream: EpisodeRecord, real: EpisodeRecord, path: Path) -> Path:
    """The same initial state played in the world model and in robosuite.

    Left: x/y/z of the end effector (top) and object (bottom) over time; the dream's mean with a
    shaded ±2σ band of the world-model ensemble spread, the real trajectory as a black line.
    Right: both paths in 3-D.
    """
    fig = plt.figure(figsize=(16, 6.5))
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1.5])
    std = dream.std if dream.std is not None else np.zeros_like(dream.states)
    for row, (part, label) in enumerate(((EEF_POS, "eef"), (OBJECT_POS, "object"))):
        for axis in range(3):
            ax = fig.add_subplot(grid[row, axis])
            index = part.start + axis
            t_dream, t_real = np.arange(len(dream.states)), np.arange(len(real.states))
            mean, spread = dream.states[:, index], 2 * std[:, index]
            ax.fill_between(t_dream, mean - spread, mean + spread, color=ENV_COLORS["dream"], alpha=0.25, lw=0)
            ax.plot(t_dream, mean, color=ENV_COLORS["dream"], label="dream (±2σ ensemble)")
            ax.plot(t_real, real.states[:, index], color="k", lw=1.2, label="real")
            ax.set_title(f"{label} {'xyz'[axis]}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if row == 0 and axis == 0:
                ax.legend(fontsize=8)
    ax3d = fig.add_subplot(grid[:, 3], projection="3d")
    for record, color, name in ((dream, ENV_COLORS["dream"], "dream"), (real, "k", "real")):
        ax3d.plot(*record.states[:, EEF_POS].T, color=color, label=f"{name} eef ({'success' if record.success else 'fail'})")
        ax3d.plot(*record.states[:, OBJECT_POS].T, color=color, ls="--", label=f"{name} object")
    ax3d.scatter(*real.states[0, EEF_POS], color="k", marker="o", s=20)
    ax3d.legend(fontsize=7)
    fig.suptitle(f"{dream.policy} on {dream.task}, seed {dream.seed}: dream vs real", fontsize=11)
    return _save(fig, path)


def plot_success_rates(summaries: Sequence[SuccessSummary], path: Path) -> Path:
    """Grouped bars: success rate per task for each (policy, env), with 95% Wilson intervals."""
    tasks = list(dict.fromkeys(s.task for s in summaries))
    groups = list(dict.fromkeys((s.policy, s.source) for s in summaries))
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(tasks) * max(1, len(groups) / 2)), 4))
    colors = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(dict.fromkeys(p for p, _ in groups))}
    for g, (policy, source) in enumerate(groups):
        rows = {s.task: s for s in summaries if (s.policy, s.source) == (policy, source)}
        xs = [i + (g - (len(groups) - 1) / 2) * width for i, t in enumerate(tasks) if t in rows]
        rates = [rows[t].success_rate for t in tasks if t in rows]
        low = [max(0.0, rows[t].success_rate - rows[t].ci_low) for t in tasks if t in rows]
        high = [max(0.0, rows[t].ci_high - rows[t].success_rate) for t in tasks if t in rows]
        ax.bar(xs, rates, width, yerr=[low, high], capsize=3, color=colors[policy], label=f"{policy} / {source}",
               hatch="//" if source.startswith("dream") else None, edgecolor="k", lw=0.5)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("success rate per task (hatched = dream, plain = real)", fontsize=10)
    return _save(fig, path)


def plot_trajectory_error(agreements: Sequence[Agreement], path: Path) -> Path:
    """Mean dream-vs-real distance of the end effector and the object over time, per task."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for agreement in agreements:
        for ax, errors in zip(axes, (agreement.eef_error, agreement.object_error), strict=True):
            where = f" @ {agreement.world_model}" if agreement.world_model else ""
            ax.plot(np.arange(len(errors)), errors, label=f"{agreement.task}{where} ({agreement.pairs} pairs)")
    for ax, name in zip(axes, ("end effector", "object"), strict=True):
        ax.set_title(f"{name}: |dream - real|")
        ax.set_xlabel("step")
        ax.set_ylabel("mean distance (m)")
        ax.legend(fontsize=8)
    return _save(fig, path)
