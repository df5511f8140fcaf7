"""Confidence intervals for differences between methods: a paired bootstrap over seeds and examples.

Two methods run with the same seeds score the same dev examples, so their per-example results pair
up. A resample draws seeds with replacement and, independently, dev examples with replacement (the
same examples for every method, seed and configuration: the pairing), and recomputes the statistic;
the interval is the 2.5th to 97.5th percentile of the resampled values. The seed level carries the
spread of training (data order, initialisation, dropout), the example level the finite dev set
(about 1.4 points of binomial standard error on 872 sentences), so the interval covers both.

Arrays are [S seeds, K configurations, N examples]: 1/0 per example for accuracy, or a block's mean
token loss for a causal LM (where a difference is a difference in log-perplexity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

# 2,000 resamples: percentile endpoints of a 95 % interval then move by about 0.1 point between
# bootstrap seeds at this data size, small against the intervals themselves (1-3 points).
N_BOOT = 2000
LEVEL = 0.95

# statistic(means, seed_weights) -> [B] values: `means` maps a name to [B, S, K] per-seed
# configuration means of one resample each, `seed_weights` [B, S] says how often each seed was drawn.
Statistic = Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray]


def bootstrap(arrays: Mapping[str, np.ndarray], statistic: Statistic, n_boot: int = N_BOOT,
              seed: int = 0) -> tuple[float, np.ndarray]:
    """(the statistic on the data, its `n_boot` resampled values [B]) for `arrays` name -> [S, K, N],
    all over the same seeds and examples."""
    shapes = {a.shape[0::2] for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"paired arrays need the same seeds and examples, got shapes "
                         f"{ {name: a.shape for name, a in arrays.items()} }")
    (n_seeds, n_examples), = shapes
    rng = np.random.default_rng(seed)
    seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot).astype(float)  # [B, S]
    example_weights = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=n_boot)  # [B, N]
    means = {name: np.einsum("bn,skn->bsk", example_weights, a) / n_examples for name, a in arrays.items()}
    point = {name: a.mean(axis=2)[None] for name, a in arrays.items()}
    return float(statistic(point, np.ones((1, n_seeds)))[0]), statistic(means, seed_weights)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def seed_mean(values: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
    """[B, S] per-seed values -> [B] their mean over the drawn seeds."""
    return (values * seed_weights).sum(axis=1) / seed_weights.sum(axis=1)


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean of a - b over seeds, examples and the K configurations, and per configuration: for each
    k and for "mean", (estimate, ci_low, ci_high). `a`, `b`: [S, K, N] over the same seeds, examples
    and configurations (the same budgets)."""
    out = {}
    for k in [*range(a.shape[1]), "mean"]:
        pick = slice(None) if k == "mean" else slice(k, k + 1)

        def statistic(means, w, pick=pick):
            return seed_mean((means["a"][:, :, pick] - means["b"][:, :, pick]).mean(axis=2), w)

        estimate, samples = bootstrap({"a": a, "b": b}, statistic, n_boot, seed)
        out[k] = (estimate, *interval(samples))
    return out


def verdict(lo: float, hi: float, direction: int, equivalence: float | None = None) -> str:
    """What an interval says about a claim of the paper.

    A directional claim (`direction` +1: ours should be above zero, -1: below): "reproduced" when the
    whole interval lies on the paper's side of zero, "not reproduced" when it lies wholly on the other
    side, else "inconclusive at this scale". An equivalence claim (`equivalence` = the paper's margin,
    e.g. 1 point for "seen and unseen within 1 %"): "reproduced" when the interval lies inside
    (-margin, margin), "not reproduced" when it lies wholly outside, else inconclusive.
    """
    if equivalence is not None:
        if -equivalence < lo and hi < equivalence:
            return "reproduced"
        if lo >= equivalence or hi <= -equivalence:
            return "not reproduced"
        return "inconclusive at this scale"
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if (lo > 0 and direction == 1) or (hi < 0 and direction == -1):
        return "reproduced"
    if (hi < 0 and direction == 1) or (lo > 0 and direction == -1):
        return "not reproduced"
    return "inconclusive at this scale"
