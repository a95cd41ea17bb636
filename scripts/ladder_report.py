"""Tables and a chart of localization ladders (``python -m hsr_core localize`` outputs).

    python scripts/ladder_report.py NAME=out/ladder/localize.json [NAME=...] \
        [--png docs/ladder-smollm2.png]

prints one Markdown table per ladder (ASR with its Wilson 95% interval, the share of incoherent
answers, benign refusals, weights put back, their share of the pruned weights) and, with
``--png``, draws the ladders side by side (matplotlib). ``--judge`` re-judges the stored answers
(no generation) with another judge. Used for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsr_core.config import EvalConfig  # noqa: E402
from hsr_core.data import Sample  # noqa: E402
from hsr_core.evaluate import judge_answers, rates  # noqa: E402


def rejudge(ladder: dict[str, Any], judge: str) -> dict[str, Any]:
    """The ladder with every rung's stored answers judged again by ``judge``."""
    cfg = EvalConfig(judge=judge)
    rungs = []
    for r in ladder["rungs"]:
        samples = [
            Sample(a["prompt"], harmful=a["harmful"], id=a.get("id"), category=a.get("category"))
            for a in r["answers"]
        ]
        rows = judge_answers(samples, [a["answer"] for a in r["answers"]], cfg)
        measured = rates(rows)
        rungs.append(
            {
                **r,
                **measured,
                "asr_ci": measured["ci95"]["asr"],
                "refusal_rate_benign_ci": measured["ci95"]["refusal_rate_benign"],
                "answers": rows,
            }
        )
    return {**ladder, "rungs": rungs, "eval": {**ladder["eval"], "judge": judge}}


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(name: str, ladder: dict[str, Any]) -> str:
    ev = ladder["eval"]
    rungs = ladder["rungs"]
    head = (
        f"**{name}**: {ladder['n_prompts']} prompts ({rungs[0]['n_harmful']} harmful, "
        f"{rungs[0]['n_benign']} benign), {ev['max_new_tokens']} new tokens, greedy, "
        f"{ev.get('judge', 'keyword')} judge; {ladder['pruned_weights']:,} weights pruned.\n\n"
        "| rung | weights put back | ‱ of pruned | ASR [95% CI] | of which incoherent | "
        "benign refused |\n"
        "|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rungs:
        lo, hi = r["asr_ci"]
        lines.append(
            f"| {r['label']} | {r['restored']:,} | {r['restored_per_10k_pruned']:.1f} | "
            f"{pct(r['asr'])} [{100 * lo:.0f}-{100 * hi:.0f}] | "
            f"{pct(r.get('incoherent_rate_harmful'))} | {pct(r['refusal_rate_benign'])} |"
        )
    return head + "\n".join(lines) + "\n"


def chart(ladders: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(ladders), figsize=(6.2 * len(ladders), 4.6), sharey=False, squeeze=False
    )
    for ax, (name, ladder) in zip(axes[0], ladders.items(), strict=True):
        rows: list[tuple[str, list[dict[str, Any]]]] = []
        for r in ladder["rungs"]:
            if r["name"] == "random_heads":
                if rows and rows[-1][1][0]["name"] == "random_heads":
                    rows[-1][1].append(r)
                    continue
                rows.append(("same count in random heads", [r]))
            else:
                rows.append((r["label"], [r]))
        ys = list(range(len(rows)))[::-1]
        for y, (_, runs) in zip(ys, rows, strict=True):
            values = [100 * r["asr"] for r in runs]
            mean = sum(values) / len(values)
            if len(runs) > 1:
                lo, hi = min(values), max(values)
                ax.scatter(values, [y] * len(values), color="#1F2937", marker="D", s=14, zorder=3)
            else:
                lo, hi = (100 * v for v in runs[0]["asr_ci"])
            color = "#E4572E" if runs[0]["name"] == "pruned" else "#4C78A8"
            if runs[0]["name"] in ("dense", "dense_ablated"):
                color = "#6B7280"
            ax.barh(y, mean, color=color, alpha=0.85)
            ax.errorbar(mean, y, xerr=[[mean - lo], [hi - mean]], color="#111827", capsize=3)
            ax.text(min(hi + 2, 99), y, f"{mean:.0f}%", va="center", fontsize=8)
        ax.set_yticks(ys, [label for label, _ in rows], fontsize=8)
        ax.set_xlim(0, 105)
        ax.set_xlabel("ASR (% of harmful prompts answered), 95% interval")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", color="#E5E7EB")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("ladders", nargs="+", help="NAME=path/to/localize.json")
    p.add_argument("--png", type=Path, default=None, help="write the chart here")
    p.add_argument(
        "--judge", default=None, choices=["keyword", "reference"], help="re-judge the answers"
    )
    args = p.parse_args()
    ladders = {}
    for item in args.ladders:
        name, _, path = item.partition("=")
        ladders[name] = json.loads(Path(path).read_text(encoding="utf-8"))
        if args.judge:
            ladders[name] = rejudge(ladders[name], args.judge)
    for name, ladder in ladders.items():
        print(table(name, ladder))
    if args.png:
        chart(ladders, args.png)
        print(f"chart: {args.png}")


if __name__ == "__main__":
    main()
