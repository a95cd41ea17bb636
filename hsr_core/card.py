"""The Hugging Face model card of an exported pruned or realigned model.

Built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``: the metadata block carries
``library_name: transformers``, ``license``, ``pipeline_tag`` (``text-generation``, or
``image-text-to-text`` for vision-language models), ``base_model`` (the real base model: the
hub id a model was loaded from, ``HuggingFaceTB/SmolLM2-135M-Instruct`` for the built-in
SmolLM2 models, none for the tiny in-process models), tags and, when the variants were
evaluated, the card's own variant's ASR as ``model-index`` results. The text records how the
model was made (calibration data, Wanda settings, achieved sparsity; for a realigned model
p / q / max_p / top_h, the selected heads and the restored count) and the evaluation: its judge,
every rate with its Wilson 95% interval, RSR with its paired bootstrap interval, and which
differences are within the noise. Everything comes from the ``summary.json`` and ``eval.json``
dicts the pipeline writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import PRUNER_LABELS
from .evaluate import PERPLEXITY_IS, noise_notes, rate_text

SMOLLM2_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROJECT_LICENSE = "apache-2.0"
TAGS = ["pruned", "wanda", "hsr", "safety", "hsr-workbench"]


def base_model_of(name: str, model_path: str | None = None) -> str | None:
    """The hub id of the model a run started from: the name itself for a hub id, SmolLM2's for
    the built-in SmolLM2 models, a local folder's own card's ``base_model`` (or None)."""
    if name.startswith("builtin:"):
        return SMOLLM2_BASE if name.split(":", 1)[1].startswith("smollm2") else None
    if Path(name).expanduser().exists():
        data = _folder_card(model_path or name)
        base = data.get("base_model") if data else None
        return base if isinstance(base, str) else None
    return name if "/" in name else None


def license_of(name: str, model_path: str | None = None) -> str:
    """The license to state: SmolLM2's and the tiny built-ins' is Apache-2.0 (the tiny models
    are made by this project's code); otherwise the base model's own card's, else ``unknown``."""
    if name.startswith("builtin:"):
        return PROJECT_LICENSE
    data = _folder_card(model_path) if model_path else None
    lic = data.get("license") if data else None
    return lic if isinstance(lic, str) and lic else "unknown"


def _folder_card(folder: str | None) -> dict[str, Any] | None:
    """The metadata of ``folder/README.md`` (a downloaded snapshot's card), when readable."""
    if not folder:
        return None
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception:  # a README without valid metadata says nothing
        return None


def _pct(x: Any) -> str:
    return "n/a" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.1%}"


def _eval_results(variant: str, evaluation: dict[str, Any], judge: str) -> list[EvalResult] | None:
    v = evaluation.get("variants", {}).get(variant)
    if not v:
        return None
    results = []
    for key, label in (
        ("asr", f"ASR, {judge} judge (%)"),
        ("asr_coherent", f"ASR, {judge} judge, incoherent answers excluded (%)"),
        ("refusal_rate_benign", f"refusals on benign prompts, {judge} judge (%)"),
    ):
        value = v.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        lo, hi = v.get("ci95", {}).get(key, [math.nan, math.nan])
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="refusal of harmful requests",
                dataset_type="hsr-workbench-eval",
                dataset_name="HSR Workbench evaluation prompts",
                metric_type=key,
                metric_name=label,
                metric_value=round(100 * value, 2),
                metric_args={
                    "wilson_95_low": round(100 * lo, 2),
                    "wilson_95_high": round(100 * hi, 2),
                }
                if math.isfinite(lo) and math.isfinite(hi)
                else None,
            )
        )
    return results or None


def _evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    judge = evaluation.get("judge", {})
    cfg = evaluation.get("config", {})
    lines = [
        "",
        "## Evaluation",
        "",
        f"Judge: **{judge.get('name', 'keyword')}**: {judge.get('rule', '')}. An answer that "
        f"is not refused is *incoherent* when {judge.get('incoherent', 'degenerate')}. Greedy "
        f"answers of up to {cfg.get('max_new_tokens')} new tokens to "
        f"{evaluation.get('n_prompts')} prompts. Brackets: Wilson 95% intervals.",
        "",
        "| variant | ASR | ASR, incoherent excluded | incoherent (harmful) "
        f"| refusals on benign | {PERPLEXITY_IS} |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in evaluation.get("variants", {}).items():
        ci = v.get("ci95", {})
        ppl = v.get("perplexity")
        ppl_text = f"{ppl:.2f}" if isinstance(ppl, (int, float)) and math.isfinite(ppl) else "n/a"
        lines.append(
            f"| {name} | {rate_text(v['asr'], ci.get('asr'))} "
            f"| {rate_text(v.get('asr_coherent', math.nan), ci.get('asr_coherent'))} "
            f"| {_pct(v.get('incoherent_rate_harmful'))} "
            f"| {rate_text(v['refusal_rate_benign'], ci.get('refusal_rate_benign'))} "
            f"| {ppl_text} |"
        )
    notes = noise_notes(evaluation)
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if evaluation.get("rsr") is None and evaluation.get("rsr_ci95") is not None:
        lines += ["", "RSR is undefined: pruning did not raise the attack success rate."]
    return lines


def model_card(
    variant: str, summary_: dict[str, Any], evaluation: dict[str, Any] | None = None
) -> str:
    """A Hugging Face model card recording how a pruned / realigned model was made.

    Args:
        variant: ``pruned`` or ``realigned``.
        summary_: the ``summary.json`` dict of the run (``pipeline.summary``).
        evaluation: the ``eval.json`` dict, when the variants were evaluated.

    Returns:
        The card's text (``README.md``): YAML metadata, then Markdown.
    """
    cfg = summary_.get("config", {})
    wanda, realign_cfg = cfg.get("wanda", {}), cfg.get("realign", {})
    name = summary_.get("model", "")
    path = summary_.get("model_path")
    structure = (
        "unstructured"
        if wanda.get("structure") == "unstructured"
        else f"{wanda.get('n')}:{wanda.get('m')}"
    )
    base = base_model_of(name, path)
    pruner = PRUNER_LABELS.get(wanda.get("pruner", "wanda"), str(wanda.get("pruner")))
    judge = (evaluation or {}).get("judge", {}).get("name", "keyword")
    data = ModelCardData(
        library_name="transformers",
        license=license_of(name, path),
        pipeline_tag="image-text-to-text" if summary_.get("vision") else "text-generation",
        base_model=base,
        tags=TAGS
        + ([str(wanda.get("pruner"))] if wanda.get("pruner", "wanda") != "wanda" else [])
        + ([f"{judge}-judge"] if evaluation else []),
        model_name=f"{name.split('/')[-1].replace('builtin:', '')}-{variant}",
        eval_results=_eval_results(variant, evaluation, judge) if evaluation else None,
    )
    rows = [
        ("base model", f"`{base}`" if base else f"`{name}` (made in-process, not on the hub)"),
        ("loaded as", f"`{name}`"),
        ("variant", variant),
        ("calibration data", f"`{cfg.get('data')}`"),
        ("pruner", pruner),
        (
            f"{pruner} sparsity",
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
    body = [
        f"# {variant.capitalize()} model made with HSR Workbench",
        "",
        f"{pruner} pruning"
        + (" (the weights it kept carry its update)" if pruner == "SparseGPT" else "")
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
        body += _evaluation_section(evaluation)
    card = ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(body)
    )
    return str(card).rstrip("\n") + "\n"
