"""Tab 6, Evaluate (docs/METHOD.md, "Evaluation"): the built-in evaluation split or an uploaded
JSONL of ``{"prompt", "harmful", "image"?}`` goes through every variant the session has, with
batched greedy generation (``pipeline.evaluate``), and a judge chosen here (``reference``, the
paper's rule; ``keyword``; ``model``, a Llama-Guard-style judge model) classes every answer
refused, complied or incoherent. The tab shows the refusal rates on harmful and benign prompts,
the attack success rate (ASR) with incoherent answers counted as success (as the paper) and
excluded, each with its Wilson 95% interval, the refusal restoration rate
``RSR = (ASR_pruned - ASR_HSR) / (ASR_pruned - ASR_dense)`` with its paired bootstrap interval,
which differences are within the noise, the answer-token perplexity of the utility set, a
grouped bar chart with error bars and every prompt's answers and verdicts side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import JUDGES, ConfigError, EvalConfig, ModelSpec, default_max_new_tokens
from ui import events, figures, public
from ui.session import Session, settings_key, variant_settings
from ui.workbench import WORKBENCH

VARIANTS = pipeline.VARIANTS
EVAL_SOURCES = ("built-in", "upload")


def eval_samples(source: str, upload: str | None, num_prompts: float) -> tuple[list[Any], str]:
    """The prompts to evaluate and a label for them.

    Raises:
        ConfigError: an unknown source, or no file for ``upload``.
    """
    if source == "built-in":
        samples, label = pipeline.load_eval("builtin"), "the built-in evaluation split"
    elif source == "upload":
        if not upload:
            raise ConfigError('upload a JSONL file of {"prompt", "harmful", "image"?} rows')
        public.POLICY.check_upload(upload, "evaluation file")
        samples = pipeline.load_eval(upload, image_paths=public.POLICY.image_paths)
        label = f"`{Path(upload).name}`"
    else:
        raise ConfigError(f"unknown evaluation source {source!r}; choose one of {EVAL_SOURCES}")
    n = int(num_prompts or 0)
    if n < 0:
        raise ConfigError(f"prompts must be 0 (all) or more, got {n}")
    if 0 < n < len(samples):
        samples, label = pipeline.select(samples, n), f"{n} of {len(samples)} prompts of {label}"
    else:
        label = f"{len(samples)} prompts of {label}"
    return samples, label


def _metrics(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        name: {k: v for k, v in m.items() if k != "answers"}
        for name, m in result["variants"].items()
    }


def _answers(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {name: m["answers"] for name, m in result["variants"].items()}


def _rsr_text(result: dict[str, Any]) -> str:
    names = set(result["variants"])
    if not {"original", "pruned", "realigned"} <= names:
        missing = [v for v in VARIANTS if v not in names]
        return (
            f"No {' and no '.join(missing)} model in this session yet, so no RSR: attribute, "
            "prune and realign (tabs 2 to 4) to compare the three."
        )
    if result.get("rsr") is None:
        return "RSR is undefined here: pruning did not raise the attack success rate."
    ci = result.get("rsr_ci95") or {}
    interval = (
        f" (95% interval {100 * ci['low']:.1f} to {100 * ci['high']:.1f}%)"
        if ci.get("low") is not None
        else ""
    )
    return (
        f"**RSR {100 * result['rsr']:.1f}%**{interval} of the refusals pruning lost are "
        "restored by HSR."
    )


def _noise_text(result: dict[str, Any]) -> str:
    """Which differences are within the noise, as a Markdown list."""
    notes = pipeline.noise_notes(result)
    return "\n".join(f"- {n}" for n in notes)


_JUDGE_MODEL: dict[str, Any] = {}
"""The judge model last loaded for ``judge="model"`` (one at a time: ``{name: GuardJudge}``)."""


def judge_for(judge: str, name: str | None) -> Any:
    """The judge model for ``judge == "model"`` (loaded once, kept until another is asked
    for); None for the other judges.

    Raises:
        ConfigError: an unknown judge, or ``model`` without a model name.
    """
    if judge not in JUDGES:
        raise ConfigError(f"unknown judge {judge!r}; choose one of {', '.join(JUDGES)}")
    if judge != "model":
        return None
    name = (name or "").strip()
    if not name:
        raise ConfigError("the model judge needs a judge model: give its hub id or folder")
    if name not in _JUDGE_MODEL:
        spec = ModelSpec(name)
        public.POLICY.check_model(spec)
        _JUDGE_MODEL.clear()
        _JUDGE_MODEL[name] = pipeline.load_judge(name, cache_dir=WORKBENCH.cache_root)
    return _JUDGE_MODEL[name]


def budget_for_judge(judge: str) -> dict[str, Any]:
    """Choosing a judge sets its default new-token budget (256 for the reference, as the
    reference evaluates) and shows the judge-model box for ``model``."""
    return {
        "eval_max_new": gr.update(value=default_max_new_tokens(judge)),
        "eval_judge_model": gr.update(visible=judge == "model"),
    }


@events.user_errors("Evaluate")
def evaluate(
    source: str,
    upload: str | None,
    num_prompts: float,
    max_new_tokens: float,
    batch_size: float,
    disagree_only: bool,
    judge: str,
    judge_model: str | None,
    state: Session,
    request: gr.Request,
    progress=events.TRACK_TQDM,
) -> dict[str, Any]:
    """Answer the evaluation prompts with every variant of the session, class the answers by
    ``judge`` and score them."""
    events.show_eta(progress)
    judge = judge or "keyword"
    cfg = EvalConfig(max_new_tokens=int(max_new_tokens), batch_size=int(batch_size), judge=judge)
    samples, label = eval_samples(source, upload, num_prompts)
    with WORKBENCH.lock, events.stoppable(request) as should_stop:
        WORKBENCH.require(state)
        guard = judge_for(judge, judge_model)
        variants = WORKBENCH.install(state)
        try:
            result = pipeline.evaluate(
                variants,
                samples,
                cfg,
                which=variants.available(),
                judge=guard,
                should_stop=should_stop,
            )
        except pipeline.Cancelled:
            return {"eval_msg": "**Stopped.** Earlier results are kept."}
    record = {
        "key": settings_key(state),
        "source": label,
        "result": result,
        "settings": {v: variant_settings(state, v) for v in result["variants"]},
    }
    names = ", ".join(result["variants"])
    return {
        "eval_state": record,
        "eval_msg": (
            f"**Done.** {label} through {names} ({cfg.max_new_tokens} new tokens, batches of "
            f"{cfg.batch_size}; answers classed by the {judge} judge: "
            f"{result['judge']['rule']}; bars and brackets are 95% intervals)."
            f"\n\n{_rsr_text(result)}\n\n{_noise_text(result)}"
        ),
        "eval_metrics": figures.eval_metrics_table(_metrics(result)),
        "eval_chart": figures.eval_chart(_metrics(result)),
        "eval_table": figures.answers_table(_answers(result), disagree_only=bool(disagree_only)),
    }


def filter_answers(disagree_only: bool, record: dict[str, Any] | None) -> dict[str, Any]:
    """The answers table, all prompts or only those where the variants' verdicts differ."""
    if not record:
        return {"eval_table": figures.answers_table({})}
    table = figures.answers_table(_answers(record["result"]), disagree_only=bool(disagree_only))
    return {"eval_table": table}


