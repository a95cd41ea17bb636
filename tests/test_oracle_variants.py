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

import gc
import os
import shutil
import subprocess
import sys

import pytest
import torch

# imported at collection, so that the fork server of a mutation run (scripts/mutation.sh)
# holds it: each mutant's tests then skip transformers' lazy import of the Llama classes
# (several seconds a mutant on the loaded machine)
import transformers.models.llama.modeling_llama  # noqa: F401

from hsr_core import variants
from hsr_core.config import RealignConfig, WandaConfig
from hsr_core.realign import RankCache, RestoreSet, restore_set
from hsr_core.variants import UpdatedWeights, VariantError, Variants, WeightStore
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


# --- install, SparseGPT's updated weights, failed switches, the scratch store (issue 18) -----


def updated_weights(w: World, root, masks) -> tuple[UpdatedWeights, dict[str, torch.Tensor]]:
    """A pruner's values: every dense weight changed a little, 0 where ``masks`` prune."""
    store = WeightStore(w.loaded, root, copy=False)
    g = torch.Generator().manual_seed(3)
    for n, d in w.dense.items():
        change = torch.randn(d.shape, generator=g).to(d.dtype) * 0.01
        store.tensors[n].copy_((d + change).masked_fill(masks[n].unpack(), 0))
    return UpdatedWeights(store, masks), {n: t.clone() for n, t in store.tensors.items()}


def expected_updated(w: World, values, mine, theirs, rs=None) -> dict[str, torch.Tensor]:
    """Written element by element: pruned by ``mine`` -> 0; kept by ``mine`` but pruned by
    ``theirs`` -> dense; else the pruner's value; restored -> dense."""
    out = {}
    for n, d in w.dense.items():
        a, b = mine[n].unpack().reshape(-1).tolist(), theirs[n].unpack().reshape(-1).tolist()
        dv, uv = d.reshape(-1).tolist(), values[n].reshape(-1).tolist()
        flat = [0.0 if a[i] else dv[i] if b[i] else uv[i] for i in range(len(a))]
        if rs is not None and n in rs.indices:
            for i in rs.indices[n].tolist():
                flat[i] = dv[i]
        out[n] = torch.tensor(flat, dtype=d.dtype).view(d.shape)
    return out


def check_weights(w: World, want: dict[str, torch.Tensor]) -> None:
    for n, mod in w.linears.items():
        assert torch.equal(mod.weight.detach(), want[n]), n


def test_switch_refuses_what_does_not_exist_yet(world, tmp_path):
    """Catches ``switch`` letting an unknown variant, a pruned model without masks or a
    realigned one without a restore set through (or failing some other way than its own
    error, with its own message), or changing a weight when it refuses."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")
    with pytest.raises(ValueError, match=r"^unknown variant 'dense'; choose from \("):
        v.switch("dense")
    with pytest.raises(VariantError, match=r"^no pruned model yet: run the prune step first$"):
        v.switch("pruned")
    with pytest.raises(VariantError, match=r"^no realigned model yet: run the prune step first$"):
        v.switch("realigned")
    v.switch("original")  # already active: nothing to do
    w.check(v, "original")
    v.install(w.masks)
    with pytest.raises(VariantError, match=r"^no realigned model yet: run the realign step first$"):
        v.switch("realigned")
    w.check(v, "original")
    v.switch("pruned")
    with pytest.raises(VariantError, match=r"^no realigned model yet: run the realign step first$"):
        v.switch("realigned")
    w.check(v, "pruned", w.masks)
    v.close()


def test_install_keeps_what_is_installed_and_falls_back(world, tmp_path, monkeypatch):
    """Catches ``install`` accepting a restore set or updated weights without masks, not
    keeping the objects already installed (compared by identity), not putting a new restore
    set in while realigned, not falling back to pruned (new masks) or original (no masks),
    and ``available`` listing a variant that does not exist yet."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")
    assert v.available() == ["original"]
    upd, _ = updated_weights(w, tmp_path / "u", w.masks)
    with pytest.raises(VariantError, match=r"^prune first: a restore set needs the pruning masks$"):
        v.install(None, w.rs1)
    with pytest.raises(
        VariantError, match=r"^prune first: updated weights need the pruning masks$"
    ):
        v.install(None, None, upd)
    with pytest.raises(VariantError, match=r"^prune first: a restore set needs the pruning masks$"):
        v.set_restore(w.rs1)
    assert (v.masks, v.restore, v.updated, v.current) == (None, None, None, "original")
    v.set_masks(None, upd)  # updated weights without masks are not kept
    assert v.updated is None
    v.install(w.masks)
    assert v.available() == ["original", "pruned"]
    w.check(v, "original")
    v.install(w.masks, w.rs1)
    assert v.available() == ["original", "pruned", "realigned"]
    v.switch("realigned")

    def boom(*args, **kwargs):
        raise AssertionError("installed again")

    with monkeypatch.context() as m:  # the same objects again: nothing is redone
        m.setattr(v, "set_masks", boom)
        m.setattr(v, "set_restore", boom)
        v.install(w.masks, w.rs1)
    w.check(v, "realigned", w.masks, w.rs1)
    v.install(w.masks, w.rs2)  # a new restore set while realigned: realigned with it
    w.check(v, "realigned", w.masks, w.rs2)
    v.install(w.masks2)  # new masks, no restore set: pruned with them
    assert v.restore is None and v.available() == ["original", "pruned"]
    w.check(v, "pruned", w.masks2)
    v.install(w.masks2, w.rs3)  # while pruned: stays pruned
    w.check(v, "pruned", w.masks2, w.rs3)
    v.switch("realigned")
    v.install(w.masks, w.rs1)  # new masks and restore set while realigned: realigned again
    w.check(v, "realigned", w.masks, w.rs1)
    v.install(w.masks, w.rs1, upd)  # the same masks with updated weights: redone with them
    assert v.updated is upd
    check_weights(w, expected_updated(w, upd.store.tensors, w.masks, w.masks, w.rs1))
    v.install(None)  # no masks: original
    assert (v.masks, v.restore, v.updated) == (None, None, None)
    assert v.available() == ["original"]
    w.check(v, "original")
    v.close()
    upd.close()


