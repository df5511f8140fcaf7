"""Experiment runs on the real MiniLM-L6 and RT sentences, shrunk to seconds: tidy rows, the
content-hash cache (hit, miss, recompute) and interrupted-run cleanliness."""

import dataclasses
import json

import pandas as pd
import pytest
import torch

from coalora import experiments, lora, models, training
from coalora.configs import Configuration, QuantSpace
from coalora.experiments import RunSpec, run_experiment
from coalora.methods import METHODS
from coalora.presets import RunSize
from coalora.search import SearchConfig
from coalora.training import HyperParams

TINY = RunSize(n_train=16, n_dev=16, batch_size=8, max_length=16, epochs=1, pool_step=2.5, n_random_unseen=1)
COLUMNS = ["method", "search", "backbone", "backbone_label", "task", "task_source", "stand_in", "preset", "quantizer",
           "configuration_id", "configuration_set", "budget", "avg_bits", "seen", "seed", "metric", "value", "loss",
           "chance", "train_seconds", "eval_seconds"]


def spec(method: str = "coalora", **kwargs) -> RunSpec:
    """A run of seconds: 16 sentences, one epoch, a pool of 2.25 / 3.0 / 4.75 / 7.25 bits (every step
    trains on all of it), plain-error ILP."""
    fields = {"eval_budgets": (3.0,), "unseen_budgets": (3.5,), "size": TINY,
              "hp": HyperParams(epochs=1, configs_per_step=8), "weighting": "error"}
    return RunSpec(**({"preset": "smoke", "task": "sst2", "method": method} | fields | kwargs))


@pytest.fixture
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "run_dir", lambda s: tmp_path / "runs" / s.key())
    return tmp_path / "runs"


@pytest.mark.parametrize("method", ["coalora", "qlora"])
def test_run_writes_tidy_rows_and_caches(method, runs_in_tmp, monkeypatch):
    rows = run_experiment(spec(method))
    assert list(rows.columns) == COLUMNS
    assert not rows[["value", "avg_bits", "train_seconds", "eval_seconds"]].isna().any().any()
    assert set(rows["configuration_set"]) == {"target"}  # every method the same set; unseen ones on demand
    assert rows["task_source"].str.contains("stand-in for GLUE SST-2").all()
    assert rows["backbone_label"].str.contains("stands in for RoBERTa-Large").all()
    assert ((rows["value"] >= 0) & (rows["value"] <= 1)).all() and (rows["metric"] == "accuracy").all()
    assert rows["seen"].all()  # CoA-LoRA's pool holds the targets
    assert (rows["chance"] == 0.5).all()
    folder = runs_in_tmp / spec(method).key()
    assert {p.name for p in folder.iterdir()} == {"rows.csv", "predictions.npz", "adapters.safetensors",
                                                  "history.json", "steps.csv", "provenance.json", "search.csv"}
    steps = experiments.training_steps(spec(method))
    assert list(steps.columns) == experiments.STEP_COLUMNS and steps["loss"].notna().all()
    assert set(steps["configuration_id"]) <= set(rows["configuration_id"]) | {c.digest() for c in
                                                                              experiments.training_configurations(
                                                                                  spec(method).resolved())}
    predictions = experiments.predictions(spec(method))
    assert set(predictions) == set(rows["configuration_id"])
    for cid, value in zip(rows["configuration_id"], rows["value"]):
        assert predictions[cid].shape == (TINY.n_dev,) and predictions[cid].mean() == pytest.approx(value)

    def boom(_spec):
        raise AssertionError("a cached run must not be recomputed")
    monkeypatch.setattr(experiments, "_execute", boom)
    pd.testing.assert_frame_equal(run_experiment(spec(method)), rows)  # cache hit
    with pytest.raises(AssertionError, match="must not be recomputed"):
        run_experiment(spec(method), recompute=True)


