"""The Evaluate and Export tabs.

Evaluate (spec section 5): the built-in evaluation split or an uploaded JSONL of
``{"prompt", "harmful", "image"?}`` goes through every variant the session has, with batched
greedy generation (``hsr_core.pipeline.evaluate``); the tab shows the refusal rates on harmful
and benign prompts, the attack success rate (ASR), the refusal restoration rate
``RSR = (ASR_pruned - ASR_HSR) / (ASR_pruned - ASR_dense)``, the utility proxy (perplexity of the
reference answers), a grouped bar chart and every prompt's answers side by side.

Export: the pruned or realigned model as a ``save_pretrained`` folder in a zip with a model card
(``hsr_core.pipeline.model_card``), pushed to the Hugging Face hub when asked, and the run's
``heads.jsonl`` / ``summary.json`` (and ``eval.json``) written exactly as the command line
writes them, from a ``RunConfig`` built of the session's configs.
"""

from __future__ import annotations

import functools
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr

from hsr_core.config import ConfigError, EvalConfig, RealignConfig, ShipsConfig, WandaConfig
from hsr_core.config import fingerprint as config_fingerprint
from ui import figures, handlers
from ui.chat import VARIANTS, variant_settings
from ui.session import WORKBENCH, Session, SessionError, download_dir

EVAL_SOURCES = ("built-in", "upload")

# ---------------------------------------------------------------------------------------------
# evaluation


def settings_key(state: Session) -> str:
    """What an evaluation's variants depend on: model, data, Ships, Wanda and HSR settings."""
    return config_fingerprint(
        {
            "model": state.model,
            "data": state.data.key,
            "ships": state.ships,
            "wanda": state.wanda,
            "realign": state.realign,
            "restored": state.restore.count if state.restore is not None else None,
        }
    )


