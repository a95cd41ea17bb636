"""HSR restore sets against an independent, slow oracle (issue 18).

Everything expected here is computed in this file from the dense weights, the norm vectors and
the unpacked masks: head ranking by a Python sort, whole-matrix ranks by a full Python sort
(ties to the lower flat index), head slices as explicit sets of ``(row, col)`` cells, and the
accounting by set algebra. Nothing returned by ``restore_set`` is handed to the reference.

The model is the GQA tiny Llama (2 layers, 4 query heads, 2 KV heads, head_dim 16), so heads
0/1 and 2/3 of a layer share their ``k_proj``/``v_proj`` rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from hsr_core.config import RealignConfig, WandaConfig
from hsr_core.realign import RankCache, candidates, head_slice, restore_set
from hsr_core.wanda import prune_masks

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
NAN = math.nan


# --- helpers: inputs --------------------------------------------------------------------------


def synthetic_norms(loaded, seed: int) -> dict[str, torch.Tensor]:
    """A positive float32 norm vector per decoder linear (stand-in for ``wanda_norms``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, _, _, mod in loaded.adapter.iter_linears():
        out[name] = torch.rand(mod.weight.shape[1], generator=g) + 0.05
    return out


def plant_ties(loaded, safety, utility) -> None:
    """Equal scores in layer 0's q_proj and k_proj, so the rank tie-break matters."""
    a = loaded.adapter
    with torch.no_grad():
        for proj in ("q_proj", "k_proj"):
            name = a.linear_name(0, proj)
            w = loaded.model.get_submodule(name).weight
            median = float(w.abs().median())
            w[1, 0:8] = median
            w[3, 0:8] = -median
            w[17, 0:8] = median
            safety[name][0:8] = 0.5
            utility[name][0:8] = 0.5


def make_inputs(loaded, *, ties: bool = True):
    safety = synthetic_norms(loaded, 11)
    utility = synthetic_norms(loaded, 12)
    if ties:
        plant_ties(loaded, safety, utility)
    masks = prune_masks(loaded, utility, WandaConfig(sparsity=0.5))
    dense = {n: m.weight.detach().clone() for n, _, _, m in loaded.adapter.iter_linears()}
    pruned = {n: masks[n].unpack() for n in dense}
    return safety, utility, masks, dense, pruned


# --- helpers: the oracle ----------------------------------------------------------------------


def oracle_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """Highest score first; NaN ranks below every number; ties: lower (layer, head) first."""
    L, H = scores.shape
    vals = scores.tolist()
    cells = [(l, h) for l in range(L) for h in range(H)]

    def key(cell):
        v = vals[cell[0]][cell[1]]
        return (1, 0.0, cell) if math.isnan(v) else (0, -v, cell)

    return sorted(cells, key=key)[:k]


def full_sort_top(score: torch.Tensor, fraction: float) -> set[int]:
    """Flat indices of the top ``floor(fraction * numel)`` entries, ties to the lower index."""
    flat = score.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return set(order[: math.floor(fraction * len(flat))])


def oracle_cells(proj: str, head: int, shape, d_h: int, group: int, slicing: str) -> set[int]:
    """Flat indices of a head's block: q rows, KV-group rows for k/v, o columns."""
    out_f, in_f = shape
    unit = head if proj in ("q_proj", "o_proj") else head // group
    block = range(unit * d_h, (unit + 1) * d_h)
    if slicing == "head":
        if proj == "o_proj":
            return {i * in_f + j for i in range(out_f) for j in block}
        return {i * in_f + j for i in block for j in range(in_f)}
    if proj == "o_proj":  # reference slicing: all of R
        return set(range(out_f * in_f))
    return {i * in_f + j for i in range(out_f) for j in block}


def oracle_restore(loaded, dense, pruned, safety, utility, heads, p, q, max_p, slicing="head"):
    a = loaded.adapter
    d_h = a.hidden_size // a.num_heads
    group = a.num_heads // a.num_kv_heads
    indices: dict[str, list[int]] = {}
    per_head = {(l, h): dict.fromkeys(PROJS, 0) for l, h in heads}
    per_module = dict.fromkeys(PROJS, 0)
    n_cand = 0
    for layer in sorted({l for l, _ in heads}):
        for proj in PROJS:
            name = a.linear_name(layer, proj)
            w = dense[name]
            S = w.abs().float() * safety[name][None, :]
            U = w.abs().float() * utility[name][None, :]
            R = (full_sort_top(S, q) & full_sort_top(U, max_p)) - full_sort_top(U, p)
            is_pruned = set(torch.nonzero(pruned[name].reshape(-1)).flatten().tolist())
            union: set[int] = set()
            for l, h in heads:
                if l != layer:
                    continue
                cells = oracle_cells(proj, h, tuple(w.shape), d_h, group, slicing)
                union |= cells
                per_head[(l, h)][proj] = len(R & cells & is_pruned)
            n_cand += len(R & union)
            got = R & union & is_pruned
            per_module[proj] += len(got)
            if got:
                indices[name] = sorted(got)
    return {
        "indices": indices,
        "per_head": per_head,
        "per_module": per_module,
        "count": sum(len(v) for v in indices.values()),
        "candidates": n_cand,
        "pruned_total": sum(int(m.sum()) for m in pruned.values()),
    }


def head_key(key) -> tuple[int, int]:
    """A per-head key as ``(layer, head)``, whether written ``"l-h"`` or as a (named) tuple."""
    if isinstance(key, str):
        l, h = key.split("-")
        return int(l), int(h)
    return int(key[0]), int(key[1])


def assert_matches(rs, expected, heads):
    assert [head_key(h) for h in rs.heads] == heads
    got = {n: v.tolist() for n, v in rs.indices.items()}
    assert {n: sorted(v) for n, v in got.items()} == expected["indices"]
    for v in got.values():
        assert len(set(v)) == len(v)  # each weight once
    per_head = {head_key(k): dict(v) for k, v in rs.per_head.items()}
    assert len(per_head) == len(rs.per_head) == len(heads)
    assert per_head == expected["per_head"]
    assert rs.per_module == expected["per_module"]
    assert rs.count == expected["count"]
    assert rs.candidates == expected["candidates"]
    assert rs.pruned_total == expected["pruned_total"]


# --- the oracle itself must see what the cases are about ----------------------------------------


def test_oracle_head_ranking_rule():
    """Pins the rule the restore tests rely on (NaN last, ties by position)."""
    s = torch.tensor([[NAN, 2.0, 1.0], [2.0, NAN, 3.0]])
    assert oracle_heads(s, 6) == [(1, 2), (0, 1), (1, 0), (0, 2), (0, 0), (1, 1)]


# --- restore_set ------------------------------------------------------------------------------

SCORE_CASES = {
    # distinct: the top 3 are (0,0), (0,1) (same KV group) and (1,2); the bottom 3 differ
    "distinct": ([[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]], 3, [(0, 0), (0, 1), (1, 2)]),
    # NaN on what would be the best head: it must never be selected
    "nan": ([[NAN, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]], 3, [(0, 1), (1, 2), (1, 1)]),
    # ties: (0,1) and (1,0) tie at the top, (0,0) wins the tie at 0.5 over (0,2), (1,1), (1,3)
    "ties": ([[0.5, 0.9, 0.5, 0.2], [0.9, 0.5, 0.1, 0.5]], 3, [(0, 1), (1, 0), (0, 0)]),
    # NaN with every head selected: NaN comes last in ``heads``
    "nan_all": (
        [[0.4, NAN, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]],
        8,
        [(1, 2), (1, 1), (0, 0), (0, 3), (1, 0), (0, 2), (1, 3), (0, 1)],
    ),
}


@pytest.mark.parametrize("pqm", [(0.1, 0.6, 0.9), (0.3, 0.9, 1.0)])
@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_restore_set_equals_oracle(tiny_llama, case, pqm):
    """Catches: realigning the lowest-scoring heads (``top_heads(-scores)``), NaN scores ranked
    first, ties broken the wrong way, per-head counts wrong for heads sharing a KV group (each
    must get the whole shared block's count), a wrong ``candidates`` total (it counts R in
    the union of the selected heads' slices, pruned or not, each weight once), wrong KV-group
    rows, wrong rank thresholds, and restored weights outside R, the slices or the mask."""
    loaded = tiny_llama
    a = loaded.adapter
    assert (a.num_layers, a.num_heads, a.num_kv_heads) == (2, 4, 2)
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    values, top_h, want_heads = SCORE_CASES[case]
    scores = torch.tensor(values)
    p, q, max_p = pqm
    heads = oracle_heads(scores, top_h)
    assert heads == want_heads  # the oracle's ranking, checked by hand
    cfg = RealignConfig(p=p, q=q, max_p=max_p, top_h=top_h)
    rs = restore_set(loaded, masks, scores, cfg, RankCache(loaded, safety, utility))
    expected = oracle_restore(loaded, dense, pruned, safety, utility, heads, p, q, max_p)
    assert expected["count"] > 0
    # the set must leave unpruned candidates out, so candidates != count
    assert expected["candidates"] > expected["count"]
    assert_matches(rs, expected, heads)


def test_restore_set_shared_kv_block_counts_for_both_heads(tiny_llama):
    """Catches per-head accounting that gives a shared k/v block to only one of the heads of
    its KV group, splits it between them, or counts it twice in the totals."""
    loaded = tiny_llama
    a = loaded.adapter
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]])
    cfg = RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=2)
    rs = restore_set(loaded, masks, scores, cfg, RankCache(loaded, safety, utility))
    assert [head_key(h) for h in rs.heads] == [(0, 0), (0, 1)]
    expected = oracle_restore(
        loaded, dense, pruned, safety, utility, [(0, 0), (0, 1)], 0.1, 0.6, 0.9
    )
    for proj in ("k_proj", "v_proj"):
        shared = expected["per_head"][(0, 0)][proj]
        assert shared > 0 and expected["per_head"][(0, 1)][proj] == shared
        assert expected["per_module"][proj] == shared  # once in the totals
    assert_matches(rs, expected, [(0, 0), (0, 1)])
    # the k/v indices are exactly the group-0 rows' restored weights
    k_name = a.linear_name(0, "k_proj")
    in_f = dense[k_name].shape[1]
    assert all(i // in_f < 16 for i in rs.indices[k_name].tolist())


def test_restore_set_with_explicit_heads_and_reference_slicing(tiny_llama):
    """Catches wrong slices under ``reference`` slicing (input columns for q/k/v, all of R for
    o_proj) and ``heads=`` not overriding the score ranking (heads kept in the given order)."""
    loaded = tiny_llama
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]])
    heads = [(1, 3), (0, 2)]
    cfg = RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=2, slicing="reference")
    rs = restore_set(loaded, masks, scores, cfg, RankCache(loaded, safety, utility), heads=heads)
    expected = oracle_restore(
        loaded, dense, pruned, safety, utility, heads, 0.1, 0.6, 0.9, slicing="reference"
    )
    assert expected["count"] > 0
    assert_matches(rs, expected, heads)


