"""What the app draws: pure builders from arrays to Plotly figures and tables.

Every function here takes plain data (NumPy arrays, lists, dicts of numbers) and returns a
``plotly.graph_objects.Figure`` (or a ``pandas.DataFrame`` for tables). No tensors, no model:
the handlers turn the core's results into arrays first, so these functions can be timed and
tested on their own.

Each figure is written as one dict of traces and layout and validated once by ``go.Figure``:
Plotly's ``update_*`` calls re-validate on every call and cost ~30 ms a figure, too much for
the Realign tab's 150 ms per slider move.

Conventions: heads are ``(layer, head)``, written ``"l-h"``; head tables are
``[num_layers, num_heads]`` with layers on the y axis (layer 0 at the top) and heads on x.
Rank fractions are "top fractions" as in the spec: 0 is the highest score, 1 the lowest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from hsr_core import pipeline

PROJ_COLORS = {
    "q_proj": "#4C78A8",
    "k_proj": "#F58518",
    "v_proj": "#54A24B",
    "o_proj": "#B279A2",
    "gate_proj": "#9D755D",
    "up_proj": "#BAB0AC",
    "down_proj": "#72B7B2",
}
MARK_COLOR = "#E4572E"
PICKED_COLOR = "#111827"
RESTORED_COLOR = "#16A34A"
MUTED = "#6B7280"


AXIS = {
    "gridcolor": "#EEF0F3",
    "zerolinecolor": "#D1D5DB",
    "linecolor": "#9CA3AF",
    "automargin": True,
}


def _figure(data: list[dict[str, Any]], *, title: str, height: int, **layout: Any) -> go.Figure:
    """One validated figure from trace dicts and layout fields, in the app's style.

    The empty ``none`` template keeps Plotly from deep-copying its default template into every
    figure (~15 ms each); the few styles the app wants are set here instead.
    """
    base: dict[str, Any] = {
        "template": "none",
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 56, "b": 50},
        "font": {"family": "Inter, system-ui, sans-serif", "size": 12, "color": "#1F2937"},
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "hoverlabel": {"font": {"size": 12}},
        "xaxis": AXIS,
        "yaxis": AXIS,
    }
    for key, value in layout.items():
        base[key] = {**AXIS, **value} if key.startswith(("xaxis", "yaxis")) else value
    return go.Figure(data=data, layout=base)


def _note(text: str, size: int = 13) -> dict[str, Any]:
    """A centred annotation in paper coordinates."""
    return {
        "text": text,
        "x": 0.5,
        "y": 0.5,
        "xref": "paper",
        "yref": "paper",
        "showarrow": False,
        "font": {"size": size, "color": MUTED},
    }


def placeholder(message: str, *, height: int = 320) -> go.Figure:
    """An empty figure that says what to do to fill it."""
    hidden = {"visible": False}
    return _figure(
        [],
        title="",
        height=height,
        annotations=[_note(message, 14)],
        xaxis=hidden,
        yaxis=hidden,
    )


def score_label(metric: str) -> str:
    """The unit of a Ships score (``angle`` or ``kl``), for axes and colour bars."""
    return "angle (deg)" if metric == "angle" else "KL (nats)"


def _legend_top() -> dict[str, Any]:
    return {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom"}


def heads_heatmap(
    scores: np.ndarray,
    marked: Sequence[tuple[int, int]] = (),
    *,
    title: str = "Ships score per head",
    score_label: str = "score",
    marked_label: str = "top heads",
    picked: tuple[int, int] | None = None,
    layer_kinds: Sequence[str] | None = None,
) -> go.Figure:
    """Heatmap of head scores, layers on y and heads on x, with some heads circled.

    Args:
        scores: ``[num_layers, num_heads]``; NaN cells (heads not scored) stay blank.
        marked: heads to circle, best first (their rank shows on hover).
        title: figure title.
        score_label: colour bar title and hover name of the score (e.g. "angle (deg)").
        marked_label: legend entry of the circled heads.
        picked: the head shown in detail (last clicked or picked), outlined by a square with
            a legend entry of its own.
        layer_kinds: ``"self"`` or ``"cross"`` per layer (``ModelAdapter.layer_kinds``):
            cross-attention layers (Llama-3.2-Vision) are labelled "3 (cross)" on the y axis
            and named in the hover.
    """
    scores = np.asarray(scores, dtype=float)
    L, H = scores.shape
    kinds = list(layer_kinds) if layer_kinds is not None else ["self"] * L
    if len(kinds) != L:
        raise ValueError(f"{len(kinds)} layer kinds for {L} layers")
    cross = [l for l, k in enumerate(kinds) if k == "cross"]
    attention = [["cross-attention" if k == "cross" else "self-attention"] * H for k in kinds]
    step = 1 if L <= 16 else (2 if L <= 40 else 5)
    ticks = sorted(set(range(0, L, step)) | set(cross))
    data: list[dict[str, Any]] = [
        {
            "type": "heatmap",
            "z": scores,
            "x": np.arange(H),
            "y": np.arange(L),
            "colorscale": "Blues",
            "colorbar": {"title": {"text": score_label, "side": "right"}, "thickness": 12},
            "customdata": attention,
            "hovertemplate": (
                f"layer %{{y}} · head %{{x}} · %{{customdata}}<br>{score_label} %{{z:.4g}}"
                "<extra></extra>"
            ),
            "xgap": 1,
            "ygap": 1,
            "showscale": True,
        }
    ]
    if len(marked):
        data.append(
            {
                "type": "scatter",
                "x": [h for _, h in marked],
                "y": [l for l, _ in marked],
                "mode": "markers",
                "marker": {
                    "symbol": "circle-open",
                    "size": max(8, min(18, int(420 / max(L, H)))),
                    "color": MARK_COLOR,
                    "line": {"width": 2.5},
                },
                "customdata": [[i + 1, float(scores[l, h])] for i, (l, h) in enumerate(marked)],
                "hovertemplate": (
                    "layer %{y} · head %{x}<br>rank %{customdata[0]}"
                    f"<br>{score_label} %{{customdata[1]:.4g}}<extra></extra>"
                ),
                "name": marked_label,
                "showlegend": True,
            }
        )
    shapes = []
    if picked is not None:
        head = pipeline.Head(*picked)
        shapes.append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "y",
                "x0": head.head - 0.5,
                "x1": head.head + 0.5,
                "y0": head.layer - 0.5,
                "y1": head.layer + 0.5,
                "line": {"color": PICKED_COLOR, "width": 3},
                "fillcolor": "rgba(0,0,0,0)",
                "layer": "above",
                "name": f"in detail: {head.label}",
                "showlegend": True,
            }
        )
    return _figure(
        data,
        title=title,
        height=int(min(760, max(320, 16 * L + 140))),
        shapes=shapes,
        xaxis={
            "title": {"text": "head"},
            "range": [-0.5, H - 0.5],
            "dtick": 1 if H <= 32 else None,
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={
            "title": {"text": "layer" + (" (cross: cross-attention)" if cross else "")},
            "range": [L - 0.5, -0.5],  # layer 0 at the top
            "tickvals": ticks,
            "ticktext": [f"{l} (cross)" if kinds[l] == "cross" else str(l) for l in ticks],
            "showgrid": False,
            "zeroline": False,
        },
        legend=_legend_top(),
        clickmode="event",
    )


def ranking_table(scores: np.ndarray | None, top: int | None = None) -> pd.DataFrame:
    """Heads ranked by score, best first (the core's ranking, ``top_heads``: NaN last, ties by
    layer and head): rank, head "l-h", layer, head, score.

    ``scores`` is ``[num_layers, num_heads]``; None gives the empty table.
    """
    if scores is None:
        return pd.DataFrame(columns=["rank", "head", "layer", "head index", "score"])
    scores = np.asarray(scores, dtype=float)
    order = pipeline.top_heads(scores, top)
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "head": [h.label for h in order],
            "layer": np.array([h.layer for h in order], dtype=int),
            "head index": np.array([h.head for h in order], dtype=int),
            "score": np.round([scores[h] for h in order], 5),
        }
    )


def sparsity_chart(
    per_layer: Mapping[int, float], per_module: Mapping[str, float], target: float
) -> go.Figure:
    """Achieved sparsity per decoder layer and per module, against the target (dashed)."""
    layers = sorted(per_layer)
    order = list(PROJ_COLORS)
    modules = sorted(per_module, key=lambda p: order.index(p) if p in order else len(order))
    pct_layer = [100 * per_layer[l] for l in layers]
    top = max([100 * target, *pct_layer, *(100 * v for v in per_module.values())]) * 1.15 or 1
    line = {"color": MARK_COLOR, "dash": "dash", "width": 1.5}
    data = [
        {
            "type": "bar",
            "x": layers,
            "y": pct_layer,
            "marker": {"color": "#4C78A8"},
            "hovertemplate": "layer %{x}<br>%{y:.2f}% pruned<extra></extra>",
            "showlegend": False,
        },
        {
            "type": "bar",
            "x": modules,
            "y": [100 * per_module[p] for p in modules],
            "marker": {"color": [PROJ_COLORS.get(p, "#888") for p in modules]},
            "hovertemplate": "%{x}<br>%{y:.2f}% pruned<extra></extra>",
            "showlegend": False,
            "xaxis": "x2",
            "yaxis": "y2",
        },
    ]
    return _figure(
        data,
        title=f"Achieved sparsity (dashed: target {100 * target:.0f}%)",
        height=340,
        xaxis={
            "domain": [0, 0.68],
            "title": {"text": "layer"},
            "dtick": 1 if len(layers) <= 32 else None,
        },
        yaxis={"title": {"text": "weights pruned (%)"}, "range": [0, top]},
        xaxis2={"domain": [0.76, 1], "anchor": "y2", "title": {"text": "module"}},
        yaxis2={"anchor": "x2", "range": [0, top]},
        shapes=[
            {
                "type": "line",
                "xref": f"x{s} domain",
                "yref": f"y{s}",
                "x0": 0,
                "x1": 1,
                "y0": 100 * target,
                "y1": 100 * target,
                "line": line,
            }
            for s in ("", "2")
        ],
        bargap=0.15,
    )


def restored_bars(
    per_head: Mapping[str, Mapping[str, int]], projections: Sequence[str] | None = None
) -> go.Figure:
    """Restored weights per selected head (in the given order), stacked by projection."""
    heads = list(per_head)
    if not heads:
        return placeholder("No heads selected")
    projs = list(projections or next(iter(per_head.values())).keys())
    data = [
        {
            "type": "bar",
            "x": heads,
            "y": [per_head[h].get(proj, 0) for h in heads],
            "name": proj,
            "marker": {"color": PROJ_COLORS.get(proj)},
            "hovertemplate": f"head %{{x}}<br>{proj}: %{{y:,}} restored<extra></extra>",
        }
        for proj in projs
    ]
    total = sum(sum(v.values()) for v in per_head.values())
    return _figure(
        data,
        title="Restored weights per head and module",
        height=340,
        barmode="stack",
        legend={**_legend_top(), "traceorder": "normal"},
        xaxis={"title": {"text": "head (layer-head, by Ships rank)"}, "type": "category"},
        yaxis={"title": {"text": "restored weights"}, "rangemode": "tozero"},
        annotations=[] if total else [_note("nothing restored with these settings")],
    )


def head_ranks_figure(
    safety: np.ndarray,
    utility: np.ndarray,
    pruned: np.ndarray,
    restored: np.ndarray,
    *,
    p: float,
    q: float,
    max_p: float,
    head: str,
    total: int | None = None,
    restored_total: int | None = None,
    selected: bool = True,
    bins: int = 40,
    max_restored_points: int = 3000,
) -> go.Figure:
    """One head's weights on utility-rank vs safety-rank axes (docs/METHOD.md, "HSR").

    The background is a 2-D histogram of the head's weights, shaded by the share of them the
    mask pruned; the R band (utility rank in ``[p, max_p)``, safety rank below ``q``) is the
    dashed box; restored weights (in R and pruned) are the green dots.

    Args:
        safety, utility: rank fractions in [0, 1] (0 = top) of each weight, ``float[n]``.
        pruned, restored: ``bool[n]`` flags.
        p, q, max_p: the realignment fractions.
        head: the head's ``"l-h"`` label.
        total: how many weights the head's slices hold (when ``n`` is a sample of them).
        restored_total: the head's exact restored count (when ``n`` is a sample).
        selected: whether the head is among the realigned ones; when it is not, nothing is
            restored and the dots show what would be.
        bins: histogram bins per axis.
        max_restored_points: restored weights drawn individually (a reproducible sample).
    """
    safety = np.asarray(safety, dtype=float)
    utility = np.asarray(utility, dtype=float)
    pruned = np.asarray(pruned, dtype=bool)
    restored = np.asarray(restored, dtype=bool)
    n = safety.size
    # bin of each weight along each axis, then counts per cell: [bins (safety), bins (utility)]
    bx = np.minimum((utility * bins).astype(np.int64), bins - 1)
    by = np.minimum((safety * bins).astype(np.int64), bins - 1)
    cell = by * bins + bx
    count = np.bincount(cell, minlength=bins * bins).reshape(bins, bins)
    n_pruned = np.bincount(cell, weights=pruned, minlength=bins * bins).reshape(bins, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(count > 0, n_pruned / np.maximum(count, 1), np.nan)
    centers = (np.arange(bins) + 0.5) / bins
    idx = np.flatnonzero(restored)
    if idx.size > max_restored_points:
        idx = np.sort(np.random.default_rng(0).choice(idx, max_restored_points, replace=False))
    n_restored = int(restored.sum()) if restored_total is None else restored_total
    what = "restored" if selected else "would be restored"
    data = [
        {
            "type": "heatmap",
            "z": share,
            "x": centers,
            "y": centers,
            "customdata": count,
            "zmin": 0,
            "zmax": 1,
            "colorscale": [[0, "#F3F4F6"], [1, "#9CA3AF"]],
            "colorbar": {
                "title": {"text": "share pruned", "side": "right"},
                "thickness": 12,
                "tickformat": ".0%",
            },
            "hovertemplate": (
                "utility rank ≈ %{x:.3f}<br>safety rank ≈ %{y:.3f}"
                "<br>%{customdata:,} weights, %{z:.0%} pruned<extra></extra>"
            ),
            "name": "weights",
            "showlegend": False,
        },
        {
            "type": "scattergl",
            "x": utility[idx],
            "y": safety[idx],
            "mode": "markers",
            "marker": {
                "size": 4,
                "color": RESTORED_COLOR if selected else "#737373",
                "opacity": 0.85,
            },
            "name": f"{what} ({n_restored:,})",
            "hovertemplate": (
                f"{what}<br>utility rank %{{x:.4f}}<br>safety rank %{{y:.4f}}<extra></extra>"
            ),
        },
        {  # the R band: p <= utility rank < max_p and safety rank < q
            "type": "scatter",
            "x": [p, max_p, max_p, p, p],
            "y": [0, 0, q, q, 0],
            "mode": "lines",
            "line": {"color": RESTORED_COLOR, "dash": "dash", "width": 2},
            "fill": "toself",
            "fillcolor": "rgba(22,163,74,0.08)",
            "name": f"R band: utility rank {p:g}..{max_p:g}, safety rank < {q:g}",
            "hoverinfo": "skip",
        },
    ]
    shown = f"{n:,}" if total in (None, n) else f"{n:,} of {total:,}"
    title = (
        f"Head {head}: {shown} weights of its q/k/v/o slices, {n_restored:,} restored"
        if selected
        else f"Head {head} (not selected, nothing restored): {shown} weights"
    )
    axis = {"range": [0, 1], "tickformat": ".1f", "showgrid": False, "zeroline": False}
    return _figure(
        data,
        title=title,
        height=470,
        margin={"l": 70, "r": 20, "t": 56, "b": 100},
        xaxis={**axis, "title": {"text": "utility rank (top fraction; 0 = most useful)"}},
        yaxis={
            **axis,
            "range": [1, 0],
            "title": {"text": "safety rank (top fraction; 0 = most safety-relevant)"},
        },
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.2, "yanchor": "top"},
    )


# ---------------------------------------------------------------------------------------------
# evaluation (tab 6)

VARIANT_COLORS = {"original": "#4C78A8", "pruned": "#F58518", "realigned": RESTORED_COLOR}
RATE_METRICS = {
    "refusal_rate_harmful": "refusals on harmful",
    "refusal_rate_benign": "refusals on benign",
    "asr": "attack success (ASR)",
    "asr_coherent": "ASR, incoherent excluded",
    "incoherent_rate_harmful": "incoherent on harmful",
}
PERPLEXITY_LABEL = pipeline.PERPLEXITY_IS


def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def _error_bars(m: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Plotly ``error_y`` of rates (in %) from their ``ci95`` intervals (0 where none)."""
    ci = m.get("ci95", {}) or {}
    up, down = [], []
    for k in keys:
        v, (lo, hi) = m.get(k, np.nan), ci.get(k, (np.nan, np.nan))
        ok = all(x is not None and np.isfinite(x) for x in (v, lo, hi))
        up.append(100 * (hi - v) if ok else 0.0)
        down.append(100 * (v - lo) if ok else 0.0)
    return {
        "type": "data",
        "symmetric": False,
        "array": up,
        "arrayminus": down,
        "color": "#374151",
        "thickness": 1.2,
        "width": 3,
    }


