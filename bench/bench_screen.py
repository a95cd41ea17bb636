"""Ships screening (our extension) against exact Ships, in one process: cost and agreement.

Agreement is measured on ``--prompts`` probe prompts: exact Ships scores (from the result
cache when an earlier run left them, else computed), the screening estimates, and screening
mode's result (screening, then exact Ships on the ``c x top_h`` best). Reported: Spearman's
rank correlation with the exact scores over all heads, and how many of exact Ships' top 10 the
screen's and the mode's top 10 hold, for c = 1, 2, 3 (the re-scored heads get their exact
scores: the tests show re-scoring equals exact Ships).

Cost is timed on the first ``--time-prompts`` prompts, the parts interleaved and repeated
(``--repeat``), best of the repeats: exact Ships (every head), the screening pass, and exact
Ships on the mode's candidates for each c. The ratios are exact / screening and exact /
(screening + candidates), the whole mode.

``--shape NAME`` times one random-token prompt of ``--tokens`` tokens on a random-weight Llama
of that shape instead (no agreement: the weights are random): the cost per prompt of exact
Ships (record + replay of every head) against the screening passes (an intact pass, a tracked
forward and one backward pass). ``vicuna-7b`` is the 7B shape (for a GPU);
``vicuna-7b-narrow`` has its 32 layers x 32 heads at a width a CPU can run.

Usage:
    OMP_NUM_THREADS=1 python bench/bench_screen.py --model builtin:smollm2-135m-safe --prompts 16
    OMP_NUM_THREADS=1 python bench/bench_screen.py --shape vicuna-7b-narrow --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsr_core import pipeline as pl  # noqa: E402
from hsr_core.config import ModelSpec, ShipsConfig  # noqa: E402
from hsr_core.heads import all_heads, top_heads  # noqa: E402
from hsr_core.hooks import record_layers  # noqa: E402
from hsr_core.models import LoadedModel, build_adapter, load_model  # noqa: E402
from hsr_core.screen import (  # noqa: E402
    directional_effects,
    intact_final,
    merge_ranking,
    screen_scores,
    tracked_pass,
)
from hsr_core.ships import ablated_finals, ships_scores  # noqa: E402

SHAPES = {
    "vicuna-7b": dict(hidden_size=4096, intermediate_size=11008),
    "vicuna-7b-narrow": dict(hidden_size=256, intermediate_size=688),
}


def shape_bench(args: argparse.Namespace) -> dict:
    """Exact Ships against the screening passes on one random prompt of a random model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **SHAPES[args.shape],
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=max(4096, args.tokens),
    )
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    loaded = LoadedModel(ModelSpec(args.shape), Path("."), model, None, None, build_adapter(model))
    a = loaded.adapter
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    direction = torch.nn.functional.normalize(torch.randn(1, a.hidden_size), dim=-1)
    heads = all_heads(a.num_layers, a.num_heads)

    def exact() -> None:
        record = record_layers(loaded.model, a, inputs)
        ablated_finals(loaded, record, heads, batch_size=16)

    def screening() -> None:
        intact_final(loaded, inputs)
        directional_effects(tracked_pass(loaded, inputs, "zero"), direction)

    # the mode's 3 x top_h = 30 candidates: spread evenly over the layers, or all in the
    # first layers (the dearest: a replay runs from a head's layer to the last)
    n = 3 * args.top_h
    spread = heads[:: len(heads) // n][:n]

    def candidates(chosen) -> None:
        record = record_layers(loaded.model, a, inputs)
        ablated_finals(loaded, record, chosen, batch_size=16)

    runs = {
        "screening": screening,
        "exact": exact,
        "candidates_spread": lambda: candidates(spread),
        "candidates_first_layers": lambda: candidates(heads[:n]),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, fn in runs.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t)
    return {
        "shape": args.shape,
        "geometry": [a.num_layers, a.num_heads, a.num_kv_heads, a.hidden_size],
        "tokens": args.tokens,
        "dtype": str(dtype),
        "seconds_per_prompt": {k: round(v, 3) for k, v in best.items()},
        "ratio_exact_over_screening": round(best["exact"] / best["screening"], 1),
        "ratio_exact_over_mode_spread": round(
            best["exact"] / (best["screening"] + best["candidates_spread"]), 1
        ),
        "ratio_exact_over_mode_first_layers": round(
            best["exact"] / (best["screening"] + best["candidates_first_layers"]), 1
        ),
    }


def overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> int:
    return len(set(top_heads(a, k)) & set(top_heads(b, k)))


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    p.add_argument("--model", default="builtin:smollm2-135m-safe")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=16, help="probe prompts for the agreement")
    p.add_argument("--time-prompts", type=int, default=2, help="probe prompts timed")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--metric", default="angle", choices=["angle", "kl"])
    p.add_argument("--ablation", default="zero", choices=["zero", "uniform"])
    p.add_argument("--top-h", type=int, default=10)
    p.add_argument("--kl-directions", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a random model instead")
    p.add_argument("--tokens", type=int, default=128, help="--shape: prompt length")
    args = p.parse_args()
    if args.shape:
        out = shape_bench(args) | {
            "repeat": args.repeat,
            "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__,
        }
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return

    loaded = load_model(ModelSpec(args.model, device=args.device))
    a = loaded.adapter
    cfg = ShipsConfig(num_samples=args.prompts, metric=args.metric, ablation=args.ablation)
    probes = pl.probe_prompts(loaded, pl.load_calibration("builtin"), cfg)
    cache = pl.ResultCache(pl.default_cache_dir())
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else lambda: None
    kw = {"kl_directions": args.kl_directions}

    t0 = time.perf_counter()
    exact = pl.attribute(loaded, probes, cfg, cache)
    screening = screen_scores(loaded, probes, cfg, **kw)
    k = min(10, args.top_h)
    agree: dict[str, object] = {
        "spearman_screening": float(spearmanr(exact.value.flatten(), screening.flatten())[0]),
        "top10_screening": overlap(exact.value, screening, k),
    }
    for c in (1, 2, 3):
        n = min(c * args.top_h, a.num_layers * a.num_heads)
        picked = top_heads(screening, n)
        rescored = torch.full_like(screening, float("nan"))
        for h in picked:
            rescored[h] = exact.value[h]
        mode = merge_ranking(screening, rescored).scores
        agree[f"c{c}"] = {
            "rescored": n,
            "top10_mode": overlap(exact.value, mode, k),
            "exact_top10_among_candidates": len(set(top_heads(exact.value, k)) & set(picked)),
            "spearman_mode": float(spearmanr(exact.value.flatten(), mode.flatten())[0]),
        }
    candidates = {
        c: [tuple(h) for h in top_heads(screening, agree[f"c{c}"]["rescored"])] for c in (1, 2, 3)
    }

    timed = probes[: args.time_prompts]
    tcfg = ShipsConfig(num_samples=len(timed), metric=args.metric, ablation=args.ablation)
    runs = {
        "screening": lambda: screen_scores(loaded, timed, tcfg, **kw),
        "exact": lambda: ships_scores(loaded, timed, tcfg),
    }
    for c, heads in candidates.items():
        runs[f"candidates_c{c}"] = lambda heads=heads: ships_scores(
            loaded, timed, tcfg, heads=heads
        )
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, fn in runs.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t)
    per_prompt = {k: v / len(timed) for k, v in best.items()}
    out = {
        "model": args.model,
        "geometry": [a.num_layers, a.num_heads, a.num_kv_heads],
        "metric": args.metric,
        "ablation": args.ablation,
        "prompts": len(probes),
        "top_h": args.top_h,
        "kl_directions": args.kl_directions if args.metric == "kl" else None,
        "exact_from_cache": exact.cached,
        "agreement": agree,
        "timed_prompts": len(timed),
        "repeat": args.repeat,
        "seconds_per_prompt": {k: round(v, 3) for k, v in per_prompt.items()},
        "ratio_exact_over_screening": round(best["exact"] / best["screening"], 1),
        **{
            f"ratio_exact_over_mode_c{c}": round(
                best["exact"] / (best["screening"] + best[f"candidates_c{c}"]), 1
            )
            for c in candidates
        },
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device": str(loaded.device),
        "torch": torch.__version__,
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