def test_restore_set_uses_dense_weights_through_weight_of(tiny_llama):
    """Catches ranks taken from the current (pruned) weights instead of ``weight_of``."""
    loaded = tiny_llama
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    with torch.no_grad():  # the model now holds pruned weights; weight_of gives dense ones
        for name, _, _, mod in loaded.adapter.iter_linears():
            mod.weight.masked_fill_(pruned[name], 0)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]])
    cfg = RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=3)
    ranks = RankCache(loaded, safety, utility, weight_of=lambda n: dense[n])
    rs = restore_set(loaded, masks, scores, cfg, ranks)
    heads = oracle_heads(scores, 3)
    expected = oracle_restore(loaded, dense, pruned, safety, utility, heads, 0.1, 0.6, 0.9)
    assert_matches(rs, expected, heads)
    # a second setting reuses the cache and still matches
    cfg2 = RealignConfig(p=0.0, q=0.3, max_p=0.5, top_h=2)
    rs2 = restore_set(loaded, masks, scores, cfg2, ranks)
    heads2 = oracle_heads(scores, 2)
    expected2 = oracle_restore(loaded, dense, pruned, safety, utility, heads2, 0.0, 0.3, 0.5)
    assert_matches(rs2, expected2, heads2)


# --- the building blocks ----------------------------------------------------------------------


