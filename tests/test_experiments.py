"""Experiment runs on the real MiniLM-L6 and RT sentences, shrunk to seconds: tidy rows, the
content-hash cache (hit, miss, recompute) and interrupted-run cleanliness."""

import pandas as pd
import pytest

from coalora import experiments
from coalora.experiments import RunSpec, run_experiment
from coalora.presets import RunSize
from coalora.search import SearchConfig
from coalora.training import HyperParams

TINY = RunSize(n_train=16, n_dev=16, batch_size=8, max_length=16, epochs=1, pool_size=3, n_random_unseen=1)
COLUMNS = ["method", "search", "backbone", "backbone_label", "task", "task_source", "stand_in", "preset", "quantizer",
           "configuration_id", "configuration_set", "budget", "avg_bits", "seen", "seed", "metric", "value", "loss",
           "train_seconds", "eval_seconds"]


def spec(method: str = "coalora", **kwargs) -> RunSpec:
    return RunSpec(preset="smoke", task="sst2", method=method, eval_budgets=(3.0,), unseen_budgets=(3.5,),
                   size=TINY, hp=HyperParams(epochs=1), **kwargs)


@pytest.fixture
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "run_dir", lambda s: tmp_path / "runs" / s.key())
    return tmp_path / "runs"


@pytest.mark.parametrize("method", ["coalora", "qlora"])
def test_run_writes_tidy_rows_and_caches(method, runs_in_tmp, monkeypatch):
    rows = run_experiment(spec(method))
    assert list(rows.columns) == COLUMNS
    assert not rows[["value", "avg_bits", "train_seconds", "eval_seconds"]].isna().any().any()
    assert set(rows["configuration_set"]) == ({"target", "unseen"} if method == "coalora" else {"target"})
    assert rows["task_source"].str.contains("stand-in for GLUE SST-2").all()
    assert rows["backbone_label"].str.contains("stands in for RoBERTa-Large").all()
    assert ((rows["value"] >= 0) & (rows["value"] <= 1)).all() and (rows["metric"] == "accuracy").all()
    if method == "coalora":
        assert not rows.loc[rows["configuration_set"] == "unseen", "seen"].any()
    folder = runs_in_tmp / spec(method).key()
    assert {p.name for p in folder.iterdir()} == {"rows.csv", "adapters.safetensors", "history.json",
                                                  "provenance.json", "search.csv"}

    def boom(_spec):
        raise AssertionError("a cached run must not be recomputed")
    monkeypatch.setattr(experiments, "_execute", boom)
    pd.testing.assert_frame_equal(run_experiment(spec(method)), rows)  # cache hit
    with pytest.raises(AssertionError, match="must not be recomputed"):
        run_experiment(spec(method), recompute=True)


def test_same_seed_same_numbers_other_seed_other_key(runs_in_tmp):
    first = run_experiment(spec("shared"))
    again = run_experiment(spec("shared"), recompute=True)
    pd.testing.assert_frame_equal(first.drop(columns=["train_seconds", "eval_seconds"]),
                                  again.drop(columns=["train_seconds", "eval_seconds"]))
    assert spec("shared", seed=1).key() != spec("shared").key()
    assert spec("shared").key() == spec("shared").resolved().key()


def test_interrupted_run_leaves_nothing_and_reruns(runs_in_tmp, monkeypatch):
    real = experiments.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec("qlora"))
    assert not runs_in_tmp.exists() or not any(runs_in_tmp.iterdir())
    monkeypatch.setattr(experiments, "train", real)
    assert len(run_experiment(spec("qlora"))) == 1


def test_interrupted_write_leaves_no_partial_folder(runs_in_tmp, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(experiments, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        run_experiment(spec("shared"))
    assert not any(runs_in_tmp.iterdir())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "lora"}, "unknown method 'lora'"),
    ({"preset": "tiny"}, "unknown preset 'tiny'"),
    ({"quantizer": "fp4"}, "unknown quantization space 'fp4'"),
    ({"task": "imdb"}, "unknown task 'imdb'; valid tasks: sst2"),
    ({"search": "greedy"}, "unknown search mode 'greedy'"),
    ({"search": 3}, "search must be a SearchConfig or a search mode"),
])
def test_bad_run_specs(kwargs, message):
    base = {"preset": "smoke", "task": "sst2", "method": "coalora"}
    with pytest.raises(ValueError, match=message):
        RunSpec(**(base | kwargs))


