"""The HSR steps in order, for the command line and the app alike.

Each step takes data and a config and returns data; this module adds what sits *around* the
algorithms: picking the samples, the on-disk cache of Ships scores and norm vectors, timing,
and writing the command line's files (``heads.jsonl``, ``summary.json``, ``eval.json``,
``save_pretrained`` folders).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from .config import (
    EvalConfig,
    ModelSpec,
    RealignConfig,
    ShipsConfig,
    WandaConfig,
    fingerprint,
    to_dict,
)
from .data import CalibrationData, Sample
from .evaluate import GuardJudge, generate, judge_answers, perplexity, rates, rsr
from .models import LoadedModel
from .progress import StopFlag
from .realign import RankCache, RestoreSet, restore_set
from .ships import ships_scores
from .store import ResultCache, folder_fingerprint
from .variants import VariantError, Variants
from .wanda import Masks, compute_masks, sparsity_report, wanda_norms


def model_key(loaded: LoadedModel) -> dict[str, Any]:
    """What a cached result depends on about the model."""
    return {
        "model": loaded.spec.name,
        "revision": loaded.spec.revision,
        "dtype": str(loaded.dtype),
        "weights": folder_fingerprint(loaded.path),
        "geometry": [
            loaded.adapter.num_layers,
            loaded.adapter.num_heads,
            loaded.adapter.num_kv_heads,
        ],
    }


def prepare_samples(loaded: LoadedModel, samples: Sequence[Sample]) -> list[Sample]:
    """Give vision-language models a typographic image for image-less samples."""
    return data_mod.with_typographic_images(samples) if loaded.is_vision else list(samples)


def probe_prompts(loaded: LoadedModel, calib: CalibrationData, cfg: ShipsConfig) -> list[Sample]:
    """The Ships probe prompts: harmful requests of the safety set (no responses)."""
    picked = data_mod.select(calib.safety, cfg.num_samples, cfg.seed)
    return prepare_samples(loaded, [replace(s, response=None) for s in picked])


def calibration_samples(
    loaded: LoadedModel, calib: CalibrationData, cfg: WandaConfig
) -> tuple[list[Sample], list[Sample]]:
    """``(safety, utility)`` calibration samples, ``cfg.num_samples`` of each."""
    return (
        prepare_samples(loaded, data_mod.select(calib.safety, cfg.num_samples, cfg.seed)),
        prepare_samples(loaded, data_mod.select(calib.utility, cfg.num_samples, cfg.seed)),
    )


@dataclass
class Timed:
    """A result, whether it came from the cache, and how long it took (seconds)."""

    value: Any
    cached: bool
    seconds: float


def attribute(
    loaded: LoadedModel,
    probes: Sequence[Sample],
    cfg: ShipsConfig,
    cache: ResultCache,
    *,
    recompute: bool = False,
    should_stop: StopFlag = None,
) -> Timed:
    """Ships scores ``[L, H]``, from the cache when the same model, data and config were seen."""
    t0 = time.perf_counter()
    parts = {
        "model": model_key(loaded),
        "data": data_mod.fingerprint(probes),
        "ships": {k: v for k, v in to_dict(cfg).items() if k != "batch_size"},
    }
    if not recompute and (hit := cache.load("ships", parts)) is not None:
        return Timed(hit["scores"], True, time.perf_counter() - t0)
    scores = ships_scores(loaded, probes, cfg, should_stop=should_stop)
    cache.save("ships", parts, {"scores": scores})
    return Timed(scores, False, time.perf_counter() - t0)


def calibrate_set(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    cache: ResultCache,
    *,
    label: str,
    recompute: bool = False,
    should_stop: StopFlag = None,
) -> Timed:
    """Norm vectors of one calibration set (``label`` is ``safety`` or ``utility``), cached."""
    t0 = time.perf_counter()
    parts = {
        "model": model_key(loaded),
        "data": data_mod.fingerprint(samples),
        "tokens": cfg.tokens,
    }
    if not recompute and (hit := cache.load("norms", parts)) is not None:
        return Timed(hit, True, time.perf_counter() - t0)
    norms = wanda_norms(
        loaded, samples, cfg, should_stop=should_stop, desc=f"Wanda statistics ({label})"
    )
    cache.save("norms", parts, norms)
    return Timed(norms, False, time.perf_counter() - t0)


@dataclass
class Norms:
    safety: dict[str, torch.Tensor]
    utility: dict[str, torch.Tensor]


def calibrate(
    loaded: LoadedModel,
    calib: CalibrationData,
    cfg: WandaConfig,
    cache: ResultCache,
    *,
    recompute: bool = False,
    should_stop: StopFlag = None,
) -> Timed:
    """Safety and utility norm vectors (``Timed`` of ``Norms``)."""
    t0 = time.perf_counter()
    safety, utility = calibration_samples(loaded, calib, cfg)
    s = calibrate_set(
        loaded, safety, cfg, cache, label="safety", recompute=recompute, should_stop=should_stop
    )
    u = calibrate_set(
        loaded, utility, cfg, cache, label="utility", recompute=recompute, should_stop=should_stop
    )
    return Timed(Norms(s.value, u.value), s.cached and u.cached, time.perf_counter() - t0)


def prune(
    variants: Variants,
    norms: Norms,
    calib: CalibrationData,
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
) -> Timed:
    """Compute masks (one-shot or sequential) and install them in ``variants``; value: Masks."""
    t0 = time.perf_counter()
    with variants.use("original") as loaded:
        _, utility = calibration_samples(loaded, calib, cfg)
        masks = compute_masks(loaded, norms.utility, utility, cfg, should_stop=should_stop)
    variants.set_masks(masks)
    return Timed(masks, False, time.perf_counter() - t0)


def rank_cache(variants: Variants, norms: Norms) -> RankCache:
    """Ranks over the dense weights, reusable across realignment settings."""
    return RankCache(variants.loaded, norms.safety, norms.utility, weight_of=variants.dense_weight)


def realign(
    variants: Variants, scores: torch.Tensor, cfg: RealignConfig, ranks: RankCache
) -> Timed:
    """Compute the restore set and install it in ``variants``; value: RestoreSet."""
    t0 = time.perf_counter()
    if variants.masks is None:
        raise VariantError("prune first: realignment restores weights that the mask pruned")
    rs = restore_set(variants.loaded, variants.masks, scores, cfg, ranks)
    variants.set_restore(rs)
    return Timed(rs, False, time.perf_counter() - t0)


def evaluate(
    variants: Variants,
    samples: Sequence[Sample],
    cfg: EvalConfig,
    *,
    which: Sequence[str] | None = None,
    judge: GuardJudge | None = None,
    should_stop: StopFlag = None,
    on_variant: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate answers with each variant and score them.

    Returns:
        ``{"variants": {name: {rates..., "perplexity", "answers": [...]}}, "rsr": float|None}``
    """
    samples = prepare_samples(variants.loaded, samples)
    which = list(which or variants.available())
    reference = [s for s in samples if not s.harmful and s.response]
    out: dict[str, Any] = {"variants": {}, "config": to_dict(cfg), "n_prompts": len(samples)}
    for name in which:
        if on_variant:
            on_variant(name)
        with variants.use(name) as loaded:
            answers = generate(
                loaded, samples, cfg, should_stop=should_stop, desc=f"Generating ({name})"
            )
            ppl = (
                perplexity(loaded, reference, cfg.batch_size, should_stop=should_stop)
                if reference
                else math.nan
            )
        rows = judge_answers(samples, answers, cfg, judge)
        out["variants"][name] = {**rates(rows), "perplexity": ppl, "answers": rows}
    v = out["variants"]
    out["rsr"] = (
        rsr(v["original"]["asr"], v["pruned"]["asr"], v["realigned"]["asr"])
        if {"original", "pruned", "realigned"} <= set(v)
        else None
    )
    return out


