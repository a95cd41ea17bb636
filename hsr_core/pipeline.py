"""The HSR steps in order: the one door to the core, for the command line and the app alike.

Each step takes data and a config and returns data (``Timed`` values: scores, norms, masks, a
restore set, an evaluation); none of them installs anything into ``Variants``: whoever owns the
variants (the command line's run, the app's workbench) calls ``Variants.install(masks,
restore)``. This module adds what sits *around* the algorithms: picking and preparing the
samples (once per step), the on-disk cache of Ships scores and norm vectors, timing, and the
command line's files (``heads.jsonl``, ``summary.json``, ``eval.json``, ``save_pretrained``
folders).

The app (``ui/``) imports nothing of the core but this module and ``hsr_core.config``; the
names it needs from the other modules (types, errors, the chat turn engine, the model thread)
are re-exported here, in ``__all__`` (a test reads ``ui/``'s imports).
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from . import localize as localize_mod
from .builtin import builtin_names
from .card import model_card
from .chat import Reply, stream_columns
from .config import (
    ConfigError,
    EvalConfig,
    LocalizeConfig,
    RealignConfig,
    RunConfig,
    ShipsConfig,
    WandaConfig,
    to_dict,
)
from .data import (
    CalibrationData,
    DataError,
    ImageError,
    Sample,
    builtin_examples,
    load_calibration,
    load_eval,
    open_image,
    select,
)
from .distributed import world
from .encoding import iter_batches
from .evaluate import (
    PERPLEXITY_IS,
    GuardJudge,
    compare,
    evaluation_lines,
    generate,
    is_refusal,
    judge_answers,
    noise_notes,
    perplexity,
    rate_text,
    rates,
)
from .harness import LmEvalError, LmEvalMissing, run_lm_eval
from .heads import Head, all_heads, top_heads
from .judges import VERDICTS, classify, classify_answers, describe
from .masks import Masks, sparsity_report
from .models import (
    ArchitectureError,
    LoadedModel,
    ModelLoadError,
    check_supported,
    load_model,
    resolve_path,
)
from .progress import Cancelled, StopFlag, bar, check_stop
from .pruners import Pruning, prune_model
from .realign import KEEP_MASKS_MAX_WEIGHTS, RankCache, RestoreSet, head_rank_points, restore_set
from .screen import ScreenResult, screen_then_exact
from .ships import read_heads_jsonl, ships_scores, write_heads_jsonl
from .store import ResultCache, default_cache_dir, folder_fingerprint
from .variants import VARIANTS, UpdatedWeights, VariantError, Variants
from .wanda import wanda_norms
from .worker import ModelThread, torch_threads

__all__ = [
    # steps
    "attribute",
    "calibrate",
    "calibration_samples",
    "estimate",
    "evaluate",
    "export_variant",
    "generate",
    "free_memory",
    "head_rank_points",
    "localize",
    "model_card",
    "prepare_model",
    "probe_prompts",
    "prune",
    "rank_cache",
    "ranking_scores",
    "realign",
    "stream_columns",
    "summary",
    "warm_ranks",
    "write_json",
    # loading
    "builtin_examples",
    "builtin_names",
    "default_cache_dir",
    "load_calibration",
    "load_eval",
    "load_model",
    "open_image",
    "read_heads_jsonl",
    "rescored_heads",
    "screen_record",
    "select",
    "write_heads_jsonl",
    # the vocabulary
    "KEEP_MASKS_MAX_WEIGHTS",
    "VARIANTS",
    "CalibrationData",
    "Head",
    "LoadedModel",
    "Masks",
    "ModelThread",
    "Pruning",
    "UpdatedWeights",
    "Norms",
    "RankCache",
    "Reply",
    "ResultCache",
    "RestoreSet",
    "RunConfig",
    "Sample",
    "ScreenResult",
    "Timed",
    "Variants",
    "all_heads",
    "is_refusal",
    "PERPLEXITY_IS",
    "VERDICTS",
    "GuardJudge",
    "classify",
    "classify_answers",
    "load_judge",
    "evaluation_lines",
    "noise_notes",
    "rate_text",
    "sparsity_report",
    "top_heads",
    "torch_threads",
    # progress
    "bar",
    # errors a user can act on
    "ArchitectureError",
    "Cancelled",
    "DataError",
    "ImageError",
    "LmEvalError",
    "LmEvalMissing",
    "ModelLoadError",
    "OutOfMemoryError",
    "VariantError",
]


OutOfMemoryError = torch.OutOfMemoryError


def free_memory() -> None:
    """Hand freed memory back (garbage collection, and the GPU's cache where there is one)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_model(
    spec: Any, cache_root: Path | None, log: Callable[[str], None] | None = None
) -> Path:
    """Resolve a model spec to its folder (downloading or converting it) and check that HSR can
    map its architecture, before anything is loaded (a host can then release the model it has).

    Raises:
        ModelLoadError: unknown id, missing folder, failed download.
        ArchitectureError: an architecture the adapter cannot map.
    """
    path = resolve_path(spec, cache_root, log or (lambda _m: None))
    check_supported(path, trust_remote_code=spec.trust_remote_code)
    return path


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
    """A result, whether it came from the cache, and how long it took (seconds); ``extra``
    holds what a step returns besides its value (Ships screening: the ``ScreenResult``)."""

    value: Any
    cached: bool
    seconds: float
    extra: Any = None


