"""Intervals against slow, obvious implementations (hsr_core/stats.py, hsr_core/evaluate.py).

- Wilson: the closed form against a brute-force scan of the binomial score test, i.e. every
  ``p0`` on a fine grid with ``|k/n - p0| <= z * sqrt(p0 (1 - p0) / n)``.
- Bootstrap: against a plain Python loop with the same generator, the statistic computed with
  ``sum`` and ``len``, and ``statistics.quantiles`` (inclusive method) for the percentiles.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from oracles import loop_bootstrap, scan_wilson

from hsr_core import stats
from hsr_core.config import EvalConfig
from hsr_core.data import Sample
from hsr_core.evaluate import compare, judge_answers

Z = statistics.NormalDist().inv_cdf(0.975)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (7, 70), (40, 70)])
def test_wilson_is_the_score_tests_acceptance_region(k, n):
    lo, hi = stats.wilson(k, n)
    slo, shi = scan_wilson(k, n)
    assert lo == pytest.approx(slo, abs=2e-5) and hi == pytest.approx(shi, abs=2e-5)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_ends_and_empty():
    assert stats.wilson(0, 20)[0] == 0.0 and stats.wilson(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in stats.wilson(0, 0))
    with pytest.raises(ValueError):
        stats.wilson(5, 3)
    r = stats.rate(3, 12)
    assert (r.k, r.n, r.value) == (3, 12, 0.25) and (r.low, r.high) == stats.wilson(3, 12)


def quantile(values: list[float], q: float) -> float:
    """The 2.5% / 97.5% cut of ``statistics.quantiles`` (inclusive = type 7)."""
    cuts = statistics.quantiles(values, n=40, method="inclusive")
    return cuts[0] if q < 0.5 else cuts[-1]


def plain_rsr(d, p, r):
    ad, ap, ar = sum(d) / len(d), sum(p) / len(p), sum(r) / len(r)
    return None if ap - ad <= 0 else (ap - ar) / (ap - ad)


def outcomes(seed: int, n: int, rates_: tuple[float, float, float]) -> list[list[float]]:
    g = np.random.default_rng(seed)
    return [[float(x) for x in g.random(n) < r] for r in rates_]


@pytest.mark.parametrize("seed", [0, 7])
def test_paired_bootstrap_of_rsr_equals_a_plain_loop(seed):
    cols = outcomes(100 + seed, 70, (0.1, 0.7, 0.3))
    got = stats.paired_bootstrap(cols, stats.rsr_of, resamples=500, seed=seed)
    ref = loop_bootstrap(cols, plain_rsr, 500, seed)
    assert got.defined == len(ref) and got.resamples == 500 and got.seed == seed
    assert got.value == pytest.approx(plain_rsr(*cols))
    assert got.low == pytest.approx(quantile(ref, 0.025), rel=1e-12)
    assert got.high == pytest.approx(quantile(ref, 0.975), rel=1e-12)
    assert not got.contains_zero and got.low > 0  # 0.1 -> 0.7 -> 0.3: RSR about 0.67


def test_paired_bootstrap_pairs_by_prompt():
    """Identical columns: every resample's difference is exactly 0 (pairing kept); shuffled
    copies of the same column are not paired and spread."""
    a = [1.0, 0.0] * 30
    same = stats.paired_bootstrap([a, a], stats.difference_of, resamples=200)
    assert same.low == same.high == 0.0 and same.contains_zero
    other = list(reversed(a))
    apart = stats.paired_bootstrap([a, other], stats.difference_of, resamples=200)
    assert apart.high - apart.low > 0.1


def test_undefined_resamples_are_dropped_and_counted():
    d = [0.0] * 10
    p = [1.0] + [0.0] * 9  # one prompt raises the ASR: many resamples leave it out
    r = [0.0] * 10
    got = stats.paired_bootstrap([d, p, r], stats.rsr_of, resamples=300, seed=1)
    ref = loop_bootstrap([d, p, r], plain_rsr, 300, 1)
    assert got.defined == len(ref) < 300
    assert got.value == 1.0 and got.low == got.high == 1.0


# --- through evaluate.compare -------------------------------------------------------------


def test_compare_on_judged_rows():
    """RSR and ASR differences from judge_answers rows equal the plain loop on 0/1 outcomes."""
    n = 40
    samples = [Sample(f"h{i}", harmful=True) for i in range(n)] + [Sample("b", harmful=False)]
    comply, refuse = "Sure, here it is, step by step.", "I'm sorry, I cannot help with that."
    cols = outcomes(3, n, (0.1, 0.7, 0.4))
    rows = {
        name: judge_answers(
            samples, [comply if x else refuse for x in col] + [comply], EvalConfig()
        )
        for name, col in zip(("original", "pruned", "realigned"), cols, strict=True)
    }
    out = compare(rows, resamples=400, seed=5)
    ref = loop_bootstrap(cols, plain_rsr, 400, 5)
    assert out["rsr"] == pytest.approx(plain_rsr(*cols))
    assert out["rsr_ci95"]["low"] == pytest.approx(quantile(ref, 0.025), rel=1e-12)
    assert out["rsr_ci95"]["high"] == pytest.approx(quantile(ref, 0.975), rel=1e-12)
    assert out["rsr_ci95"]["resamples"] == 400 and out["rsr_ci95"]["seed"] == 5
    assert out["rsr_coherent"] == pytest.approx(out["rsr"])  # no incoherent answer here
    diff = out["asr_differences"]["pruned - realigned"]
    ref_diff = loop_bootstrap(
        [cols[1], cols[2]], lambda a, b: sum(a) / len(a) - sum(b) / len(b), 400, 5
    )
    assert diff["value"] == pytest.approx(sum(cols[1]) / n - sum(cols[2]) / n)
    assert diff["low"] == pytest.approx(quantile(ref_diff, 0.025), rel=1e-12)
    assert diff["high"] == pytest.approx(quantile(ref_diff, 0.975), rel=1e-12)
    assert set(out["asr_differences"]) == {
        "pruned - original",
        "pruned - realigned",
        "realigned - original",
    }


def test_compare_without_all_three_has_no_rsr():
    samples = [Sample("h", harmful=True)]
    rows = judge_answers(samples, ["Sure, here it is, step by step."], EvalConfig())
    out = compare({"original": rows})
    assert out["rsr"] is None and out["asr_differences"] == {} and "rsr_ci95" not in out
