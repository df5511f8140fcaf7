"""Experiments: a run is a small frozen dataclass; its tidy result rows, per-example predictions,
provenance and trained adapter weights are cached on disk under a content hash of the run, so
notebooks share runs.

    RunSpec --key()--> COALORA_HOME/runs/<key>/{rows.csv, predictions.npz, provenance.json,
                                                adapters.safetensors, history.json, steps.csv, search.csv}

A run directory is written in a temporary folder and renamed into place when complete, so an
interrupted run leaves nothing behind and is recomputed on the next call; `recompute=True` forces a
rerun. The protocol (docs/method.md#evaluation): every method is scored on the same target
configurations, CoA-LoRA's training set contains them, `seen` means trained on, and the search
scores on a held-out slice of the training split that no method trains on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from coalora import assets, lora, models
from coalora.allocation import COST_TABLE_VERSION, WEIGHTINGS, allocate
from coalora.configs import Configuration, QuantSpace, unique
from coalora.data import DataSpec, lm_blocks, load_task, task_identity, task_type, tokenize_classification
from coalora.methods import METHODS, check_method, method as get_method
from coalora.metrics import TASK_METRICS, evaluate
from coalora.names import check_name
from coalora.presets import RunSize, preset as get_preset
from coalora.repro import (atomic_path, from_main, processes, provenance, seed_everything, write_directory,
                           write_json_atomic)
from coalora.search import ConfigurationSearch, SearchConfig, fixed_batches
from coalora.training import FULL_PRECISION, MAX_LQLORA_ITERATIONS, HyperParams, Trained, train

logger = logging.getLogger(__name__)

RUN_VERSION = 6  # bump when training or evaluation changes numbers or a run folder's files: every run is recomputed

# The paper's evaluation budgets: its NF figures at 2.5-4 bits, its integer table at 3-6 bits.
EVAL_BUDGETS = {"nf": (2.5, 3.0, 3.5, 4.0), "int": (3.0, 4.0, 5.0, 6.0)}
POOL_RANGE = (2.25, 7.25)  # the initial CoA-LoRA training set spans this (docs/method.md#training)
SEARCH_COLUMNS = ["epoch", "mode", "role", "configuration_id", "avg_bits", "loss"]
STEP_COLUMNS = ["adapter", "epoch", "step", "configuration_id", "loss"]  # every forward of training
# One scored configuration of a run (rows.csv, seen.csv, unseen.csv, theta_off.csv); named here so that a
# run scored on no configuration still writes a file that reads back with its columns.
SCORE_COLUMNS = ["method", "backbone", "backbone_label", "task", "task_source", "stand_in", "preset", "quantizer",
                 "configuration_id", "configuration_set", "budget", "avg_bits", "seen", "seed", "metric", "value",
                 "loss", "chance", "train_seconds", "eval_seconds"]
N_UNSEEN_BUDGETS = 5  # ILP configurations half-way between CoA-LoRA's initial pool budgets
# What cannot change the numbers of a method that quantizes nothing, or of one that trains nothing: the
# canonical spec sets these to RunSpec's defaults, so equal computations share one cached run.
MOOT = {"full-precision": ("quantizer", "eval_budgets", "unseen_budgets", "pool_range", "weighting"),
        "none": ("seed",)}
# Fake-quantized weights shared by every run of this process: equal weights quantize alike, so a
# notebook's runs over seeds and methods quantize each (matrix, option) once.
WEIGHT_CACHE = lora.WeightCache()


def preset_hyperparams(preset: str, epochs: int) -> HyperParams:
    """The hyper-parameters of `preset`'s runs of `epochs` epochs: its precision and the fields it sets."""
    chosen = get_preset(preset)
    # epochs come from the preset's run sizes and precision from its own key, so its hp table sets neither.
    valid = [f.name for f in fields(HyperParams) if f.name not in ("epochs", "precision")]
    unknown = sorted(set(chosen.hp) - set(valid))
    if unknown:
        raise ValueError(f"preset {preset!r} sets hyper-parameters {unknown} in its hp table; valid: "
                         f"{', '.join(valid)} (epochs: sizes.*.epochs; precision: the preset's precision key)")
    return HyperParams(epochs=epochs, precision=chosen.precision, **chosen.hp)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's numbers. Equal specs share one cached result.

    `search` takes a `SearchConfig` or just its mode ("pareto", "frozen", "random")."""

    preset: str
    task: str | DataSpec  # a registered task name, or your own data
    method: str
    quantizer: str = "nf"  # the quantization space, QuantSpace.named(quantizer): "nf" or "int"
    seed: int = 0
    backbone: str | None = None  # None: the preset's backbone for the task's type
    eval_budgets: tuple[float, ...] | None = None  # None: EVAL_BUDGETS[quantizer]
    unseen_budgets: tuple[float, ...] | None = None  # None: off the pool grid, see unseen_budgets()
    # None: preset_hyperparams(preset, the run size's epochs). A given hp replaces all of it, the preset's
    # precision and hp table included: start from replace(spec.resolved().hp, ...) to change one field.
    hp: HyperParams | None = None
    size: RunSize | None = None  # None: the preset's run size for the task's type
    search: SearchConfig = SearchConfig()  # how CoA-LoRA's training set is refined after each epoch
    pool_range: tuple[float, float] = POOL_RANGE  # budgets of CoA-LoRA's initial training set
    weighting: str = "fisher"  # the ILP's cost: Fisher-weighted quantization error, or plain "error"

    def __post_init__(self):
        get_preset(self.preset)
        task_type(self.task)
        check_method(self.method)
        QuantSpace.named(self.quantizer)
        check_name(self.weighting, WEIGHTINGS, "cost weighting")
        if isinstance(self.search, str):
            object.__setattr__(self, "search", SearchConfig(mode=self.search))
        if not isinstance(self.search, SearchConfig):
            raise ValueError(f"search must be a SearchConfig or a search mode, got {self.search!r}")
        if self.search.mode != "frozen" and get_method(self.method).training != "pool":
            raise ValueError(f"search mode {self.search.mode!r} refines CoA-LoRA's training set; method "
                             f"{self.method!r} takes search='frozen'")

    def resolved(self) -> RunSpec:
        """The spec with every default filled in (what the cache key is computed from)."""
        of_type = task_type(self.task)
        preset = get_preset(self.preset)
        size = self.size or preset.size(of_type)
        return replace(
            self,
            backbone=self.backbone or preset.backbone(of_type),
            eval_budgets=tuple(self.eval_budgets or EVAL_BUDGETS[self.quantizer]),
            unseen_budgets=tuple(self.unseen_budgets if self.unseen_budgets is not None
                                 else unseen_budgets(size.pool_step, EVAL_BUDGETS[self.quantizer],
                                                     pool_range=tuple(self.pool_range))),
            size=size,
            hp=self._hp(size, preset),
            # Without a search only its held-out slice (search.batches) matters: the other knobs are
            # reset, so they do not split equal runs over two cache keys.
            search=self.search if self.search.mode != "frozen" else SearchConfig(batches=self.search.batches),
        )

    def _hp(self, size, preset) -> HyperParams:
        hp = self.hp or preset_hyperparams(preset.name, size.epochs)
        # theta's learning rate cannot change a method without theta, nor the pool draw a method without a
        # pool, nor LQ-LoRA's iterations another initialisation: one cache key for equal runs.
        method = get_method(self.method)
        hp = hp if method.theta and hp.theta_lr != hp.lr else replace(hp, theta_lr=None)  # None: the LoRA's rate
        hp = hp if method.init == "lqlora" else replace(hp, lqlora_iterations=MAX_LQLORA_ITERATIONS)
        return hp if method.training == "pool" else replace(hp, pool_draw="uniform")

    def canonical(self) -> RunSpec:
        """The resolved spec with the fields that cannot change its numbers (MOOT) at their defaults:
        the spec a run is computed from and keyed by, so the full-precision reference of the NF and
        the integer comparison, or the no-adapter floor of every seed, is one run."""
        moot = MOOT.get(get_method(self.method).training, ())
        defaults = {f.name: f.default for f in fields(self) if f.name in moot}
        return replace(self, **defaults).resolved() if defaults else self.resolved()

    def key(self) -> str:
        """Content hash of the canonical spec and RUN_VERSION."""
        # Your own data enters by its identity (a digest of its files too), so an edited file is a new run.
        # A local model folder enters by its content, so an edited or retrained model is a new run too.
        resolved = self.canonical()
        data = {"version": RUN_VERSION, "cost_tables": COST_TABLE_VERSION, **asdict(resolved),
                "task": task_identity(self.task), "backbone": models.backbone_identity(resolved.backbone)}
        # A knob at its neutral value (the checkpoint's dropout, the paper's pool draw, PyTorch's mask draw, no
        # warm-up, LQ-LoRA's full iterations) stays out of the hash, so adding a knob never changes the keys of
        # the runs that leave it.
        neutral = {"backbone_dropout": None, "pool_draw": "uniform", "mask_draw": "torch", "warmup": 0,
                   "lqlora_iterations": MAX_LQLORA_ITERATIONS}
        for name, value in neutral.items():
            if getattr(resolved.hp, name) == value:
                del data["hp"][name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(spec: RunSpec) -> Path:
    return assets.home() / "runs" / spec.key()


def checkpoint_path(spec: RunSpec) -> Path:
    """Where a run's training checkpoint lives until the run is written: an interrupted run resumes
    from its last epoch (or configuration)."""
    folder = run_dir(spec)
    return folder.with_name(f".{folder.name}.checkpoint.pt")


# ---- data ----------------------------------------------------------------------------------------

def _batches(task, tokenizer, spec: RunSpec, split: str, shuffle: bool) -> DataLoader:
    """Batches of `split`: "train" (what every method trains on), "search" (the held-out slice of the
    training split the configuration search scores on: its first search.batches x batch_size
    examples, trained on by no method) or "dev". Every method of a task and preset sees the same data."""
    size = spec.size
    held_out = spec.search.batches * size.batch_size
    generator = torch.Generator().manual_seed(spec.seed)
    source = task.dev if split == "dev" else task.train
    if task.task_type == "classification":
        if split != "dev":
            source = source.shuffle(seed=0)
            total = len(source)
            rows = (range(min(held_out, len(source))) if split == "search" else
                    range(held_out, len(source) if size.n_train is None else min(held_out + size.n_train,
                                                                                 len(source))))
            source = source.select(rows)
            if split == "train" and len(source) == 0:
                raise ValueError(_too_few(total, held_out))
        elif size.n_dev is not None:
            source = source.shuffle(seed=0).select(range(min(size.n_dev, len(source))))
        tokenized = tokenize_classification(source, tokenizer, size.max_length)
        if split != "train":  # evaluation order is free, and length-sorted batches halve its time (less padding)
            tokenized = tokenized.select(np.argsort([len(ids) for ids in tokenized["input_ids"]], kind="stable"))
        return DataLoader(tokenized, batch_size=size.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=DataCollatorWithPadding(tokenizer))
    if split == "dev":
        blocks = lm_blocks(list(source["text"]), tokenizer, size.max_length, size.n_dev)  # [n, L]
    else:
        wanted = None if size.n_train is None else held_out + size.n_train
        blocks = lm_blocks(list(source["text"]), tokenizer, size.max_length, wanted)
        total = len(blocks)
        blocks = blocks[:held_out] if split == "search" else blocks[held_out:]
        if split == "train" and len(blocks) == 0:
            raise ValueError(_too_few(total, held_out, "token blocks"))
    rows = [{"input_ids": b, "labels": b} for b in blocks]
    return DataLoader(rows, batch_size=size.batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]})


def _too_few(available: int, held_out: int, what: str = "training examples") -> str:
    return (f"nothing left to train on: the configuration search holds out the first {held_out} {what} "
            f"(SearchConfig.batches x batch size) and the training split has {available}; give more "
            f"training data, or fewer search batches (RunSpec(search=SearchConfig(batches=...)))")


# ---- configurations ------------------------------------------------------------------------------

def pool_budgets(step: float, pool_range: tuple[float, float] = POOL_RANGE) -> np.ndarray:
    """Budgets every `step` bits over `pool_range`, both ends included."""
    lo, hi = pool_range
    return np.round(np.arange(lo, hi + step / 2, step), 4)


def unseen_budgets(step: float, eval_budgets, n: int = N_UNSEEN_BUDGETS,
                   pool_range: tuple[float, float] = POOL_RANGE) -> tuple[float, ...]:
    """Budgets half-way between consecutive initial-pool budgets, nearest the evaluation range first,
    so their ILP configurations are not in CoA-LoRA's initial training set."""
    grid = pool_budgets(step, pool_range)
    taken = {round(float(b), 4) for b in (*grid, *eval_budgets)}  # in the initial pool: not unseen
    mids = [m for m in (grid[1:] + grid[:-1]) / 2 if round(float(m), 4) not in taken]
    lo, hi = min(eval_budgets), max(eval_budgets)
    ranked = sorted(mids, key=lambda b: (not lo <= b <= hi, abs(b - (lo + hi) / 2)))
    return tuple(sorted(round(float(b), 4) for b in ranked[:n]))


