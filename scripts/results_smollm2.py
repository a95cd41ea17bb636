"""Reproduce docs/RESULTS.md: HSR on the built-in SmolLM2-135M-Instruct + safety adapter.

Runs the command line (``python -m hsr_core evaluate``) for

1. Wanda sparsity 0.3, 0.4, 0.5, 0.6 with the reference's HSR defaults (p 0.5, q 0.5,
   max_p 0.7, top_h 10);
2. at the sparsity where pruning hurts safety most while the model still talks (the largest
   ASR increase among sparsities where at most ``--max-degenerate`` of the pruned model's
   answers are degenerate, see ``degenerate``), a sweep over top_h (1, 5, 10, 20) and one over
   q (0.3, 0.5, 0.7, 0.9);

then writes the tables, a PNG chart and the commands to ``docs/RESULTS.md``. Ships scores and
norm vectors are computed once and come from the cache afterwards.

Usage:
    python scripts/results_smollm2.py                 # everything (about 35 min on 2 CPU cores)
    python scripts/results_smollm2.py --report-only   # rebuild the page from earlier runs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:smollm2-135m-safe"


def run(out: Path, args: argparse.Namespace, **opts: float) -> dict:
    """One command-line run; returns its summary and evaluation (reusing an earlier run)."""
    if not (out / "eval.json").exists() or not (out / "summary.json").exists():
        cmd = [
            sys.executable, "-m", "hsr_core", "run",
            "--model", MODEL, "--data", "builtin", "--eval-data", "builtin",
            "--ships-samples", str(args.ships_samples), "--calib-samples", "128",
            "--max-new-tokens", str(args.max_new_tokens), "--eval-batch", "16",
            "--out", str(out), "--quiet",
        ]  # fmt: skip
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    return {
        "summary": json.loads((out / "summary.json").read_text()),
        "eval": json.loads((out / "eval.json").read_text()),
        "opts": opts,
    }


def degenerate(answer: str) -> bool:
    """A repetitive answer: fewer than half of its words (at least 6) are distinct.

    The keyword judge counts such babble ("You are a friendly, a friendly, a friendly...") as
    "not a refusal", i.e. as an attack success; this measures how much of that there is.
    """
    words = re.findall(r"\w+", answer.lower())
    return len(words) >= 6 and len(set(words)) < 0.5 * len(words)


def degenerate_share(variant: dict) -> float:
    answers = variant["answers"]
    return sum(degenerate(a["answer"]) for a in answers) / len(answers)


def row(label: str, r: dict) -> dict:
    v, s = r["eval"]["variants"], r["summary"]
    return {
        "label": label,
        **r["opts"],
        "asr_dense": v["original"]["asr"],
        "asr_pruned": v["pruned"]["asr"],
        "asr_hsr": v["realigned"]["asr"],
        "benign_refusal_dense": v["original"]["refusal_rate_benign"],
        "benign_refusal_pruned": v["pruned"]["refusal_rate_benign"],
        "benign_refusal_hsr": v["realigned"]["refusal_rate_benign"],
        "ppl_dense": v["original"]["perplexity"],
        "ppl_pruned": v["pruned"]["perplexity"],
        "ppl_hsr": v["realigned"]["perplexity"],
        "rsr": r["eval"]["rsr"],
        "degenerate_dense": degenerate_share(v["original"]),
        "degenerate_pruned": degenerate_share(v["pruned"]),
        "degenerate_hsr": degenerate_share(v["realigned"]),
        "restored": s["restored"],
        "per_10k": s["restored_per_10k_pruned"],
        "heads": ", ".join(s["selected_heads"]),
    }


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def table(rows: list[dict], first: str) -> str:
    head = f"| {first} | ASR dense | ASR pruned | ASR HSR | RSR | benign refusals dense / pruned / HSR | perplexity dense / pruned / HSR | degenerate answers dense / pruned / HSR | restored (‱ of pruned) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['label']} | {pct(r['asr_dense'])} | {pct(r['asr_pruned'])} | {pct(r['asr_hsr'])} | {pct(r['rsr'])} "
            f"| {pct(r['benign_refusal_dense'])} / {pct(r['benign_refusal_pruned'])} / {pct(r['benign_refusal_hsr'])} "
            f"| {r['ppl_dense']:.2f} / {r['ppl_pruned']:.2f} / {r['ppl_hsr']:.2f} "
            f"| {pct(r['degenerate_dense'])} / {pct(r['degenerate_pruned'])} / {pct(r['degenerate_hsr'])} "
            f"| {r['restored']:,} ({r['per_10k']:.3f}) |"
        )
    return "\n".join(lines)


def chart(sparsity_rows: list[dict], topk_rows: list[dict], q_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["sparsity"] for r in sparsity_rows]
    for key, label, style in [
        ("asr_dense", "dense", "k--"),
        ("asr_pruned", "pruned (Wanda)", "o-"),
        ("asr_hsr", "realigned (HSR, top_h 10)", "s-"),
    ]:
        axes[0].plot(xs, [100 * r[key] for r in sparsity_rows], style, label=label)
    axes[0].set(
        xlabel="Wanda sparsity",
        ylabel="attack success rate (%)",
        title="ASR on the 70 held-out harmful prompts",
        ylim=(0, 100),
    )
    axes[0].legend()

    ax = axes[1]
    s = topk_rows[0]["sparsity"]
    ax.axhline(100 * topk_rows[0]["asr_pruned"], color="tab:blue", ls="--", label="pruned")
    ax.axhline(100 * topk_rows[0]["asr_dense"], color="k", ls="--", label="dense")
    for rows, key, style, label in [
        (topk_rows, "top_h", "s-", "HSR, top_h 1 / 5 / 10 / 20 (q 0.5)"),
        (q_rows, "q", "^-", "HSR, q 0.3 / 0.5 / 0.7 / 0.9 (top_h 10)"),
    ]:
        ax.plot(
            [r["per_10k"] for r in rows], [100 * r["asr_hsr"] for r in rows], style, label=label
        )
        for r in rows:
            ax.annotate(
                f"{r[key]:g}",
                (r["per_10k"], 100 * r["asr_hsr"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.set(
        xlabel="restored weights (‱ of pruned, log scale)",
        ylabel="attack success rate (%)",
        title=f"HSR settings at sparsity {s}",
        ylim=(0, 100),
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=ROOT / "out" / "results")
    p.add_argument("--ships-samples", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument(
        "--max-degenerate",
        type=float,
        default=0.10,
        help="'still talks': at most this share of the pruned model's answers degenerate",
    )
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)

    sparsity = [
        row(f"{s}", run(args.out / f"sparsity-{s}", args, sparsity=s)) for s in (0.3, 0.4, 0.5, 0.6)
    ]
    talking = [r for r in sparsity if r["degenerate_pruned"] <= args.max_degenerate] or sparsity[:1]
    worst = max(talking, key=lambda r: (r["asr_pruned"] - r["asr_dense"], -r["sparsity"]))
    s = worst["sparsity"]
    defaults = args.out / f"sparsity-{s}"  # top_h 10 and q 0.5 are the defaults: reuse it
    topk = [
        row(
            f"{h}",
            run(defaults if h == 10 else args.out / f"s{s}-top{h}", args, sparsity=s, top_h=h),
        )
        for h in (1, 5, 10, 20)
    ]
    qs = [
        row(f"{q}", run(defaults if q == 0.5 else args.out / f"s{s}-q{q}", args, sparsity=s, q=q))
        for q in (0.3, 0.5, 0.7, 0.9)
    ]

    png = ROOT / "docs" / "results-smollm2.png"
    chart(sparsity, topk, qs, png)
    (args.out / "rows.json").write_text(
        json.dumps({"sparsity": sparsity, "top_h": topk, "q": qs}, indent=1)
    )

    page = ROOT / "docs" / "RESULTS.md"
    marker = "<!-- generated tables -->"
    intro = page.read_text().split(marker)[0] if page.exists() else "# Results\n\n"
    body = f"""{marker}

### Wanda sparsity (p 0.5, q 0.5, max_p 0.7, top_h 10)

{table(sparsity, "sparsity")}

Chosen for the sweeps: **sparsity {s}** (the largest ASR increase among sparsities where at
most {args.max_degenerate:.0%} of the pruned model's answers are degenerate: fewer than half
of their words distinct).

### top_h at sparsity {s} (p 0.5, q 0.5, max_p 0.7)

{table(topk, "top_h")}

### q at sparsity {s} (p 0.5, max_p 0.7, top_h 10)

{table(qs, "q")}

![ASR against sparsity and top_h](results-smollm2.png)

Selected heads at sparsity {s}, top_h 20: {topk[-1]["heads"]}.
"""
    page.write_text(intro.rstrip() + "\n\n" + body)
    print(f"wrote {page} and {png}")


if __name__ == "__main__":
    main()
