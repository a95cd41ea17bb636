"""The app's page: tabs, components and event wiring (``build_demo``).

Each tab is built by a small function that adds its components to one dict ``c`` (name ->
component), and its events are wired by another once every tab exists, because a step also
updates other tabs (loading a model empties the figures of the later steps). A new tab (e.g. a
chat or an evaluation tab) is a pair of such functions added to ``TABS``.

Handlers (``ui.handlers``) return dicts keyed by output *names*; ``_by_name`` turns them into
the dicts keyed by component that gradio expects. Every event that touches the model shares
one concurrency group of size 1 (``MODEL``) and runs in the model thread
(``ui.session.MODEL_THREAD``, see ``_on_model_thread``); every action has a named API endpoint.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gradio as gr

from hsr_core.config import DTYPES
from ui import chat, evaluate_tab, figures, handlers
from ui.session import MODEL_THREAD, Session

DEFAULT_MODEL = "builtin:smollm2-135m-safe"
MODEL_PRESETS = [
    DEFAULT_MODEL,
    "builtin:smollm2-135m",
    "builtin:tiny-llama",
    "builtin:tiny-llava-next",
    "llava-hf/llava-interleave-qwen-0.5b-hf",
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-hf/llama3-llava-next-8b-hf",
    "Qwen/Qwen2-VL-7B-Instruct",
]
DEVICES = ["auto", "cpu", "cuda"]

MODEL = {"concurrency_id": "model", "concurrency_limit": 1}
"""Every event that touches the shared model runs in this group, one at a time."""

INTRO = """# HSR Workbench
Find the attention heads that carry a model's safety behaviour (**Ships**), prune the model
(**Wanda**), and put back the few pruned weights inside those heads that matter most for safety
(**HSR**, *Hierarchical Safety Realignment*, Li et al., ACL 2025 Findings). Work left to right;
scores and statistics are cached on disk, so coming back later does not redo them."""

CSS = """
#hsr-status { font-size: 0.92em; padding: 4px 10px; border-radius: 6px;
              background: var(--background-fill-secondary); }
#hsr-realign-msg p { margin: 0; }
#hsr-realign-heatmap .js-plotly-plot { cursor: pointer; }
"""

HEAD_JS = """
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
})();
</script>
"""


def launch_kwargs() -> dict[str, Any]:
    """Theme, CSS and head script for ``demo.launch`` (gradio 6 takes them there)."""
    theme = gr.themes.Soft(
        primary_hue="blue",
        font=[gr.themes.Font("Inter"), gr.themes.Font("system-ui"), "sans-serif"],
        font_mono=[gr.themes.Font("ui-monospace"), "monospace"],
    )
    return {"theme": theme, "css": CSS + chat.CSS, "head": HEAD_JS}


def _by_name(fn: Callable[..., dict[str, Any]], c: dict[str, Any], outputs: Sequence[str]):
    """Wrap a handler returning ``{name: value}`` into one returning ``{component: value}``."""
    allowed = set(outputs)

    def convert(out: dict[str, Any]) -> dict[Any, Any]:
        unknown = set(out) - allowed
        if unknown:
            raise KeyError(f"{fn.__name__} returned outputs not wired: {sorted(unknown)}")
        return {c[k]: v for k, v in out.items()}

    if inspect.isgeneratorfunction(fn):  # a streaming handler yields such dicts

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[dict[Any, Any]]:
            for out in fn(*args, **kwargs):
                yield convert(out)

        return stream

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> dict[Any, Any]:
        return convert(fn(*args, **kwargs))

    return run


def _on_model_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler of the model's events in the model thread and wait for it there.

    Gradio calls handlers from a pool of persistent threads; torch work spread over several
    of them slows CPU decoding about 2x (``hsr_core.worker``). Streaming handlers are left as
    they are: the chat's turns submit their own work to the model thread. On a ZeroGPU Space
    (``spaces.GPU`` runs the heavy steps in a forked process) handlers run where gradio calls
    them.
    """
    if inspect.isgeneratorfunction(fn) or handlers.spaces is not None:
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return MODEL_THREAD.call(fn, *args, **kwargs)

    run.on_model_thread = True  # copied onto outer wrappers by functools.wraps; tests read it
    return run


