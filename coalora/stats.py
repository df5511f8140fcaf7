"""Confidence intervals for differences between methods, over seeds and dev examples.

Two methods run with the same seeds score the same dev examples, so their per-example results pair
up. The interval has two levels:

* examples: a paired bootstrap. A resample draws dev examples with replacement (the same examples for
  every method, seed and configuration: the pairing) and recomputes the statistic per seed. This is the
  finite dev set (about 1.4 points of binomial standard error on 872 sentences).
* seeds: the statistic is a mean over S training seeds, whose spread (data order, initialisation,
  dropout) enters as a Student-t term with S - 1 degrees of freedom, t * sd(per-seed values) / sqrt(S),
  added to each resample. Resampling 3 seeds instead would give 10 distinct sets, understate the spread
  by sqrt(2/3) and never reach beyond the observed seeds; with 3 seeds the t quantile (4.3) widens the
  seed part honestly. Each example resample takes one t draw with both signs (antithetic), so the
  interval of b - a is that of a - b mirrored (up to rounding). One seed has no seed term (`n_seeds`
  says so in every table).

The interval is the 2.5th to 97.5th percentile of the resampled values. Arrays are [S seeds,
K configurations, N examples]: 1/0 per example for accuracy, or a block's mean token loss for a causal LM
(where a difference is a difference in log-perplexity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

# 2,000 resamples: percentile endpoints of a 95 % interval then move by about 0.1 point between
# bootstrap seeds at this data size (measured: 0.32-0.44 and 3.20-3.35 over five bootstrap seeds for a
# 1.8-point gap on 3 x 4 x 872 results), small against the intervals themselves.
N_BOOT = 2000
LEVEL = 0.95

# statistic(means) -> [B, S] per-seed values: `means` maps a name to [B, S, K] per-seed configuration
# means of one example resample each.
Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def bootstrap(arrays: Mapping[str, np.ndarray], statistic: Statistic, n_boot: int = N_BOOT,
              seed: int = 0) -> tuple[float, np.ndarray]:
    """(the statistic's mean over seeds on the data, resampled values [2 n_boot]) for `arrays`
    name -> [S, K, N], all over the same seeds and examples: `n_boot` example resamples, each with a
    seed term of either sign."""
    shapes = {a.shape[0::2] for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"paired arrays need the same seeds and examples, got shapes "
                         f"{ {name: a.shape for name, a in arrays.items()} }")
    (n_seeds, n_examples), = shapes
    rng = np.random.default_rng(seed)
    example_weights = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=n_boot)  # [B, N]
    means = {name: np.einsum("bn,skn->bsk", example_weights, a) / n_examples for name, a in arrays.items()}
    per_seed = statistic({name: a.mean(axis=2)[None] for name, a in arrays.items()})[0]  # [S]
    samples = statistic(means).mean(axis=1)  # [B]
    if n_seeds > 1:
        spread = per_seed.std(ddof=1) / np.sqrt(n_seeds)
        seed_term = spread * rng.standard_t(n_seeds - 1, size=n_boot)
        return float(per_seed.mean()), np.concatenate([samples + seed_term, samples - seed_term])
    return float(per_seed.mean()), np.concatenate([samples, samples])


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean of a - b over seeds, examples and the K configurations, and per configuration: for each
    k and for "mean", (estimate, ci_low, ci_high). `a`, `b`: [S, K, N] over the same seeds, examples
    and configurations (the same budgets)."""
    out = {}
    for k in [*range(a.shape[1]), "mean"]:
        pick = slice(None) if k == "mean" else slice(k, k + 1)

        def statistic(means, pick=pick):
            return (means["a"][:, :, pick] - means["b"][:, :, pick]).mean(axis=2)

        estimate, samples = bootstrap({"a": a, "b": b}, statistic, n_boot, seed)
        out[k] = (estimate, *interval(samples))
    return out


def verdict(lo: float, hi: float, direction: int, equivalence: float | None = None, margin: float = 0.0) -> str:
    """What an interval says about a claim of the paper.

    A directional claim (`direction` +1: ours should be above zero, -1: below): "reproduced" when the
    whole interval lies on the paper's side of zero, "not reproduced" when it lies wholly on the other
    side, else "inconclusive at this scale". With a `margin` (> 0) the claim is "comparable or better":
    the line is drawn at -margin (direction +1) or +margin (direction -1) instead of zero. An
    equivalence claim (`equivalence` = the paper's margin, e.g. 1 point for "seen and unseen within
    1 %"): "reproduced" when the interval lies inside (-margin, margin), "not reproduced" when it lies
    wholly outside, else inconclusive.
    """
    if equivalence is not None:
        if -equivalence < lo and hi < equivalence:
            return "reproduced"
        if lo >= equivalence or hi <= -equivalence:
            return "not reproduced"
        return "inconclusive at this scale"
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    line = -direction * margin
    if (lo > line and direction == 1) or (hi < line and direction == -1):
        return "reproduced"
    if (hi < line and direction == 1) or (lo > line and direction == -1):
        return "not reproduced"
    return "inconclusive at this scale"
