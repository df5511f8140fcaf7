"""The figures' and tables' summaries, on small hand-made tidy frames (no model, no run): Table 1's
published numbers, per-budget means over seeds, the accuracy gap, fine-tuning time, hypervolumes,
the Table 1 layout, output folders and the results files with their provenance."""

import json

import numpy as np
import pandas as pd
import pytest

from coalora import studies
from coalora.methods import COMPARED, METHODS
from coalora.experiments import RunSpec
from coalora.presets import PRESETS

COLUMNS = ["method", "search", "backbone", "backbone_label", "task", "task_source", "stand_in", "preset", "quantizer",
           "configuration_id", "configuration_set", "budget", "avg_bits", "seen", "seed", "metric", "value", "loss",
           "chance", "train_seconds", "eval_seconds"]


def run_rows(method: str, seed: int, values: dict, train_seconds, configuration_set: str = "target",
             metric: str = "accuracy", avg_bits: dict | None = None) -> list[dict]:
    """Rows of one run in `experiments._score`'s format: `values` maps budget -> score (seen rows have no
    budget); `train_seconds` is one number (a shared training) or a dict budget -> seconds (one training
    per configuration)."""
    rows = []
    for budget, value in values.items():
        seconds = train_seconds[budget] if isinstance(train_seconds, dict) else train_seconds
        cid = (f"{method}-{configuration_set}-{budget}" if method in ("qlora", "lqlora")
               else f"cfg-{configuration_set}-{budget}")
        rows.append({
            "method": method, "search": "frozen", "backbone": "minilm-l6", "backbone_label": "MiniLM-L6",
            "task": "sst2", "task_source": "RT sentences", "stand_in": True, "preset": "smoke", "quantizer": "nf",
            "configuration_id": cid, "configuration_set": configuration_set,
            "budget": None if configuration_set == "seen" else budget,
            "avg_bits": (avg_bits or {}).get(budget, budget + 0.02), "seen": False, "seed": seed,
            "metric": metric, "value": value, "loss": 1.0 - value if metric == "accuracy" else np.log(value),
            "chance": 0.5 if metric == "accuracy" else 49152.0,
            "train_seconds": float(seconds), "eval_seconds": 0.5})
    return rows


def frame(*runs: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame([r for run in runs for r in run])
    assert list(out.columns) == COLUMNS
    return out


# ---- the paper's Table 1 ---------------------------------------------------------------------------

def test_paper_table1_has_every_cell():
    table = studies.paper_table1()
    assert len(table) == 48
    assert table.groupby("task").size().to_dict() == {"mnli": 16, "qnli": 16, "sst2": 16}
    assert set(table["method"]) == {"qlora", "lqlora", "shared", "coalora"}
    assert sorted(table["budget"].unique()) == [3.0, 4.0, 5.0, 6.0]
    assert (table["source"] == "paper").all()
    assert not table.duplicated(["task", "budget", "method"]).any()


@pytest.mark.parametrize(("task", "budget", "method", "value"), [
    ("sst2", 4.0, "coalora", 0.9254), ("qnli", 3.0, "qlora", 0.8537), ("mnli", 6.0, "shared", 0.7704),
    ("mnli", 3.0, "lqlora", 0.7397), ("sst2", 5.0, "lqlora", 0.9369), ("qnli", 6.0, "coalora", 0.8925),
])
def test_paper_table1_known_values(task, budget, method, value):
    for table in (studies.paper_table1(), studies.paper_table1(task)):
        cell = table[(table["task"] == task) & (table["budget"] == budget) & (table["method"] == method)]
        assert len(cell) == 1
        assert cell["value"].iloc[0] == pytest.approx(value, abs=1e-12)


def test_paper_table1_one_task():
    table = studies.paper_table1("qnli")
    assert len(table) == 16
    assert set(table["task"]) == {"qnli"}
    assert list(table.index) == list(range(16))


def test_paper_table1_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="qnli, mnli, sst2") as err:
        studies.paper_table1("cola")
    assert "'cola'" in str(err.value)


# ---- runs (no training: only what is decided before a run starts) ----------------------------------

