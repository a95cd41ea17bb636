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
from types import SimpleNamespace

import pytest
import torch

# imported at collection, so that the fork server of a mutation run (scripts/mutation.sh)
# holds it: each mutant's tests then skip transformers' lazy import of the Llama classes
# (several seconds a mutant on the loaded machine)
import transformers.models.llama.modeling_llama  # noqa: F401

from hsr_core import realign
from hsr_core.config import RealignConfig, WandaConfig
from hsr_core.heads import Head
from hsr_core.masks import PackedMask
from hsr_core.realign import (
    RankCache,
    RestoreSet,
    candidates,
    descending_ranks,
    head_rank_points,
    head_slice,
    restore_set,
    top_fraction,
)
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
            rows, cols = head_slice(a, proj, h, shape)  # the default: the head's own weights
            flat = torch.arange(shape[0] * shape[1]).view(shape)[rows, cols]
            assert set(flat.reshape(-1).tolist()) == oracle_cells(
                proj, h, shape, d_h, group, "head"
            )


# --- the MLP extension, the accounting, the rank cache and the head plot (issue 18) ---------

MLP_CASES = {
    # heads in both layers: both layers' MLPs take part
    "both_layers": ([(0, 0), (0, 1), (1, 2)], (0.1, 0.6, 0.9)),
    # heads in layer 1 only: layer 0's MLP must stay pruned
    "layer_1": ([(1, 3), (1, 0)], (0.3, 0.9, 1.0)),
}


def oracle_mlp(loaded, dense, pruned, safety, utility, layers, p, q, max_p):
    """The extension's band over each whole MLP matrix of ``layers``, by set algebra."""
    a = loaded.adapter
    indices, per_layer, n_cand = {}, {}, 0
    for layer in sorted(layers):
        per_layer[layer] = {}
        for proj in a.mlp_projs:
            name = a.linear_name(layer, proj)
            w = dense[name]
            S = w.abs().float() * safety[name][None, :]
            U = w.abs().float() * utility[name][None, :]
            R = (full_sort_top(S, q) & full_sort_top(U, max_p)) - full_sort_top(U, p)
            is_pruned = set(torch.nonzero(pruned[name].reshape(-1)).flatten().tolist())
            n_cand += len(R)
            per_layer[layer][proj] = len(R & is_pruned)
            if R & is_pruned:
                indices[name] = sorted(R & is_pruned)
    return indices, per_layer, n_cand


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_heads_plus_mlp_equals_oracle(tiny_llama, case):
    """Catches the MLP extension restoring in the wrong layers or none, outside R or the mask,
    ranking over part of the matrix, and its accounting (per layer and module, its candidates,
    the totals) wrong; and ``scope="heads"`` touching or counting any MLP weight."""
    loaded = tiny_llama
    a = loaded.adapter
    assert a.mlp_projs == ("gate_proj", "up_proj", "down_proj")
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    heads, (p, q, max_p) = MLP_CASES[case]
    scores = torch.zeros(2, 4)
    ranks = RankCache(loaded, safety, utility)
    cfg = RealignConfig(p=p, q=q, max_p=max_p, top_h=len(heads), scope="heads+mlp")
    rs = restore_set(loaded, masks, scores, cfg, ranks, heads=heads)
    attn = oracle_restore(loaded, dense, pruned, safety, utility, heads, p, q, max_p)
    layers = {l for l, _ in heads}
    mlp, per_layer, n_mlp = oracle_mlp(loaded, dense, pruned, safety, utility, layers, p, q, max_p)
    assert mlp and n_mlp > sum(len(v) for v in mlp.values())  # unpruned candidates left out
    got = {n: v.tolist() for n, v in rs.indices.items()}
    assert got == {**attn["indices"], **mlp}  # MLP indices ascending, attention ones sorted
    assert rs.mlp_per_layer == per_layer
    assert rs.mlp_candidates == n_mlp
    assert rs.candidates == attn["candidates"]  # the heads' candidates alone
    mlp_module = {proj: 0 for proj in a.mlp_projs}
    for name, v in mlp.items():
        mlp_module[a.parse(name)[1]] += len(v)
    assert rs.per_module == {**attn["per_module"], **mlp_module}
    assert rs.count == attn["count"] + sum(len(v) for v in mlp.values())
    assert rs.config == cfg  # the settings it was made with: summary() reads their scope
    assert rs.summary()["restored_mlp_per_layer"] == {str(k): v for k, v in per_layer.items()}
    # the paper's scope: the same heads, no MLP weight and no MLP accounting
    plain = restore_set(
        loaded,
        masks,
        scores,
        RealignConfig(p=p, q=q, max_p=max_p, top_h=len(heads)),
        ranks,
        heads=heads,
    )
    assert {n: v.tolist() for n, v in plain.indices.items()} == attn["indices"]
    assert plain.per_module == attn["per_module"]
    assert plain.mlp_per_layer == {} and plain.mlp_candidates == 0
    assert "restore_scope" not in plain.summary()


