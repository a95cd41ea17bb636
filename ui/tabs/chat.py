"""Tab 5, Chat: one message, three answers side by side (original | pruned | realigned).

One copy of the weights serves the three columns. Each turn is the core's turn engine
(``pipeline.stream_columns``) run in the app's model thread (``ui.workbench.MODEL_THREAD``,
where every model step runs): under the workbench lock it puts the session's masks and restore
set into the shared variants (``Workbench.install``) and generates the replies one after the
other, each inside ``Variants.use(name)``, with the same generation settings and seed, so the
answers differ only because of the weights. The gradio handler only reads the text and yields
it: gradio may run each step of a generator on another thread, so the lock and the variant
switch stay in the model thread, never across a ``yield``.

Stop sets the session's flag (the same as ``/stop``), which the stopping criterion reads after
every token; the column that is generating ends there and the rest of the turn is skipped.

Each answer carries its class, ``refused``, ``complied`` or ``incoherent`` (``pipeline.classify``
with the keyword judge: a chat has no harmful / benign label and short answers are normal in
it, so the reference judge's 20-word rule would call most of them refusals), and the settings
that produced it (the variant's Wanda / HSR settings and restored count), shown as a badge and
a line above its text; the conversation exports as JSON with all of it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import PRUNER_LABELS, ConfigError, GenerationSettings, to_dict
from ui import events, public
from ui.session import Session, variant_settings
from ui.workbench import MODEL_THREAD, WORKBENCH, download_dir

VARIANTS = pipeline.VARIANTS

STREAM_INTERVAL_S = 0.1
"""Streamed text goes to the browser at most this often per column (each update re-renders
and re-sends the column: on a small CPU, sending every token cost decoding speed)."""

Turn = dict[str, Any]
"""One exchange: ``{"user", "image", "model", "generation", "answers": {variant: answer}}``;
an answer is ``{"status", "text", "verdict", "refusal", "tokens", "seconds", "tokens_per_s",
"stopped", "settings", "note"}`` (plain JSON, so the conversation exports as it is)."""

CHAT_JUDGE = "keyword"
"""The judge of the chat's badges (see the module docstring)."""


# ---------------------------------------------------------------------------------------------
# turns: settings, histories, rendering


def generation_settings(
    system_prompt: str | None,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    seed: float,
) -> GenerationSettings:
    """The conversation's settings as a ``GenerationSettings`` (which checks them).

    Raises:
        ConfigError: a value that is not a number, or out of range.
    """
    values = {}
    for name, value, kind in (
        ("max_new_tokens", max_new_tokens, int),
        ("temperature", temperature, float),
        ("top_p", top_p, float),
        ("seed", seed, int),
    ):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if kind is int and number != int(number):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        values[name] = kind(number)
    return GenerationSettings(system_prompt=str(system_prompt or ""), **values)


def describe_settings(variant: str, s: dict[str, Any] | None) -> str:
    """A short line naming the settings of a variant (``p 0.5 · q 0.5 · ... · 287 restored``)."""
    if s is None:
        return "not available yet"
    if variant == "original":
        return "dense weights"
    pruner = PRUNER_LABELS.get(s.get("pruner", "wanda"), "Wanda")
    pruned = f"{pruner} {100 * s['sparsity']:.0f}% {s['structure']}, {s['mode']}"
    if variant == "pruned":
        return pruned
    return (
        f"p {s['p']:g} · q {s['q']:g} · max_p {s['max_p']:g} · top_h {s['top_h']} · "
        f"{s['slicing']} slicing · {s['restored']:,} restored"
        + (" · scope heads+mlp (our extension)" if s.get("scope", "heads") != "heads" else "")
    )


MISSING = {
    "pruned": "No pruned model yet: run **3 · Prune** (Calibrate & prune) first. The original "
    "column answers meanwhile.",
    "realigned": "No realigned model yet: run **2 · Attribute** and **3 · Prune**; the "
    "**4 · Realign** tab then makes the realigned model (move a slider or press Realign).",
}


def _answer(state: Session, variant: str) -> dict[str, Any]:
    settings = variant_settings(state, variant)
    base = {
        "status": "queued",
        "text": "",
        "verdict": None,
        "refusal": None,
        "tokens": 0,
        "seconds": 0.0,
        "tokens_per_s": None,
        "stopped": False,
        "settings": settings,
        "note": "",
    }
    if settings is None:
        base.update(status="unavailable", note=MISSING[variant])
    return base


