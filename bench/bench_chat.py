"""Chat: tokens per second of each column against plain ``model.generate``, and peak memory.

The three columns are streamed through the Chat tab's own code (``ui.chat.stream_columns``: a
worker thread, ``Variants.use(name)`` around ``hsr_core.chat.stream_reply`` with its streamer
and per-token stop check), one after the other, variant switch included in each column's time.
The baseline is plain greedy ``model.generate`` on the same model, prompts and settings
(``max_new_tokens``, greedy). Tokens are counted exactly: the stopping criterion runs once per
generated token, and the baseline counts its output ids.

Memory is the process's anonymous resident memory (``RssAnon``, sampled every 2 ms by a thread;
``bench_variants.PeakSampler``). transformers memory-maps safetensors on the CPU, so the
parameters are cloned first: the baseline holds one ordinary copy of the weights. "Extra" is the
peak above the memory before the variants were made; for plain ``generate`` it is the KV cache
and activations ("the caches"); for the chat it adds the variants (the dense values live in a
memory-mapped scratch file, page cache rather than process memory) and the switches. Plain
``generate`` and the chat turn alternate prompt by prompt, so that on a shared machine both see
the same load.

On a busy machine (fewer free cores than torch threads), OpenMP in the *main* thread can be many
times slower than in any other thread; the app always generates in worker threads, so the
baseline is timed in the main thread and in a worker thread, and the faster is the reference.

Targets: each column at least 0.6x plain generate's tokens/s; peak memory at most 1.3x one copy
of the weights plus the caches. Not a test:

    python bench/bench_chat.py [--model builtin:smollm2-135m-safe] [--tokens 64] [--prompts 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_variants import (  # noqa: E402
    PeakSampler,
    pruning_state,
    release_freed_memory,
    rss_anon,
)

from hsr_core.chat import GenerationSettings, chat_inputs  # noqa: E402
from hsr_core.config import ModelSpec, RealignConfig  # noqa: E402
from hsr_core.data import builtin_eval  # noqa: E402
from hsr_core.models import load_model  # noqa: E402
from hsr_core.realign import RankCache, restore_set  # noqa: E402
from hsr_core.variants import Variants  # noqa: E402
from ui.chat import VARIANTS, stream_columns  # noqa: E402

TOKS_TARGET = 0.6
MEMORY_TARGET = 1.3


def prompts(n: int) -> list[str]:
    """``n`` prompts of the built-in evaluation split, harmful and benign in turn."""
    samples = builtin_eval()
    harmful = [s.prompt for s in samples if s.harmful]
    benign = [s.prompt for s in samples if not s.harmful]
    return [(harmful if i % 2 == 0 else benign)[i // 2] for i in range(n)]


@torch.inference_mode()
def plain_generate(loaded, texts: list[str], settings: GenerationSettings) -> tuple[int, float]:
    """Tokens generated and seconds, plain ``model.generate`` (greedy), prompt by prompt."""
    tokens, seconds = 0, 0.0
    for text in texts:
        inputs = chat_inputs(loaded, [{"role": "user", "content": text}])
        torch.manual_seed(settings.seed)
        t0 = time.perf_counter()
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        seconds += time.perf_counter() - t0
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return tokens, seconds


def in_thread(fn, *args):
    """Run ``fn(*args)`` in a fresh thread (as the app's handlers run) and return its result."""
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn(*args)))
    t.start()
    t.join()
    return box["out"]