def test_study_specs_one_per_method_and_seed():
    specs = studies.study_specs("smoke", "sst2", "int", seeds=(0, 1))
    assert [(s.method, s.seed) for s in specs] == [(m, s) for m in COMPARED for s in (0, 1)]
    assert "fp-lora" in COMPARED and "no-adapter" not in COMPARED
    assert {s.quantizer for s in specs} == {"int"} and {s.task for s in specs} == {"sst2"}
    pareto = studies.study_specs("smoke", "sst2", methods=["coalora"], search="pareto")
    assert [s.search.mode for s in pareto] == ["pareto"]


def test_search_history_and_seen_vs_unseen_refuse_wrong_specs():
    with pytest.raises(ValueError, match="search='pareto'"):
        studies.search_history(RunSpec(preset="smoke", task="sst2", method="coalora"))
    with pytest.raises(ValueError, match="method='coalora'"):
        studies.seen_vs_unseen([RunSpec(preset="smoke", task="sst2", method="qlora")])


# ---- by_budget -------------------------------------------------------------------------------------

def test_by_budget_mean_and_std_over_seeds():
    rows = frame(run_rows("qlora", 0, {3.0: 0.70, 4.0: 0.80}, {3.0: 1.0, 4.0: 2.0}),
                 run_rows("qlora", 1, {3.0: 0.74, 4.0: 0.90}, {3.0: 1.0, 4.0: 2.0}),
                 run_rows("qlora", 2, {3.0: 0.78, 4.0: 0.85}, {3.0: 1.0, 4.0: 2.0}))
    summary = studies.by_budget(rows)
    assert list(summary["budget"]) == [3.0, 4.0]
    assert summary["mean"].tolist() == pytest.approx([0.74, 0.85])
    assert summary["std"].tolist() == pytest.approx([np.std([0.70, 0.74, 0.78], ddof=1),
                                                     np.std([0.80, 0.90, 0.85], ddof=1)])
    assert summary["n_seeds"].tolist() == [3, 3]
    assert summary["avg_bits"].tolist() == pytest.approx([3.02, 4.02])


def test_by_budget_single_seed_has_zero_std_not_nan():
    summary = studies.by_budget(frame(run_rows("shared", 0, {3.0: 0.6, 5.0: 0.7}, 9.0)))
    assert summary["std"].tolist() == [0.0, 0.0]
    assert not summary.isna().any().any()
    assert summary["n_seeds"].tolist() == [1, 1]


def test_by_budget_counts_only_target_rows():
    rows = frame(run_rows("coalora", 0, {3.0: 0.80}, 5.0),
                 run_rows("coalora", 0, {3.0: 0.10, 3.5: 0.20}, 5.0, configuration_set="unseen"),
                 run_rows("coalora", 0, {3.0: 0.30}, 5.0, configuration_set="seen"))
    summary = studies.by_budget(rows)
    assert len(summary) == 1
    assert summary["mean"].iloc[0] == pytest.approx(0.80)
    assert summary["budget"].iloc[0] == 3.0


def test_by_budget_follows_method_order():
    rows = frame(*[run_rows(m, 0, {4.0: 0.5, 3.0: 0.4}, 1.0) for m in ("coalora", "shared", "lqlora", "qlora")])
    summary = studies.by_budget(rows)
    assert [str(m) for m in summary["method"]] == ["qlora", "qlora", "lqlora", "lqlora",
                                                   "shared", "shared", "coalora", "coalora"]
    assert summary["budget"].tolist() == [3.0, 4.0] * 4
    partial = studies.by_budget(frame(run_rows("coalora", 0, {3.0: 0.5}, 1.0), run_rows("qlora", 0, {3.0: 0.4}, 1.0)))
    assert [str(m) for m in partial["method"]] == ["qlora", "coalora"]


# ---- accuracy_gap ----------------------------------------------------------------------------------

