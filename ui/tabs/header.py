"""The page header: the introduction, the status line every step updates, and the session's
results as JSON (the ``/summary`` endpoint)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from hsr_core import pipeline
from ui import events
from ui.session import Session, restore_summary, status_line
from ui.workbench import WORKBENCH

INTRO = """# HSR Workbench
Find the attention heads that carry a model's safety behaviour (**Ships**), prune the model
(**Wanda**), and put back the few pruned weights inside those heads that matter most for safety
(**HSR**, *Hierarchical Safety Realignment*, Li et al., ACL 2025 Findings). Work left to right;
scores and statistics are cached on disk, so coming back later does not redo them."""

CSS = """
#hsr-status { font-size: 0.92em; padding: 4px 10px; border-radius: 6px;
              background: var(--background-fill-secondary); }
"""


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
        out["ships"] = {
            "config": vars(state.ships),
            "top_heads": [h.label for h in pipeline.top_heads(state.scores, 10)],
        }
    if state.sparsity is not None:
        out["pruning"] = {
            "config": vars(state.wanda),
            "sparsity": state.sparsity["sparsity"],
            "pruned_weights": state.sparsity["pruned_weights"],
        }
    if state.restore is not None:
        out["restore"] = {"config": vars(state.realign), **restore_summary(state.restore)}
    return out


def build(c: dict[str, Any]) -> None:
    gr.Markdown(INTRO)
    c["status"] = gr.Markdown(status_line(Session()), label="status", elem_id="hsr-status")
    with gr.Accordion("Session summary (JSON)", open=False):
        c["summary_btn"] = gr.Button("Refresh", size="sm")
        c["summary"] = gr.JSON(label="this tab's results")


def wire(c: dict[str, Any]) -> None:
    def show(state: Session) -> dict[str, Any]:
        return {"summary": summary(state)}

    events.event(c, c["summary_btn"].click, show, ["state"], ["summary"], api_name="summary")