def history_for(turns: Sequence[Turn], variant: str, message: str) -> list[dict[str, str]]:
    """The conversation as ``variant`` saw it: earlier turns it answered, then ``message``."""
    msgs: list[dict[str, str]] = []
    for t in turns:
        a = t["answers"].get(variant) or {}
        if a.get("text") and a.get("status") in ("answered", "refused", "stopped"):
            msgs += [
                {"role": "user", "content": t["user"]},
                {"role": "assistant", "content": a["text"]},
            ]
    msgs.append({"role": "user", "content": message})
    return msgs


def answer_class(answer: dict[str, Any]) -> str:
    """A finished answer's class: ``refused``, ``complied`` or ``incoherent``."""
    return answer.get("verdict") or ("refused" if answer["refusal"] else "complied")


def verdict(answer: dict[str, Any]) -> str:
    """The badge of a finished answer: its class (``, stopped``)."""
    return answer_class(answer) + (" · stopped" if answer["stopped"] else "")


def _header(badge: str, kind: str, line: str) -> str:
    """The small line above an answer: a coloured badge, then how the answer was made."""
    return (
        f'<div class="hsr-verdict"><span class="hsr-badge hsr-{kind}">{html.escape(badge)}'
        f"</span> {html.escape(line)}</div>\n\n"
    )


def _assistant_message(variant: str, a: dict[str, Any]) -> dict[str, str]:
    """An answer as a chat message: badge and settings line, then the text."""
    status = a["status"]
    if status == "unavailable":
        return {"role": "assistant", "content": a["note"]}
    if status == "skipped":
        header = _header("skipped", "pending", "stopped before this column answered")
        return {"role": "assistant", "content": header.strip()}
    line = describe_settings(variant, a["settings"])
    if status in ("queued", "generating"):
        badge = "generating…" if status == "generating" else "waiting for its turn"
        return {"role": "assistant", "content": _header(badge, "pending", line) + a["text"]}
    if a["tokens"]:
        line += f" · {a['tokens']} tokens, {a['tokens_per_s']:.1f} tok/s"
    kind = answer_class(a)
    text = a["text"] or "*(no text)*"
    return {"role": "assistant", "content": _header(verdict(a), kind, line) + text}


def render(turns: Sequence[Turn], variant: str) -> list[dict[str, Any]]:
    """The messages of one column (gradio 6 Chatbot: role/content dicts)."""
    out: list[dict[str, Any]] = []
    for t in turns:
        content: Any = t["user"]
        if t.get("image"):
            content = [{"path": t["image"]}, t["user"]] if t["user"] else [{"path": t["image"]}]
        out.append({"role": "user", "content": content})
        out.append(_assistant_message(variant, t["answers"][variant]))
    return out


def column_label(state: Session, variant: str) -> str:
    """A column's title: the variant and, in short, what made it."""
    s = variant_settings(state, variant)
    if variant == "original":
        return "original (dense)"
    if s is None:
        return f"{variant} (not made yet)"
    pruner = PRUNER_LABELS.get(s.get("pruner", "wanda"), "Wanda")
    if variant == "pruned":
        return f"pruned · {pruner} {100 * s['sparsity']:.0f}%"
    # short: the label shares the column's top edge with its toolbar (clear, copy all)
    mlp = "+mlp (ours)" if s.get("scope", "heads") != "heads" else "heads"
    return f"realigned · {pruner} +{s['restored']:,} in {len(s['selected_heads'])} {mlp}"


