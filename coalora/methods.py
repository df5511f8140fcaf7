"""The methods compared, as one table: what each trains and how figures and tables show it.

`METHODS` is the single home of these facts; training, studies, plots and benchmarks read it.
Its order is the order of columns, legends and rows everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from coalora.names import check_name, lookup

# What a method trains its adapter on (coalora.training):
TRAINING = (
    "per-configuration",  # a fresh adapter for each evaluation configuration
    "shared",  # one adapter, a random evaluation configuration per step
    "pool",  # one adapter, K configurations per step from CoA-LoRA's training set (refined by the search)
    "full-precision",  # one adapter on the unquantized backbone: the ceiling
    "none",  # no training: the quantized backbone as it is, the floor
)
# How the LoRA factors start: PEFT's default (B = 0), or so that Q + s BA approximates W.
INITS = ("default", "lqlora", "loftq")


@dataclass(frozen=True)
class Method:
    """One method: its key in runs and results, label, colour and marker in figures, and what it trains."""

    key: str
    label: str
    color: str  # seaborn's "deep" palette for the compared methods, greys for the reference rows
    marker: str
    training: str  # one of TRAINING
    theta: bool = False  # theta adjusts the shared adapter to each configuration (CoA-LoRA)
    init: str = "default"  # one of INITS
    reference: bool = False  # a ceiling or floor drawn beside the methods, not one of them

    def __post_init__(self):
        check_name(self.training, TRAINING, "training")
        check_name(self.init, INITS, "LoRA initialisation")

    @property
    def per_configuration(self) -> bool:
        """One adapter trained per quantization configuration."""
        return self.training == "per-configuration"

    @property
    def trains_once(self) -> bool:
        """One training serves every configuration, so its cost does not grow with their number."""
        return self.training in ("shared", "pool", "full-precision")

    @property
    def serves_any_configuration(self) -> bool:
        """One quantized-weight adapter for every configuration: scored on unseen ones too."""
        return self.training in ("shared", "pool")


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("qlora", "QLoRA", "#4C72B0", "s", "per-configuration"),
    Method("lqlora", "LQ-LoRA", "#DD8452", "D", "per-configuration", init="lqlora"),
    Method("loftq", "LoftQ-init LoRA", "#CCB974", "P", "per-configuration", init="loftq"),
    Method("shared", "Shared-LoRA", "#55A868", "^", "shared"),
    Method("coalora-no-theta", "CoA-LoRA without θ", "#8172B3", "v", "pool"),
    Method("coalora", "CoA-LoRA", "#C44E52", "o", "pool", theta=True),
    Method("fp-lora", "LoRA, full precision", "#333333", "*", "full-precision", reference=True),
    Method("no-adapter", "no adapter", "#8C8C8C", "X", "none", reference=True),
)}
# The methods of the paper's comparisons (Figures 1, 3, 4, Table 1), with the reference rows.
COMPARED = ("qlora", "lqlora", "shared", "coalora-no-theta", "coalora", "fp-lora")


def method(key: str) -> Method:
    """The method called `key`, or a ValueError naming the valid ones."""
    return lookup(METHODS, key, "method")


def check_method(key: str) -> str:
    """Return `key` if it names a method, else raise a ValueError naming the valid ones."""
    return method(key).key
