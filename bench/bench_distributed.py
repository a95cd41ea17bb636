"""Exact attribution across processes: the command line with 1 and 2 CPU processes.

Runs ``python -m hsr_core realign`` (Ships, the Wanda statistics of both sets, masks and HSR)
three ways on the same model, data and settings, with ``--recompute``:

    one process, one thread        the reference
    one process, two threads       what one process gets from both cores
    two processes, one thread each ``accelerate launch --multi_gpu --num_processes 2`` (on a
                                   machine without a GPU accelerate's torch.distributed
                                   launcher; the processes join on gloo)

and reports the main process's step times from ``summary.json`` (``attribute``: Ships,
``calibrate``: the statistics, both including the gathers) and the wall time of each command,
and whether ``heads.jsonl`` and ``summary.json`` (less its timings) are the same bytes / values
as the one-thread reference's.

Usage:
    python bench/bench_distributed.py --model builtin:smollm2-135m-safe --prompts 4 \\
        --calib 16 --out bench/results/cpu-smollm2-distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(label: str, prefix: list[str], threads: int, args, out: Path) -> dict:
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
    }
    cmd = prefix + ["hsr_core", "realign", "--model", args.model, "--data", "builtin"]
    cmd += ["--ships-samples", str(args.prompts), "--calib-samples", str(args.calib)]
    cmd += ["--calib-batch", str(args.calib_batch), "--recompute", "--quiet", "--out", str(out)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    t = summary["timings_s"]
    print(
        f"{label}: wall {wall:.1f} s, Ships {t['attribute']:.1f} s, "
        f"statistics {t['calibrate']:.1f} s (load average {load:.1f})",
        flush=True,
    )
    return {"label": label, "wall_s": round(wall, 2), "timings_s": t, "load_before": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", default="builtin:smollm2-135m-safe")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    ways = [
        ("1 process x 1 thread", [sys.executable, "-m"], 1),
        ("1 process x 2 threads", [sys.executable, "-m"], 2),
        ("2 processes x 1 thread", launch, 1),
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    rows = []
    try:
        for i, (label, prefix, threads) in enumerate(ways):
            rows.append(run(label, prefix, threads, args, tmp / str(i)))
            rows[-1]["folder"] = tmp / str(i)
        ref = rows[0]["folder"]
        ref_summary = json.loads((ref / "summary.json").read_text())
        ref_summary.pop("timings_s")
        for row in rows:
            folder = row.pop("folder")
            summ = json.loads((folder / "summary.json").read_text())
            summ.pop("timings_s")
            row["heads_jsonl_same_bytes"] = (folder / "heads.jsonl").read_bytes() == (
                ref / "heads.jsonl"
            ).read_bytes()
            row["summary_same"] = summ == ref_summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["timings_s"]
    for row in rows:
        t = row["timings_s"]
        row["speedup_vs_1x1"] = {k: round(base[k] / t[k], 2) for k in ("attribute", "calibrate")}
        row["speedup_vs_1x1"]["wall"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
    result = {
        "model": args.model,
        "prompts": args.prompts,
        "calibration_samples_per_set": args.calib,
        "calibration_batch": args.calib_batch,
        "cpus": os.cpu_count(),
        "load_after": os.getloadavg()[0],
        "runs": rows,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