def rescored_heads(loaded: LoadedModel, cfg: ShipsConfig, top_h: int) -> int:
    """How many heads exact Ships scores: every head, or ``candidates x top_h`` when
    screening (our extension)."""
    total = loaded.adapter.num_layers * loaded.adapter.num_heads
    return total if cfg.mode == "exact" else min(total, cfg.candidates * min(top_h, total))


def _ships_parts(
    loaded: LoadedModel, probes: Sequence[Sample], cfg: ShipsConfig, top_h: int = 10
) -> dict:
    ships = {k: v for k, v in to_dict(cfg).items() if k not in ("batch_size", "mode", "candidates")}
    if cfg.mode == "screen":  # exact results keep the keys they had before screening existed
        ships |= {"mode": "screen", "rescored": rescored_heads(loaded, cfg, top_h)}
    return {"model": model_key(loaded), "data": data_mod.fingerprint(probes), "ships": ships}


def _norms_parts(loaded: LoadedModel, samples: Sequence[Sample], cfg: WandaConfig) -> dict:
    return {"model": model_key(loaded), "data": data_mod.fingerprint(samples), "tokens": cfg.tokens}


@torch.inference_mode()
def _forward_seconds(loaded: LoadedModel, sample: Sample, with_response: bool) -> float:
    """The time of one forward pass of ``sample`` (the faster of two, after a warm-up)."""
    batch = next(iter_batches(loaded, [sample], 1, with_response=with_response))
    inputs = batch.to(loaded.device).inputs
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loaded.model(**inputs, use_cache=False)
        for device in loaded.devices:  # every GPU of a device_map group
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def estimate(
    loaded: LoadedModel,
    probes: Sequence[Sample],
    ships: ShipsConfig,
    safety: Sequence[Sample],
    utility: Sequence[Sample],
    wanda: WandaConfig,
    cache: ResultCache,
    *,
    recompute: bool = False,
    top_h: int = 10,
) -> dict[str, float]:
    """Rough seconds of Ships attribution and the Wanda statistics before they run (0 for a
    step the cache already has, unless ``recompute``), from one measured forward pass and the
    model's geometry.

    Ships replays, for every head of layer ``l``, layers ``l`` to ``L - 1`` with the head
    ablated: ``1 + H (L + 1) / 2`` forward passes' worth per probe prompt. Screening (our
    extension) takes about 4 (intact, forward and backward) plus the replay of its ``n``
    re-scored heads, ``n (L + 1) / (2 L)``. The statistics are one forward pass per
    calibration sample (twice that, sequential).

    Returns:
        ``{"attribute": s, "calibrate": s, "forward": s}``.
    """
    a = loaded.adapter
    out = {"attribute": 0.0, "calibrate": 0.0, "forward": 0.0}
    ships_parts = _ships_parts(loaded, probes, ships, top_h)
    ships_done = not recompute and cache.load("ships", ships_parts) is not None
    norms_done = not recompute and all(
        cache.load("norms", _norms_parts(loaded, s, wanda)) is not None for s in (safety, utility)
    )
    if probes and not ships_done:
        out["forward"] = _forward_seconds(loaded, probes[0], with_response=False)
        n = rescored_heads(loaded, ships, top_h)
        passes = 1 + n * (a.num_layers + 1) / (2 * a.num_layers)
        if ships.mode == "screen":
            passes += 4
        out["attribute"] = len(probes) * passes * out["forward"]
    if utility and not norms_done:
        forward = _forward_seconds(loaded, utility[0], with_response=True)
        passes = (len(safety) + len(utility)) * (2 if wanda.mode == "sequential" else 1)
        out["calibrate"] = passes * forward
        out["forward"] = out["forward"] or forward
    return out