def _allocate(spec: RunSpec, budget: float) -> Configuration:
    return allocate(spec.backbone, float(budget), spec.quantizer, spec.weighting, spec.task, spec.preset)


def evaluation_configurations(spec: RunSpec) -> list[tuple[str, float | None, Configuration | None]]:
    """(configuration set, target budget, configuration) a run is scored on: the ILP configurations
    at the evaluation budgets ("target"), every method the same; for the full-precision reference
    the unquantized backbone alone ("reference", configuration None)."""
    if get_method(spec.method).training == "full-precision":
        return [("reference", None, None)]
    return [("target", b, _allocate(spec, b)) for b in spec.eval_budgets]


def unseen_configurations(spec: RunSpec, layout) -> list[tuple[str, float | None, Configuration]]:
    """("unseen", budget, configuration) for the methods whose one adapter serves any configuration:
    ILP configurations at off-grid budgets and seeded random ones (budget None). Scored on demand
    (`unseen_rows`), not by the run: only Figure 3's seen-vs-unseen panel and its claim read them."""
    space = QuantSpace.named(spec.quantizer)
    return [*(("unseen", b, _allocate(spec, b)) for b in spec.unseen_budgets),
            *(("unseen", None, Configuration.random(layout, space, seed=10_000 + i))
              for i in range(spec.size.n_random_unseen))]


