"""The localization ladder and the heads+mlp restore scope against brute-force constructions.

Every rung is checked by building, by hand in the test, the weights it should leave in the
model (dense weights, unpacked masks, head slices written out as index ranges), never by
reusing the rung's own output.
"""

from __future__ import annotations

import pytest
import torch

from hsr_core import localize, pipeline
from hsr_core.config import (
    ConfigError,
    EvalConfig,
    LocalizeConfig,
    RealignConfig,
    WandaConfig,
)
from hsr_core.data import Sample, builtin_eval
from hsr_core.evaluate import judge_answers
from hsr_core.heads import Head
from hsr_core.hooks import count_hooks, head_ablation
from hsr_core.models import ATTN_PROJS
from hsr_core.realign import RankCache, restore_set
from hsr_core.variants import Variants
from hsr_core.wanda import prune_masks

SCORES = torch.tensor([[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]])


def norms(loaded, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(mod.weight.shape[1], generator=g) + 0.05
        for name, _, _, mod in loaded.adapter.iter_linears()
    }


def brute_block(a, proj: str, h: int, shape) -> set[int]:
    """Flat indices of head ``h``'s own weights in ``proj`` (rows for q/k/v, columns for o)."""
    out_f, in_f = shape
    d = a.head_dim
    g = h // (a.num_heads // a.num_kv_heads)
    if proj == "o_proj":
        return {r * in_f + c for r in range(out_f) for c in range(h * d, (h + 1) * d)}
    lo = (h if proj == "q_proj" else g) * d
    return {r * in_f + c for r in range(lo, lo + d) for c in range(in_f)}


@pytest.fixture
def world(tiny_llama, tmp_path):
    safety, utility = norms(tiny_llama, 1), norms(tiny_llama, 2)
    masks = prune_masks(tiny_llama, utility, WandaConfig(sparsity=0.5))
    dense = {n: m.weight.detach().clone() for n, _, _, m in tiny_llama.adapter.iter_linears()}
    ranks = RankCache(tiny_llama, safety, utility)
    hsr = restore_set(
        tiny_llama, masks, SCORES, RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=3), ranks
    )
    v = Variants(tiny_llama, scratch=tmp_path / "scratch")
    v.install(masks, hsr)
    yield tiny_llama, masks, dense, hsr, ranks, v
    v.close()


def weights(loaded) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, _, _, m in loaded.adapter.iter_linears()}


def test_every_attention_weight_back_is_pruning_only_the_mlps_bit_for_bit(world) -> None:
    loaded, masks, dense, _, _, v = world
    attention = set(loaded.adapter.linear_names(attention_only=True))
    for rung, only_pruned in (
        ("attention", lambda n: n not in attention),
        ("mlp", attention.__contains__),
    ):
        new = localize.without_modules(loaded, masks, attention=rung == "attention")
        v.install(new)
        with v.use("pruned"):
            got = weights(loaded)
        for name, w in got.items():
            expected = dense[name].clone()
            if only_pruned(name):
                expected[masks[name].unpack()] = 0
            assert torch.equal(w, expected), (rung, name)
        assert sum(m.count for m in new.values()) == sum(
            masks[n].count for n in masks if only_pruned(n)
        )


def test_top_heads_rung_puts_back_exactly_the_heads_slices(world) -> None:
    loaded, masks, dense, _, _, v = world
    a = loaded.adapter
    heads = [Head(0, 1), Head(1, 2), Head(1, 3)]  # 1-2 and 1-3 share a KV group
    v.install(localize.without_heads(loaded, masks, heads))
    with v.use("pruned"):
        got = weights(loaded)
    for name, w in got.items():
        layer, proj = a.parse(name)
        back: set[int] = set()
        if proj in ATTN_PROJS:
            for hl, h in heads:
                if hl == layer:
                    back |= brute_block(a, proj, h, tuple(w.shape))
        pruned = masks[name].unpack().reshape(-1).clone()
        if back:
            pruned[sorted(back)] = False
        expected = dense[name].reshape(-1).clone()
        expected[pruned] = 0
        assert torch.equal(w.reshape(-1), expected), name


def test_random_head_control_restores_the_stated_count_inside_its_heads(world) -> None:
    loaded, masks, _, hsr, _, _ = world
    a = loaded.adapter
    cfg = hsr.config
    rs = localize.random_head_restore(loaded, masks, 3, hsr.count, seed=5, cfg=cfg)
    again = localize.random_head_restore(loaded, masks, 3, hsr.count, seed=5, cfg=cfg)
    other = localize.random_head_restore(loaded, masks, 3, hsr.count, seed=6, cfg=cfg)
    assert rs.count == hsr.count == sum(v.numel() for v in rs.indices.values())
    assert len(rs.heads) == 3 and len(set(rs.heads)) == 3
    assert {n: i.tolist() for n, i in rs.indices.items()} == {
        n: i.tolist() for n, i in again.indices.items()
    }
    assert {n: i.tolist() for n, i in rs.indices.items()} != {
        n: i.tolist() for n, i in other.indices.items()
    }
    pool = 0
    for name, mask in masks.items():
        layer, proj = a.parse(name)
        allowed: set[int] = set()
        if proj in ATTN_PROJS:
            for hl, h in rs.heads:
                if hl == layer:
                    allowed |= brute_block(a, proj, h, mask.shape)
        pruned = set(torch.nonzero(mask.unpack().reshape(-1)).squeeze(1).tolist())
        pool += len(allowed & pruned)
        got = set(rs.indices.get(name, torch.empty(0, dtype=torch.long)).tolist())
        assert got <= allowed & pruned, name
    assert rs.candidates == pool
    everything = localize.random_head_restore(loaded, masks, 3, 10**9, seed=5, cfg=cfg)
    assert everything.count == everything.candidates  # capped at what is pruned there


