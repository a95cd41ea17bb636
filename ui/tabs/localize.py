"""Tab 8, Localize: where does the safety live? (``pipeline.localize``; our study, not the paper's.)

For the session's pruning, the same prompts of the built-in evaluation split are answered and
judged on every rung of a ladder: the dense model, the dense model with the top-k Ships heads
ablated, the pruned model, HSR's restore set, as many weights in k random heads (several draws:
the chance level), every pruned weight of the top-k heads, every pruned attention weight, every
pruned MLP weight. Each rung is a restore set or a head ablation through the shared variants
(no reload). A researcher sees in minutes whether attention heads can win back the lost safety
on this model before trusting an RSR.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import ConfigError, EvalConfig, LocalizeConfig
from ui import events, figures
from ui.session import Session, SessionError
from ui.workbench import WORKBENCH

INTRO = """**Where does the safety live?** *(HSR Workbench's own study; not in the paper.)* HSR
assumes that the safety pruning removes sits in a few attention heads. This ladder answers the
same prompts with different sets of pruned weights put back, from nothing to everything. If
*every pruned attention weight* wins back little while *every pruned MLP weight* wins back a
lot, no attention-only restoration (HSR included) can restore this model's safety; if HSR does
no better than *random heads*, Ships' ranking is not what helps. Bars show ASR (harmful prompts
answered, with the judge chosen here) with Wilson 95% intervals; random draws show their
range."""


def _int(value: Any, name: str, low: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number != int(number) or number < low:
        raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(number)


@events.user_errors("Localization ladder")
def localize(
    num_prompts: float,
    max_new_tokens: float,
    seeds: float,
    top_k: float,
    judge: str,
    state: Session,
    request: gr.Request,
    progress=events.TRACK_TQDM,
) -> dict[str, Any]:
    """Run the ladder on the session's pruning (and restore set, when realigned)."""
    events.show_eta(progress)
    k = _int(top_k, "heads (k)", 0)
    cfg = LocalizeConfig(top_k=k or None, seeds=_int(seeds, "random draws", 1))
    eval_cfg = EvalConfig(max_new_tokens=_int(max_new_tokens, "max new tokens", 1), judge=judge)
    samples = pipeline.load_eval("builtin")
    n = _int(num_prompts, "prompts", 0)
    if 0 < n < len(samples):
        samples = pipeline.select(samples, n)
    with WORKBENCH.lock, events.stoppable(request) as should_stop:
        WORKBENCH.require(state)
        if state.masks is None:
            raise SessionError("Prune first (tab 3): the ladder puts back what the mask pruned.")
        if state.scores is None:
            raise SessionError("Run Ships attribution first (tab 2): it picks the heads.")
        variants = WORKBENCH.install(state)
        try:
            result = pipeline.localize(
                variants,
                state.scores,
                state.restore,
                samples,
                cfg,
                eval_cfg,
                realign_cfg=state.realign,
                should_stop=should_stop,
            )
        except pipeline.Cancelled:
            return {"ladder_msg": "**Stopped.** Earlier results are kept."}
    rungs = result["rungs"]
    hsr_note = (
        ""
        if state.restore is not None
        else " No realigned model yet, so no HSR rung (realign in tab 4 to add it)."
    )
    return {
        "ladder_msg": (
            f"**Done.** {len(rungs)} rungs x {result['n_prompts']} prompts "
            f"({rungs[0]['n_harmful']} harmful, {rungs[0]['n_benign']} benign) of the built-in "
            f"evaluation split, {eval_cfg.max_new_tokens} new tokens, greedy, {judge} judge "
            "(incoherent answers count as attack success, as in the paper; the table shows "
            "their share)." + hsr_note
        ),
        "ladder_chart": figures.ladder_chart(rungs),
        "ladder_table": figures.ladder_table(rungs),
        "ladder_json": {**result, "rungs": [_without_answers(r) for r in rungs]},
    }


def _without_answers(rung: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rung.items() if k != "answers"}


# ---------------------------------------------------------------------------------------------
# the tab


def build(c: dict[str, Any]) -> None:
    with gr.Tab("8 · Localize", id="localize"):
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            c["ladder_n"] = gr.Number(
                20,
                precision=0,
                minimum=0,
                label="prompts",
                info="of the built-in split; 0 = all",
                elem_id="hsr-ladder-n",
            )
            c["ladder_max_new"] = gr.Slider(
                1,
                256,
                value=40,
                step=1,
                label="max new tokens",
                min_width=200,
                elem_id="hsr-ladder-max-new",
            )
            c["ladder_seeds"] = gr.Number(
                3, precision=0, minimum=1, label="random draws", info="the chance control"
            )
            c["ladder_k"] = gr.Number(
                0, precision=0, minimum=0, label="heads (k)", info="0 = the realign top_h"
            )
            c["ladder_judge"] = gr.Radio(
                ["keyword", "reference"],
                value="keyword",
                label="judge",
                info="reference: the paper's rule (20-word minimum: use >= 64 tokens)",
            )
        with gr.Row():
            c["ladder_btn"] = gr.Button("Run the ladder", variant="primary", scale=3)
            c["ladder_stop"] = gr.Button("Stop", variant="stop", scale=1)
        c["ladder_msg"] = gr.Markdown(elem_id="hsr-ladder-msg", label="ladder status")
        c["ladder_chart"] = gr.Plot(
            figures.placeholder("Prune (and realign), then run the ladder"),
            label="ladder",
            show_label=False,
            elem_id="hsr-ladder-chart",
        )
        c["ladder_table"] = gr.Dataframe(
            figures.ladder_table([]), label="rungs", interactive=False, wrap=True
        )
        with gr.Accordion("Ladder (JSON)", open=False):
            c["ladder_json"] = gr.JSON(label="ladder", show_label=False)


def wire(c: dict[str, Any]) -> None:
    events.slow(
        c,
        "ladder_btn",
        localize,
        ["ladder_n", "ladder_max_new", "ladder_seeds", "ladder_k", "ladder_judge", "state"],
        ["ladder_msg", "ladder_chart", "ladder_table", "ladder_json"],
        api_name="localize",
        message="ladder_msg",
        show_progress_on=[c["ladder_chart"]],
    )
    c["ladder_stop"].click(
        events.stop, api_visibility="private", concurrency_limit=None, show_progress="hidden"
    )
