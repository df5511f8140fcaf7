"""The methods compared, as one table: what each trains and how figures and tables show it.

`METHODS` is the single home of these facts; training, studies, plots and benchmarks read it.
Its order is the order of columns, legends and rows everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from coalora.names import lookup


@dataclass(frozen=True)
class Method:
    """One method: its key in runs and results, label, colour and marker in figures, and what it trains."""

    key: str
    label: str
    color: str  # seaborn's "deep" palette, so figures read like the paper's defaults
    marker: str
    per_configuration: bool  # one adapter trained per quantization configuration (else one for all)
    config_aware: bool  # theta adjusts the shared adapter to each configuration

    @property
    def trains_once(self) -> bool:
        """One training serves every configuration, so its cost does not grow with their number."""
        return not self.per_configuration


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("qlora", "QLoRA", "#4C72B0", "s", per_configuration=True, config_aware=False),
    Method("lqlora", "LQ-LoRA", "#DD8452", "D", per_configuration=True, config_aware=False),
    Method("shared", "Shared-LoRA", "#55A868", "^", per_configuration=False, config_aware=False),
    Method("coalora", "CoA-LoRA", "#C44E52", "o", per_configuration=False, config_aware=True),
)}


def method(key: str) -> Method:
    """The method called `key`, or a ValueError naming the valid ones."""
    return lookup(METHODS, key, "method")


def check_method(key: str) -> str:
    """Return `key` if it names a method, else raise a ValueError naming the valid ones."""
    return method(key).key
