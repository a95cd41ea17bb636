"""Chat: tokens per second of each column against plain ``model.generate``, and peak memory.

The three columns are streamed through the chat turn engine the Chat tab uses
(``hsr_core.chat.stream_columns`` run by the app's model thread, ``ui.workbench.MODEL_THREAD``:
``Variants.use(name)`` around ``generate_reply`` with its streamer and per-token stop check),
one after the other, variant switch included in
each column's time. The baseline is plain greedy ``model.generate`` on the same model, prompts
and settings (``max_new_tokens``, greedy), in the same model thread. Tokens are counted
exactly: the stopping criterion runs once per generated token, and the baseline counts its
output ids. Every torch step of the benchmark (loading, pruning, both measures) runs in the
model thread, as in the app; the main thread computes nothing.

Memory is the process's anonymous resident memory (``RssAnon``, sampled every 2 ms by a thread;
``bench_variants.PeakSampler``). transformers memory-maps safetensors on the CPU, so the
parameters are cloned first: the baseline holds one ordinary copy of the weights. "Extra" is the
peak above the memory before the variants were made; for plain ``generate`` it is the KV cache
and activations ("the caches"); for the chat it adds the variants (the dense values live in a
memory-mapped scratch file, page cache rather than process memory) and the switches. Plain
``generate`` and the chat turn alternate prompt by prompt, so that on a shared machine both see
the same load.

Why one thread (``hsr_core.worker``): each round is also run a second time while another
persistent thread holds an OpenMP team, as the app's handler pool did before every model step
went through the model thread (one thread ran a torch product and waits; it ends after the
round, which frees its team). The ratio of the two is what the model thread buys on the CPU.

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

from hsr_core.chat import chat_inputs, stream_columns  # noqa: E402
from hsr_core.config import GenerationSettings, ModelSpec, RealignConfig  # noqa: E402
from hsr_core.data import builtin_eval  # noqa: E402
from hsr_core.models import load_model  # noqa: E402
from hsr_core.realign import RankCache, restore_set  # noqa: E402
from hsr_core.variants import VARIANTS, Variants  # noqa: E402
from hsr_core.worker import ModelThread  # noqa: E402

MODEL_THREAD = ModelThread()
"""The benchmark's model thread (the app has one of its own, ``ui.workbench.MODEL_THREAD``)."""

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


class SecondTeam:
    """While entered, another persistent thread holds an OpenMP team (it ran one parallel
    torch product and waits), as a pool thread that ran a model step did in the app before."""

    def __enter__(self) -> SecondTeam:
        self.release = threading.Event()
        ready = threading.Event()

        def hold() -> None:
            torch.randn(512, 512) @ torch.randn(512, 512)
            ready.set()
            self.release.wait()

        self.thread = threading.Thread(target=hold, name="second-team", daemon=True)
        self.thread.start()
        ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join()  # a thread's OpenMP team is freed when the thread ends


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
        for r in stream_columns(lambda: variants, jobs, settings, runner=MODEL_THREAD, lock=lock):
            if r.done:
                totals[r.variant][0] += r.tokens
                totals[r.variant][1] += r.seconds
                totals["turn"][0] += r.tokens
        totals["turn"][1] += time.perf_counter() - t0
    return totals


def add(total: list, part: tuple | list) -> list:
    return [a + b for a, b in zip(total, part, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="builtin:smollm2-135m-safe")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=64, help="max_new_tokens (greedy)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8, help="calibration samples per set")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up)")
    args = p.parse_args()
    run(args)


def setup(args: argparse.Namespace):
    """The model with masks and a restore set, as the app has them after pruning and
    realigning (run in the model thread)."""
    loaded = load_model(ModelSpec(args.model, device=args.device))
    for prm in loaded.model.parameters():  # one ordinary copy (not file-backed pages)
        prm.data = prm.data.clone()
    safety, utility, masks, scores = pruning_state(loaded, args.samples)
    ranks = RankCache(loaded, safety, utility)
    top_h = min(10, loaded.adapter.num_layers * loaded.adapter.num_heads)
    rs = restore_set(loaded, masks, scores, RealignConfig(top_h=top_h), ranks)
    del ranks, safety, utility
    release_freed_memory()
    return loaded, masks, rs


def run(args: argparse.Namespace) -> None:
    """The benchmark: the main thread orchestrates, the model thread computes (as in the app)."""
    call = MODEL_THREAD.call
    loaded, masks, rs = call(setup, args)
    weights = sum(prm.numel() * prm.element_size() for prm in loaded.model.parameters())
    settings = GenerationSettings(max_new_tokens=args.tokens)
    texts = prompts(args.prompts)
    base = rss_anon()
    plain, plain_2 = [0, 0.0], [0, 0.0]
    cols = {v: [0, 0.0] for v in (*VARIANTS, "turn")}
    cols_2 = {v: [0, 0.0] for v in (*VARIANTS, "turn")}
    plain_peak = chat_peak = base
    with (
        tempfile.TemporaryDirectory(prefix="hsr-bench-chat-") as scratch,
        PeakSampler() as sampler,
    ):
        # the baseline's memory: weights plus the caches of plain generate, before any variant
        call(plain_generate, loaded, texts, settings)
        plain_peak = sampler.peak
        variants = call(Variants, loaded, scratch=Path(scratch))
        call(variants.set_masks, masks)
        call(variants.set_restore, rs)
        call(plain_generate, loaded, texts[:1], settings)  # warm-ups
        chat_columns(variants, texts[:1], settings)
        # prompt by prompt, plain generate and the chat turn in turn, so that both see the same
        # load on a shared machine; then the same with a second OpenMP team alive
        for _ in range(args.repeats):
            for text in texts:
                plain = add(plain, call(plain_generate, loaded, [text], settings))
                sampler.peak = rss_anon()
                for v, part in chat_columns(variants, [text], settings).items():
                    cols[v] = add(cols[v], part)
                chat_peak = max(chat_peak, sampler.peak)
                with SecondTeam():
                    plain_2 = add(plain_2, call(plain_generate, loaded, [text], settings))
                    for v, part in chat_columns(variants, [text], settings).items():
                        cols_2[v] = add(cols_2[v], part)
        call(variants.close)
    plain_extra, chat_extra = plain_peak - base, chat_peak - base

    reference = plain[0] / plain[1]
    print(
        f"# {args.model} on {loaded.device}, {loaded.dtype}, {torch.get_num_threads()} torch "
        f"threads; {args.prompts} prompts x {args.repeats} rounds, greedy, max_new_tokens "
        f"{args.tokens}; restored {rs.count} weights in {len(rs.heads)} heads"
    )
    print(
        "| generation | tokens | seconds | tokens/s | vs plain generate | "
        "with a second OpenMP team alive (tokens/s) | one thread over two teams |"
    )
    print("|---|---|---|---|---|---|---|")

    def row(label: str, got: list, other: list, bold: bool) -> float:
        n, sec = got
        ratio = n / sec / reference
        r = f"**{ratio:.2f}x**" if bold else f"{ratio:.2f}x"
        print(
            f"| {label} | {n} | {sec:.2f} | {n / sec:.1f} | {r} | {other[0] / other[1]:.1f} | "
            f"{(n / sec) / (other[0] / other[1]):.2f}x |"
        )
        return ratio

    row("plain generate", plain, plain_2, False)
    ok = True
    for v in VARIANTS:
        ok &= row(f"chat column: {v}", cols[v], cols_2[v], True) >= TOKS_TARGET
    row("whole turns (3 columns, switch back)", cols["turn"], cols_2["turn"], False)
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
