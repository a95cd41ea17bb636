"""Chat with the variants: chat inputs, one reply streamed token by token with a real stop, and
the turn engine that streams the three variants' replies one after the other.

``generate_reply`` generates in the calling thread, handing the text so far to a callback
after every piece, with a stopping criterion that checks the stop flag after every token, so
Stop ends generation at once. The same seed is set before each reply, so answers of the
variants differ only because of their weights.

``stream_columns`` is a chat turn: it runs the replies of several variants in a runner passed
in (anything with ``submit(fn) -> Future``: the app's one model thread, a test's executor),
each inside ``Variants.use(name)``, and yields their text as it comes. Leaving its iterator
early (a closed connection, an exception) stops generation and waits for the runner, so no
caller ever switches weights under a running generation. The app, the tests and
``bench/bench_chat.py`` all use it.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .config import GenerationSettings
from .data import Sample, load_image
from .encoding import chat_messages, encode_prompt, templater
from .models import LoadedModel
from .progress import StopFlag, StopOnFlag

if TYPE_CHECKING:
    from .variants import Variants


def chat_inputs(
    loaded: LoadedModel,
    history: Sequence[dict[str, Any]],
    *,
    image: Any | None = None,
    system_prompt: str = "",
) -> dict[str, torch.Tensor]:
    """Model inputs for a conversation whose last message is the user's.

    Args:
        loaded: the model.
        history: ``{"role": "user"|"assistant", "content": str}`` messages, oldest first.
        image: a PIL image or a file path, attached to the last user message (vision models).
        system_prompt: prepended as a system message when not empty.
    """
    if not history or history[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    if image is not None and not loaded.is_vision:
        raise ValueError(f"{loaded.spec.name} is a text-only model: it cannot take an image")
    msgs = chat_messages(
        history, vision=loaded.is_vision, image=image is not None, system=system_prompt
    )
    text = templater(loaded).apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if isinstance(image, str):
        image = load_image(Sample(prompt="", image=image))
    return encode_prompt(loaded, text, image)


class _TextCallback:
    """A ``generate`` streamer that decodes the new tokens and hands the text so far to a
    callback, in the generating thread (transformers' ``TextStreamer`` with a callback for
    ``on_finalized_text``)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        from transformers import TextStreamer

        outer = self

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    outer.text += text
                    on_text(outer.text)

        self.text = ""
        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_reply(
    loaded: LoadedModel,
    history: Sequence[dict[str, Any]],
    settings: GenerationSettings,
    *,
    on_text: Callable[[str], None] | None = None,
    image: Any | None = None,
    should_stop: StopFlag = None,
) -> str:
    """Generate a reply in the calling thread and return its text.

    Args:
        loaded: the model (in whatever variant is active).
        history: the conversation, ending with the user's message.
        settings: generation settings (the seed is set before generating).
        on_text: called with the text so far after each new piece of text.
        image: optional image for vision-language models.
        should_stop: polled after every token; generation ends when it returns True.
    """
    from transformers import StoppingCriteriaList

    inputs = {
        k: v.to(loaded.device)
        for k, v in chat_inputs(
            loaded, history, image=image, system_prompt=settings.system_prompt
        ).items()
    }
    tok = loaded.tokenizer
    out = _TextCallback(tok, on_text or (lambda _t: None))
    torch.manual_seed(settings.seed)
    with torch.inference_mode():
        loaded.model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            streamer=out.streamer,
            stopping_criteria=StoppingCriteriaList([StopOnFlag([should_stop])]),
            **settings.generate_kwargs(),
        )
    return out.text


# ---------------------------------------------------------------------------------------------
# a chat turn: several variants, one after the other


