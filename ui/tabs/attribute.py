"""Tab 2, Attribute: Ships scores of every attention head (``pipeline.attribute``), cached on
disk, with a progress bar, an ETA and a Stop button, drawn as a heatmap and a ranking. Exact
Ships, or screening (our extension): every head estimated, the best re-scored exactly."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import ShipsConfig
from ui import events, figures
from ui.session import Session, status_line
from ui.workbench import WORKBENCH


@events.user_errors("Ships attribution")
def attribute(
    num_samples: float,
    ablation: str,
    metric: str,
    r_main: float,
    ships_mode: str,
    recompute: bool,
    state: Session,
    request: gr.Request,
    progress=events.TRACK_TQDM,
) -> dict[str, Any]:
    """Score every head with Ships (from the cache when it was computed before)."""
    events.show_eta(progress)
    cfg = ShipsConfig(
        num_samples=int(num_samples),
        ablation=ablation,
        metric=metric,
        r_main=int(r_main),
        mode=ships_mode,
    )
    with WORKBENCH.lock, events.stoppable(request) as should_stop:
        loaded = WORKBENCH.require(state)
        calib = WORKBENCH.calibration(state.data)
        probes = pipeline.probe_prompts(loaded, calib, cfg)
        total = loaded.adapter.num_layers * loaded.adapter.num_heads
        top_h = state.realign.top_h if state.realign else min(10, total)
        try:
            r = pipeline.attribute(
                loaded,
                probes,
                cfg,
                WORKBENCH.cache,
                top_h=top_h,
                recompute=bool(recompute),
                should_stop=should_stop,
            )
        except pipeline.Cancelled:
            return {"ships_status": "**Stopped.** Earlier results are kept."}
    # new scores pick new heads: the restore set is redone by the next realign
    new = replace(state, ships=cfg, scores=r.value.float().cpu(), restore=None)
    scores = new.scores.numpy()
    top = min(10, scores.size)
    how = "from the cache (tick *recompute* to redo)" if r.cached else f"in {r.seconds:.1f} s"
    screened = ""
    if r.extra is not None:
        screened = (
            f" Screening (our extension): every head estimated, the best "
            f"{int(r.extra.exact.sum())} ({cfg.candidates} x top_h {top_h}) re-scored by exact "
            "Ships and ranked first; the others keep their estimates, ranked below."
        )
    return {
        "state": new,
        "status": status_line(new),
        "ships_status": (
            f"**Done.** Ships scores of {scores.size} heads over {len(probes)} probe prompts "
            f"({cfg.metric}, {cfg.ablation} ablation), {how}.{screened}"
        ),
        "ships_heatmap": figures.heads_heatmap(
            scores,
            pipeline.top_heads(new.scores, top),
            score_label=figures.score_label(cfg.metric),
            marked_label=f"top {top}",
            layer_kinds=loaded.adapter.layer_kinds(),
        ),
        "ships_table": figures.ranking_table(scores),
    }


# ---------------------------------------------------------------------------------------------
# the tab


def build(c: dict[str, Any]) -> None:
    with gr.Tab("2 · Attribute", id="attribute"):
        gr.Markdown(
            "**Ships** ablates each head in turn and measures how far the model's final hidden "
            "states on harmful prompts turn away (principal angle of their leading singular "
            "vectors, or KL of the next-token distribution). High score = safety-critical head."
        )
        with gr.Row(equal_height=True):
            c["ships_samples"] = gr.Slider(
                2,
                256,
                value=8,
                step=1,
                label="probe prompts",
                info="128 in the paper; a CPU takes ~40 s a prompt on SmolLM2",
                scale=3,
                min_width=320,
            )
            c["ablation"] = gr.Radio(
                ["zero", "uniform"],
                value="zero",
                label="ablation",
                info="remove the head's output, or make its attention uniform",
                scale=2,
            )
            c["metric"] = gr.Radio(
                ["angle", "kl"],
                value="angle",
                label="metric",
                info="dataset-level angle, or per-prompt KL",
                scale=2,
            )
            c["r_main"] = gr.Number(
                1, precision=0, minimum=1, label="r_main", info="singular directions", scale=1
            )
            c["ships_mode"] = gr.Radio(
                [("Exact", "exact"), ("Screen (ours)", "screen")],
                value="exact",
                label="mode",
                info="screen: our extension, every head estimated by one backward pass per "
                "prompt, exact Ships on the 3 x top_h best only",
                scale=2,
                elem_id="hsr-ships-mode",
            )
            c["ships_recompute"] = gr.Checkbox(
                False,
                label="recompute",
                info="ignore the cache",
                scale=1,
                elem_id="hsr-ships-recompute",
            )
        with gr.Row():
            c["attribute_btn"] = gr.Button("Run Ships attribution", variant="primary", scale=3)
            c["attribute_stop"] = gr.Button("Stop", variant="stop", scale=1)
        c["ships_status"] = gr.Markdown(elem_id="hsr-ships-status", label="attribution status")
        with gr.Row(equal_height=False):
            c["ships_heatmap"] = gr.Plot(
                figures.placeholder("Run Ships attribution to score the heads"),
                elem_id="hsr-ships-heatmap",
                label="Ships scores",
                show_label=False,
                scale=3,
            )
            c["ships_table"] = gr.Dataframe(
                figures.ranking_table(None),
                label="Heads ranked by score",
                interactive=False,
                max_height=520,
                scale=2,
            )


def wire(c: dict[str, Any]) -> None:
    c["attribute_done"] = events.slow(
        c,
        "attribute_btn",
        attribute,
        ["ships_samples", "ablation", "metric", "r_main", "ships_mode", "ships_recompute", "state"],
        ["state", "status", "ships_status", "ships_heatmap", "ships_table"],
        api_name="attribute",
        message="ships_status",
        show_progress_on=[c["ships_heatmap"]],
    )
    c["attribute_stop"].click(
        events.stop, api_name="stop", concurrency_limit=None, show_progress="hidden"
    )