@pytest.mark.parametrize("method", ["qlora", "lqlora", "shared", "coalora-no-theta", "coalora", "fp-lora"])
def test_same_seed_same_numbers_other_seed_other_key(method, runs_in_tmp, monkeypatch):
    # Table 1's methods, in bf16 as every preset trains; the second LQ-LoRA run fits its decomposition again.
    hp = HyperParams(epochs=1, configs_per_step=8, precision="bf16", lqlora_iterations=2)
    first = run_experiment(spec(method, hp=hp))
    monkeypatch.setattr(training, "_LOW_RANK", type(training._LOW_RANK)())
    again = run_experiment(spec(method, hp=hp), recompute=True)
    pd.testing.assert_frame_equal(first.drop(columns=["train_seconds", "eval_seconds"]),
                                  again.drop(columns=["train_seconds", "eval_seconds"]))
    assert spec(method, hp=hp, seed=1).key() != spec(method, hp=hp).key()
    assert spec(method, hp=hp).key() == spec(method, hp=hp).resolved().key()


def test_data_too_small_for_the_held_out_slice_is_an_error_not_an_untrained_model(runs_in_tmp, tmp_path):
    from coalora.data import DataSpec

    path = tmp_path / "few.csv"
    path.write_text("text,label\n" + "\n".join(f"sentence {i},{i % 2}" for i in range(30)) + "\n")
    few = spec("qlora", task=DataSpec(str(path), "classification"))  # 27 training rows, 32 held out
    with pytest.raises(ValueError, match="holds out the first 32 training examples .* has 27"):
        run_experiment(few)
    assert not runs_in_tmp.exists() or not any(runs_in_tmp.iterdir())


def test_theta_learning_rate_splits_only_runs_with_theta():
    for method, splits in (("coalora", True), ("coalora-no-theta", False), ("qlora", False)):
        other = spec(method, hp=HyperParams(epochs=1, configs_per_step=8, theta_lr=3e-4))
        assert (other.key() != spec(method).key()) == splits, method


def test_lqlora_iterations_split_only_lqlora_runs_and_the_smoke_preset_caps_them():
    for method, splits in (("lqlora", True), ("loftq", False), ("qlora", False), ("coalora", False)):
        other = spec(method, hp=HyperParams(epochs=1, configs_per_step=8, lqlora_iterations=3))
        assert (other.key() != spec(method).key()) == splits, method
    smoke = {m: RunSpec("smoke", "sst2", m).resolved().hp.lqlora_iterations for m in ("lqlora", "loftq")}
    assert smoke == {"lqlora": 2, "loftq": training.MAX_LQLORA_ITERATIONS}
    assert RunSpec("default", "sst2", "lqlora").resolved().hp.lqlora_iterations == training.MAX_LQLORA_ITERATIONS


@pytest.mark.parametrize("name", ["lqlora_iterationz", "precision", "epochs"])
def test_a_preset_hp_table_setting_what_it_cannot_names_the_valid_ones(name, monkeypatch):
    monkeypatch.setitem(experiments.get_preset("smoke").hp, name, 2)
    with pytest.raises(ValueError, match=rf"sets hyper-parameters \['{name}'\] in its hp table; valid: .*lqlora_iter"):
        RunSpec("smoke", "sst2", "lqlora").key()


def test_the_learning_rate_schedule_splits_runs():
    constant = spec("qlora", hp=HyperParams(epochs=1, configs_per_step=8, lr_schedule="constant"))
    assert constant.key() != spec("qlora").key()


def test_pool_draw_by_error_splits_runs_and_draws_other_configurations(runs_in_tmp):
    uniform = spec("coalora", hp=HyperParams(epochs=1, configs_per_step=1))
    by_error = spec("coalora", hp=HyperParams(epochs=1, configs_per_step=1, pool_draw="by-error"))
    assert by_error.key() != uniform.key()
    assert uniform.key() == spec("coalora", hp=HyperParams(epochs=1, configs_per_step=1, pool_draw="uniform")).key()
    drawn = {name: list(experiments.training_steps(s)["configuration_id"]) for name, s in
             (("uniform", uniform), ("by-error", by_error))}
    assert drawn["uniform"] != drawn["by-error"]
    qlora = spec("qlora", hp=HyperParams(epochs=1, configs_per_step=1, pool_draw="by-error"))
    assert qlora.key() == spec("qlora", hp=HyperParams(epochs=1, configs_per_step=1)).key()  # no pool to draw from


