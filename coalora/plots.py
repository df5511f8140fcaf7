"""The figures' one style and their panels, drawn from the tidy frames of `coalora.studies`.

Every panel takes a matplotlib Axes and a tidy frame; `save_figure` writes PNG + PDF with fixed
metadata (no creation date), so re-rendering the same numbers does not change the files.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)  # headless by default; a notebook's inline backend still wins
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from coalora.studies import METHOD_LABELS, METHOD_ORDER  # noqa: E402

COLORS = {"qlora": "#4C72B0", "lqlora": "#DD8452", "shared": "#55A868", "coalora": "#C44E52"}
MARKERS = {"qlora": "s", "lqlora": "D", "shared": "^", "coalora": "o"}
STYLE = {
    "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight",
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "coalora",
}


def use_style() -> None:
    """Apply the project style to every later figure."""
    plt.rcParams.update(STYLE)


def save_figure(fig, folder: str | Path, name: str) -> list[Path]:
    """Write `<folder>/<name>.png` and `.pdf` with metadata that does not depend on the clock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], metadata={"Software": None})
    fig.savefig(paths[1], metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None})
    return paths


def caption(title: str, rows: pd.DataFrame, width: int = 150) -> str:
    """`title` and "backbone on data source", wrapped: every figure names its model and data, offline
    stand-ins included, from the rows it draws."""
    backbones = "; ".join(sorted(rows["backbone_label"].unique()))
    sources = "; ".join(sorted(rows["task_source"].unique()))
    return textwrap.fill(f"{title}: {backbones} on {sources}", width)


def _methods(frame: pd.DataFrame) -> list[str]:
    return [m for m in METHOD_ORDER if m in set(frame["method"].astype(str))]


def plot_by_budget(ax, summary: pd.DataFrame, ylabel: str, scale: float = 100.0) -> None:
    """Score vs average bits per method: the mean over seeds, with a band of one std when there is
    more than one seed (`summary` from `studies.by_budget`)."""
    for method in _methods(summary):
        s = summary[summary["method"].astype(str) == method].sort_values("avg_bits")
        ax.plot(s["avg_bits"], s["mean"] * scale, marker=MARKERS[method], color=COLORS[method],
                label=METHOD_LABELS[method], lw=1.5, ms=5)
        if (s["n_seeds"] > 1).any():
            ax.fill_between(s["avg_bits"], (s["mean"] - s["std"]) * scale, (s["mean"] + s["std"]) * scale,
                            color=COLORS[method], alpha=0.15, lw=0)
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel(ylabel)


def plot_seen_unseen(ax, points: pd.DataFrame, scale: float = 100.0) -> None:
    """CoA-LoRA's score per configuration, filled for configurations it trained on, hollow for ones
    it never saw (`points` from `studies.seen_vs_unseen`)."""
    for seen, style in ((True, {"facecolors": COLORS["coalora"]}), (False, {"facecolors": "none"})):
        p = points[points["seen"] == seen]
        ax.scatter(p["avg_bits"], p["value"] * scale, s=22, edgecolors=COLORS["coalora"], linewidths=1,
                   label=f"{'seen' if seen else 'unseen'} configurations ({len(p)})", **style)
    ax.set_xlabel("average bits per weight")


def plot_gap(ax, gap: pd.DataFrame, reference: str = "qlora", method: str = "shared") -> None:
    """Figure 1 (left): accuracy of one adapter per configuration vs one shared adapter, and the gap."""
    for m in (reference, method):
        ax.plot(gap["budget"], gap[m] * 100, marker=MARKERS[m], color=COLORS[m], label=METHOD_LABELS[m])
    ax.fill_between(gap["budget"], gap[method] * 100, gap[reference] * 100, color="grey", alpha=0.15,
                    label="gap")
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("accuracy (%)")


def plot_cumulative_time(ax, times: pd.DataFrame) -> None:
    """Figure 1 (right): fine-tuning seconds needed to serve n configurations."""
    for method in _methods(times):
        t = times[times["method"].astype(str) == method]
        ax.plot(t["n_configurations"], t["seconds"] / 60, marker=MARKERS[method], color=COLORS[method],
                label=METHOD_LABELS[method], ms=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of quantization configurations served")
    ax.set_ylabel("cumulative fine-tuning time (min)")


def plot_search_rounds(ax, rounds: pd.DataFrame) -> None:
    """Figure 2 (data): each epoch's scored pool (average bits vs loss), coloured by epoch, with the
    configurations the segmented Pareto filter kept joined as that epoch's front."""
    epochs = sorted(rounds["epoch"].unique())
    cmap = plt.get_cmap("viridis", max(len(epochs), 2))
    for i, epoch in enumerate(epochs):
        r = rounds[rounds["epoch"] == epoch]
        pool, kept = r[r["role"] == "pool"], r[r["role"] == "kept"].sort_values("avg_bits")
        proposals = r[r["role"] == "proposal"]
        ax.scatter(pool["avg_bits"], pool["loss"], s=14, color=cmap(i), alpha=0.5)
        ax.scatter(proposals["avg_bits"], proposals["loss"], s=18, marker="x", color=cmap(i))
        ax.plot(kept["avg_bits"], kept["loss"], color=cmap(i), lw=1.2, label=f"epoch {epoch}: kept {len(kept)}")
    ax.scatter([], [], s=14, color="grey", alpha=0.5, label="scored pool")
    ax.scatter([], [], s=18, marker="x", color="grey", label="proposals")
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("task loss on held-out training batches")


def plot_workflow(ax) -> None:
    """Figure 2 (schematic): the CoA-LoRA loop as four boxes and arrows."""
    steps = [("configuration set\n(ILP over 2.25-7.25 bits)", (0.2, 0.8)),
             ("train shared LoRA + θ\non K configurations per batch", (0.8, 0.8)),
             ("score pool, fit GP,\npropose by qLogEHVI", (0.8, 0.2)),
             ("segmented Pareto\nfilter", (0.2, 0.2))]
    for text, (x, y) in steps:
        ax.text(x, y, text, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round,pad=0.5", "fc": "#f2f2f2", "ec": "#555555"})
    for (_, a), (_, b) in zip(steps, steps[1:] + steps[:1]):
        lo, hi = (0.45, 0.55) if a[1] == b[1] else (0.3, 0.7)  # boxes are wide: short arrows sideways
        ax.annotate("", xy=(a[0] + hi * (b[0] - a[0]), a[1] + hi * (b[1] - a[1])),
                    xytext=(a[0] + lo * (b[0] - a[0]), a[1] + lo * (b[1] - a[1])),
                    arrowprops={"arrowstyle": "->", "color": "#555555"})
    ax.text(0.5, 0.5, "every epoch", ha="center", va="center", fontsize=8, style="italic")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