def _columns(turns: Sequence[Turn], state: Session | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in VARIANTS:
        value = render(turns, v)
        out[f"chat_{v}"] = (
            value if state is None else gr.update(value=value, label=column_label(state, v))
        )
    return out


# ---------------------------------------------------------------------------------------------
# handlers


def _turn(
    message: str,
    image: str | None,
    settings: GenerationSettings,
    turns: list[Turn],
    state: Session,
    request: gr.Request | None,
) -> Iterator[dict[str, Any]]:
    """Add a turn and stream its three answers (the body of ``send`` and ``regenerate``)."""
    loaded = WORKBENCH.require(state)
    picture = None
    if image is not None:
        if not loaded.is_vision:
            raise ConfigError(f"{state.model_name} is a text-only model: it cannot take an image")
        picture = pipeline.open_image(image)  # not an image: refused before anything runs
    answers = {v: _answer(state, v) for v in VARIANTS}
    turn: Turn = {
        "user": message,
        "image": image,
        "model": state.model_name,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation": asdict(settings),
        "answers": answers,
    }
    earlier, turns = turns, [*turns, turn]
    yield {**_columns(turns), "chat_msg": "", "chat_state": turns, "chat_turn": turn}

    jobs = [(v, history_for(earlier, v, message)) for v in VARIANTS if answers[v]["settings"]]
    with events.stoppable(request) as should_stop:  # held until the last answer
        for r in pipeline.stream_columns(
            lambda: WORKBENCH.install(state),
            jobs,
            settings,
            runner=MODEL_THREAD,
            image=picture,
            should_stop=should_stop,
            lock=WORKBENCH.lock,
            min_interval=STREAM_INTERVAL_S,
        ):
            a = answers[r.variant]
            a.update(status="generating", text=r.text)
            if r.done:
                cls = pipeline.classify(r.text, CHAT_JUDGE)
                a.update(
                    status="stopped" if r.stopped else "answered",
                    verdict=cls,
                    refusal=cls == "refused",
                    tokens=r.tokens,
                    seconds=round(r.seconds, 3),
                    tokens_per_s=round(r.tokens / r.seconds, 2) if r.seconds > 0 else None,
                    stopped=r.stopped,
                )
                if not r.stopped and a["refusal"]:
                    a["status"] = "refused"
            yield {f"chat_{r.variant}": render(turns, r.variant)}
    for a in answers.values():
        if a["status"] in ("queued", "generating"):
            a["status"] = "skipped"
    yield {**_columns(turns, state), "chat_state": turns, "chat_turn": turn}


def _image_path(image: Any) -> str | None:
    """The uploaded image's file: the send events take their inputs as the page sends them
    (``preprocess=False``), where an image is a file record (``{"path": ...}``)."""
    if isinstance(image, dict):
        return image.get("path") or None
    return str(image) if image else None


@events.user_errors("Chat")
def send(
    message: str,
    image: Any,
    system_prompt: str,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    seed: float,
    turns: list[Turn],
    state: Session,
    request: gr.Request,
) -> Iterator[dict[str, Any]]:
    """Send one message to the three variants; their answers stream one after the other."""
    message = (message or "").strip()
    if not message:
        raise ConfigError("type a message (or click an example) first")
    settings = generation_settings(system_prompt, max_new_tokens, temperature, top_p, seed)
    yield from _turn(message, _image_path(image), settings, list(turns or []), state, request)


@events.user_errors("Regenerate")
def regenerate(
    system_prompt: str,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    seed: float,
    turns: list[Turn],
    state: Session,
    request: gr.Request,
) -> Iterator[dict[str, Any]]:
    """Answer the last user message again (with the current settings and variants)."""
    turns = list(turns or [])
    if not turns:
        raise ConfigError("nothing to regenerate: send a message first")
    settings = generation_settings(system_prompt, max_new_tokens, temperature, top_p, seed)
    last = turns.pop()
    yield from _turn(last["user"], last.get("image"), settings, turns, state, request)


def clear() -> dict[str, Any]:
    """Start a new conversation."""
    return {
        **_columns([]),
        "chat_state": [],
        "chat_turn": None,
        "chat_file": gr.update(value=None, visible=False),
        "chat_status": "",
    }


def view(turns: list[Turn], state: Session) -> dict[str, Any]:
    """Refresh the tab when it is opened: column titles, and the image input for models with a
    vision tower."""
    vision = bool(
        state.model is not None
        and WORKBENCH.loaded is not None
        and state.model == WORKBENCH.model_key
        and WORKBENCH.loaded.is_vision
    )
    return {**_columns(turns or [], state), "chat_image": gr.update(visible=vision)}


def conversation(turns: list[Turn], state: Session) -> dict[str, Any]:
    """The conversation as the exported JSON: model, Ships / Wanda / HSR settings now, and every
    turn with every column's answer, its refusal flag and the settings that produced it."""
    loaded = WORKBENCH.loaded if state.model and state.model == WORKBENCH.model_key else None
    rs = state.restore
    return {
        "app": "HSR Workbench",
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": state.model_name or None,
            "spec": to_dict(loaded.spec) if loaded else None,
            "architecture": type(loaded.model).__name__ if loaded else None,
        },
        "data": {"source": state.data.source, "label": state.data.label},
        "ships": to_dict(state.ships) if state.ships else None,
        "wanda": to_dict(state.wanda) if state.wanda else None,
        "achieved_sparsity": (state.sparsity or {}).get("sparsity"),
        "realign": to_dict(state.realign) if state.realign else None,
        "restored": rs.count if rs else None,
        "selected_heads": [h.label for h in rs.heads] if rs else None,
        "turns": [{**t, "image": Path(t["image"]).name if t.get("image") else None} for t in turns],
    }


