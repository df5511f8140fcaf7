"""Experiments: a run is a small frozen dataclass; its tidy result rows, provenance and trained
adapter weights are cached on disk under a content hash of the run, so notebooks share runs.

    RunSpec --key()--> COALORA_HOME/runs/<key>/{rows.csv, provenance.json, adapters.safetensors,
                                                history.json, search.csv}

A run directory is written in a temporary folder and renamed into place when complete, so an
interrupted run leaves nothing behind and is recomputed on the next call; `recompute=True` forces a
rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from coalora import assets, lora, models
from coalora.allocation import allocate
from coalora.configs import Configuration, QuantSpace, unique
from coalora.data import lm_blocks, load_task, task_type, tokenize_classification
from coalora.methods import check_method, method as get_method
from coalora.metrics import TASK_METRICS, evaluate
from coalora.presets import RunSize, preset as get_preset
from coalora.repro import atomic_path, provenance, seed_everything, write_json_atomic
from coalora.search import ConfigurationSearch, SearchConfig, fixed_batches
from coalora.training import HyperParams, Trained, train

logger = logging.getLogger(__name__)

RUN_VERSION = 2  # bump when training or evaluation changes numbers: every cached run is recomputed
SEARCH_VERSION = 2  # bump when the configuration search changes numbers: searched runs are recomputed

# The paper's evaluation budgets: its NF figures at 2.5-4 bits, its integer table at 3-6 bits.
EVAL_BUDGETS = {"nf": (2.5, 3.0, 3.5, 4.0), "int": (3.0, 4.0, 5.0, 6.0)}
POOL_RANGE = (2.25, 7.25)  # the initial CoA-LoRA training set spans this (docs/method.md#training)
SEARCH_COLUMNS = ["epoch", "mode", "role", "configuration_id", "avg_bits", "loss"]
N_UNSEEN_BUDGETS = 5  # ILP configurations half-way between CoA-LoRA's initial pool budgets


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's numbers. Equal specs share one cached result.

    `search` takes a `SearchConfig` or just its mode ("pareto", "frozen", "random")."""

    preset: str
    task: str
    method: str
    quantizer: str = "nf"  # the quantization space, QuantSpace.named(quantizer): "nf" or "int"
    seed: int = 0
    backbone: str | None = None  # None: the preset's backbone for the task's type
    eval_budgets: tuple[float, ...] | None = None  # None: EVAL_BUDGETS[quantizer]
    unseen_budgets: tuple[float, ...] | None = None  # None: off the pool grid, see unseen_budgets()
    hp: HyperParams | None = None  # None: HyperParams() with the run size's epochs
    size: RunSize | None = None  # None: the preset's run size for the task's type
    search: SearchConfig = SearchConfig()  # how CoA-LoRA's training set is refined after each epoch
    pool_range: tuple[float, float] = POOL_RANGE  # budgets of CoA-LoRA's initial training set

    def __post_init__(self):
        get_preset(self.preset)
        task_type(self.task)
        check_method(self.method)
        QuantSpace.named(self.quantizer)
        if isinstance(self.search, str):
            object.__setattr__(self, "search", SearchConfig(mode=self.search))
        if not isinstance(self.search, SearchConfig):
            raise ValueError(f"search must be a SearchConfig or a search mode, got {self.search!r}")
        if self.search.mode != "frozen" and not get_method(self.method).config_aware:
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
                                 else unseen_budgets(size.pool_size, EVAL_BUDGETS[self.quantizer],
                                                     pool_range=tuple(self.pool_range))),
            size=size,
            hp=self.hp or HyperParams(epochs=size.epochs),
        )

    def key(self) -> str:
        """Content hash of the resolved spec, in the run cache's flat layout: the field names below,
        with the search and the pool range left out while at their defaults. The layout changes only
        together with RUN_VERSION, since any change to it re-keys every cached run."""
        spec = self.resolved()
        data = {"version": RUN_VERSION, "preset": spec.preset, "task": spec.task, "method": spec.method,
                "space": spec.quantizer, "seed": spec.seed, "backbone": spec.backbone,
                "eval_budgets": spec.eval_budgets, "unseen_budgets": spec.unseen_budgets,
                "hp": asdict(spec.hp), "scale": asdict(spec.size)}
        if spec.search.mode != "frozen":
            search = spec.search
            data |= {"search": search.mode, "search_starts": search.starts, "search_steps": search.steps,
                     "search_segments": search.segments, "search_batches": search.batches,
                     "search_version": SEARCH_VERSION}
            if search.kernel != SearchConfig.kernel:
                data["search_kernel"] = search.kernel
        if tuple(spec.pool_range) != POOL_RANGE:
            data["pool_range"] = spec.pool_range
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(spec: RunSpec) -> Path:
    return assets.home() / "runs" / spec.key()


# ---- data ----------------------------------------------------------------------------------------