class Runner(Protocol):
    """Where a turn's torch work runs (``hsr_core.worker.ModelThread``, an executor)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future: ...


@dataclass
class Reply:
    """One event of a turn: the text of ``variant`` so far, or (``done``) its final text.

    Attributes:
        variant: which column.
        text: the reply so far.
        done: the reply is complete (``tokens``, ``seconds`` and ``stopped`` are set).
        tokens: tokens generated (the stopping criterion runs once per token).
        seconds: wall time of the column, the switch to its variant included.
        stopped: generation ended because the stop flag was set.
    """

    variant: str
    text: str
    done: bool = False
    tokens: int = 0
    seconds: float = 0.0
    stopped: bool = False


def stream_columns(
    install: Callable[[], Variants],
    jobs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    settings: GenerationSettings,
    *,
    runner: Runner,
    image: Any | None = None,
    should_stop: StopFlag = None,
    lock: AbstractContextManager | None = None,
    min_interval: float = 0.0,
) -> Iterator[Reply]:
    """Stream the replies of several variants, one after the other, generated by ``runner``.

    Args:
        install: called in the runner under ``lock``; returns the variants to switch (the app
            installs the session's masks and restore set here).
        jobs: ``(variant, history)`` pairs in order; each history ends with the user message.
        settings: generation settings, the same for every variant (seed included).
        runner: what runs the turn: anything with ``submit(fn) -> Future``.
        image: an image for vision-language models (a PIL image or a file path).
        should_stop: polled after every token; once True the current reply ends and the
            remaining jobs are skipped.
        lock: held by the runner for the whole turn (the app's workbench lock).
        min_interval: at least this many seconds between two events; text that comes sooner
            is held back (newer text replaces it) and sent when the interval is up, whether or
            not newer text came (``done`` events go at once).

    Yields:
        ``Reply`` events: the text so far (several pending updates of one reply are merged
        into the newest), and one ``done`` event per finished reply.

    The variants are entered one inside the other, so that ``pruned`` -> ``realigned`` writes
    back only the restored weights and the dense weights are copied back once, after the last
    reply, rather than after every reply. Leaving the iterator early stops generation and waits
    for the runner.
    """
    events: queue.Queue = queue.Queue()
    abandoned = threading.Event()

    def stop() -> bool:
        return abandoned.is_set() or bool(should_stop and should_stop())

    def put_text(name: str, text: str) -> None:
        events.put(Reply(name, text))

    def work() -> None:
        try:
            with lock or nullcontext(), ExitStack() as variants_used:
                variants = install()
                for name, history in jobs:
                    if stop():
                        break
                    tokens = 0

                    def per_token() -> bool:
                        nonlocal tokens
                        tokens += 1
                        return stop()

                    t0 = time.perf_counter()
                    # nested: each variant is entered from the one before (pruned -> realigned
                    # restores a few weights); all are left together at the end of the turn
                    loaded = variants_used.enter_context(variants.use(name))
                    text = generate_reply(
                        loaded,
                        history,
                        settings,
                        on_text=functools.partial(put_text, name),
                        image=image,
                        should_stop=per_token,
                    )
                    stopped = stop()
                    seconds = time.perf_counter() - t0
                    events.put(Reply(name, text, True, tokens, seconds, stopped))
        except BaseException as e:  # raised in the caller's thread
            events.put(e)
        finally:
            events.put(None)

    finished = runner.submit(work)
    pending: Reply | None = None  # the newest text not sent yet
    sent = float("-inf")
    try:
        while True:
            wait_s = None if pending is None else max(0.0, sent + min_interval - time.monotonic())
            try:
                batch = [events.get(timeout=wait_s)]
            except queue.Empty:  # no new text for a while: send the one held back
                yield pending
                pending, sent = None, time.monotonic()
                continue
            while not events.empty():  # the consumer fell behind: send only the newest text
                batch.append(events.get_nowait())
            for item in batch:
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.done:  # carries the reply's final text
                    pending = None
                    yield item
                    sent = time.monotonic()
                else:
                    pending = item
            if pending is not None and time.monotonic() - sent >= min_interval:
                yield pending
                pending, sent = None, time.monotonic()
    finally:
        abandoned.set()
        wait([finished])  # the turn's exceptions already came through the queue
