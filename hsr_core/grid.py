"""The paper's grid: each base pruner, pruned and +HSR, on the same prompts (issue 15).

``run_grid`` prunes the model with every pruner asked for, realigns each pruning with the same
Ships scores and HSR settings (the restore set ranked by the Wanda scores, whatever the
pruner: docs/METHOD.md "HSR with other pruners"), and answers the same evaluation prompts with
the original once and with every pruned and realigned variant. Each row holds ASR with its
Wilson 95% interval, RSR with its paired-bootstrap interval (prompts resampled, the original's
answers shared), benign refusals, perplexity (the utility), restored weights and their share
per 10,000 pruned. ``grid_table`` writes it as the Markdown table of docs/RESULTS.md.

The command line: ``python -m hsr_core grid --model M --data D --eval-data E --pruners
wanda,sparsegpt,snip,magnitude --sparsity 0.4 --out DIR`` (``grid.json``, ``grid.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import pipeline as pl
from .config import PRUNER_LABELS, PRUNER_MODES, EvalConfig, RealignConfig, WandaConfig, to_dict
from .evaluate import compare
from .progress import StopFlag, check_stop


def pruner_config(base: WandaConfig, pruner: str, mode: str | None = None) -> WandaConfig:
    """``base`` with ``pruner``, in ``mode`` when the pruner has it, else in its own default
    mode (the first of ``PRUNER_MODES``)."""
    modes = PRUNER_MODES.get(pruner, ("one-shot",))
    return replace(base, pruner=pruner, mode=mode if mode in modes else modes[0])


def _rate(v: dict[str, Any], key: str) -> dict[str, Any]:
    low, high = v["ci95"][key]
    return {"value": v[key], "low": low, "high": high}


def run_grid(
    variants: pl.Variants,
    scores: torch.Tensor,
    norms: pl.Norms,
    utility: Sequence[pl.Sample],
    samples: Sequence[pl.Sample],
    pruners: Sequence[str],
    wanda: WandaConfig,
    realign: RealignConfig,
    eval_cfg: EvalConfig,
    *,
    judge: pl.GuardJudge | None = None,
    mode: str | None = None,
    rank_scores: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    scratch: Path | None = None,
    should_stop: StopFlag = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Every pruner, pruned and +HSR, answering the same prompts.

    Args:
        variants: the model, dense (nothing installed); left with nothing installed.
        scores: Ships scores ``[num_layers, num_heads]``.
        norms: the Wanda safety and utility norms (``pipeline.calibrate``).
        utility: the prepared utility calibration samples (SparseGPT, SNIP, sequential Wanda).
        samples: the evaluation prompts (harmful and benign).
        pruners: names from ``config.PRUNERS``.
        wanda: sparsity, structure, token selection, samples.
        mode: each pruner's mode where it has it (None: each pruner's own default: Wanda
            one-shot, SparseGPT and SNIP sequential, magnitude one-shot).
        rank_scores: what the restore set ranks by when not Wanda (``pipeline.ranking_scores``).
        realign: the HSR settings, the same for every pruner.
        eval_cfg: generation, judge and bootstrap settings.

    Returns:
        ``{"config", "judge", "n_prompts", "original", "rows": [...]}``; each row: ``pruner``,
        ``mode``, ``pruned`` / ``realigned`` (``asr``, ``refusal_rate_benign`` as value with
        Wilson interval, ``perplexity``), ``rsr`` with ``rsr_ci95``, ``restored``,
        ``restored_per_10k_pruned``, ``achieved_sparsity``, ``prune_s``, ``heads``, and
        ``answers`` per variant.
    """
    if variants.masks is not None:
        variants.install(None, None)
    ranks = pl.rank_cache(variants, norms, rank_scores)
    log("Evaluating the original model")
    base = pl.evaluate(
        variants, samples, eval_cfg, which=["original"], judge=judge, should_stop=should_stop
    )
    orig = base["variants"]["original"]
    out: dict[str, Any] = {
        "config": {
            "wanda": to_dict(wanda),
            "realign": to_dict(realign),
            "eval": to_dict(eval_cfg),
            "pruners": list(pruners),
        },
        "judge": base["judge"],
        "n_prompts": base["n_prompts"],
        "original": {
            "asr": _rate(orig, "asr"),
            "refusal_rate_benign": _rate(orig, "refusal_rate_benign"),
            "perplexity": orig["perplexity"],
        },
        "rows": [],
    }
    try:
        for name in pruners:
            check_stop(should_stop)
            cfg = pruner_config(wanda, name, mode)
            log(f"{PRUNER_LABELS[name]} ({cfg.mode}, {cfg.sparsity:g})")
            t0 = time.perf_counter()
            with variants.use("original") as dense:
                pruning = pl.prune(
                    dense, norms, utility, cfg, should_stop=should_stop, scratch=scratch
                ).value
            prune_s = time.perf_counter() - t0
            try:
                restore = pl.realign(variants.loaded, pruning.masks, scores, realign, ranks).value
                variants.install(pruning.masks, restore, pruning.updated)
                res = pl.evaluate(
                    variants,
                    samples,
                    eval_cfg,
                    which=["pruned", "realigned"],
                    judge=judge,
                    should_stop=should_stop,
                )
            finally:
                variants.install(None, None)
                pruning.close()
            rows = {
                "original": orig["answers"],
                **{k: v["answers"] for k, v in res["variants"].items()},
            }
            both = compare(
                rows, resamples=eval_cfg.bootstrap_resamples, seed=eval_cfg.bootstrap_seed
            )
            report = pl.sparsity_report(variants.loaded, pruning.masks)
            row = {
                "pruner": name,
                "mode": cfg.mode,
                "achieved_sparsity": report["sparsity"],
                "prune_s": round(prune_s, 2),
                "restored": restore.count,
                "restored_per_10k_pruned": restore.per_10k_pruned,
                "heads": [h.label for h in restore.heads],
                "rsr": both["rsr"],
                "rsr_ci95": both.get("rsr_ci95"),
                "asr_differences": both["asr_differences"],
            }
            for v in ("pruned", "realigned"):
                r = res["variants"][v]
                row[v] = {
                    "asr": _rate(r, "asr"),
                    "refusal_rate_benign": _rate(r, "refusal_rate_benign"),
                    "perplexity": r["perplexity"],
                }
            row["answers"] = {k: v["answers"] for k, v in res["variants"].items()}
            out["rows"].append(row)
            log(grid_line(row))
    finally:
        variants.install(None, None)
    out["original"]["answers"] = orig["answers"]
    return out


