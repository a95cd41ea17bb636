"""The pruners behind one call, and the variants with a pruner's updated weights (issue 15).

Expected weights are computed independently from the dense weights saved before ``Variants``
exists, the unpacked masks, the updated values and the restore indices:

    pruned    = updated values (0 where the pruner's mask prunes); where the installed mask
                keeps a weight the pruner pruned, the dense value; 0 where it prunes
    realigned = pruned with the restore indices set back to their dense values
"""

from __future__ import annotations

import pytest
import torch

from hsr_core import variants as variants_mod
from hsr_core.config import ConfigError, RealignConfig, WandaConfig
from hsr_core.masks import PackedMask
from hsr_core.pruners import Pruning, prune_model
from hsr_core.realign import RankCache, restore_set
from hsr_core.variants import UpdatedWeights, Variants, WeightStore
from hsr_core.wanda import compute_masks, prune_masks

SCORES = [[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]]


def norms_of(loaded, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(m.weight.shape[1], generator=g) + 0.05
        for n, _, _, m in loaded.adapter.iter_linears()
    }


class World:
    """Dense weights, a pruner's masks with updated values (a random change of every kept
    weight, as SparseGPT's update changes them), a restore set, and a rung's masks that put
    one whole linear back."""

    def __init__(self, loaded, tmp_path):
        self.loaded = loaded
        self.linears = {n: m for n, _, _, m in loaded.adapter.iter_linears()}
        self.dense = {n: m.weight.detach().clone() for n, m in self.linears.items()}
        safety, utility = norms_of(loaded, 1), norms_of(loaded, 2)
        self.masks = prune_masks(loaded, utility, WandaConfig(sparsity=0.5))
        store = WeightStore(loaded, tmp_path / "upd", copy=False)
        g = torch.Generator().manual_seed(3)
        for n, w in self.dense.items():
            change = torch.randn(w.shape, generator=g).to(w.dtype) * 0.01
            store.tensors[n].copy_((w + change).masked_fill(self.masks[n].unpack(), 0))
        self.values = {n: t.clone() for n, t in store.tensors.items()}
        self.updated = UpdatedWeights(store, self.masks)
        self.rs = restore_set(
            loaded,
            self.masks,
            torch.tensor(SCORES),
            RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=3),
            RankCache(loaded, safety, utility),
        )
        assert self.rs.count > 0
        first = next(iter(self.masks))
        self.back = first
        empty = torch.zeros(self.masks[first].shape, dtype=torch.bool)
        self.rung = dict(self.masks) | {first: PackedMask.pack(empty)}

    def expected(self, variant: str, masks) -> dict[str, torch.Tensor]:
        if variant == "original":
            return self.dense
        out = {}
        for n, d in self.dense.items():
            mine, theirs = masks[n].unpack(), self.masks[n].unpack()
            w = self.values[n].clone()
            w[theirs & ~mine] = d[theirs & ~mine]
            w[mine] = 0
            if variant == "realigned" and n in self.rs.indices:
                idx = self.rs.indices[n]
                w.view(-1)[idx] = d.view(-1)[idx]
            out[n] = w
        return out

    def check(self, v: Variants, variant: str, masks=None) -> None:
        assert v.current == variant
        want = self.expected(variant, masks if masks is not None else self.masks)
        for n, m in self.linears.items():
            assert torch.equal(m.weight.detach(), want[n]), (variant, n)
            assert torch.equal(v.dense_weight(n), self.dense[n]), (variant, n)


@pytest.fixture
def world(tiny_llama, tmp_path):
    return World(tiny_llama, tmp_path)


STEPS = ["pruned", "realigned", "pruned", "original", "realigned", "original", "pruned"]


def test_updated_weights_round_trip_bit_exactly(world, tmp_path):
    """Catches the pruned variant zeroing the dense weights instead of taking the updated ones,
    restored weights taking the updated value instead of the dense one, and a switch back to
    the original leaving updated values behind."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")
    v.install(w.masks, w.rs, w.updated)
    for step in STEPS:
        v.switch(step)
        w.check(v, step)
    # the updated weights differ from plain zeroing: the check above is not vacuous
    plain = w.dense[w.back].masked_fill(w.masks[w.back].unpack(), 0)
    v.switch("pruned")
    assert not torch.equal(w.linears[w.back].weight.detach(), plain)
    v.close()
    w.check(v, "original")


def test_a_rung_that_puts_a_linear_back_takes_dense_values(world, tmp_path):
    """A localization rung's masks keep a whole linear the pruner pruned: those weights come
    back at their dense value, the kept ones keep the update (docs/METHOD.md)."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")
    v.install(w.rung, None, w.updated)
    v.switch("pruned")
    w.check(v, "pruned", w.rung)
    v.install(w.masks, w.rs, w.updated)
    w.check(v, "pruned")
    v.switch("realigned")
    w.check(v, "realigned")
    v.install(w.masks, w.rs, None)  # the same masks without the update: plain zeroing
    assert v.current == "realigned"
    for n, m in w.linears.items():
        d = w.dense[n].masked_fill(w.masks[n].unpack(), 0)
        if n in w.rs.indices:
            d.view(-1)[w.rs.indices[n]] = w.dense[n].view(-1)[w.rs.indices[n]]
        assert torch.equal(m.weight.detach(), d), n
    v.close()