def chat_columns(
    variants: Variants, texts: list[str], settings: GenerationSettings
) -> dict[str, list[float]]:
    """Per column: ``[tokens, seconds]`` summed over the prompts, through the app's code; and
    ``turn``: all tokens and the turns' wall time (switching back to the original included)."""
    totals = {v: [0, 0.0] for v in (*VARIANTS, "turn")}
    lock = threading.RLock()
    for text in texts:
        jobs = [(v, [{"role": "user", "content": text}]) for v in VARIANTS]
        t0 = time.perf_counter()
        for r in stream_columns(lambda: variants, jobs, settings, lock=lock):
            if r.done:
                totals[r.variant][0] += r.tokens
                totals[r.variant][1] += r.seconds
                totals["turn"][0] += r.tokens
        totals["turn"][1] += time.perf_counter() - t0
    return totals


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="builtin:smollm2-135m-safe")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=64, help="max_new_tokens (greedy)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8, help="calibration samples per set")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up)")
    p.add_argument(
        "--no-main-thread",
        action="store_true",
        help="time plain generate in a worker thread only (a busy machine makes the main "
        "thread's OpenMP crawl)",
    )
    args = p.parse_args()

    loaded = load_model(ModelSpec(args.model, device=args.device))
    for prm in loaded.model.parameters():  # one ordinary copy (not file-backed pages)
        prm.data = prm.data.clone()
    weights = sum(prm.numel() * prm.element_size() for prm in loaded.model.parameters())
    settings = GenerationSettings(max_new_tokens=args.tokens)
    texts = prompts(args.prompts)

    # masks and a restore set, as the app has them after pruning and realigning
    safety, utility, masks, scores = pruning_state(loaded, args.samples)
    ranks = RankCache(loaded, safety, utility)
    top_h = min(10, loaded.adapter.num_layers * loaded.adapter.num_heads)
    rs = restore_set(loaded, masks, scores, RealignConfig(top_h=top_h), ranks)
    del ranks, safety, utility
    release_freed_memory()
    base = rss_anon()
    main_t, thread_t = [0, 0.0], [0, 0.0]
    cols = {v: [0, 0.0] for v in (*VARIANTS, "turn")}
    plain_peak = chat_peak = base
    with (
        tempfile.TemporaryDirectory(prefix="hsr-bench-chat-") as scratch,
        PeakSampler() as sampler,
    ):
        # the baseline's memory: weights plus the caches of plain generate, before any variant
        in_thread(plain_generate, loaded, texts, settings)
        plain_peak = sampler.peak
        variants = Variants(loaded, scratch=Path(scratch))
        variants.set_masks(masks)
        variants.set_restore(rs)
        in_thread(plain_generate, loaded, texts[:1], settings)  # warm-ups
        chat_columns(variants, texts[:1], settings)
        # prompt by prompt, plain generate and the chat turn in turn, so that both see the same
        # load on a shared machine
        for _ in range(args.repeats):
            for text in texts:
                if not args.no_main_thread:
                    main_t = [
                        a + b
                        for a, b in zip(
                            main_t, plain_generate(loaded, [text], settings), strict=True
                        )
                    ]
                b = in_thread(plain_generate, loaded, [text], settings)
                thread_t = [thread_t[0] + b[0], thread_t[1] + b[1]]
                sampler.peak = rss_anon()
                for v, (n, sec) in chat_columns(variants, [text], settings).items():
                    cols[v] = [cols[v][0] + n, cols[v][1] + sec]
                chat_peak = max(chat_peak, sampler.peak)
        variants.close()
    plain_extra, chat_extra = plain_peak - base, chat_peak - base

    rate_main = main_t[0] / main_t[1] if main_t[1] else 0.0
    rate_thread = thread_t[0] / thread_t[1]
    reference = max(rate_main, rate_thread)
    print(
        f"# {args.model} on {loaded.device}, {loaded.dtype}, {torch.get_num_threads()} torch "
        f"threads; {args.prompts} prompts x {args.repeats} rounds, greedy, max_new_tokens "
        f"{args.tokens}; restored {rs.count} weights in {len(rs.heads)} heads"
    )
    print("| generation | tokens | seconds | tokens/s | vs plain generate |")
    print("|---|---|---|---|---|")
    if main_t[1]:
        print(
            f"| plain generate (main thread) | {main_t[0]} | {main_t[1]:.2f} | {rate_main:.1f} "
            f"| {rate_main / reference:.2f}x |"
        )
    print(
        f"| plain generate (worker thread) | {thread_t[0]} | {thread_t[1]:.2f} | "
        f"{rate_thread:.1f} | {rate_thread / reference:.2f}x |"
    )
    ok = True
    for v in VARIANTS:
        n, s = cols[v]
        ratio = n / s / reference
        ok &= ratio >= TOKS_TARGET
        print(f"| chat column: {v} | {n} | {s:.2f} | {n / s:.1f} | **{ratio:.2f}x** |")
    n, s = cols["turn"]
    print(
        f"| whole turns (3 columns, switch back) | {n} | {s:.2f} | {n / s:.1f} | "
        f"{n / s / reference:.2f}x |"
    )
    mib = 2**20
    mem_ratio = (weights + chat_extra) / (weights + plain_extra)
    ok &= mem_ratio <= MEMORY_TARGET
    print(
        f"\nmemory: weights {weights / mib:.0f} MiB; plain generate peak +{plain_extra / mib:.1f} "
        f"MiB (KV cache, activations); chat (three variants, switches, streaming) peak "
        f"+{chat_extra / mib:.1f} MiB\npeak memory ratio: {mem_ratio:.3f}x one copy of the "
        f"weights plus the caches ({(weights + chat_extra) / weights:.3f}x the weights alone)"
    )
    print(
        f"\ntargets: each column >= {TOKS_TARGET}x plain generate tokens/s, memory <= "
        f"{MEMORY_TARGET}x: {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