def _cached(
    cache: ResultCache, kind: str, parts: dict, recompute: bool
) -> dict[str, torch.Tensor] | None:
    """The cache entry (None: a miss or ``recompute``). Under ``accelerate launch`` only the
    main process reads it and sends it to the others, so all take the same branch even when
    their caches differ (one per machine)."""
    w = world()
    hit = None if recompute or not w.is_main else cache.load(kind, parts)
    return w.broadcast(hit) if w.size > 1 else hit


def _keep(cache: ResultCache, kind: str, parts: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Save a result to the cache: once, by the main process, under ``accelerate launch``."""
    if world().is_main:
        cache.save(kind, parts, tensors)


def attribute(
    loaded: LoadedModel,
    probes: Sequence[Sample],
    cfg: ShipsConfig,
    cache: ResultCache,
    *,
    top_h: int = 10,
    recompute: bool = False,
    should_stop: StopFlag = None,
) -> Timed:
    """Ships scores ``[L, H]``, from the cache when the same model, data and config were seen.

    In ``screen`` mode (our extension, ``hsr_core.screen``) every head is screened and exact
    Ships re-scores the ``cfg.candidates x top_h`` best; the value is the merged table (exact
    scores first) and ``extra`` the ``ScreenResult`` (which scores are exact, the estimates).
    """
    t0 = time.perf_counter()
    parts = _ships_parts(loaded, probes, cfg, top_h)
    hit = _cached(cache, "ships", parts, recompute)
    if cfg.mode == "exact":
        if hit is not None:
            return Timed(hit["scores"], True, time.perf_counter() - t0)
        scores = ships_scores(loaded, probes, cfg, should_stop=should_stop)
        _keep(cache, "ships", parts, {"scores": scores})
        return Timed(scores, False, time.perf_counter() - t0)
    if hit is not None:
        res = ScreenResult(hit["scores"], hit["exact"], hit["screening"], float(hit["scale"][0]))
        return Timed(res.scores, True, time.perf_counter() - t0, res)
    total = loaded.adapter.num_layers * loaded.adapter.num_heads
    res = screen_then_exact(loaded, probes, cfg, top_h=min(top_h, total), should_stop=should_stop)
    tensors = {"scores": res.scores, "exact": res.exact, "screening": res.screening}
    scale = torch.tensor([res.scale], dtype=torch.float64)
    _keep(cache, "ships", parts, tensors | {"scale": scale})
    return Timed(res.scores, False, time.perf_counter() - t0, res)


def screen_record(result: ScreenResult, cfg: ShipsConfig) -> dict[str, Any]:
    """What ``screen.json`` holds: which heads have exact scores and every screening estimate
    (``heads.jsonl`` stays the reference's format, a score per head)."""
    heads = all_heads(*result.scores.shape)
    return {
        "mode": "screen (HSR Workbench's extension, not in the paper)",
        "candidates": cfg.candidates,
        "rescored": int(result.exact.sum()),
        "scale_of_screened_scores": result.scale,
        "exact": {h.label: bool(result.exact[h]) for h in heads},
        "screening": {h.label: float(result.screening[h]) for h in heads},
    }


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
    parts = _norms_parts(loaded, samples, cfg)
    if (hit := _cached(cache, "norms", parts, recompute)) is not None:
        return Timed(hit, True, time.perf_counter() - t0)
    norms = wanda_norms(
        loaded, samples, cfg, should_stop=should_stop, desc=f"Wanda statistics ({label})"
    )
    _keep(cache, "norms", parts, norms)
    return Timed(norms, False, time.perf_counter() - t0)


@dataclass
class Norms:
    safety: dict[str, torch.Tensor]
    utility: dict[str, torch.Tensor]


def calibrate(
    loaded: LoadedModel,
    safety: Sequence[Sample],
    utility: Sequence[Sample],
    cfg: WandaConfig,
    cache: ResultCache,
    *,
    recompute: bool = False,
    should_stop: StopFlag = None,
) -> Timed:
    """Safety and utility norm vectors (``Timed`` of ``Norms``) of prepared calibration samples
    (``calibration_samples``), each set cached. The model's weights must be dense."""
    t0 = time.perf_counter()
    s = calibrate_set(
        loaded, safety, cfg, cache, label="safety", recompute=recompute, should_stop=should_stop
    )
    u = calibrate_set(
        loaded, utility, cfg, cache, label="utility", recompute=recompute, should_stop=should_stop
    )
    return Timed(Norms(s.value, u.value), s.cached and u.cached, time.perf_counter() - t0)


def prune(
    loaded: LoadedModel,
    norms: Norms,
    utility: Sequence[Sample],
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
    scratch: Path | None = None,
) -> Timed:
    """The masks of ``cfg.pruner`` (Wanda one-shot from the utility norms or sequential over
    the prepared utility samples; SparseGPT, SNIP or magnitude); value: ``Pruning`` (masks,
    and SparseGPT's updated weights). The model's weights must be dense
    (``Variants.use("original")``); they are the same on return."""
    t0 = time.perf_counter()
    pruning = prune_model(
        loaded, norms.utility, utility, cfg, should_stop=should_stop, scratch=scratch
    )
    return Timed(pruning, False, time.perf_counter() - t0)


def rank_cache(
    variants: Variants,
    norms: Norms,
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> RankCache:
    """Ranks over the dense weights, reusable across realignment settings (by the Wanda
    scores, or by ``scores`` from ``ranking_scores`` where given)."""
    return RankCache(
        variants.loaded,
        norms.safety,
        norms.utility,
        weight_of=variants.dense_weight,
        scores=scores,
    )


def ranking_scores(
    loaded: LoadedModel,
    safety: Sequence[Sample],
    utility: Sequence[Sample],
    realign_cfg: RealignConfig,
    wanda_cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The safety and utility scores HSR ranks by when ``realign_cfg.ranking`` is not Wanda's:
    SNIP's ``|W * dL/dW|`` over the prepared safety and utility samples (the dense model), for
    the linears a restore set can touch (attention; the MLPs too with scope ``heads+mlp``).
    None for ``wanda`` (the rank cache computes Wanda scores itself)."""
    if realign_cfg.ranking == "wanda":
        return None
    from .snip import snip_scores

    a = loaded.adapter
    names = a.linear_names(attention_only=realign_cfg.scope == "heads")
    s = snip_scores(loaded, safety, wanda_cfg, should_stop=should_stop, names=names)
    u = snip_scores(loaded, utility, wanda_cfg, should_stop=should_stop, names=names)
    return {n: (s[n], u[n]) for n in names}


def warm_ranks(
    loaded: LoadedModel, ranks: RankCache, *, max_weights: int, should_stop: StopFlag = None
) -> bool:
    """Rank every attention projection now when the model has at most ``max_weights``
    attention weights, so that no later realignment waits for a ranking; returns whether it
    did."""
    a = loaded.adapter
    names = a.linear_names(attention_only=True)
    size = sum(a.linear(*a.parse(n)).weight.numel() for n in names)
    if size > max_weights:
        return False
    for name in bar(names, desc="Ranking weights for HSR", unit="linear"):
        check_stop(should_stop)
        ranks.get(name)
    return True


def realign(
    loaded: LoadedModel,
    masks: Masks | None,
    scores: torch.Tensor,
    cfg: RealignConfig,
    ranks: RankCache,
) -> Timed:
    """The HSR restore set of the ``top_h`` heads by Ships score; value: ``RestoreSet``."""
    t0 = time.perf_counter()
    if masks is None:
        raise VariantError("prune first: realignment restores weights that the mask pruned")
    rs = restore_set(loaded, masks, scores, cfg, ranks)
    return Timed(rs, False, time.perf_counter() - t0)


def load_judge(name: str, *, dtype: str = "auto", device: str = "auto", cache_dir=None, log=None):
    """A judge model (``GuardJudge``) for ``EvalConfig(judge="model")``: a Llama-Guard-style
    model by hub id or folder."""
    from .config import ModelSpec

    return GuardJudge(
        load_model(ModelSpec(name, dtype=dtype, device=device), cache_dir=cache_dir, log=log)
    )


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
    """Generate answers with each variant, class them by ``cfg.judge`` and score them.

    Args:
        variants: the model and its installed masks / restore set.
        samples: the evaluation prompts (harmful and benign).
        cfg: generation, judge, bootstrap and lm-eval settings.
        which: the variants to run (default: every one available).
        judge: the judge model (``cfg.judge == "model"``; with another judge its verdicts are
            recorded beside, as ``asr_judge``).

    Returns:
        The ``eval.json`` contract: ``{"config", "judge", "n_prompts", "perplexity_is",
        "variants": {name: {rates..., "ci95", "counts", "perplexity", ["lm_eval"],
        "answers": [...]}}, "rsr", "rsr_ci95", "rsr_coherent", "rsr_coherent_ci95",
        "asr_differences"}`` (``evaluate.rates``, ``evaluate.compare``).

    Raises:
        LmEvalMissing: ``cfg.lm_eval`` without lm-evaluation-harness installed (checked before
            anything is generated).
    """
    if cfg.judge == "model" and judge is None:
        raise ValueError("the model judge needs a judge model: pass --judge-model NAME")
    if cfg.lm_eval:
        try:
            import lm_eval  # noqa: F401
        except ImportError as e:
            from .harness import INSTALL_HINT

            raise LmEvalMissing(INSTALL_HINT) from e
    samples = prepare_samples(variants.loaded, samples)
    which = list(which or variants.available())
    reference = [s for s in samples if not s.harmful and s.response]
    out: dict[str, Any] = {
        "variants": {},
        "config": to_dict(cfg),
        "judge": describe(cfg.judge, cfg.min_words, judge),
        "n_prompts": len(samples),
        "perplexity_is": f"{PERPLEXITY_IS} (reference answers of the benign evaluation "
        "prompts, answer tokens only)",
    }
    per_variant = -(-len(samples) // cfg.batch_size) + -(-len(reference) // cfg.batch_size)
    # one bar over every variant's batches, so the progress and its ETA are the whole run's
    with bar(
        desc=f"Evaluating {len(which)} variant{'s' * (len(which) != 1)}",
        total=len(which) * per_variant,
        unit="batch",
    ) as overall:
        for name in which:
            if on_variant:
                on_variant(name)
            overall.set_postfix_str(name)
            with variants.use(name) as loaded:
                answers = generate(
                    loaded,
                    samples,
                    cfg,
                    should_stop=should_stop,
                    desc=f"Generating ({name})",
                    progress=overall,
                )
                ppl = (
                    perplexity(
                        loaded,
                        reference,
                        cfg.batch_size,
                        should_stop=should_stop,
                        progress=overall,
                    )
                    if reference
                    else math.nan
                )
                harness = (
                    run_lm_eval(
                        loaded, cfg.lm_eval, limit=cfg.lm_eval_limit, batch_size=cfg.batch_size
                    )
                    if cfg.lm_eval
                    else None
                )
            rows = judge_answers(samples, answers, cfg, judge, should_stop=should_stop)
            out["variants"][name] = {**rates(rows), "perplexity": ppl}
            if harness is not None:
                out["variants"][name]["lm_eval"] = harness
            out["variants"][name]["answers"] = rows
    out.update(
        compare(
            {n: v["answers"] for n, v in out["variants"].items()},
            resamples=cfg.bootstrap_resamples,
            seed=cfg.bootstrap_seed,
        )
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


def localize(
    variants: Variants,
    scores: torch.Tensor,
    restore: RestoreSet | None,
    samples: Sequence[Sample],
    cfg: LocalizeConfig,
    eval_cfg: EvalConfig,
    *,
    judge: GuardJudge | None = None,
    realign_cfg: RealignConfig | None = None,
    should_stop: StopFlag = None,
) -> dict[str, Any]:
    """The localization ladder (``hsr_core.localize``; our study, not the paper's) for the
    installed masks: the same prompts answered and judged on every rung.

    Args:
        variants: the model with the pruning masks installed.
        scores: Ships scores ``[num_layers, num_heads]``.
        restore: HSR's restore set for those masks (None: no ``hsr`` rung).
        samples: evaluation prompts (harmful and benign).
        cfg: rungs, k, seeds.
        eval_cfg: generation settings and the judge's rule.
        judge: an optional judge model for ASR.
        realign_cfg: slicing and top_h when there is no restore set.

    Returns:
        ``{"config", "eval", "n_prompts", "pruned_weights", "rungs": [...]}`` (``localize.run``).
    """
    if variants.masks is None:
        raise VariantError("prune first: the ladder puts back weights that the mask pruned")
    if eval_cfg.judge == "model" and judge is None:
        raise ConfigError("the model judge needs a judge model (--judge-model)")
    samples = prepare_samples(variants.loaded, samples)
    rungs = localize_mod.plan(variants.loaded, variants.masks, scores, restore, cfg, realign_cfg)
    rows = localize_mod.run(
        variants,
        rungs,
        samples,
        eval_cfg,
        lambda s, a: judge_answers(s, a, eval_cfg, judge, should_stop=should_stop),
        should_stop=should_stop,
    )
    return {
        "study": "localization ladder (HSR Workbench's own study; not in the paper)",
        "config": to_dict(cfg),
        "eval": to_dict(eval_cfg),
        "judge": describe(eval_cfg.judge, eval_cfg.min_words, judge),
        "n_prompts": len(samples),
        "pruned_weights": sum(m.count for m in variants.masks.values()),
        "rungs": rows,
    }


# ---------------------------------------------------------------------------------------------
# the files of a run, as the command line writes them


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
        "vision": loaded.is_vision,
        "num_layers": loaded.adapter.num_layers,
        "num_heads": loaded.adapter.num_heads,
        "num_kv_heads": loaded.adapter.num_kv_heads,
        "head_dim": loaded.adapter.head_dim,
        "cross_attention_layers": sorted(loaded.adapter.cross_layers),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "cached": cached,
    }
    if masks is not None:
        rep = sparsity_report(loaded, masks)
        out.update(
            pruner=run.wanda.pruner,
            pruned_weights=rep["pruned_weights"],
            prunable_weights=rep["prunable_weights"],
            achieved_sparsity=rep["sparsity"],
            sparsity_per_layer=rep["per_layer"],
            sparsity_per_module=rep["per_module"],
        )
    if restore is not None:
        out.update(restore.summary())
    return out