def matching_evaluation(state: Session, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The session's evaluation result when it was made with the session's current variants."""
    if record and record.get("key") == settings_key(state):
        return record["result"]
    return None


def eval_samples(source: str, upload: str | None, num_prompts: float) -> tuple[list[Any], str]:
    """The prompts to evaluate and a label for them.

    Raises:
        ConfigError: an unknown source, or no file for ``upload``.
    """
    from hsr_core.data import load_eval, select

    if source == "built-in":
        samples, label = load_eval("builtin"), "the built-in evaluation split"
    elif source == "upload":
        if not upload:
            raise ConfigError('upload a JSONL file of {"prompt", "harmful", "image"?} rows')
        samples, label = load_eval(upload), f"`{Path(upload).name}`"
    else:
        raise ConfigError(f"unknown evaluation source {source!r}; choose one of {EVAL_SOURCES}")
    n = int(num_prompts or 0)
    if n < 0:
        raise ConfigError(f"prompts must be 0 (all) or more, got {n}")
    if 0 < n < len(samples):
        samples, label = select(samples, n), f"{n} of {len(samples)} prompts of {label}"
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
    return f"**RSR {100 * result['rsr']:.1f}%** of the refusals pruning lost are restored by HSR."


def _eval_seconds(*_args: Any, **_kwargs: Any) -> int:
    """GPU time to reserve for an evaluation (ZeroGPU)."""
    return 300


@handlers.gpu(duration=_eval_seconds)
@handlers.user_errors("Evaluate")
def evaluate(
    source: str,
    upload: str | None,
    num_prompts: float,
    max_new_tokens: float,
    batch_size: float,
    disagree_only: bool,
    state: Session,
    request: gr.Request,
    progress=handlers.TRACK_TQDM,
) -> dict[str, Any]:
    """Answer the evaluation prompts with every variant of the session and score them."""
    from hsr_core import pipeline
    from hsr_core.progress import Cancelled

    handlers.show_eta(progress)
    cfg = EvalConfig(max_new_tokens=int(max_new_tokens), batch_size=int(batch_size))
    samples, label = eval_samples(source, upload, num_prompts)
    stop_flag = WORKBENCH.stop_event(getattr(request, "session_hash", None))
    stop_flag.clear()
    with WORKBENCH.lock:
        WORKBENCH.require(state)
        variants = WORKBENCH.install(state)
        try:
            result = pipeline.evaluate(
                variants, samples, cfg, which=variants.available(), should_stop=stop_flag.is_set
            )
        except Cancelled:
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
            f"{cfg.batch_size}; refusals by the keyword judge).\n\n{_rsr_text(result)}"
        ),
        "eval_metrics": figures.eval_metrics_table(_metrics(result)),
        "eval_chart": figures.eval_chart(_metrics(result)),
        "eval_table": figures.answers_table(_answers(result), disagree_only=bool(disagree_only)),
    }


def filter_answers(disagree_only: bool, record: dict[str, Any] | None) -> dict[str, Any]:
    """The answers table, all prompts or only those where the variants' refusals differ."""
    if not record:
        return {"eval_table": figures.answers_table({})}
    table = figures.answers_table(_answers(record["result"]), disagree_only=bool(disagree_only))
    return {"eval_table": table}


# ---------------------------------------------------------------------------------------------
# export


def run_config(state: Session, record: dict[str, Any] | None = None) -> Any:
    """The session's configs as the command line's ``RunConfig`` (same fields, same defaults)."""
    from hsr_core.pipeline import RunConfig

    loaded = WORKBENCH.require(state)
    evaluation = matching_evaluation(state, record)
    total = loaded.adapter.num_layers * loaded.adapter.num_heads
    return RunConfig(
        model=loaded.spec,
        data=state.data.source,
        columns=state.data.column_map(),
        ships=state.ships or ShipsConfig(),
        wanda=state.wanda or WandaConfig(),
        realign=state.realign or RealignConfig(top_h=min(10, total)),
        eval=EvalConfig(**evaluation["config"]) if evaluation else EvalConfig(),
    )


def run_summary(state: Session, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json`` as the command line writes it (``hsr_core.pipeline.summary``).

    The session does not time its steps, so ``timings_s`` and ``cached`` are empty.
    """
    from hsr_core import pipeline

    loaded = WORKBENCH.require(state)
    run = run_config(state, record)
    return pipeline.summary(loaded, run, state.masks, state.restore, {}, {})


def _require_variant(state: Session, variant: str) -> None:
    if variant not in ("pruned", "realigned"):
        raise ConfigError(f"choose pruned or realigned, got {variant!r}")
    if state.masks is None:
        raise SessionError("Prune first (tab 3): there is no pruned model to export yet.")
    if variant == "realigned" and state.restore is None:
        raise SessionError(
            "Realign first (tabs 2 and 4): there is no realigned model to export yet."
        )


def _slug(name: str) -> str:
    base = name.split(":", 1)[-1].rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base)


def _save(state: Session, variant: str, record: dict[str, Any] | None, folder: Path) -> Path:
    """``save_pretrained`` the variant with its model card into ``folder`` (under the lock)."""
    from hsr_core import pipeline

    _require_variant(state, variant)
    with WORKBENCH.lock:
        WORKBENCH.require(state)
        variants = WORKBENCH.install(state)
        card = pipeline.model_card(
            variant, run_summary(state, record), matching_evaluation(state, record)
        )
        return pipeline.export_variant(variants, variant, folder, card)


def zip_folder(folder: Path, dest: Path) -> Path:
    """Zip ``folder`` (as its own top folder); weights are stored, text is deflated."""
    with zipfile.ZipFile(dest, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                stored = f.suffix in (".safetensors", ".bin", ".pt")
                z.write(
                    f,
                    Path(folder.name) / f.relative_to(folder),
                    compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                )
    return dest


@handlers.user_errors("Export model")
def export_model(variant: str, state: Session, record: dict[str, Any] | None) -> dict[str, Any]:
    """The pruned or realigned model as a ``save_pretrained`` folder in a zip, with its card."""
    root = download_dir("models")
    folder = _save(state, variant, record, root / f"{_slug(state.model_name)}-{variant}")
    path = zip_folder(folder, root / f"{folder.name}.zip")
    shutil.rmtree(folder, ignore_errors=True)
    size = path.stat().st_size / 2**20
    evaluated = matching_evaluation(state, record) is not None
    return {
        "export_file": str(path),
        "export_msg": (
            f"**Done.** `{path.name}` ({size:,.1f} MiB): the {variant} model as a "
            "`save_pretrained` folder with its model card"
            + (" (with this session's evaluation)." if evaluated else ".")
        ),
    }


@handlers.user_errors("Export run files")
def export_files(state: Session, record: dict[str, Any] | None) -> dict[str, Any]:
    """``heads.jsonl`` (after attribution), ``summary.json`` and, after an evaluation of the
    current variants, ``eval.json``, as the command line writes them."""
    from hsr_core import pipeline
    from hsr_core.ships import write_heads_jsonl

    WORKBENCH.require(state)
    folder = download_dir("run-files")
    files = []
    if state.scores is not None:
        files.append(write_heads_jsonl(state.scores, folder / "heads.jsonl"))
    files.append(pipeline.write_json(folder / "summary.json", run_summary(state, record)))
    evaluation = matching_evaluation(state, record)
    if evaluation is not None:
        files.append(pipeline.write_json(folder / "eval.json", evaluation))
    names = ", ".join(f"`{f.name}`" for f in files)
    note = "" if state.scores is not None else " (no `heads.jsonl`: run attribution first)"
    return {"run_files": [str(f) for f in files], "export_msg": f"**Done.** {names}{note}."}


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_error(exc: BaseException, repo_id: str) -> gr.Error:
    """A ``gr.Error`` that says why the hub refused or could not be reached."""
    from huggingface_hub.errors import HfHubHTTPError

    title = "Push to the hub"
    error = functools.partial(gr.Error, print_exception=False)
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status == 401:
            return error(
                "The hub refused the token (401). Give a write token from "
                "https://huggingface.co/settings/tokens.",
                title=title,
            )
        if status == 403:
            return error(
                f"The token may not write to {repo_id} (403): use a token with write access "
                "to that user or organisation.",
                title=title,
            )
        return error(f"The hub answered {status}: {exc}", title=title)
    transport = {"TransportError", "NetworkError", "TimeoutException", "ConnectError"}
    if isinstance(exc, OSError) or transport & {t.__name__ for t in type(exc).__mro__}:
        return error(
            f"Could not reach the Hugging Face hub ({type(exc).__name__}: {exc}). Without "
            "network access, download the zip instead and upload it from elsewhere.",
            title=f"{title}: no connection",
        )
    return error(f"{type(exc).__name__}: {exc}", title=title)


@handlers.user_errors("Push to the hub")
def push_to_hub(
    variant: str,
    repo_id: str,
    token: str,
    private: bool,
    state: Session,
    record: dict[str, Any] | None,
) -> dict[str, Any]:
    """Create the hub repository (if needed) and upload the variant's folder to it."""
    from huggingface_hub import HfApi

    repo_id = (repo_id or "").strip()
    if not REPO_ID.match(repo_id):
        raise ConfigError(f"the repository id must look like user/name, got {repo_id!r}")
    _require_variant(state, variant)
    WORKBENCH.require(state)
    api = HfApi(token=(token or "").strip() or None)
    try:  # first, so that no network fails fast, before the export
        api.create_repo(repo_id, exist_ok=True, private=bool(private))
    except Exception as e:
        raise hub_error(e, repo_id) from e
    root = download_dir("push")
    try:
        folder = _save(state, variant, record, root / variant)
        try:
            api.upload_folder(
                folder_path=folder,
                repo_id=repo_id,
                commit_message=f"HSR Workbench: {variant} {state.model_name}",
            )
        except Exception as e:
            raise hub_error(e, repo_id) from e
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"export_msg": f"**Pushed** the {variant} model to https://huggingface.co/{repo_id}."}


# ---------------------------------------------------------------------------------------------
# the tabs


def build_evaluate(c: dict[str, Any]) -> None:
    with gr.Tab("6 · Evaluate", id="evaluate"):
        gr.Markdown(
            "Every variant of this session answers the same prompts (greedy, in batches). "
            "**ASR** is the share of harmful prompts answered rather than refused (keyword "
            "judge); **RSR** = (ASR pruned − ASR realigned) / (ASR pruned − ASR original); "
            "**perplexity** of the reference answers of benign prompts is the utility proxy."
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
            False, label="only prompts where the variants disagree (refused vs answered)"
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
        c["eval_state"] = gr.State(None)


def wire_evaluate(c: dict[str, Any]) -> None:
    from ui import layout  # layout lists this tab, so it is imported by now

    c["eval_source"].change(
        lambda s: gr.update(visible=s == "upload"),
        inputs=c["eval_source"],
        outputs=c["eval_upload"],
        queue=False,
        api_visibility="private",
    )
    layout._slow(
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
            "state",
        ],
        ["eval_state", "eval_msg", "eval_metrics", "eval_chart", "eval_table"],
        api_name="evaluate",
        message="eval_msg",
        show_progress_on=[c["eval_chart"]],
    )
    c["eval_stop"].click(
        handlers.stop, api_visibility="private", concurrency_limit=None, show_progress="hidden"
    )
    layout._event(
        c,
        c["eval_disagree"].input,
        filter_answers,
        ["eval_disagree", "eval_state"],
        ["eval_table"],
        api_name="eval_table",
        show_progress="hidden",
    )


def build_export(c: dict[str, Any]) -> None:
    with gr.Tab("7 · Export", id="export"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown(
                    "### The model\nA `save_pretrained` folder (weights, tokenizer, config) in "
                    "a zip, with a model card recording the base model, data, sparsity, p, q, "
                    "max_p, top_h, the selected heads, the restored count and this session's "
                    "evaluation."
                )
                c["export_variant"] = gr.Radio(
                    ["realigned", "pruned"], value="realigned", label="variant"
                )
                c["export_btn"] = gr.Button("Export model (zip)", variant="primary")
                c["export_file"] = gr.File(None, label="model zip", interactive=False, height=110)
                with gr.Accordion("Push to the Hugging Face hub", open=False):
                    c["hub_repo"] = gr.Textbox("", label="repository id", placeholder="user/name")
                    c["hub_token"] = gr.Textbox(
                        "",
                        label="token",
                        type="password",
                        placeholder="hf_... (write access); empty: this machine's login",
                    )
                    c["hub_private"] = gr.Checkbox(True, label="private repository")
                    c["push_btn"] = gr.Button("Push")
            with gr.Column(scale=1):
                gr.Markdown(
                    "### The run's files\n`heads.jsonl` (Ships scores, the reference's format), "
                    "`summary.json` (settings, sparsity, restore set) and, after an evaluation "
                    "of the current variants, `eval.json`: the files `python -m hsr_core run` "
                    "writes."
                )
                c["files_btn"] = gr.Button("heads.jsonl + summary.json")
                c["run_files"] = gr.File(
                    None, label="run files", file_count="multiple", interactive=False, height=150
                )
        c["export_msg"] = gr.Markdown(elem_id="hsr-export-msg", label="export status")


def wire_export(c: dict[str, Any]) -> None:
    from ui import layout

    inputs = ["export_variant", "state", "eval_state"]
    layout._slow(
        c,
        "export_btn",
        export_model,
        inputs,
        ["export_file", "export_msg"],
        api_name="export_model",
        message="export_msg",
    )
    layout._slow(
        c,
        "push_btn",
        push_to_hub,
        ["export_variant", "hub_repo", "hub_token", "hub_private", "state", "eval_state"],
        ["export_msg"],
        api_name="push_to_hub",
        message="export_msg",
    )
    layout._event(
        c,
        c["files_btn"].click,
        export_files,
        ["state", "eval_state"],
        ["run_files", "export_msg"],
        api_name="export_files",
    )