def test_restore_indices_are_ascending(tiny_llama):
    """Catches the attention indices left in block order (o_proj's column blocks of two heads
    interleave in flat order): each linear's indices are ascending."""
    loaded = tiny_llama
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    heads = [(0, 3), (0, 0)]
    cfg = RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=2)
    rs = restore_set(
        loaded, masks, torch.zeros(2, 4), cfg, RankCache(loaded, safety, utility), heads=heads
    )
    expected = oracle_restore(loaded, dense, pruned, safety, utility, heads, 0.1, 0.6, 0.9)
    o_name = loaded.adapter.linear_name(0, "o_proj")
    assert o_name in expected["indices"]
    for name, v in rs.indices.items():
        assert rs.indices[name].dtype == torch.long
        assert v.tolist() == expected["indices"][name]


def test_restore_set_accounting_by_hand():
    """``per_10k_pruned``, ``restored_in`` and ``summary`` on a restore set written by hand."""
    h12, h03 = Head(1, 2), Head(0, 3)
    per_head = {
        h12: {"q_proj": 2, "k_proj": 0, "v_proj": 1, "o_proj": 0},
        h03: {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 4},
    }
    per_module = {"q_proj": 2, "k_proj": 0, "v_proj": 1, "o_proj": 4}
    rs = RestoreSet(
        indices={"x": torch.tensor([1, 5, 9]), "y": torch.tensor([0, 2, 3, 4])},
        heads=[h12, h03],
        per_head=per_head,
        count=7,
        pruned_total=35_000,
        candidates=11,
        config=RealignConfig(),
        per_module=per_module,
    )
    assert rs.per_10k_pruned == 2.0  # 7 of 35 000 pruned weights
    assert rs.restored_in(h12) == 3 and rs.restored_in(h03) == 4
    assert rs.restored_in(Head(1, 1)) == 0
    want = {
        "selected_heads": ["1-2", "0-3"],
        "restored": 7,
        "restored_per_10k_pruned": 2.0,
        "restore_candidates_in_heads": 11,
        "restored_per_head": {"1-2": per_head[h12], "0-3": per_head[h03]},
        "restored_per_module": per_module,
    }
    assert rs.summary() == want
    empty = RestoreSet({}, [h12], {h12: {}}, 0, 0, 0, RealignConfig())
    assert empty.per_10k_pruned == 0.0 and empty.restored_in(h12) == 0
    mlp = RestoreSet(
        indices={},
        heads=[h12],
        per_head={h12: per_head[h12]},
        count=3,
        pruned_total=20_000,
        candidates=5,
        config=RealignConfig(scope="heads+mlp"),
        per_module=per_module,
        mlp_per_layer={1: {"up_proj": 6, "down_proj": 0}},
        mlp_candidates=13,
    )
    assert mlp.summary() == {
        "selected_heads": ["1-2"],
        "restored": 3,
        "restored_per_10k_pruned": 1.5,
        "restore_candidates_in_heads": 5,
        "restored_per_head": {"1-2": per_head[h12]},
        "restored_per_module": per_module,
        "restore_scope": "heads+mlp (our extension; the paper restores attention heads only)",
        "restored_mlp_per_layer": {"1": {"up_proj": 6, "down_proj": 0}},
        "restore_candidates_in_mlp": 13,
    }