def test_ablated_dense_rung_equals_the_hooks_ablation(world) -> None:
    loaded, masks, _, hsr, _, v = world
    samples = [s for s in builtin_eval() if s.harmful][:2] + [Sample("Say hello.")]
    cfg = EvalConfig(max_new_tokens=5, batch_size=4)
    rungs = localize.plan(
        loaded, masks, SCORES, hsr, LocalizeConfig(top_k=2, rungs=("dense", "dense_ablated"))
    )
    assert [r.name for r in rungs] == ["dense", "dense_ablated"]
    assert list(rungs[1].ablate) == [Head(0, 0), Head(0, 1)]
    out = localize.run(
        v, rungs, samples, cfg, lambda s, a: judge_answers(s, a, cfg), should_stop=None
    )
    with v.use("original"), head_ablation(loaded.adapter, [(0, 0), (0, 1)]):
        expected = pipeline.generate(loaded, samples, cfg)
    with v.use("original"):
        plain = pipeline.generate(loaded, samples, cfg)
    assert [r["answer"] for r in out[1]["answers"]] == expected
    assert [r["answer"] for r in out[0]["answers"]] == plain
    assert count_hooks(loaded.model) == 0


def test_run_puts_the_session_state_back_also_after_a_stop(world) -> None:
    loaded, masks, _, hsr, _, v = world
    cfg = EvalConfig(max_new_tokens=3, batch_size=4)
    rungs = localize.plan(loaded, masks, SCORES, hsr, LocalizeConfig(top_k=2, seeds=2))
    assert [r.name for r in rungs] == [
        "dense",
        "dense_ablated",
        "pruned",
        "hsr",
        "random_heads",
        "random_heads",
        "top_heads",
        "attention",
        "mlp",
    ]
    calls = {"n": 0}

    def stop_after_a_few() -> bool:
        calls["n"] += 1
        return calls["n"] > 12

    with pytest.raises(pipeline.Cancelled):
        localize.run(
            v,
            rungs,
            [Sample("Hi")] * 2,
            cfg,
            lambda s, a: judge_answers(s, a, cfg),
            should_stop=stop_after_a_few,
        )
    assert v.masks is masks and v.restore is hsr and v.current == "original"


def test_pipeline_ladder_reports_each_rung(world) -> None:
    loaded, masks, _, hsr, _, v = world
    samples = [s for s in builtin_eval() if s.harmful][:2] + [
        s for s in builtin_eval() if not s.harmful
    ][:2]
    out = pipeline.localize(
        v, SCORES, hsr, samples, LocalizeConfig(seeds=2), EvalConfig(max_new_tokens=4)
    )
    by = {}
    for r in out["rungs"]:
        by.setdefault(r["name"], []).append(r)
    total = sum(m.count for m in masks.values())
    assert out["pruned_weights"] == total and out["n_prompts"] == 4
    assert by["dense"][0]["restored"] == total and by["pruned"][0]["restored"] == 0
    assert by["hsr"][0]["restored"] == hsr.count
    assert [r["restored"] for r in by["random_heads"]] == [hsr.count] * 2
    attention = sum(m.count for n, m in masks.items() if "self_attn" in n)
    assert by["attention"][0]["restored"] == attention
    assert by["mlp"][0]["restored"] == total - attention
    for r in out["rungs"]:
        assert r["n_harmful"] == 2 and r["n_benign"] == 2 and len(r["answers"]) == 4
        assert r["asr"] == sum(not a["refusal"] for a in r["answers"] if a["harmful"]) / 2


def test_localize_config_checks_itself() -> None:
    with pytest.raises(ConfigError, match="unknown rungs"):
        LocalizeConfig(rungs=("dense", "everything"))
    with pytest.raises(ConfigError, match="seeds"):
        LocalizeConfig(seeds=0)


def test_heads_plus_mlp_scope_is_set_algebra_over_whole_mlp_matrices(world) -> None:
    loaded, masks, _, _, ranks, _ = world
    a = loaded.adapter
    base = RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=3)
    heads_only = restore_set(loaded, masks, SCORES, base, ranks)
    both = restore_set(
        loaded,
        masks,
        SCORES,
        RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=3, scope="heads+mlp"),
        ranks,
    )
    layers = {h.layer for h in both.heads}
    mlp_total = 0
    for name, layer, proj, _ in a.iter_linears():
        got = set(both.indices.get(name, torch.empty(0, dtype=torch.long)).tolist())
        if proj in ATTN_PROJS:  # the attention part is the paper's set, unchanged
            assert got == set(heads_only.indices.get(name, torch.empty(0)).tolist())
            continue
        if layer not in layers:
            assert not got
            continue
        rank_s, rank_u = ranks.get(name)
        n = rank_s.numel()
        # T_q(S) & T_max_p(U) - T_p(U), over the whole matrix, intersected with the mask
        band = (rank_s < int(0.6 * n)) & (rank_u < int(0.9 * n)) & ~(rank_u < int(0.1 * n))
        expected = set(torch.nonzero((band & masks[name].unpack()).reshape(-1)).squeeze(1).tolist())
        assert got == expected and got, name
        assert both.mlp_per_layer[layer][proj] == len(expected)
        mlp_total += len(expected)
    assert both.count == heads_only.count + mlp_total
    assert sum(both.per_module[p] for p in a.mlp_projs) == mlp_total
    summary = both.summary()
    assert "our extension" in summary["restore_scope"]
    assert "restore_scope" not in heads_only.summary()
    with pytest.raises(ConfigError, match="restore scope"):
        RealignConfig(scope="everything")
