"""Every benchmark in bench/ runs to completion in its --quick mode, so a broken benchmark fails the
suite instead of rotting. The numbers they print are measurements, never asserted here."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# A line each benchmark prints once it has measured everything it measures.
LAST_LINE = {"quant.py": "cost table", "adapt.py": "training step with K=2", "search.py": "synthetic, 10 matrices (50)",
             "train_step.py": "s/step with PEFT's input casts", "memory.py": "memory per weights-tier budget: done"}


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(LAST_LINE)


@pytest.mark.parametrize("name", sorted(LAST_LINE))
def test_benchmark_runs_in_quick_mode(name):
    done = subprocess.run([sys.executable, str(BENCH / name), "--quick"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert LAST_LINE[name] in done.stdout, done.stdout[-2000:]
