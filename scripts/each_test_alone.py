"""Run tests one at a time, each in a pytest process of its own: does any test need another?

    python scripts/each_test_alone.py                       # every test (hours on 2 cores)
    python scripts/each_test_alone.py --sample 100 --seed 3  # 100 tests drawn at random
    python scripts/each_test_alone.py tests/test_core_heads.py --jobs 2
    python scripts/each_test_alone.py --fork --jobs 2          # every test, about 1 hour

Collects the tests (``pytest --collect-only -q``), runs each node id alone
(``pytest -p no:cacheprovider -q NODEID``), and prints one line per test (its outcome and
seconds) and a summary with every failure's command; the exit status is 1 when a test failed
alone. ``--exclude`` leaves out files by substring (default: the browser tests, which start a
browser and an app per process; pass ``--exclude ''`` to keep them). Torch runs one thread
per process (``OMP_NUM_THREADS=1``) unless the environment says otherwise.

``--fork`` imports the third-party libraries once (torch, numpy, transformers, gradio,
plotly: about 12 s of each fresh process on 2 cores) and forks a child per test, which runs
``pytest.main`` on that one node id and exits. Each child still collects its test file,
builds every fixture and runs one test and nothing else; only those libraries' import is
shared, not hsr_core, ui or the tests (they are imported in the child).
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# imported once by --fork before the children; nothing of this project
TAIL_LINES = 40
"""Lines of a failed test's output printed under it."""
PREIMPORTED = ("numpy", "torch", "transformers", "gradio", "plotly.graph_objects")


def collect(paths: list[str]) -> list[str]:
    """The node ids pytest collects under ``paths`` (in collection order)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    ids = [line for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if out.returncode not in (0, 5) or not ids:
        sys.exit(f"error: collection failed (exit {out.returncode}):\n{out.stdout[-3000:]}")
    return ids


def run_alone(node: str, env: dict[str, str]) -> tuple[str, str, float, str]:
    """``(node, outcome, seconds, output)``; outcome is pytest's last summary word (passed, failed,
    skipped, xfailed, xpassed, error) or ``exit N`` when no summary came."""
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    text = out.stdout + out.stderr
    return node, outcome_of(out.stdout, out.returncode), time.monotonic() - t0, text


def outcome_of(stdout: str, returncode: int) -> str:
    """pytest's last summary word (passed, failed, skipped, xfailed, xpassed, error), the
    worst one where the summary names failures, or ``exit N`` when no summary came."""
    summary = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    words = re.findall(r"\d+ (passed|failed|skipped|xfailed|xpassed|errors?)", summary)
    bad = {"failed", "error", "errors"} & set(words)
    if returncode not in (0, 5) or bad:
        return sorted(bad)[0] if bad else f"exit {returncode}"
    return words[0] if words else f"exit {returncode}"


def run_forked(
    nodes: list[str], jobs: int, env: dict[str, str]
) -> Iterator[tuple[str, str, float, str]]:
    """``(node, outcome, seconds, output)`` for each node, in the order they finish: up to ``jobs``
    forked children at a time, each running ``pytest.main`` on one node id."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))  # as ``python -m pytest`` does
    for name in PREIMPORTED:
        importlib.import_module(name)
    queue, running = list(nodes), {}
    while queue or running:
        while queue and len(running) < jobs:
            node = queue.pop(0)
            fd, log = tempfile.mkstemp(prefix="alone-", suffix=".log")
            sys.stdout.flush()
            sys.stderr.flush()
            t0 = time.monotonic()
            pid = os.fork()
            if pid == 0:  # the child: one test, its output in the log, then exit
                code = 3
                try:
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    import pytest

                    code = int(pytest.main(["-q", "-p", "no:cacheprovider", node]))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            os.close(fd)
            running[pid] = (node, t0, log)
        pid, status = os.wait()
        node, t0, log = running.pop(pid)
        text = Path(log).read_text(errors="replace")
        os.unlink(log)
        code = os.waitstatus_to_exitcode(status)
        yield node, outcome_of(text, code), time.monotonic() - t0, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("paths", nargs="*", default=["tests"], help="test files or folders (tests)")
    ap.add_argument("--sample", type=int, default=0, help="run only this many, drawn at random")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    ap.add_argument("--jobs", type=int, default=1, help="tests run side by side (1)")
    ap.add_argument(
        "--fork",
        action="store_true",
        help="import torch, transformers, gradio and plotly once and fork a child per test",
    )
    ap.add_argument(
        "--exclude",
        default="test_browser.py",
        help="comma-separated substrings of node ids to leave out (test_browser.py)",
    )
    args = ap.parse_args(argv)
    if args.sample < 0 or args.jobs < 1:
        ap.error("--sample must be 0 or more and --jobs 1 or more")

    excluded = [e for e in args.exclude.split(",") if e]
    ids = [n for n in collect(args.paths) if not any(e in n for e in excluded)]
    if args.sample and args.sample < len(ids):
        ids = sorted(random.Random(args.seed).sample(ids, args.sample), key=ids.index)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("HSR_TEST_ORDER", None)
    print(f"{len(ids)} tests, each alone, {args.jobs} at a time", flush=True)

    failed: list[str] = []
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.fork:
            results = run_forked(ids, args.jobs, env)
        else:
            results = pool.map(lambda n: run_alone(n, env), ids)
        for i, (node, outcome, seconds, output) in enumerate(results, 1):
            print(f"[{i}/{len(ids)}] {outcome:8} {seconds:6.1f} s  {node}", flush=True)
            if outcome not in ("passed", "skipped", "xfailed", "xpassed"):
                failed.append(node)
                tail = "\n".join(output.strip().splitlines()[-TAIL_LINES:])
                print(f"    its output's last {TAIL_LINES} lines:\n{tail}", flush=True)
    print(
        f"--- {len(ids) - len(failed)} of {len(ids)} pass alone ({time.monotonic() - start:.0f} s)"
    )
    for node in failed:
        print(f"FAILED ALONE: {sys.executable} -m pytest -q {node}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
