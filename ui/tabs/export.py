"""Tab 7, Export: the pruned or realigned model as a ``save_pretrained`` folder in a zip with a
model card (``pipeline.model_card``), saved to a folder of this machine or pushed to the
Hugging Face hub when asked, and the run's ``heads.jsonl`` / ``summary.json`` (and
``eval.json``) written exactly as the command line writes them, from a ``RunConfig`` built of
the session's configs. In public mode a push needs the visitor's own token (``ui.public``);
nothing here takes a path of the server.

An export leaves one copy on the server: the zip, written into gradio's own cache folder, which
gradio then serves as it is (a file elsewhere is copied there first, and the copy was never
deleted); the folder it was made from is deleted once zipped. Models of more than
``ZIP_MAX_MB`` are not zipped at all: the message points to a folder or the hub instead.
"""

from __future__ import annotations

import functools
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import (
    ConfigError,
    EvalConfig,
    RealignConfig,
    RunConfig,
    ShipsConfig,
    WandaConfig,
)
from ui import events, public
from ui.session import Session, SessionError, matching_evaluation
from ui.workbench import WORKBENCH, download_dir


def run_config(state: Session, record: dict[str, Any] | None = None) -> RunConfig:
    """The session's configs as the command line's ``RunConfig`` (same fields, same defaults)."""
    loaded = WORKBENCH.require(state)
    evaluation = matching_evaluation(state, record)
    total = loaded.adapter.num_layers * loaded.adapter.num_heads
    return RunConfig(
        model=loaded.spec,
        data=state.data.source,
        columns=state.data.columns,
        ships=state.ships or ShipsConfig(),
        wanda=state.wanda or WandaConfig(),
        realign=state.realign or RealignConfig(top_h=min(10, total)),
        eval=EvalConfig(**evaluation["config"]) if evaluation else EvalConfig(),
    )


def run_summary(state: Session, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json`` as the command line writes it (``hsr_core.pipeline.summary``).

    The session does not time its steps, so ``timings_s`` and ``cached`` are empty.
    """
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
    _require_variant(state, variant)
    with WORKBENCH.lock:
        WORKBENCH.require(state)
        variants = WORKBENCH.install(state)
        card = pipeline.model_card(
            variant, run_summary(state, record), matching_evaluation(state, record)
        )
        return pipeline.export_variant(variants, variant, folder, card)


ZIP_MAX_MB = 4096
"""The largest model (weights in memory) exported as a zip for the browser; bigger ones are
saved to a folder or pushed to the hub (a 7B model in bfloat16 is 13 GB)."""


def served_dir() -> Path:
    """Gradio's cache folder: a file returned from there is served without a copy."""
    return Path(gr.utils.get_upload_folder())


def _size_mb() -> float:
    return float(WORKBENCH.loaded.info["weights_memory_mb"]) if WORKBENCH.loaded else 0.0


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


@events.user_errors("Export model")
def export_model(variant: str, state: Session, record: dict[str, Any] | None) -> dict[str, Any]:
    """The pruned or realigned model as a ``save_pretrained`` folder in a zip, with its card."""
    _require_variant(state, variant)
    WORKBENCH.require(state)
    size = _size_mb()
    if size > ZIP_MAX_MB:
        where = (
            "push it to the hub (below)"
            if public.POLICY.public
            else "save it to a folder of this machine, or push it to the hub (below)"
        )
        raise ConfigError(
            f"the {variant} model is {size / 1024:,.1f} GB, too big to download as a zip "
            f"through the browser (up to {ZIP_MAX_MB / 1024:g} GB): {where}"
        )
    root = download_dir("hsr-models", under=served_dir())
    try:
        folder = _save(state, variant, record, root / f"{_slug(state.model_name)}-{variant}")
        path = zip_folder(folder, root / f"{folder.name}.zip")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
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


@events.user_errors("Save to a folder")
def save_model(
    variant: str, folder: str, state: Session, record: dict[str, Any] | None
) -> dict[str, Any]:
    """The pruned or realigned model as a ``save_pretrained`` folder on this machine."""
    if public.POLICY.public:
        raise public.Refused("This public app saves nothing on its server: push to the hub.")
    if not (folder or "").strip():
        raise ConfigError("give the folder to save the model in (a new or empty one)")
    dest = Path(folder.strip()).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest} is not an empty folder: give a new or empty one")
    saved = _save(state, variant, record, dest)
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 2**20
    return {
        "export_msg": f"**Saved** the {variant} model to `{saved}` ({size:,.1f} MiB), with its "
        "model card: it loads with `from_pretrained` (and `python -m hsr_core`)."
    }


@events.user_errors("Export run files")
def export_files(state: Session, record: dict[str, Any] | None) -> dict[str, Any]:
    """``heads.jsonl`` (after attribution), ``summary.json`` and, after an evaluation of the
    current variants, ``eval.json``, as the command line writes them."""
    WORKBENCH.require(state)
    folder = download_dir("run-files")
    files = []
    if state.scores is not None:
        files.append(pipeline.write_heads_jsonl(state.scores, folder / "heads.jsonl"))
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


@events.user_errors("Push to the hub")
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
    public.POLICY.check_push_token(token)
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
# the tab


def build(c: dict[str, Any]) -> None:
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
                with gr.Accordion(
                    "Save to a folder of this machine (any size)",
                    open=False,
                    visible=not public.POLICY.public,
                ):
                    c["export_dir"] = gr.Textbox(
                        "", label="folder", placeholder="a new or empty folder, e.g. ~/pruned"
                    )
                    c["save_btn"] = gr.Button("Save")
                with gr.Accordion("Push to the Hugging Face hub", open=False):
                    c["hub_repo"] = gr.Textbox("", label="repository id", placeholder="user/name")
                    c["hub_token"] = gr.Textbox(
                        "",
                        label="token",
                        type="password",
                        placeholder=(
                            "hf_... (your own token with write access)"
                            if public.POLICY.public
                            else "hf_... (write access); empty: this machine's login"
                        ),
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


def wire(c: dict[str, Any]) -> None:
    inputs = ["export_variant", "state", "eval_state"]
    events.slow(
        c,
        "export_btn",
        export_model,
        inputs,
        ["export_file", "export_msg"],
        api_name="export_model",
        message="export_msg",
    )
    events.slow(
        c,
        "save_btn",
        save_model,
        ["export_variant", "export_dir", "state", "eval_state"],
        ["export_msg"],
        api_name="save_model",
        message="export_msg",
    )
    events.slow(
        c,
        "push_btn",
        push_to_hub,
        ["export_variant", "hub_repo", "hub_token", "hub_private", "state", "eval_state"],
        ["export_msg"],
        api_name="push_to_hub",
        message="export_msg",
    )
    events.event(
        c,
        c["files_btn"].click,
        export_files,
        ["state", "eval_state"],
        ["run_files", "export_msg"],
        message="export_msg",
        api_name="export_files",
    )
