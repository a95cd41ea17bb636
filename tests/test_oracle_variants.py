"""Every variant transition against weights computed independently (issue 18).

Expected weights come from the dense weights saved before ``Variants`` exists, the unpacked
masks and the restore indices only:

    original  = dense
    pruned    = dense with the masked entries set to 0
    realigned = pruned with the restore indices set back to their dense values

Every switch is checked against these on every decoder linear, and the rest of the model
(embeddings, norms, LM head) must never change.
"""

from __future__ import annotations

import pytest
import torch

from hsr_core.config import RealignConfig, WandaConfig
from hsr_core.realign import RankCache, restore_set
from hsr_core.variants import Variants
from hsr_core.wanda import prune_masks

SCORES = [[0.9, 0.8, 0.1, 0.3], [0.2, 0.5, 0.7, 0.05]]


def synthetic_norms(loaded, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(mod.weight.shape[1], generator=g) + 0.05
        for name, _, _, mod in loaded.adapter.iter_linears()
    }


class World:
    """Dense weights, two masks and three restore sets, all made on the dense model."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.linears = {n: m for n, _, _, m in loaded.adapter.iter_linears()}
        self.dense = {n: m.weight.detach().clone() for n, m in self.linears.items()}
        self.others = {
            k: t.detach().clone()
            for k, t in loaded.model.state_dict().items()
            if k.removesuffix(".weight") not in self.linears
        }
        safety, utility = synthetic_norms(loaded, 1), synthetic_norms(loaded, 2)
        scores = torch.tensor(SCORES)
        ranks = RankCache(loaded, safety, utility)
        self.masks = prune_masks(loaded, utility, WandaConfig(sparsity=0.5))
        self.masks2 = prune_masks(loaded, safety, WandaConfig(sparsity=0.3))
        self.rs1 = restore_set(
            loaded, self.masks, scores, RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=3), ranks
        )
        self.rs2 = restore_set(
            loaded,
            self.masks,
            scores,
            RealignConfig(p=0.0, q=0.5, max_p=0.7, top_h=2),
            ranks,
            heads=[(1, 3), (0, 2)],
        )
        ranks2 = RankCache(loaded, safety, utility)
        self.rs3 = restore_set(
            loaded, self.masks2, scores, RealignConfig(p=0.1, q=0.6, max_p=0.9, top_h=4), ranks2
        )
        for rs in (self.rs1, self.rs2, self.rs3):
            assert rs.count > 0
        # the two restore sets of the first mask differ both ways
        one = {(n, i) for n, v in self.rs1.indices.items() for i in v.tolist()}
        two = {(n, i) for n, v in self.rs2.indices.items() for i in v.tolist()}
        assert one - two and two - one

    def expected(self, variant: str, masks=None, rs=None) -> dict[str, torch.Tensor]:
        if variant == "original":
            return self.dense
        out = {}
        for name, w in self.dense.items():
            pruned = w.clone()
            pruned[masks[name].unpack()] = 0
            if variant == "realigned" and name in rs.indices:
                flat = pruned.view(-1)
                for i in rs.indices[name].tolist():
                    flat[i] = w.view(-1)[i]
            out[name] = pruned
        return out

    def check(self, v: Variants, variant: str, masks=None, rs=None) -> None:
        assert v.current == variant
        want = self.expected(variant, masks, rs)
        for name, mod in self.linears.items():
            assert torch.equal(mod.weight.detach(), want[name]), (variant, name)
            assert torch.equal(v.dense_weight(name), self.dense[name]), (variant, name)
        for k, t in self.loaded.model.state_dict().items():
            if k in self.others:
                assert torch.equal(t, self.others[k]), (variant, k)


@pytest.fixture
def world(tiny_llama):
    return World(tiny_llama)


def test_every_transition_equals_independent_weights(world, tmp_path):
    """Catches: masked weights not zeroed (or the keep mask inverted) on original -> pruned,
    restored weights not written back on pruned -> realigned or original -> realigned,
    restored weights left in place on realigned -> pruned, the dense copy not fully written
    back on realigned/pruned -> original, and ``dense_weight`` returning the current weight."""
    run_every_transition(world, tmp_path)


def run_every_transition(w: World, tmp_path) -> None:
    """Every switch between the three variants, checked against ``w.expected`` (also run on
    every architecture by test_core_archs)."""
    v = Variants(w.loaded, scratch=tmp_path)
    v.set_masks(w.masks)
    w.check(v, "original")
    v.set_restore(w.rs1)
    w.check(v, "original")
    steps = [
        "pruned",  # original -> pruned
        "realigned",  # pruned -> realigned
        "pruned",  # realigned -> pruned
        "original",  # pruned -> original
        "realigned",  # original -> realigned
        "original",  # realigned -> original
        "realigned",
        "realigned",  # a no-op
        "pruned",
        "pruned",
        "realigned",
    ]
    for step in steps:
        v.switch(step)
        w.check(v, step, w.masks, w.rs1)
    v.close()
    w.check(v, "original")


def test_new_restore_set_while_realigned(world, tmp_path):
    """Catches a new restore set installed while realigned that keeps the old set's weights
    (not zeroed first), does not write the new ones, or leaves the model pruned; and then
    realigned -> pruned zeroing only the new set's weights."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path)
    v.set_masks(w.masks)
    v.set_restore(w.rs1)
    v.switch("realigned")
    w.check(v, "realigned", w.masks, w.rs1)
    v.set_restore(w.rs2)
    w.check(v, "realigned", w.masks, w.rs2)
    v.switch("pruned")
    w.check(v, "pruned", w.masks, w.rs2)
    v.switch("realigned")
    w.check(v, "realigned", w.masks, w.rs2)
    v.switch("original")
    w.check(v, "original")
    # a new set while pruned or original: the active variant stays, the new set is used later
    v.switch("pruned")
    v.set_restore(w.rs1)
    w.check(v, "pruned", w.masks, w.rs1)
    v.switch("realigned")
    w.check(v, "realigned", w.masks, w.rs1)
    v.switch("original")
    v.set_restore(w.rs2)
    w.check(v, "original")
    v.switch("realigned")
    w.check(v, "realigned", w.masks, w.rs2)
    v.close()
    w.check(v, "original")


