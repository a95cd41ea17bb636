"""Chat through the launched app: tokens per second of each column against plain ``generate``.

``bench_chat.py`` measures the Chat tab's code in one process; this one measures what a user
gets: ``python app.py`` in a subprocess, driven through its API like the browser does (load the
default model, Ships, prune, realign, then chat turns), so gradio's handler threads, the queue
and the streaming are all in the path. The baseline is plain greedy ``model.generate`` of the
same model, prompts and settings in this process (which runs nothing else), alternating with
the app's turns prompt by prompt so that both see the same machine. Token counts and seconds
per column come from the app's own turn record (``tokens``, ``seconds``: the variant switch
included).

``--app-dir`` points at another checkout's ``app.py`` (e.g. an older commit in a git worktree)
to compare versions of the app on the same machine. Not a test:

    python bench/bench_app_chat.py [--prompts 4] [--tokens 64] [--app-dir .]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_chat import plain_generate, prompts  # noqa: E402
from conftest_app import (  # noqa: E402
    api_attribute,
    api_load,
    api_prune,
    api_realign,
    running_app,
)

from hsr_core.config import GenerationSettings, ModelSpec  # noqa: E402
from hsr_core.models import load_model  # noqa: E402

VARIANTS = ("original", "pruned", "realigned")


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="builtin:smollm2-135m-safe")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="max_new_tokens (greedy)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--samples", type=int, default=8, help="Ships and calibration samples")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--app-dir", type=Path, default=ROOT)
    p.add_argument("--cache", type=Path, default=None, help="HSR_CACHE_DIR for the app")
    args = p.parse_args()

    from gradio_client import Client

    from hsr_core.store import default_cache_dir

    cache = Path(args.cache or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    with running_app(cache, app_dir=args.app_dir.resolve()) as url:
        c = Client(url, verbose=False)
        t0 = time.perf_counter()
        api_load(c, args.model)
        api_attribute(c, args.samples)
        api_prune(c, args.sparsity, num_samples=args.samples)
        api_realign(c, top_h=10)
        setup_s = time.perf_counter() - t0

        loaded = load_model(ModelSpec(args.model), cache_dir=cache)
        settings = GenerationSettings(max_new_tokens=args.tokens)
        texts = prompts(args.prompts)
        plain = [0, 0.0]
        cols = {v: [0, 0.0] for v in VARIANTS}

        def turn(text: str) -> dict:
            *_, record = c.predict(
                message=text,
                image=None,
                system_prompt="",
                max_new_tokens=args.tokens,
                temperature=0,
                top_p=1,
                seed=0,
                api_name="/chat",
            )
            c.predict(api_name="/chat_clear")
            return record["answers"]

        turn(texts[0])  # warm-ups
        plain_generate(loaded, texts[:1], settings)
        for _ in range(args.repeats):
            for text in texts:
                n, s = plain_generate(loaded, [text], settings)
                plain = [plain[0] + n, plain[1] + s]
                for v, a in turn(text).items():
                    cols[v] = [cols[v][0] + a["tokens"], cols[v][1] + a["seconds"]]

    reference = plain[0] / plain[1]
    print(
        f"# {args.model}: the app from {args.app_dir.resolve()} on the CPU "
        f"({torch.get_num_threads()} torch threads), {args.prompts} prompts x {args.repeats} "
        f"rounds, greedy, max_new_tokens {args.tokens}; set-up through the API {setup_s:.0f} s"
    )
    print("| generation | tokens | seconds | tokens/s | vs plain generate |")
    print("|---|---|---|---|---|")
    print(
        f"| plain generate (this process) | {plain[0]} | {plain[1]:.2f} | {reference:.1f} | 1.00x |"
    )
    for v in VARIANTS:
        n, s = cols[v]
        print(
            f"| app chat column: {v} | {n} | {s:.2f} | {n / s:.1f} | **{n / s / reference:.2f}x** |"
        )


if __name__ == "__main__":
    main()
