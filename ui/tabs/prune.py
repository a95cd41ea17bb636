"""Tab 3, Prune: Wanda statistics of the safety and utility sets (cached on disk; HSR ranks by
them whatever the pruner), then the masks of the chosen base pruner (Wanda, SparseGPT, SNIP or
magnitude: ``pipeline.calibrate``, ``pipeline.prune``), installed into the shared variants for
this session, with the achieved sparsity per layer and module."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import replace
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import (
    PRUNER_LABELS,
    PRUNER_MODES,
    PRUNERS,
    STRUCTURES,
    WandaConfig,
    parse_structure,
)
from ui import events, figures
from ui.session import Session, status_line
from ui.workbench import LIVE_CACHE_MAX_WEIGHTS, WORKBENCH


def wanda_config(
    sparsity: float, structure: str, mode: str, num_samples: float, pruner: str = "wanda"
) -> WandaConfig:
    """The widgets' values as a ``WandaConfig`` (which checks them)."""
    return WandaConfig(
        sparsity=float(sparsity),
        pruner=pruner,
        mode=mode,
        num_samples=int(num_samples),
        **parse_structure(structure),
    )


@events.user_errors("Calibrate & prune")
def prune(
    sparsity: float,
    structure: str,
    mode: str,
    num_samples: float,
    recompute: bool,
    pruner: str,
    state: Session,
    request: gr.Request,
    progress=events.TRACK_TQDM,
) -> dict[str, Any]:
    """Wanda statistics of both sets (cached), then the pruner's masks."""
    events.show_eta(progress)
    cfg = wanda_config(sparsity, structure, mode, num_samples, pruner)
    with WORKBENCH.lock, events.stoppable(request) as should_stop:
        loaded = WORKBENCH.require(state)
        calib = WORKBENCH.calibration(state.data)
        try:
            with WORKBENCH.variants.use("original") as dense:
                safety, utility = pipeline.calibration_samples(dense, calib, cfg)
                norms = pipeline.calibrate(
                    dense,
                    safety,
                    utility,
                    cfg,
                    WORKBENCH.cache,
                    recompute=bool(recompute),
                    should_stop=should_stop,
                )
                key = WORKBENCH.norms_key(state.data, cfg)
                WORKBENCH.put_norms(key, norms.value)
                masks = pipeline.prune(
                    dense,
                    norms.value,
                    utility,
                    cfg,
                    should_stop=should_stop,
                    scratch=WORKBENCH.scratch,
                )
        except pipeline.Cancelled:
            return {"prune_status": "**Stopped.** Earlier results are kept."}
        pruning = masks.value
        report = pipeline.sparsity_report(loaded, pruning.masks)
        new = replace(
            state,
            wanda=cfg,
            norms_key=key,
            masks=pruning.masks,
            updated=pruning.updated,
            sparsity=report,
            restore=None,
        )
        WORKBENCH.install(new)  # the dense copy is made here, not at the first chat turn
        with suppress(pipeline.Cancelled):  # the ranks are a head start; the masks are done
            pipeline.warm_ranks(
                loaded,
                WORKBENCH.rank_cache(new),
                max_weights=LIVE_CACHE_MAX_WEIGHTS,
                should_stop=should_stop,
            )
    stats = "from the cache" if norms.cached else f"in {norms.seconds:.1f} s"
    shape = f"{cfg.n}:{cfg.m}" if cfg.structure == "n:m" else "unstructured"
    return {
        "state": new,
        "status": status_line(new),
        "prune_status": (
            f"**Done.** Pruned {report['pruned_weights']:,} of {report['prunable_weights']:,} "
            f"decoder weights with **{PRUNER_LABELS[cfg.pruner]}** "
            f"(**{100 * report['sparsity']:.2f}%**, {shape}, {cfg.mode}"
            + ("; the kept weights carry SparseGPT's update" if pruning.updated else "")
            + f"); Wanda statistics of {cfg.num_samples} samples per set {stats}, masks in "
            f"{masks.seconds:.1f} s."
        ),
        "sparsity_plot": figures.sparsity_chart(
            report["per_layer"], report["per_module"], cfg.target_sparsity
        ),
    }


def pruner_mode(pruner: str, mode: str) -> str:
    """The mode radio after a pruner is chosen: kept when the pruner has it, else its own."""
    modes = PRUNER_MODES.get(pruner, ("one-shot",))
    return mode if mode in modes else modes[0]


# ---------------------------------------------------------------------------------------------
# the tab


def build(c: dict[str, Any]) -> None:
    with gr.Tab("3 · Prune", id="prune"):
        gr.Markdown(
            "**Wanda** scores each weight by |W| times the norm of its input over calibration "
            "tokens. Statistics of both sets are collected in one pass each (and cached; HSR "
            "ranks by them whatever the pruner); the mask prunes the lowest utility scores of "
            "each row. **SparseGPT** chooses by the layer Hessian and updates the weights it "
            "keeps; **SNIP** prunes the lowest |W · dL/dW| on the utility set; **magnitude** the "
            "lowest |W|."
        )
        with gr.Row(equal_height=True):
            c["pruner"] = gr.Dropdown(
                [(PRUNER_LABELS[p], p) for p in PRUNERS],
                value="wanda",
                label="pruner",
                info="the base pruner HSR realigns",
                scale=1,
                min_width=160,
            )
            c["sparsity"] = gr.Slider(
                0.0,
                0.95,
                value=0.4,  # the default model's measured sparsity (ui.tabs.model)
                step=0.05,
                label="sparsity",
                info="share of each row pruned (unstructured; N:M prunes N/M); loading a "
                "model suggests one (built-in SmolLM2: 40%, measured; others 50%)",
                scale=2,
                min_width=280,
            )
            c["calib_samples"] = gr.Slider(
                1,
                256,
                value=32,
                step=1,
                label="calibration samples per set",
                info="128 in the paper",
                scale=2,
                min_width=280,
            )
            c["structure"] = gr.Radio(
                list(STRUCTURES), value="unstructured", label="structure", scale=2
            )
            c["mode"] = gr.Radio(
                ["one-shot", "sequential"],
                value="one-shot",
                label="mode",
                info="sequential: each layer's statistics after pruning the earlier ones "
                "(SparseGPT: sequential only; magnitude: one-shot only)",
                scale=2,
            )
            c["prune_recompute"] = gr.Checkbox(
                False, label="recompute", info="ignore the cache", scale=1
            )
        with gr.Row():
            c["prune_btn"] = gr.Button("Calibrate & prune", variant="primary", scale=3)
            c["prune_stop"] = gr.Button("Stop", variant="stop", scale=1)
        c["prune_status"] = gr.Markdown(elem_id="hsr-prune-status", label="pruning status")
        c["sparsity_plot"] = gr.Plot(
            figures.placeholder("Run Calibrate & prune"), label="sparsity", show_label=False
        )


def wire(c: dict[str, Any]) -> None:
    c["prune_done"] = events.slow(
        c,
        "prune_btn",
        prune,
        ["sparsity", "structure", "mode", "calib_samples", "prune_recompute", "pruner", "state"],
        ["state", "status", "prune_status", "sparsity_plot"],
        api_name="prune",
        message="prune_status",
        show_progress_on=[c["sparsity_plot"]],
    )
    c["pruner"].change(
        pruner_mode,
        [c["pruner"], c["mode"]],
        [c["mode"]],
        api_visibility="private",
        show_progress="hidden",
    )
    c["prune_stop"].click(
        events.stop, api_visibility="private", concurrency_limit=None, show_progress="hidden"
    )