def _batches(task, tokenizer, spec: RunSpec, split: str, shuffle: bool) -> DataLoader:
    size = spec.size
    n = size.n_train if split == "train" else size.n_dev
    generator = torch.Generator().manual_seed(spec.seed)
    if task.task_type == "classification":
        data = getattr(task, split)
        if n is not None:
            data = data.shuffle(seed=0).select(range(min(n, len(data))))
        tokenized = tokenize_classification(data, tokenizer, size.max_length)
        if split == "dev":  # evaluation order is free, and length-sorted batches halve its time (less padding)
            tokenized = tokenized.select(np.argsort([len(ids) for ids in tokenized["input_ids"]], kind="stable"))
        return DataLoader(tokenized, batch_size=size.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=DataCollatorWithPadding(tokenizer))
    blocks = lm_blocks(list(getattr(task, split)["text"]), tokenizer, size.max_length, n)  # [n, L]
    rows = [{"input_ids": b, "labels": b} for b in blocks]
    return DataLoader(rows, batch_size=size.batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]})


# ---- configurations ------------------------------------------------------------------------------

def pool_budgets(pool_size: int, pool_range: tuple[float, float] = POOL_RANGE) -> np.ndarray:
    return np.linspace(*pool_range, pool_size)


def unseen_budgets(pool_size: int, eval_budgets, n: int = N_UNSEEN_BUDGETS,
                   pool_range: tuple[float, float] = POOL_RANGE) -> tuple[float, ...]:
    """Budgets half-way between consecutive initial-pool budgets, nearest the evaluation range first,
    so their ILP configurations are not in CoA-LoRA's initial training set."""
    grid = pool_budgets(pool_size, pool_range)
    mids = (grid[1:] + grid[:-1]) / 2
    lo, hi = min(eval_budgets), max(eval_budgets)
    ranked = sorted(mids, key=lambda b: (not lo <= b <= hi, abs(b - (lo + hi) / 2)))
    return tuple(sorted(round(float(b), 4) for b in ranked[:n]))


def evaluation_configurations(spec: RunSpec, layout) -> list[tuple[str, float | None, Configuration]]:
    """(configuration set, target budget, configuration): ILP configurations at the evaluation
    budgets ("target"), and for methods that train once, ILP configurations at off-grid budgets and
    seeded random ones ("unseen")."""
    out = [("target", b, allocate(spec.backbone, b, spec.quantizer)) for b in spec.eval_budgets]
    if get_method(spec.method).per_configuration:
        return out
    out += [("unseen", b, allocate(spec.backbone, b, spec.quantizer)) for b in spec.unseen_budgets]
    space = QuantSpace.named(spec.quantizer)
    out += [("unseen", None, Configuration.random(layout, space, seed=10_000 + i))
            for i in range(spec.size.n_random_unseen)]
    return out


def training_configurations(spec: RunSpec) -> list[Configuration]:
    """CoA-LoRA: ILP configurations spread evenly over POOL_RANGE; the others: the evaluation budgets."""
    if not get_method(spec.method).config_aware:
        return [allocate(spec.backbone, b, spec.quantizer) for b in spec.eval_budgets]
    budgets = pool_budgets(spec.size.pool_size, tuple(spec.pool_range))
    return unique(allocate(spec.backbone, float(b), spec.quantizer) for b in budgets)


# ---- the run -------------------------------------------------------------------------------------

def _setup(spec: RunSpec):
    """Seeded task, CoA-LoRA/LoRA model and batches of a run: what training and evaluation share."""
    seed_everything(spec.seed)
    task = load_task(spec.task, spec.preset)
    backbone, tokenizer = models.load_backbone(spec.backbone, task.task_type, num_labels=task.num_labels or 2)
    layout = models.matrix_layout(backbone, spec.backbone)
    model = lora.build_lora_model(backbone, layout, QuantSpace.named(spec.quantizer), rank=spec.hp.rank,
                                  alpha=spec.hp.alpha, dropout=spec.hp.dropout,
                                  config_aware=get_method(spec.method).config_aware, task_type=task.task_type)
    train_batches = _batches(task, tokenizer, spec, "train", shuffle=True)
    dev_batches = _batches(task, tokenizer, spec, "dev", shuffle=False)
    return task, tokenizer, model, layout, train_batches, dev_batches


def _score(spec: RunSpec, task, trained, evaluations, dev_batches, seen: set[str]) -> list[dict]:
    """Tidy rows: `trained` evaluated on each (configuration set, budget, configuration) of `evaluations`."""
    label = models.backbone_spec(spec.backbone).label
    metric = TASK_METRICS[task.task_type]
    rows = []
    for configuration_set, budget, configuration in evaluations:
        result = evaluate(trained.load_for(configuration), configuration, dev_batches, task.task_type)
        key = configuration.digest() if get_method(spec.method).per_configuration else "shared"
        rows.append({
            "method": spec.method, "backbone": spec.backbone, "backbone_label": label,
            "task": spec.task, "task_source": task.source, "stand_in": task.stand_in, "preset": spec.preset,
            "quantizer": spec.quantizer, "configuration_id": configuration.digest(),
            "configuration_set": configuration_set,
            "budget": budget, "avg_bits": configuration.avg_bits,
            "seen": configuration.digest() in seen, "seed": spec.seed, "metric": metric,
            "value": result[metric], "loss": result["loss"],
            "train_seconds": trained.train_seconds[key], "eval_seconds": result["eval_seconds"],
        })
    return rows