def test_accuracy_gap_in_points_per_budget():
    rows = frame(run_rows("qlora", 0, {3.0: 0.80, 4.0: 0.90}, {3.0: 1.0, 4.0: 1.0}),
                 run_rows("qlora", 1, {3.0: 0.84, 4.0: 0.92}, {3.0: 1.0, 4.0: 1.0}),
                 run_rows("shared", 0, {3.0: 0.70, 4.0: 0.85}, 3.0),
                 run_rows("shared", 1, {3.0: 0.72, 4.0: 0.87}, 3.0),
                 run_rows("coalora", 0, {3.0: 0.99, 4.0: 0.99}, 3.0))
    gap = studies.accuracy_gap(rows)
    assert list(gap.columns) == ["budget", "qlora", "shared", "gap_points"]
    assert gap["budget"].tolist() == [3.0, 4.0]
    assert gap["qlora"].tolist() == pytest.approx([0.82, 0.91])
    assert gap["shared"].tolist() == pytest.approx([0.71, 0.86])
    assert gap["gap_points"].tolist() == pytest.approx([11.0, 5.0])
    other = studies.accuracy_gap(rows, method="coalora")
    assert other["gap_points"].tolist() == pytest.approx([100 * (0.82 - 0.99), 100 * (0.91 - 0.99)])


def test_accuracy_gap_missing_method():
    rows = frame(run_rows("qlora", 0, {3.0: 0.8}, {3.0: 1.0}))
    with pytest.raises(ValueError, match="shared"):
        studies.accuracy_gap(rows)
    with pytest.raises(ValueError, match="lqlora"):
        studies.accuracy_gap(rows, method="shared", reference="lqlora")


# ---- fine_tuning_time ------------------------------------------------------------------------------

def test_fine_tuning_time_per_configuration_methods_scale_with_n():
    rows = frame(run_rows("qlora", 0, {3.0: 0.8, 4.0: 0.9, 5.0: 0.9}, {3.0: 10.0, 4.0: 20.0, 5.0: 30.0}),
                 run_rows("qlora", 1, {3.0: 0.8, 4.0: 0.9, 5.0: 0.9}, {3.0: 30.0, 4.0: 40.0, 5.0: 50.0}),
                 run_rows("lqlora", 0, {3.0: 0.8, 4.0: 0.9}, {3.0: 6.0, 4.0: 6.0}),
                 run_rows("shared", 0, {3.0: 0.7, 4.0: 0.8}, 50.0),
                 run_rows("shared", 1, {3.0: 0.7, 4.0: 0.8}, 70.0),
                 run_rows("coalora", 0, {3.0: 0.8, 4.0: 0.9}, 200.0),
                 run_rows("coalora", 0, {3.3: 0.8, 4.7: 0.9}, 200.0, configuration_set="unseen"))
    times = studies.fine_tuning_time(rows, [1, 2, 5])
    assert [str(m) for m in times["method"]] == [m for m in ("qlora", "lqlora", "shared", "coalora") for _ in range(3)]
    seconds = {(str(m), n): s for m, n, s in zip(times["method"], times["n_configurations"], times["seconds"])}
    qlora_per_config = np.mean([np.mean([10, 20, 30]), np.mean([30, 40, 50])])  # 30
    for n in (1, 2, 5):
        assert seconds["qlora", n] == pytest.approx(n * qlora_per_config)
        assert seconds["lqlora", n] == pytest.approx(n * 6.0)
        assert seconds["shared", n] == pytest.approx(60.0)
        assert seconds["coalora", n] == pytest.approx(200.0)
    once = {str(m): bool(t) for m, t in zip(times["method"], times["trains_once"])}
    assert once == {"qlora": False, "lqlora": False, "shared": True, "coalora": True}
    assert times["n_configurations"].tolist() == [1, 2, 5] * 4


def test_fine_tuning_time_counts_a_configuration_once():
    # Two target budgets that the ILP maps to one configuration were trained once.
    rows = frame(run_rows("qlora", 0, {3.0: 0.8, 4.0: 0.9, 5.0: 0.9}, {3.0: 10.0, 4.0: 10.0, 5.0: 40.0}))
    rows.loc[rows["budget"] == 4.0, "configuration_id"] = rows.loc[rows["budget"] == 3.0, "configuration_id"].iloc[0]
    times = studies.fine_tuning_time(rows, [1, 3])
    assert times["seconds"].tolist() == pytest.approx([25.0, 75.0])


def test_fine_tuning_time_of_a_single_run():
    times = studies.fine_tuning_time(frame(run_rows("coalora", 0, {3.0: 0.8}, 5.0)), range(1, 4))
    assert [str(m) for m in times["method"]] == ["coalora"] * 3
    assert times["seconds"].tolist() == [5.0, 5.0, 5.0]
    assert times["trains_once"].all()