def test_task_without_offline_source_is_a_clear_error(runs_in_tmp):
    with pytest.raises(ValueError, match="only the 'paper' preset"):
        run_experiment(RunSpec(preset="smoke", task="qnli", method="qlora", size=TINY))


def test_pareto_search_run_records_its_rounds(runs_in_tmp):
    pareto = spec("coalora", search=SearchConfig("pareto", starts=2, steps=2, segments=2, batches=1))
    rows = run_experiment(pareto)
    assert (rows["search"] == "pareto").all()
    rounds = experiments.search_rounds(pareto)
    assert list(rounds.columns) == experiments.SEARCH_COLUMNS
    assert set(rounds["role"]) >= {"pool", "kept"} and (rounds["epoch"] == 0).all()
    assert rounds["loss"].notna().all()
    assert pareto.key() != spec("coalora").key()
    assert spec("coalora").key() == spec("coalora", search=SearchConfig(steps=99)).key()  # frozen ignores knobs
    assert spec("coalora", search="pareto").search == SearchConfig("pareto")  # a mode is a SearchConfig


def test_search_needs_coalora():
    with pytest.raises(ValueError, match="takes search='frozen'"):
        spec("qlora", search="random")


def test_seen_rows_reload_the_trained_adapter_and_score_its_training_set(runs_in_tmp):
    """The pool's budgets (2.25, 4.75, 7.25 for 3 configurations) as evaluation budgets make the targets
    training configurations, so the reloaded adapter must reproduce the run's own scores exactly."""
    run = RunSpec(preset="smoke", task="sst2", method="coalora", eval_budgets=(4.75, 7.25), unseen_budgets=(3.5,),
                  size=TINY, hp=HyperParams(epochs=1))
    rows = run_experiment(run)
    assert rows.loc[rows["configuration_set"] == "target", "seen"].all()
    seen = experiments.seen_rows(run)
    assert (seen["configuration_set"] == "seen").all() and seen["seen"].all()
    assert len(seen) == len(experiments.training_configurations(run.resolved()))
    both = rows[rows["configuration_set"] == "target"].merge(seen, on="configuration_id", suffixes=("", "_reloaded"))
    assert len(both) == 2
    pd.testing.assert_series_equal(both["value"], both["value_reloaded"], check_names=False)
    assert (runs_in_tmp / run.key() / "seen.csv").exists()
    pd.testing.assert_frame_equal(experiments.seen_rows(run), seen)        # cached
    with pytest.raises(ValueError, match="search='frozen'"):
        experiments.seen_rows(spec("qlora"))


def test_searched_run_trains_its_first_epoch_exactly_like_its_frozen_twin(runs_in_tmp):
    """The search's scoring batches must not advance the training loader's shuffle generator, so an
    ablation compares search modes on the same data order; the key also moves with SEARCH_VERSION."""
    import json
    frozen, random = spec("coalora"), spec("coalora", search="random")
    run_experiment(frozen), run_experiment(random)
    first = [json.loads((runs_in_tmp / s.key() / "history.json").read_text())[0]["loss"] for s in (frozen, random)]
    assert first[0] == first[1]


def test_evaluation_batches_are_length_sorted_and_cover_the_dev_split():
    run = spec("qlora").resolved()
    task, tokenizer, _, _, _, dev = experiments._setup(run)
    lengths = [int(n) for batch in dev for n in batch["attention_mask"].sum(dim=1)]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    expected = experiments.tokenize_classification(task.dev.shuffle(seed=0).select(range(TINY.n_dev)), tokenizer,
                                                   TINY.max_length)
    assert sorted(len(ids) for ids in expected["input_ids"]) == lengths
    labels = [int(x) for batch in dev for x in batch["labels"]]
    assert sorted(labels) == sorted(expected["labels"])
