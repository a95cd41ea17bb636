"""Tab 1, Model & data: load a model (built-in, hub id or folder) and the calibration data.

Loading a model makes it the process's shared model (``ui.workbench.Workbench.load``: the
name is resolved and the architecture checked before the previous model is released); a new
model or new data empties the later steps' results of this session and suggests sample counts
that finish in minutes on the device. In public mode (``ui.public``) the model is the one the
operator serves and data comes from no file of the server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import DTYPES, ConfigError, ModelSpec, parse_columns
from ui import events, figures, public
from ui.session import DataSpec, Session, status_line
from ui.workbench import WORKBENCH

DEFAULT_MODEL = public.DEFAULT_MODEL
MODEL_PRESETS = [
    DEFAULT_MODEL,
    "builtin:smollm2-135m-safe-attn",
    "builtin:smollm2-135m",
    "builtin:tiny-llama",
    "builtin:tiny-llava-next",
    "builtin:tiny-mllama",
    "llava-hf/llava-interleave-qwen-0.5b-hf",
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-hf/llama3-llava-next-8b-hf",
    "Qwen/Qwen2-VL-7B-Instruct",
    "meta-llama/Llama-3.2-11B-Vision-Instruct",
]
DEVICES = ["auto", "cpu", "cuda"]


def _describe(info: dict[str, Any]) -> str:
    rows = [
        ("architecture", info["architecture"]),
        (
            "parameters",
            f"{info['parameters'] / 1e6:,.1f} M "
            f"({info['decoder_linear_parameters'] / 1e6:,.1f} M in decoder linears)",
        ),
        ("layers", info["num_layers"]),
        *(
            [("cross-attention layers", ", ".join(map(str, cross)))]
            if (cross := info.get("cross_attention_layers"))
            else []
        ),
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


MEASURED_SPARSITY = {
    "builtin:smollm2-135m": 0.4,
    "builtin:smollm2-135m-safe": 0.4,
    "builtin:smollm2-135m-safe-attn": 0.4,
}
"""Sparsity chosen from measurement for the built-in models (docs/RESULTS.md): at 40% Wanda
removes most of the safety adapter's refusals while the model still talks; at 50% a fifth of
its answers are degenerate, the keyword judge calls babble "answered" and realignment shows no
effect. Other models start at the paper's 50%."""

SPARSITY_WHY = (
    "**{pct}% sparsity** suggested for this model: measured in docs/RESULTS.md, pruning there "
    "removes most of its safety while it still talks (at 50% a fifth of its answers are "
    "degenerate)."
)


