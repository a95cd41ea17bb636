"""Start-up times that tests no longer assert (issue 18: no timed assertions in tests).

- building the page (``ui.layout.build_demo``, no model loaded): the tests used to require
  under 20 s;
- a second ``convert_smollm2`` of an already converted folder (only the marker is read): the
  tests used to require under 1 s; measured only where the built-in SmolLM2 is at hand.

Each is run ``--repeat`` times in one process, the first (cold imports) reported apart. Not a
test:

    python bench/bench_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}")
    from ui.layout import build_demo

    demo = timed(build_demo, args.repeat)
    print(
        f"build_demo: first {demo[0]:.2f} s, then median "
        f"{statistics.median(demo[1:] or demo):.2f} s ({args.repeat} builds)"
    )

    from hsr_core.builtin import materialize
    from hsr_core.smollm2 import convert_smollm2

    try:
        folder = materialize("smollm2-135m")
    except Exception as e:  # no GGUF at hand: say so rather than fail
        print(f"second convert_smollm2: skipped ({e})")
        return
    again = timed(lambda: convert_smollm2(folder), args.repeat)
    print(f"second convert_smollm2: median {statistics.median(again) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
