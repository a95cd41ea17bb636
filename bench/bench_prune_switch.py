"""Pruning a model in place from packed masks: the earlier way against the table lookup.

Baseline (the code before): unpack each mask by shift-and-compare (``(bits[:, None] & 1 << i)
!= 0``) and ``weight.masked_fill_(mask, 0)``. Ours (``Variants.switch``): unpack the "keep" mask
with a 256-entry table (``PackedMask.unpack_keep``: each byte gathers its 8 bools as one int64)
and ``weight.mul_(keep)``. Both zero exactly the same weights (checked here). Random weights and
50% masks in SmolLM2-135M's linear shapes (30 layers x 7 linears, 106 M weights), float32 and
bfloat16, side by side in one process. Not a test:

    python bench/bench_prune_switch.py [--layers 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsr_core.masks import PackedMask  # noqa: E402

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def shift_unpack(m: PackedMask, device: torch.device) -> torch.Tensor:
    """The earlier unpack: one shift-and-compare pass over ``[bytes, 8]``."""
    bits = m.bits.to(device)
    return ((bits[:, None] & BITS.to(device)) != 0).reshape(-1)[: m.numel].view(m.shape)


def timed(fn, device: torch.device, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shapes = SHAPES * args.layers
    masks = [PackedMask.pack(torch.rand(s, generator=g) > 0.5) for s in shapes]
    dense = [torch.randn(s, generator=g) for s in shapes]
    n = sum(m.numel for m in masks)
    print(f"# {n / 1e6:.1f} M weights on {device}, {torch.get_num_threads()} torch threads")
    print(
        "| dtype | unpack: shift (before) | unpack: table | prune: masked_fill_ (before) "
        "| prune: table + mul_ | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        ws = [w.to(device, dtype) for w in dense]

        def before(ws=ws):
            for w, m in zip(ws, masks, strict=True):
                w.masked_fill_(shift_unpack(m, device), 0)

        def ours(ws=ws):
            for w, m in zip(ws, masks, strict=True):
                w.mul_(m.unpack_keep(device))

        a = [w.clone() for w in ws]
        b = [w.clone() for w in ws]
        before(a)
        ours(b)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # -0.0 == 0
        t_shift = timed(lambda: [shift_unpack(m, device) for m in masks], device)
        t_table = timed(lambda: [m.unpack_keep(device) for m in masks], device)
        t_before, t_ours = timed(before, device), timed(ours, device)
        print(
            f"| {str(dtype).split('.')[1]} | {1000 * t_shift:.0f} ms | {1000 * t_table:.0f} ms | "
            f"{1000 * t_before:.0f} ms | {1000 * t_ours:.0f} ms | **{t_before / t_ours:.2f}x** |"
        )


if __name__ == "__main__":
    main()
