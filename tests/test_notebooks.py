"""The notebook sequence: paired scripts in sync, no committed outputs, one `parameters` cell each, and
every notebook executed headless with papermill at the smoke preset, checking the files it writes."""

import ast
import json
from pathlib import Path

import jupytext
import pandas as pd
import papermill
import pytest

from coalora import studies

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [ROOT / "notebooks" / "scaling.ipynb"]
# notebook -> {results file: (required columns, minimum rows)} at the smoke preset with seed 0
EXPECTED = {
    "01_fig1_motivation": {
        "fig1_accuracy_gap.csv": (["budget", "qlora", "shared", "gap_points", "ci_low", "ci_high"], 4),
        "fig1_fine_tuning_time.csv": (["method", "n_configurations", "seconds", "trains_once"], 4 * 20)},
    "02_fig2_workflow": {
        "fig2_search_rounds.csv": (["epoch", "mode", "role", "configuration_id", "avg_bits", "loss"], 6)},
    "03_table1": {
        "table1_sst2.csv": (["method", "budget", "mean", "std", "n_seeds", "avg_bits"], 16)},
    "04_fig3_bitwidth": {
        "fig3_accuracy_by_bits.csv": (["method", "budget", "mean", "std", "quantizer"], 32),
        "fig3_coalora_seen_unseen.csv": (["configuration_id", "avg_bits", "value", "seen"], 8),
        "fig3_coalora_minus_no_theta.csv": (["budget", "estimate", "ci_low", "ci_high", "n_seeds", "quantizer"],
                                            2 * (4 + 1)),
        "fig3_hypervolume.csv": (["method", "seed", "hypervolume", "quantizer"], 8)},
    "05_fig4_perplexity": {
        "fig4_perplexity_by_bits.csv": (["method", "budget", "mean", "std", "n_seeds"], 16),
        "fig4_hypervolume.csv": (["method", "seed", "hypervolume", "n_points"], 6)},
    "06_fig8_search_ablation": {
        "fig8_search_ablation.csv": (["search", "budget", "mean", "std", "n_seeds", "avg_bits"], 3 * 4),
        "fig8_hypervolume.csv": (["search", "seed", "hypervolume"], 3)},
    "07_claims": {
        "claims.csv": (["claim", "paper", "ours", "ci_low", "ci_high", "n_seeds", "verdict"], 12)},
    "scaling": {
        "scaling_gaps.csv": (["backbone", "n_train", "steps", "backbone_dropout", "gap", "estimate", "ci_low",
                              "ci_high"], (2 + 1) * 4),
        "scaling_dropout.csv": (["backbone", "n_train", "backbone_dropout", "method", "seed", "budget", "accuracy"],
                                2 * (1 + 4 * 2)),
        "scaling_probe.csv": (["backbone", "budget", "avg_bits", "two_bit_share", "probe", "cosine", "error",
                               "dropout_noise"], 2),
        "scaling_head_features.csv": (["backbone", "n_train", "backbone_dropout", "method", "seed", "budget",
                                       "accuracy", "cosine"], 3 * 2)},
}
# Smoke parameters beyond the preset: the scaling study on one backbone at two small sizes, its dropout
# arm at the first, and the probe at two budgets.
SMOKE = {"scaling": {"backbones": ["minilm-l6"], "n_trains": [32, 64], "mpnet_n_trains": [],
                     "dropout_off_n_trains": {"minilm-l6": [32]}, "probe_budgets": [None, 2.5], "probe_sentences": 32}}
# Files whose readings quote the full-precision ceiling: it stands in them as a row of its own.
WITH_CEILING = {"table1_sst2.csv", "fig3_accuracy_by_bits.csv", "fig4_perplexity_by_bits.csv"}
SEQUENCE_KEYS = {spec.resolved().key() for spec in studies.sequence_specs("smoke", seeds=[0])}
FIGURES = {"01_fig1_motivation": "fig1_motivation", "02_fig2_workflow": "fig2_workflow",
           "04_fig3_bitwidth": "fig3_bitwidth", "05_fig4_perplexity": "fig4_perplexity",
           "06_fig8_search_ablation": "fig8_search_ablation", "scaling": "scaling"}


