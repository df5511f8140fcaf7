"""The four presets: one code path at four sizes, each a `Preset` record read from presets.toml.

A preset says which backbone runs each task type, how big its runs are, where its figures and
results go, and whether it needs the model hub. Everything else (tasks, methods, budgets) is the
same under every preset: `smoke` for CI and tests, `default` for a laptop CPU offline, `large` for
a GPU with the offline assets, `paper` for a GPU with the model hub.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from coalora.names import check_name, lookup

# What a task asks of a model: a label per text, or the next token. Backbones, data and metrics
# are chosen per task type.
TASK_TYPES = ("classification", "causal-lm")


def check_task_type(task_type: str) -> str:
    """Return `task_type` if it is known, else raise a ValueError naming the valid ones."""
    return check_name(task_type, TASK_TYPES, "task type")


@dataclass(frozen=True)
class RunSize:
    """How big one run is: data sizes, batch shape, epochs and CoA-LoRA's configuration pool."""

    batch_size: int
    max_length: int  # tokens per sentence, or the block size of a causal LM
    epochs: int
    pool_step: float  # bits between the budgets of CoA-LoRA's initial training set
    n_random_unseen: int  # random configurations the methods that train once are also scored on
    n_train: int | None = None  # training sentences, or training token blocks for a causal LM (None: all)
    n_dev: int | None = None  # dev sentences or blocks (None: the whole dev split)


@dataclass(frozen=True)
class Preset:
    """One preset: backbone and run size per task type, output folder, whether it needs the hub, its
    arithmetic and the hyper-parameters it sets."""

    name: str
    backbones: dict[str, str]  # task type -> backbone name (coalora.models.BACKBONES)
    sizes: dict[str, RunSize]  # task type -> run size
    needs_hub: bool
    precision: str  # training and evaluation arithmetic, coalora.training.PRECISIONS
    hp: dict[str, object]  # coalora.training.HyperParams fields this preset sets (the rest: their defaults)

    def backbone(self, task_type: str) -> str:
        return self.backbones[check_task_type(task_type)]

    def size(self, task_type: str) -> RunSize:
        return self.sizes[check_task_type(task_type)]

    @property
    def output_subfolder(self) -> tuple[str, ...]:
        """Below `figures/` and `results/`: nothing for `default` (the committed files), else the
        preset's name, so a smoke or large run never overwrites what the default preset wrote."""
        return () if self.name == "default" else (self.name,)


def _read(path: Path) -> dict[str, Preset]:
    with open(path, "rb") as f:
        table = tomllib.load(f)
    return {name: Preset(name, entry["backbones"], {t: RunSize(**size) for t, size in entry["sizes"].items()},
                         entry["needs_hub"], entry["precision"], entry.get("hp", {}))
            for name, entry in table.items()}


PRESETS: dict[str, Preset] = _read(Path(__file__).with_name("presets.toml"))
OFFLINE_PRESETS = tuple(name for name, p in PRESETS.items() if not p.needs_hub)


def preset(name: str) -> Preset:
    """The preset called `name`, or a ValueError naming the valid ones."""
    return lookup(PRESETS, name, "preset")