def _execute(spec: RunSpec) -> tuple[pd.DataFrame, dict[str, dict[str, torch.Tensor]], list[dict], list[dict]]:
    task, tokenizer, model, layout, train_batches, dev_batches = _setup(spec)
    search = None
    if spec.search.mode != "frozen":
        scoring = _batches(task, tokenizer, spec, "train", shuffle=True)  # own generator: train order untouched
        search = ConfigurationSearch(spec.search, QuantSpace.named(spec.quantizer), layout,
                                     fixed_batches(scoring, spec.search.batches), spec.seed)
    trained = train(spec.method, model, training_configurations(spec), train_batches, spec.hp, spec.seed, search)
    seen = {c.digest() for c in trained.configurations}
    evaluations = [(configuration_set, budget, configuration)
                   for configuration_set, budget, configuration in evaluation_configurations(spec, layout)
                   if not (configuration_set == "unseen" and configuration.digest() in seen)]  # never trained on
    rows = _score(spec, task, trained, evaluations, dev_batches, seen)
    return pd.DataFrame(rows), trained.states, trained.history, [] if search is None else search.to_rows()


def seen_rows(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """A frozen-search CoA-LoRA run scored on its own training configurations (set "seen"), for
    Figure 3's seen-vs-unseen panel: the run's target and unseen configurations are never trained on.
    Reloads the cached adapter (running the experiment first if needed); cached as seen.csv."""
    spec = spec.resolved()
    if spec.method != "coalora" or spec.search.mode != "frozen":
        raise ValueError(f"seen configurations are CoA-LoRA's fixed training set: need method='coalora' and "
                         f"search='frozen', got method={spec.method!r}, search={spec.search.mode!r}")
    rows = run_experiment(spec)
    folder = run_dir(spec)
    if (folder / "seen.csv").exists() and not recompute:
        return _read_rows(folder, spec, "seen.csv")
    task, _, model, _, _, dev_batches = _setup(spec)
    state = load_file(folder / "adapters.safetensors")
    states = {"shared": {name.split("/", 1)[1]: t for name, t in state.items() if name.startswith("shared/")}}
    configurations = training_configurations(spec)
    trained = Trained(spec.method, model, configurations, states,
                      {"shared": float(rows["train_seconds"].iloc[0])})
    seen = _score(spec, task, trained, [("seen", None, c) for c in configurations], dev_batches,
                  {c.digest() for c in configurations})
    with atomic_path(folder / "seen.csv") as tmp:
        pd.DataFrame(seen).to_csv(tmp, index=False)
    return _read_rows(folder, spec, "seen.csv")


def run_experiment(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """Tidy result rows of `spec`, from the cache when present (unless `recompute`)."""
    spec = spec.resolved()
    folder = run_dir(spec)
    if (folder / "rows.csv").exists() and not recompute:
        logger.info("cache hit %s (%s %s seed %d)", folder.name, spec.method, spec.task, spec.seed)
        return _read_rows(folder, spec)
    logger.info("running %s (%s %s seed %d)", folder.name, spec.method, spec.task, spec.seed)
    rows, states, history, search_rows = _execute(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        rows.to_csv(work / "rows.csv", index=False)
        save_file({f"{cfg}/{name}": t.contiguous() for cfg, state in states.items() for name, t in state.items()},
                  work / "adapters.safetensors")
        write_json_atomic(work / "history.json", history)
        pd.DataFrame(search_rows, columns=SEARCH_COLUMNS).to_csv(work / "search.csv", index=False)
        write_json_atomic(work / "provenance.json", provenance(asdict(spec), spec.seed))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(work, folder)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return _read_rows(folder, spec)


def _read_rows(folder: Path, spec: RunSpec, name: str = "rows.csv") -> pd.DataFrame:
    # rows.csv of RUN_VERSION 2 may name the configuration set "kind"; drop this rename at the next bump.
    rows = pd.read_csv(folder / name).rename(columns={"kind": "configuration_set"})
    rows.insert(1, "search", spec.search.mode)  # from the spec, the source of truth for what it says
    return rows


def search_rounds(spec: RunSpec) -> pd.DataFrame:
    """The per-epoch pool, proposals and kept configurations of a cached CoA-LoRA run (Figure 2);
    empty for a frozen search. Runs the experiment first if it is not cached."""
    run_experiment(spec)
    return pd.read_csv(run_dir(spec.resolved()) / "search.csv")
