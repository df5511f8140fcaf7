"""The paired bootstrap over seeds and examples, and the verdict rule of the claims table."""

import numpy as np
import pytest

from coalora import stats


def test_identical_methods_differ_by_exactly_zero():
    a = np.random.default_rng(0).integers(0, 2, size=(3, 4, 50)).astype(float)
    out = stats.paired_difference(a, a.copy(), n_boot=200)
    assert all(v == (0.0, 0.0, 0.0) for v in out.values()) and set(out) == {0, 1, 2, 3, "mean"}


def test_a_constant_gap_has_a_degenerate_interval_at_the_gap():
    b = np.zeros((3, 2, 40))
    est, lo, hi = stats.paired_difference(b + 1, b, n_boot=200)["mean"]
    assert est == lo == hi == 1.0


def test_the_interval_covers_a_known_difference_and_narrows_with_more_examples():
    rng = np.random.default_rng(1)
    widths = []
    for n in (200, 3200):
        b = (rng.random((3, 1, n)) < 0.70).astype(float)
        a = np.where(rng.random((3, 1, n)) < 0.05, 1.0, b)  # a fixes 5 % of b's examples at random
        est, lo, hi = stats.paired_difference(a, b, n_boot=500)["mean"]
        assert lo <= 0.3 * 0.05 <= hi and lo <= est <= hi  # the true gain, 5 % of the 30 % b gets wrong
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_seeds_are_a_level_of_their_own():
    """Examples fixed, seeds that disagree: the interval must reflect the seed-to-seed spread."""
    b = np.zeros((3, 1, 100))
    a = np.stack([np.full((1, 100), v) for v in (0.0, 0.5, 1.0)])  # the gain is 0, 0.5 or 1 by seed
    est, lo, hi = stats.paired_difference(a, b, n_boot=4000)["mean"]
    # the seed term: Student t with 2 degrees of freedom (97.5 % quantile 4.30) times sd / sqrt(3)
    assert est == pytest.approx(0.5) and hi - est == pytest.approx(4.30 * 0.5 / np.sqrt(3), rel=0.15)
    assert est - lo == pytest.approx(hi - est, rel=0.15)


def test_one_seed_has_no_seed_term():
    a, b = np.ones((1, 1, 100)), np.zeros((1, 1, 100))
    assert stats.paired_difference(a, b, n_boot=200)["mean"] == (1.0, 1.0, 1.0)


def test_arrays_must_pair_up():
    with pytest.raises(ValueError, match="same seeds and examples"):
        stats.paired_difference(np.zeros((3, 1, 10)), np.zeros((2, 1, 10)))


@pytest.mark.parametrize(("lo", "hi", "direction", "equivalence", "expected"), [
    (0.2, 1.5, 1, None, "reproduced"),
    (-1.5, -0.2, 1, None, "not reproduced"),
    (-0.5, 0.7, 1, None, "inconclusive at this scale"),
    (-1.5, -0.2, -1, None, "reproduced"),
    (-0.4, 0.6, 0, 1.0, "reproduced"),
    (1.2, 2.0, 0, 1.0, "not reproduced"),
    (0.5, 1.5, 0, 1.0, "inconclusive at this scale"),
])
def test_verdicts(lo, hi, direction, equivalence, expected):
    assert stats.verdict(lo, hi, direction, equivalence) == expected


@pytest.mark.parametrize(("lo", "hi", "expected"), [(-0.2, 0.03, "reproduced"), (-0.2, 0.08, "inconclusive at this scale"),
                                                    (0.06, 0.2, "not reproduced")])
def test_comparable_or_lower_has_a_margin(lo, hi, expected):
    assert stats.verdict(lo, hi, -1, margin=0.05) == expected


def test_verdict_needs_a_direction():
    with pytest.raises(ValueError, match="direction must be"):
        stats.verdict(0.1, 0.2, 0)


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_swapping_the_methods_mirrors_the_interval_exactly(n_seeds):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 2, size=(n_seeds, 2, 200)).astype(float) for _ in range(2))
    ab, ba = stats.paired_difference(a, b), stats.paired_difference(b, a)
    for k in ab:
        estimate, lo, hi = ab[k]
        assert ba[k] == pytest.approx((-estimate, -hi, -lo), abs=1e-12)  # rounding only