# ---- hypervolumes ----------------------------------------------------------------------------------

def test_hypervolumes_one_row_per_method_and_seed_and_dominance():
    budgets = [3.0, 4.0, 5.0]
    rows = frame(run_rows("qlora", 0, dict(zip(budgets, [0.70, 0.75, 0.80])), 1.0),
                 run_rows("qlora", 1, dict(zip(budgets, [0.71, 0.76, 0.79])), 1.0),
                 run_rows("coalora", 0, dict(zip(budgets, [0.80, 0.85, 0.90])), 1.0),
                 run_rows("coalora", 1, dict(zip(budgets, [0.81, 0.84, 0.91])), 1.0))
    hv = studies.hypervolumes(rows, (2.0, 8.0))
    assert sorted(zip(hv["method"], hv["seed"])) == [("coalora", 0), ("coalora", 1), ("qlora", 0), ("qlora", 1)]
    assert ((hv["hypervolume"] > 0) & (hv["hypervolume"] <= 1)).all() and (hv["n_points"] == 3).all()
    value = {(m, s): h for m, s, h in zip(hv["method"], hv["seed"], hv["hypervolume"])}
    assert min(value["coalora", 0], value["coalora", 1]) > max(value["qlora", 0], value["qlora", 1])
    by_method = studies.hypervolumes(rows, (2.0, 8.0), by=("method",))
    assert list(by_method.columns) == ["method", "hypervolume", "n_points"] and len(by_method) == 2


def test_hypervolumes_count_the_same_configurations_for_every_method():
    """Extra (unseen) points may only add volume, so a method scored on more configurations would win
    by its count: only the target configurations, which every method has, count."""
    budgets = [3.0, 4.0]
    base = [run_rows("qlora", 0, dict(zip(budgets, [0.70, 0.75])), 1.0),
            run_rows("coalora", 0, dict(zip(budgets, [0.70, 0.75])), 1.0)]
    with_unseen = frame(*base, run_rows("coalora", 0, {2.2: 0.74, 3.5: 0.8}, 1.0, configuration_set="unseen"))
    hv = studies.hypervolumes(with_unseen, (2.0, 8.0)).set_index("method")
    assert hv.loc["coalora", "hypervolume"] == hv.loc["qlora", "hypervolume"]
    assert hv.loc["coalora", "n_points"] == hv.loc["qlora", "n_points"] == 2


def test_hypervolumes_for_perplexity_use_a_fixed_log_scale_up_to_uniform_guessing():
    budgets = [3.0, 4.0, 5.0]
    vocabulary = 50_000.0
    rows = frame(run_rows("shared", 0, dict(zip(budgets, [80.0, 60.0, 50.0])), 1.0, metric="perplexity"),
                 run_rows("coalora", 0, dict(zip(budgets, [40.0, 30.0, 25.0])), 1.0, metric="perplexity"))
    rows["chance"] = vocabulary
    hv = studies.hypervolumes(rows, (2.0, 8.0)).set_index("method")["hypervolume"]
    assert hv["coalora"] > hv["shared"] > 0
    # One catastrophic point (worse than uniform guessing) adds nothing and takes nothing from the others.
    broken = pd.concat([rows, frame(run_rows("shared", 0, {2.5: 5.8e7}, 1.0, metric="perplexity"))
                        .assign(chance=vocabulary)])
    again = studies.hypervolumes(broken, (2.0, 8.0)).set_index("method")["hypervolume"]
    assert again["coalora"] == pytest.approx(hv["coalora"]) and again["shared"] == pytest.approx(hv["shared"])
    best = studies.hypervolumes(rows.assign(value=1.0), (2.0, 8.0))["hypervolume"]
    assert best.iloc[0] == pytest.approx(1 - (3.02 - 2.0) / 6.0)  # perplexity 1 at every budget: the full height


