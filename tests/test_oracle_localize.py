"""Oracles for the localization ladder's accounting (mutation testing of localize.py, issue 18).

The random-head control's restore set field by field (per head and projection, per module,
the pool, the totals) and the head rungs under both slicings, each against head blocks
written out here as index sets; ``plan`` taking the realignment's settings from HSR's restore
set, or the defaults without one.
"""

from __future__ import annotations

import pytest
import torch

# the model classes once at collection, not in each mutant's test run (docs/MUTATION.md)
import transformers.models.llama.modeling_llama  # noqa: F401
from oracles import memory_llama

from hsr_core import localize
from hsr_core.config import RUNGS, EvalConfig, LocalizeConfig, RealignConfig, WandaConfig
from hsr_core.data import Sample
from hsr_core.evaluate import rates
from hsr_core.heads import Head
from hsr_core.models import ATTN_PROJS
from hsr_core.progress import Cancelled
from hsr_core.variants import UpdatedWeights, Variants, WeightStore
from hsr_core.wanda import prune_masks

SCORES = torch.tensor([[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]])


def block(a, proj: str, h: int, shape, slicing: str) -> set[int]:
    """Flat indices of head ``h``'s slice of ``proj``: the paper's reading (``head``: rows of
    q/k/v, columns of o) or the released code's (``reference``: columns of q/k/v, all of o)."""
    out_f, in_f = shape
    d = a.head_dim
    own = (h if proj in ("q_proj", "o_proj") else h // (a.num_heads // a.num_kv_heads)) * d
    if slicing == "reference":
        if proj == "o_proj":
            return set(range(out_f * in_f))
        return {r * in_f + c for r in range(out_f) for c in range(own, own + d)}
    if proj == "o_proj":
        return {r * in_f + c for r in range(out_f) for c in range(own, own + d)}
    return {r * in_f + c for r in range(own, own + d) for c in range(in_f)}


def pruned_set(mask) -> set[int]:
    return set(torch.nonzero(mask.unpack().reshape(-1)).squeeze(1).tolist())


@pytest.fixture
def world(tiny_llama):
    g = torch.Generator().manual_seed(3)
    utility = {
        n: torch.rand(m.weight.shape[1], generator=g) + 0.05
        for n, _, _, m in tiny_llama.adapter.iter_linears()
    }
    return tiny_llama, prune_masks(tiny_llama, utility, WandaConfig(sparsity=0.5))


@pytest.mark.parametrize("slicing", ["head", "reference"])
@pytest.mark.parametrize("k, count", [(3, 7), (3, 150), (8, 10**9)])  # 8: every head, all back
def test_random_head_restore_accounting_by_brute_force(world, slicing, k, count) -> None:
    check_random_head_restore(*world, slicing, k, count)


@pytest.mark.parametrize("slicing", ["head", "reference"])
def test_random_head_restore_accounting_when_o_proj_is_wider_than_its_heads(slicing) -> None:
    """``hidden_size`` above ``num_heads * head_dim``: o_proj has more rows (64) than columns
    (2 heads of 8), so a head's o_proj block spans rows its column count does not reach."""
    loaded = memory_llama(num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    assert loaded.model.model.layers[0].self_attn.o_proj.weight.shape == (64, 16)
    g = torch.Generator().manual_seed(5)
    utility = {
        n: torch.rand(m.weight.shape[1], generator=g) + 0.05
        for n, _, _, m in loaded.adapter.iter_linears()
    }
    masks = prune_masks(loaded, utility, WandaConfig(sparsity=0.5))
    check_random_head_restore(loaded, masks, slicing, 2, 10**9)


def check_random_head_restore(loaded, masks, slicing: str, k: int, count: int) -> None:
    """``random_head_restore``'s restore set against the head blocks written out above."""
    a = loaded.adapter
    cfg = RealignConfig(top_h=3, slicing=slicing)
    rs = localize.random_head_restore(loaded, masks, k, count, seed=4, cfg=cfg)
    assert rs.config is cfg and rs.pruned_total == sum(m.count for m in masks.values())
    pool, per_module = 0, dict.fromkeys(ATTN_PROJS, 0)
    for name, mask in masks.items():
        layer, proj = a.parse(name)
        got = set(rs.indices.get(name, torch.empty(0, dtype=torch.long)).tolist())
        if proj not in ATTN_PROJS:
            assert not got, name
            continue
        allowed = set()
        for head in rs.heads:
            if head.layer == layer:
                allowed |= block(a, proj, head.head, mask.shape, slicing)
        pool += len(allowed & pruned_set(mask))
        assert got <= allowed & pruned_set(mask), name
        per_module[proj] += len(got)
    assert rs.candidates == pool and rs.count == min(count, pool)
    assert rs.per_module == per_module
    assert set(rs.per_head) == set(rs.heads)
    for head in rs.heads:
        want = {}
        for proj in ATTN_PROJS:
            name = a.linear_name(head.layer, proj)
            idx = set(rs.indices.get(name, torch.empty(0, dtype=torch.long)).tolist())
            want[proj] = len(idx & block(a, proj, head.head, masks[name].shape, slicing))
        assert rs.per_head[head] == want, head
    # the small draw restores in some heads but not in every projection of every head: the
    # per-head counts are not all equal or all zero, so the check above can fail
    if count == 7:
        assert len({v for counts in rs.per_head.values() for v in counts.values()}) > 1


@pytest.mark.parametrize("slicing", ["head", "reference"])
def test_without_heads_clears_exactly_their_blocks(world, slicing) -> None:
    loaded, masks = world
    a = loaded.adapter
    heads = [Head(0, 1), Head(1, 2), Head(1, 3)]  # 1-2 and 1-3 share a KV group
    new = localize.without_heads(loaded, masks, heads, slicing)
    for name, mask in masks.items():
        layer, proj = a.parse(name)
        back = set()
        if proj in ATTN_PROJS:
            for head in heads:
                if head.layer == layer:
                    back |= block(a, proj, head.head, mask.shape, slicing)
        assert pruned_set(new[name]) == pruned_set(mask) - back, name
        assert new[name].count == len(pruned_set(mask) - back), name


def test_plan_takes_the_realignment_settings_from_hsr_or_the_defaults(world) -> None:
    loaded, masks = world
    cfg = LocalizeConfig(rungs=("top_heads", "random_heads"), seeds=1)
    order = sorted(
        (Head(layer, h) for layer in range(2) for h in range(4)),
        key=lambda x: -float(SCORES[x.layer, x.head]),
    )
    hsr = localize.random_head_restore(
        loaded, masks, 2, 5, seed=1, cfg=RealignConfig(top_h=2, slicing="reference")
    )
    top, rand = localize.plan(loaded, masks, SCORES, hsr, cfg)
    assert top.heads == tuple(order[:2]) and len(rand.heads) == 2  # hsr's top_h
    want = localize.without_heads(loaded, masks, order[:2], "reference")  # and its slicing
    assert {n: pruned_set(m) for n, m in top.masks.items()} == {
        n: pruned_set(m) for n, m in want.items()
    }
    assert rand.restore.config is hsr.config and rand.restored == 5
    top, rand = localize.plan(loaded, masks, SCORES, None, cfg)  # RealignConfig's defaults
    default = RealignConfig()
    assert top.heads == tuple(order[: min(default.top_h, 8)])
    want = localize.without_heads(loaded, masks, top.heads, default.slicing)
    assert {n: pruned_set(m) for n, m in top.masks.items()} == {
        n: pruned_set(m) for n, m in want.items()
    }
    assert rand.restore.config == default


def test_plan_every_rung_field_by_field(world) -> None:
    """Each rung's variant, masks, restore set, restored count, heads, ablated heads, seed and
    label, written out here for k = 3 and two random draws from seed 5."""
    loaded, masks = world
    a = loaded.adapter
    total = sum(m.count for m in masks.values())
    realign = RealignConfig(top_h=5)
    hsr = localize.random_head_restore(loaded, masks, 2, 9, seed=1, cfg=realign)
    cfg = LocalizeConfig(top_k=3, seeds=2, seed=5, rungs=tuple(reversed(RUNGS)))
    rungs = localize.plan(loaded, masks, SCORES, hsr, cfg)
    top = (Head(0, 0), Head(0, 1), Head(1, 2))  # 0.9, 0.8, 0.7
    draws = [localize.random_head_restore(loaded, masks, 3, 9, 5 + i, realign) for i in range(2)]
    attention = set(a.linear_names(attention_only=True))
    attn_pruned = sum(m.count for n, m in masks.items() if n in attention)
    top_back = total - sum(m.count for m in localize.without_heads(loaded, masks, top).values())
    want = [  # name, variant, restored, heads, ablate, seed, label (reversed RUNGS order)
        ("mlp", "pruned", total - attn_pruned, (), (), None, "every pruned MLP weight"),
        ("attention", "pruned", attn_pruned, (), (), None, "every pruned attention weight"),
        ("top_heads", "pruned", top_back, top, (), None, "every pruned weight of the top-3 heads"),
    ]
    want += [
        (
            "random_heads",
            "realigned",
            d.count,
            tuple(d.heads),
            (),
            5 + i,
            f"{d.count:,} weights in 3 random heads (seed {5 + i})",
        )
        for i, d in enumerate(draws)
    ]
    want += [
        ("hsr", "realigned", hsr.count, tuple(hsr.heads), (), None, f"HSR ({hsr.count:,} weights)"),
        ("pruned", "pruned", 0, (), (), None, "pruned"),
        ("dense_ablated", "original", total, top, top, None, "dense, top-3 Ships heads ablated"),
        ("dense", "original", total, (), (), None, "dense (original)"),
    ]
    got = [(r.name, r.variant, r.restored, r.heads, r.ablate, r.seed, r.label) for r in rungs]
    assert got == want
    assert 0 < top_back < total and 0 < attn_pruned < total and draws[0].count == 9
    by_name = {r.name: r for r in rungs}
    assert by_name["dense"].masks is None and by_name["dense_ablated"].masks is None
    assert by_name["pruned"].masks is masks and by_name["hsr"].masks is masks
    assert by_name["hsr"].restore is hsr and by_name["pruned"].restore is None
    for r, d in zip([r for r in rungs if r.name == "random_heads"], draws, strict=True):
        assert r.masks is masks
        assert {n: i.tolist() for n, i in r.restore.indices.items()} == {
            n: i.tolist() for n, i in d.indices.items()
        }
    for name, new in (
        ("top_heads", localize.without_heads(loaded, masks, top)),
        ("attention", localize.without_modules(loaded, masks, attention=True)),
        ("mlp", localize.without_modules(loaded, masks, attention=False)),
    ):
        assert {n: pruned_set(m) for n, m in by_name[name].masks.items()} == {
            n: pruned_set(m) for n, m in new.items()
        }, name
    # without HSR's restore set: no hsr rung, and the random draws are as large as they can be
    rungs = localize.plan(loaded, masks, SCORES, None, cfg, realign)
    assert "hsr" not in [r.name for r in rungs]
    for r in rungs:
        if r.name == "random_heads":
            assert r.restored == r.restore.candidates  # every pruned weight of its heads


def test_run_reports_each_rung_and_keeps_the_pruners_weights(world, tmp_path, monkeypatch) -> None:
    """``run``'s bar, its ``on_rung`` calls, the restored weights per 10k pruned, a pruner's
    updated weights kept installed on every rung, and a stop before the first rung."""
    loaded, masks = world
    total = sum(m.count for m in masks.values())
    store = WeightStore(loaded, tmp_path / "updated", copy=False)
    for n, _, _, mod in loaded.adapter.iter_linears():
        store.tensors[n].copy_(mod.weight.detach().masked_fill(masks[n].unpack(), 0))
    updated = UpdatedWeights(store, masks)
    v = Variants(loaded, scratch=tmp_path / "scratch")
    v.install(masks, None, updated)
    rungs = localize.plan(
        loaded, masks, SCORES, None, LocalizeConfig(top_k=2, rungs=("dense", "pruned", "mlp"))
    )
    bars, seen, kept = [], [], []
    real_bar = localize.bar

    def recording_bar(iterable, **kwargs):
        bars.append(kwargs)
        return real_bar(iterable, **kwargs)

    def judge(samples, answers):
        kept.append(v.updated is updated and v.masks is not None)
        return [{"harmful": True, "refusal": False, "incoherent": False} for _ in samples]

    descs = []
    real_generate = localize.generate

    def recording_generate(*args, **kwargs):
        descs.append(kwargs["desc"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(localize, "bar", recording_bar)
    monkeypatch.setattr(localize, "generate", recording_generate)
    cfg = EvalConfig(max_new_tokens=1, batch_size=2)
    samples = [Sample("Hi"), Sample("Why?")]
    out = localize.run(v, rungs, samples, cfg, judge, on_rung=lambda i, r: seen.append((i, r.name)))
    assert descs == [r.label for r in rungs]  # each rung's generation bar named after it
    for rung, rec in zip(rungs, out, strict=True):
        measured = rates(rec["answers"])
        assert rec == {
            "name": rung.name,
            "label": rung.label,
            "variant": rung.variant,
            "seed": rung.seed,
            "heads": [h.label for h in rung.heads],
            "restored": rung.restored,
            "restored_per_10k_pruned": 1e4 * rung.restored / total,
            **measured,
            "asr_ci": measured["ci95"]["asr"],
            "refusal_rate_benign_ci": measured["ci95"]["refusal_rate_benign"],
            "answers": rec["answers"],
        }
    assert bars == [{"desc": "Localization ladder", "unit": "rung"}]
    assert seen == [(0, "dense"), (1, "pruned"), (2, "mlp")] and kept == [True] * 3
    assert [r["restored_per_10k_pruned"] for r in out] == [1e4 * r.restored / total for r in rungs]
    assert 0 < out[2]["restored_per_10k_pruned"] < 1e4
    with pytest.raises(Cancelled):
        localize.run(v, rungs, samples, cfg, judge, should_stop=lambda: True, on_rung=seen.append)
    assert len(seen) == 3  # stopped before the first rung
    assert v.masks is masks and v.updated is updated
    v.install(None)  # nothing pruned: no weights per 10k pruned
    dense = localize.plan(loaded, masks, SCORES, None, LocalizeConfig(rungs=("dense",)))
    assert localize.run(v, dense, samples, cfg, judge)[0]["restored_per_10k_pruned"] == 0.0
    v.close()
    updated.close()