def export_conversation(turns: list[Turn], state: Session) -> dict[str, Any]:
    """Write the conversation to a JSON file for download."""
    if not turns:
        raise gr.Error("Nothing to export yet: send a message first.", title="Export conversation")
    doc = conversation(turns, state)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = download_dir("conversations")
    path = folder / f"hsr-chat-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"chat_file": str(path)}


# ---------------------------------------------------------------------------------------------
# the tab


def pick_example(sample: Sequence[str]) -> dict[str, Any]:
    """A click on an example puts its prompt in the message box (then it is sent)."""
    return {"chat_msg": sample[-1]}


INTRO = """One message goes to all three variants; **original | pruned | realigned** answer side
by side, one after the other, with the same settings and seed (so differences come from the
weights). Each answer is marked *refused*, *complied* or *incoherent* (degenerate text) by the
keyword judge and names the settings that made it; move the Realign sliders and the next message uses the new ones."""

CSS = """
.hsr-verdict { font-size: 0.8em; line-height: 1.45; color: var(--body-text-color-subdued);
               margin-bottom: 2px; }
.hsr-badge { display: inline-block; padding: 0 7px; margin-right: 4px; border-radius: 9px;
             font-weight: 600; letter-spacing: 0.01em; }
.hsr-complied { background: #DCFCE7; color: #166534; }
.hsr-refused { background: #FEE2E2; color: #B91C1C; }
.hsr-incoherent { background: #FEF3C7; color: #92400E; }
.hsr-pending { background: #E5E7EB; color: #374151; }
#hsr-chat-tools button { white-space: nowrap; }
/* a column's title never runs under its toolbar (clear, copy all) at the top right */
[id^="hsr-chat-"] label[data-testid="block-label"] { max-width: calc(100% - 84px);
    overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }
/* the title and toolbar sit above the scrolling messages, never over them */
:is(#hsr-chat-original, #hsr-chat-pruned, #hsr-chat-realigned) > .wrapper > .bubble-wrap {
    margin-top: 38px; height: calc(100% - 38px); padding-top: 4px; }
/* at 1280x800 the columns, the message box and the examples fit one window: the examples
   scroll in their own box, so a click on one never scrolls the answers away */
#hsr-chat-examples .table-wrap { max-height: 236px; overflow-y: auto; }
#hsr-chat-examples thead th { position: sticky; top: 0; z-index: 1;
    background: var(--block-background-fill); }
#hsr-chat-examples td { padding-top: 5px; padding-bottom: 5px; }
#hsr-chat-examples td:last-child { max-width: none !important; }
"""


COLUMN_HEIGHT = "clamp(260px, calc(100vh - 440px), 540px)"
"""The answer columns' height: 540 px on a tall window, less on a short one, so that at
1280x800 the columns, the message box and the examples are all in view together."""