def _pct(r: dict[str, Any]) -> str:
    return f"{100 * r['value']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def _rsr(row: dict[str, Any]) -> str:
    if row["rsr"] is None or not math.isfinite(row["rsr"]):
        return "undefined (pruning did not raise ASR)"
    ci = row.get("rsr_ci95") or {}
    lo, hi = ci.get("low"), ci.get("high")
    span = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
    return f"{100 * row['rsr']:.1f}{span}"


def grid_line(row: dict[str, Any]) -> str:
    """One row as a log line."""
    return (
        f"{PRUNER_LABELS[row['pruner']]:>9}: ASR pruned {_pct(row['pruned']['asr'])}% -> "
        f"+HSR {_pct(row['realigned']['asr'])}%, RSR {_rsr(row)}%, "
        f"{row['restored']:,} restored ({row['restored_per_10k_pruned']:.3f} per 10k)"
    )


def grid_table(grid: dict[str, Any]) -> str:
    """The grid as a Markdown table shaped like the paper's (ASR %, RSR %, utility, ‱)."""
    o = grid["original"]
    j = grid["judge"]
    judge = j.get("name", "keyword") if isinstance(j, dict) else str(j)
    n = grid["n_prompts"]
    lines = [
        f"Judge: {judge}; {n} prompts (harmful and benign); intervals: Wilson 95% for rates, "
        "paired bootstrap 95% for RSR. Utility: perplexity of the benign reference answers "
        "(lower is better).",
        "",
        "| pruner | mode | ASR pruned % | ASR +HSR % | RSR % | benign refusals pruned / +HSR % "
        "| perplexity pruned / +HSR | restored (‱ of pruned) |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | | {_pct(o['asr'])} | | | {100 * o['refusal_rate_benign']['value']:.1f} "
        f"| {o['perplexity']:.2f} | |",
    ]
    for r in grid["rows"]:
        p, h = r["pruned"], r["realigned"]
        lines.append(
            f"| {PRUNER_LABELS[r['pruner']]} | {r['mode']} | {_pct(p['asr'])} | {_pct(h['asr'])} "
            f"| {_rsr(r)} | {100 * p['refusal_rate_benign']['value']:.1f} / "
            f"{100 * h['refusal_rate_benign']['value']:.1f} | {p['perplexity']:.2f} / "
            f"{h['perplexity']:.2f} | {r['restored']:,} ({r['restored_per_10k_pruned']:.3f}) |"
        )
    return "\n".join(lines) + "\n"
