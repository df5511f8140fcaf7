"""The figures' one style and their panels, drawn with seaborn from the tidy frames of `coalora.studies`.

Every panel takes a matplotlib Axes and a tidy frame (one row per method, seed and configuration, or
a summary of them) and lets seaborn do the grouping: one line per method in its colour and marker
from `coalora.methods.METHODS`, the mean over seeds with a band of one standard deviation where
there is more than one seed. `save_figure` writes PNG + PDF with fixed metadata (no creation date),
so re-rendering the same numbers does not change the files. The matplotlib backend is left to the
environment: inline in Jupyter, Agg on a machine without a display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from coalora.methods import METHODS

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight",
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "coalora",
}
BITS_LABEL = "average bits per weight"
# The search ablation's three modes: the full method in CoA-LoRA's colour, the two ablations in greys.
SEARCH_MODE_STYLES = {"pareto": (METHODS["coalora"].color, "o"), "frozen": ("#4d4d4d", "s"),
                      "random": ("#9a9a9a", "^")}


def use_style() -> None:
    """Apply the project style (seaborn's "ticks" theme with the rc above) to every later figure."""
    sns.set_theme(context="paper", style="ticks", rc=STYLE)


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


def _labelled(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """`frame` with its method keys replaced by their labels, and seaborn's per-method styling:
    hue order (METHODS order, present methods only), palette and markers keyed by label."""
    present = [m for m in METHODS if m in set(frame["method"].astype(str))]
    labels = [METHODS[m].label for m in present]
    styling = {"hue": "method", "style": "method", "hue_order": labels, "style_order": labels,
               "palette": {METHODS[m].label: METHODS[m].color for m in present},
               "markers": {METHODS[m].label: METHODS[m].marker for m in present},
               "dashes": {METHODS[m].label: (4, 2) if METHODS[m].reference else "" for m in present}}
    return frame.assign(method=frame["method"].astype(str).map(lambda m: METHODS[m].label)), styling


def _by_search_mode(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Like `_labelled`, for lines per search mode (column "search") in SEARCH_MODE_STYLES order."""
    present = [m for m in SEARCH_MODE_STYLES if m in set(frame["search"].astype(str))]
    styling = {"hue": "search", "style": "search", "hue_order": present, "style_order": present,
               "palette": {m: SEARCH_MODE_STYLES[m][0] for m in present},
               "markers": {m: SEARCH_MODE_STYLES[m][1] for m in present}, "dashes": False}
    return frame.assign(search=frame["search"].astype(str)), styling


def plot_by_budget(ax, rows: pd.DataFrame, ylabel: str, scale: float = 100.0, x: str = "avg_bits",
                   legend: bool = True, by: str = "method") -> None:
    """Score vs average bits per method (or per search mode, `by="search"`) at the target
    configurations: the mean over seeds, with a band of one std where there are several seeds
    (`rows`: tidy run rows, e.g. `studies.collect`)."""
    target = rows[rows["configuration_set"] == "target"]
    target = target.assign(value=target["value"] * scale)
    data, styling = _labelled(target) if by == "method" else _by_search_mode(target)
    sns.lineplot(data=data, x=x, y="value", errorbar="sd", legend="auto" if legend else False, ax=ax, **styling)
    for method, ref in rows[rows["configuration_set"] == "reference"].groupby("method"):  # a ceiling, bits aside
        spec, mean, std = METHODS[method], ref["value"].mean() * scale, ref["value"].std() * scale
        ax.axhline(mean, color=spec.color, ls=":", lw=1.2, label=spec.label if legend else None)
        if len(ref) > 1:
            ax.axhspan(mean - std, mean + std, color=spec.color, alpha=0.08, lw=0)
    if legend and ax.get_legend() is not None:
        ax.legend()
    ax.set_xlabel(BITS_LABEL if x == "avg_bits" else "target budget (bits)")
    ax.set_ylabel(ylabel)


def plot_hypervolumes(ax, hv: pd.DataFrame, by: str = "search") -> None:
    """One point per seed and the mean with a std bar, per search mode (`studies.hypervolumes(...,
    by=("search", "seed"))`)."""
    data, styling = _by_search_mode(hv)
    order = styling["hue_order"]
    sns.stripplot(data=data, x=by, y="hypervolume", order=order, hue=by, hue_order=order,
                  palette=styling["palette"], size=5, alpha=0.6, jitter=False, legend=False, ax=ax)
    sns.pointplot(data=data, x=by, y="hypervolume", order=order, errorbar="sd", color="black",
                  markers="_", linestyles="none", capsize=0.2, ax=ax)
    ax.set_xlabel("training-set refinement")
    ax.set_ylabel("hypervolume (target configurations)")


def plot_scaling(ax, gaps: pd.DataFrame) -> None:
    """The scaling study: each gap (`studies.scaling_gaps`) against training steps, with its 95 %
    interval as error bars, for one backbone; runs with the backbone's dropout off (backbone_dropout 0)
    hollow and nudged right, so the two arms at one step count stay apart."""
    palette = dict(zip(gaps["gap"].unique(), sns.color_palette("deep", gaps["gap"].nunique())))
    dropout = gaps.get("backbone_dropout", pd.Series(float("nan"), index=gaps.index))
    for off in (False, True):
        arm = gaps[dropout.eq(0) == off]
        for name, g in arm.groupby("gap", sort=False):
            g = g.sort_values("steps")
            ax.errorbar(g["steps"] * (1.12 if off else 1), g["estimate"],
                        yerr=[g["estimate"] - g["ci_low"], g["ci_high"] - g["estimate"]], marker="o", ms=4,
                        capsize=3, color=palette[name], mfc="white" if off else palette[name],
                        ls="--" if off else "-", label=None if off else name)
    if dropout.eq(0).any():
        # An empty error bar, so the key joins the gaps' entries (containers) at the end of the legend.
        ax.errorbar([], [], yerr=[], marker="o", ms=4, mfc="white", color="grey", ls="none",
                    label="hollow: backbone dropout off")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(gaps["steps"].unique()), [str(s) for s in sorted(gaps["steps"].unique())])
    ax.set_xlim(gaps["steps"].min() / 1.3, gaps["steps"].max() * 1.3)  # a lone step count is not stretched wide
    ax.set_xlabel("training steps")
    ax.set_ylabel("difference (accuracy points)")


def plot_seen_unseen(ax, points: pd.DataFrame, scale: float = 100.0) -> None:
    """CoA-LoRA's score per configuration, filled for configurations it trained on, hollow for ones
    it never saw (`points` from `studies.seen_vs_unseen`)."""
    color = METHODS["coalora"].color
    for seen, fill in ((True, color), (False, "none")):
        p = points[points["seen"] == seen]
        sns.scatterplot(x=p["avg_bits"], y=p["value"] * scale, s=22, facecolors=fill, edgecolors=color,
                        linewidths=1, ax=ax, label=f"{'seen' if seen else 'unseen'} configurations ({len(p)})")
    ax.set_xlabel(BITS_LABEL)
    ax.set_ylabel("accuracy (%)")


def plot_gap(ax, rows: pd.DataFrame, reference: str = "qlora", method: str = "shared") -> None:
    """Figure 1 (left): accuracy of one adapter per configuration (`reference`) and of one shared
    adapter (`method`) at each target budget, mean over seeds with a std band, and the gap between."""
    pair = rows[rows["method"].isin([reference, method])]
    plot_by_budget(ax, pair, "accuracy (%)", x="budget")
    means = (pair[pair["configuration_set"] == "target"].groupby(["budget", "method"])["value"].mean()
             .unstack("method") * 100)
    ax.fill_between(means.index, means[method], means[reference], color="grey", alpha=0.15, lw=0, label="gap")


def plot_cumulative_time(ax, times: pd.DataFrame) -> None:
    """Figure 1 (right): fine-tuning minutes needed to serve n configurations (`studies.fine_tuning_time`)."""
    data, styling = _labelled(times.assign(minutes=times["seconds"] / 60))
    sns.lineplot(data=data, x="n_configurations", y="minutes", errorbar=None, markersize=4, ax=ax, **styling)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of quantization configurations served")
    ax.set_ylabel("cumulative fine-tuning time (min)")


def plot_search_rounds(ax, rounds: pd.DataFrame) -> None:
    """Figure 2 (data): each epoch's scored pool (average bits vs loss) and proposals, coloured by
    epoch, with the configurations the segmented Pareto filter kept joined as that epoch's front."""
    epochs = sorted(rounds["epoch"].unique())
    palette = dict(zip(epochs, sns.color_palette("viridis", max(len(epochs), 2))))
    scored = rounds[rounds["role"] != "kept"].assign(
        role=rounds["role"].map({"pool": "scored pool", "proposal": "proposals"}))
    sns.scatterplot(data=scored, x="avg_bits", y="loss", hue="epoch", palette=palette, style="role",
                    markers={"scored pool": "o", "proposals": "X"}, style_order=["scored pool", "proposals"],
                    s=18, alpha=0.6, legend=False, ax=ax)
    kept = rounds[rounds["role"] == "kept"].sort_values(["epoch", "avg_bits"], kind="stable")
    fronts = {e: f"epoch {e}: kept {n}" for e, n in kept.groupby("epoch").size().items()}
    sns.lineplot(data=kept.assign(front=kept["epoch"].map(fronts)), x="avg_bits", y="loss", hue="front",
                 hue_order=list(fronts.values()), palette={fronts[e]: palette[e] for e in fronts}, sort=False,
                 estimator=None, lw=1.2, ax=ax)
    for role, marker in (("scored pool", "o"), ("proposals", "X")):  # legend keys for the point styles
        ax.scatter([], [], s=18, marker=marker, color="grey", label=role)
    ax.legend()
    ax.set_xlabel(BITS_LABEL)
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