def training_configurations(spec: RunSpec) -> list[Configuration]:
    """The pool methods (CoA-LoRA and its theta-free twin): ILP configurations every `pool_step`
    bits over the pool range and at the evaluation budgets; the others: the evaluation budgets
    (none for the references)."""
    training = get_method(spec.method).training
    if training in ("full-precision", "none"):
        return []
    if training != "pool":
        return [_allocate(spec, b) for b in spec.eval_budgets]
    budgets = sorted({*pool_budgets(spec.size.pool_step, tuple(spec.pool_range)), *spec.eval_budgets})
    return unique(_allocate(spec, b) for b in budgets)


# ---- the run -------------------------------------------------------------------------------------

def _setup(spec: RunSpec):
    """Seeded task, CoA-LoRA/LoRA model and batches of a run: what training and evaluation share."""
    seed_everything(spec.seed)
    task = load_task(spec.task, spec.preset)
    backbone, tokenizer = models.load_backbone(spec.backbone, task.task_type, num_labels=task.num_labels or 2)
    if spec.hp.backbone_dropout is not None:
        models.set_dropout(backbone, spec.hp.backbone_dropout)
    models.set_mask_draw(backbone, spec.hp.mask_draw)
    layout = models.matrix_layout(backbone, spec.backbone)
    names = task.train.features["label"].names if task.num_labels else None
    if names:  # a saved model then maps its outputs back to your labels
        backbone.config.id2label = dict(enumerate(names))
        backbone.config.label2id = {n: i for i, n in enumerate(names)}
    model = lora.build_lora_model(backbone, layout, QuantSpace.named(spec.quantizer), rank=spec.hp.rank,
                                  alpha=spec.hp.alpha, dropout=spec.hp.dropout,
                                  config_aware=get_method(spec.method).theta, task_type=task.task_type,
                                  cache=WEIGHT_CACHE)
    train_batches = _batches(task, tokenizer, spec, "train", shuffle=True)
    dev_batches = _batches(task, tokenizer, spec, "dev", shuffle=False)
    chance = 1 / task.num_labels if task.num_labels else backbone.config.vocab_size  # uniform guessing
    return task, tokenizer, model, layout, train_batches, dev_batches, chance


