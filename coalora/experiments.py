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
from coalora.allocate import allocate
from coalora.configs import Configuration, QuantSpace
from coalora.data import lm_blocks, load_task, tokenize_classification
from coalora.metrics import TASK_METRICS, evaluate
from coalora.presets import check_preset
from coalora.repro import atomic_path, provenance, seed_everything, write_json_atomic
from coalora.search import check_mode, fixed_batches, make_search_hook
from coalora.train import PER_CONFIGURATION, HyperParams, Trained, check_method, train

logger = logging.getLogger(__name__)

# Bump when training or evaluation changes in a way that changes numbers: old cached runs are ignored.
# Version 2 trains a padded classification batch as two length-sorted micro-batches (HyperParams.micro_batches).
RUN_VERSION = 2
# Bump when the configuration search changes numbers: only pareto/random runs are ignored. Version 2 draws
# the search's scoring batches from a loader of their own, so a searched run's first epoch sees exactly the
# data order of its frozen twin (version 1 advanced the training loader's shuffle generator).
SEARCH_VERSION = 2

EVAL_BUDGETS = {"nf": (2.5, 3.0, 3.5, 4.0), "int": (3.0, 4.0, 5.0, 6.0)}
POOL_RANGE = (2.25, 7.25)  # the initial CoA-LoRA training set spans this (method.md D.5)
SEARCH_COLUMNS = ["epoch", "mode", "role", "configuration_id", "avg_bits", "loss"]
N_UNSEEN_BUDGETS = 5  # ILP configurations half-way between CoA-LoRA's initial pool budgets


@dataclass(frozen=True)
class Scale:
    """How big a preset's runs are: data sizes, batch shape and epochs."""

    n_train: int | None  # training sentences, or training token blocks for a causal LM (None: all)
    n_dev: int | None
    batch_size: int
    max_length: int  # tokens per sentence, or the block size of a causal LM
    epochs: int
    pool_size: int  # initial CoA-LoRA training configurations
    n_random_unseen: int