def test_descending_ranks_and_top_fraction_by_hand():
    """Ranks over the whole matrix, 0 = highest, ties to the lower flat index; ``T_x`` is
    the top ``floor(x * numel)``."""
    score = torch.tensor([[1.0, 3.0, 0.5], [3.0, 0.5, 2.0]])
    ranks = descending_ranks(score)
    assert ranks.dtype == torch.int32
    assert ranks.tolist() == [[3, 0, 4], [1, 5, 2]]
    assert top_fraction(ranks, 0.5).tolist() == [[False, True, False], [True, False, True]]
    assert top_fraction(ranks, 0.49).tolist() == [[False, True, False], [True, False, False]]
    assert not top_fraction(ranks, 0.0).any() and top_fraction(ranks, 1.0).all()
    g = torch.Generator().manual_seed(3)
    for shape in [(5, 7), (1, 13), (16, 3)]:
        s = torch.randint(0, 4, shape, generator=g).float()  # many ties
        flat = s.reshape(-1).tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
        want = [0] * len(flat)
        for r, i in enumerate(order):
            want[i] = r
        assert descending_ranks(s).reshape(-1).tolist() == want
        with torch.device("meta"):  # another default device: the ranks stay on the input's
            assert descending_ranks(s).reshape(-1).tolist() == want
    meta = descending_ranks(torch.empty(4, 6, device="meta"))  # every op checks devices
    assert meta.device.type == "meta" and meta.shape == (4, 6) and meta.dtype == torch.int32


def full_sort_ranks(score: torch.Tensor) -> list[int]:
    flat = score.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    ranks = [0] * len(flat)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def test_rank_cache_scores_weights_device_and_masks(tiny_llama, monkeypatch):
    """Catches ``scores`` ignored (or the safety and utility scores swapped), a linear not in
    ``scores`` not falling back to its Wanda scores, the default ``weight_of`` not reading the
    module's weight, ``device`` ignored, and the kept-masks rule (attention weights only, at
    most ``KEEP_MASKS_MAX_WEIGHTS``) or its reuse of an unpacked mask wrong."""
    loaded = tiny_llama
    a = loaded.adapter
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    q_name, k_name = a.linear_name(1, "q_proj"), a.linear_name(0, "k_proj")
    g = torch.Generator().manual_seed(8)
    own_s, own_u = torch.rand(64, 64, generator=g), torch.rand(64, 64, generator=g)
    cache = RankCache(loaded, safety, utility, scores={q_name: (own_s, own_u)})
    rs, ru = cache.get(q_name)
    assert rs.reshape(-1).tolist() == full_sort_ranks(own_s)
    assert ru.reshape(-1).tolist() == full_sort_ranks(own_u)
    ks, ku = cache.get(k_name)  # not in scores: the module's weight and the norms
    w = dense[k_name].abs().float()
    assert ks.reshape(-1).tolist() == full_sort_ranks(w * safety[k_name][None, :])
    assert ku.reshape(-1).tolist() == full_sort_ranks(w * utility[k_name][None, :])
    assert cache.get(k_name)[0] is ks  # computed once
    # on another device: the meta device runs every op but checks devices
    meta = RankCache(loaded, safety, utility, device="meta", scores={q_name: (own_s, own_u)})
    for name in (q_name, k_name):
        assert all(r.device.type == "meta" for r in meta.get(name))
        assert meta.pruned(name, masks[name]).device.type == "meta"
    # kept masks: by default for at most KEEP_MASKS_MAX_WEIGHTS attention weights
    attn = sum(m.weight.numel() for *_, m in a.iter_linears(attention_only=True))
    assert attn < sum(m.weight.numel() for *_, m in a.iter_linears())
    monkeypatch.setattr(realign, "KEEP_MASKS_MAX_WEIGHTS", attn)
    assert RankCache(loaded, safety, utility).keep_masks is True
    monkeypatch.setattr(realign, "KEEP_MASKS_MAX_WEIGHTS", attn - 1)
    assert RankCache(loaded, safety, utility).keep_masks is False
    for keep in (True, False):
        c = RankCache(loaded, safety, utility, keep_masks=keep)
        first = c.pruned(k_name, masks[k_name])
        assert torch.equal(first, pruned[k_name])
        assert (c.pruned(k_name, masks[k_name]) is first) is keep
        other = prune_masks(loaded, safety, WandaConfig(sparsity=0.3))[k_name]
        assert torch.equal(c.pruned(k_name, other), other.unpack())  # a new mask: unpacked
        assert not torch.equal(other.unpack(), pruned[k_name])