def test_references_summarise_the_full_precision_rows():
    rows = frame(run_rows("qlora", 0, {3.0: 0.7}, {3.0: 1.0}))
    ceiling = frame(*(run_rows("fp-lora", s, {32.0: v}, 1.0) for s, v in ((0, 0.80), (1, 0.84))))
    ceiling["configuration_set"], ceiling["budget"] = "reference", np.nan
    summary = studies.references(pd.concat([rows, ceiling]))
    assert list(summary["method"]) == ["fp-lora"] and summary["n_seeds"].iloc[0] == 2
    assert summary["mean"].iloc[0] == pytest.approx(0.82) and summary["std"].iloc[0] > 0


def test_with_references_appends_the_ceiling_as_a_full_precision_row():
    rows = frame(run_rows("qlora", 0, {3.0: 0.7, 4.0: 0.8}, {3.0: 1.0, 4.0: 1.0}))
    ceiling = frame(run_rows("fp-lora", 0, {32.0: 0.84}, 1.0))
    ceiling["configuration_set"], ceiling["budget"] = "reference", np.nan
    rows = pd.concat([rows, ceiling])
    summary = studies.by_budget(rows)
    written = studies.with_references(summary, rows)
    assert list(written.columns) == list(summary.columns)
    assert list(written["budget"]) == ["3", "4", "full precision"]
    assert written.iloc[-1]["method"] == "fp-lora" and written.iloc[-1]["mean"] == pytest.approx(0.84)
    pd.testing.assert_frame_equal(written.iloc[:2].drop(columns="budget"), summary.drop(columns="budget"),
                                  check_dtype=False, check_categorical=False)


def test_budget_labels_write_numbers_as_numbers_and_name_the_mean():
    frame = pd.DataFrame({"budget": [2.5, 3.0, np.nan], "estimate": [1.0, 2.0, 1.5]})
    assert list(studies.budget_labels(frame)["budget"]) == ["2.5", "3", "mean"]
    assert list(studies.budget_labels(frame.assign(budget=[2.5, "full precision", np.nan]), "all")["budget"]) == \
        ["2.5", "full precision", "all"]


# ---- wide_table ------------------------------------------------------------------------------------

def test_wide_table_cells_and_columns():
    rows = frame(run_rows("coalora", 0, {3.0: 0.80, 4.0: 0.90}, 1.0),
                 run_rows("coalora", 1, {3.0: 0.82, 4.0: 0.90}, 1.0),
                 run_rows("qlora", 0, {3.0: 0.70, 4.0: 0.751234}, {3.0: 1.0, 4.0: 1.0}),
                 run_rows("shared", 0, {3.0: 0.60, 4.0: 0.65}, 1.0),
                 run_rows("lqlora", 0, {3.0: 0.65, 4.0: 0.70}, {3.0: 1.0, 4.0: 1.0}))
    wide = studies.wide_table(studies.by_budget(rows))
    assert list(wide.columns) == ["QLoRA", "LQ-LoRA", "Shared-LoRA", "CoA-LoRA"]
    assert wide.index.name == "avg bits"
    assert list(wide.index) == [3.0, 4.0]
    assert wide.loc[3.0, "CoA-LoRA"] == f"81.00 ± {100 * np.std([0.80, 0.82], ddof=1):.2f}" == "81.00 ± 1.41"
    assert wide.loc[4.0, "CoA-LoRA"] == "90.00 ± 0.00"
    assert wide.loc[4.0, "QLoRA"] == "75.12"
    assert wide.loc[3.0, "Shared-LoRA"] == "60.00"
    assert wide.loc[3.0, "LQ-LoRA"] == "65.00"


def test_wide_table_keeps_only_present_methods_and_honours_decimals():
    rows = frame(run_rows("shared", 0, {3.0: 0.6}, 1.0), run_rows("qlora", 0, {3.0: 0.71234}, {3.0: 1.0}))
    wide = studies.wide_table(studies.by_budget(rows), decimals=3)
    assert list(wide.columns) == ["QLoRA", "Shared-LoRA"]
    assert wide.loc[3.0, "QLoRA"] == "71.234"
    assert wide.loc[3.0, "Shared-LoRA"] == "60.000"
    ppl = studies.wide_table(studies.by_budget(frame(run_rows("coalora", 0, {3.0: 25.5}, 1.0, metric="perplexity"))),
                             scale=1.0)
    assert ppl.loc[3.0, "CoA-LoRA"] == "25.50"