def test_new_masks_while_pruned_or_realigned(world, tmp_path):
    """Catches new masks installed while pruned that keep the old mask's zeros or do not
    apply the new mask, and new masks while realigned that keep restored weights (the restore
    set belongs to the old mask and must be dropped: the model is then pruned)."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path)
    v.set_masks(w.masks)
    v.switch("pruned")
    w.check(v, "pruned", w.masks)
    v.set_masks(w.masks2)
    w.check(v, "pruned", w.masks2)
    v.set_restore(w.rs3)
    v.switch("realigned")
    w.check(v, "realigned", w.masks2, w.rs3)
    v.set_masks(w.masks)  # while realigned: the restore set is dropped
    assert v.restore is None
    w.check(v, "pruned", w.masks)
    v.switch("original")
    w.check(v, "original")
    v.set_masks(w.masks2)  # while original: stays original
    w.check(v, "original")
    v.switch("pruned")
    w.check(v, "pruned", w.masks2)
    v.close()
    w.check(v, "original")


@pytest.mark.parametrize(
    ("start", "inside"),
    [
        ("original", "pruned"),
        ("original", "realigned"),
        ("pruned", "realigned"),
        ("pruned", "original"),
        ("realigned", "pruned"),
        ("realigned", "original"),
    ],
)
def test_use_switches_back_after_an_exception(world, tmp_path, start, inside):
    """Catches ``use()`` that does not switch back when its body raises (no ``finally``), or
    switches back to the wrong variant."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path)
    v.set_masks(w.masks)
    v.set_restore(w.rs1)
    v.switch(start)
    with pytest.raises(KeyError, match="inside the body"), v.use(inside) as loaded:
        assert loaded is w.loaded
        w.check(v, inside, w.masks, w.rs1)
        raise KeyError("inside the body")
    w.check(v, start, w.masks, w.rs1)
    # and without an exception, nested
    with v.use(inside):
        with v.use(start):
            w.check(v, start, w.masks, w.rs1)
        w.check(v, inside, w.masks, w.rs1)
    w.check(v, start, w.masks, w.rs1)
    v.close()
    w.check(v, "original")