def test_head_rank_points_equals_oracle(tiny_llama):
    """Every field of ``head_rank_points`` against the full sort and the head's cells, and
    the sample drawn when ``max_points`` is smaller: a subset in the original order, of
    exactly ``max_points``, the same for the same seed and another for another seed."""
    loaded = tiny_llama
    a = loaded.adapter
    safety, utility, masks, dense, pruned = make_inputs(loaded)
    ranks = RankCache(loaded, safety, utility)
    for slicing in ("head", "reference"):
        cfg = RealignConfig(p=0.1, q=0.6, max_p=0.9, slicing=slicing)
        head = Head(1, 3)
        want = {k: [] for k in ("safety", "utility", "pruned", "candidate", "proj")}
        for i, proj in enumerate(PROJS):
            name = a.linear_name(1, proj)
            w = dense[name]
            S = w.abs().float() * safety[name][None, :]
            U = w.abs().float() * utility[name][None, :]
            rs_, ru_ = full_sort_ranks(S), full_sort_ranks(U)
            R = (full_sort_top(S, 0.6) & full_sort_top(U, 0.9)) - full_sort_top(U, 0.1)
            flat_pruned = pruned[name].reshape(-1).tolist()
            for c in sorted(oracle_cells(proj, 3, tuple(w.shape), 16, 2, slicing)):
                want["safety"].append(rs_[c] / w.numel())
                want["utility"].append(ru_[c] / w.numel())
                want["pruned"].append(flat_pruned[c])
                want["candidate"].append(c in R)
                want["proj"].append(i)
        pts = head_rank_points(loaded, masks, ranks, head, cfg, max_points=10**6)
        total = len(want["proj"])
        assert pts["total"] == total
        for k, v in want.items():
            assert pts[k].device.type == "cpu" and pts[k].tolist() == v, k
        assert pts["safety"].dtype == pts["utility"].dtype == torch.float64
        assert pts["proj"].dtype == torch.int8
        assert pts["pruned"].dtype == pts["candidate"].dtype == torch.bool
        both = [c and p for c, p in zip(want["candidate"], want["pruned"], strict=True)]
        assert pts["restored"].tolist() == both and any(both)
        # a sample of 100: rows of the full table (each is one weight: its projection and
        # safety rank identify it), in the table's order
        rows = list(zip(want["proj"], want["safety"], want["utility"], both, strict=True))
        position = {r[:2]: i for i, r in enumerate(rows)}
        picks = []
        for seed in (0, 0, 1):
            s = head_rank_points(loaded, masks, ranks, head, cfg, max_points=100, seed=seed)
            assert s["total"] == total
            got = list(
                zip(
                    s["proj"].tolist(),
                    s["safety"].tolist(),
                    s["utility"].tolist(),
                    s["restored"].tolist(),
                    strict=True,
                )
            )
            assert len(got) == 100
            idx = [position[r[:2]] for r in got]
            assert idx == sorted(set(idx))
            assert all(rows[i] == r for i, r in zip(idx, got, strict=True))
            picks.append(idx)
        assert picks[0] == picks[1] != picks[2]
    # the default sample is 20 000 points: the tiny head has fewer, so all of them
    assert head_rank_points(loaded, masks, ranks, (1, 3), cfg)["safety"].numel() == total


def test_head_rank_points_default_sample():
    """A head of more than 20 000 weights (pure tensors, one layer of a made-up geometry:
    head_dim 128, hidden 256, MHA): by default 20 000 of them, drawn with seed 0."""
    adapter = SimpleNamespace(head_dim=128, group_size=1, linear_name=lambda l, p: f"{l}.{p}")
    loaded = SimpleNamespace(adapter=adapter)
    g = torch.Generator().manual_seed(4)
    scores = {
        f"0.{p}": (torch.rand(256, 256, generator=g), torch.rand(256, 256, generator=g))
        for p in PROJS
    }
    masks = {n: PackedMask.pack(torch.rand(256, 256, generator=g) < 0.5) for n in scores}
    ranks = RankCache(loaded, {}, {}, keep_masks=False, scores=scores)
    cfg = RealignConfig()
    pts = head_rank_points(loaded, masks, ranks, (0, 1), cfg)
    assert pts["total"] == 4 * 128 * 256
    assert pts["safety"].numel() == 20_000
    seeded = head_rank_points(loaded, masks, ranks, (0, 1), cfg, max_points=20_000, seed=0)
    assert all(torch.equal(pts[k], seeded[k]) for k in ("safety", "utility", "proj"))
    other = head_rank_points(loaded, masks, ranks, (0, 1), cfg, max_points=20_000, seed=1)
    assert not torch.equal(pts["safety"], other["safety"])
