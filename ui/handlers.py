"""Event handlers: widget values -> config -> ``hsr_core.pipeline`` -> figures.

Each handler is short: it turns widget values into a config (``hsr_core.config`` checks it),
calls the pipeline on the shared model (``ui.session.WORKBENCH``) and returns a dict keyed by
output *names*; ``ui.layout`` maps the names to components. A handler returns a new
``Session`` only when its step succeeded, so errors leave earlier results in place. Errors the
user can fix reach them as ``gr.Error`` with what to do (``user_errors``).

Long steps report progress through the core's ``tqdm`` bars (``gr.Progress(track_tqdm=True)``)
and poll a per-session Stop flag (``should_stop``); the core raises ``Cancelled`` and the handler
says "stopped". On Hugging Face ZeroGPU Spaces attribution and pruning run inside
``spaces.GPU`` (``gpu``); elsewhere that wrapper does nothing.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from hsr_core.config import (
    ConfigError,
    ModelSpec,
    RealignConfig,
    ShipsConfig,
    WandaConfig,
)
from ui import figures
from ui.session import LIVE_CACHE_MAX_WEIGHTS, WORKBENCH, DataSpec, Session, SessionError

if TYPE_CHECKING:
    from hsr_core.models import LoadedModel
    from hsr_core.realign import RankCache
    from hsr_core.wanda import Masks

log = logging.getLogger("hsr.app")

try:  # Hugging Face Spaces (ZeroGPU): GPU work must run inside spaces.GPU
    import spaces
except ImportError:
    spaces = None

TRACK_TQDM = gr.Progress(track_tqdm=True)
PROGRESS = gr.Progress()
"""Progress defaults (gradio makes a fresh tracker per call from them)."""

HEAD_POINTS_MAX = 200_000
"""Weights of one head drawn in its rank figure (all of them for SmolLM2's 147 k)."""


def gpu(duration: int | Callable[..., int]) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` on a ZeroGPU Space; a no-op elsewhere.

    ZeroGPU runs such a function in a forked process: what it returns comes back, what it
    changes in this process's memory does not. So only the heavy, self-contained steps
    (attribution and pruning, whose results return in the session state and whose statistics
    go to the on-disk cache) are wrapped; loading and the live realignment run here.
    ``duration`` may be a function of the handler's arguments (seconds to reserve).
    """
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


# ---------------------------------------------------------------------------------------------
# errors


def explain(exc: BaseException) -> tuple[str, str] | None:
    """``(title, message)`` for an error the user can act on, or None for a bug."""
    import torch

    from hsr_core.data import DataError
    from hsr_core.models import ArchitectureError, ModelLoadError
    from hsr_core.variants import VariantError

    if isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (
            "Out of memory",
            "The step ran out of memory. Use fewer samples, a smaller model, bfloat16, or "
            "the CPU; earlier results are kept.",
        )
    if isinstance(exc, SessionError):
        return "Not yet", str(exc)
    if isinstance(exc, ArchitectureError):
        return "Unsupported architecture", str(exc)
    if isinstance(exc, ModelLoadError):
        return "Could not load the model", str(exc)
    if isinstance(exc, DataError):
        return (
            "Could not read the data",
            f"{exc}. Fix the file, or map its columns, e.g. "
            "prompt=instruction,response=output,harmful=unsafe.",
        )
    if isinstance(exc, ConfigError):
        return "Invalid setting", str(exc)
    if isinstance(exc, VariantError):
        return "Not yet", str(exc)
    if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
        return "Invalid input", str(exc)
    return None


def user_errors(step: str) -> Callable[[Callable], Callable]:
    """Turn the core's errors into ``gr.Error`` messages that say what to do."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                known = explain(e)
                if known is None:
                    log.exception("%s failed", step)
                    raise gr.Error(
                        f"{step} failed unexpectedly ({type(e).__name__}: {e}). Earlier results "
                        "are kept; the server log has the details.",
                        title=f"{step} failed",
                    ) from e
                title, message = known
                log.warning("%s: %s: %s", step, title, message)
                raise gr.Error(message, title=f"{step}: {title}", print_exception=False) from e

        return run

    return deco


@contextmanager
def _stoppable(request: gr.Request | None):
    """The session's Stop flag, cleared for a new job."""
    event = WORKBENCH.stop_event(getattr(request, "session_hash", None))
    event.clear()
    yield event.is_set


def stop(request: gr.Request) -> None:
    """Ask the session's running job to stop (it stops between units of work)."""
    WORKBENCH.stop_event(request.session_hash).set()


def forget(request: gr.Request) -> None:
    """Drop the session's Stop flag when its tab closes."""
    WORKBENCH.forget(request.session_hash)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def show_eta(progress: Any) -> None:
    """Add the remaining time of the running tqdm bar to the progress text gradio shows.

    Gradio's tqdm tracking shows ``n/total unit`` and the elapsed time. This wraps the
    tracker's callback (on this one tracker object, nothing global) so that each report also
    sets the bar's text to ``desc · <time> left``, extrapolated from the bar's own pace. A
    no-op when the tracker is not gradio's.
    """
    original = getattr(progress, "_progress_callback", None)
    if original is None or not hasattr(progress, "iterables"):
        return

    def with_eta(report: Callable) -> Callable:
        def send(bars: list[Any]) -> Any:
            try:
                bar = bars[-1]
                state = bar.__dict__
                base = state.setdefault("hsr_desc", bar.desc or "")
                t0 = state.setdefault("hsr_t0", time.monotonic())
                done, total = bar.index or 0, bar.length
                if total and done:
                    left = (total - done) * (time.monotonic() - t0) / done
                    bar.desc = f"{base} · {_duration(left)} left"
            except (AttributeError, IndexError, TypeError):
                pass
            return report(bars)

        return send

    def callback() -> Callable | None:
        report = original()
        return None if report is None else with_eta(report)

    progress._progress_callback = callback


# ---------------------------------------------------------------------------------------------
# status


def _n(x: int) -> str:
    return f"{x:,}"


def status_line(state: Session) -> str:
    """One line: what this tab has done so far."""
    if state.model is None:
        return "**No model yet.** Load one in *Model & data*."
    parts = [f"**Model** `{state.model_name}`", f"**data** {state.data.label}"]
    if state.scores is not None:
        parts.append(f"**Ships** {state.ships.num_samples} prompts, {state.ships.metric}")
    if state.sparsity is not None:
        parts.append(f"**pruned** {100 * state.sparsity['sparsity']:.1f}%")
    if state.restore is not None:
        parts.append(
            f"**restored** {_n(state.restore.count)} ({state.restore.per_10k_pruned:.3f} ‱)"
        )
    return " · ".join(parts)


def summary(state: Session) -> dict[str, Any]:
    """The session's results as JSON (what the API script reads)."""
    out: dict[str, Any] = {
        "model": state.model_name or None,
        "loaded_model": WORKBENCH.loaded.spec.name if WORKBENCH.loaded else None,
        "data": state.data.label,
        "ships": None,
        "pruning": None,
        "restore": None,
    }
    if state.scores is not None:
        table = figures.ranking_table(state.scores.numpy(), top=10)
        out["ships"] = {
            "config": vars(state.ships),
            "top_heads": table["head"].tolist(),
        }
    if state.sparsity is not None:
        out["pruning"] = {
            "config": vars(state.wanda),
            "sparsity": state.sparsity["sparsity"],
            "pruned_weights": state.sparsity["pruned_weights"],
        }
    if state.restore is not None:
        out["restore"] = {"config": vars(state.realign), **_restore_summary(state.restore)}
    return out


def _restore_summary(rs: Any) -> dict[str, Any]:
    s = rs.summary()
    return {
        "selected_heads": s["selected_heads"],
        "restored": s["restored"],
        "restored_per_10k_pruned": s["restored_per_10k_pruned"],
        "restore_candidates_in_heads": s["restore_candidates_in_heads"],
        "restored_per_module": s["restored_per_module"],
        "restored_per_head": s["restored_per_head"],
        "pruned_weights": rs.pruned_total,
    }


# ---------------------------------------------------------------------------------------------
# 1. model and data


def _describe(info: dict[str, Any]) -> str:
    rows = [
        ("architecture", info["architecture"]),
        (
            "parameters",
            f"{info['parameters'] / 1e6:,.1f} M "
            f"({info['decoder_linear_parameters'] / 1e6:,.1f} M in decoder linears)",
        ),
        ("layers", info["num_layers"]),
        (
            "heads",
            f"{info['num_heads']} query, {info['num_kv_heads']} KV ({info['attention']}), "
            f"head_dim {info['head_dim']}",
        ),
        ("vision tower", "yes" if info["vision_tower"] else "no (text only)"),
        ("device", f"{info['device']} · {info['dtype']}"),
        ("weights in memory", f"{info['weights_memory_mb']:,.1f} MB"),
    ]
    head = f"| model | `{info['model']}` |\n|---|---|\n"
    return head + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _step_defaults(loaded: LoadedModel) -> dict[str, Any]:
    """Sample counts that finish in minutes on this device (the paper uses 128 each)."""
    on_gpu = loaded.device.type == "cuda"
    total = loaded.adapter.num_layers * loaded.adapter.num_heads
    return {
        "ships_samples": 128 if on_gpu else 8,
        "calib_samples": 128 if on_gpu else 32,
        "top_h": min(10, total),
    }


def _cleared() -> dict[str, Any]:
    """Outputs of the later steps, emptied (after a new model or new data)."""
    return {
        "ships_heatmap": figures.placeholder("Run Ships attribution to score the heads"),
        "ships_table": figures.ranking_table(None),
        "sparsity_plot": figures.placeholder("Run Calibrate & prune"),
        "realign_heatmap": figures.placeholder("Attribute and prune first"),
        "realign_bars": figures.placeholder("Attribute and prune first"),
        "head_plot": figures.placeholder("Attribute and prune first", height=460),
        "realign_totals": "",
        "realign_json": None,
    }


@user_errors("Load model")
def load_model(
    name: str, dtype: str, device: str, state: Session, progress=PROGRESS
) -> dict[str, Any]:
    """Load a model (or reuse it when this process has it already) and describe it."""
    spec = ModelSpec(name=(name or "").strip(), dtype=dtype, device=device)
    progress(0.05, desc=f"Loading {spec.name}")
    t0 = time.perf_counter()
    changed = WORKBENCH.load(spec, log=lambda msg: progress(0.3, desc=msg))
    loaded = WORKBENCH.loaded
    same = state.model == WORKBENCH.model_key
    new = state if same else Session(WORKBENCH.model_key, spec.name, state.data)
    took = f"loaded in {time.perf_counter() - t0:.1f} s" if changed else "already loaded"
    out = {
        "state": new,
        "model_info": _describe(loaded.describe()),
        "load_status": f"**Done:** `{spec.name}` {took}.",
        "status": status_line(new),
    }
    if not same:  # a new model for this session: empty the later steps, suggest settings
        out.update(_cleared())
        out.update({k: gr.update(value=v) for k, v in _step_defaults(loaded).items()})
    return out


def parse_columns(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"prompt=instruction,response=output"`` -> ``(("prompt", "instruction"), ...)``."""
    pairs = []
    for part in (text or "").replace(";", ",").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(
                f"column mapping {text!r}: write it as field=column pairs separated by commas, "
                "e.g. prompt=instruction,response=output,harmful=unsafe"
            )
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


DATA_SOURCES = ("built-in", "VLGuard folder", "hub dataset", "file")


def data_spec(source: str, location: str, columns: str, upload: str | None) -> DataSpec:
    """The widgets of the data section as a ``DataSpec``."""
    location = (location or "").strip()
    cols = parse_columns(columns)
    if source == "built-in":
        return DataSpec("builtin", (), "built-in")
    if source == "VLGuard folder":
        if not location:
            raise ConfigError("give the VLGuard folder (the one holding train.json)")
        return DataSpec(f"vlguard:{location}", (), f"VLGuard {location}")
    if source == "hub dataset":
        if not location:
            raise ConfigError("give a hub dataset id, e.g. org/name")
        return DataSpec(location, cols, f"hub dataset {location}")
    if source == "file":
        path = upload or location
        if not path:
            raise ConfigError("upload a JSONL/JSON/CSV file or give its path")
        return DataSpec(str(path), cols, f"file {Path(path).name}")
    raise ConfigError(f"unknown data source {source!r}; choose one of {DATA_SOURCES}")


def _describe_data(spec: DataSpec, calib: Any) -> str:
    ex_s, ex_u = calib.safety[0], calib.utility[0]
    images = sum(s.image is not None for s in calib.safety + calib.utility)
    return (
        f"**{spec.label}**: {_n(len(calib.safety))} harmful requests (safety set, Ships probes) "
        f"and {_n(len(calib.utility))} benign requests (utility set)"
        f"{f', {images} with images' if images else ''}.\n\n"
        f"- harmful: *{ex_s.prompt[:90]}*\n- benign: *{ex_u.prompt[:90]}*"
    )


@user_errors("Load data")
def load_data(
    source: str, location: str, columns: str, upload: str | None, state: Session
) -> dict[str, Any]:
    """Load calibration data (built-in, VLGuard folder, hub dataset or a file)."""
    spec = data_spec(source, location, columns, upload)
    calib = WORKBENCH.calibration(spec)
    new = state
    if spec.key != state.data.key:  # results computed on other data no longer apply
        new = Session(state.model, state.model_name, spec)
    out = {"state": new, "data_info": _describe_data(spec, calib), "status": status_line(new)}
    if new is not state and state.scores is not None:
        out.update(_cleared())
    return out


# ---------------------------------------------------------------------------------------------
# 2. attribute


def _score_label(cfg: ShipsConfig) -> str:
    return "angle (deg)" if cfg.metric == "angle" else "KL (nats)"


def _ships_seconds(num_samples: float, *_args: Any, **_kwargs: Any) -> int:
    """GPU time to reserve for attribution (ZeroGPU): about 2 s a probe prompt on a 7B model."""
    return min(300, 30 + 2 * int(num_samples))


@gpu(duration=_ships_seconds)
@user_errors("Ships attribution")
def attribute(
    num_samples: float,
    ablation: str,
    metric: str,
    r_main: float,
    recompute: bool,
    state: Session,
    request: gr.Request,
    progress=TRACK_TQDM,
) -> dict[str, Any]:
    """Score every head with Ships (from the cache when it was computed before)."""
    from hsr_core import pipeline
    from hsr_core.progress import Cancelled

    show_eta(progress)
    cfg = ShipsConfig(
        num_samples=int(num_samples), ablation=ablation, metric=metric, r_main=int(r_main)
    )
    with WORKBENCH.lock, _stoppable(request) as should_stop:
        loaded = WORKBENCH.require(state)
        calib = WORKBENCH.calibration(state.data)
        probes = pipeline.probe_prompts(loaded, calib, cfg)
        try:
            r = pipeline.attribute(
                loaded,
                probes,
                cfg,
                WORKBENCH.cache,
                recompute=bool(recompute),
                should_stop=should_stop,
            )
        except Cancelled:
            return {"ships_status": "**Stopped.** Earlier results are kept."}
    # new scores pick new heads: the restore set is redone by the next realign
    new = replace(state, ships=cfg, scores=r.value.float().cpu(), restore=None)
    scores = new.scores.numpy()
    top = min(10, scores.size)
    how = "from the cache (tick *recompute* to redo)" if r.cached else f"in {r.seconds:.1f} s"
    return {
        "state": new,
        "status": status_line(new),
        "ships_status": (
            f"**Done.** Ships scores of {scores.size} heads over {len(probes)} probe prompts "
            f"({cfg.metric}, {cfg.ablation} ablation), {how}."
        ),
        "ships_heatmap": figures.heads_heatmap(
            scores,
            _top_heads(scores, top),
            score_label=_score_label(cfg),
            marked_label=f"top {top}",
        ),
        "ships_table": figures.ranking_table(scores),
    }


def _top_heads(scores: Any, k: int) -> list[tuple[int, int]]:
    """The ``k`` best heads, best first (the core's ordering)."""
    import torch

    from hsr_core.ships import top_heads

    return top_heads(torch.as_tensor(scores), k)


# ---------------------------------------------------------------------------------------------
# 3. prune


STRUCTURES = ("unstructured", "2:4", "4:8")


def wanda_config(sparsity: float, structure: str, mode: str, num_samples: float) -> WandaConfig:
    if structure == "unstructured":
        pattern: dict[str, Any] = {"structure": "unstructured"}
    else:
        try:
            n, m = (int(x) for x in structure.split(":"))
        except ValueError:
            raise ConfigError(f"structure must be unstructured or N:M, got {structure!r}") from None
        pattern = {"structure": "n:m", "n": n, "m": m}
    return WandaConfig(sparsity=float(sparsity), mode=mode, num_samples=int(num_samples), **pattern)


def warm_ranks(loaded: LoadedModel, ranks: RankCache, should_stop: Callable[[], bool]) -> bool:
    """Rank every attention projection now when the model is small (``LIVE_CACHE_MAX_WEIGHTS``),
    so that no slider move waits for a ranking; returns whether it did."""
    from hsr_core.progress import bar, check_stop

    a = loaded.adapter
    names = a.linear_names(attention_only=True)
    size = sum(a.linear(*a.parse(n)).weight.numel() for n in names)
    if size > LIVE_CACHE_MAX_WEIGHTS:
        return False
    for name in bar(names, desc="Ranking weights for HSR", unit="linear"):
        check_stop(should_stop)
        ranks.get(name)
    return True


def _prune_seconds(
    _sparsity: float, _structure: str, _mode: str, num_samples: float, *_a: Any, **_kw: Any
) -> int:
    """GPU time to reserve for calibration and pruning (ZeroGPU)."""
    return min(300, 60 + int(num_samples))


@gpu(duration=_prune_seconds)
@user_errors("Calibrate & prune")
def prune(
    sparsity: float,
    structure: str,
    mode: str,
    num_samples: float,
    recompute: bool,
    state: Session,
    request: gr.Request,
    progress=TRACK_TQDM,
) -> dict[str, Any]:
    """Wanda statistics of both sets (cached), then the pruning masks."""
    from hsr_core import pipeline
    from hsr_core.progress import Cancelled
    from hsr_core.wanda import sparsity_report

    show_eta(progress)
    cfg = wanda_config(sparsity, structure, mode, num_samples)
    with WORKBENCH.lock, _stoppable(request) as should_stop:
        loaded = WORKBENCH.require(state)
        calib = WORKBENCH.calibration(state.data)
        try:
            norms = pipeline.calibrate(
                loaded,
                calib,
                cfg,
                WORKBENCH.cache,
                recompute=bool(recompute),
                should_stop=should_stop,
            )
            key = WORKBENCH.norms_key(state.data, cfg)
            WORKBENCH.put_norms(key, norms.value)
            masks = pipeline.prune(
                WORKBENCH.variants, norms.value, calib, cfg, should_stop=should_stop
            )
        except Cancelled:
            return {"prune_status": "**Stopped.** Earlier results are kept."}
        report = sparsity_report(loaded, masks.value)
        new = replace(
            state, wanda=cfg, norms_key=key, masks=masks.value, sparsity=report, restore=None
        )
        if spaces is None:  # under ZeroGPU this process's caches would not survive the call
            with suppress(Cancelled):  # the ranks are only a head start; the masks are done
                warm_ranks(loaded, WORKBENCH.rank_cache(new), should_stop)
    stats = "from the cache" if norms.cached else f"in {norms.seconds:.1f} s"
    shape = f"{cfg.n}:{cfg.m}" if cfg.structure == "n:m" else "unstructured"
    return {
        "state": new,
        "status": status_line(new),
        "prune_status": (
            f"**Done.** Pruned {_n(report['pruned_weights'])} of {_n(report['prunable_weights'])} "
            f"decoder weights (**{100 * report['sparsity']:.2f}%**, {shape}, {cfg.mode}); "
            f"statistics of {cfg.num_samples} samples per set {stats}, masks in "
            f"{masks.seconds:.1f} s."
        ),
        "sparsity_plot": figures.sparsity_chart(
            report["per_layer"], report["per_module"], cfg.target_sparsity
        ),
    }


# ---------------------------------------------------------------------------------------------
# 4. realign (live)


LIVE_THREADS = 1
"""Torch threads of the live realign view on the CPU: it is many small tensor operations, where
thread hand-offs cost more than they bring (and a busy machine makes them far worse; see
``bench/bench_realign_live.py --threads``)."""


@contextmanager
def _cpu_threads(device: Any):
    """Run the body with ``LIVE_THREADS`` torch threads when the model is on the CPU."""
    import torch

    if getattr(device, "type", "cpu") != "cpu" or torch.get_num_threads() == LIVE_THREADS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(LIVE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def realign_view(
    loaded: LoadedModel,
    masks: Masks,
    scores: Any,
    ranks: RankCache,
    cfg: RealignConfig,
    head: str | None = None,
    *,
    score_label: str = "score",
) -> dict[str, Any]:
    """The restore set for ``cfg`` and everything the Realign tab shows of it.

    This is the whole work of one slider move: ``hsr_core.realign.restore_set`` over the
    cached ranks, ``head_rank_points`` for the head in detail, and the figures.

    Args:
        loaded: the model (only its adapter and geometry are used).
        masks: the session's pruning masks.
        scores: Ships scores ``[num_layers, num_heads]`` (tensor).
        ranks: the shared rank cache of the session's norms.
        cfg: p, q, max_p, top_h and slicing (already checked).
        head: the head shown in detail (``"l-h"``, selected or not); the best selected head
            when None.

    Returns:
        ``{"restore": RestoreSet, "head": "l-h", "realign_heatmap", "realign_bars",
        "head_plot": Figure, "realign_totals": markdown, "realign_json": dict,
        "realign_head": dropdown update}``.
    """
    from hsr_core.realign import restore_set

    a = loaded.adapter
    with _cpu_threads(loaded.device):
        rs = restore_set(loaded, masks, scores, cfg, ranks)
        labels = [figures.head_label(l, h) for l, h in rs.heads]
        head = head if _is_head(head, a.num_layers, a.num_heads) else labels[0]
        detail = head_figure(loaded, masks, ranks, cfg, head, rs)
    total_w = a.num_linear_params()
    totals = (
        f"### {_n(rs.count)} weights restored\n"
        f"in {len(rs.heads)} heads = **{rs.per_10k_pruned:.3f} ‱** of the "
        f"{_n(rs.pruned_total)} pruned weights ({100 * rs.count / total_w:.4f}% of the decoder "
        f"linears).\n\n{_n(rs.candidates)} restore candidates (R) in the heads' slices; the "
        "restored ones are those the mask pruned.\n\n"
        + " · ".join(f"{p} {_n(c)}" for p, c in rs.per_module.items())
    )
    return {
        "restore": rs,
        "head": head,
        "realign_heatmap": figures.heads_heatmap(
            scores.numpy(),
            rs.heads,
            title=f"Selected heads: top {cfg.top_h} by Ships",
            score_label=score_label,
            marked_label=f"selected ({len(rs.heads)})",
        ),
        "realign_bars": figures.restored_bars(
            {figures.head_label(l, h): rs.per_head[figures.head_label(l, h)] for l, h in rs.heads}
        ),
        "head_plot": detail,
        "realign_totals": totals,
        "realign_json": _restore_summary(rs),
        "realign_head": gr.update(choices=labels, value=head),
    }


def _is_head(text: str | None, num_layers: int, num_heads: int) -> bool:
    try:
        figures.parse_head(text or "", num_layers, num_heads)
    except ValueError:
        return False
    return True


def head_figure(
    loaded: LoadedModel, masks: Masks, ranks: RankCache, cfg: RealignConfig, head: str, rs: Any
) -> Any:
    """The utility-rank vs safety-rank figure of one head (``"l-h"``, any head).

    Raises:
        ValueError: when ``head`` is not a head of the model.
    """
    from hsr_core.realign import head_rank_points

    a = loaded.adapter
    layer, h = figures.parse_head(head, a.num_layers, a.num_heads)
    head = figures.head_label(layer, h)
    pts = head_rank_points(loaded, masks, ranks, (layer, h), cfg, max_points=HEAD_POINTS_MAX)
    selected = (layer, h) in rs.heads
    return figures.head_ranks_figure(
        pts["safety"].numpy(),
        pts["utility"].numpy(),
        pts["pruned"].numpy(),
        pts["restored"].numpy(),
        p=cfg.p,
        q=cfg.q,
        max_p=cfg.max_p,
        head=head,
        total=pts["total"],
        restored_total=sum(rs.per_head[head].values()) if selected else None,
        selected=selected,
    )


def _realign_config(
    p: float, q: float, max_p: float, top_h: float, slicing: str
) -> tuple[RealignConfig | None, str]:
    """The config, or None and a message saying what to change."""
    try:
        top = int(top_h)
        if top != top_h:
            raise ConfigError(f"top_h must be a whole number, got {top_h}")
        return RealignConfig(float(p), float(q), float(max_p), top, slicing), ""
    except ConfigError as e:
        return None, f"**Nothing changed:** {e}"


def _realign(
    p: float,
    q: float,
    max_p: float,
    top_h: float,
    slicing: str,
    head: str | None,
    state: Session,
    *,
    strict: bool,
) -> dict[str, Any]:
    cfg, problem = _realign_config(p, q, max_p, top_h, slicing)
    if cfg is None:
        return {"realign_msg": problem}
    with WORKBENCH.lock:
        if not strict and (state.model is None or state.masks is None or state.scores is None):
            return {"realign_msg": "Attribute and prune first; then move the sliders."}
        loaded = WORKBENCH.require(state)
        if state.masks is None:
            raise SessionError(
                "Prune first (tab 3): realignment restores weights that the pruning mask removed."
            )
        if state.scores is None:
            raise SessionError("Run Ships attribution first (tab 2): it picks the heads.")
        a = loaded.adapter
        try:
            cfg.check_heads(a.num_layers, a.num_heads)
        except ConfigError as e:
            return {"realign_msg": f"**Nothing changed:** {e}. Lower top_h."}
        view = realign_view(
            loaded,
            WORKBENCH.live_masks(state),
            state.scores,
            WORKBENCH.rank_cache(state),
            cfg,
            head,
            score_label=_score_label(state.ships),
        )
        new = replace(state, realign=cfg, restore=view.pop("restore"), head=view.pop("head"))
        WORKBENCH.install(new)
    return {
        **view,
        "state": new,
        "status": status_line(new),
        "realign_msg": f"p={cfg.p:g} · q={cfg.q:g} · max_p={cfg.max_p:g} · top_h={cfg.top_h} "
        f"· {cfg.slicing} slicing",
    }


@user_errors("Realign")
def realign(
    p: float, q: float, max_p: float, top_h: float, slicing: str, head: str | None, state: Session
) -> dict[str, Any]:
    """The HSR restore set for these settings (no statistics are recomputed)."""
    return _realign(p, q, max_p, top_h, slicing, head, state, strict=True)


@user_errors("Realign")
def realign_refresh(
    p: float, q: float, max_p: float, top_h: float, slicing: str, head: str | None, state: Session
) -> dict[str, Any]:
    """Like ``realign``, but only a note when attribution or pruning is missing."""
    return _realign(p, q, max_p, top_h, slicing, head, state, strict=False)


@user_errors("Head detail")
def head_detail(head: str, state: Session) -> dict[str, Any]:
    """Show one head's weights on the rank axes (any head, selected or not)."""
    if not head:
        return {}
    with WORKBENCH.lock:
        loaded = WORKBENCH.require(state)
        if state.restore is None or state.masks is None:
            raise SessionError("Realign first: the head view shows the current restore set.")
        a = loaded.adapter
        label = figures.head_label(*figures.parse_head(head, a.num_layers, a.num_heads))
        ranks = WORKBENCH.rank_cache(state)
        with _cpu_threads(loaded.device):
            masks = WORKBENCH.live_masks(state)
            fig = head_figure(loaded, masks, ranks, state.realign, label, state.restore)
    new = replace(state, head=label)
    return {"state": new, "head_plot": fig, "realign_head": gr.update(value=label)}


def head_clicked(clicked: str, state: Session) -> dict[str, Any]:
    """A click on the Realign heatmap (``"l-h@time"`` from the page script)."""
    return head_detail((clicked or "").split("@")[0], state)
