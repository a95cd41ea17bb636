"""HSR restore set against brute-force set algebra; variants switching bit-exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

from hsr_core.config import ConfigError, ModelSpec, RealignConfig, WandaConfig
from hsr_core.data import builtin_calibration, with_typographic_images
from hsr_core.heads import Head
from hsr_core.models import ATTN_PROJS, load_model
from hsr_core.realign import RankCache, head_rank_points, restore_set
from hsr_core.variants import VariantError, Variants
from hsr_core.wanda import prune_masks, wanda_norms, wanda_score


def setup(loaded, seed: int = 0):
    calib = builtin_calibration()
    cfg = WandaConfig(sparsity=0.5, batch_size=4)
    # images for a vision model, as the pipeline gives (Mllama's cross-attention needs one)
    images = with_typographic_images if loaded.is_vision else list
    safety = wanda_norms(loaded, images(calib.safety[:4]), cfg)
    utility = wanda_norms(loaded, images(calib.utility[:4]), cfg)
    masks = prune_masks(loaded, utility, cfg)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(loaded.adapter.num_layers, loaded.adapter.num_heads, generator=g)
    return safety, utility, masks, scores


def brute_top(score: torch.Tensor, fraction: float) -> set[int]:
    flat = score.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return set(order[: int(fraction * len(flat))])


def brute_slice(a, proj: str, head: int, shape, slicing: str) -> set[int]:
    out_f, in_f = shape
    d, g = a.head_dim, head // a.group_size
    idx = head if proj in ("q_proj", "o_proj") else g
    block = range(idx * d, (idx + 1) * d)
    if slicing == "head":
        cells = (
            [(i, j) for i in range(out_f) for j in block]
            if proj == "o_proj"
            else [(i, j) for i in block for j in range(in_f)]
        )
    elif proj == "o_proj":
        cells = list(itertools.product(range(out_f), range(in_f)))
    else:
        cells = [(i, j) for i in range(out_f) for j in block]
    return {i * in_f + j for i, j in cells}


def brute_restore(loaded, safety, utility, masks, heads, cfg) -> dict[str, set[int]]:
    a = loaded.adapter
    out: dict[str, set[int]] = {}
    for l in sorted({l for l, _ in heads}):
        for proj in ATTN_PROJS:
            name = a.linear_name(l, proj)
            w = loaded.model.get_submodule(name).weight
            S, U = wanda_score(w, safety[name]), wanda_score(w, utility[name])
            R = (brute_top(S, cfg.q) & brute_top(U, cfg.max_p)) - brute_top(U, cfg.p)
            pruned = set(torch.nonzero(masks[name].unpack().reshape(-1)).flatten().tolist())
            in_heads = set().union(
                *(
                    brute_slice(a, proj, h, tuple(w.shape), cfg.slicing)
                    for ll, h in heads
                    if ll == l
                )
            )
            got = R & in_heads & pruned
            if got:
                out[name] = got
    return out


@pytest.mark.parametrize("slicing", ["head", "reference"])
@pytest.mark.parametrize("pqm", [(0.5, 0.5, 0.7), (0.2, 0.8, 0.9), (0.0, 0.3, 1.0)])
def test_restore_set_equals_brute_force(any_tiny, slicing, pqm):
    loaded = any_tiny
    if loaded.is_vision and pqm != (0.5, 0.5, 0.7):
        pytest.skip("one setting is enough for the vision model")
    safety, utility, masks, scores = setup(loaded)
    p, q, max_p = pqm
    cfg = RealignConfig(p=p, q=q, max_p=max_p, top_h=3, slicing=slicing)
    rs = restore_set(loaded, masks, scores, cfg, RankCache(loaded, safety, utility))
    expected = brute_restore(loaded, safety, utility, masks, rs.heads, cfg)
    got = {n: set(v.tolist()) for n, v in rs.indices.items()}
    assert got == expected
    assert rs.count == sum(len(v) for v in expected.values())
    assert rs.pruned_total == sum(m.count for m in masks.values())
    assert rs.per_10k_pruned == pytest.approx(1e4 * rs.count / rs.pruned_total)


def test_restored_weights_lie_in_selected_heads_only(tiny_mha):
    loaded = tiny_mha
    a = loaded.adapter
    safety, utility, masks, scores = setup(loaded, seed=3)
    cfg = RealignConfig(p=0.1, q=0.9, max_p=1.0, top_h=2)
    rs = restore_set(loaded, masks, scores, cfg, RankCache(loaded, safety, utility))
    assert rs.count > 0
    heads = rs.heads
    for name, idx in rs.indices.items():
        layer, proj = a.parse(name)
        assert proj in ATTN_PROJS  # never an MLP weight
        allowed = set().union(
            *(
                brute_slice(a, proj, h, tuple(masks[name].shape), "head")
                for l, h in heads
                if l == layer
            )
        )
        assert set(idx.tolist()) <= allowed
        assert masks[name].unpack().reshape(-1)[idx].all()  # only pruned weights come back
    assert set(rs.per_head) == {Head(l, h) for l, h in heads}
    assert sum(rs.per_module.values()) == rs.count


def test_head_rank_points(tiny_llama):
    safety, utility, masks, scores = setup(tiny_llama)
    cfg = RealignConfig(top_h=2)
    ranks = RankCache(tiny_llama, safety, utility)
    rs = restore_set(tiny_llama, masks, scores, cfg, ranks)
    head = rs.heads[0]
    pts = head_rank_points(tiny_llama, masks, ranks, head, cfg)
    a = tiny_llama.adapter
    per_head = a.head_dim * a.hidden_size * 4
    assert pts["total"] == per_head and pts["proj"].shape == (per_head,)
    assert pts["proj"].unique().tolist() == [0, 1, 2, 3]
    assert int(pts["restored"].sum()) == rs.restored_in(head) == sum(rs.per_head[head].values())
    assert ((pts["safety"] >= 0) & (pts["safety"] < 1)).all()
    small = head_rank_points(tiny_llama, masks, ranks, head, cfg, max_points=100)
    assert small["safety"].numel() == 100


def test_realign_configs_explain_themselves(tiny_llama):
    with pytest.raises(ConfigError, match="max_p"):
        RealignConfig(p=0.8, max_p=0.7)
    with pytest.raises(ConfigError, match="fraction"):
        RealignConfig(q=50)
    with pytest.raises(ConfigError, match="exceeds the model's 8 attention heads"):
        RealignConfig(top_h=9).check_heads(2, 4)


# --- variants --------------------------------------------------------------------------------


def weights(loaded) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variants_round_trip_bit_exactly(tiny_llama, cache_root, tmp_path, dtype):
    if dtype == torch.float32:
        loaded = tiny_llama
    else:
        loaded = load_model(ModelSpec("builtin:tiny-llama", dtype="bfloat16"), cache_dir=cache_root)
        assert loaded.model.dtype == dtype
    safety, utility, masks, scores = setup(loaded)
    dense = weights(loaded)
    v = Variants(loaded, scratch=tmp_path)
    v.set_masks(masks)
    rs = restore_set(
        loaded,
        masks,
        scores,
        RealignConfig(p=0.2, q=0.8, max_p=0.9, top_h=3),
        RankCache(loaded, safety, utility, v.dense_weight),
    )
    v.set_restore(rs)
    assert rs.count > 0
    seen = {}
    for order in (
        ["pruned", "realigned", "original"],
        ["realigned", "pruned", "realigned", "original"],
    ):
        for name in order:
            v.switch(name)
            seen[name] = weights(loaded)
    assert same(seen["original"], dense)
    for name, _, _, _mod in loaded.adapter.iter_linears():
        key = name + ".weight"
        mask = masks[name].unpack()
        pruned, realigned = seen["pruned"][key], seen["realigned"][key]
        assert (pruned[mask] == 0).all() and torch.equal(pruned[~mask], dense[key][~mask])
        # pruned and realigned share the mask except for the restored set
        diff = torch.nonzero((pruned != realigned).reshape(-1)).flatten()
        restored = rs.indices.get(name, torch.empty(0, dtype=torch.long))
        assert set(diff.tolist()) <= set(restored.tolist())
        assert torch.equal(realigned.reshape(-1)[restored], dense[key].reshape(-1)[restored])
    other = {k: v for k, v in dense.items() if ".layers." not in k or "norm" in k}
    assert all(
        torch.equal(seen["pruned"][k], other[k]) for k in other
    )  # embeddings, norms, head untouched
    v.close()
    assert not any(tmp_path.iterdir())  # scratch file removed


def test_variants_own_their_weights_once_pruning_starts(tiny_llama, tmp_path):
    """The first switch must not write into the loaded file's memory map page by page: the
    linears get weights of their own when the dense store is made (same values)."""
    _, _, masks, _ = setup(tiny_llama)
    linears = {n: m.weight for n, _, _, m in tiny_llama.adapter.iter_linears()}
    before = {n: (w.data_ptr(), w.detach().clone()) for n, w in linears.items()}
    assert not any(w.untyped_storage().resizable() for w in linears.values())  # memory-mapped
    v = Variants(tiny_llama, scratch=tmp_path)
    v.set_masks(masks)
    for n, w in linears.items():
        ptr, value = before[n]
        assert w.data_ptr() != ptr and torch.equal(w.detach(), value), n
        assert w.untyped_storage().resizable()
        assert w is dict(tiny_llama.model.named_parameters())[n + ".weight"]  # same Parameter
    v.close()
    # weights that already have memory of their own are left where they are
    owned = {n: w.data_ptr() for n, w in linears.items()}
    v = Variants(tiny_llama, scratch=tmp_path)
    v.set_masks(masks)
    assert {n: w.data_ptr() for n, w in linears.items()} == owned
    v.close()


def test_variants_restore_after_exception(tiny_llama, tmp_path):
    loaded = tiny_llama
    _, _, masks, _ = setup(loaded)
    dense = weights(loaded)
    v = Variants(loaded, scratch=tmp_path)
    v.set_masks(masks)
    with pytest.raises(RuntimeError, match="inside"), v.use("pruned"):
        assert not same(weights(loaded), dense)
        raise RuntimeError("error inside")
    assert v.current == "original" and same(weights(loaded), dense)
    v.switch("pruned")
    with v.use("original"):
        assert same(weights(loaded), dense)
    assert v.current == "pruned"
    v.close()
    assert same(weights(loaded), dense)


def test_variant_errors(tiny_llama, tmp_path):
    v = Variants(tiny_llama, scratch=tmp_path)
    with pytest.raises(VariantError, match="prune"):
        v.switch("pruned")
    with pytest.raises(VariantError, match="prune"):
        v.set_restore(object())  # type: ignore[arg-type]
    _, _, masks, _ = setup(tiny_llama)
    v.set_masks(masks)
    with pytest.raises(VariantError, match="realign"):
        v.switch("realigned")
    assert v.available() == ["original", "pruned"]
    v.close()


def test_new_masks_while_pruned(tiny_llama, tmp_path):
    loaded = tiny_llama
    safety, utility, masks, _ = setup(loaded)
    dense = weights(loaded)
    v = Variants(loaded, scratch=tmp_path)
    v.set_masks(masks)
    v.switch("pruned")
    with v.use("original"):
        other = prune_masks(loaded, safety, WandaConfig(sparsity=0.3))
    v.set_masks(other)
    assert v.current == "pruned"
    for name, _, _, mod in loaded.adapter.iter_linears():
        m = other[name].unpack()
        assert (mod.weight[m] == 0).all() and torch.equal(
            mod.weight[~m], dense[name + ".weight"][~m]
        )
    v.close()
    assert same(weights(loaded), dense)
