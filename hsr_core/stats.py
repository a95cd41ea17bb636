"""Confidence intervals for the evaluation's numbers (docs/METHOD.md, "Evaluation").

- **Wilson score interval** (Wilson 1927) for a rate ``k / n``: the set of true rates ``p0``
  that the binomial score test does not reject, ``|k/n - p0| <= z * sqrt(p0 (1 - p0) / n)``.
  Solving that quadratic in ``p0`` gives

      centre = (p + z^2 / 2n) / (1 + z^2 / n)
      half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

  with ``p = k / n`` and ``z = 1.95996...`` for 95%. Unlike the normal (Wald) interval it
  stays inside [0, 1] and is not empty at ``k = 0`` or ``k = n`` (Brown, Cai & DasGupta 2001).
- **Paired bootstrap** (Efron & Tibshirani 1993) of a statistic of several variants' answers to
  the same prompts (RSR, a difference of two ASRs): ``resamples`` times, draw ``n`` prompt
  indices with replacement (``numpy.random.default_rng(seed).integers(0, n, n)``, one draw per
  resample), take *the same* prompts for every variant, and compute the statistic; the
  interval is the 2.5th and 97.5th percentiles (linear interpolation between order statistics)
  of the resamples where the statistic is defined (RSR is undefined when a resample's pruned
  ASR does not exceed its dense ASR; how many were defined is reported).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

LEVEL = 0.95
Z95 = NormalDist().inv_cdf(0.5 + LEVEL / 2)  # 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the rate ``k / n``; ``(nan, nan)`` when ``n == 0``."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends (the
    high = 1.0 if k == n else min(1.0, centre + half)  # formula's rounding gives 1e-18)
    return low, high


@dataclass(frozen=True)
class Rate:
    """A rate with its Wilson 95% interval.

    Attributes:
        k: how many of the ``n`` counted.
        n: how many there were.
        value: ``k / n`` (NaN when ``n == 0``).
        low, high: the Wilson interval (NaN when ``n == 0``).
    """

    k: int
    n: int
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rate(k: int, n: int, z: float = Z95) -> Rate:
    """``k / n`` with its Wilson interval."""
    low, high = wilson(k, n, z)
    return Rate(k, n, k / n if n else math.nan, low, high)


def overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two intervals ``(low, high)`` overlap (NaN bounds count as overlapping)."""
    if any(not math.isfinite(x) for x in (*a, *b)):
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of sorted values, interpolated linearly between order
    statistics (numpy's default, Hyndman & Fan type 7)."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


@dataclass(frozen=True)
class Bootstrap:
    """A paired bootstrap percentile interval.

    Attributes:
        value: the statistic on the prompts as they are (None when undefined).
        low, high: the interval (None when no resample was defined).
        level: its coverage (0.95).
        resamples: how many resamples were drawn.
        defined: in how many of them the statistic was defined.
        seed: the generator's seed.
        paired_by: what a resampled unit is (``prompt``: every variant's answer to it).
    """

    value: float | None
    low: float | None
    high: float | None
    level: float
    resamples: int
    defined: int
    seed: int
    paired_by: str = "prompt"

    @property
    def contains_zero(self) -> bool:
        """Whether 0 is inside the interval: the difference is within the noise."""
        return self.low is None or self.high is None or self.low <= 0.0 <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "contains_zero": self.contains_zero}


def paired_bootstrap(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., float | None],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> Bootstrap:
    """Percentile interval of ``statistic(*columns)`` over prompts resampled with replacement.

    Args:
        columns: per-prompt values, one sequence per variant (or per quantity), all of the
            same length ``n``, in the same prompt order: resampling keeps the rows together.
        statistic: takes the resampled columns (float arrays ``[n]``) and returns a number, or
            None where it is undefined.
        resamples: how many resamples.
        seed: seed of ``numpy.random.default_rng``; resample ``b`` draws
            ``rng.integers(0, n, n)`` after the ``b`` draws before it.
        level: the interval's coverage.
    """
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(cols[0]) if cols else 0
    if any(len(c) != n for c in cols):
        raise ValueError("paired bootstrap: every column needs one value per prompt")
    value = statistic(*cols) if n else None
    rng = np.random.default_rng(seed)
    stats: list[float] = []
    for _ in range(resamples if n else 0):
        idx = rng.integers(0, n, n)
        s = statistic(*(c[idx] for c in cols))
        if s is not None and math.isfinite(s):
            stats.append(float(s))
    stats.sort()
    tail = (1 - level) / 2
    low = percentile(stats, tail) if stats else None
    high = percentile(stats, 1 - tail) if stats else None
    return Bootstrap(
        None if value is None else float(value),
        low,
        high,
        level,
        resamples if n else 0,
        len(stats),
        seed,
    )


def rsr_of(success_dense: np.ndarray, success_pruned: np.ndarray, success_hsr: np.ndarray):
    """RSR of per-prompt attack successes (1/0): ``(ASR_p - ASR_hsr) / (ASR_p - ASR_dense)``,
    None when pruning did not raise the ASR."""
    d, p, r = success_dense.mean(), success_pruned.mean(), success_hsr.mean()
    gap = p - d
    return None if gap <= 0 else float((p - r) / gap)


def difference_of(a: np.ndarray, b: np.ndarray) -> float:
    """``mean(a) - mean(b)``: the difference of two rates over the same prompts."""
    return float(a.mean() - b.mean())