def _score(spec: RunSpec, task, trained, evaluations, dev_batches, chance: float) -> tuple[list[dict], dict]:
    """Tidy rows and per-example predictions (configuration id -> array) of `trained` evaluated on
    each (configuration set, budget, configuration) of `evaluations`."""
    label = models.backbone_spec(spec.backbone).label
    metric = TASK_METRICS[task.task_type]
    weight_bits = 8 * next(iter(trained.model.full_precision.values())).element_size()
    rows, predictions = [], {}
    for configuration_set, budget, configuration in evaluations:
        result = evaluate(trained.load_for(configuration), configuration, dev_batches, task.task_type,
                          spec.hp.precision)
        per_configuration = get_method(spec.method).per_configuration and configuration is not None
        key = configuration.digest() if per_configuration else "shared"
        cid = FULL_PRECISION if configuration is None else configuration.digest()
        predictions[cid] = result["per_example"]
        rows.append({
            "method": spec.method, "backbone": spec.backbone, "backbone_label": label,
            "task": task.name, "task_source": task.source, "stand_in": task.stand_in, "preset": spec.preset,
            "quantizer": spec.quantizer, "configuration_id": cid, "configuration_set": configuration_set,
            "budget": budget, "avg_bits": weight_bits if configuration is None else configuration.avg_bits,
            "seen": cid in trained.trained_on, "seed": spec.seed, "metric": metric,
            "value": result[metric], "loss": result["loss"], "chance": chance,
            "train_seconds": trained.train_seconds[key], "eval_seconds": result["eval_seconds"],
        })
    return rows, predictions