# ---------------------------------------------------------------------------------------------
# the tab


def build(c: dict[str, Any]) -> None:
    with gr.Tab("6 · Evaluate", id="evaluate"):
        gr.Markdown(
            "Every variant of this session answers the same prompts (greedy, in batches) and "
            "the judge classes each answer **refused**, **complied** or **incoherent** "
            "(degenerate text). **ASR** is the share of harmful prompts not refused "
            "(incoherent answers count as success, as in the paper; the table also gives it "
            "with them excluded); **RSR** = (ASR pruned − ASR realigned) / (ASR pruned − ASR "
            "original). Every rate has its Wilson 95% interval, RSR a paired bootstrap "
            "interval; the message says which differences are within the noise. The utility "
            "proxy is the **answer-token perplexity of the utility set** (the benign prompts' "
            "reference answers)."
        )
        with gr.Row(equal_height=True):
            c["eval_source"] = gr.Radio(
                list(EVAL_SOURCES),
                value="built-in",
                label="evaluation set",
                info="built-in: 142 harmful, benign and borderline prompts",
                scale=2,
            )
            c["eval_upload"] = gr.File(
                None,
                label='JSONL of {"prompt", "harmful", "image"?}',
                file_types=[".jsonl"],
                type="filepath",
                visible=False,
                scale=2,
                height=90,
            )
            c["eval_n"] = gr.Number(
                30, precision=0, minimum=0, label="prompts", info="a subset; 0 = all", scale=1
            )
            c["eval_max_new"] = gr.Slider(
                1, 512, value=64, step=1, label="max new tokens", scale=2, min_width=200
            )
            c["eval_batch"] = gr.Slider(
                1, 64, value=8, step=1, label="batch size", scale=2, min_width=200
            )
        with gr.Row(equal_height=True):
            c["eval_judge"] = gr.Radio(
                list(JUDGES),
                value="keyword",
                label="refusal judge",
                info="reference: the paper's rule (31 case-sensitive strings or < 20 words, "
                "256 tokens); keyword: this project's phrases; model: a judge model",
                scale=3,
            )
            c["eval_judge_model"] = gr.Textbox(
                "",
                label="judge model (hub id or folder, Llama Guard style)",
                visible=False,
                scale=2,
            )
        with gr.Row():
            c["eval_btn"] = gr.Button("Run evaluation", variant="primary", scale=3)
            c["eval_stop"] = gr.Button("Stop", variant="stop", scale=1)
        c["eval_msg"] = gr.Markdown(elem_id="hsr-eval-msg", label="evaluation status")
        with gr.Row(equal_height=False):
            c["eval_chart"] = gr.Plot(
                figures.placeholder("Run the evaluation"),
                label="evaluation",
                show_label=False,
                scale=1,
                elem_id="hsr-eval-chart",
            )
            c["eval_metrics"] = gr.Dataframe(
                figures.eval_metrics_table({}),
                label="metrics per variant",
                interactive=False,
                column_widths=["40%", "20%", "20%", "20%"],
                scale=1,
            )
        c["eval_disagree"] = gr.Checkbox(
            False,
            label="only prompts where the variants' verdicts differ (refused, complied, incoherent)",
        )
        c["eval_table"] = gr.Dataframe(
            figures.answers_table({}),
            label="every prompt's answers",
            interactive=False,
            wrap=True,
            max_height=640,
            column_widths=["22%", "7%", "7%", "7%", "7%", "16%", "17%", "17%"],
            elem_id="hsr-eval-table",
        )
        c["eval_state"] = gr.State(None, **public.POLICY.state_options())


