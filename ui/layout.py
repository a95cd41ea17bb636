"""The app's page: the tabs in order, and ``build_demo``.

Each tab is a room (``ui.tabs.*``): ``build(c)`` adds its components to one dict ``c`` (name ->
component) and ``wire(c)`` wires its events once every tab exists, because a step also updates
other tabs by name (loading a model empties the figures of the later steps; the Realign tab
redraws after attribution and pruning). Shared plumbing is in ``ui.events``; a new tab is a
module with ``build`` and ``wire`` added to ``TABS`` (and its ``CSS`` / ``HEAD``, if any).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui import events, public
from ui.session import Session
from ui.tabs import (
    attribute,
    chat,
    evaluate,
    export,
    header,
    localize,
    model,
    prune,
    realign,
)
from ui.workbench import WORKBENCH

TABS = [header, model, attribute, prune, realign, chat, evaluate, export, localize]
"""The page, top to bottom: the header, then the tabs in order (each has ``build`` and
``wire``)."""


def launch_kwargs() -> dict[str, Any]:
    """Theme, CSS and head script for ``demo.launch`` (gradio 6 takes them there), and in
    public mode the upload limit (``ui.public``)."""
    theme = gr.themes.Soft(
        primary_hue="blue",
        font=[gr.themes.Font("Inter"), gr.themes.Font("system-ui"), "sans-serif"],
        font_mono=[gr.themes.Font("ui-monospace"), "monospace"],
    )
    css = "".join(getattr(tab, "CSS", "") for tab in TABS)
    head = "".join(getattr(tab, "HEAD", "") for tab in TABS)
    return {"theme": theme, "css": css, "head": head, **public.POLICY.launch_options()}


def build_demo() -> gr.Blocks:
    """The HSR Workbench app. Loads nothing: models load when the user asks.

    In public mode (``ui.public``) the session's state has a time-to-live and is deleted when
    its tab closes (the shared model then forgets its masks: ``Workbench.drop``), uploads and
    downloads are deleted after that time too, and the queue is bounded.
    """
    policy = public.POLICY
    with gr.Blocks(title="HSR Workbench", **policy.blocks_options()) as demo:
        c: dict[str, Any] = {"state": gr.State(Session(), **policy.state_options(WORKBENCH.drop))}
        header.build(c)
        with gr.Tabs():
            for tab in TABS[1:]:
                tab.build(c)
        for tab in TABS:
            tab.wire(c)
        demo.unload(events.forget)
        if policy.public:

            def drop_state(request: gr.Request) -> None:
                events.drop_state(demo, request)

            demo.unload(drop_state)
    queue = policy.queue_options()
    if queue is not None:
        demo.queue(**queue)
    return demo
