"""One rule for every registry of named things (presets, tasks, methods, backbones, search modes...):
an unknown name is a ValueError that names the bad value and every valid one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """`table[name]`, or a ValueError: "unknown <what> '<name>'; valid <what>s: a, b, c"."""
    check_name(name, table, what)
    return table[name]


def check_name(name: str, valid: Iterable[str], what: str) -> str:
    """`name` if it is one of `valid`, else the ValueError of `lookup`."""
    valid = tuple(valid)
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"unknown {what} {name!r}; valid {what}s: {', '.join(valid)}")
    return name