def test_wide_table_lays_out_the_papers_single_numbers_the_same_way():
    wide = studies.wide_table(studies.paper_table1("sst2"), value="value")
    assert list(wide.columns) == ["QLoRA", "LQ-LoRA", "Shared-LoRA", "CoA-LoRA"]
    assert list(wide.index) == [3.0, 4.0, 5.0, 6.0]
    assert wide.loc[3.0, "LQ-LoRA"] == "92.08" and wide.loc[6.0, "CoA-LoRA"] == "93.23"


# ---- output folders --------------------------------------------------------------------------------

def test_output_dirs_default_preset_writes_to_root(tmp_path):
    figures, results = studies.output_dirs("default", tmp_path)
    assert (figures, results) == (tmp_path / "figures", tmp_path / "results")
    assert figures.is_dir() and results.is_dir()


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "default"])
def test_output_dirs_other_presets_get_their_own_folder(tmp_path, preset):
    figures, results = studies.output_dirs(preset, str(tmp_path))
    assert (figures, results) == (tmp_path / "figures" / preset, tmp_path / "results" / preset)
    assert figures.is_dir() and results.is_dir()


def test_output_dirs_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="smoke, default, large, paper"):
        studies.output_dirs("huge", tmp_path)
    assert list(tmp_path.iterdir()) == []                     # nothing created


def test_project_root_found_from_a_subfolder(tmp_path):
    root = tmp_path / "project"
    (root / "notebooks" / "deeper").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    decoy = root / "notebooks" / "deeper" / "pkg"            # a pyproject.toml without notebooks/ is not it
    decoy.mkdir()
    (decoy / "pyproject.toml").write_text("")
    assert studies.project_root(decoy) == root.resolve()
    assert studies.project_root(root / "notebooks") == root.resolve()
    assert studies.project_root(str(root)) == root.resolve()


def test_project_root_defaults_to_the_working_directory(tmp_path, monkeypatch):
    lone = tmp_path / "lone"
    lone.mkdir()
    assert studies.project_root(lone) == lone.resolve()      # nothing above: the start itself
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    monkeypatch.chdir(root / "notebooks")
    assert studies.project_root() == root.resolve()
    figures, results = studies.output_dirs("smoke")
    assert figures == root.resolve() / "figures" / "smoke" and results == root.resolve() / "results" / "smoke"


# ---- results files ---------------------------------------------------------------------------------

def test_write_results_csv_and_provenance(tmp_path):
    summary = studies.by_budget(frame(run_rows("qlora", 0, {3.0: 0.7123456789}, {3.0: 1.0}),
                                      run_rows("coalora", 0, {3.0: 0.8}, 1.0)))
    parameters = {"preset": "smoke", "seeds": (0, 1), "n": np.int64(3), "scale": np.float64(0.5)}
    path = studies.write_results(summary, tmp_path / "out" / "table1_sst2.csv", parameters)
    assert path == tmp_path / "out" / "table1_sst2.csv"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table1_sst2.csv", "table1_sst2.provenance.json"]
    back = pd.read_csv(path)
    assert list(back.columns) == list(summary.columns)
    assert back["method"].tolist() == ["qlora", "coalora"]
    assert back["mean"].tolist() == pytest.approx([0.712346, 0.8])   # six significant digits
    record = json.loads((tmp_path / "out" / "table1_sst2.provenance.json").read_text())
    assert record["file"] == "table1_sst2.csv"
    assert record["parameters"] == {"preset": "smoke", "seeds": [0, 1], "n": 3, "scale": 0.5}
    assert record["rows"] == 2
    assert record["runs"] == []
    assert isinstance(record["packages"], dict) and "pandas" in record["packages"]
    assert record["python"]


def test_write_results_twice_gives_identical_files(tmp_path):
    rows = frame(run_rows("shared", 0, {3.0: 0.6, 4.0: 0.7}, 2.0))
    path = tmp_path / "rows.csv"
    studies.write_results(rows, path, {"preset": "smoke"})
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    studies.write_results(rows, path, {"preset": "smoke"})
    second = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(first) == ["rows.csv", "rows.provenance.json"]
    assert first == second                                   # byte-identical, no temporary files left


