"""The figures' panels and files, drawn from small hand-made tidy frames (no model, no run): what each
panel draws, the axis labels, the caption, and that re-saving a figure gives identical PNG and PDF files."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from matplotlib.colors import to_hex

from coalora import plots, studies
from coalora.methods import METHODS


@pytest.fixture(autouse=True)
def project_style():
    """The project style for each test, without leaking it into other tests; every figure closed."""
    with matplotlib.rc_context(plots.STYLE):
        yield
    plt.close("all")


def rows(method: str, seed: int, values: dict, train_seconds=1.0, configuration_set: str = "target") -> list[dict]:
    return [{"method": method, "search": "frozen", "backbone": "minilm-l6", "backbone_label": "MiniLM-L6 (stand-in)",
             "task": "sst2", "task_source": "RT sentences (offline stand-in for GLUE SST-2)", "stand_in": True,
             "preset": "smoke", "quantizer": "nf", "configuration_id": f"{method}-{configuration_set}-{b}",
             "configuration_set": configuration_set, "budget": None if configuration_set == "seen" else b,
             "avg_bits": b + 0.02, "seen": False, "seed": seed, "metric": "accuracy", "value": v, "loss": 1 - v,
             "train_seconds": train_seconds[b] if isinstance(train_seconds, dict) else train_seconds,
             "eval_seconds": 0.1}
            for b, v in values.items()]


def tidy(*runs) -> pd.DataFrame:
    return pd.DataFrame([r for run in runs for r in run])


def labelled(ax) -> bool:
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel())


def legend_labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def data_lines(ax) -> list:
    """The lines that draw data (seaborn adds empty lines as legend keys)."""
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def bands(ax) -> list:
    """The filled bands that cover some area (seaborn adds an empty one for a single seed)."""
    return [c for c in ax.collections if c.get_paths() and len(c.get_paths()[0].vertices)]


# ---- files and captions ----------------------------------------------------------------------------

def draw_sample(fig) -> None:
    ax = fig.add_subplot()
    frame = tidy(rows("qlora", 0, {3.0: 0.7, 4.0: 0.8}, {3.0: 1.0, 4.0: 1.0}),
                 rows("qlora", 1, {3.0: 0.72, 4.0: 0.83}, {3.0: 1.0, 4.0: 1.0}),
                 rows("coalora", 0, {3.0: 0.75, 4.0: 0.85}))
    plots.plot_by_budget(ax, frame, "accuracy (%)")
    ax.legend()
    ax.set_title("sample – α")


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig = plt.figure(figsize=(3, 2))
    draw_sample(fig)
    paths = plots.save_figure(fig, tmp_path / "figs" / "sub", "sample")
    assert paths == [tmp_path / "figs" / "sub" / "sample.png", tmp_path / "figs" / "sub" / "sample.pdf"]
    assert paths[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert b"CreationDate" not in paths[1].read_bytes()
    assert b"Software" not in paths[0].read_bytes()


def test_save_figure_twice_is_byte_identical(tmp_path):
    fig = plt.figure(figsize=(3, 2))
    draw_sample(fig)
    first = plots.save_figure(fig, tmp_path / "a", "sample")
    second = plots.save_figure(fig, tmp_path / "b", "sample")
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.suffix
    again = plt.figure(figsize=(3, 2))                        # the same numbers drawn afresh
    draw_sample(again)
    third = plots.save_figure(again, tmp_path / "c", "sample")
    for a, c in zip(first, third):
        assert a.read_bytes() == c.read_bytes(), a.suffix


def test_use_style_sets_the_project_rc():
    plots.use_style()                                          # inside the fixture's rc_context: undone after
    assert plt.rcParams["savefig.dpi"] == 200
    assert plt.rcParams["pdf.fonttype"] == 42
    assert plt.rcParams["axes.spines.top"] is False


def test_the_library_leaves_the_backend_to_the_environment():
    """Importing coalora.plots must not switch the backend a notebook chose (e.g. inline)."""
    import subprocess
    import sys
    code = ("import matplotlib; matplotlib.use('svg'); import coalora.plots; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"


def test_caption_names_backbone_and_source_and_wraps():
    frame = tidy(rows("qlora", 0, {3.0: 0.7}), rows("coalora", 0, {3.0: 0.8}))
    text = plots.caption("Figure 1 (smoke preset, seeds [0])", frame, width=40)
    lines = text.split("\n")
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    flat = " ".join(text.split())
    assert flat.startswith("Figure 1 (smoke preset, seeds [0]): ")
    assert "MiniLM-L6 (stand-in) on RT sentences (offline stand-in for GLUE SST-2)" in flat
    assert "\n" not in plots.caption("F", frame)              # the default width holds it on one line


def test_caption_lists_every_backbone_and_source_once():
    other = tidy(rows("qlora", 0, {3.0: 0.7})).assign(backbone_label="Alpha", task_source="GLUE")
    frame = pd.concat([tidy(rows("qlora", 0, {3.0: 0.7}), rows("shared", 0, {3.0: 0.6})), other])
    text = plots.caption("T", frame, width=500)
    assert text == "T: Alpha; MiniLM-L6 (stand-in) on GLUE; RT sentences (offline stand-in for GLUE SST-2)"


# ---- panels ----------------------------------------------------------------------------------------

def test_plot_by_budget_one_line_per_method_in_its_style_no_band_for_one_seed():
    frame = tidy(rows("coalora", 0, {4.0: 0.85, 3.0: 0.75}),
                 rows("shared", 0, {3.0: 0.6, 4.0: 0.7}),
                 rows("qlora", 0, {3.0: 0.7, 4.0: 0.8}, {3.0: 1.0, 4.0: 1.0}),
                 rows("coalora", 0, {3.5: 0.1}, configuration_set="unseen"))   # not a target: not drawn
    fig, ax = plt.subplots()
    plots.plot_by_budget(ax, frame, "accuracy (%)")
    lines = data_lines(ax)
    assert len(lines) == 3 and not bands(ax)
    assert legend_labels(ax) == ["QLoRA", "Shared-LoRA", "CoA-LoRA"]            # METHODS order
    assert [to_hex(line.get_color()) for line in lines] == [METHODS[m].color.lower()
                                                             for m in ("qlora", "shared", "coalora")]
    assert [line.get_marker() for line in lines] == [METHODS[m].marker for m in ("qlora", "shared", "coalora")]
    coalora = lines[2]
    assert list(coalora.get_xdata()) == pytest.approx([3.02, 4.02])   # sorted by average bits
    assert list(coalora.get_ydata()) == pytest.approx([75.0, 85.0])   # in percent
    assert ax.get_ylabel() == "accuracy (%)" and labelled(ax)


def test_plot_by_budget_mean_and_std_band_only_for_methods_with_several_seeds():
    frame = tidy(rows("qlora", 0, {3.0: 0.7, 4.0: 0.8}, {3.0: 1.0, 4.0: 1.0}),
                 rows("qlora", 1, {3.0: 0.74, 4.0: 0.84}, {3.0: 1.0, 4.0: 1.0}),
                 rows("lqlora", 0, {3.0: 0.7, 4.0: 0.8}, {3.0: 1.0, 4.0: 1.0}),
                 rows("lqlora", 1, {3.0: 0.72, 4.0: 0.8}, {3.0: 1.0, 4.0: 1.0}),
                 rows("coalora", 0, {3.0: 0.75, 4.0: 0.85}))
    fig, ax = plt.subplots()
    plots.plot_by_budget(ax, frame, "accuracy (%)")
    assert list(data_lines(ax)[0].get_ydata()) == pytest.approx([72.0, 82.0])   # QLoRA's mean over seeds
    assert len(bands(ax)) == 2                                   # QLoRA and LQ-LoRA, not CoA-LoRA
    band = bands(ax)[0].get_paths()[0].vertices
    qlora_std = 100 * np.std([0.70, 0.74], ddof=1)
    assert band[:, 1].min() == pytest.approx(72.0 - qlora_std)
    assert band[:, 1].max() == pytest.approx(82.0 + qlora_std)


def test_plot_by_budget_unscaled_for_perplexity_and_optional_legend():
    frame = tidy(rows("shared", 0, {3.0: 40.0, 4.0: 30.0}))
    fig, ax = plt.subplots()
    plots.plot_by_budget(ax, frame, "perplexity", scale=1.0, legend=False)
    assert list(data_lines(ax)[0].get_ydata()) == [40.0, 30.0]
    assert ax.get_legend() is None


def test_plot_gap_draws_both_methods_and_the_gap():
    frame = tidy(rows("qlora", 0, {3.0: 0.8, 4.0: 0.9}, {3.0: 1.0, 4.0: 1.0}),
                 rows("shared", 0, {3.0: 0.7, 4.0: 0.85}), rows("coalora", 0, {3.0: 0.1, 4.0: 0.1}))
    fig, ax = plt.subplots()
    plots.plot_gap(ax, frame)
    lines = data_lines(ax)
    assert len(lines) == 2 and len(bands(ax)) == 1                # CoA-LoRA left out; the gap filled
    assert legend_labels(ax) == ["QLoRA", "Shared-LoRA", "gap"]
    assert list(lines[0].get_xdata()) == [3.0, 4.0]               # at the target budgets
    assert list(lines[0].get_ydata()) == pytest.approx([80.0, 90.0])
    gap = bands(ax)[0].get_paths()[0].vertices[:, 1]
    assert gap.min() == pytest.approx(70.0) and gap.max() == pytest.approx(90.0)
    assert labelled(ax)


def test_plot_cumulative_time_lines_per_method_in_minutes():
    frame = tidy(rows("qlora", 0, {3.0: 0.8, 4.0: 0.9}, {3.0: 60.0, 4.0: 120.0}),
                 rows("shared", 0, {3.0: 0.7, 4.0: 0.8}, 300.0),
                 rows("coalora", 0, {3.0: 0.8, 4.0: 0.9}, 600.0))
    times = studies.fine_tuning_time(frame, range(1, 5))
    fig, ax = plt.subplots()
    plots.plot_cumulative_time(ax, times)
    lines = data_lines(ax)
    assert len(lines) == 3
    assert legend_labels(ax) == ["QLoRA", "Shared-LoRA", "CoA-LoRA"]
    assert list(lines[0].get_ydata()) == pytest.approx([1.5, 3.0, 4.5, 6.0])
    assert list(lines[2].get_ydata()) == pytest.approx([10.0] * 4)
    assert labelled(ax)


def test_plot_seen_unseen_fills_seen_points():
    points = pd.DataFrame({"method": "coalora", "seed": 0, "configuration_id": list("abcde"),
                           "configuration_set": ["seen", "seen", "target", "unseen", "unseen"],
                           "avg_bits": [2.5, 5.0, 3.0, 3.5, 4.2], "value": [0.7, 0.9, 0.8, 0.82, 0.85],
                           "seen": [True, True, False, False, False]})
    fig, ax = plt.subplots()
    plots.plot_seen_unseen(ax, points)
    assert len(ax.collections) == 2
    assert legend_labels(ax) == ["seen configurations (2)", "unseen configurations (3)"]
    seen, unseen = ax.collections
    assert seen.get_offsets()[:, 1].tolist() == pytest.approx([70.0, 90.0])
    assert seen.get_facecolors()[0][3] == 1.0                  # filled
    assert len(unseen.get_facecolors()) == 0 or unseen.get_facecolors()[0][3] == 0.0   # hollow
    assert ax.get_xlabel()


def test_plot_search_rounds_one_front_per_epoch():
    rounds = pd.DataFrame(
        [{"epoch": e, "mode": "pareto", "role": role, "configuration_id": f"{e}{role}{i}", "avg_bits": 3.0 + i,
          "loss": 1.0 - 0.1 * i - 0.05 * e}
         for e in (0, 1) for role, n in (("pool", 4), ("proposal", 2), ("kept", 3)) for i in range(n)])
    fig, ax = plt.subplots()
    plots.plot_search_rounds(ax, rounds)
    fronts = data_lines(ax)
    assert len(fronts) == 2                                    # one front per epoch
    assert legend_labels(ax) == ["epoch 0: kept 3", "epoch 1: kept 3", "scored pool", "proposals"]
    assert list(fronts[1].get_xdata()) == [3.0, 4.0, 5.0]
    assert list(fronts[1].get_ydata()) == pytest.approx([0.95, 0.85, 0.75])
    assert sum(len(c.get_offsets()) for c in ax.collections) == 2 * (4 + 2)   # pool and proposals, kept drawn as lines
    assert labelled(ax)


def test_plot_search_rounds_single_epoch():
    rounds = pd.DataFrame({"epoch": [0, 0], "mode": "pareto", "role": ["pool", "kept"],
                           "configuration_id": ["a", "b"], "avg_bits": [3.0, 4.0], "loss": [0.5, 0.4]})
    fig, ax = plt.subplots()
    plots.plot_search_rounds(ax, rounds)
    assert len(data_lines(ax)) == 1 and labelled(ax)


def test_plot_workflow_draws_the_loop():
    fig, ax = plt.subplots()
    plots.plot_workflow(ax)
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 5 + 4                                 # four boxes, the centre label, four arrows
    assert "every epoch" in texts
    assert any("Pareto" in t for t in texts)
    assert not ax.axison
    assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (0.0, 1.0)


def test_reference_rows_draw_a_ceiling_and_a_dashed_floor():
    ceiling = tidy(rows("fp-lora", 0, {32.0: 0.9}), rows("fp-lora", 1, {32.0: 0.92}))
    ceiling["configuration_set"] = "reference"
    frame = pd.concat([tidy(rows("qlora", 0, {3.0: 0.7, 4.0: 0.8}, {3.0: 1.0, 4.0: 1.0}),
                            rows("no-adapter", 0, {3.0: 0.5, 4.0: 0.6}, 0.0)), ceiling])
    fig, ax = plt.subplots()
    plots.plot_by_budget(ax, frame, "accuracy (%)")
    assert legend_labels(ax) == ["QLoRA", "no adapter", "LoRA, full precision"]
    horizontal = [line for line in data_lines(ax) if len(set(line.get_ydata())) == 1 and line.get_xdata()[0] == 0]
    assert len(horizontal) == 1 and horizontal[0].get_ydata()[0] == pytest.approx(91.0)
    floor = [line for line in data_lines(ax) if to_hex(line.get_color()) == METHODS["no-adapter"].color.lower()]
    assert len(floor) == 1 and floor[0].get_linestyle() != "-"


def test_scaling_draws_the_dropout_arm_hollow_and_apart_from_the_checkpoint_arm():
    ax = plt.figure().add_subplot()
    gaps = pd.DataFrame([{"backbone": "mpnet-base", "n_train": 2048, "steps": 128, "backbone_dropout": dropout,
                          "gap": gap, "estimate": value - shift, "ci_low": value - shift - 1,
                          "ci_high": value - shift + 1}
                         for dropout, shift in ((np.nan, 0.0), (0.0, 5.0))
                         for gap, value in (("full precision - QLoRA, mean", 20.0), ("CoA - Shared", 1.0))])
    plots.plot_scaling(ax, gaps)
    lines = [bars.lines[0] for bars in ax.containers if len(bars.lines[0].get_xdata())]  # error bars with data
    assert len(lines) == 4                                   # two gaps x two arms
    hollow = [line for line in lines if line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))]
    assert len(hollow) == 2
    assert all(line.get_xdata()[0] > 128 for line in hollow)                       # nudged right
    assert all(line.get_xdata()[0] == 128 for line in lines if line not in hollow)
    assert legend_labels(ax) == ["full precision - QLoRA, mean", "CoA - Shared", "hollow: backbone dropout off"]
    assert labelled(ax)


def test_scaling_without_a_dropout_arm_has_no_hollow_key():
    ax = plt.figure().add_subplot()
    gaps = pd.DataFrame([{"backbone": "minilm-l6", "n_train": n, "steps": n // 16, "gap": "g", "estimate": 1.0,
                          "ci_low": 0.0, "ci_high": 2.0} for n in (2048, 4096)])
    plots.plot_scaling(ax, gaps)
    assert legend_labels(ax) == ["g"]
    assert list(ax.containers[0].lines[0].get_xdata()) == [128, 256]