def test_warmup_splits_runs():
    plain = spec("shared", hp=HyperParams(epochs=1, configs_per_step=1))
    cold = spec("shared", hp=HyperParams(epochs=1, configs_per_step=1, warmup=0))
    assert cold.key() != plain.key()
    assert spec("shared", hp=HyperParams(epochs=1, configs_per_step=1, warmup=0.2)).key() != plain.key()


def test_theta_at_the_loras_rate_is_one_run_however_it_is_written():
    default = spec("coalora", hp=HyperParams(epochs=1, configs_per_step=8))
    assert default.resolved().hp.theta_lr is None
    written = spec("coalora", hp=HyperParams(epochs=1, configs_per_step=8, theta_lr=HyperParams().lr))
    assert written.key() == default.key()
    assert spec("coalora", hp=HyperParams(epochs=1, configs_per_step=8, theta_lr=1e-4)).key() != default.key()


def test_scaling_study_trains_without_warmup_and_theta_at_its_rate_whatever_the_defaults():
    from coalora.studies import SCALING_HP, scaling_specs

    specs = {s.method: s for s in scaling_specs("smoke", "sst2", ["minilm-l6"], [64])}
    for method, s in specs.items():
        hp = s.resolved().hp
        assert hp.warmup == SCALING_HP["warmup"] == 0
        assert hp.theta_lr == (SCALING_HP["theta_lr"] if METHODS[method].theta else None)
        default = RunSpec(preset="smoke", task="sst2", method=method, backbone="minilm-l6", size=s.size,
                          eval_budgets=s.eval_budgets)
        assert s.key() != default.key()  # the defaults' warm-up is not the study's


def test_mask_draw_splits_runs_and_reaches_every_backbone_dropout_layer():
    plain = spec("qlora", hp=HyperParams(epochs=1, configs_per_step=8, mask_draw="torch"))
    assert plain.key() != spec("qlora").key()
    for run, kind in ((spec("qlora"), models.PackedDropout), (plain, torch.nn.Dropout)):
        model = experiments._setup(run.resolved())[2]
        kinds = {type(m) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Dropout) and "lora_" not in name}
        assert kinds == {kind}
        config = next(m.config for m in model.modules() if hasattr(m, "config"))  # the backbone's
        assert (config._attn_implementation == models.PACKED_ATTENTION) == (kind is models.PackedDropout)
    with pytest.raises(ValueError, match="unknown mask draw 'mkl'; valid mask draws: torch, packed"):
        HyperParams(mask_draw="mkl")


def test_backbone_dropout_off_splits_runs_and_silences_every_dropout_layer():
    off = spec("qlora", hp=HyperParams(epochs=1, configs_per_step=8, backbone_dropout=0.0)).resolved()
    assert off.key() != spec("qlora").key()
    for run, p in ((spec("qlora").resolved(), 0.1), (off, 0.0)):  # MiniLM-L6's checkpoint sets 0.1
        model = experiments._setup(run)[2]
        probabilities = {m.p for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Dropout) and "lora_" not in name}
        assert probabilities == {p}
    batch = next(iter(experiments._setup(off)[4]))
    model = lora.set_configuration(experiments._setup(off)[2], None).train()
    with torch.no_grad():
        first, second = (model(**batch).logits for _ in range(2))
    torch.testing.assert_close(first, second)  # nothing random left in a training-mode forward
    with pytest.raises(ValueError, match="backbone_dropout must be None .* or in \\[0, 1\\), got 1.5"):
        HyperParams(backbone_dropout=1.5)


def test_feature_probe_measures_the_quantized_backbone_against_full_precision():
    from coalora import studies

    probe = studies.feature_probe("minilm-l6", [None, 2.5], preset="smoke", n_sentences=32)
    full, low = probe.iloc[0], probe.iloc[1]
    assert full["error"] == 0 and full["two_bit_share"] == 0 and full["avg_bits"] == 32
    assert low["error"] > 0.1 and low["two_bit_share"] > 0.5 and abs(low["avg_bits"] - 2.5) < 0.1
    assert low["cosine"] > full["cosine"]  # 2-bit matrices make the sentences' features alike
    assert (probe["dropout_noise"] > 0).all()  # the checkpoint's dropout moves a training-mode forward


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
    # no run folder, whole or partial: only the training checkpoint a rerun resumes from
    assert [p.name for p in runs_in_tmp.iterdir()] == [experiments.checkpoint_path(spec("shared")).name]


