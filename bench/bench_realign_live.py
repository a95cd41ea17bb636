"""Live realignment: how long one slider move of the Realign tab takes (target: 150 ms).

Loads ``builtin:smollm2-135m-safe`` (``builtin:smollm2-135m`` while the safety adapter is not
trained yet) on the CPU through the app's handlers, takes Ships scores and Wanda norms on the
built-in data from the result cache (``$HSR_CACHE_DIR``; computed the first time, with the
app's CPU defaults so that the app and this script share the cache), prunes at 50 %, ranks the
attention weights once, and then times
a series of slider moves through ``ui.tabs.realign.realign``, the Realign tab's handler itself
(``restore_set`` over the shared rank cache, ``head_rank_points`` and the three figures), plus
the JSON encoding gradio does to send the figures. Not a test:

    python bench/bench_realign_live.py [--model builtin:smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_MS = 150.0


def pick_model() -> str:
    from hsr_core.builtin import ADAPTER_DIR

    if (ADAPTER_DIR / "adapter_config.json").exists():
        return "builtin:smollm2-135m-safe"
    return "builtin:smollm2-135m"


def slider_moves():
    """(slider, RealignConfig) pairs: one slider moved at a time away from the defaults."""
    from hsr_core.config import RealignConfig

    base = RealignConfig()
    moves = [("p", replace(base, p=x)) for x in (0.3, 0.4, 0.45, 0.55, 0.6, 0.65)]
    moves += [("q", replace(base, q=x)) for x in (0.2, 0.3, 0.4, 0.6, 0.7, 0.8)]
    moves += [("max_p", replace(base, max_p=x)) for x in (0.55, 0.6, 0.75, 0.8, 0.9, 1.0)]
    moves += [("top_h", replace(base, top_h=x)) for x in (1, 3, 5, 8, 12, 16, 20)]
    moves += [("slicing", replace(base, slicing=s)) for s in ("reference", "head")]
    return moves


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the safe SmolLM2, else SmolLM2")
    ap.add_argument("--ships-samples", type=int, default=8, help="probe prompts (app CPU default)")
    ap.add_argument("--calib-samples", type=int, default=32, help="per set (app CPU default)")
    ap.add_argument("--repeats", type=int, default=3, help="times each slider move is timed")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the live view (default: the app's setting, ui.tabs.realign.LIVE_THREADS)",
    )
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import gradio as gr
    import torch

    from hsr_core.config import RealignConfig
    from ui.session import Session
    from ui.tabs import attribute, model, prune, realign
    from ui.workbench import WORKBENCH

    if args.threads is not None:
        realign.LIVE_THREADS = args.threads
    name = args.model or pick_model()
    # the app's own handlers, called as gradio would call them (no server)
    t0 = time.perf_counter()
    state = model.load_model(name, "auto", "cpu", Session())["state"]
    a = WORKBENCH.loaded.adapter
    print(
        f"model {name}: {a.num_layers} layers x {a.num_heads} heads ({a.num_kv_heads} KV), "
        f"loaded in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
        f"live view threads {realign.LIVE_THREADS}"
    )
    t0 = time.perf_counter()
    out = attribute.attribute(args.ships_samples, "zero", "angle", 1, False, state, None)
    state = out["state"]
    print(f"Ships ({time.perf_counter() - t0:.1f} s): {out['ships_status']}")
    t0 = time.perf_counter()
    out = prune.prune(
        0.5, "unstructured", "one-shot", args.calib_samples, False, "wanda", state, None
    )
    state = out["state"]
    print(f"Prune and rank ({time.perf_counter() - t0:.1f} s): {out['prune_status']}")

    plot = gr.Plot()
    base = RealignConfig()

    def move(cfg: RealignConfig) -> dict:
        return realign.realign(
            cfg.p, cfg.q, cfg.max_p, cfg.top_h, cfg.slicing, "0-0", cfg.scope, state
        )

    move(base)  # warm-up: the first call unpacks the masks of the selected layers

    rows: dict[str, list[float]] = {}
    view_ms: list[float] = []
    total_ms: list[float] = []
    restored: dict[str, int] = {}
    for _ in range(args.repeats):
        for slider, cfg in slider_moves():
            t0 = time.perf_counter()
            out = move(cfg)
            t1 = time.perf_counter()
            for key in ("realign_heatmap", "realign_bars", "head_plot"):
                plot.postprocess(out[key])
            t2 = time.perf_counter()
            view_ms.append(1e3 * (t1 - t0))
            total_ms.append(1e3 * (t2 - t0))
            rows.setdefault(slider, []).append(1e3 * (t2 - t0))
            restored[f"{slider}={getattr(cfg, slider)}"] = out["realign_json"]["restored"]
    WORKBENCH.release()

    print(f"\n{len(total_ms)} slider moves ({args.repeats} x {len(slider_moves())}), CPU, {name}")
    print(f"{'slider':<10}{'moves':>6}{'median ms':>12}{'p95 ms':>10}")
    for slider, ms in rows.items():
        print(f"{slider:<10}{len(ms):>6}{statistics.median(ms):>12.1f}{percentile(ms, 95):>10.1f}")
    print("-" * 38)
    for label, ms in (("handler", view_ms), ("+ JSON", total_ms)):
        print(f"{label:<10}{len(ms):>6}{statistics.median(ms):>12.1f}{percentile(ms, 95):>10.1f}")
    med, p95 = statistics.median(total_ms), percentile(total_ms, 95)
    verdict = "meets" if p95 <= TARGET_MS else ("median meets" if med <= TARGET_MS else "misses")
    print(
        f"\ntarget {TARGET_MS:.0f} ms per slider move: {verdict} (median {med:.1f}, p95 {p95:.1f})"
    )
    print(
        "restored weights:", ", ".join(f"{k} {v:,}" for k, v in list(restored.items())[:8]), "..."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
