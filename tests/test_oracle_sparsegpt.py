"""hsr_core/sparsegpt.py's argument rules, counts and tie-breaking against values worked out by
hand (issue 18, mutation testing). Model-free and fast: the mutation run's tests beside
tests/test_core_sparsegpt.py, whose slow optimal-brain-surgeon loop checks the numbers.

With an identity Hessian every column's ``U_ii`` is the same and ``U`` is diagonal, so the
weights are never updated across columns and a matrix of ones is one big tie: the mask is then
the first ``k`` entries in row-major order of each block (unstructured) or the first ``n`` of
each group (N:M), as the docstrings promise.
"""

from __future__ import annotations

import pytest
import torch

from hsr_core.sparsegpt import HessianError, sparsegpt_count, sparsegpt_linear


def ties(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight of ones and an identity Hessian: every score equal."""
    return torch.ones(rows, cols), torch.eye(cols)


def test_unstructured_ties_go_to_the_earlier_entries_of_each_block():
    """1,024 tied entries a block (a sort that is not stable reorders ties from about 100)."""
    W, H = ties(16, 128)
    _, mask = sparsegpt_linear(W, H, sparsity=0.5, blocksize=64)
    expected = torch.zeros(16, 128, dtype=torch.bool)
    expected[:8, :] = True  # each block of 64 columns: the first 512 of 1,024, rows 0-7
    assert torch.equal(mask, expected)


def test_n_m_ties_go_to_the_earlier_inputs_of_each_group():
    """64 of every 128 inputs of each row: the first 64 (128 ties a row)."""
    W, H = ties(4, 256)
    _, mask = sparsegpt_linear(W, H, sparsity=0.0, n=64, m=128, blocksize=128)
    group = torch.tensor([True] * 64 + [False] * 64)
    assert torch.equal(mask, group.repeat(2).expand(4, 256))


def test_one_entry_is_pruned_when_one_is_asked_for():
    W, H = ties(1, 4)
    W[0, 2] = 0.5  # the lowest score
    w, mask = sparsegpt_linear(W, H, sparsity=0.25, blocksize=4)  # int(4 * 0.25) = 1
    assert mask.tolist() == [[False, False, True, False]]
    assert w[0, 2] == 0 and w[0, [0, 1, 3]].tolist() == [1.0, 1.0, 1.0]


def test_blocksize_one_is_a_block_of_one_column():
    """Each column its own block: ``int(rows * 1 * sparsity)`` of its rows, the lowest."""
    W = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [4.0, 0.5]])
    _, mask = sparsegpt_linear(W, torch.eye(2), sparsity=0.5, blocksize=1)
    assert mask.tolist() == [[False, True], [True, False], [True, False], [False, True]]
    with pytest.raises(ValueError, match=r"^blocksize must be >= 1, got 0$"):
        sparsegpt_linear(W, torch.eye(2), sparsity=0.5, blocksize=0)


@pytest.mark.parametrize(("n", "m"), [(0, 4), (2, 0)])
def test_a_pattern_with_a_zero_is_unstructured(n, m):
    """N:M needs both > 0; with either 0 the sparsity is read, as with neither given."""
    W, H = ties(4, 8)
    _, mask = sparsegpt_linear(W, H, sparsity=0.5, n=n, m=m, blocksize=8)
    _, plain = sparsegpt_linear(W, H, sparsity=0.5, blocksize=8)
    assert torch.equal(mask, plain) and int(mask.sum()) == 16
    assert sparsegpt_count((4, 8), sparsity=0.5, n=n, m=m, blocksize=8) == 16


@pytest.mark.parametrize(("n", "m"), [(1, 1), (4, 4), (5, 4)])
def test_n_must_be_below_m(n, m):
    W, H = ties(2, 8)
    with pytest.raises(ValueError, match=rf"^N:M pattern needs 1 <= N < M, got {n}:{m}$"):
        sparsegpt_linear(W, H, sparsity=0.0, n=n, m=m, blocksize=8)


def test_counts_by_hand():
    """Unstructured: ``int(rows * block * sparsity)`` per block of 128 columns (the default);
    N:M: n of every m inputs of each row. Whole numbers."""
    # 300 columns: blocks of 128, 128, 44 -> int(38.4) * 2 + int(13.2) = 89 (129: 88)
    assert sparsegpt_count((1, 300), sparsity=0.3) == 89
    count = sparsegpt_count((3, 12), sparsity=0.0, n=1, m=4, blocksize=4)
    assert count == 9 and type(count) is int
    assert type(sparsegpt_count((3, 300), sparsity=0.3)) is int
    W, H = torch.randn(1, 300), torch.eye(300)
    assert int(sparsegpt_linear(W, H, sparsity=0.3)[1].sum()) == 89


def test_a_hessian_that_is_not_positive_definite_is_explained():
    with pytest.raises(HessianError) as info:
        sparsegpt_linear(torch.ones(2, 3), -torch.eye(3), sparsity=0.5)
    assert str(info.value) == (
        "the damped Hessian is not positive definite (Cholesky failed); use more calibration "
        "samples (or tokens='all') or a larger percdamp"
    )


def test_masks_are_made_on_the_scores_device():
    """On the ``meta`` device (no data; every operation checks devices)."""
    from hsr_core.sparsegpt import _lowest_flat

    score = torch.empty(3, 4, device="meta")
    assert _lowest_flat(score, 5).device.type == "meta"


def test_bad_arguments_say_what_is_wrong():
    W, H = ties(2, 4)
    with pytest.raises(ValueError) as info:
        sparsegpt_linear(torch.ones(4), H, sparsity=0.5)
    assert str(info.value) == (
        "SparseGPT prunes a [out, in] matrix, got a weight of torch.Size([4])"
    )
    with pytest.raises(ValueError) as info:
        sparsegpt_linear(W, H, sparsity=0.5, percdamp=-0.1)
    assert str(info.value) == "percdamp must be >= 0, got -0.1"
    bad = H.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError) as info:
        sparsegpt_linear(W, bad, sparsity=0.5)
    assert str(info.value) == (
        "the Hessian is not finite (inf or NaN): the calibration activations overflowed; "
        "load the model in bfloat16 or float32"
    )


def test_the_math_runs_in_the_wider_of_the_two_dtypes():
    """float64 in either input means float64 math: the result equals the all-float64 one (cast
    to the weight's dtype), not the float32 one."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(64, 16, generator=g, dtype=torch.float64)
    H64 = 2 / 64 * X.T @ X
    W64 = torch.randn(6, 16, generator=g, dtype=torch.float64)
    want, want_mask = sparsegpt_linear(W64, H64, sparsity=0.5, blocksize=8)
    f32, _ = sparsegpt_linear(W64.float(), H64.float(), sparsity=0.5, blocksize=8)
    assert not torch.equal(f32.double(), want)  # the test can tell the two apart
    got, mask = sparsegpt_linear(W64, H64.float(), sparsity=0.5, blocksize=8)
    assert got.dtype == torch.float64 and torch.equal(mask, want_mask)
    assert torch.equal(
        got, sparsegpt_linear(W64, H64.float().double(), sparsity=0.5, blocksize=8)[0]
    )
    got, _ = sparsegpt_linear(W64.float(), H64, sparsity=0.5, blocksize=8)
    assert got.dtype == torch.float32
    assert torch.equal(
        got, sparsegpt_linear(W64.float().double(), H64, sparsity=0.5, blocksize=8)[0].float()
    )