def eval_chart(metrics: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Grouped bars of the evaluation: rates (%) per metric, one bar per variant, each with its
    Wilson 95% interval as an error bar, and the answer-token perplexity of the utility set on
    its own axis at the right.

    Args:
        metrics: ``{variant: {"refusal_rate_harmful", "refusal_rate_benign", "asr",
            "asr_coherent", "incoherent_rate_harmful", "ci95": {rate: [low, high]},
            "perplexity"}}`` as fractions (NaN when a set is empty), in variant order; rates no
            variant has are left out.
    """
    names = list(metrics)
    if not names:
        return placeholder("Run the evaluation")
    keys = [k for k in RATE_METRICS if any(k in m for m in metrics.values())]
    labels = [RATE_METRICS[k] for k in keys]
    data: list[dict[str, Any]] = []
    for name in names:
        m = metrics[name]
        color = VARIANT_COLORS.get(name, MUTED)
        rates = _nan_to_none([100 * m.get(k, np.nan) for k in keys])
        data.append(
            {
                "type": "bar",
                "x": labels,
                "y": rates,
                "name": name,
                "legendgroup": name,
                "marker": {"color": color},
                "error_y": _error_bars(m, keys),
                "text": [None if r is None else f"{r:.0f}%" for r in rates],
                "textposition": "inside",
                "insidetextanchor": "end",
                "cliponaxis": False,
                "hovertemplate": f"{name}<br>%{{x}}: %{{y:.1f}}%<extra></extra>",
            }
        )
        ppl = _nan_to_none([m.get("perplexity", np.nan)])
        data.append(
            {
                "type": "bar",
                "x": ["perplexity"],
                "y": ppl,
                "name": name,
                "legendgroup": name,
                "showlegend": False,
                "marker": {"color": color},
                "hovertemplate": f"{name}<br>{PERPLEXITY_LABEL} %{{y:.2f}}<extra></extra>",
                "xaxis": "x2",
                "yaxis": "y2",
            }
        )
    ppls = [v for m in metrics.values() for v in _nan_to_none([m.get("perplexity", np.nan)])]
    has_ppl = any(v is not None for v in ppls)
    return _figure(
        data,
        title="Refusals, attack success (95% intervals) and utility per variant",
        height=400,
        barmode="group",
        bargap=0.25,
        legend=_legend_top(),
        xaxis={"domain": [0, 0.72], "type": "category"},
        yaxis={"title": {"text": "% of prompts"}, "range": [0, 112], "dtick": 20},
        xaxis2={"domain": [0.84, 1], "anchor": "y2", "type": "category"},
        yaxis2={
            "anchor": "x2",
            "title": {"text": "answer-token perplexity<br>of the utility set (lower = better)"},
            "rangemode": "tozero",
        },
        annotations=[]
        if has_ppl
        else [
            {
                **_note("no reference answers", 11),
                "x": 0.91,
                "y": 0.5,
            }
        ],
    )


def eval_metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """The evaluation's numbers: one row per metric, one column per variant (rates in %, their
    Wilson 95% intervals as ``low – high``, the answer-token perplexity of the utility set; None
    where a set is empty or has no reference answers)."""

    def number(v: float | None, scale: float, digits: int) -> float | None:
        return None if v is None or not np.isfinite(v) else round(scale * float(v), digits)

    def interval(key: str) -> Callable[[Mapping[str, Any]], str | None]:
        def cell(m: Mapping[str, Any]) -> str | None:
            lo, hi = (m.get("ci95", {}) or {}).get(key, (None, None))
            if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
                return None
            return f"{100 * lo:.1f} – {100 * hi:.1f}"

        return cell

    rows: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = [
        ("refusals on harmful (%)", lambda m: number(m.get("refusal_rate_harmful"), 100, 1)),
        ("refusals on benign (%)", lambda m: number(m.get("refusal_rate_benign"), 100, 1)),
        ("ASR (%)", lambda m: number(m.get("asr"), 100, 1)),
        (PERPLEXITY_LABEL, lambda m: number(m.get("perplexity"), 1, 2)),
        (
            "prompts (harmful / benign)",
            lambda m: f"{m.get('n_harmful', 0)} / {m.get('n_benign', 0)}",
        ),
        ("ASR 95% interval (%)", interval("asr")),
        ("ASR, incoherent excluded (%)", lambda m: number(m.get("asr_coherent"), 100, 1)),
        ("ASR, incoherent excluded, 95% interval (%)", interval("asr_coherent")),
        ("incoherent on harmful (%)", lambda m: number(m.get("incoherent_rate_harmful"), 100, 1)),
        ("incoherent on benign (%)", lambda m: number(m.get("incoherent_rate_benign"), 100, 1)),
        ("refusals on harmful 95% interval (%)", interval("refusal_rate_harmful")),
        ("refusals on benign 95% interval (%)", interval("refusal_rate_benign")),
    ]
    return pd.DataFrame(
        [[label, *(value(m) for m in metrics.values())] for label, value in rows],
        columns=["metric", *metrics],
    )


def answers_table(
    answers: Mapping[str, Sequence[Mapping[str, Any]]], *, disagree_only: bool = False
) -> pd.DataFrame:
    """Every prompt's answers side by side: ``prompt | harmful | verdict: <variant>... |
    <variant>...`` (one row per prompt, variants in the given order; a verdict is ``refused``,
    ``complied`` or ``incoherent``).

    Args:
        answers: ``{variant: rows}``, rows as ``hsr_core.evaluate.judge_answers`` makes them
            (``prompt``, ``harmful``, ``answer``, ``verdict`` or only ``refusal``), in the same
            prompt order.
        disagree_only: keep only the prompts whose verdicts differ between variants.
    """
    names = list(answers)
    columns = ["prompt", "harmful"] + [f"verdict: {n}" for n in names] + names
    if not names:
        return pd.DataFrame(columns=columns)

    def verdict(row: Mapping[str, Any]) -> str:
        return row.get("verdict") or ("refused" if row["refusal"] else "complied")

    first = answers[names[0]]
    rows = []
    for i, row in enumerate(first):
        verdicts = [verdict(answers[n][i]) for n in names]
        if disagree_only and len(set(verdicts)) < 2:
            continue
        rows.append(
            [
                row["prompt"],
                bool(row["harmful"]),
                *verdicts,
                *(answers[n][i]["answer"] for n in names),
            ]
        )
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# the localization ladder

LADDER_COLORS = {
    "dense": "#1F2937",
    "dense_ablated": "#9CA3AF",
    "pruned": MARK_COLOR,
    "hsr": "#4C78A8",
    "random_heads": "#F58518",
    "top_heads": "#72B7B2",
    "attention": "#54A24B",
    "mlp": "#B279A2",
}


def _ladder_rows(rungs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per rung, the random-head draws merged into one row (mean, min, max, points)."""
    rows: list[dict[str, Any]] = []
    draws = [r for r in rungs if r["name"] == "random_heads"]
    for r in rungs:
        if r["name"] != "random_heads":
            rows.append({"name": r["name"], "label": r["label"], "runs": [r]})
        elif r is draws[0]:
            label = r["label"].split(" (seed")[0] + f" (x{len(draws)} draws)"
            rows.append({"name": r["name"], "label": label, "runs": draws})
    return rows