def _step_defaults(loaded: pipeline.LoadedModel) -> dict[str, Any]:
    """Suggested settings: sample counts that finish in minutes on this device (the paper uses
    128 each) and the sparsity measured for the model (``MEASURED_SPARSITY``, else 50%)."""
    on_gpu = loaded.device.type == "cuda"
    total = loaded.adapter.num_layers * loaded.adapter.num_heads
    return {
        "ships_samples": 128 if on_gpu else 8,
        "calib_samples": 128 if on_gpu else 32,
        "top_h": min(10, total),
        "sparsity": MEASURED_SPARSITY.get(loaded.spec.name, 0.5),
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


@events.user_errors("Load model")
def load_model(
    name: str, dtype: str, device: str, state: Session, progress=events.TRACK_TQDM
) -> dict[str, Any]:
    """Load a model (or reuse it when this process has it already) and describe it.

    The progress is the core's bars (``Workbench.load``: its steps, and a download's bytes, a
    conversion's tensors or checkpoint shards inside them); the core's messages show between
    them, without a made-up fraction. Its messages that are not progress ("...") stay in the
    status: what was repaired (a damaged cache rebuilt, an interrupted build's folder removed).
    """
    spec = ModelSpec(name=(name or "").strip(), dtype=dtype, device=device)
    public.POLICY.check_model(spec)
    progress(None, desc=f"Loading {spec.name}")
    notes: list[str] = []

    def log(message: str) -> None:
        progress(None, desc=message)
        if not message.endswith("..."):
            notes.append(message)

    t0 = time.perf_counter()
    changed = WORKBENCH.load(spec, log=log)
    loaded = WORKBENCH.loaded
    same = state.model == WORKBENCH.model_key
    new = state if same else Session(WORKBENCH.model_key, spec.name, state.data)
    took = f"loaded in {time.perf_counter() - t0:.1f} s" if changed else "already loaded"
    out = {
        "state": new,
        "model_info": _describe(loaded.describe()),
        "load_status": f"**Done:** `{spec.name}` {took}." + "".join(f"\n\n- {n}" for n in notes),
        "status": status_line(new),
    }
    if not same:  # a new model for this session: empty the later steps, suggest settings
        out.update(_cleared())
        defaults = _step_defaults(loaded)
        out.update({k: gr.update(value=v) for k, v in defaults.items()})
        if loaded.spec.name in MEASURED_SPARSITY:
            pct = round(100 * defaults["sparsity"])
            out["load_status"] += "\n\n" + SPARSITY_WHY.format(pct=pct)
    return out


DATA_SOURCES = ("built-in", "VLGuard folder", "hub dataset", "file")


def data_spec(source: str, location: str, columns: str, upload: str | None) -> DataSpec:
    """The widgets of the data section as a ``DataSpec`` (what public mode allows of them).

    Raises:
        ConfigError: a field missing or malformed.
        ui.public.Refused: in public mode, data from the server's disk or off the allow-list.
    """
    policy = public.POLICY
    policy.check_data(source, location, upload)
    location = (location or "").strip()
    cols = parse_columns(columns)
    images = policy.image_paths
    if source == "built-in":
        return DataSpec("builtin", (), "built-in")
    if source == "VLGuard folder":
        if not location:
            raise ConfigError("give the VLGuard folder (the one holding train.json)")
        return DataSpec(f"vlguard:{location}", (), f"VLGuard {location}")
    if source == "hub dataset":
        if not location:
            raise ConfigError("give a hub dataset id, e.g. org/name")
        return DataSpec(location, cols, f"hub dataset {location}", images)
    if source == "file":
        path = upload or location
        if not path:
            raise ConfigError("upload a JSONL/JSON/CSV file or give its path")
        return DataSpec(str(path), cols, f"file {Path(path).name}", images)
    raise ConfigError(f"unknown data source {source!r}; choose one of {DATA_SOURCES}")


def _describe_data(spec: DataSpec, calib: Any) -> str:
    ex_s, ex_u = calib.safety[0], calib.utility[0]
    images = sum(s.image is not None for s in calib.safety + calib.utility)
    return (
        f"**{spec.label}**: {len(calib.safety):,} harmful requests (safety set, Ships probes) "
        f"and {len(calib.utility):,} benign requests (utility set)"
        f"{f', {images} with images' if images else ''}.\n\n"
        f"- harmful: *{ex_s.prompt[:90]}*\n- benign: *{ex_u.prompt[:90]}*"
    )


@events.user_errors("Load data")
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
# the tab


def build(c: dict[str, Any]) -> None:
    with gr.Tab("1 · Model & data", id="model"), gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.Markdown("### Model")
            policy = public.POLICY
            c["model_name"] = gr.Dropdown(
                policy.model_choices(MODEL_PRESETS),
                value=policy.model if policy.public else DEFAULT_MODEL,
                allow_custom_value=True,
                label="Model",
                info=(
                    "This public app serves one model to every visitor, chosen by its operator."
                    if policy.public
                    else "A preset, any Hugging Face hub id, or a local save_pretrained folder."
                ),
                elem_id="hsr-model",
            )
            with gr.Row():
                c["dtype"] = gr.Dropdown(
                    list(DTYPES),
                    value="auto",
                    label="dtype",
                    info="auto: bfloat16 on a GPU, float32 on the CPU",
                    interactive=False if policy.public else None,
                )
                c["device"] = gr.Dropdown(
                    DEVICES,
                    value="auto",
                    label="device",
                    interactive=False if policy.public else None,
                )
            c["load_btn"] = gr.Button("Load model", variant="primary")
            c["load_status"] = gr.Markdown(elem_id="hsr-load-status", label="load status")
            c["model_info"] = gr.Markdown(elem_id="hsr-model-info", label="model info")
        with gr.Column(scale=2):
            gr.Markdown("### Calibration data")
            c["data_source"] = gr.Radio(
                policy.data_sources(DATA_SOURCES),
                value="built-in",
                label="Source",
                info="Harmful requests with refusals (safety set) and benign requests with "
                "answers (utility set).",
            )
            c["data_location"] = gr.Textbox(
                "",
                label="Folder, dataset id or file path",
                placeholder="e.g. /data/VLGuard or org/dataset",
                visible=False,
            )
            c["columns"] = gr.Textbox(
                "",
                label="Column mapping",
                placeholder="prompt=instruction,response=output,harmful=unsafe",
                info="Only for files and hub datasets whose columns are named differently.",
                visible=False,
            )
            c["upload"] = gr.File(
                None,
                label="Upload a JSONL / JSON / CSV file",
                file_types=[".jsonl", ".json", ".csv"],
                type="filepath",
                visible=False,
            )
            c["data_btn"] = gr.Button("Load data")
            c["data_info"] = gr.Markdown(
                "Built-in data is used until you load other data.", label="data info"
            )


def wire(c: dict[str, Any]) -> None:
    later = list(_cleared())
    events.slow(
        c,
        "load_btn",
        load_model,
        ["model_name", "dtype", "device", "state"],
        [
            "state",
            "model_info",
            "load_status",
            "status",
            "ships_samples",
            "calib_samples",
            "top_h",
            "sparsity",
            *later,
        ],
        api_name="load_model",
        message="load_status",
        show_progress_on=[c["load_status"]],
    )

    typed = ("VLGuard folder", "hub dataset") if public.POLICY.public else DATA_SOURCES[1:]

    def show_fields(source: str) -> dict[Any, Any]:
        return {
            c["data_location"]: gr.update(visible=source in typed),
            c["columns"]: gr.update(visible=source in ("hub dataset", "file")),
            c["upload"]: gr.update(visible=source == "file"),
        }

    c["data_source"].change(
        show_fields,
        inputs=c["data_source"],
        outputs=[c["data_location"], c["columns"], c["upload"]],
        queue=False,
        api_visibility="private",
    )
    events.event(
        c,
        c["data_btn"].click,
        load_data,
        ["data_source", "data_location", "columns", "upload", "state"],
        ["state", "data_info", "status", *later],
        message="data_info",
        api_name="load_data",
    )