def _event(
    c: dict[str, Any],
    trigger: Any,
    fn: Callable[..., dict[str, Any]],
    inputs: Sequence[str],
    outputs: Sequence[str],
    **kw: Any,
) -> Any:
    """Wire ``fn`` to ``trigger`` (an event method or a list of them) by component names.

    Events of the model's concurrency group (``**MODEL``) run in the model thread."""
    if kw.get("concurrency_id") == MODEL["concurrency_id"]:
        fn = _on_model_thread(fn)
    args = dict(
        fn=_by_name(fn, c, outputs),
        inputs=[c[n] for n in inputs],
        outputs=[c[n] for n in outputs],
        **kw,
    )
    if isinstance(trigger, list):
        return gr.on(triggers=trigger, **args)
    return trigger(**args)


def _controls(
    c: dict[str, Any], names: Sequence[str], enabled: bool, note: tuple[str, str] | None = None
) -> Callable[[], dict]:
    """A handler that enables or disables the run buttons (and writes ``note`` = (name, text))."""

    def set_all() -> dict[Any, Any]:
        out = {c[n]: gr.update(interactive=enabled) for n in names}
        if note is not None:
            out[c[note[0]]] = note[1]
        return out

    set_all.__name__ = "unlock" if enabled else "lock"
    return set_all


def _slow(
    c: dict[str, Any],
    button: str,
    fn: Callable[..., dict[str, Any]],
    inputs: Sequence[str],
    outputs: Sequence[str],
    api_name: str,
    message: str,
    **kw: Any,
) -> Any:
    """A slow step: lock the run buttons and say it runs (in ``message``, a Markdown output) at
    once, run the step, then unlock the buttons whatever happened."""
    runs = [n for n in RUN_BUTTONS if n in c]
    private = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    locked = c[button].click(
        _controls(c, runs, False, (message, "*Working...*")),
        outputs=[c[n] for n in [*runs, message]],
        **private,
    )
    step = _event(c, locked.then, fn, inputs, outputs, api_name=api_name, **MODEL, **kw)
    step.then(_controls(c, runs, True), outputs=[c[n] for n in runs], **private)
    step.failure(
        _controls(
            c, [], True, (message, "**Failed** (see the message); earlier results are kept.")
        ),
        outputs=[c[message]],
        **private,
    )
    return step


RUN_BUTTONS = ("load_btn", "attribute_btn", "prune_btn", "eval_btn", "export_btn", "push_btn")

# ---------------------------------------------------------------------------------------------
# header


def _header(c: dict[str, Any]) -> None:
    gr.Markdown(INTRO)
    c["status"] = gr.Markdown(handlers.status_line(Session()), label="status", elem_id="hsr-status")
    with gr.Accordion("Session summary (JSON)", open=False):
        c["summary_btn"] = gr.Button("Refresh", size="sm")
        c["summary"] = gr.JSON(label="this tab's results")


def _header_events(c: dict[str, Any]) -> None:
    def summary(state: Session) -> dict[str, Any]:
        return {"summary": handlers.summary(state)}

    _event(c, c["summary_btn"].click, summary, ["state"], ["summary"], api_name="summary")


# ---------------------------------------------------------------------------------------------
# 1. model and data