@pytest.mark.parametrize(("method", "fields"), [
    ("coalora", {"search": "pareto", "hp": HyperParams(epochs=2, configs_per_step=2)}),
    ("qlora", {"eval_budgets": (3.0, 4.0)}),
], ids=["coalora-pareto", "qlora"])
def test_an_interrupted_training_resumes_from_its_checkpoint_to_the_same_result(method, fields, runs_in_tmp,
                                                                                monkeypatch):
    """Stopped right after its first checkpoint (epoch 1 of 2; configuration 1 of 2), a rerun resumes and
    ends with the uninterrupted run's adapters, rows, losses and search rounds."""
    import shutil

    from safetensors.torch import load_file

    from coalora import training

    run = spec(method, **fields)
    calls = []
    counted = training._backward
    monkeypatch.setattr(training, "_backward", lambda *a, **k: calls.append(1) or counted(*a, **k))
    whole = run_experiment(run)
    n_whole = len(calls)
    folder = runs_in_tmp / run.key()
    kept = {name: (folder / name).read_text() for name in ("steps.csv", "search.csv", "history.json")}
    adapters = load_file(folder / "adapters.safetensors")
    shutil.rmtree(folder)
    real = training._save_checkpoint

    def save_then_stop(path, data):
        real(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(run)
    assert experiments.checkpoint_path(run).exists() and not folder.exists()
    monkeypatch.setattr(training, "_save_checkpoint", real)
    calls.clear()
    resumed = run_experiment(run)
    assert len(calls) == n_whole // 2  # the second half only: epoch 2 of 2, or configuration 2 of 2
    assert not experiments.checkpoint_path(run).exists()
    timing = ["train_seconds", "eval_seconds"]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), whole.drop(columns=timing))
    again = load_file(folder / "adapters.safetensors")
    assert again.keys() == adapters.keys() and all(torch.equal(again[k], adapters[k]) for k in adapters)
    for name, text in kept.items():
        assert (folder / name).read_text() == text, name


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
    assert spec("coalora").key() != spec("coalora", search=SearchConfig(batches=3)).key()  # but not the slice
    assert spec("coalora", search="pareto").search == SearchConfig("pareto")  # a mode is a SearchConfig


def test_search_needs_coalora():
    with pytest.raises(ValueError, match="takes search='frozen'"):
        spec("qlora", search="random")


def test_seen_rows_reload_the_trained_adapter_and_score_its_training_set(runs_in_tmp):
    """The targets are in the training set, so the reloaded adapter must reproduce the run's own scores."""
    run = spec("coalora", eval_budgets=(3.0, 4.0))
    rows = run_experiment(run)
    assert rows.loc[rows["configuration_set"] == "target", "seen"].all()
    seen = experiments.seen_rows(run)
    assert (seen["configuration_set"] == "seen").all() and seen["seen"].all()
    drawn = set(experiments.training_steps(run)["configuration_id"])
    assert set(seen["configuration_id"]) == drawn  # the configurations a step drew, each once
    assert len(seen) == len(drawn) and drawn <= {c.digest() for c in experiments.training_configurations(run.resolved())}
    both = rows[rows["configuration_set"] == "target"].merge(seen, on="configuration_id", suffixes=("", "_reloaded"))
    assert len(both) == 2
    pd.testing.assert_series_equal(both["value"], both["value_reloaded"], check_names=False)
    assert (runs_in_tmp / run.key() / "seen.csv").exists()
    pd.testing.assert_frame_equal(experiments.seen_rows(run), seen)        # cached
    with pytest.raises(ValueError, match="search='frozen'"):
        experiments.seen_rows(spec("qlora"))


def test_searched_run_trains_its_first_epoch_exactly_like_its_frozen_twin(runs_in_tmp):
    """The search's scoring batches must not advance the training loader's shuffle generator, so an
    ablation compares search modes on the same data order."""
    import json
    frozen, random = spec("coalora"), spec("coalora", search="random")
    run_experiment(frozen), run_experiment(random)
    first = [json.loads((runs_in_tmp / s.key() / "history.json").read_text())[0]["loss"] for s in (frozen, random)]
    assert first[0] == first[1]


