"""The Hugging Face model card of an exported pruned or realigned model.

It records how the model was made (base model, calibration data, Wanda settings, achieved
sparsity, and for a realigned model p / q / max_p / top_h, the selected heads and the restored
count) and, when the variants were evaluated, the evaluation, from the ``summary.json`` and
``eval.json`` dicts the pipeline writes.
"""

from __future__ import annotations

from typing import Any


def model_card(
    variant: str, summary_: dict[str, Any], evaluation: dict[str, Any] | None = None
) -> str:
    """A Hugging Face model card recording how a pruned / realigned model was made.

    Args:
        variant: ``pruned`` or ``realigned``.
        summary_: the ``summary.json`` dict of the run (``summary``).
        evaluation: the ``eval.json`` dict, when the variants were evaluated.
    """
    cfg = summary_.get("config", {})
    wanda, realign_cfg = cfg.get("wanda", {}), cfg.get("realign", {})
    base = summary_.get("model", "")
    structure = (
        "unstructured"
        if wanda.get("structure") == "unstructured"
        else f"{wanda.get('n')}:{wanda.get('m')}"
    )
    rows = [
        ("base model", f"`{base}`"),
        ("variant", variant),
        ("calibration data", f"`{cfg.get('data')}`"),
        (
            "Wanda sparsity",
            f"{wanda.get('sparsity')} ({structure}, {wanda.get('mode')}, {wanda.get('tokens')} tokens)",
        ),
        ("achieved sparsity", f"{summary_.get('achieved_sparsity', float('nan')):.4f}"),
    ]
    if variant == "realigned":
        rows += [
            (
                "HSR p / q / max_p",
                f"{realign_cfg.get('p')} / {realign_cfg.get('q')} / {realign_cfg.get('max_p')}",
            ),
            ("top_h, slicing", f"{realign_cfg.get('top_h')}, {realign_cfg.get('slicing')}"),
            ("selected heads", ", ".join(summary_.get("selected_heads", []))),
            (
                "restored weights",
                f"{summary_.get('restored')} ({summary_.get('restored_per_10k_pruned', 0):.3f} per 10k pruned)",
            ),
        ]
    lines = [
        "---",
        f"base_model: {base}"
        if "/" in base and not base.startswith("builtin:")
        else "base_model: null",
        "tags: [pruned, wanda, hsr, safety]",
        "---",
        "",
        f"# {variant.capitalize()} model made with HSR Workbench",
        "",
        "Wanda pruning"
        + (
            " followed by Hierarchical Safety Realignment (HSR, ACL 2025 Findings): a small "
            "set of pruned weights inside the safety-critical attention heads (found with Ships) was restored "
            "to its dense value."
            if variant == "realigned"
            else "."
        ),
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    if evaluation:
        lines += [
            "",
            "## Evaluation",
            "",
            "| variant | refusals on harmful | refusals on benign | ASR | perplexity |",
            "|---|---|---|---|---|",
        ]
        for name, v in evaluation.get("variants", {}).items():
            lines.append(
                f"| {name} | {v['refusal_rate_harmful']:.1%} | {v['refusal_rate_benign']:.1%} | {v['asr']:.1%} | {v['perplexity']:.2f} |"
            )
        if evaluation.get("rsr") is not None:
            lines += ["", f"Refusal restoration rate (RSR): {evaluation['rsr']:.1%}."]
    return "\n".join(lines) + "\n"