def test_candidates_equals_set_algebra():
    """Catches off-by-one thresholds (``<=`` for ``<``, ``>`` for ``>=``), q and max_p swapped,
    and ``numel`` ignored when the ranks are only a slice of the matrix."""
    g = torch.Generator().manual_seed(5)
    numel = 7 * 9
    ranks_s = torch.randperm(numel, generator=g).view(7, 9).to(torch.int32)
    ranks_u = torch.randperm(numel, generator=g).view(7, 9).to(torch.int32)
    for p, q, max_p in [(0.1, 0.6, 0.9), (0.0, 0.5, 0.5), (0.2, 1.0, 1.0), (0.3, 0.4, 0.8)]:
        rs, ru = ranks_s.reshape(-1).tolist(), ranks_u.reshape(-1).tolist()
        top_q = {i for i in range(numel) if rs[i] < math.floor(q * numel)}
        top_max = {i for i in range(numel) if ru[i] < math.floor(max_p * numel)}
        top_p = {i for i in range(numel) if ru[i] < math.floor(p * numel)}
        want = (top_q & top_max) - top_p
        got = candidates(ranks_s, ranks_u, p, q, max_p)
        assert got.dtype == torch.bool and got.shape == (7, 9)
        assert set(torch.nonzero(got.reshape(-1)).flatten().tolist()) == want
        # the same rows taken as a slice: thresholds still from the whole matrix's numel
        part = candidates(ranks_s[2:5], ranks_u[2:5], p, q, max_p, numel=numel)
        want_part = {i - 2 * 9 for i in want if 2 * 9 <= i < 5 * 9}
        assert set(torch.nonzero(part.reshape(-1)).flatten().tolist()) == want_part


def test_head_slice_equals_cells(tiny_llama):
    """Catches a wrong KV group (``h % K`` instead of ``h // (H/K)``), q/o swapped, or the
    reference slicing mixed up with the head slicing."""
    a = tiny_llama.adapter
    d_h, group = 16, 2
    for proj in PROJS:
        shape = (32, 64) if proj in ("k_proj", "v_proj") else (64, 64)
        for h in range(4):
            for slicing in ("head", "reference"):
                rows, cols = head_slice(a, proj, h, shape, slicing)
                flat = torch.arange(shape[0] * shape[1]).view(shape)[rows, cols]
                got = set(flat.reshape(-1).tolist())
                assert got == oracle_cells(proj, h, shape, d_h, group, slicing), (proj, h)