def test_the_pool_holds_the_targets_and_seen_is_exactly_what_was_trained_on():
    run = spec("coalora", eval_budgets=(2.5, 3.0, 3.5, 4.0)).resolved()
    pool = {c.digest() for c in experiments.training_configurations(run)}
    layout = experiments.training_configurations(run)[0].layout
    targets = {c.digest() for role, _, c in experiments.evaluation_configurations(run) if role == "target"}
    assert len(targets) == 4
    assert targets <= pool and len(pool) >= 4 + 3  # the grid 2.25, 4.75, 7.25 and the four targets
    qlora = spec("qlora", eval_budgets=(2.5, 3.0, 3.5, 4.0)).resolved()
    assert {c.digest() for c in experiments.training_configurations(qlora)} == targets


def test_unseen_rows_score_what_no_step_drew_from_the_reloaded_adapter(runs_in_tmp):
    run = spec("coalora", unseen_budgets=(2.5, 3.5))
    rows = run_experiment(run)
    unseen = experiments.unseen_rows(run)
    assert list(unseen.columns) == COLUMNS and (unseen["configuration_set"] == "unseen").all()
    assert not unseen["seen"].any() and unseen["budget"].isna().sum() == TINY.n_random_unseen
    drawn = set(experiments.training_steps(run)["configuration_id"])
    layout = experiments.training_configurations(run.resolved())[0].layout
    offered = [c.digest() for _, _, c in experiments.unseen_configurations(run.resolved(), layout)]
    assert list(unseen["configuration_id"]) == [c for c in offered if c not in drawn]
    assert not set(unseen["configuration_id"]) & set(rows["configuration_id"])
    predictions = experiments.unseen_predictions(run)
    assert set(predictions) == set(unseen["configuration_id"])
    for cid, value in zip(unseen["configuration_id"], unseen["value"]):
        assert predictions[cid].shape == (TINY.n_dev,) and predictions[cid].mean() == pytest.approx(value)
    pd.testing.assert_frame_equal(experiments.unseen_rows(run), unseen)  # cached
    with pytest.raises(ValueError, match="no one adapter for every configuration.*coalora"):
        experiments.unseen_rows(spec("qlora"))


def test_a_run_with_nothing_unseen_caches_rows_that_read_back(runs_in_tmp):
    run = spec("coalora", unseen_budgets=(), size=dataclasses.replace(TINY, n_random_unseen=0))
    for unseen in (experiments.unseen_rows(run), experiments.unseen_rows(run)):  # computed, then read from the cache
        assert unseen.empty and list(unseen.columns) == COLUMNS
    assert experiments.unseen_predictions(run) == {}


@pytest.mark.parametrize("method, moot, value", [("fp-lora", "quantizer", "int"), ("no-adapter", "seed", 1)])
def test_what_cannot_change_a_run_shares_it_and_the_rows_say_what_was_asked(method, moot, value, runs_in_tmp,
                                                                                 monkeypatch):
    """The full-precision reference quantizes nothing and the no-adapter floor trains nothing: the NF
    and integer references, or every seed's floor, are one computation under one key."""
    first = run_experiment(spec(method))
    other = spec(method, **{moot: value})
    assert other.key() == spec(method).key() and other.canonical() == spec(method).canonical()

    def boom(_spec):
        raise AssertionError("an equal computation must not run twice")
    monkeypatch.setattr(experiments, "_execute", boom)
    again = run_experiment(other)
    assert (again[moot] == value).all() and (first[moot] != value).all()
    pd.testing.assert_frame_equal(again.drop(columns=moot), first.drop(columns=moot))
    assert experiments.run_many([spec(method), other]) == 0
    kept = {"fp-lora": ("seed", 1), "no-adapter": ("quantizer", "int")}[method]  # what still splits them
    assert spec(method, **dict([kept])).key() != spec(method).key()