def _execute(spec: RunSpec):
    task, tokenizer, model, layout, train_batches, dev_batches, chance = _setup(spec)
    search = None
    if spec.search.mode != "frozen":
        held_out = _batches(task, tokenizer, spec, "search", shuffle=False)
        search = ConfigurationSearch(spec.search, QuantSpace.named(spec.quantizer), layout,
                                     fixed_batches(held_out, spec.search.batches), spec.seed)
    trained = train(spec.method, model, training_configurations(spec), train_batches, spec.hp, spec.seed, search,
                    checkpoint=checkpoint_path(spec))
    rows, predictions = _score(spec, task, trained, evaluation_configurations(spec), dev_batches, chance)
    return (pd.DataFrame(rows, columns=SCORE_COLUMNS), predictions, trained.states, trained.history, trained.steps,
            [] if search is None else search.to_rows())


def _reloaded(spec: RunSpec):
    """The cached run of a method that trains one adapter, reloaded: (task, Trained, dev batches, chance)."""
    rows = run_experiment(spec)
    state = load_file(run_dir(spec) / "adapters.safetensors")
    task, _, model, _, _, dev_batches, chance = _setup(spec)
    states = {"shared": {name.split("/", 1)[1]: t for name, t in state.items() if name.startswith("shared/")}}
    trained_on = set(training_steps(spec)["configuration_id"])  # every configuration a step drew
    trained = Trained(spec.method, model, training_configurations(spec), states,
                      {"shared": float(rows["train_seconds"].iloc[0])}, trained_on=trained_on)
    return task, trained, dev_batches, chance


def trained_model(spec: RunSpec) -> lora.CoALoRAModel:
    """The trained model of a run of a method whose one adapter serves every configuration (CoA-LoRA,
    its theta-free twin, Shared-LoRA), from the cache (the run is computed first if needed): to save
    (`save_pretrained`), materialize or serve. Call `set_configuration` before running it."""
    spec = spec.resolved()
    if not get_method(spec.method).serves_any_configuration:
        raise ValueError(f"method {spec.method!r} trains one adapter per configuration; a trained model that "
                         f"serves any configuration comes from: "
                         f"{', '.join(m for m, v in METHODS.items() if v.serves_any_configuration)}")
    _, trained, _, _ = _reloaded(spec)
    lora.load_adapter_state(trained.model, trained.states["shared"])
    return trained.model


def _cached_rows(spec: RunSpec, name: str, recompute: bool, compute, predictions: bool = False,
                 columns: Sequence[str] = SCORE_COLUMNS) -> pd.DataFrame:
    """Rows cached as `name` in the run's folder, computed by `compute()` if absent: a list of row
    dicts with keys `columns`, or with `predictions` a pair (rows, per-example results by configuration
    id) whose results are cached beside as <stem>.npz, written first so that the rows mark a whole result."""
    folder = run_dir(spec)
    state = processes()
    if from_main(not (folder / name).exists() or recompute):
        rows = compute()
        if state.is_main_process:
            if predictions:
                rows, found = rows
                (folder / name).unlink(missing_ok=True)  # old rows must not mark new results as whole
                with atomic_path(folder / Path(name).with_suffix(".npz")) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez_compressed(f, **found)
            with atomic_path(folder / name) as tmp:
                pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
        state.wait_for_everyone()
    return _read_rows(folder, spec, name)


