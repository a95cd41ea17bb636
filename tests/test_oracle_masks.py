"""hsr_core/masks.py against slow, obvious implementations and counts by hand (issue 18,
mutation testing): packing bit by bit in Python, unpacking, applying, and the sparsity report
of masks whose counts are written out here. No model: a fake adapter parses the names.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from hsr_core.masks import PackedMask, apply_mask, pruned_total, sparsity_report


def slow_bits(mask: torch.Tensor) -> list[int]:
    """Row-major entries, 8 a byte, entry ``8 j + i`` in bit ``i`` of byte ``j``."""
    flat = [bool(x) for x in mask.reshape(-1).tolist()]
    out = []
    for j in range(math.ceil(len(flat) / 8)):
        out.append(sum(1 << i for i, x in enumerate(flat[8 * j : 8 * j + 8]) if x))
    return out


SHAPES = [(1, 1), (1, 8), (3, 5), (8, 8), (7, 9), (2, 3, 4), (16, 3), (5, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_equals_bit_by_bit(shape):
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    for density in (0.0, 0.3, 0.7, 1.0):
        mask = torch.rand(shape, generator=g) < density
        p = PackedMask.pack(mask)
        assert p.bits.dtype == torch.uint8
        assert p.bits.tolist() == slow_bits(mask)
        assert p.shape == shape and p.count == sum(bool(x) for x in mask.reshape(-1).tolist())
        assert p.numel == math.prod(shape)
        assert torch.equal(p.unpack(), mask) and p.unpack().dtype == torch.bool
        assert torch.equal(p.unpack_keep(), ~mask) and p.unpack_keep().dtype == torch.bool
        assert torch.equal(p.unpack("cpu"), mask) and torch.equal(p.unpack_keep("cpu"), ~mask)


def test_pack_by_hand():
    """[[1 0 1 1 0 0 0 0 1], [0 0 0 0 0 0 0 1 1]] row-major: bytes 1+4+8 = 13, then entries 8..15
    (1, 0, 0, 0, 0, 0, 0, 0) = 1, then entries 16, 17 (1, 1) = 3."""
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1]]).bool()
    p = PackedMask.pack(mask)
    assert p.bits.tolist() == [13, 1, 3] and p.count == 6 and p.shape == (2, 9)
    # a 0/1 integer matrix packs the same; a count the caller knows is kept as given
    q = PackedMask.pack(mask.to(torch.int64), count=6)
    assert q.bits.tolist() == [13, 1, 3] and q.count == 6
    assert PackedMask.pack(mask, count=99).count == 99


def test_masks_follow_their_device():
    """On the meta device (no data, but every operation checks devices, as a GPU's would):
    packing keeps the mask's device, unpacking goes to the device asked for, else stays on the
    mask's own."""
    on_meta = PackedMask.pack(torch.zeros(3, 5, dtype=torch.bool, device="meta"), count=0)
    assert on_meta.bits.device.type == "meta" and on_meta.bits.shape == (2,)
    assert on_meta.unpack().device.type == "meta" and on_meta.unpack().shape == (3, 5)
    assert on_meta.unpack_keep().device.type == "meta"
    p = PackedMask.pack(torch.tensor([[True, False, True]]))
    for out in (p.unpack("meta"), p.unpack_keep("meta")):
        assert out.device.type == "meta" and out.shape == (1, 3) and out.dtype == torch.bool
    assert p.unpack().device.type == "cpu"


def test_apply_mask_zeroes_exactly_the_pruned_entries():
    rng = random.Random(1)
    w = torch.tensor([[rng.uniform(-2, 2) for _ in range(11)] for _ in range(3)])
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) < 0.5
    expected = [[0.0 if mask[i, j] else float(w[i, j]) for j in range(11)] for i in range(3)]
    apply_mask(w, PackedMask.pack(mask))
    assert w.tolist() == expected


def test_apply_mask_refuses_another_shape():
    p = PackedMask.pack(torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError) as err:
        apply_mask(torch.ones(3, 4), p)
    assert str(err.value) == ("a mask of shape (2, 6) cannot prune a weight of torch.Size([3, 4])")


def masks_by_hand():
    """3 linears over 2 layers: counts 2 of 6, 1 of 4, 5 of 10."""

    def mask(shape, k):
        m = torch.zeros(math.prod(shape), dtype=torch.bool)
        m[:k] = True
        return PackedMask.pack(m.view(shape))

    return {
        "layers.0.q_proj": mask((2, 3), 2),
        "layers.0.down_proj": mask((2, 2), 1),
        "layers.1.q_proj": mask((5, 2), 5),
    }


def fake_model():
    def parse(name):
        _, layer, proj = name.split(".")
        return int(layer), proj

    return SimpleNamespace(adapter=SimpleNamespace(parse=parse))


def test_sparsity_report_by_hand():
    masks = masks_by_hand()
    assert pruned_total(masks) == 8
    rep = sparsity_report(fake_model(), dict(reversed(masks.items())))
    assert rep == {
        "pruned_weights": 8,
        "prunable_weights": 20,
        "sparsity": 0.4,
        "per_layer": {0: 3 / 10, 1: 0.5},
        "per_module": {"q_proj": 7 / 16, "down_proj": 0.25},
    }
    assert list(rep["per_layer"]) == [0, 1]  # sorted by layer


def test_sparsity_report_of_no_masks():
    assert sparsity_report(fake_model(), {}) == {
        "pruned_weights": 0,
        "prunable_weights": 0,
        "sparsity": 0.0,
        "per_layer": {},
        "per_module": {},
    }
    assert pruned_total({}) == 0


def test_apply_mask_unpacks_the_mask_on_the_weights_device(monkeypatch: pytest.MonkeyPatch):
    """The keep mask is unpacked where the weight lives: a CPU mask on a GPU weight would fail
    there (``mul_`` with a CPU operand), which neither a CPU nor the meta device shows, so the
    device asked for is read from a spy."""
    asked = []
    unpack_keep = PackedMask.unpack_keep

    def spy(self, device=None):
        asked.append(device)
        return unpack_keep(self, device)

    monkeypatch.setattr(PackedMask, "unpack_keep", spy)
    w = torch.zeros(3, 5, device="meta")
    apply_mask(w, PackedMask.pack(torch.rand(3, 5) < 0.5))
    assert asked == [w.device]