def test_seen_marks_trained_on_configurations_not_the_last_pool(runs_in_tmp, monkeypatch):
    """A search that proposes configurations after the last epoch leaves them in the final pool
    untrained: they are not seen. One that drops a trained configuration keeps it seen."""
    from coalora import training

    real = training.train
    trained_pool = {}

    def spy(method, model, configurations, batches, hp, seed, refine=None, **kwargs):
        trained = real(method, model, configurations, batches, hp, seed, refine, **kwargs)
        trained_pool["trained_on"] = set(trained.trained_on)
        trained_pool["final"] = {c.digest() for c in trained.configurations}
        return trained
    monkeypatch.setattr(experiments, "train", spy)
    run = spec("coalora", search="random", eval_budgets=(3.0,), unseen_budgets=(2.5, 3.5))
    rows = pd.concat([run_experiment(run), experiments.unseen_rows(run)])
    assert trained_pool["final"] - trained_pool["trained_on"]  # the last search's proposals: never trained on
    for cid, seen in zip(rows["configuration_id"], rows["seen"]):
        assert seen == (cid in trained_pool["trained_on"])


def test_search_scores_on_a_held_out_slice_no_method_trains_on():
    run = spec("coalora", search=SearchConfig("pareto", batches=1)).resolved()
    task, tokenizer, *_ = experiments._setup(run)
    texts = lambda loader: {tokenizer.decode(ids, skip_special_tokens=True) for b in loader for ids in b["input_ids"]}
    held_out = texts(experiments._batches(task, tokenizer, run, "search", shuffle=False))
    trained = texts(experiments._batches(task, tokenizer, run, "train", shuffle=True))
    assert len(held_out) == run.search.batches * TINY.batch_size and len(trained) == TINY.n_train
    assert not held_out & trained


def test_evaluation_batches_are_length_sorted_and_cover_the_dev_split():
    run = spec("qlora").resolved()
    task, tokenizer, _, _, _, dev, _ = experiments._setup(run)
    lengths = [int(n) for batch in dev for n in batch["attention_mask"].sum(dim=1)]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    expected = experiments.tokenize_classification(task.dev.shuffle(seed=0).select(range(TINY.n_dev)), tokenizer,
                                                   TINY.max_length)
    assert sorted(len(ids) for ids in expected["input_ids"]) == lengths
    labels = [int(x) for batch in dev for x in batch["labels"]]
    assert sorted(labels) == sorted(expected["labels"])


def test_theta_off_rescores_every_configuration_of_the_run(runs_in_tmp):
    run = spec("coalora")
    rows = run_experiment(run)
    off = experiments.theta_off_rows(run)
    assert list(off["configuration_id"]) == list(rows["configuration_id"])
    assert (off["search"] == "frozen").all() and (runs_in_tmp / run.key() / "theta_off.csv").exists()
    with pytest.raises(ValueError, match="needs a method with theta"):
        experiments.theta_off_rows(spec("qlora"))


def test_theta_told_another_configuration_keeps_each_rows_weights(runs_in_tmp, monkeypatch):
    from coalora.hypernet import ConfigAwareModel

    run = spec("coalora", eval_budgets=(2.5, 4.0))
    own = experiments.predictions(run)
    told_index = experiments._allocate(run.resolved(), 4.0).encode(QuantSpace.nf())
    seen, weights = [], set()
    adjustments, forward = ConfigAwareModel.adjustments, lora.CoALoRAModel.forward

    def spy_theta(self, index):  # the index theta is fed at every forward
        seen.append(index)
        return adjustments(self, index)

    def spy_model(self, *args, **kwargs):  # the configuration whose quantized weights the forward runs
        weights.add(self.configuration.digest())
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(ConfigAwareModel, "adjustments", spy_theta)
    monkeypatch.setattr(lora.CoALoRAModel, "forward", spy_model)
    told = experiments.theta_told_predictions(run, 4.0)
    targets = run_experiment(run).query("configuration_set == 'target'").sort_values("budget")["configuration_id"]
    assert sorted(told) == sorted(targets) and weights == set(targets)
    assert (told[targets.iloc[1]] == own[targets.iloc[1]]).all()  # told its own configuration: the run's scores
    assert seen and all((index.flatten() == torch.as_tensor(told_index)).all() for index in seen)
    monkeypatch.setattr(experiments, "_reloaded", None)  # a second call reads the cached file
    assert all((experiments.theta_told_predictions(run, 4.0)[c] == told[c]).all() for c in told)
    with pytest.raises(ValueError, match="needs a method with theta, got 'shared'"):
        experiments.theta_told_predictions(spec("shared"), 4.0)