def fail_once(mp, owner, attr: str, at: int) -> None:
    """Make ``owner.attr`` raise MemoryError on its ``at``-th call, once; every other call
    (before, and after, as the recovery makes them) does what it did."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise MemoryError(f"out of memory in call {at} of {attr}")
        return real(*args, **kwargs)

    mp.setattr(owner, attr, wrapped)


# (start, target, what fails): the weight writes each switch makes
FAILURES = [
    ("original", "pruned", "mask"),  # the third linear's mask (or updated copy)
    ("pruned", "original", "copy"),  # the third linear's dense copy
    ("original", "realigned", "setitem"),  # writing the restored weights back
    ("realigned", "pruned", "setitem"),  # zeroing the restored weights again
]


@pytest.mark.parametrize("with_update", [True, False])
@pytest.mark.parametrize(("start", "target", "what"), FAILURES)
def test_a_switch_that_fails_part_way_leaves_the_previous_variant(
    world, tmp_path, monkeypatch, with_update, start, target, what
):
    """Catches a switch that raises half-way and leaves some linears switched and others not
    (and ``current`` naming a variant the weights are not)."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")
    v.install(w.masks, w.rs, w.updated if with_update else None)
    v.switch(start)
    before = {n: m.weight.detach().clone() for n, m in w.linears.items()}
    with monkeypatch.context() as mp:
        if what == "copy" or (what == "mask" and with_update):
            fail_once(mp, torch.Tensor, "copy_", 3)
        elif what == "mask":
            fail_once(mp, variants_mod, "apply_mask", 3)
        else:
            fail_once(mp, torch.Tensor, "__setitem__", 1)
        with pytest.raises(MemoryError):
            v.switch(target)
    assert v.current == start
    for n, m in w.linears.items():
        assert torch.equal(m.weight.detach(), before[n]), (start, target, n)
    if with_update:
        w.check(v, start)
    v.switch(target)  # and the next switch works
    if with_update:
        w.check(v, target)
    v.close()


def test_magnitude_masks_are_the_lowest_weights_by_a_sort(tiny_llama):
    """Magnitude through the dispatcher against a stable sort of |W| per row."""
    cfg = WandaConfig(sparsity=0.4, pruner="magnitude")
    got = prune_model(tiny_llama, {}, [], cfg)
    assert isinstance(got, Pruning) and got.updated is None and got.pruner == "magnitude"
    for n, _, _, m in tiny_llama.adapter.iter_linears():
        w = m.weight.detach().abs().float()
        k = int(w.shape[1] * 0.4)
        order = torch.sort(w, dim=1, stable=True).indices[:, :k]
        want = torch.zeros_like(w, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(got.masks[n].unpack(), want), n


def test_wanda_through_the_dispatcher_equals_compute_masks(tiny_llama):
    utility = norms_of(tiny_llama, 2)
    cfg = WandaConfig(sparsity=0.5)
    got = prune_model(tiny_llama, utility, [], cfg)
    want = compute_masks(tiny_llama, utility, [], cfg)
    assert got.updated is None and got.pruner == "wanda"
    for n in want:
        assert torch.equal(got.masks[n].unpack(), want[n].unpack())


def test_pruner_modes_are_checked():
    assert WandaConfig(pruner="sparsegpt").mode == "sequential"
    assert WandaConfig().mode == "one-shot"
    assert WandaConfig(pruner="wanda", mode="sequential").mode == "sequential"
    assert WandaConfig(pruner="snip").mode == "sequential"
    assert WandaConfig(pruner="snip", mode="one-shot").mode == "one-shot"
    with pytest.raises(ConfigError, match="magnitude has no sequential mode"):
        WandaConfig(pruner="magnitude", mode="sequential")
    with pytest.raises(ConfigError, match="sparsegpt has no one-shot mode"):
        WandaConfig(pruner="sparsegpt", mode="one-shot")
    with pytest.raises(ConfigError, match="unknown pruner 'sparse'"):
        WandaConfig(pruner="sparse")


def test_the_restore_set_ranks_by_given_scores(tiny_llama):
    """``RankCache(scores=...)`` ranks by those scores (SNIP's, for ``ranking="snip"``): the
    restore set equals the one ranked by Wanda scores made from other norms that give the same
    matrices, and differs from the one ranked by the cache's own norms."""
    from hsr_core.wanda import wanda_score

    loaded = tiny_llama
    a = loaded.adapter
    safety, utility = norms_of(loaded, 1), norms_of(loaded, 2)
    other_s, other_u = norms_of(loaded, 5), norms_of(loaded, 6)
    masks = prune_masks(loaded, utility, WandaConfig(sparsity=0.5))
    scores = {
        n: (wanda_score(m.weight, other_s[n]), wanda_score(m.weight, other_u[n]))
        for n, _, _, m in a.iter_linears(attention_only=True)
    }
    cfg = RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=3)
    heads = torch.tensor(SCORES)
    given = restore_set(
        loaded, masks, heads, cfg, RankCache(loaded, safety, utility, scores=scores)
    )
    same = restore_set(loaded, masks, heads, cfg, RankCache(loaded, other_s, other_u))
    own = restore_set(loaded, masks, heads, cfg, RankCache(loaded, safety, utility))
    as_sets = lambda rs: {n: set(v.tolist()) for n, v in rs.indices.items()}  # noqa: E731
    assert as_sets(given) == as_sets(same) and given.count > 0
    assert as_sets(given) != as_sets(own)


