"""The plumbing every tab uses: wiring events by component name, the model's concurrency group
and thread, locking the run buttons (and giving them back on every outcome), progress with an
ETA, the Stop flag, and turning the core's errors into messages that say what to do.

A tab builds its components into one dict ``c`` (name -> component) and wires its events with
``event`` / ``slow``; handlers return dicts keyed by output *names*, which ``by_name`` turns
into the dicts keyed by component that gradio expects. Every event that touches the model
shares one concurrency group of size 1 (``MODEL``) and runs in the model thread
(``ui.workbench.MODEL_THREAD``, see ``on_model_thread``); every action has a named API endpoint.
What public mode refuses (``ui.public.Refused``) is a message like the core's errors.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import gradio as gr

from hsr_core import pipeline
from hsr_core.config import ConfigError
from ui.public import Refused
from ui.session import SessionError
from ui.workbench import MODEL_THREAD, WORKBENCH

log = logging.getLogger("hsr.app")

TRACK_TQDM = gr.Progress(track_tqdm=True)
PROGRESS = gr.Progress()
"""Progress defaults (gradio makes a fresh tracker per call from them)."""

MODEL = {"concurrency_id": "model", "concurrency_limit": 1}
"""Every event that touches the shared model runs in this group, one at a time."""

RUN_BUTTONS = (
    "load_btn",
    "attribute_btn",
    "prune_btn",
    "eval_btn",
    "export_btn",
    "push_btn",
    "ladder_btn",
)
"""The buttons of slow steps, locked while one of them runs."""

PRIVATE = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
"""Settings of the small events that lock and unlock buttons (no queue, no endpoint)."""


def explain(exc: BaseException) -> tuple[str, str] | None:
    """``(title, message)`` for an error the user can act on, or None for a bug."""
    if isinstance(exc, pipeline.OutOfMemoryError):
        pipeline.free_memory()
        return (
            "Out of memory",
            "The step ran out of memory. Use fewer samples, a smaller model, bfloat16, or "
            "the CPU; earlier results are kept.",
        )
    if isinstance(exc, Refused):
        return "Not allowed in this public app", str(exc)
    if isinstance(exc, SessionError):
        return "Not yet", str(exc)
    if isinstance(exc, pipeline.ArchitectureError):
        return "Unsupported architecture", str(exc)
    if isinstance(exc, pipeline.ModelLoadError):
        return "Could not load the model", str(exc)
    if isinstance(exc, pipeline.DataError):
        return (
            "Could not read the data",
            f"{exc}. Fix the file, or map its columns, e.g. "
            "prompt=instruction,response=output,harmful=unsafe.",
        )
    if isinstance(exc, ConfigError):
        return "Invalid setting", str(exc)
    if isinstance(exc, pipeline.VariantError):
        return "Not yet", str(exc)
    if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
        return "Invalid input", str(exc)
    return None


def user_errors(step: str) -> Callable[[Callable], Callable]:
    """Turn the core's errors into ``gr.Error`` messages that say what to do."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                known = explain(e)
                if known is None:
                    log.exception("%s failed", step)
                    raise gr.Error(
                        f"{step} failed unexpectedly ({type(e).__name__}: {e}). Earlier results "
                        "are kept; the server log has the details.",
                        title=f"{step} failed",
                    ) from e
                title, message = known
                log.warning("%s: %s: %s", step, title, message)
                raise gr.Error(message, title=f"{step}: {title}", print_exception=False) from e

        return run

    return deco


@contextmanager
def stoppable(request: gr.Request | None) -> Iterator[Callable[[], bool]]:
    """The session's Stop flag, cleared for a new job."""
    flag = WORKBENCH.stop_event(getattr(request, "session_hash", None))
    flag.clear()
    yield flag.is_set


def stop(request: gr.Request) -> None:
    """Ask the session's running job to stop (it stops between units of work)."""
    WORKBENCH.stop_event(request.session_hash).set()