def test_updated_weights_against_element_by_element(world, tmp_path):
    """Catches the pruner's values not copied in, a weight the installed mask keeps but the
    pruner pruned not taking its dense value (or taking it where the installed mask prunes),
    and the installed mask not applied over the pruner's values."""
    w = world
    upd, values = updated_weights(w, tmp_path / "u", w.masks)
    v = Variants(w.loaded, scratch=tmp_path / "v")
    v.install(w.masks, w.rs1, upd)  # the pruner's own masks: its values
    v.switch("pruned")
    check_weights(w, {n: values[n] for n in w.dense})
    v.switch("realigned")
    check_weights(w, expected_updated(w, values, w.masks, w.masks, w.rs1))
    v.install(w.masks2, None, upd)  # other masks (30%, another order) over the 50% values
    mine, theirs = w.masks2, w.masks
    name = next(iter(w.dense))
    a, b = mine[name].unpack(), theirs[name].unpack()
    assert (b & ~a).any() and (a & ~b).any() and (~a & ~b).any()  # every case occurs
    assert v.current == "pruned"
    check_weights(w, expected_updated(w, values, mine, theirs))
    v.switch("original")
    w.check(v, "original")
    v.switch("pruned")
    check_weights(w, expected_updated(w, values, mine, theirs))
    v.close()
    upd.close()


def bad_restore(w: World) -> RestoreSet:
    """The first linear's restore indices, then one past the end of the second linear: the
    switch to realigned writes some weights, then fails."""
    first, second = list(w.dense)[:2]
    rs = w.rs1
    indices = {first: rs.indices.get(first, torch.tensor([0, 5, 7]))}
    indices[second] = torch.tensor([w.dense[second].numel()])
    return RestoreSet(indices, rs.heads, rs.per_head, 4, rs.pruned_total, 4, rs.config)


@pytest.mark.parametrize("start", ["original", "pruned"])
def test_a_switch_that_fails_part_way_puts_the_previous_variant_back(world, tmp_path, start):
    """Catches a failed switch that leaves the model between two variants, or records the
    wrong current variant: the weights and ``current`` are those of ``start`` again."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")
    v.install(w.masks, bad_restore(w))
    v.switch(start)
    with pytest.raises(IndexError):
        v.switch("realigned")
    w.check(v, start, w.masks)
    v.install(w.masks, w.rs1)  # and it goes on working
    v.switch("realigned")
    w.check(v, "realigned", w.masks, w.rs1)
    v.close()


def test_a_switch_that_fails_before_any_weight_changed(world, tmp_path, monkeypatch):
    """The dense copy cannot be made (a full disk): the model stays original and says so."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")

    def full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(variants, "WeightStore", full)
        with pytest.raises(OSError, match="disk full"):
            v.set_masks(w.masks)
        with pytest.raises(OSError, match="disk full"):
            v.switch("pruned")
    w.check(v, "original")
    v.switch("pruned")
    w.check(v, "pruned", w.masks)
    v.close()