def _execute(notebook: Path, out_dir: Path, **parameters) -> Path:
    executed = out_dir / notebook.name
    papermill.execute_notebook(str(notebook), str(executed), kernel_name="python3", cwd=str(ROOT),
                               parameters={"preset": "smoke", "seeds": [0], "output_root": str(out_dir),
                                           **parameters}, progress_bar=False)
    return executed


@pytest.mark.parametrize("notebook", [nb for nb in NOTEBOOKS if nb.stem[:2].isdigit()], ids=lambda p: p.stem)
def test_sequence_specs_use_the_notebooks_default_parameters(notebook):
    # A parameters cell holds literals, so the defaults are stated there and in coalora.studies both.
    defaults = {"task": "sst2", "seeds": list(studies.SEQUENCE_SEEDS), "seed": studies.SEQUENCE_SEEDS[0],
                "epochs": studies.SEQUENCE_ABLATION_EPOCHS, "ablation_epochs": studies.SEQUENCE_ABLATION_EPOCHS}
    parameters = {name: value["default"] for name, value in papermill.inspect_notebook(str(notebook)).items()}
    for name in defaults.keys() & parameters.keys():
        assert ast.literal_eval(parameters[name]) == defaults[name], (notebook.stem, name)


def test_every_notebook_is_expected():
    assert [nb.stem for nb in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_paired_script_is_in_sync(notebook):
    script = notebook.with_suffix(".py")
    assert script.exists(), f"{notebook.name} has no paired {script.name}"
    a, b = jupytext.read(notebook), jupytext.read(script)
    assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in a.cells] == \
           [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in b.cells]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs_and_one_parameters_cell(notebook):
    nb = json.loads(notebook.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    source = "".join(tagged[0]["source"])
    for name in ("preset", "recompute", "output_root"):
        assert f"{name} =" in source
    assert "seeds =" in source or "seed =" in source
    assert nb["cells"][0]["cell_type"] == "markdown" and "Paper, " in "".join(nb["cells"][0]["source"])
    assert nb["cells"][-1]["cell_type"] == "markdown" and "Reading" in "".join(nb["cells"][-1]["source"])


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_and_writes_its_files(notebook, tmp_path):
    _execute(notebook, tmp_path, **SMOKE.get(notebook.stem, {}))
    results = tmp_path / "results" / "smoke"
    for name, (columns, min_rows) in EXPECTED[notebook.stem].items():
        frame = pd.read_csv(results / name)
        assert set(columns) <= set(frame.columns), f"{name}: {sorted(frame.columns)}"
        assert len(frame) >= min_rows
        assert not frame[columns].isna().any().any(), f"NaN in {name}"
        if name in WITH_CEILING:
            ceiling = frame[frame["budget"] == studies.FULL_PRECISION]
            assert list(ceiling["method"].unique()) == ["fp-lora"] and len(ceiling) >= 1, name
        record = json.loads((results / name).with_name(name.replace(".csv", ".provenance.json")).read_text())
        assert record["parameters"]["preset"] == "smoke" and record["rows"] == len(frame)
        assert all(run["key"] for run in record["runs"])
        if notebook.stem[:2].isdigit():  # `python -m coalora.studies runs` computes every run the sequence reads
            assert {run["key"] for run in record["runs"]} <= SEQUENCE_KEYS, name
    if notebook.stem in FIGURES:
        for suffix in (".png", ".pdf"):
            assert (tmp_path / "figures" / "smoke" / (FIGURES[notebook.stem] + suffix)).stat().st_size > 1000
    assert not list((tmp_path / "results").rglob(".*.tmp*")), "temporary files left behind"


def test_table1_rewrites_identical_files_on_a_cache_hit(tmp_path):
    # Files written from freshly computed runs equal those written from the same runs read back from the
    # cache. That a recomputed run gives the same numbers is tested per method of the table (test_experiments.py).
    notebook = ROOT / "notebooks" / "03_table1.ipynb"
    first, second = tmp_path / "a", tmp_path / "b"
    for out, recompute in ((first, True), (second, False)):
        out.mkdir()
        _execute(notebook, out, recompute=recompute)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.suffix in (".csv", ".json"))
    assert files
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_table1_names_the_preset_for_tasks_without_an_offline_source(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="paper"):
        _execute(ROOT / "notebooks" / "03_table1.ipynb", tmp_path, task="qnli")
