"""``hsr_core.heads``: the one ranking of Ships scores against a plain sort, and head labels.

Written after mutation testing (docs/MUTATION.md): NaN ranked as 0 instead of last survived
the other tests, whose scores are all positive.
"""

from __future__ import annotations

import math

import pytest
import torch

from hsr_core.heads import Head, all_heads, top_heads


def oracle(values: list[list[float]], k: int | None) -> list[tuple[int, int]]:
    """Highest first; NaN below every number; ties by layer, then head."""
    cells = [(l, h) for l in range(len(values)) for h in range(len(values[0]))]

    def key(cell):
        v = values[cell[0]][cell[1]]
        return (1, 0.0, cell) if math.isnan(v) else (0, -v, cell)

    ranked = sorted(cells, key=key)
    return ranked if k is None else ranked[:k]


@pytest.mark.parametrize("seed", range(6))
def test_top_heads_equals_a_sort(seed):
    g = torch.Generator().manual_seed(seed)
    L, H = 3, 5
    # negative, zero, tied and NaN scores (a KL or a screening estimate can be 0 or less)
    scores = torch.randint(-3, 4, (L, H), generator=g).float() / 2
    scores[torch.rand(L, H, generator=g) < 0.2] = math.nan
    values = scores.tolist()
    for k in (None, 0, 1, 4, L * H):
        got = top_heads(scores, k)
        assert got == oracle(values, k), (k, values)
        assert all(isinstance(h, Head) for h in got)
    assert top_heads(values) == oracle(values, None)  # a nested list works as well


def test_nan_ranks_below_zero_and_negative_scores():
    scores = [[math.nan, -1.0], [0.0, 2.0]]
    assert top_heads(scores) == [(1, 1), (1, 0), (0, 1), (0, 0)]
    assert top_heads(scores, 2) == [(1, 1), (1, 0)]


def test_labels_round_trip_and_bad_labels_are_explained():
    heads = all_heads(3, 4)
    assert heads[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)] and len(heads) == 12
    for h in heads:
        assert Head.parse(h.label, 3, 4) == h and h.label == f"{h.layer}-{h.head}"
    assert Head.parse(" 12-7 ") == (12, 7)  # no geometry: any non-negative head
    with pytest.raises(ValueError, match="write it as layer-head"):
        Head.parse("3.1")
    with pytest.raises(ValueError, match="write it as layer-head"):
        Head.parse("1-2-3")
    for bad in ("-1-2", "1--2"):  # a minus sign splits into three parts: not a head either
        with pytest.raises(ValueError, match="write it as layer-head"):
            Head.parse(bad)
    with pytest.raises(ValueError, match="outside the model's 3 layers x 4 heads"):
        Head.parse("3-0", 3, 4)
    with pytest.raises(ValueError, match="outside"):
        Head.parse("0-4", 3, 4)
    assert Head.parse("2-3", 3, 4) == (2, 3)
    assert Head.parse("2-3", 3) == (2, 3)  # half a geometry is not checked