def export_variant(variants: Variants, variant: str, folder: Path, card: str | None = None) -> Path:
    """``save_pretrained`` the variant's weights with its tokenizer or processor.

    Args:
        variants: the model and its masks / restore set.
        variant: ``pruned`` or ``realigned`` (or ``original``).
        folder: destination (created).
        card: model card text written as ``README.md`` (see ``model_card``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with variants.use(variant) as loaded:
        loaded.model.save_pretrained(folder)
    (loaded.processor or loaded.tokenizer).save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


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


# ---------------------------------------------------------------------------------------------
# a whole run, as the command line does it


@dataclass
class RunConfig:
    """Everything a run needs (the command line's arguments, as configs)."""

    model: ModelSpec
    data: str = "builtin"
    columns: dict[str, str] | None = None
    utility_data: str | None = None
    ships: ShipsConfig = field(default_factory=ShipsConfig)
    wanda: WandaConfig = field(default_factory=WandaConfig)
    realign: RealignConfig = field(default_factory=RealignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    heads_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": to_dict(self.model),
            "data": self.data,
            "columns": self.columns,
            "utility_data": self.utility_data,
            "ships": to_dict(self.ships),
            "wanda": to_dict(self.wanda),
            "realign": to_dict(self.realign),
            "eval": to_dict(self.eval),
        }

    def key(self) -> str:
        return fingerprint(self.to_dict())


def write_json(path: Path, obj: Any) -> Path:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def summary(
    loaded: LoadedModel,
    run: RunConfig,
    masks: Masks | None,
    restore: RestoreSet | None,
    timings: dict[str, float],
    cached: dict[str, bool],
) -> dict[str, Any]:
    """The ``summary.json`` contract."""
    out: dict[str, Any] = {
        "config": run.to_dict(),
        "model": loaded.spec.name,
        "model_path": str(loaded.path),
        "num_layers": loaded.adapter.num_layers,
        "num_heads": loaded.adapter.num_heads,
        "num_kv_heads": loaded.adapter.num_kv_heads,
        "head_dim": loaded.adapter.head_dim,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "cached": cached,
    }
    if masks is not None:
        rep = sparsity_report(loaded, masks)
        out.update(
            pruned_weights=rep["pruned_weights"],
            prunable_weights=rep["prunable_weights"],
            achieved_sparsity=rep["sparsity"],
            sparsity_per_layer=rep["per_layer"],
            sparsity_per_module=rep["per_module"],
        )
    if restore is not None:
        out.update(restore.summary())
    return out
