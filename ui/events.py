"""The plumbing every tab uses: wiring events by component name, the model's concurrency group
and thread, locking the run buttons (and giving them back on every outcome), progress with an
ETA, the Stop flag, and turning the core's errors into messages that say what to do: a toast,
the words an API client gets, and, for an event wired with ``message=``, the same words left in
that Markdown on the page until the next action (``locked``, ``noting_failures``).

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
import math
import threading
import time
from collections import OrderedDict
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
"""The progress default of every slow step: the core's tqdm bars (gradio makes a fresh tracker
per call from it)."""

MODEL = {"concurrency_id": "model", "concurrency_limit": 1}
"""Every event that touches the shared model runs in this group, one at a time."""

RUN_BUTTONS = (
    "load_btn",
    "attribute_btn",
    "prune_btn",
    "eval_btn",
    "export_btn",
    "save_btn",
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
    if isinstance(exc, pipeline.ImageError):
        return "Not an image", str(exc)
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


def to_error(step: str, exc: BaseException) -> gr.Error:
    """The ``gr.Error`` (a toast, and the words an API client gets) for an error of ``step``."""
    if isinstance(exc, gr.Error):
        return exc
    known = explain(exc)
    if known is None:
        log.error("%s failed", step, exc_info=exc)
        return gr.Error(
            f"{step} failed unexpectedly ({type(exc).__name__}: {exc}). Earlier results "
            "are kept; the server log has the details.",
            title=f"{step} failed",
        )
    title, message = known
    log.warning("%s: %s: %s", step, title, message)
    return gr.Error(message, title=f"{step}: {title}", print_exception=False)


def user_errors(step: str) -> Callable[[Callable], Callable]:
    """Turn the core's errors into ``gr.Error`` messages that say what to do; works on plain
    and on streaming (generator) handlers alike, so gradio still sees which kind it is."""

    def deco(fn: Callable) -> Callable:
        def convert(e: Exception) -> BaseException:
            error = to_error(step, e)
            return e if error is e else error

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    error = convert(e)
                    if error is e:
                        raise
                    raise error from e

            return stream

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                error = convert(e)
                if error is e:
                    raise
                raise error from e

        return run

    return deco


@contextmanager
def stoppable(request: gr.Request | None) -> Iterator[Callable[[], bool]]:
    """The session's Stop flag for the job now starting, as its ``should_stop``, held until
    the job ends (``Workbench.job_stop``): cleared of any Stop sent before the job joined
    gradio's queue, set still by one sent while it waited there (behind another tab's job
    in the model's group) so that the job stops at its first check."""
    with WORKBENCH.job_stop(getattr(request, "session_hash", None), enqueued_at()) as flag:
        yield flag.is_set


def enqueued_at() -> float:
    """``time.monotonic()`` when the running event joined gradio's queue (gradio's
    ``Event.enqueue_time``, found by the event id gradio keeps in its context, which the
    model thread copies); now, for a call outside gradio's queue."""
    with suppress(AttributeError, LookupError, TypeError):
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        for job in blocks._queue.active_jobs:
            for evt in job or ():
                if evt._id == event_id:
                    return float(evt.enqueue_time)
    return time.monotonic()


def stop(request: gr.Request) -> None:
    """Ask the session's running job to stop (it stops between units of work)."""
    WORKBENCH.stop_event(request.session_hash).set()


def forget(request: gr.Request) -> None:
    """Drop the session's Stop flag and failure words when its tab closes."""
    WORKBENCH.forget(request.session_hash)
    FAILURES.forget(request.session_hash)


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


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


PROGRESS_INTERVAL_S = 0.5
"""The least time between two progress reports of one job sent to the page (``show_eta``)."""


