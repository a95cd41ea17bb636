"""Slow, obvious reimplementations that several test files check the core against."""

from __future__ import annotations

import math

from hsr_core import stats


def scan_wilson(k: int, n: int, z: float = stats.Z95, step: float = 1e-5) -> tuple[float, float]:
    """The Wilson interval as the score test's acceptance region, scanned: every ``p0`` on a
    grid of ``step`` with ``|k/n - p0| <= z * sqrt(p0 (1 - p0) / n)``; its lowest and highest."""
    p = k / n
    accepted = [
        i * step
        for i in range(int(1 / step) + 1)
        if abs(p - i * step) <= z * math.sqrt(i * step * (1 - i * step) / n)
    ]
    return min(accepted), max(accepted)