def test_write_results_records_each_run(tmp_path, monkeypatch):
    folders = {}

    def fake_run_dir(spec):
        folder = tmp_path / "runs" / f"{spec.method}-{spec.seed}"
        folders[spec.method, spec.seed] = folder
        return folder

    monkeypatch.setattr(studies, "run_dir", fake_run_dir)
    specs = studies.study_specs("smoke", "sst2", methods=["qlora", "coalora"], seeds=(0,))
    for spec in specs:
        folder = fake_run_dir(spec)
        folder.mkdir(parents=True)
        (folder / "provenance.json").write_text(json.dumps(
            {"created_utc": "2024-01-01T00:00:00", "git": "abc", "device": "cpu", "parameters": {"x": 1}}))
    studies.write_results(pd.DataFrame({"a": [1]}), tmp_path / "r.csv", {"specs": specs[0]}, specs)
    record = json.loads((tmp_path / "r.provenance.json").read_text())
    assert [(r["key"], r["method"], r["seed"], r["task"]) for r in record["runs"]] == [
        ("qlora-0", "qlora", 0, "sst2"), ("coalora-0", "coalora", 0, "sst2")]
    assert all(r["git"] == "abc" and r["device"] == "cpu" and "parameters" not in r for r in record["runs"])
    assert record["parameters"]["specs"]["method"] == "qlora"          # a RunSpec parameter as its fields


def test_per_example_pairs_only_runs_scored_on_the_same_configurations(monkeypatch):
    from coalora import experiments

    specs = [RunSpec(preset="smoke", task="sst2", method=m, seed=s) for m in ("qlora", "coalora") for s in (0, 1)]
    ids = {("qlora", 1): ["a", "x"]}  # one run scored at 3 bits on another configuration than the rest

    def fake_run(spec):
        cids = ids.get((spec.method, spec.seed), ["a", "b"])
        return pd.DataFrame({"configuration_set": "target", "budget": [2.5, 3.0], "configuration_id": cids})

    monkeypatch.setattr(studies, "run_experiment", fake_run)
    monkeypatch.setattr(experiments, "predictions", lambda spec: {c: np.ones(5) for c in "abx"})
    with pytest.raises(ValueError, match="qlora seed 1 was scored on other target configurations"):
        studies.per_example(specs)
    ids.clear()
    arrays, budgets = studies.per_example(specs)
    assert budgets == [2.5, 3.0] and {m: a.shape for m, a in arrays.items()} == {"qlora": (2, 2, 5),
                                                                                  "coalora": (2, 2, 5)}


@pytest.mark.parametrize("argv, message", [
    (["runs", "--task", "sst3"], "invalid choice: 'sst3' (choose from 'mnli', 'qnli', 'rt-polarity', 'sst2')"),
    (["runs", "--task", "c4"], "invalid choice: 'c4'"),
    (["runs", "--workers", "0"], "--workers must be >= 1, got 0"),
])
def test_runs_command_names_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        studies.main(argv)
    assert message in capsys.readouterr().err


def test_the_probe_reads_a_linear_label_and_not_a_random_one():
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=generator) * torch.linspace(0.1, 10, 16)  # unequal scales: standardised
    readable = (x[:, 0] > 0).long()
    random = torch.randint(0, 2, (400,), generator=generator)
    assert studies._probe_accuracy(x[:200], readable[:200], x[200:], readable[200:]) > 0.9
    assert studies._probe_accuracy(x[:200], random[:200], x[200:], random[200:]) < 0.65


def test_collect_recomputes_a_shared_run_once(monkeypatch):
    """The full-precision reference of the NF and the integer comparison is one run: recomputing both
    specs recomputes it once, and each spec still gets its rows."""
    calls = []
    monkeypatch.setattr(studies, "run_experiment", lambda spec, recompute: calls.append(recompute) or
                        pd.DataFrame({"quantizer": [spec.quantizer]}))
    specs = [RunSpec(preset="smoke", task="sst2", method="fp-lora", quantizer=q) for q in ("nf", "int")]
    assert specs[0].key() == specs[1].key()
    rows = studies.collect(specs, recompute=True)
    assert calls == [True, False] and list(rows["quantizer"]) == ["nf", "int"]
    calls.clear()
    studies.collect(specs)
    assert calls == [False, False]
