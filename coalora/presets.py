"""The four presets: one code path at four sizes, each a `Preset` record.

A preset says which backbone runs each task type, how big its runs are, where its figures and
results go, and whether it needs the model hub. Everything else (tasks, methods, budgets) is the
same under every preset: `smoke` for CI and tests, `default` for a laptop CPU offline, `large` for
a GPU with the offline assets, `paper` for a GPU with the model hub.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a task asks of a model: a label per text, or the next token. Backbones, data and metrics
# are chosen per task type.
TASK_TYPES = ("classification", "causal-lm")


def check_task_type(task_type: str) -> str:
    """Return `task_type` if it is known, else raise a ValueError naming the valid ones."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; valid task types: {', '.join(TASK_TYPES)}")
    return task_type


@dataclass(frozen=True)
class RunSize:
    """How big one run is: data sizes, batch shape, epochs and CoA-LoRA's configuration pool."""

    n_train: int | None  # training sentences, or training token blocks for a causal LM (None: all)
    n_dev: int | None  # dev sentences or blocks (None: the whole dev split)
    batch_size: int
    max_length: int  # tokens per sentence, or the block size of a causal LM
    epochs: int
    pool_size: int  # initial CoA-LoRA training configurations
    n_random_unseen: int  # random configurations CoA-LoRA and Shared-LoRA are also scored on


@dataclass(frozen=True)
class Preset:
    """One preset: backbone and run size per task type, output folder, and whether it needs the hub."""

    name: str
    backbones: dict[str, str]  # task type -> backbone name (coalora.models.BACKBONES)
    sizes: dict[str, RunSize]  # task type -> run size
    needs_hub: bool

    def backbone(self, task_type: str) -> str:
        return self.backbones[check_task_type(task_type)]

    def size(self, task_type: str) -> RunSize:
        return self.sizes[check_task_type(task_type)]

    @property
    def output_subfolder(self) -> tuple[str, ...]:
        """Below `figures/` and `results/`: nothing for `default` (the committed files), else the
        preset's name, so a smoke or large run never overwrites what the default preset wrote."""
        return () if self.name == "default" else (self.name,)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("smoke",
           {"classification": "minilm-l6", "causal-lm": "smollm2-135m"},
           {"classification": RunSize(n_train=64, n_dev=64, batch_size=16, max_length=32, epochs=1, pool_size=6,
                                      n_random_unseen=2),
            "causal-lm": RunSize(n_train=8, n_dev=4, batch_size=2, max_length=64, epochs=1, pool_size=4,
                                 n_random_unseen=1)},
           needs_hub=False),
    Preset("default",
           {"classification": "minilm-l6", "causal-lm": "smollm2-135m"},
           {"classification": RunSize(n_train=2048, n_dev=None, batch_size=32, max_length=64, epochs=2, pool_size=20,
                                      n_random_unseen=5),
            "causal-lm": RunSize(n_train=128, n_dev=32, batch_size=4, max_length=128, epochs=1, pool_size=12,
                                 n_random_unseen=3)},
           needs_hub=False),
    Preset("large",
           {"classification": "mpnet-base", "causal-lm": "qwen2.5-coder-1.5b"},
           {"classification": RunSize(n_train=8192, n_dev=None, batch_size=32, max_length=128, epochs=3, pool_size=50,
                                      n_random_unseen=10),
            "causal-lm": RunSize(n_train=1024, n_dev=64, batch_size=1, max_length=1024, epochs=1, pool_size=20,
                                 n_random_unseen=5)},
           needs_hub=False),
    # The paper's sizes: full GLUE training splits, 10 GLUE / 5 C4 epochs, 50 initial configurations,
    # 1024-token C4 blocks, perplexity on 30 validation blocks (docs/method.md#evaluation).
    Preset("paper",
           {"classification": "roberta-large", "causal-lm": "qwen2.5-1.5b"},
           {"classification": RunSize(n_train=None, n_dev=None, batch_size=64, max_length=128, epochs=10, pool_size=50,
                                      n_random_unseen=10),
            "causal-lm": RunSize(n_train=None, n_dev=30, batch_size=1, max_length=1024, epochs=5, pool_size=50,
                                 n_random_unseen=10)},
           needs_hub=True),
)}
OFFLINE_PRESETS = tuple(name for name, p in PRESETS.items() if not p.needs_hub)


def preset(name: str) -> Preset:
    """The preset called `name`, or a ValueError naming the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def check_preset(name: str) -> str:
    """Return `name` if it is a known preset, else raise a ValueError naming the valid ones."""
    return preset(name).name