def show_eta(progress: Any, interval: float = PROGRESS_INTERVAL_S) -> None:
    """Add the remaining time of the running tqdm bar to the progress text gradio shows, and
    send the page at most one progress report every ``interval`` seconds.

    Gradio's tqdm tracking shows ``n/total unit`` and the elapsed time. This wraps the
    tracker's callback (on this one tracker object, nothing global) so that each report also
    sets the bar's text to ``desc · <time> left``, extrapolated from the bar's own pace. A
    no-op when the tracker is not gradio's.

    Why the interval: gradio forwards every tqdm update, up to 100 a second, and the page
    redraws its progress for each. A step with many small units (Ships' replay batches on a
    small model) then keeps a page full of plots busy redrawing, and it stops answering: on
    a 2-core machine a click on Stop waited the whole 100 s of a Ships run. A report that
    adds or removes a bar, or finishes one, is always sent.
    """
    original = getattr(progress, "_progress_callback", None)
    if original is None or not hasattr(progress, "iterables"):
        return
    last = {"at": -math.inf, "shape": None}

    def due(bars: list[Any]) -> bool:
        now = time.monotonic()
        try:
            shape = tuple(id(b) for b in bars)
            finished = bars[-1].length is not None and (bars[-1].index or 0) >= bars[-1].length
        except (AttributeError, IndexError, TypeError):
            shape, finished = None, True
        if shape != last["shape"] or finished or now - last["at"] >= interval:
            last.update(at=now, shape=shape)
            return True
        return False

    def with_eta(report: Callable) -> Callable:
        def send(bars: list[Any]) -> Any:
            if not due(bars):
                return None
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
# failures: the message stays on the page, the buttons come back