def test_snip_ranking_scores_are_snip_scores(tiny_llama):
    from hsr_core.data import builtin_calibration
    from hsr_core.pipeline import calibration_samples, ranking_scores
    from hsr_core.snip import snip_scores

    cfg = WandaConfig(num_samples=3)
    safety, utility = calibration_samples(tiny_llama, builtin_calibration(), cfg)
    assert ranking_scores(tiny_llama, safety, utility, RealignConfig(top_h=2), cfg) is None
    got = ranking_scores(tiny_llama, safety, utility, RealignConfig(top_h=2, ranking="snip"), cfg)
    names = tiny_llama.adapter.linear_names(attention_only=True)
    assert sorted(got) == sorted(names)
    s, u = snip_scores(tiny_llama, safety, cfg), snip_scores(tiny_llama, utility, cfg)
    for n in names:
        assert torch.allclose(got[n][0], s[n]) and torch.allclose(got[n][1], u[n])
        assert not torch.allclose(got[n][0], got[n][1])
    with pytest.raises(ConfigError, match="unknown ranking 'snp'"):
        RealignConfig(ranking="snp")


def test_sparsegpt_through_the_dispatcher_round_trips(tiny_llama, tmp_path):
    """Real SparseGPT weights: the pruned variant is SparseGPT's output (not the dense weights
    zeroed), realigned puts the restored ones back at their dense value, and the original
    comes back bit for bit; closing the pruning deletes its scratch file."""
    from hsr_core.data import builtin_calibration
    from hsr_core.pipeline import calibration_samples

    loaded = tiny_llama
    cfg = WandaConfig(sparsity=0.5, num_samples=4, pruner="sparsegpt")
    _, utility = calibration_samples(loaded, builtin_calibration(), cfg)
    linears = {n: m for n, _, _, m in loaded.adapter.iter_linears()}
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    pruning = prune_model(loaded, {}, utility, cfg, scratch=tmp_path / "s")
    assert pruning.pruner == "sparsegpt" and pruning.updated is not None
    values = {n: t.clone() for n, t in pruning.updated.store.tensors.items()}
    for n, m in linears.items():
        assert torch.equal(m.weight.detach(), dense[n])  # dense on return
    safety, util = norms_of(loaded, 1), norms_of(loaded, 2)
    rs = restore_set(
        loaded,
        pruning.masks,
        torch.tensor(SCORES),
        RealignConfig(p=0.0, q=0.8, max_p=1.0, top_h=3),
        RankCache(loaded, safety, util),
    )
    assert rs.count > 0
    v = Variants(loaded, scratch=tmp_path / "v")
    v.install(pruning.masks, rs, pruning.updated)
    for step in STEPS:
        v.switch(step)
        for n, m in linears.items():
            want = dense[n] if step == "original" else values[n].clone()
            if step == "realigned" and n in rs.indices:
                want.view(-1)[rs.indices[n]] = dense[n].view(-1)[rs.indices[n]]
            assert torch.equal(m.weight.detach(), want), (step, n)
    changed = any(
        not torch.equal(values[n], dense[n].masked_fill(pruning.masks[n].unpack(), 0))
        for n in dense
    )
    assert changed  # SparseGPT did update kept weights
    v.close()
    folder = pruning.updated.store.folder
    assert folder.exists()
    pruning.close()
    assert not folder.exists()
