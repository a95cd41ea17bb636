"""The base pruners side by side on one model, in one process: time against Wanda's.

Each pruner starts from the dense model and the same prepared utility calibration samples, at
the same sparsity; Wanda one-shot is timed with its statistics (the utility norms: one forward
pass per batch) and its masks, which is what the other pruners replace. Every time is the
median of ``--repeat`` runs, and ratios are to Wanda one-shot. The Wanda *safety* statistics
that HSR ranks by are the same for every pruner and are not timed here.

Usage:
    OMP_NUM_THREADS=2 python bench/bench_pruners.py --model builtin:smollm2-135m-safe --samples 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsr_core.config import ModelSpec, WandaConfig  # noqa: E402
from hsr_core.data import builtin_calibration  # noqa: E402
from hsr_core.masks import pruned_total  # noqa: E402
from hsr_core.models import load_model  # noqa: E402
from hsr_core.pipeline import calibration_samples  # noqa: E402
from hsr_core.pruners import prune_model  # noqa: E402
from hsr_core.wanda import wanda_norms  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    p.add_argument("--model", default="builtin:smollm2-135m-safe")
    p.add_argument("--device", default="auto")
    p.add_argument("--samples", type=int, default=32, help="utility calibration samples")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--pruners",
        default="wanda,wanda-sequential,sparsegpt,snip-one-shot,magnitude",
        help="comma-separated NAME or NAME-MODE (wanda-sequential, snip-one-shot, snip-sequential)",
    )
    args = p.parse_args()

    loaded = load_model(ModelSpec(args.model, device=args.device))
    device = loaded.device
    base = WandaConfig(sparsity=args.sparsity, num_samples=args.samples)
    _, utility = calibration_samples(loaded, builtin_calibration(), base)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(name: str) -> tuple[float, int]:
        pruner, mode = (name.split("-", 1) + [None])[:2]
        cfg = WandaConfig(
            sparsity=args.sparsity, num_samples=args.samples, pruner=pruner, mode=mode
        )
        times, count = [], 0
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            norms = wanda_norms(loaded, utility, cfg) if name == "wanda" else {}
            pruning = prune_model(loaded, norms, utility, cfg)
            sync()
            times.append(time.perf_counter() - t)
            count = pruned_total(pruning.masks)
            pruning.close()
        return statistics.median(times), count

    names = [n.strip() for n in args.pruners.split(",") if n.strip()]
    results = {n: run(n) for n in names}
    ref = results.get("wanda", (None, 0))[0]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# {args.model} on {device} ({card}), {loaded.dtype}; {len(utility)} utility samples, "
        f"sparsity {args.sparsity}; torch threads {torch.get_num_threads()}; "
        f"median of {args.repeat}"
    )
    print("| pruner | seconds | vs Wanda one-shot | weights pruned |")
    print("|---|---|---|---|")
    for n, (s, count) in results.items():
        ratio = f"{s / ref:.1f}x" if ref else ""
        print(f"| {n} | {s:.2f} | {ratio} | {count:,} |")


if __name__ == "__main__":
    main()