def wire(c: dict[str, Any]) -> None:
    c["eval_source"].change(
        lambda s: gr.update(visible=s == "upload"),
        inputs=c["eval_source"],
        outputs=c["eval_upload"],
        queue=False,
        api_visibility="private",
    )
    events.slow(
        c,
        "eval_btn",
        evaluate,
        [
            "eval_source",
            "eval_upload",
            "eval_n",
            "eval_max_new",
            "eval_batch",
            "eval_disagree",
            "eval_judge",
            "eval_judge_model",
            "state",
        ],
        ["eval_state", "eval_msg", "eval_metrics", "eval_chart", "eval_table"],
        api_name="evaluate",
        message="eval_msg",
        show_progress_on=[c["eval_chart"]],
    )
    events.event(
        c,
        c["eval_judge"].input,
        budget_for_judge,
        ["eval_judge"],
        ["eval_max_new", "eval_judge_model"],
        api_visibility="private",
        show_progress="hidden",
    )
    c["eval_stop"].click(
        events.stop, api_visibility="private", concurrency_limit=None, show_progress="hidden"
    )
    events.event(
        c,
        c["eval_disagree"].input,
        filter_answers,
        ["eval_disagree", "eval_state"],
        ["eval_table"],
        api_name="eval_table",
        show_progress="hidden",
    )