class Failures:
    """The last failure of each (session, message component), from the step's handler to the
    failure handler that writes it on the page.

    A handler that raises cannot update an output, and the handler that runs after it
    (``.failure``) is not told why it failed; so the step's handler keeps the words here,
    under the session and the Markdown that shows them, and the failure handler takes them.
    API clients run no failure handler: their entries are replaced by their next failure,
    forgotten when their session ends, and the oldest go beyond ``size``.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._texts: OrderedDict[tuple[str, str], str] = OrderedDict()

    def put(self, session: str | None, where: str, text: str) -> None:
        with self._lock:
            self._texts[(session or "", where)] = text
            self._texts.move_to_end((session or "", where))
            while len(self._texts) > self.size:
                self._texts.popitem(last=False)

    def take(self, session: str | None, where: str) -> str | None:
        with self._lock:
            return self._texts.pop((session or "", where), None)

    def forget(self, session: str | None) -> None:
        with self._lock:
            for key in [k for k in self._texts if k[0] == (session or "")]:
                del self._texts[key]


FAILURES = Failures()

KEPT = "Earlier results are kept."

NOT_RUN = (
    f"**Failed before the step ran** (the toast says why: usually a value out of its range). {KEPT}"
)
"""What the page says of a failure that no handler of ours saw (gradio refused an input)."""


def failure_text(error: gr.Error) -> str:
    """The Markdown a failed step leaves where its result would be."""
    message = str(error.message).strip()
    kept = "" if "results are kept" in message else f" {KEPT}"
    return f"**{error.title}.** {message}{kept}"


def _request_index(fn: Callable) -> int | None:
    """The position of ``fn``'s ``gr.Request`` parameter (gradio passes every input, the
    request and progress trackers positionally), or None."""
    hints = gr.utils.get_type_hints(fn)
    for i, param in enumerate(inspect.signature(fn).parameters.values()):
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        if hints.get(param.name) in (gr.Request, gr.Request | None):
            return i
    return None


def noting_failures(fn: Callable, where: str) -> Callable:
    """``fn``, which keeps the words of its failure in ``FAILURES`` for the failure handler.

    The error becomes a ``gr.Error`` (``to_error``: a toast in the browser, the words an API
    client gets) and is raised on. Gradio finds the session in a ``gr.Request`` parameter;
    when ``fn`` has none, the wrapper gets one more, at the end of its positional parameters,
    which ``fn`` never sees.
    """
    index = _request_index(fn)
    added = index is None
    sig = inspect.signature(fn)
    if added:
        params = list(sig.parameters.values())
        index = next(
            (
                i
                for i, p in enumerate(params)
                if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ),
            len(params),
        )
        extra = inspect.Parameter(
            "hsr_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None
        )
        sig = sig.replace(parameters=[*params[:index], extra, *params[index:]])
    step = getattr(fn, "__name__", "The step")

    def split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple, dict]:
        if added:
            if "hsr_request" in kwargs:
                kwargs = dict(kwargs)
                return kwargs.pop("hsr_request"), args, kwargs
            if len(args) > index:
                return args[index], args[:index] + args[index + 1 :], kwargs
            return None, args, kwargs
        return (args[index] if len(args) > index else None), args, kwargs

    def keep(request: Any, exc: BaseException) -> gr.Error:
        error = to_error(step, exc)
        FAILURES.put(getattr(request, "session_hash", None), where, failure_text(error))
        return error

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            request, args, kwargs = split(args, kwargs)
            FAILURES.take(getattr(request, "session_hash", None), where)
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                error = keep(request, e)
                if error is e:
                    raise
                raise error from e

        wrapper = stream
    else:

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            request, args, kwargs = split(args, kwargs)
            FAILURES.take(getattr(request, "session_hash", None), where)
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                error = keep(request, e)
                if error is e:
                    raise
                raise error from e

        wrapper = run
    if added:
        wrapper.__signature__ = sig
        wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "hsr_request": gr.Request}
    return wrapper


def show_failure(
    c: dict[str, Any], where: str, unlock: Sequence[str] = (), untouched: Sequence[Any] = ()
) -> Callable:
    """The failure handler: the step's words into ``where``, the ``unlock`` buttons back.

    ``untouched`` (the step's outputs) keep their values; naming them as outputs clears the
    "Error" badge gradio leaves on them, which would cover the earlier results they show.
    """

    def failed(request: gr.Request) -> dict[Any, Any]:
        text = FAILURES.take(request.session_hash, where) or NOT_RUN
        out: dict[Any, Any] = {block: gr.skip() for block in untouched}
        out.update({c[n]: gr.update(interactive=True) for n in unlock})
        out[c[where]] = text
        return out

    return failed


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
    *,
    message: str | None = None,
    unlock: Sequence[str] = (),
    **kw: Any,
) -> Any:
    """Wire ``fn`` to ``trigger`` (an event method or a list of them) by component names.

    Events of the model's concurrency group (``**MODEL``) run in the model thread. With
    ``message`` (a Markdown's name), a failure leaves its words there, kept until the next
    action, besides gradio's toast, and gives the ``unlock`` buttons back; a success gives them
    back too. Both are handlers chained on the step's outcome (``.success`` and ``.failure``),
    never ``.then``: gradio's page runs a ``.then`` only after a success (see ``locked``).
    """
    if kw.get("concurrency_id") == MODEL["concurrency_id"]:
        fn = on_model_thread(fn)
    fn = by_name(fn, c, outputs)
    if message is not None:
        fn = noting_failures(fn, message)
    args = dict(fn=fn, inputs=[c[n] for n in inputs], outputs=[c[n] for n in outputs], **kw)
    step = gr.on(triggers=trigger, **args) if isinstance(trigger, list) else trigger(**args)
    if message is not None:
        shown = [c[n] for n in [*unlock, message]]
        targets = kw.get("show_progress_on") or []
        targets = targets if isinstance(targets, list) else [targets]
        untouched: list[Any] = []
        for block in [*args["outputs"], *targets]:
            if all(block is not b for b in [*shown, *untouched]):
                untouched.append(block)
        step.failure(
            show_failure(c, message, unlock, untouched),
            outputs=[*shown, *untouched],
            **PRIVATE,
        )
    if unlock:
        step.success(controls(c, unlock, True), outputs=[c[n] for n in unlock], **PRIVATE)
    return step


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


def locked(
    c: dict[str, Any],
    trigger: Any,
    fn: Callable[..., dict[str, Any]],
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    buttons: Sequence[str],
    message: str,
    working: str = "*Working...*",
    **kw: Any,
) -> Any:
    """A step that locks ``buttons`` while it runs: lock them and write ``working`` into
    ``message`` at once, run ``fn``, then give them back on every outcome, with the failure's
    words in ``message`` when it failed (``event``).

    Why not ``.then(unlock)``: gradio's page (``templates/frontend/assets/Blocks-*.js``,
    ``dispatch``) runs a step's ``success`` and ``all`` (``.then``) followers when its stream
    ends, but a failed step throws out of that loop into a ``catch`` that runs only its
    ``failure`` followers; a ``.then`` after a failed step never runs in the browser.
    """
    lock = controls(c, buttons, False, (message, working))
    lock_outputs = [c[n] for n in [*buttons, message]]
    if isinstance(trigger, list):
        locking = gr.on(triggers=trigger, fn=lock, outputs=lock_outputs, **PRIVATE)
    else:
        locking = trigger(lock, outputs=lock_outputs, **PRIVATE)
    return event(c, locking.then, fn, inputs, outputs, message=message, unlock=buttons, **kw)


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
    """A slow step of the model: the run buttons are locked while it runs and come back on
    every outcome; ``message`` (a Markdown output) says it runs, then what failed (``locked``)."""
    runs = [n for n in RUN_BUTTONS if n in c]
    return locked(
        c,
        c[button].click,
        fn,
        inputs,
        outputs,
        buttons=runs,
        message=message,
        api_name=api_name,
        **MODEL,
        **kw,
    )