def test_theta_adjustments_measure_how_far_theta_moves_the_shared_lora(runs_in_tmp):
    from coalora import studies

    run = spec("coalora", eval_budgets=(2.5, 4.0))
    found = studies.theta_adjustments([run])
    assert list(found["budget"]) == [2.5, 4.0] and (found["adjustment"] > 0).all()
    # The same share computed the long way: B M A - B A from the materialized adapter, matrix by matrix.
    model = experiments.trained_model(run)
    with torch.no_grad():
        low, high = (lora.materialize(model, experiments._allocate(run.resolved(), b)).state_dict for b in (2.5, 4.0))
    shares, parts = [], []
    for name, layer in model.lora_layers.items():
        a, b = (layer.lora_A[lora.ADAPTER].weight.detach().float(),
                layer.lora_B[lora.ADAPTER].weight.detach().float())
        key = f"{lora._SAVED_PREFIX}{name}.lora_A.weight"
        shares.append(float(torch.linalg.norm(b @ (low[key].float() - a)) / torch.linalg.norm(b @ a)))
        # Two budgets: each sits half their difference from their mean.
        parts.append(float(torch.linalg.norm(b @ (low[key].float() - high[key].float())) / 2 / torch.linalg.norm(b @ a)))
    assert found["adjustment"].iloc[0] == pytest.approx(sum(shares) / len(shares), rel=1e-3)
    assert list(found["configuration_part"]) == pytest.approx([sum(parts) / len(parts)] * 2, rel=1e-3)
    assert sum(parts) > 0
    with pytest.raises(ValueError, match="got 'shared'; choose among .*coalora"):
        studies.theta_adjustments([spec("shared")])


def test_head_features_read_the_trained_adapter_at_each_target_and_are_cached(runs_in_tmp, monkeypatch):
    from coalora import studies

    run = spec("shared", eval_budgets=(2.5, 4.0))
    features = studies.head_features([run])
    rows = run_experiment(run)
    targets = rows[rows["configuration_set"] == "target"]
    assert list(features["budget"]) == [2.5, 4.0]
    assert list(features["accuracy"]) == pytest.approx(list(100 * targets["value"]))
    assert features["cosine"].between(-1, 1).all() and features["cosine"].nunique() == 2  # each budget its own
    monkeypatch.setattr(experiments, "_reloaded", None)  # a second call reads the run's cached file
    pd.testing.assert_frame_equal(studies.head_features([run]), features)
    with pytest.raises(ValueError, match="got method 'qlora'; choose among .*shared"):
        studies.head_features([spec("qlora")])
    with pytest.raises(ValueError, match="task 'c4' is a causal-lm task; classification tasks: .*sst2"):
        studies.head_features([spec("shared", task="c4")])


