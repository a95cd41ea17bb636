"""Core benchmarks, each side by side with its baseline in one process, reported as ratios.

1. Ships: the layer-replay implementation (record each layer's input once per prompt, replay
   layers >= l for batches of ablated copies) against the naive loop (one full forward pass per
   head per prompt), on the same model and prompts. Both produce the same ``[N, hidden]``
   matrices (checked here too). For large models the naive loop is timed on a sample of heads
   and extrapolated to all heads (each naive pass is one plain forward pass).
   Also reported: the replay's achieved matmul throughput against the device's measured
   dense-matmul rate in the same dtype.
2. Wanda statistics (``wanda_norms``) against plain forward passes over the same batches.
3. Mask computation (``prune_masks``) for every decoder linear, against the Wanda reference's
   way (a full stable per-row sort, then the first ``k`` indices scattered into a mask), with
   the time split by stage (score matrix, the k-th value by ``kthvalue`` and by ``topk``, the
   whole selection with the comparison and tie check, packing).

Usage:
    python bench/bench_core.py --model builtin:tiny-llama
    python bench/bench_core.py --model builtin:smollm2-135m --prompts 4 --tokens 128
    python bench/bench_core.py --model shape:vicuna-7b --tokens 2048 --dtype bfloat16 --device cuda

``shape:vicuna-7b`` builds a random-weight Llama with vicuna-7b's shape (32 layers, 32 heads,
hidden 4096, intermediate 11008) directly on the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsr_core.config import ModelSpec, WandaConfig  # noqa: E402
from hsr_core.encoding import Batch  # noqa: E402
from hsr_core.heads import all_heads  # noqa: E402
from hsr_core.hooks import head_ablation, record_layers  # noqa: E402
from hsr_core.masks import PackedMask  # noqa: E402
from hsr_core.models import LoadedModel, build_adapter, load_model  # noqa: E402
from hsr_core.ships import ablated_finals  # noqa: E402
from hsr_core.wanda import (  # noqa: E402
    _NormCollector,
    lowest_k,
    mask_count,
    prune_masks,
    wanda_score,
)

SHAPES = {
    "mini": dict(  # a quick check of the shape: path on any machine
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "vicuna-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(args) -> LoadedModel:
    if args.model.startswith("shape:"):
        from transformers import LlamaConfig, LlamaForCausalLM

        dtype = getattr(torch, args.dtype if args.dtype != "auto" else "bfloat16")
        shape = dict(SHAPES[args.model.split(":", 1)[1]])
        if args.layers:
            shape["num_hidden_layers"] = args.layers
        cfg = LlamaConfig(**shape, max_position_embeddings=max(4096, args.tokens))
        device = torch.device(
            args.device
            if args.device != "auto"
            else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        return LoadedModel(
            ModelSpec(args.model), Path("."), model, None, None, build_adapter(model)
        )
    return load_model(ModelSpec(args.model, dtype=args.dtype, device=args.device))


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul rate (FLOP/s) for n x n x n products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    a @ b
    t = timed(lambda: [a @ b for _ in range(reps)], device, repeat=3)
    return 2 * n**3 * reps / t


def layer_flops(loaded: LoadedModel, tokens: int) -> float:
    """Matmul FLOPs of one decoder layer on one sequence of ``tokens`` tokens (causal attention)."""
    a = loaded.adapter
    params = sum(m.weight.numel() for n, l, _, m in a.iter_linears() if l == 0)
    attn = 2 * 2 * tokens * tokens * a.num_heads * a.head_dim / 2  # QK^T and AV, causal half
    return 2 * tokens * params + attn


def bench_ships(loaded: LoadedModel, args, device: torch.device) -> dict:
    a = loaded.adapter
    g = torch.Generator().manual_seed(0)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    prompts = [
        torch.randint(5, vocab, (1, args.tokens), generator=g).to(device)
        for _ in range(args.prompts)
    ]
    heads = all_heads(a.num_layers, a.num_heads)

    def batched(ids):
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        rec = record_layers(loaded.model, a, inputs)
        return rec.final[:, -1], ablated_finals(loaded, rec, heads, batch_size=args.batch)

    def naive_one(ids, head):
        with head_ablation(a, [head]), torch.inference_mode():
            out = loaded.model(
                input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1
            )
        return out.hidden_states[-1][:, -1]

    batched(prompts[0])  # warm-up
    sample = (
        heads
        if len(heads) <= args.naive_heads
        else heads[:: max(1, len(heads) // args.naive_heads)][: args.naive_heads]
    )
    naive_one(prompts[0], sample[0])

    t_batched = sum(timed(lambda ids=ids: batched(ids), device) for ids in prompts)
    t_naive_sample = 0.0
    for ids in prompts:
        t_naive_sample += timed(lambda ids=ids: [naive_one(ids, h) for h in sample], device)
    # the intact pass is one more forward per prompt
    per_pass = t_naive_sample / (len(prompts) * len(sample))
    t_naive = per_pass * len(prompts) * (1 + len(heads))

    # exactness on the sampled heads
    base, fast = batched(prompts[0])
    slow = torch.stack([naive_one(prompts[0], h)[0] for h in sample])
    idx = torch.tensor([heads.index(h) for h in sample])
    max_err = float((fast[idx].float() - slow.float()).abs().max())

    layer_calls = sum(a.num_layers - l for l, _ in heads) + a.num_layers  # replays + intact pass
    flops = layer_calls * layer_flops(loaded, args.tokens) * len(prompts)
    dtype = loaded.dtype
    peak = matmul_rate(device, dtype, 4096 if device.type == "cuda" else 1024)
    return {
        "heads": len(heads),
        "prompts": len(prompts),
        "tokens": args.tokens,
        "batch": args.batch,
        "naive_s": t_naive,
        "naive_measured_heads": len(sample),
        "batched_s": t_batched,
        "speedup": t_naive / t_batched,
        "naive_per_forward_ms": 1000 * per_pass,
        "replay_tflops": flops / t_batched / 1e12,
        "matmul_tflops": peak / 1e12,
        "fraction_of_matmul_rate": flops / t_batched / peak,
        "max_abs_diff_vs_naive": max_err,
    }


def bench_wanda(loaded: LoadedModel, args, device: torch.device) -> dict:
    a = loaded.adapter
    g = torch.Generator().manual_seed(1)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    batches = []
    for _ in range(args.wanda_batches):
        ids = torch.randint(5, vocab, (args.wanda_batch, args.tokens), generator=g)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        resp[:, args.tokens // 2 :] = True
        batches.append(
            Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, resp).to(device)
        )

    def plain():
        with torch.inference_mode():
            for b in batches:
                loaded.model(**b.inputs, use_cache=False)

    def stats(weighted: bool = False):
        from hsr_core.hooks import HookSet

        modules = {n: m for n, _, _, m in a.iter_linears()}
        col = _NormCollector(modules)
        col.weighted_sum = weighted
        with HookSet() as hooks, torch.inference_mode():
            for n, m in modules.items():
                hooks.pre(m, col.hook(n))
            for b in batches:
                col.set_batch(b.response_mask)
                loaded.model(**b.inputs, use_cache=False)
        return col.norms()

    plain()
    stats()
    stats(weighted=True)
    t_plain = timed(plain, device, repeat=3)
    t_stats = timed(stats, device, repeat=3)
    t_weighted = timed(lambda: stats(weighted=True), device, repeat=3)
    norms = stats()
    alt = stats(weighted=True)
    stats_rel_diff = max(
        float(((norms[n] - alt[n]).abs() / alt[n].abs().clamp_min(1e-6)).max()) for n in norms
    )
    cfg = WandaConfig(sparsity=0.5)
    t_masks = timed(lambda: prune_masks(loaded, norms, cfg), device, repeat=3)
    # the whole of prune_masks with the other k-th value (topk <-> kthvalue), same masks
    import functools

    from hsr_core import wanda as wanda_mod

    default_topk = device.type == "cuda"
    kth = wanda_mod.kth_smallest
    wanda_mod.kth_smallest = functools.partial(kth, use_topk=not default_topk)
    try:
        other = prune_masks(loaded, norms, cfg)
        t_masks_other = timed(lambda: prune_masks(loaded, norms, cfg), device, repeat=3)
    finally:
        wanda_mod.kth_smallest = kth
    masks = prune_masks(loaded, norms, cfg)
    linears = [(n, m.weight) for n, _, _, m in a.iter_linears()]

    def reference_sort():  # the Wanda reference: stable sort of each row, scatter the first k
        out = {}
        for n, w in linears:
            score = wanda_score(w, norms[n])
            idx = torch.sort(score, dim=-1, stable=True).indices[:, : int(w.shape[1] * 0.5)]
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
            out[n] = PackedMask.pack(mask, mask_count(mask.shape, cfg))
        return out

    ref = reference_sort()
    same = all(
        torch.equal(ref[n].bits, masks[n].bits) and torch.equal(other[n].bits, masks[n].bits)
        for n, _ in linears
    )
    t_ref = timed(reference_sort, device, repeat=3)
    # stages, each over all linears, with its inputs prepared outside the timed region
    scores = [wanda_score(w, norms[n]) for n, w in linears]
    ks = [int(w.shape[1] * 0.5) for _, w in linears]
    t_score = timed(lambda: [wanda_score(w, norms[n]) for n, w in linears], device, repeat=3)
    # each stage over all linears, keeping one linear's output at a time (as prune_masks does)
    pairs = list(zip(scores, ks, strict=True))

    def each(fn):
        def run() -> None:
            for s, k in pairs:
                fn(s, k)  # the result is dropped before the next linear's

        return run

    t_kth = timed(each(lambda s, k: s.kthvalue(k, dim=1, keepdim=True)), device, repeat=3)
    t_topk = timed(
        each(lambda s, k: s.topk(k, dim=1, largest=False, sorted=False)), device, repeat=3
    )
    t_select = timed(each(lowest_k), device, repeat=3)
    bools = [lowest_k(s, k) for s, k in zip(scores, ks, strict=True)]
    scores.clear()  # free the score matrices before packing
    t_pack = timed(
        lambda: [PackedMask.pack(b, mask_count(b.shape, cfg)) for b in bools], device, repeat=3
    )
    bools.clear()
    return {
        "batches": len(batches),
        "batch": args.wanda_batch,
        "tokens": args.tokens,
        "plain_forward_s": t_plain,
        "statistics_s": t_stats,
        "statistics_over_forward": t_stats / t_plain,
        "statistics_weighted_sum_s": t_weighted,
        "statistics_weighted_over_forward": t_weighted / t_plain,
        "statistics_max_rel_diff_gather_vs_weighted": stats_rel_diff,
        "masks_all_linears_s": t_masks,
        "masks_kth_by": "topk" if default_topk else "kthvalue",
        "masks_all_linears_other_kth_s": t_masks_other,
        "masks_other_kth_by": "kthvalue" if default_topk else "topk",
        "masks_reference_sort_s": t_ref,
        "masks_reference_over_ours": t_ref / t_masks,
        "masks_equal_reference": same,
        "mask_stages_s": {
            "score": t_score,
            "threshold by kthvalue (CPU way)": t_kth,
            "threshold by topk (GPU way)": t_topk,
            "select_total (threshold + compare + ties)": t_select,
            "pack": t_pack,
        },
        "linear_params": a.num_linear_params(),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokens", type=int, default=64, help="prompt length")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="ablated copies per replay batch")
    p.add_argument(
        "--naive-heads",
        type=int,
        default=10**9,
        help="time the naive loop on this many heads and extrapolate",
    )
    p.add_argument("--wanda-batches", type=int, default=4)
    p.add_argument("--wanda-batch", type=int, default=4)
    p.add_argument("--skip-ships", action="store_true", help="only the Wanda measures")
    p.add_argument(
        "--layers", type=int, default=0, help="shape: models only: this many decoder layers"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    loaded = build(args)
    device = loaded.device
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    res = {
        "model": args.model,
        "device": card,
        "dtype": str(loaded.dtype),
        "torch": torch.__version__,
    }
    if not args.skip_ships:
        res["ships"] = bench_ships(loaded, args, device)
    res["wanda"] = bench_wanda(loaded, args, device)
    s, w = res.get("ships"), res["wanda"]
    print(f"# {args.model} on {card}, {res['dtype']}")
    print("| measure | baseline | ours | ratio |")
    print("|---|---|---|---|")
    if s:
        print(
            f"| Ships, {s['heads']} heads x {s['prompts']} prompts x {s['tokens']} tokens | naive loop {s['naive_s']:.2f} s | layer replay {s['batched_s']:.2f} s | **{s['speedup']:.2f}x faster** |"
        )
        print(
            f"| Ships replay throughput | matmul {s['matmul_tflops']:.2f} TFLOP/s | {s['replay_tflops']:.2f} TFLOP/s | {s['fraction_of_matmul_rate']:.0%} of matmul rate |"
        )
    print(
        f"| Wanda statistics, {w['batches']}x{w['batch']} x {w['tokens']} tokens | plain forward {w['plain_forward_s']:.3f} s | {w['statistics_s']:.3f} s | **{w['statistics_over_forward']:.2f}x** the forward |"
    )
    print(
        f"| Masks for all decoder linears ({w['linear_params'] / 1e6:.1f} M weights) | reference sort {w['masks_reference_sort_s']:.3f} s | {w['masks_all_linears_s']:.3f} s | **{w['masks_reference_over_ours']:.2f}x faster** |"
    )
    print(
        f"| Wanda statistics, 0/1-weighted sum instead of gathering the selected tokens | plain forward {w['plain_forward_s']:.3f} s | {w['statistics_weighted_sum_s']:.3f} s | {w['statistics_weighted_over_forward']:.2f}x the forward |"
    )
    print(
        f"| Masks for all decoder linears, k-th value by {w['masks_other_kth_by']} instead of {w['masks_kth_by']} | reference sort {w['masks_reference_sort_s']:.3f} s | {w['masks_all_linears_other_kth_s']:.3f} s | {w['masks_reference_sort_s'] / w['masks_all_linears_other_kth_s']:.2f}x faster |"
    )
    stages = ", ".join(f"{k} {v:.3f} s" for k, v in w["mask_stages_s"].items())
    print(f"\nmask stages: {stages}; equal to the reference: {w['masks_equal_reference']}")
    print(
        f"statistics, gather vs weighted sum: max relative difference {w['statistics_max_rel_diff_gather_vs_weighted']:.1e}"
    )
    if s:
        print(
            f"\nmax |replay - naive| on {s['naive_measured_heads']} heads: {s['max_abs_diff_vs_naive']:.2e}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
