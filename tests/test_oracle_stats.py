"""hsr_core/stats.py's remaining behaviours against independent oracles (issue 18, mutation
testing): the Wilson interval's closed ends for every small ``n`` and its ``z``, percentiles
against numpy's, the paired bootstrap's empty and undefined cases, its coverage level and its
float columns, RSR where pruning does not raise the ASR, and interval overlap.

Oracles: the score test's acceptance region scanned on a grid for any ``z``; the ends of the
Wilson interval worked out by hand (at ``k = 0`` the upper end is ``z^2 / (n + z^2)``, at
``k = n`` the lower end is ``n / (n + z^2)``); ``numpy.percentile`` (linear method) for the
percentiles; a plain Python loop with the same generator for the bootstrap.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from oracles import loop_bootstrap, scan_wilson

from hsr_core import stats

Z = stats.Z95


@pytest.mark.parametrize("n", range(1, 41))
def test_wilson_ends_for_every_small_n(n):
    """At k = 0 and k = n one end is exactly 0 or 1 (the formula's rounding gives 1 +- 2e-16
    for some n, e.g. 9 and 13), the other is worked out by hand; n = 1 is a rate too."""
    lo, hi = stats.wilson(0, n)
    assert lo == 0.0 and hi == pytest.approx(Z * Z / (n + Z * Z), rel=1e-12)
    lo, hi = stats.wilson(n, n)
    assert hi == 1.0 and lo == pytest.approx(n / (n + Z * Z), rel=1e-12)


@pytest.mark.parametrize(("k", "n", "z"), [(3, 12, 1.0), (1, 1, 1.0), (5, 9, 2.5758)])
def test_rate_passes_its_z_on(k, n, z):
    """``rate(k, n, z)`` is the interval at that z, not at 95% (z = 1: 68%; 2.5758: 99%)."""
    r = stats.rate(k, n, z)
    lo, hi = scan_wilson(k, n, z)
    assert r.low == pytest.approx(lo, abs=2e-5) and r.high == pytest.approx(hi, abs=2e-5)
    assert (r.low, r.high) != stats.wilson(k, n)


def test_rate_of_nothing_and_its_dict():
    r = stats.rate(0, 0)
    assert (r.k, r.n) == (0, 0) and all(math.isnan(x) for x in (r.value, r.low, r.high))
    lo, hi = stats.wilson(3, 12)
    assert stats.rate(3, 12).to_dict() == {"k": 3, "n": 12, "value": 0.25, "low": lo, "high": hi}


def test_wilson_refuses_counts_outside_the_total():
    with pytest.raises(ValueError) as err:
        stats.wilson(5, 3)
    assert str(err.value) == "need 0 <= k <= n, got k=5, n=3"
    with pytest.raises(ValueError, match="got k=-1, n=3"):
        stats.wilson(-1, 3)


def test_percentile_equals_numpys_linear_method():
    rng = random.Random(0)
    for n in (1, 2, 3, 5, 8):
        for _ in range(20):
            values = sorted(rng.uniform(-5, 5) for _ in range(n))
            for q in (0.0, 0.025, 0.25, 0.5, 0.6, 0.975, 1.0):
                expected = float(np.percentile(values, 100 * q))
                assert stats.percentile(values, q) == pytest.approx(expected, abs=1e-12)
    assert stats.percentile([0.0, 10.0], 0.5) == 5.0  # by hand
    assert stats.percentile([7.0], 0.3) == 7.0
    assert math.isnan(stats.percentile([], 0.5))


# --- the paired bootstrap ----------------------------------------------------------------------


def test_bootstrap_dict_names_whether_zero_is_inside():
    b = stats.Bootstrap(0.5, 0.1, 0.9, 0.95, 100, 90, 3)
    assert b.to_dict() == {
        "value": 0.5,
        "low": 0.1,
        "high": 0.9,
        "level": 0.95,
        "resamples": 100,
        "defined": 90,
        "seed": 3,
        "paired_by": "prompt",
        "contains_zero": False,
    }
    assert stats.Bootstrap(0.5, -0.1, 0.9, 0.95, 100, 90, 3).to_dict()["contains_zero"] is True
    assert stats.Bootstrap(None, None, None, 0.95, 100, 0, 3).to_dict()["contains_zero"] is True


@pytest.mark.parametrize("columns", [[], [[], [], []]])
def test_no_prompts_no_interval(columns):
    """No columns, or columns without prompts: nothing is computed or drawn."""
    called = []

    def statistic(*cols):
        called.append(cols)
        return 1.0

    got = stats.paired_bootstrap(columns, statistic, resamples=50, seed=2)
    assert got == stats.Bootstrap(None, None, None, 0.95, 0, 0, 2)
    assert called == []


def test_undefined_everywhere():
    """Pruning that does not raise the ASR: RSR is undefined on the prompts and in every
    resample (the pruned column is the dense one), so value and interval are None."""
    d = [1.0, 0.0, 1.0, 0.0, 0.0]
    got = stats.paired_bootstrap([d, d, [0.0] * 5], stats.rsr_of, resamples=40, seed=0)
    assert got == stats.Bootstrap(None, None, None, 0.95, 40, 0, 0)


def sorted_loop_bootstrap(columns, statistic, resamples, seed):
    return sorted(loop_bootstrap(columns, statistic, resamples, seed))


def test_level_sets_the_percentiles():
    """A 90% interval is the 5th and 95th percentiles of the resampled differences."""
    g = np.random.default_rng(4)
    a, b = [[float(x) for x in g.random(30) < r] for r in (0.6, 0.3)]
    got = stats.paired_bootstrap([a, b], stats.difference_of, resamples=300, seed=9, level=0.9)
    ref = sorted_loop_bootstrap([a, b], lambda x, y: sum(x) / 30 - sum(y) / 30, 300, 9)
    assert got.level == 0.9 and got.defined == 300
    assert got.low == pytest.approx(float(np.percentile(ref, 5)), abs=1e-12)
    assert got.high == pytest.approx(float(np.percentile(ref, 95)), abs=1e-12)
    assert got.value == pytest.approx(sum(a) / 30 - sum(b) / 30)


def test_columns_reach_the_statistic_as_floats():
    """Bool columns (as evaluate's outcomes are) become float arrays: a statistic that
    subtracts them works (numpy refuses ``-`` between bool arrays)."""
    a = np.array([True, False, True, True, False, True])
    b = np.array([False, False, True, False, False, False])
    dtypes = set()

    def mean_difference(x, y):
        dtypes.update((x.dtype, y.dtype))
        return float((x - y).mean())

    got = stats.paired_bootstrap([a, b], mean_difference, resamples=100, seed=1)
    ref = sorted_loop_bootstrap(
        [a.tolist(), b.tolist()], lambda x, y: (sum(x) - sum(y)) / 6, 100, 1
    )
    assert dtypes == {np.dtype(np.float64)}
    assert got.value == pytest.approx(0.5)  # (4 - 1) / 6, by hand
    assert got.low == pytest.approx(float(np.percentile(ref, 2.5)), abs=1e-12)
    assert got.high == pytest.approx(float(np.percentile(ref, 97.5)), abs=1e-12)


def test_columns_of_different_lengths_are_refused():
    with pytest.raises(ValueError) as err:
        stats.paired_bootstrap([[1.0, 0.0], [1.0]], stats.difference_of)
    assert str(err.value) == "paired bootstrap: every column needs one value per prompt"


def test_rsr_of_by_hand():
    """ASR dense 0, pruned 0.5, realigned 0.25: RSR (0.5 - 0.25) / 0.5 = 0.5; undefined when
    pruning leaves the ASR as it was or lowers it."""
    d = np.array([0.0, 0.0, 0.0, 0.0])
    p = np.array([1.0, 1.0, 0.0, 0.0])
    r = np.array([1.0, 0.0, 0.0, 0.0])
    assert stats.rsr_of(d, p, r) == 0.5
    assert stats.rsr_of(p, p, r) is None  # gap 0
    assert stats.rsr_of(p, d, r) is None  # gap -0.5
    assert stats.difference_of(p, r) == 0.25


@pytest.mark.parametrize(
    ("a", "b", "apart"),
    [
        ((0.0, 1.0), (0.5, 2.0), False),
        ((0.5, 2.0), (0.0, 1.0), False),
        ((0.0, 1.0), (1.0, 2.0), False),  # touching ends overlap, either way round
        ((1.0, 2.0), (0.0, 1.0), False),
        ((0.0, 1.0), (1.01, 2.0), True),
        ((1.01, 2.0), (0.0, 1.0), True),
        ((0.2, 0.3), (0.0, 1.0), False),  # one inside the other
        ((0.0, 0.1), (math.nan, math.nan), False),  # an undefined interval is no evidence
        ((0.0, 0.1), (0.5, math.inf), False),
    ],
)
def test_overlap_by_hand(a, b, apart):
    assert stats.overlap(a, b) is (not apart)