def test_a_trained_model_serves_as_real_bitsandbytes_nf4_layers(runs_in_tmp, tmp_path):
    """The deployment path: a smoke-trained CoA-LoRA materialized at uniform NF4 (what bitsandbytes holds
    natively) and loaded with PEFT on MiniLM-L6 in real 4-bit layers predicts as the fake-quantized model
    on >= 99 % of the 872 dev sentences."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import DataCollatorWithPadding

    from coalora.configs import BNB_NF4
    from coalora.data import load_task, tokenize_classification

    run = spec("coalora", size=None, hp=None, eval_budgets=None, unseen_budgets=None)  # the smoke preset's run
    model = experiments.trained_model(run)
    configuration = Configuration.uniform(model.layout, BNB_NF4)
    lora.materialize(model, configuration).save_pretrained(tmp_path / "adapter")
    base, tokenizer = models.load_backbone("minilm-l6", num_labels=2, four_bit=True)
    assert len(models.quantized_linears(base)) == 36 and all(
        isinstance(m, bnb.nn.Linear4bit) for m in models.quantized_linears(base).values())
    assert not isinstance(base.classifier, bnb.nn.Linear4bit) and not isinstance(base.bert.pooler.dense,
                                                                                  bnb.nn.Linear4bit)
    deployed = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    lora.set_configuration(model, configuration).eval()
    dev = tokenize_classification(load_task("sst2", "default").dev, tokenizer, 64)
    collate, agree = DataCollatorWithPadding(tokenizer), []
    with torch.no_grad():
        for start in range(0, len(dev), 64):
            batch = collate([dev[i] for i in range(start, min(start + 64, len(dev)))])
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            agree.append(model(**inputs).logits.argmax(-1) == deployed(**inputs).logits.argmax(-1))
    agreement = torch.cat(agree).float().mean().item()
    assert len(dev) == 872 and agreement >= 0.99, agreement


@pytest.mark.parametrize("step", [0.1, 0.25, 0.5, 1.25])
def test_unseen_budgets_are_never_in_the_initial_pool(step):
    budgets = experiments.unseen_budgets(step, experiments.EVAL_BUDGETS["nf"])
    pool = {round(float(b), 4) for b in experiments.pool_budgets(step)} | set(experiments.EVAL_BUDGETS["nf"])
    assert not set(budgets) & pool
    assert len(budgets) == (experiments.N_UNSEEN_BUDGETS if step <= 0.5 else 4)  # a 1.25-bit grid has 4 gaps


def test_run_many_computes_what_is_missing_side_by_side_and_nothing_twice(monkeypatch):
    import shutil

    monkeypatch.setattr(experiments, "_cpu_count", lambda: 2)  # a thread each, on any machine

    specs = [spec("fp-lora", seed=11), spec("qlora", seed=11), spec("qlora", seed=11)]  # a repeat runs once
    folders = {experiments.run_dir(s.resolved()) for s in specs}
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        reports = []
        assert experiments.run_many(specs, workers=2, report=reports.append) == 2
        assert "2 runs to compute" in reports[0] and "1 threads each" in reports[0]
        assert sorted(line.split("]")[0] for line in reports[1:]) == ["[1/2", "[2/2"]  # one line per finished run
        for folder in folders:
            assert (folder / "rows.csv").exists()
            assert "1 torch threads" in json.loads((folder / "provenance.json").read_text())["device"]
        assert experiments.run_many(specs, workers=2) == 0
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_run_many_keeps_the_seeds_of_one_low_rank_initialisation_in_one_job():
    specs = [spec(m, seed=s).resolved() for m in ("lqlora", "qlora", "coalora") for s in (0, 1)]
    jobs = experiments._jobs(specs)
    assert sorted(len(job) for job in jobs) == [1, 1, 1, 1, 2]
    assert [s for s in specs if s.method == "lqlora"] in jobs
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        experiments.run_many(specs, workers=0)


def test_jobs_run_longest_first_by_estimated_seconds():
    """A 3-epoch searching CoA-LoRA run outlasts a 2-epoch frozen one, a 4-adapter QLoRA run a
    shared one, the causal LM's run its classification twin, and a shared run scored on four budgets
    the full-precision reference's one evaluation: each goes first."""
    pairs = [(spec("coalora", search="pareto", hp=HyperParams(epochs=3)), spec("coalora")),
             (spec("qlora", eval_budgets=(2.5, 3.0, 3.5, 4.0)), spec("shared", eval_budgets=(2.5, 3.0, 3.5, 4.0))),
             (spec("qlora", task="c4"), spec("qlora")),
             (spec("shared", eval_budgets=(2.5, 3.0, 3.5, 4.0)), spec("fp-lora"))]
    for long, short in pairs:
        long, short = long.resolved(), short.resolved()
        assert experiments._estimated_seconds(long) > experiments._estimated_seconds(short)
        assert experiments._jobs([short, long]) == [[long], [short]]


def test_a_failed_run_is_named():
    bad = spec("qlora", seed=12, task="qnli")  # no offline source: fails on loading
    with pytest.raises(RuntimeError, match=r"run qlora .* seed 12 .* failed"):
        experiments._run_job([bad], False, None)
