"""Tab 4, Realign: the HSR restore set, live (``pipeline.realign`` over the cached ranks).

Every slider move recomputes the restore set R(p, q, max_p) inside the top_h heads (no
statistics are recomputed), installs it for the session, and redraws the selected heads, the
restored weights per head and module, and one head's weights on safety-rank vs utility-rank
axes (any head, picked in the dropdown or by clicking the heatmap). After a Ships run or a
prune, the tab redraws itself (chained on those steps' events).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import ConfigError, RealignConfig
from ui import events, figures
from ui.session import Session, SessionError, restore_summary, status_line
from ui.workbench import WORKBENCH

HEAD_POINTS_MAX = 200_000
"""Weights of one head drawn in its rank figure (all of them for SmolLM2's 147 k)."""

LIVE_THREADS = 1
"""Torch threads of the live realign view on the CPU: it is many small tensor operations, where
thread hand-offs cost more than they bring (and a busy machine makes them far worse; see
``bench/bench_realign_live.py --threads``)."""

SLIDERS = ("p", "q", "max_p", "top_h")
"""The number settings of the restore set: sliders whose boxes take a typed value."""

CSS = """
#hsr-realign-msg p { margin: 0; }
#hsr-realign-heatmap .js-plotly-plot { cursor: pointer; }
"""

HEAD = """
<script>
// Clicking a cell of the Realign heatmap picks that head for the detail view: the click goes
// into a hidden textbox (#hsr-clicked-head) as "layer-head@time" (the time makes every click a
// change), and the textbox's change event runs the head_clicked handler.
(() => {
  const bind = () => {
    document.querySelectorAll("#hsr-realign-heatmap .js-plotly-plot").forEach((gd) => {
      if (!gd.on || (gd._hsrEvents && gd._hsrEvents === gd._ev)) return;
      gd._hsrEvents = gd._ev;
      gd.on("plotly_click", (ev) => {
        const pt = ev && ev.points && ev.points[0];
        const box = document.querySelector("#hsr-clicked-head textarea, #hsr-clicked-head input");
        if (!pt || !box) return;
        box.value = `${pt.y}-${pt.x}@${Date.now()}`;
        box.dispatchEvent(new Event("input", { bubbles: true }));
      });
    });
  };
  setInterval(bind, 700);
  // Enter in a setting's number box applies it: leaving the box is what releases a slider
  document.addEventListener("keydown", (ev) => {
    const box = ev.target;
    if (ev.key !== "Enter" || !(box instanceof HTMLInputElement) || box.type !== "number") return;
    if (!box.closest("#hsr-realign-controls")) return;
    ev.preventDefault();
    box.blur();
  }, true);
})();
</script>
"""


def _boxes(state: Session) -> dict[str, Any]:
    """The number boxes set back to the settings of the session's restore set (if any)."""
    cfg = state.realign
    return {} if cfg is None else {name: getattr(cfg, name) for name in SLIDERS}


def realign_view(
    loaded: pipeline.LoadedModel,
    masks: pipeline.Masks,
    scores: Any,
    ranks: pipeline.RankCache,
    cfg: RealignConfig,
    head: pipeline.Head | None = None,
    *,
    score_label: str = "score",
) -> dict[str, Any]:
    """The restore set for ``cfg`` and everything the Realign tab shows of it.

    This is the whole work of one slider move: ``pipeline.realign`` over the cached ranks,
    ``head_rank_points`` for the head in detail, and the figures.

    Args:
        loaded: the model (only its adapter and geometry are used).
        masks: the session's pruning masks.
        scores: Ships scores ``[num_layers, num_heads]`` (tensor).
        ranks: the shared rank cache of the session's norms.
        cfg: p, q, max_p, top_h and slicing (already checked).
        head: the head shown in detail (selected or not); the best selected head when None.

    Returns:
        ``{"restore": RestoreSet, "head": Head, "realign_heatmap", "realign_bars",
        "head_plot": Figure, "realign_totals": markdown, "realign_json": dict,
        "realign_head": dropdown update}``.
    """
    a = loaded.adapter
    with pipeline.torch_threads(LIVE_THREADS, loaded.device):
        rs = pipeline.realign(loaded, masks, scores, cfg, ranks).value
        head = head if head is not None else rs.heads[0]
        detail = head_figure(loaded, masks, ranks, cfg, head, rs)
    total_w = a.num_linear_params()
    totals = (
        f"### {rs.count:,} weights restored\n"
        f"in {len(rs.heads)} heads = **{rs.per_10k_pruned:.3f} ‱** of the "
        f"{rs.pruned_total:,} pruned weights ({100 * rs.count / total_w:.4f}% of the decoder "
        f"linears).\n\n{rs.candidates:,} restore candidates (R) in the heads' slices; the "
        "restored ones are those the mask pruned.\n\n"
        + " · ".join(f"{p} {c:,}" for p, c in rs.per_module.items())
    )
    if cfg.scope != "heads":
        mlp = sum(sum(v.values()) for v in rs.mlp_per_layer.values())
        totals += (
            f"\n\n**Scope heads+mlp (our extension; the paper restores attention heads only):** "
            f"{mlp:,} of them in the MLPs of layers "
            f"{', '.join(str(l) for l in sorted(rs.mlp_per_layer))} "
            f"({rs.mlp_candidates:,} candidates there)."
        )
    return {
        "restore": rs,
        "head": head,
        "realign_heatmap": selected_heatmap(loaded, scores, rs, cfg, head, score_label),
        "realign_bars": figures.restored_bars({h.label: rs.per_head[h] for h in rs.heads}),
        "head_plot": detail,
        "realign_totals": totals,
        "realign_json": restore_summary(rs),
        "realign_head": gr.update(choices=[h.label for h in rs.heads], value=head.label),
    }


def selected_heatmap(
    loaded: pipeline.LoadedModel,
    scores: Any,
    rs: pipeline.RestoreSet,
    cfg: RealignConfig,
    head: pipeline.Head,
    score_label: str = "score",
) -> Any:
    """The Realign heatmap: Ships scores ``[num_layers, num_heads]`` (tensor), the selected
    heads circled, and ``head``, the one in detail (clicked or picked), outlined."""
    return figures.heads_heatmap(
        scores.numpy(),
        rs.heads,
        title=f"Selected heads: top {cfg.top_h} by Ships",
        score_label=score_label,
        marked_label=f"selected ({len(rs.heads)})",
        picked=head,
        layer_kinds=loaded.adapter.layer_kinds(),
    )


def _head_or_none(text: str | None, num_layers: int, num_heads: int) -> pipeline.Head | None:
    try:
        return pipeline.Head.parse(text or "", num_layers, num_heads)
    except ValueError:
        return None


def head_figure(
    loaded: pipeline.LoadedModel,
    masks: pipeline.Masks,
    ranks: pipeline.RankCache,
    cfg: RealignConfig,
    head: pipeline.Head,
    rs: pipeline.RestoreSet,
) -> Any:
    """The utility-rank vs safety-rank figure of one head (any head of the model)."""
    pts = pipeline.head_rank_points(loaded, masks, ranks, head, cfg, max_points=HEAD_POINTS_MAX)
    selected = head in rs.heads
    return figures.head_ranks_figure(
        pts["safety"].numpy(),
        pts["utility"].numpy(),
        pts["pruned"].numpy(),
        pts["restored"].numpy(),
        p=cfg.p,
        q=cfg.q,
        max_p=cfg.max_p,
        head=head.label,
        total=pts["total"],
        restored_total=rs.restored_in(head) if selected else None,
        selected=selected,
    )


def realign_config(
    p: float, q: float, max_p: float, top_h: float, slicing: str, scope: str = "heads"
) -> tuple[RealignConfig | None, str]:
    """The config, or None and a message saying what to change."""
    try:
        top = int(top_h)
        if top != top_h:
            raise ConfigError(f"top_h must be a whole number, got {top_h}")
        scope = SCOPE_CHOICES.get(scope, scope)
        return RealignConfig(float(p), float(q), float(max_p), top, slicing, scope), ""
    except ConfigError as e:
        return None, f"**Nothing changed:** {e}"


def _realign(
    p: float,
    q: float,
    max_p: float,
    top_h: float,
    slicing: str,
    head: str | None,
    scope: str,
    state: Session,
    *,
    strict: bool,
) -> dict[str, Any]:
    cfg, problem = realign_config(p, q, max_p, top_h, slicing, scope)
    if cfg is None:
        return {"realign_msg": problem + _kept(state), **_boxes(state)}
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
            return {
                "realign_msg": f"**Nothing changed:** {e}. Lower top_h.{_kept(state)}",
                **_boxes(state),
            }
        view = realign_view(
            loaded,
            state.masks,
            state.scores,
            WORKBENCH.rank_cache(state),
            cfg,
            _head_or_none(head, a.num_layers, a.num_heads),
            score_label=figures.score_label(state.ships.metric),
        )
        new = replace(state, realign=cfg, restore=view.pop("restore"), head=view.pop("head"))
        WORKBENCH.install(new)
    return {
        **view,
        "state": new,
        "status": status_line(new),
        "realign_msg": f"p={cfg.p:g} · q={cfg.q:g} · max_p={cfg.max_p:g} · top_h={cfg.top_h} "
        f"· {cfg.slicing} slicing"
        + (" · **heads+mlp: our extension, not in the paper**" if cfg.scope != "heads" else ""),
    }


def _kept(state: Session) -> str:
    cfg = state.realign
    if cfg is None:
        return ""
    return (
        f" The results and the boxes show p={cfg.p:g} · q={cfg.q:g} · max_p={cfg.max_p:g} · "
        f"top_h={cfg.top_h}."
    )


@events.user_errors("Realign")
def realign(
    p: float,
    q: float,
    max_p: float,
    top_h: float,
    slicing: str,
    head: str | None,
    scope: str,
    state: Session,
) -> dict[str, Any]:
    """The HSR restore set for these settings (no statistics are recomputed)."""
    return _realign(p, q, max_p, top_h, slicing, head, scope, state, strict=True)


@events.user_errors("Realign")
def realign_refresh(
    p: float,
    q: float,
    max_p: float,
    top_h: float,
    slicing: str,
    head: str | None,
    scope: str,
    state: Session,
) -> dict[str, Any]:
    """Like ``realign``, but only a note when attribution or pruning is missing."""
    return _realign(p, q, max_p, top_h, slicing, head, scope, state, strict=False)


@events.user_errors("Head detail")
def head_detail(head: str, state: Session) -> dict[str, Any]:
    """Show one head's weights on the rank axes (any head, selected or not), and outline it on
    the heatmap."""
    if not head:
        return {}
    with WORKBENCH.lock:
        loaded = WORKBENCH.require(state)
        if state.restore is None or state.masks is None:
            raise SessionError("Realign first: the head view shows the current restore set.")
        a = loaded.adapter
        picked = pipeline.Head.parse(head, a.num_layers, a.num_heads)
        ranks = WORKBENCH.rank_cache(state)
        with pipeline.torch_threads(LIVE_THREADS, loaded.device):
            fig = head_figure(loaded, state.masks, ranks, state.realign, picked, state.restore)
        heatmap = selected_heatmap(
            loaded,
            state.scores,
            state.restore,
            state.realign,
            picked,
            figures.score_label(state.ships.metric),
        )
    new = replace(state, head=picked)
    return {
        "state": new,
        "head_plot": fig,
        "realign_head": gr.update(value=picked.label),
        "realign_heatmap": heatmap,
    }


def head_clicked(clicked: str, state: Session) -> dict[str, Any]:
    """A click on the Realign heatmap (``"l-h@time"`` from the page script)."""
    return head_detail((clicked or "").split("@")[0], state)


# ---------------------------------------------------------------------------------------------
# the tab


INPUTS = ["p", "q", "max_p", "top_h", "slicing", "realign_head", "scope", "state"]

SCOPE_CHOICES = {
    "heads (the paper)": "heads",
    "heads+mlp (our extension)": "heads+mlp",
}
"""The scope radio's labels and the ``RealignConfig.scope`` each stands for."""
OUTPUTS = [
    "state",
    "status",
    "realign_msg",
    "realign_totals",
    "realign_heatmap",
    "realign_bars",
    "realign_head",
    "head_plot",
    *SLIDERS,
    "realign_json",
]


def build(c: dict[str, Any]) -> None:
    with gr.Tab("4 · Realign", id="realign"):
        gr.Markdown(
            "Restore candidates R: weights in the top **q** by safety whose utility rank "
            "lies between the top **p** and the top **max_p**. Inside the **top_h** heads, "
            "the pruned ones get their dense value back."
        )
        _controls_and_figures(c)


def _controls_and_figures(c: dict[str, Any]) -> None:
    """The sliders with what they change right under them (the message and the totals, in view
    with them at 1280x800), the other settings below; the figures beside."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300, elem_id="hsr-realign-controls"):
            c["p"] = gr.Slider(0, 1, value=0.5, step=0.01, label="p", info="utility: never above")
            c["q"] = gr.Slider(0, 1, value=0.5, step=0.01, label="q", info="safety: top fraction")
            c["max_p"] = gr.Slider(
                0, 1, value=0.7, step=0.01, label="max_p", info="utility: at most"
            )
            c["top_h"] = gr.Slider(1, 64, value=10, step=1, label="top_h", info="heads realigned")
            # what a slider move changes, right under the sliders (in view at 1280x800)
            c["realign_msg"] = gr.Markdown(label="realign message", elem_id="hsr-realign-msg")
            c["realign_totals"] = gr.Markdown(elem_id="hsr-realign-totals", label="restored totals")
            c["scope"] = gr.Radio(
                list(SCOPE_CHOICES),
                value="heads (the paper)",
                label="scope",
                info="heads+mlp also restores the same band in the MLPs of the selected heads' "
                "layers: our extension, not in the paper",
            )
            c["slicing"] = gr.Radio(
                ["head", "reference"],
                value="head",
                label="slicing",
                info="head: each head's own weights; reference: the released code's slices",
            )
            c["realign_head"] = gr.Dropdown(
                [],
                value=None,
                label="head in detail",
                allow_custom_value=True,
                info="or click the heatmap",
            )
            c["clicked_head"] = gr.Textbox(visible="hidden", elem_id="hsr-clicked-head")
            c["realign_btn"] = gr.Button("Realign", size="sm")
            with gr.Accordion("Restore set (JSON)", open=False):
                c["realign_json"] = gr.JSON(label="restore set", show_label=False)
        with gr.Column(scale=3):
            with gr.Row(equal_height=False):
                c["realign_heatmap"] = gr.Plot(
                    figures.placeholder("Attribute and prune first"),
                    label="selected heads",
                    show_label=False,
                    elem_id="hsr-realign-heatmap",
                )
                c["realign_bars"] = gr.Plot(
                    figures.placeholder("Attribute and prune first"),
                    label="restored per head",
                    show_label=False,
                )
            c["head_plot"] = gr.Plot(
                figures.placeholder("Attribute and prune first", height=460),
                elem_id="hsr-head-plot",
                label="head detail",
                show_label=False,
            )


def wire(c: dict[str, Any]) -> None:
    # redraw after the steps the restore set depends on (when they succeeded)
    for step in ("attribute_done", "prune_done"):
        events.event(
            c,
            c[step].success,
            realign_refresh,
            INPUTS,
            OUTPUTS,
            message="realign_msg",
            api_visibility="private",
            show_progress="hidden",
            **events.MODEL,
        )
    events.event(
        c,
        [
            c["p"].release,
            c["q"].release,
            c["max_p"].release,
            c["top_h"].release,
            c["slicing"].input,
            c["scope"].input,
            c["realign_btn"].click,
        ],
        realign,
        INPUTS,
        OUTPUTS,
        message="realign_msg",
        # the values as typed: gradio's range check would refuse one before the handler (a
        # toast, then the box clamped: -1 shows as 0 while the results are still the last
        # ones); _realign checks them, says what is wrong and puts the boxes back
        preprocess=False,
        api_name="realign",
        trigger_mode="always_last",
        show_progress="minimal",
        show_progress_on=[c["realign_totals"]],
        **events.MODEL,
    )
    events.event(
        c,
        c["realign_head"].input,
        head_detail,
        ["realign_head", "state"],
        ["state", "head_plot", "realign_head", "realign_heatmap"],
        message="realign_msg",
        api_name="head_detail",
        trigger_mode="always_last",
        show_progress="minimal",
        **events.MODEL,
    )
    events.event(
        c,
        c["clicked_head"].change,
        head_clicked,
        ["clicked_head", "state"],
        ["state", "head_plot", "realign_head", "realign_heatmap"],
        message="realign_msg",
        api_visibility="private",
        trigger_mode="always_last",
        show_progress="minimal",
        **events.MODEL,
    )
