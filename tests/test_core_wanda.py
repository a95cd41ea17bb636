"""Wanda statistics and masks against slow, obvious references."""

from __future__ import annotations

import oracles
import pytest
import torch

from hsr_core.config import ConfigError, WandaConfig
from hsr_core.data import builtin_calibration
from hsr_core.encoding import encode_one
from hsr_core.masks import PackedMask, sparsity_report
from hsr_core.wanda import (
    kth_smallest,
    mask_count,
    mask_from_scores,
    prune_masks,
    sequential_masks,
    wanda_norms,
    wanda_score,
)


def samples(n: int = 6):
    calib = builtin_calibration()
    return calib.utility[:n]


def naive_norms(loaded, data, tokens: str = "response") -> dict[str, torch.Tensor]:
    """``oracles.naive_norms`` in float32, as ``wanda_norms`` gives them."""
    return {n: v.float() for n, v in oracles.naive_norms(loaded, data, tokens).items()}


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_norms_equal_naive(any_tiny, tokens):
    loaded = any_tiny
    data = samples(5)
    if loaded.is_vision:
        from hsr_core.data import with_typographic_images

        data = with_typographic_images(data)
    fast = wanda_norms(loaded, data, WandaConfig(tokens=tokens, batch_size=3))
    slow = naive_norms(loaded, data, tokens)
    assert fast.keys() == slow.keys() and len(fast) == 7 * loaded.adapter.num_layers
    for name in fast:
        assert torch.allclose(fast[name], slow[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("tokens", ["response", "all"])
def test_both_statistic_paths_equal_naive(tiny_llama, tokens, weighted, fused, monkeypatch):
    """Gathering the selected rows (default) and the 0/1-weighted sum over all tokens; squares
    summed as on the CPU or by ``vector_norm`` (the GPU's way).

    With ``all``, the rows are gathered only where a batch has padding."""
    from hsr_core import wanda

    hooked = []
    original = wanda._NormCollector.set_batch

    def spy(self, select, *rest):
        out = original(self, select, *rest)
        hooked.append((self._rows, self._weights, bool(select.all())))
        return out

    monkeypatch.setattr(wanda._NormCollector, "weighted_sum", weighted)
    monkeypatch.setattr(wanda._NormCollector, "fused_norm", fused)
    monkeypatch.setattr(wanda._NormCollector, "set_batch", spy)
    data = samples(5)
    fast = wanda_norms(tiny_llama, data, WandaConfig(tokens=tokens, batch_size=3))
    slow = naive_norms(tiny_llama, data, tokens)
    assert hooked
    for rows, weights, everything in hooked:  # the path asked for ran
        assert (weights is not None) == weighted
        # rows are gathered unless weighted, or every token of the batch is selected
        assert (rows is not None) == (not weighted and not everything)
    if not weighted:  # response tokens are a part of each batch; every "all" batch here pads
        assert any(rows is not None for rows, _, _ in hooked)
    if tokens == "all" and not weighted:  # one sample a batch: no padding, nothing gathered
        hooked.clear()
        wanda_norms(tiny_llama, data[:2], WandaConfig(tokens="all", batch_size=1))
        assert len(hooked) == 2 and all(rows is None for rows, _, _ in hooked)
    for name in fast:
        assert torch.allclose(fast[name], slow[name], rtol=1e-4, atol=1e-5), name


def test_response_tokens_only_differs_from_all(tiny_llama):
    data = samples(4)
    resp = wanda_norms(tiny_llama, data, WandaConfig(tokens="response"))
    every = wanda_norms(tiny_llama, data, WandaConfig(tokens="all"))
    name = tiny_llama.adapter.linear_name(0, "q_proj")
    assert (every[name] > resp[name]).all()


def test_response_mask_marks_the_answer(tiny_llama):
    s = samples(1)[0]
    inputs, plen, rlen = encode_one(tiny_llama, s)
    answer = tiny_llama.tokenizer.decode(
        inputs["input_ids"][0, plen : plen + rlen], skip_special_tokens=True
    )
    assert answer.strip() == s.response.strip()
    prompt = tiny_llama.tokenizer.decode(inputs["input_ids"][0, :plen])
    assert s.prompt in prompt and prompt.rstrip().endswith("assistant")


def slow_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    out_f, in_f = score.shape
    k = int(in_f * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for i in range(out_f):
        row = score[i].tolist()
        for j in sorted(range(in_f), key=lambda j: (row[j], j))[:k]:
            mask[i, j] = True
    return mask


def slow_nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros_like(score, dtype=torch.bool)
    for i in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            group = [(score[i, g + j].item(), g + j) for j in range(m)]
            for _, j in sorted(group)[:n]:
                mask[i, j] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unstructured_mask_equals_per_row_sort(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(13, 24, generator=g)
    w[0, :6] = 0.5  # ties: the earlier input is pruned first
    norm = torch.rand(24, generator=g) + 0.1
    score = wanda_score(w, norm)
    for s in (0.0, 0.3, 0.5, 0.77):
        assert torch.equal(
            mask_from_scores(score, WandaConfig(sparsity=s)), slow_row_mask(score, s)
        )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_selection_with_many_ties_equals_per_row_sort(seed):
    """Scores drawn from a few values: most of each row ties with the threshold."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (11, 37), generator=g).float()
    score[3] = 2.0  # a row of one value
    for s in (0.1, 0.5, 0.73, 0.99):
        cfg = WandaConfig(sparsity=s)
        mask = mask_from_scores(score, cfg)
        assert torch.equal(mask, slow_row_mask(score, s))
        assert int(mask.sum()) == mask_count(score.shape, cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gpu_threshold_way_equals_kthvalue(seed):
    """The GPU way (largest of topk's k smallest) gives kthvalue's value, ties included."""
    g = torch.Generator().manual_seed(seed)
    for score in (
        torch.rand(17, 50, generator=g),
        torch.randint(0, 5, (9, 40), generator=g).float(),
    ):
        n = score.shape[1]
        for k in (1, 7, 25, n - 1, n):
            assert torch.equal(
                kth_smallest(score, k, use_topk=True), kth_smallest(score, k, use_topk=False)
            )
            assert torch.equal(
                kth_smallest(score, k, use_topk=False),
                score.sort(dim=1).values[:, k - 1 : k],
            )


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_with_a_few_tied_rows_equals_per_row_sort(seed):
    """Continuous scores with ties planted at the threshold in some rows only: the rows that
    need the tie-break are fixed, the others left as the comparison made them."""
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(40, 64, generator=g)
    k = 32
    for row in (0, 7, 39):
        thr = score[row].kthvalue(k).values
        cols = torch.randperm(64, generator=g)[:5]
        score[row, cols] = thr  # several entries equal to the k-th lowest value
    cfg = WandaConfig(sparsity=k / 64)
    mask = mask_from_scores(score, cfg)
    assert torch.equal(mask, slow_row_mask(score, k / 64))
    assert int(mask.sum()) == mask_count(score.shape, cfg) == 40 * k


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_equals_brute_force(nm):
    n, m = nm
    g = torch.Generator().manual_seed(n * 10 + m)
    score = torch.rand(9, 32, generator=g)
    cfg = WandaConfig(structure="n:m", n=n, m=m)
    mask = mask_from_scores(score, cfg)
    assert torch.equal(mask, slow_nm_mask(score, n, m))
    assert int(mask.sum()) == mask_count(score.shape, cfg)
    assert (mask.view(9, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wanda_score_equals_float32_product(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(17, 33, generator=g) * 0.02).to(dtype)
    norm = torch.rand(33, generator=g) * 5
    score = wanda_score(w, norm)
    assert score.dtype == torch.float32
    assert torch.equal(score, w.abs().float() * norm[None, :])


def test_packed_mask_roundtrip():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (3, 5), (7, 13), (64, 64)]:
        m = torch.rand(shape, generator=g) > 0.5
        p = PackedMask.pack(m)
        assert torch.equal(p.unpack(), m) and p.count == int(m.sum())
        assert torch.equal(p.unpack_keep(), ~m)
        assert p.bits.numel() == -(-m.numel() // 8)


def test_prune_masks_on_model(tiny_llama):
    norms = wanda_norms(tiny_llama, samples(4), WandaConfig())
    masks = prune_masks(tiny_llama, norms, WandaConfig(sparsity=0.5))
    for name, _, _, mod in tiny_llama.adapter.iter_linears():
        expected = slow_row_mask(wanda_score(mod.weight, norms[name]), 0.5)
        assert torch.equal(masks[name].unpack(), expected), name
        assert masks[name].count == int(expected.sum()), name
    rep = sparsity_report(tiny_llama, masks)
    assert rep["sparsity"] == 0.5 and set(rep["per_layer"]) == {0, 1}
    assert set(rep["per_module"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def naive_sequential(loaded, data, cfg):
    """Wanda's sequential mode the slow way: full forward passes, pruning one layer at a time."""
    a = loaded.adapter

    def layer_masks(layer: int) -> dict:
        norms = naive_norms(loaded, data, cfg.tokens)
        return {
            name: mask_from_scores(wanda_score(mod.weight, norms[name]), cfg)
            for name, l, _, mod in a.iter_linears()
            if l == layer
        }

    return oracles.pruned_layer_by_layer(loaded, layer_masks)


def test_sequential_equals_naive_and_differs_from_one_shot(tiny_mha):
    data = samples(4)
    cfg = WandaConfig(sparsity=0.5, mode="sequential", batch_size=2)
    before = {n: m.weight.detach().clone() for n, _, _, m in tiny_mha.adapter.iter_linears()}
    seq = sequential_masks(tiny_mha, data, cfg)
    for n, _, _, m in tiny_mha.adapter.iter_linears():  # weights untouched afterwards
        assert torch.equal(m.weight, before[n])
    slow = naive_sequential(tiny_mha, data, cfg)
    for name in slow:
        assert torch.equal(seq[name].unpack(), slow[name]), name
    one_shot = prune_masks(tiny_mha, wanda_norms(tiny_mha, data, cfg), cfg)
    a = tiny_mha.adapter
    # layer 0 sees the same dense inputs either way; layer 1 sees a pruned layer 0 in sequential mode
    for proj in ("q_proj", "down_proj"):
        assert torch.equal(
            seq[a.linear_name(0, proj)].unpack(), one_shot[a.linear_name(0, proj)].unpack()
        )
    assert any(
        not torch.equal(seq[a.linear_name(1, p)].unpack(), one_shot[a.linear_name(1, p)].unpack())
        for p in ("q_proj", "o_proj", "gate_proj", "down_proj")
    )


def test_bad_wanda_configs():
    with pytest.raises(ConfigError, match="fraction"):
        WandaConfig(sparsity=1.5)
    with pytest.raises(ConfigError, match="fraction"):
        WandaConfig(sparsity=50)
    with pytest.raises(ConfigError, match="N:M"):
        WandaConfig(structure="n:m", n=4, m=4)
    with pytest.raises(ValueError, match="divisible"):
        mask_from_scores(torch.rand(2, 6), WandaConfig(structure="n:m", n=2, m=4))


def test_non_finite_statistics_and_scores_are_clear_errors(tiny_llama):
    norms = wanda_norms(tiny_llama, samples(2), WandaConfig())
    name = next(iter(norms))
    broken = {**norms, name: norms[name].clone()}
    broken[name][3] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        prune_masks(tiny_llama, broken, WandaConfig(sparsity=0.5))
    score = torch.rand(4, 10)
    score[1, :8] = float("nan")  # more NaN than the k kept: the row cannot be pruned exactly
    with pytest.raises(ValueError, match="not finite"):
        mask_from_scores(score, WandaConfig(sparsity=0.5))


def test_statistics_read_unpadded_batches_as_they_are():
    """Every token selected: no gather, the activations are read in place."""
    from hsr_core.wanda import _NormCollector

    col = _NormCollector({})
    assert col.set_batch(torch.ones(2, 5, dtype=torch.bool)) and col._rows is None
    assert not col.set_batch(torch.zeros(2, 5, dtype=torch.bool))
    sel = torch.tensor([[False, True, True], [True, False, False]])
    assert col.set_batch(sel) and col._rows.tolist() == [1, 2, 3]


def test_statistics_leave_the_activations_alone():
    """With every token selected the hook reads the layer's input itself: never squared in place."""
    from hsr_core.wanda import _NormCollector

    lin = torch.nn.Linear(6, 3)
    col = _NormCollector({"l": lin})
    col.set_batch(torch.ones(2, 4, dtype=torch.bool))
    x = torch.randn(2, 4, 6)
    before = x.clone()
    col.hook("l")(lin, (x,))
    assert torch.equal(x, before)
    assert torch.allclose(col.sums["l"], before.reshape(-1, 6).square().sum(0))