def forget(request: gr.Request) -> None:
    """Drop the session's Stop flag when its tab closes."""
    WORKBENCH.forget(request.session_hash)


def drop_state(demo: gr.Blocks, request: gr.Request) -> None:
    """Delete a closed session's ``gr.State`` values now (public mode; an ``unload`` event).

    Gradio marks a disconnected session closed and keeps its state another hour
    (``gradio/state_holder.py``: ``SessionState.STATE_TTL_WHEN_CLOSED = 3600``, which then
    replaces a shorter ``time_to_live``). This deletes it at once, the way gradio deletes
    expired state, so each value's ``delete_callback`` runs.
    """
    holder = getattr(demo, "state_holder", None)
    if holder is not None:
        with suppress(KeyError):  # gradio's own clean-up deleted it meanwhile
            holder.delete_state(request.session_hash)


def _reraise(exc: BaseException) -> None:
    raise exc


def stream_errors(step: str) -> Callable[[Callable], Callable]:
    """``user_errors`` for generator handlers (errors raised while streaming)."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                user_errors(step)(_reraise)(e)

        return run

    return deco


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def show_eta(progress: Any) -> None:
    """Add the remaining time of the running tqdm bar to the progress text gradio shows.

    Gradio's tqdm tracking shows ``n/total unit`` and the elapsed time. This wraps the
    tracker's callback (on this one tracker object, nothing global) so that each report also
    sets the bar's text to ``desc · <time> left``, extrapolated from the bar's own pace. A
    no-op when the tracker is not gradio's.
    """
    original = getattr(progress, "_progress_callback", None)
    if original is None or not hasattr(progress, "iterables"):
        return

    def with_eta(report: Callable) -> Callable:
        def send(bars: list[Any]) -> Any:
            try:
                bar = bars[-1]
                state = bar.__dict__
                base = state.setdefault("hsr_desc", bar.desc or "")
                t0 = state.setdefault("hsr_t0", time.monotonic())
                done, total = bar.index or 0, bar.length
                if total and done:
                    left = (total - done) * (time.monotonic() - t0) / done
                    bar.desc = f"{base} · {_duration(left)} left"
            except (AttributeError, IndexError, TypeError):
                pass
            return report(bars)

        return send

    def callback() -> Callable | None:
        report = original()
        return None if report is None else with_eta(report)

    progress._progress_callback = callback


# ---------------------------------------------------------------------------------------------
# wiring


def by_name(fn: Callable[..., dict[str, Any]], c: dict[str, Any], outputs: Sequence[str]):
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


def on_model_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler of the model's events in the model thread and wait for it there.

    Gradio calls handlers from a pool of persistent threads; torch work spread over several
    of them slows CPU decoding about 2x (``hsr_core.worker``). Streaming handlers are left as
    they are: the chat's turns submit their own work to the model thread.
    """
    if inspect.isgeneratorfunction(fn):
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return MODEL_THREAD.call(fn, *args, **kwargs)

    run.on_model_thread = True  # copied onto outer wrappers by functools.wraps; tests read it
    return run


def event(
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
        fn = on_model_thread(fn)
    args = dict(
        fn=by_name(fn, c, outputs),
        inputs=[c[n] for n in inputs],
        outputs=[c[n] for n in outputs],
        **kw,
    )
    if isinstance(trigger, list):
        return gr.on(triggers=trigger, **args)
    return trigger(**args)


def controls(
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


def slow(
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
    locked = c[button].click(
        controls(c, runs, False, (message, "*Working...*")),
        outputs=[c[n] for n in [*runs, message]],
        **PRIVATE,
    )
    step = event(c, locked.then, fn, inputs, outputs, api_name=api_name, **MODEL, **kw)
    step.then(controls(c, runs, True), outputs=[c[n] for n in runs], **PRIVATE)
    step.failure(
        controls(c, [], True, (message, "**Failed** (see the message); earlier results are kept.")),
        outputs=[c[message]],
        **PRIVATE,
    )
    return step
