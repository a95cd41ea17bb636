"""Variants: switching original / pruned / realigned in place against reloading the model,
and the memory all three take against one copy of the weights.

Memory is the process's anonymous resident memory (``RssAnon``, sampled every 2 ms by a
thread) on the CPU, or ``torch.cuda.max_memory_allocated`` on a GPU. The dense values live in
a memory-mapped scratch file (page cache, not anonymous memory), so they do not count, exactly
as the design intends.

Usage:
    python bench/bench_variants.py --model builtin:smollm2-135m
    python bench/bench_variants.py --model builtin:smollm2-135m --pruner sparsegpt
    python bench/bench_variants.py --model shape:vicuna-7b --device cuda

``shape:NAME`` (the shapes of ``bench_core.py``) builds a random-weight model in bfloat16 on the
device, with random norms (no tokenizer): there are no files to reload, so the baseline is the
copy of all weights from host memory to the device, the floor under any reload.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsr_core.config import ModelSpec, RealignConfig, WandaConfig  # noqa: E402
from hsr_core.data import builtin_calibration  # noqa: E402
from hsr_core.models import load_model  # noqa: E402
from hsr_core.realign import RankCache, restore_set  # noqa: E402
from hsr_core.variants import Variants  # noqa: E402
from hsr_core.wanda import prune_masks, wanda_norms  # noqa: E402


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples RssAnon in a thread; ``peak`` is the largest value seen."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self) -> PeakSampler:
        self.peak = rss_anon()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.every)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``).

    Without it, memory freed before a measurement is reused by what is measured, and the
    anonymous-memory peak undercounts (it once read 0 MiB for 100 MiB of masks).
    """
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def pruning_state(
    loaded, samples: int, *, random_norms: bool = False
) -> tuple[dict, dict, dict, torch.Tensor]:
    """Norms of both built-in sets, 50% Wanda masks and seeded random head scores.

    What the app holds after pruning, without running Ships (its scores only pick heads here).
    ``random_norms``: seeded random norms instead (a model without a tokenizer).
    """
    cfg = WandaConfig(sparsity=0.5, num_samples=samples)
    if random_norms:
        g = torch.Generator().manual_seed(0)
        safety, utility = (
            {
                n: torch.rand(m.in_features, generator=g) + 0.1
                for n, _, _, m in loaded.adapter.iter_linears()
            }
            for _ in range(2)
        )
    else:
        calib = builtin_calibration()
        safety = wanda_norms(loaded, calib.safety[:samples], cfg)
        utility = wanda_norms(loaded, calib.utility[:samples], cfg)
    masks = prune_masks(loaded, utility, cfg)
    scores = torch.rand(
        loaded.adapter.num_layers,
        loaded.adapter.num_heads,
        generator=torch.Generator().manual_seed(0),
    )
    return safety, utility, masks, scores


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--samples", type=int, default=8, help="calibration samples per set")
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument(
        "--pruner",
        default="wanda",
        choices=["wanda", "sparsegpt"],
        help="sparsegpt: the variants carry its updated weights (a second scratch store)",
    )
    args = p.parse_args()

    shape = args.model.startswith("shape:")
    if shape:
        from bench_core import build

        t = time.perf_counter()
        loaded = build(
            argparse.Namespace(
                model=args.model, dtype="bfloat16", device=args.device, layers=0, tokens=4096
            )
        )
        t_load = time.perf_counter() - t
        device = loaded.device
        host = [p.detach().cpu() for p in loaded.model.parameters()]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for h, prm in zip(host, loaded.model.parameters(), strict=True):
            prm.data.copy_(h)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_reload = time.perf_counter() - t
        del host
    else:
        spec = ModelSpec(args.model, device=args.device)
        t = time.perf_counter()
        loaded = load_model(spec)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        again = load_model(spec)  # a reload with the files in the page cache
        for prm in again.model.parameters():  # read every weight: mapped files load lazily
            prm.data = prm.data.clone()
        t_reload = time.perf_counter() - t
        del again
        device = loaded.device
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    # transformers maps safetensors weights on the CPU (file-backed pages, copied on first
    # write); make them ordinary memory so the baseline holds one full copy, as on a GPU
    for prm in loaded.model.parameters():
        prm.data = prm.data.clone()

    safety, utility, masks, scores = pruning_state(loaded, args.samples, random_norms=shape)
    updated = None
    if args.pruner == "sparsegpt":
        from hsr_core.pipeline import calibration_samples
        from hsr_core.pruners import prune_model

        cfg = WandaConfig(sparsity=0.5, num_samples=args.samples, pruner="sparsegpt")
        _, prepared = calibration_samples(loaded, builtin_calibration(), cfg)
        pruning = prune_model(loaded, utility, prepared, cfg)
        masks, updated = pruning.masks, pruning.updated

    # the restore set comes from the realign step (its rank cache is that step's memory, not
    # the variants'): made here, while the model is dense, before memory is measured
    modules = {n: m for n, _, _, m in loaded.adapter.iter_linears()}
    rs = restore_set(
        loaded,
        masks,
        scores,
        RealignConfig(top_h=10),
        RankCache(loaded, safety, utility, lambda n: modules[n].weight.detach()),
    )
    release_freed_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_anon = rss_anon()
    with PeakSampler() as sampler:
        v = Variants(loaded)
        v.install(masks, rs, updated)
        times: dict[str, list[float]] = {}
        for _ in range(args.cycles):
            for name in ("pruned", "realigned", "pruned", "original", "realigned", "original"):
                prev = v.current
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                v.switch(name)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.setdefault(f"{prev} -> {name}", []).append(time.perf_counter() - t)
    extra = (
        (torch.cuda.max_memory_allocated(device) - base)
        if device.type == "cuda"
        else sampler.peak - base_anon
    )
    v.close()

    print(
        f"# {args.model} on {device}, {loaded.dtype}; weights {weights / 2**20:.0f} MiB; "
        f"pruner {args.pruner}; torch threads {torch.get_num_threads()}"
    )
    print("| step | median ms | vs baseline |")
    print("|---|---|---|")
    first = "build (random weights, on the device)" if shape else "load (first, cold cache)"
    print(f"| {first} | {1000 * t_load:.0f} | |")
    baseline = (
        "all weights host -> device (the floor under a reload)"
        if shape
        else "reload (files in page cache, weights read)"
    )
    print(f"| {baseline} | {1000 * t_reload:.0f} | 1x |")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| switch {k} | {1000 * m:.1f} | {t_reload / m:.1f}x faster |")
    print(
        f"\nrestored weights: {rs.count}; masks packed: {sum(m.bits.numel() for m in masks.values()) / 2**20:.1f} MiB"
    )
    print(
        f"memory for all three variants: {(weights + extra) / weights:.3f}x one copy of the weights (extra {extra / 2**20:.1f} MiB at peak)"
    )


if __name__ == "__main__":
    main()
