"""The claims table's pieces on hand-made per-example results (no model, no run): the accuracy gap,
the hypervolume gap against the best baseline, the cost ratio, and the table's columns."""

import numpy as np
import pandas as pd
import pytest

from coalora import claims
from coalora.metrics import hypervolume

BITS = [2.5, 3.0, 3.5, 4.0]
RANGE = (2.0, 8.0)


def results(accuracies, n: int = 200, seeds: int = 3, seed: int = 0) -> np.ndarray:
    """[S, K, N] 1/0 per example with the given accuracy per configuration."""
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([(rng.random(n) < a).astype(float) for a in accuracies]) for _ in range(seeds)])


def test_accuracy_gap_is_in_points_and_paired():
    b = results([0.7] * 4)
    a = np.where(np.random.default_rng(1).random(b.shape) < 0.1, 1.0, b)  # fixes 10 % of b's examples
    estimate, lo, hi = claims.accuracy_gap({"a": a, "b": b}, "a", "b")
    assert lo < estimate < hi and 0 < lo and estimate == pytest.approx(100 * (a - b).mean())


def test_hypervolume_gap_against_the_best_baseline():
    same = results([0.70, 0.75, 0.80, 0.82])
    arrays = {"coalora": same, "qlora": same.copy(), "shared": results([0.5, 0.6, 0.6, 0.7], seed=2)}
    estimate, lo, hi, best = claims.hypervolume_gap(arrays, BITS, RANGE, "coalora", ["qlora", "shared"])
    assert best == "qlora" and estimate == lo == hi == 0.0
    better = np.minimum(1.0, same + (np.random.default_rng(3).random(same.shape) < 0.2))
    estimate, lo, hi, _ = claims.hypervolume_gap({**arrays, "coalora": better}, BITS, RANGE, "coalora",
                                                 ["qlora", "shared"])
    point = np.mean([hypervolume(BITS, b.mean(1), RANGE) - hypervolume(BITS, a.mean(1), RANGE)
                     for a, b in zip(same, better)])  # per seed, as Figure 3's hypervolumes
    assert 0 < lo < estimate < hi and estimate == pytest.approx(point, abs=1e-9)


def test_cost_ratio_of_one_training_to_six_per_configuration_trainings():
    rows = pd.DataFrame([{"method": m, "seed": s, "configuration_id": f"{m}{c}", "configuration_set": "target",
                          "train_seconds": t}
                         for s in range(3) for m, c, t in [("qlora", 0, 60.0), ("qlora", 1, 60.0),
                                                           ("coalora", 0, 120.0 + s), ("coalora", 1, 120.0 + s)]])
    estimate, lo, hi = claims.cost_ratio(rows)
    assert estimate == pytest.approx(121.0 / 360.0) and lo <= estimate <= hi < 0.4


def test_the_table_has_the_documented_columns():
    row = claims._row("x", "paper", 1.0, 0.5, 1.5, 3, 1)
    assert list(row) == claims.COLUMNS and row["verdict"] == "reproduced"