def test_close_removes_the_scratch_and_can_start_again(world, tmp_path):
    """Catches ``close`` leaving the model pruned, the scratch folder on disk, or the closed
    store in use afterwards."""
    w = world
    v = Variants(w.loaded, scratch=tmp_path / "v")
    v.install(w.masks, w.rs1)
    v.switch("realigned")
    assert len(list((tmp_path / "v").iterdir())) == 1
    v.close()
    w.check(v, "original")
    assert list((tmp_path / "v").iterdir()) == []
    v.switch("pruned")  # a new dense copy
    w.check(v, "pruned", w.masks)
    v.switch("original")
    w.check(v, "original")
    assert not v.dense_weight(next(iter(w.dense))).requires_grad
    v.close()
    v.close()  # twice: nothing left to do
    assert list((tmp_path / "v").iterdir()) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_weight_store_files_and_stale_scratch(tiny_llama, tmp_path, cache_root, monkeypatch):
    """Catches a store whose values are not the weights' (or not zeros with ``copy=False``),
    not in a shared file, not removed on ``close`` or when garbage-collected, a root that is
    not created (nested, or a second time), the default root, and the clean-up of scratch
    left by dead processes removing live ones' or failing on other names."""
    loaded = tiny_llama
    linears = {n: m.weight.detach() for n, _, _, m in loaded.adapter.iter_linears()}
    with torch.no_grad():  # two dtypes: two files
        first = next(iter(linears))
        loaded.model.get_submodule(first).weight.data = linears[first].double()
        linears[first] = loaded.model.get_submodule(first).weight.detach()
    root = tmp_path / "a" / "b"
    store = WeightStore(loaded, root)
    assert store.folder.parent == root and store.folder.name.startswith(f"pid{os.getpid()}-")
    files = sorted(p.name for p in store.folder.iterdir())
    assert files == ["weights0.bin", "weights1.bin"]
    by_dtype: dict[torch.dtype, list[str]] = {}
    for n, t in linears.items():
        assert store.tensors[n].shape == t.shape and store.tensors[n].dtype == t.dtype
        assert torch.equal(store.tensors[n], t)
        by_dtype.setdefault(t.dtype, []).append(n)
    for path in store.folder.iterdir():  # the file itself holds the values, in order
        raw = path.read_bytes()
        for dtype, names in by_dtype.items():
            flat = torch.cat([linears[n].reshape(-1) for n in names])
            if len(raw) == flat.numel() * flat.element_size():
                assert torch.equal(torch.frombuffer(bytearray(raw), dtype=dtype), flat)
                break
        else:
            raise AssertionError(f"{path.name} holds no dtype's weights")
    zeros = WeightStore(loaded, root, copy=False)  # the same root again
    assert all(not t.any() for t in zeros.tensors.values())
    assert set(zeros.tensors) == set(linears)
    folder = zeros.folder
    del zeros
    gc.collect()
    assert not folder.exists()  # removed when the store goes
    store.close()
    assert store.tensors == {} and not store.folder.exists()
    again = WeightStore(loaded, root)
    shutil.rmtree(again.folder)  # removed by someone else: close still works
    again.close()
    default = WeightStore(loaded)
    assert default.folder.parent == cache_root / "variants"
    default.close()
    # scratch of a dead process goes, a live one's and other names stay
    dead = root / f"pid{dead_pid()}-x"
    live = root / f"pid{os.getpid()}-y"
    odd = root / "pidnot-a-number-z"
    other = root / "notes"
    for f in (dead, live, odd, other):
        f.mkdir()
    more_dead = [root / f"pid{dead_pid()}-{i}" for i in range(3)]
    more_odd = [root / f"pid{c}-{i}" for i, c in enumerate(("", "x1", "1x"))]
    for f in more_dead + more_odd:
        f.mkdir()
    stray = root / f"pid{dead_pid()}-file"  # a file named like scratch: cannot be removed
    stray.write_text("")  # as a folder, and must not stop the store
    WeightStore(loaded, root).close()
    assert not dead.exists() and live.exists() and odd.exists() and other.exists()
    assert not any(f.exists() for f in more_dead) and all(f.exists() for f in more_odd)
    assert stray.exists()
    # a process that exists but is not ours to signal is alive
    monkeypatch.setattr(os, "kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError()))
    dead2 = root / f"pid{dead_pid()}-w"
    dead2.mkdir()
    WeightStore(loaded, root).close()
    assert dead2.exists() and live.exists()
    monkeypatch.undo()
    WeightStore(loaded, root).close()
    assert not dead2.exists() and live.exists()