def build(c: dict[str, Any]) -> None:
    """The Chat tab's components (into ``c``)."""
    with gr.Tab("5 · Chat", id="chat") as tab:
        c["chat_tab"] = tab
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            for v in VARIANTS:
                c[f"chat_{v}"] = gr.Chatbot(
                    [],
                    label=v,
                    height=COLUMN_HEIGHT,
                    elem_id=f"hsr-chat-{v}",
                    buttons=["copy", "copy_all"],
                    feedback_options=None,
                    placeholder=f"The **{v}** model's answers appear here.",
                    min_width=260,
                )
        with gr.Row(equal_height=True):
            c["chat_msg"] = gr.Textbox(
                "",
                label="message",
                show_label=False,
                placeholder="Ask something and press Enter, or click an example below",
                lines=1,
                max_lines=6,
                scale=8,
                elem_id="hsr-chat-msg",
            )
            c["chat_image"] = gr.Image(
                None,
                type="filepath",
                label="image (vision-language models)",
                sources=["upload", "clipboard"],
                height=120,
                visible=False,
                scale=2,
                elem_id="hsr-chat-image",
            )
            c["chat_send"] = gr.Button(
                "Send", variant="primary", scale=1, min_width=90, elem_id="hsr-chat-send"
            )
            c["chat_stop"] = gr.Button(
                "Stop", variant="stop", scale=1, min_width=90, elem_id="hsr-chat-stop"
            )
        c["chat_status"] = gr.Markdown(elem_id="hsr-chat-status", label="chat status")
        with gr.Row(elem_id="hsr-chat-tools"):
            c["chat_regen"] = gr.Button("↻ Regenerate", size="sm", scale=0, min_width=120)
            c["chat_clear"] = gr.Button("Clear", size="sm", scale=0, min_width=90)
            c["chat_export"] = gr.Button(
                "Export conversation (JSON)", size="sm", scale=0, min_width=220
            )
        c["chat_file"] = gr.File(
            None, label="conversation", interactive=False, visible=False, elem_id="hsr-chat-file"
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                c["chat_examples"] = gr.Dataset(
                    components=["textbox", "textbox", "textbox"],
                    headers=["kind", "category", "prompt"],
                    samples=[list(r) for r in pipeline.builtin_examples()],
                    label="Examples from the built-in evaluation split (click one to send it)",
                    layout="table",
                    samples_per_page=9,
                    elem_id="hsr-chat-examples",
                )
            with gr.Column(scale=2), gr.Accordion("Generation settings", open=True):
                c["chat_system"] = gr.Textbox(
                    "", label="system prompt", lines=1, max_lines=4, placeholder="(none)"
                )
                with gr.Row():
                    c["chat_max_new"] = gr.Slider(
                        1,
                        1024,
                        value=128,
                        step=1,
                        label="max new tokens",
                        min_width=160,
                        elem_id="hsr-chat-max-new",
                    )
                    c["chat_seed"] = gr.Number(
                        0, precision=0, label="seed", info="same for all three", min_width=100
                    )
                with gr.Row():
                    c["chat_temperature"] = gr.Slider(
                        0, 2, value=0, step=0.05, label="temperature", info="0 = greedy"
                    )
                    c["chat_top_p"] = gr.Slider(
                        0.05, 1, value=1, step=0.05, label="top-p", info="with temperature > 0"
                    )
        with gr.Accordion("Last turn (JSON: answers, refusal flags, settings, speed)", open=False):
            c["chat_turn"] = gr.JSON(label="last turn", show_label=False)
        c["chat_state"] = gr.State([], **public.POLICY.state_options())


SETTINGS = ["chat_system", "chat_max_new", "chat_temperature", "chat_top_p", "chat_seed"]
OUTPUTS = ["chat_original", "chat_pruned", "chat_realigned", "chat_msg", "chat_state", "chat_turn"]
BUTTONS = ["chat_send", "chat_regen", "chat_clear"]


def wire(c: dict[str, Any]) -> None:
    """The Chat tab's events."""
    private = events.PRIVATE

    def turn(trigger: Any, fn: Callable, inputs: list[str], **kw: Any) -> Any:
        """Lock the chat buttons, stream ``fn``, give them back whatever happened (a failure's
        words stay in the chat's status line)."""
        return events.locked(
            c,
            trigger,
            fn,
            inputs,
            OUTPUTS,
            buttons=BUTTONS,
            message="chat_status",
            working="",
            show_progress="minimal",
            **events.MODEL,
            **kw,
        )

    send_inputs = ["chat_msg", "chat_image", *SETTINGS, "chat_state", "state"]
    # the inputs as the page sends them: gr.Image would open the upload with PIL before the
    # handler runs, so a file that is not an image failed with gradio's bare "Error"
    # ("upstream exception" through the API); the turn opens it and says what is wrong
    raw = {"preprocess": False}
    turn([c["chat_send"].click, c["chat_msg"].submit], send, send_inputs, api_name="chat", **raw)
    picked = events.event(
        c, c["chat_examples"].click, pick_example, ["chat_examples"], ["chat_msg"], **private
    )
    turn(picked.then, send, send_inputs, api_visibility="private", **raw)
    turn(
        c["chat_regen"].click,
        regenerate,
        [*SETTINGS, "chat_state", "state"],
        api_name="chat_regenerate",
    )
    c["chat_stop"].click(
        events.stop, api_visibility="private", concurrency_limit=None, show_progress="hidden"
    )
    cleared = [*OUTPUTS[:3], "chat_state", "chat_turn", "chat_file", "chat_status"]
    events.event(c, c["chat_clear"].click, clear, [], cleared, api_name="chat_clear")
    for v in VARIANTS:  # a column's own trash button clears the whole conversation
        events.event(c, c[f"chat_{v}"].clear, clear, [], cleared, **private)
    events.event(
        c,
        c["chat_export"].click,
        events.user_errors("Export conversation")(export_conversation),
        ["chat_state", "state"],
        ["chat_file"],
        message="chat_status",
        api_name="chat_export",
    ).success(lambda: gr.update(visible=True), outputs=c["chat_file"], **private)
    events.event(
        c,
        c["chat_tab"].select,
        view,
        ["chat_state", "state"],
        [*OUTPUTS[:3], "chat_image"],
        **private,
    )