SCALES = {
    "smoke": Scale(n_train=64, n_dev=64, batch_size=16, max_length=32, epochs=1, pool_size=6, n_random_unseen=2),
    "default": Scale(n_train=2048, n_dev=None, batch_size=32, max_length=64, epochs=2, pool_size=20,
                     n_random_unseen=5),
    "large": Scale(n_train=8192, n_dev=None, batch_size=32, max_length=128, epochs=3, pool_size=50,
                   n_random_unseen=10),
    "paper": Scale(n_train=None, n_dev=None, batch_size=64, max_length=128, epochs=10, pool_size=50,
                   n_random_unseen=10),
}
LM_SCALES = {  # causal LMs: blocks of max_length tokens
    "smoke": Scale(n_train=8, n_dev=4, batch_size=2, max_length=64, epochs=1, pool_size=4, n_random_unseen=1),
    "default": Scale(n_train=128, n_dev=32, batch_size=4, max_length=128, epochs=1, pool_size=12,
                     n_random_unseen=3),
    "large": Scale(n_train=1024, n_dev=64, batch_size=1, max_length=1024, epochs=1, pool_size=20,
                   n_random_unseen=5),
    "paper": Scale(n_train=None, n_dev=30, batch_size=1, max_length=1024, epochs=5, pool_size=50,
                   n_random_unseen=10),
}


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's numbers. Equal specs share one cached result."""

    preset: str
    task: str
    method: str
    space: str = "nf"
    seed: int = 0
    backbone: str | None = None  # None: the preset's default for the task kind
    eval_budgets: tuple[float, ...] | None = None  # None: EVAL_BUDGETS[space]
    unseen_budgets: tuple[float, ...] | None = None  # None: off the pool grid, see unseen_budgets()
    hp: HyperParams | None = None  # None: HyperParams() with the scale's epochs
    scale: Scale | None = None  # None: the preset's scale
    search: str = "frozen"  # CoA-LoRA's training-set refinement: "pareto", "frozen" or "random"
    search_starts: int = 5  # S
    search_steps: int = 10  # T
    search_segments: int = 10  # U
    search_batches: int = 4  # fixed training batches the search scores losses on
    pool_range: tuple[float, float] = POOL_RANGE  # budgets of CoA-LoRA's initial training set

    def __post_init__(self):
        check_preset(self.preset)
        check_method(self.method)
        QuantSpace.named(self.space)
        check_mode(self.search)
        if self.search != "frozen" and self.method != "coalora":
            raise ValueError(f"search={self.search!r} refines CoA-LoRA's training set; method {self.method!r} "
                             f"takes search='frozen'")

    def resolved(self) -> RunSpec:
        """The spec with every default filled in (what the cache key is computed from)."""
        task_kind = "causal-lm" if self.task == "c4" else "classification"
        scales = LM_SCALES if task_kind == "causal-lm" else SCALES
        scale = self.scale or scales[self.preset]
        return replace(
            self,
            backbone=self.backbone or models.default_backbone(self.preset, task_kind),
            eval_budgets=tuple(self.eval_budgets or EVAL_BUDGETS[self.space]),
            unseen_budgets=tuple(self.unseen_budgets if self.unseen_budgets is not None
                                 else unseen_budgets(scale.pool_size, EVAL_BUDGETS[self.space],
                                                     pool_range=tuple(self.pool_range))),
            scale=scale,
            hp=self.hp or HyperParams(epochs=scale.epochs),
        )

    def key(self) -> str:
        """Content hash of the resolved spec. Fields added after version 1 are left out while at
        their neutral value (a frozen search, the default pool range), so earlier cached runs keep
        their keys."""
        data = {"version": RUN_VERSION, **asdict(self.resolved())}
        if data["search"] == "frozen":
            data = {k: v for k, v in data.items() if not k.startswith("search")}
        else:
            data["search_version"] = SEARCH_VERSION
        if tuple(data["pool_range"]) == POOL_RANGE:  # added later; the default keeps earlier keys
            del data["pool_range"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(spec: RunSpec) -> Path:
    return assets.home() / "runs" / spec.key()


# ---- data ----------------------------------------------------------------------------------------

def _batches(task, tokenizer, spec: RunSpec, split: str, shuffle: bool) -> DataLoader:
    scale = spec.scale
    n = scale.n_train if split == "train" else scale.n_dev
    generator = torch.Generator().manual_seed(spec.seed)
    if task.kind == "classification":
        data = getattr(task, split)
        if n is not None:
            data = data.shuffle(seed=0).select(range(min(n, len(data))))
        tokenized = tokenize_classification(data, tokenizer, scale.max_length)
        if split == "dev":  # evaluation order is free, and length-sorted batches halve its time (less padding)
            tokenized = tokenized.select(np.argsort([len(ids) for ids in tokenized["input_ids"]], kind="stable"))
        return DataLoader(tokenized, batch_size=scale.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=DataCollatorWithPadding(tokenizer))
    blocks = lm_blocks(list(getattr(task, split)["text"]), tokenizer, scale.max_length, n)  # [n, L]
    rows = [{"input_ids": b, "labels": b} for b in blocks]
    return DataLoader(rows, batch_size=scale.batch_size, shuffle=shuffle, generator=generator,
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
    """(kind, target budget, configuration): ILP configurations at the evaluation budgets ("target"),
    and for methods that can serve any configuration, ILP configurations at off-grid budgets and
    seeded random ones ("unseen")."""
    out = [("target", b, allocate(spec.backbone, b, spec.space)) for b in spec.eval_budgets]
    if spec.method in PER_CONFIGURATION:
        return out
    out += [("unseen", b, allocate(spec.backbone, b, spec.space)) for b in spec.unseen_budgets]
    space = QuantSpace.named(spec.space)
    out += [("unseen", None, Configuration.random(layout, space, seed=10_000 + i))
            for i in range(spec.scale.n_random_unseen)]
    return out


def training_configurations(spec: RunSpec) -> list[Configuration]:
    """CoA-LoRA: ILP configurations spread evenly over POOL_RANGE; the others: the evaluation budgets."""
    if spec.method != "coalora":
        return [allocate(spec.backbone, b, spec.space) for b in spec.eval_budgets]
    budgets = pool_budgets(spec.scale.pool_size, tuple(spec.pool_range))
    unique = {c.digest(): c for c in (allocate(spec.backbone, float(b), spec.space) for b in budgets)}
    return list(unique.values())


# ---- the run -------------------------------------------------------------------------------------

def _setup(spec: RunSpec):
    """Seeded task, CoA-LoRA/LoRA model and batches of a run: what training and evaluation share."""
    seed_everything(spec.seed)
    task = load_task(spec.task, spec.preset)
    backbone, tokenizer = models.load_backbone(spec.backbone, task.kind, num_labels=task.num_labels or 2)
    layout = models.matrix_layout(backbone, spec.backbone)
    model = lora.build_lora_model(backbone, layout, QuantSpace.named(spec.space), rank=spec.hp.rank,
                                  alpha=spec.hp.alpha, dropout=spec.hp.dropout,
                                  config_aware=spec.method == "coalora",
                                  task_type="SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM")
    train_batches = _batches(task, tokenizer, spec, "train", shuffle=True)
    dev_batches = _batches(task, tokenizer, spec, "dev", shuffle=False)
    return task, tokenizer, model, layout, train_batches, dev_batches


def _score(spec: RunSpec, task, trained, evaluations, dev_batches, seen: set[str]) -> list[dict]:
    """Tidy rows: `trained` evaluated on each (kind, budget, configuration) of `evaluations`."""
    label = models.backbone_spec(spec.backbone).label
    metric = TASK_METRICS[task.kind]
    rows = []
    for kind, budget, configuration in evaluations:
        result = evaluate(trained.load_for(configuration), configuration, dev_batches, task.kind)
        key = configuration.digest() if spec.method in PER_CONFIGURATION else "shared"
        rows.append({
            "method": spec.method, "backbone": spec.backbone, "backbone_label": label,
            "task": spec.task, "task_source": task.source, "stand_in": task.stand_in, "preset": spec.preset,
            "quantizer": spec.space, "configuration_id": configuration.digest(), "kind": kind,
            "budget": budget, "avg_bits": configuration.avg_bits,
            "seen": configuration.digest() in seen, "seed": spec.seed, "metric": metric,
            "value": result[metric], "loss": result["loss"],
            "train_seconds": trained.train_seconds[key], "eval_seconds": result["eval_seconds"],
        })
    return rows


def _execute(spec: RunSpec) -> tuple[pd.DataFrame, dict[str, dict[str, torch.Tensor]], list[dict], list[dict]]:
    task, tokenizer, model, layout, train_batches, dev_batches = _setup(spec)
    search = None
    if spec.search != "frozen":
        scoring = _batches(task, tokenizer, spec, "train", shuffle=True)  # own generator: train order untouched
        search = make_search_hook(spec.search, QuantSpace.named(spec.space), layout,
                                  fixed_batches(scoring, spec.search_batches), spec.search_starts,
                                  spec.search_steps, spec.search_segments, spec.seed)
    trained = train(spec.method, model, training_configurations(spec), train_batches, spec.hp, spec.seed, search)
    seen = {c.digest() for c in trained.configurations}
    evaluations = [(kind, budget, configuration)
                   for kind, budget, configuration in evaluation_configurations(spec, layout)
                   if not (kind == "unseen" and configuration.digest() in seen)]  # unseen = never trained on
    rows = _score(spec, task, trained, evaluations, dev_batches, seen)
    return pd.DataFrame(rows), trained.states, trained.history, [] if search is None else search.to_rows()


def seen_rows(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """A frozen-search CoA-LoRA run scored on its own training configurations (kind "seen"), for
    Figure 3's seen-vs-unseen panel: the run's target and unseen configurations are never trained on.
    Reloads the cached adapter (running the experiment first if needed); cached as seen.csv."""
    spec = spec.resolved()
    if spec.method != "coalora" or spec.search != "frozen":
        raise ValueError(f"seen configurations are CoA-LoRA's fixed training set: need method='coalora' and "
                         f"search='frozen', got method={spec.method!r}, search={spec.search!r}")
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
    rows = pd.read_csv(folder / name)
    rows.insert(1, "search", spec.search)  # from the spec, the source of truth for what it says
    return rows


def search_rounds(spec: RunSpec) -> pd.DataFrame:
    """The per-epoch pool, proposals and kept configurations of a cached CoA-LoRA run (Figure 2);
    empty for a frozen search. Runs the experiment first if it is not cached."""
    run_experiment(spec)
    return pd.read_csv(run_dir(spec.resolved()) / "search.csv")


def run_many(specs, recompute: bool = False) -> pd.DataFrame:
    """Concatenated rows of several runs (each cached on its own)."""
    return pd.concat([run_experiment(s, recompute) for s in specs], ignore_index=True)