def ladder_chart(rungs: Sequence[Mapping[str, Any]]) -> go.Figure:
    """The localization ladder at a glance: ASR and benign refusals per rung, with intervals.

    Args:
        rungs: ``pipeline.localize``'s rungs (``name``, ``label``, ``asr``, ``asr_ci``,
            ``refusal_rate_benign``, ``refusal_rate_benign_ci``, ``restored``), in order. The
            random-head draws are drawn as one bar (their mean) with every draw as a dot and
            the draws' range as the whisker; every other bar's whisker is its Wilson 95%
            interval.
    """
    if not rungs:
        return placeholder("Run the ladder")
    rows = _ladder_rows(rungs)
    labels = [r["label"] for r in rows]
    data: list[dict[str, Any]] = []
    for axis, key, title in (("", "asr", "ASR"), ("2", "refusal_rate_benign", "benign refusals")):
        means, lo, hi, colors = [], [], [], []
        for row in rows:
            values = [100 * r[key] for r in row["runs"]]
            mean = float(np.mean(values))
            if len(row["runs"]) > 1:
                low, high = min(values), max(values)
            else:
                ci = row["runs"][0].get(f"{key}_ci") or [np.nan, np.nan]
                low, high = 100 * ci[0], 100 * ci[1]
            means.append(mean)
            lo.append(mean - low if np.isfinite(low) else 0)
            hi.append(high - mean if np.isfinite(high) else 0)
            colors.append(LADDER_COLORS.get(row["name"], MUTED))
        data.append(
            {
                "type": "bar",
                "orientation": "h",
                "y": labels,
                "x": means,
                "marker": {"color": colors},
                "error_x": {
                    "type": "data",
                    "symmetric": False,
                    "array": hi,
                    "arrayminus": lo,
                    "color": "#374151",
                    "thickness": 1.2,
                },
                "text": [f"{m:.0f}%" for m in means],
                "textposition": "outside",
                "cliponaxis": False,
                "name": title,
                "showlegend": False,
                "hovertemplate": f"%{{y}}<br>{title}: %{{x:.1f}}%<extra></extra>",
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
            }
        )
        dots = [
            (100 * r[key], row["label"])
            for row in rows
            if len(row["runs"]) > 1
            for r in row["runs"]
        ]
        if dots:
            data.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "x": [d[0] for d in dots],
                    "y": [d[1] for d in dots],
                    "marker": {"color": "#1F2937", "size": 7, "symbol": "diamond"},
                    "name": "one random draw",
                    "showlegend": axis == "",
                    "hovertemplate": f"one draw<br>{title}: %{{x:.1f}}%<extra></extra>",
                    "xaxis": f"x{axis}",
                    "yaxis": f"y{axis}",
                }
            )
    order = {"categoryorder": "array", "categoryarray": labels[::-1], "automargin": True}
    return _figure(
        data,
        title="Where does the safety live? ASR and benign refusals per rung (95% intervals)",
        height=140 + 34 * len(rows),
        legend=_legend_top(),
        margin={"l": 20, "r": 30, "t": 70, "b": 50},
        xaxis={
            "domain": [0, 0.6],
            "range": [0, 108],
            "title": {"text": "ASR (% harmful answered)"},
        },
        yaxis={**order},
        xaxis2={
            "domain": [0.66, 1],
            "anchor": "y2",
            "range": [0, 108],
            "title": {"text": "benign refused (%)"},
        },
        yaxis2={**order, "anchor": "x2", "showticklabels": False},
    )


def ladder_table(rungs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The ladder as a table: one row per rung (every random draw on its own row)."""
    columns = [
        "rung",
        "ASR %",
        "ASR 95% CI",
        "incoherent (harmful) %",
        "benign refused %",
        "weights back",
        "‱ of pruned",
    ]
    if not rungs:
        return pd.DataFrame(columns=columns)

    def pct(x: float) -> float | None:
        return None if x is None or not np.isfinite(x) else round(100 * x, 1)

    def ci(r: Mapping[str, Any]) -> str:
        lo, hi = r.get("asr_ci") or [np.nan, np.nan]
        return "" if not np.isfinite(lo) else f"{100 * lo:.0f}-{100 * hi:.0f}"

    return pd.DataFrame(
        [
            [
                r["label"],
                pct(r["asr"]),
                ci(r),
                pct(r.get("incoherent_rate_harmful", np.nan)),
                pct(r["refusal_rate_benign"]),
                f"{r['restored']:,}",
                round(r["restored_per_10k_pruned"], 2),
            ]
            for r in rungs
        ],
        columns=columns,
    )