def _model_tab(c: dict[str, Any]) -> None:
    with gr.Tab("1 · Model & data", id="model"), gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.Markdown("### Model")
            c["model_name"] = gr.Dropdown(
                MODEL_PRESETS,
                value=DEFAULT_MODEL,
                allow_custom_value=True,
                label="Model",
                info="A preset, any Hugging Face hub id, or a local save_pretrained folder.",
                elem_id="hsr-model",
            )
            with gr.Row():
                c["dtype"] = gr.Dropdown(
                    list(DTYPES),
                    value="auto",
                    label="dtype",
                    info="auto: bfloat16 on a GPU, float32 on the CPU",
                )
                c["device"] = gr.Dropdown(DEVICES, value="auto", label="device")
            c["load_btn"] = gr.Button("Load model", variant="primary")
            c["load_status"] = gr.Markdown(elem_id="hsr-load-status", label="load status")
            c["model_info"] = gr.Markdown(elem_id="hsr-model-info", label="model info")
        with gr.Column(scale=2):
            gr.Markdown("### Calibration data")
            c["data_source"] = gr.Radio(
                list(handlers.DATA_SOURCES),
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


def _model_events(c: dict[str, Any]) -> None:
    later = [
        "ships_heatmap",
        "ships_table",
        "sparsity_plot",
        "realign_heatmap",
        "realign_bars",
        "head_plot",
        "realign_totals",
        "realign_json",
    ]
    _slow(
        c,
        "load_btn",
        handlers.load_model,
        ["model_name", "dtype", "device", "state"],
        [
            "state",
            "model_info",
            "load_status",
            "status",
            "ships_samples",
            "calib_samples",
            "top_h",
            *later,
        ],
        api_name="load_model",
        message="load_status",
        show_progress_on=[c["load_status"]],
    )

    def show_fields(source: str) -> dict[Any, Any]:
        return {
            c["data_location"]: gr.update(
                visible=source in ("VLGuard folder", "hub dataset", "file")
            ),
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
    _event(
        c,
        c["data_btn"].click,
        handlers.load_data,
        ["data_source", "data_location", "columns", "upload", "state"],
        ["state", "data_info", "status", *later],
        api_name="load_data",
    )


# ---------------------------------------------------------------------------------------------
# 2. attribute


def _attribute_tab(c: dict[str, Any]) -> None:
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


def _attribute_events(c: dict[str, Any]) -> None:
    _slow(
        c,
        "attribute_btn",
        handlers.attribute,
        ["ships_samples", "ablation", "metric", "r_main", "ships_recompute", "state"],
        ["state", "status", "ships_status", "ships_heatmap", "ships_table"],
        api_name="attribute",
        message="ships_status",
        show_progress_on=[c["ships_heatmap"]],
    ).success(**_refresh_realign(c))


# ---------------------------------------------------------------------------------------------
# 3. prune


def _prune_tab(c: dict[str, Any]) -> None:
    with gr.Tab("3 · Prune", id="prune"):
        gr.Markdown(
            "**Wanda** scores each weight by |W| times the norm of its input over calibration "
            "tokens. Statistics of both sets are collected in one pass each (and cached); the "
            "mask prunes the lowest utility scores of each row."
        )
        with gr.Row(equal_height=True):
            c["sparsity"] = gr.Slider(
                0.0,
                0.95,
                value=0.5,
                step=0.05,
                label="sparsity",
                info="share of each row pruned (unstructured; N:M prunes N/M)",
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
                list(handlers.STRUCTURES), value="unstructured", label="structure", scale=2
            )
            c["mode"] = gr.Radio(
                ["one-shot", "sequential"],
                value="one-shot",
                label="mode",
                info="sequential: each layer's statistics after pruning the earlier ones",
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


def _prune_events(c: dict[str, Any]) -> None:
    _slow(
        c,
        "prune_btn",
        handlers.prune,
        ["sparsity", "structure", "mode", "calib_samples", "prune_recompute", "state"],
        ["state", "status", "prune_status", "sparsity_plot"],
        api_name="prune",
        message="prune_status",
        show_progress_on=[c["sparsity_plot"]],
    ).success(**_refresh_realign(c))
    gr.on(
        triggers=[c["attribute_stop"].click, c["prune_stop"].click],
        fn=handlers.stop,
        api_name="stop",
        concurrency_limit=None,
        show_progress="hidden",
    )


# ---------------------------------------------------------------------------------------------
# 4. realign


REALIGN_INPUTS = ["p", "q", "max_p", "top_h", "slicing", "realign_head", "state"]
REALIGN_OUTPUTS = [
    "state",
    "status",
    "realign_msg",
    "realign_totals",
    "realign_heatmap",
    "realign_bars",
    "realign_head",
    "head_plot",
    "realign_json",
]


def _realign_tab(c: dict[str, Any]) -> None:
    with gr.Tab("4 · Realign", id="realign"), gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            gr.Markdown(
                "Restore candidates R: weights in the top **q** by safety whose utility rank "
                "lies between the top **p** and the top **max_p**. Inside the **top_h** heads, "
                "the pruned ones get their dense value back."
            )
            c["p"] = gr.Slider(0, 1, value=0.5, step=0.01, label="p", info="utility: never above")
            c["q"] = gr.Slider(0, 1, value=0.5, step=0.01, label="q", info="safety: top fraction")
            c["max_p"] = gr.Slider(
                0, 1, value=0.7, step=0.01, label="max_p", info="utility: at most"
            )
            c["top_h"] = gr.Slider(1, 64, value=10, step=1, label="top_h", info="heads realigned")
            c["slicing"] = gr.Radio(
                ["head", "reference"],
                value="head",
                label="slicing",
                info="head: each head's own weights; reference: the released code's slices",
            )
            c["realign_msg"] = gr.Markdown(label="realign message", elem_id="hsr-realign-msg")
            c["realign_totals"] = gr.Markdown(elem_id="hsr-realign-totals", label="restored totals")
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


def _refresh_realign(c: dict[str, Any]) -> dict[str, Any]:
    """Arguments of a chained event that redraws the Realign tab after a step."""
    return dict(
        fn=_by_name(_on_model_thread(handlers.realign_refresh), c, REALIGN_OUTPUTS),
        inputs=[c[n] for n in REALIGN_INPUTS],
        outputs=[c[n] for n in REALIGN_OUTPUTS],
        api_visibility="private",
        show_progress="hidden",
        **MODEL,
    )


def _realign_events(c: dict[str, Any]) -> None:
    _event(
        c,
        [
            c["p"].release,
            c["q"].release,
            c["max_p"].release,
            c["top_h"].release,
            c["slicing"].input,
            c["realign_btn"].click,
        ],
        handlers.realign,
        REALIGN_INPUTS,
        REALIGN_OUTPUTS,
        api_name="realign",
        trigger_mode="always_last",
        show_progress="minimal",
        show_progress_on=[c["realign_totals"]],
        **MODEL,
    )
    _event(
        c,
        c["realign_head"].input,
        handlers.head_detail,
        ["realign_head", "state"],
        ["state", "head_plot", "realign_head"],
        api_name="head_detail",
        trigger_mode="always_last",
        show_progress="minimal",
        **MODEL,
    )
    _event(
        c,
        c["clicked_head"].change,
        handlers.head_clicked,
        ["clicked_head", "state"],
        ["state", "head_plot", "realign_head"],
        api_visibility="private",
        trigger_mode="always_last",
        show_progress="minimal",
        **MODEL,
    )


TABS = [
    (_model_tab, _model_events),
    (_attribute_tab, _attribute_events),
    (_prune_tab, _prune_events),
    (_realign_tab, _realign_events),
    (chat.build, chat.wire),
    (evaluate_tab.build_evaluate, evaluate_tab.wire_evaluate),
    (evaluate_tab.build_export, evaluate_tab.wire_export),
]
"""(build, wire) pairs, in tab order."""


def build_demo() -> gr.Blocks:
    """The HSR Workbench app. Loads nothing: models load when the user asks."""
    with gr.Blocks(title="HSR Workbench") as demo:
        c: dict[str, Any] = {"state": gr.State(Session())}
        _header(c)
        with gr.Tabs():
            for build, _ in TABS:
                build(c)
        _header_events(c)
        for _, wire in TABS:
            wire(c)
        demo.unload(handlers.forget)
    return demo
