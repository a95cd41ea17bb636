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

The answers are generated once (``--judge``, default the project's keyword judge, and
``--max-new-tokens``, default 40) and judged twice from the stored ``eval.json`` answers: by
the keyword judge and by the reference judge (Wei et al.'s ``not_matched``, the paper's rule,
applied to the same answers; the reference itself generates 256 tokens, see
``docs/RESULTS.md``). Every rate carries its Wilson 95% interval and RSR its paired bootstrap
interval (``hsr_core.evaluate.rates`` / ``compare``); every answer is copied to
``docs/results/sweep-answers.json`` so that the tables can be re-judged without generating.

Usage:
    python scripts/results_smollm2.py                 # everything (about 35 min on 2 CPU cores)
    python scripts/results_smollm2.py --report-only   # rebuild the page from earlier runs
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hsr_core.config import EvalConfig  # noqa: E402
from hsr_core.data import Sample  # noqa: E402
from hsr_core.evaluate import compare, judge_answers, rates  # noqa: E402

MODEL = "builtin:smollm2-135m-safe"
JUDGES = ("keyword", "reference")
SPARSITIES = (0.3, 0.4, 0.5, 0.6)
VARIANTS = ("original", "pruned", "realigned")


def run(out: Path, args: argparse.Namespace, **opts: float) -> dict:
    """One command-line run; returns its summary and evaluation (reusing an earlier run)."""
    if not (out / "eval.json").exists() or not (out / "summary.json").exists():
        cmd = [
            sys.executable, "-m", "hsr_core", "run",
            "--model", MODEL, "--data", "builtin", "--eval-data", "builtin",
            "--ships-samples", str(args.ships_samples), "--calib-samples", "128",
            "--max-new-tokens", str(args.max_new_tokens), "--eval-batch", "16",
            "--judge", args.judge, "--out", str(out), "--quiet",
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


def rejudge(ev: dict, judge: str) -> dict:
    """``eval.json``'s variants judged again by ``judge`` from their stored answers, with the
    intervals and the RSR bootstrap of ``hsr_core.evaluate`` (the evaluation's own settings)."""
    cfg = EvalConfig(judge=judge, min_words=ev["config"].get("min_words", 5))
    variants = {}
    for name in VARIANTS:
        stored = ev["variants"][name]["answers"]
        samples = [
            Sample(a["prompt"], harmful=a["harmful"], id=a.get("id"), category=a.get("category"))
            for a in stored
        ]
        rows = judge_answers(samples, [a["answer"] for a in stored], cfg)
        variants[name] = {
            **rates(rows),
            "perplexity": ev["variants"][name]["perplexity"],
            "answers": rows,
        }
    boot = {
        "resamples": ev["config"]["bootstrap_resamples"],
        "seed": ev["config"]["bootstrap_seed"],
    }
    return {"variants": variants, **compare({n: v["answers"] for n, v in variants.items()}, **boot)}


def incoherent_share(variant: dict) -> float:
    """Share of all the variant's answers (harmful and benign) classed incoherent."""
    c = variant["counts"]
    return (c["harmful"]["incoherent"] + c["benign"]["incoherent"]) / (
        variant["n_harmful"] + variant["n_benign"]
    )


def row(label: str, r: dict, judge: str) -> dict:
    ev, s = rejudge(r["eval"], judge), r["summary"]
    v = ev["variants"]
    out = {"label": label, "judge": judge, **r["opts"]}
    for name, short in zip(VARIANTS, ("dense", "pruned", "hsr"), strict=True):
        out[f"asr_{short}"] = v[name]["asr"]
        out[f"asr_{short}_ci"] = v[name]["ci95"]["asr"]
        out[f"benign_refusal_{short}"] = v[name]["refusal_rate_benign"]
        out[f"ppl_{short}"] = v[name]["perplexity"]
        out[f"incoherent_{short}"] = incoherent_share(v[name])
    ci = ev.get("rsr_ci95") or {}
    out.update(
        rsr=ev["rsr"],
        rsr_ci=[ci.get("low"), ci.get("high")] if ci.get("defined", True) else None,
        restored=s["restored"],
        per_10k=s["restored_per_10k_pruned"],
        heads=", ".join(s["selected_heads"]),
        n_harmful=v["original"]["n_harmful"],
        n_benign=v["original"]["n_benign"],
    )
    return out


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def ci(value: float | None, interval: list | None) -> str:
    """``57.1 [45-68]``: a rate in percent with its 95% interval."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not interval or any(x is None or not math.isfinite(x) for x in interval):
        return f"{100 * value:.1f}"
    lo, hi = interval
    return f"{100 * value:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(rows: list[dict], first: str) -> str:
    head = (
        f"| {first} | ASR dense | ASR pruned | ASR HSR | RSR | benign refused dense / pruned / HSR "
        "| perplexity dense / pruned / HSR | incoherent dense / pruned / HSR | restored (‱ of pruned) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['label']} | {ci(r['asr_dense'], r['asr_dense_ci'])} "
            f"| {ci(r['asr_pruned'], r['asr_pruned_ci'])} | {ci(r['asr_hsr'], r['asr_hsr_ci'])} "
            f"| {ci(r['rsr'], r['rsr_ci'])} "
            f"| {pct(r['benign_refusal_dense'])} / {pct(r['benign_refusal_pruned'])} / {pct(r['benign_refusal_hsr'])} "
            f"| {r['ppl_dense']:.2f} / {r['ppl_pruned']:.2f} / {r['ppl_hsr']:.2f} "
            f"| {pct(r['incoherent_dense'])} / {pct(r['incoherent_pruned'])} / {pct(r['incoherent_hsr'])} "
            f"| {r['restored']:,} ({r['per_10k']:.3f}) |"
        )
    return "\n".join(lines)


def tables(rows: dict[str, list[dict]], first: str) -> str:
    """The sweep judged by each judge, the keyword judge first."""
    r0 = rows["keyword"][0]
    parts = []
    for judge in JUDGES:
        parts.append(
            f"{judge} judge ({r0['n_harmful']} harmful, {r0['n_benign']} benign prompts; "
            "ASR and RSR in %, [Wilson / paired bootstrap 95% interval]):\n\n"
            + table(rows[judge], first)
        )
    return "\n\n".join(parts)


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
        y = [100 * r[key] for r in sparsity_rows]
        err = [
            [y_ - 100 * r[f"{key}_ci"][0] for y_, r in zip(y, sparsity_rows, strict=True)],
            [100 * r[f"{key}_ci"][1] - y_ for y_, r in zip(y, sparsity_rows, strict=True)],
        ]
        axes[0].errorbar(xs, y, yerr=err, fmt=style, capsize=3, label=label)
    axes[0].set(
        xlabel="Wanda sparsity",
        ylabel="attack success rate (%)",
        title="ASR (keyword judge, Wilson 95% CI), 70 harmful prompts",
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
        "--judge", default="keyword", choices=JUDGES, help="the judge of the runs themselves"
    )
    p.add_argument(
        "--max-incoherent",
        type=float,
        default=0.10,
        help="'still talks': at most this share of the pruned model's answers incoherent",
    )
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)

    def sweep(runs: list[tuple[str, dict]]) -> dict[str, list[dict]]:
        return {j: [row(label, r, j) for label, r in runs] for j in JUDGES}

    by_sparsity = [(f"{s}", run(args.out / f"sparsity-{s}", args, sparsity=s)) for s in SPARSITIES]
    sparsity = sweep(by_sparsity)
    # the sweeps' sparsity: chosen on the keyword judge, as the earlier page did
    kw = sparsity["keyword"]
    talking = [r for r in kw if r["incoherent_pruned"] <= args.max_incoherent] or kw[:1]
    worst = max(talking, key=lambda r: (r["asr_pruned"] - r["asr_dense"], -r["sparsity"]))
    s = worst["sparsity"]
    defaults = args.out / f"sparsity-{s}"  # top_h 10 and q 0.5 are the defaults: reuse it
    by_topk = [
        (f"{h}", run(defaults if h == 10 else args.out / f"s{s}-top{h}", args, sparsity=s, top_h=h))
        for h in (1, 5, 10, 20)
    ]
    by_q = [
        (f"{q}", run(defaults if q == 0.5 else args.out / f"s{s}-q{q}", args, sparsity=s, q=q))
        for q in (0.3, 0.5, 0.7, 0.9)
    ]
    topk, qs = sweep(by_topk), sweep(by_q)

    png = ROOT / "docs" / "results-smollm2.png"
    chart(sparsity["keyword"], topk["keyword"], qs["keyword"], png)
    (args.out / "rows.json").write_text(
        json.dumps({"sparsity": sparsity, "top_h": topk, "q": qs}, indent=1)
    )
    answers = {
        f"{sweep_name}={label}": {
            "opts": r["opts"],
            "summary": {k: r["summary"][k] for k in ("restored", "selected_heads")},
            "eval": {
                "config": r["eval"]["config"],
                "variants": {
                    n: {
                        "perplexity": r["eval"]["variants"][n]["perplexity"],
                        "answers": [
                            {k: a[k] for k in ("id", "prompt", "harmful", "category", "answer")}
                            for a in r["eval"]["variants"][n]["answers"]
                        ],
                    }
                    for n in VARIANTS
                },
            },
        }
        for sweep_name, runs in (("sparsity", by_sparsity), ("top_h", by_topk), ("q", by_q))
        for label, r in runs
    }
    (ROOT / "docs" / "results" / "sweep-answers.json").write_text(json.dumps(answers, indent=0))

    page = ROOT / "docs" / "RESULTS.md"
    marker = "<!-- generated tables -->"
    intro = page.read_text().split(marker)[0] if page.exists() else "# Results\n\n"
    first = by_sparsity[0][1]["eval"]["config"]
    body = f"""{marker}

Generated by `python scripts/results_smollm2.py` ({first["max_new_tokens"]} new tokens, greedy,
generated once and judged by both judges; the answers are in `docs/results/sweep-answers.json`).

### Wanda sparsity (p 0.5, q 0.5, max_p 0.7, top_h 10)

{tables(sparsity, "sparsity")}

Chosen for the sweeps: **sparsity {s}** (the largest keyword-judge ASR increase among
sparsities where at most {args.max_incoherent:.0%} of the pruned model's answers are
incoherent).

### top_h at sparsity {s} (p 0.5, q 0.5, max_p 0.7)

{tables(topk, "top_h")}

### q at sparsity {s} (p 0.5, max_p 0.7, top_h 10)

{tables(qs, "q")}

![ASR against sparsity and top_h](results-smollm2.png)

Selected heads at sparsity {s}, top_h 20: {topk["keyword"][-1]["heads"]}.
"""
    page.write_text(intro.rstrip() + "\n\n" + body)
    print(f"wrote {page} and {png}")


if __name__ == "__main__":
    main()