def seen_rows(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """A frozen-search CoA-LoRA run scored on every configuration of its training set that a training
    step drew (set "seen", from steps.csv), for Figure 3's seen-vs-unseen panel. Reloads the cached
    adapter (running the experiment first if needed); cached as seen.csv."""
    spec = spec.resolved()
    if spec.method != "coalora" or spec.search.mode != "frozen":
        raise ValueError(f"seen configurations are CoA-LoRA's fixed training set: need method='coalora' and "
                         f"search='frozen', got method={spec.method!r}, search={spec.search.mode!r}")

    def compute():
        task, trained, dev_batches, chance = _reloaded(spec)
        drawn = [c for c in trained.configurations if c.digest() in trained.trained_on]
        return _score(spec, task, trained, [("seen", None, c) for c in drawn], dev_batches, chance)[0]
    return _cached_rows(spec, "seen.csv", recompute, compute)


def unseen_rows(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """A run of a method whose one adapter serves any configuration scored on the configurations of
    `unseen_configurations` that no training step drew (set "unseen"), for Figure 3's seen-vs-unseen
    panel. Reloads the cached adapter (running the experiment first if needed); cached as unseen.csv,
    the per-example results as unseen.npz (`unseen_predictions`)."""
    spec = spec.resolved()
    if not get_method(spec.method).serves_any_configuration:
        raise ValueError(f"method {spec.method!r} has no one adapter for every configuration to score on unseen "
                         f"ones; unseen rows come from: "
                         f"{', '.join(m for m, v in METHODS.items() if v.serves_any_configuration)}")

    def compute():
        task, trained, dev_batches, chance = _reloaded(spec)
        unseen = [e for e in unseen_configurations(spec, trained.model.layout)
                  if e[2].digest() not in trained.trained_on]
        return _score(spec, task, trained, unseen, dev_batches, chance)
    return _cached_rows(spec, "unseen.csv", recompute, compute, predictions=True)


def unseen_predictions(spec: RunSpec) -> dict[str, np.ndarray]:
    """Per-example results of `unseen_rows` by configuration id, as `predictions` (computed first if needed)."""
    unseen_rows(spec)
    with np.load(run_dir(spec.resolved()) / "unseen.npz") as data:
        return {name: data[name] for name in data.files}


def theta_off_rows(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """A CoA-LoRA run scored again with theta switched off after training (gamma = 0: every M_i = I,
    the shared LoRA alone), on the run's own target configurations: what theta's adjustments add to
    the adapter they were trained with. Cached as theta_off.csv."""
    spec = spec.resolved()
    if not get_method(spec.method).theta:
        raise ValueError(f"switching theta off needs a method with theta, got {spec.method!r}")
    rows = run_experiment(spec)

    def compute():
        task, trained, dev_batches, chance = _reloaded(spec)
        trained.states["shared"] = {**trained.states["shared"], "theta.gamma": torch.tensor(0.0)}
        def key(configuration_set, budget, cid):  # a random configuration has no budget (NaN in rows)
            return configuration_set, None if pd.isna(budget) else round(float(budget), 4), cid

        by_key = {key(s, b, c.digest()): (s, b, c) for s, b, c in evaluation_configurations(spec)}
        evaluations = [by_key[k] for k in map(key, rows["configuration_set"], rows["budget"], rows["configuration_id"])
                       if k in by_key]
        return _score(spec, task, trained, evaluations, dev_batches, chance)[0]
    return _cached_rows(spec, "theta_off.csv", recompute, compute)


def theta_told_predictions(spec: RunSpec, budget: float, recompute: bool = False) -> dict[str, np.ndarray]:
    """A CoA-LoRA run's target configurations scored again with theta told another configuration,
    the ILP's at `budget`, while each keeps its own quantized weights: per-example results by target
    configuration id, as `predictions`. Equal to the run's own where theta ignores the configuration
    it is told. Cached as theta_told_<budget>.npz."""
    spec = spec.resolved()
    if not get_method(spec.method).theta:
        raise ValueError(f"telling theta a configuration needs a method with theta, got {spec.method!r}; choose "
                         f"among {', '.join(m for m, v in METHODS.items() if v.theta)}")
    path = run_dir(spec) / f"theta_told_{budget:g}.npz"
    state = processes()
    if from_main(not path.exists() or recompute):
        task, trained, dev_batches, chance = _reloaded(spec)
        theta = trained.model.theta
        told = theta.config_index(_allocate(spec, budget))
        # set_configuration feeds theta the index theta.config_index returns; the weights stay each row's own.
        theta.config_index = lambda configuration: told
        targets = [e for e in evaluation_configurations(spec) if e[0] == "target"]
        found = _score(spec, task, trained, targets, dev_batches, chance)[1]
        if state.is_main_process:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **found)
        state.wait_for_everyone()
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def run_experiment(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """Tidy result rows of `spec`, from the cache when present (unless `recompute`)."""
    spec = spec.resolved()
    folder = run_dir(spec)
    state = processes()
    if from_main((folder / "rows.csv").exists() and not recompute):  # under `accelerate launch` the main decides
        logger.info("cache hit %s (%s %s seed %d)", folder.name, spec.method, task_identity(spec.task), spec.seed)
        return _read_rows(folder, spec)
    logger.info("running %s (%s %s seed %d)", folder.name, spec.method, task_identity(spec.task), spec.seed)
    if recompute and state.is_main_process:  # a checkpoint of the cached run would resume into it
        checkpoint_path(spec).unlink(missing_ok=True)
    state.wait_for_everyone()
    canonical = spec.canonical()
    rows, predictions, states, history, steps, search_rows = _execute(canonical)
    if state.is_main_process:
        _write_run(folder, canonical, rows, predictions, states, history, steps, search_rows)
        checkpoint_path(spec).unlink(missing_ok=True)  # the run is whole: nothing to resume
    state.wait_for_everyone()
    return _read_rows(folder, spec)


def _write_run(folder: Path, spec: RunSpec, rows, predictions, states, history, steps, search_rows) -> None:
    """Write a run's files into a fresh folder beside `folder` and rename it into place: a run folder
    is whole or absent."""
    def write(work: Path) -> None:
        rows.to_csv(work / "rows.csv", index=False)
        np.savez_compressed(work / "predictions.npz", **predictions)
        save_file({f"{cfg}/{name}": t.contiguous() for cfg, state in states.items() for name, t in state.items()},
                  work / "adapters.safetensors")
        write_json_atomic(work / "history.json", history)
        pd.DataFrame(steps, columns=STEP_COLUMNS).to_csv(work / "steps.csv", index=False, float_format="%.6g")
        pd.DataFrame(search_rows, columns=SEARCH_COLUMNS).to_csv(work / "search.csv", index=False)
        write_json_atomic(work / "provenance.json", provenance(asdict(spec), spec.seed))
    write_directory(folder, write)


def predictions(spec: RunSpec) -> dict[str, np.ndarray]:
    """Per-example results of a run by configuration id (1/0 per dev example, or each dev block's mean
    token loss), in the dev split's fixed order, so two runs of one task pair example by example.
    Runs the experiment first if it is not cached."""
    run_experiment(spec)
    with np.load(run_dir(spec.resolved()) / "predictions.npz") as data:
        return {name: data[name] for name in data.files}


def _read_rows(folder: Path, spec: RunSpec, name: str = "rows.csv") -> pd.DataFrame:
    rows = pd.read_csv(folder / name)
    # From the spec asking, the source of truth for what it says: a canonical run serves several specs.
    rows.insert(1, "search", spec.search.mode)
    for column in ("quantizer", "seed"):
        if column in rows:
            rows[column] = getattr(spec, column)
    return rows


def training_steps(spec: RunSpec) -> pd.DataFrame:
    """Every forward of a run's training: adapter (a configuration id, or "shared"), epoch, step,
    configuration id and loss. Runs the experiment first if it is not cached."""
    run_experiment(spec)
    return pd.read_csv(run_dir(spec.resolved()) / "steps.csv")


def search_rounds(spec: RunSpec) -> pd.DataFrame:
    """The per-epoch pool, proposals and kept configurations of a cached CoA-LoRA run (Figure 2);
    empty for a frozen search. Runs the experiment first if it is not cached."""
    run_experiment(spec)
    return pd.read_csv(run_dir(spec.resolved()) / "search.csv")


# ---- many runs at once ---------------------------------------------------------------------------

def run_many(specs, workers: int = 1, recompute: bool = False, report=None) -> int:
    """Compute the runs of `specs` that are not cached (all with `recompute`), `workers` processes at
    a time, each with an equal share of this machine's CPU threads; returns how many were computed.

    On 2 CPU cores two 1-thread processes train 1.27 x faster than one 2-thread process (small matrices
    leave the second thread idle part of the time; docs/measurements.md#threads-and-parallel-runs), so a
    sequence of many small runs is best run side by side. Every run is written whole by its own
    process, so an interrupted call leaves finished runs cached and nothing half-written. `report`
    receives a progress line as each job ends (default: printed). The workers are spawned and import
    the calling script again, so a script calls this under `if __name__ == "__main__":`.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    report = report or functools.partial(print, flush=True)  # flushed: the lines reach a log file as they come
    if workers > 1 and processes().num_processes > 1:
        raise ValueError(f"workers={workers} needs a single process, not {processes().num_processes} under "
                         "`accelerate launch`: pass workers=1 there")
    todo = {}
    for spec in specs:
        spec = spec.resolved()
        if recompute or not (run_dir(spec) / "rows.csv").exists():
            todo.setdefault(spec.key(), spec)
    if not todo:
        return 0
    # Cost tables first, here: side by side, every worker would compute the same table at once.
    tables = {(s.backbone, s.quantizer, s.weighting, s.task, s.preset): s for s in todo.values()
              if get_method(s.method).training != "full-precision"}
    for spec in tables.values():
        _allocate(spec, spec.eval_budgets[0])
    jobs = _jobs(list(todo.values()))
    threads = max(1, _cpu_count() // workers)
    report(f"{len(todo)} runs to compute in {len(jobs)} jobs, {workers} at a time with {threads} threads each")
    done = 0
    if workers == 1:
        for job in jobs:
            for spec in _run_job(job, recompute, None):
                done += 1
                report(f"[{done}/{len(todo)}] {_describe(spec)}")
        return done
    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch thread pool
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        pending = {pool.submit(_run_job, job, recompute, threads) for job in jobs}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)  # a failure ends it too: result() raises
            for future in finished:
                for spec in future.result():  # a failed run raises here
                    done += 1
                    report(f"[{done}/{len(todo)}] {_describe(spec)}")
    finally:  # after a failure, the jobs not started are dropped rather than run for nothing
        pool.shutdown(cancel_futures=True)
    return done


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _describe(spec: RunSpec) -> str:
    return f"{spec.method} {task_identity(spec.task)} {spec.quantizer} seed {spec.seed} ({spec.key()})"


# What one run costs, for ordering the jobs longest first: seconds per training pass over the data
# (one epoch of one adapter, or of one of K pool draws per step) and per evaluated configuration, by task
# type, measured on the default preset's runs on one CPU thread (MiniLM-L6 on SST-2, SmolLM2-135M on C4;
# docs/measurements.md#reproduce-time). Only the order of the jobs depends on them, never a result:
# longest first, the two workers of `make reproduce` end within a minute of each other. Other backbones
# and data sizes scale every run of a task type alike, which leaves the order of a preset's jobs as good.
JOB_SECONDS = {  # task type -> (per training pass, per evaluated configuration)
    "classification": (30.0, 3.3),
    "causal-lm": (70.0, 7.8),
}
SEARCH_COST = 1.4  # a refining search scores the pool after each epoch: pareto and random runs train 1.4 x longer


def _estimated_seconds(spec: RunSpec) -> float:
    per_pass, per_evaluation = JOB_SECONDS[task_type(spec.task)]
    method = get_method(spec.method)
    passes = {"per-configuration": len(spec.eval_budgets), "pool": spec.hp.configs_per_step,
              "shared": 1, "full-precision": 1, "none": 0}[method.training] * spec.hp.epochs
    if spec.search.mode != "frozen":
        passes *= SEARCH_COST
    evaluations = 1 if method.training == "full-precision" else len(spec.eval_budgets)
    return passes * per_pass + evaluations * per_evaluation


def _jobs(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """Runs grouped so that one process does the runs sharing a low-rank initialisation (LQ-LoRA's
    seeds fit the same one, cached in that process), the longest jobs first (`JOB_SECONDS`)."""
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        init = get_method(spec.method).init
        key = (spec.method, spec.backbone, spec.quantizer, spec.hp.rank) if init != "default" else (spec.key(),)
        groups.setdefault(key, []).append(spec)
    return sorted(groups.values(), key=lambda job: sum(_estimated_seconds(s) for s in job), reverse=True)


def _run_job(job: list[RunSpec], recompute: bool, threads: int | None) -> list[RunSpec]:
    if threads is not None:
        torch.set_num_threads(threads)
    for spec in job:
        try:
            run_experiment(spec, recompute)
        except Exception as error:  # the traceback of a worker process does not say which run it was
            raise RuntimeError(f"run {_describe(spec)} failed: {error}") from error
    return job
