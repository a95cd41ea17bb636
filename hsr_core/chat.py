"""Chat with a model: build chat inputs, and stream a reply token by token with a real stop.

``generate_reply`` generates in the calling thread, handing the text so far to a callback
after every piece, with a stopping criterion that checks the stop flag after every token, so
Stop ends generation at once. ``stream_reply`` runs it in a worker thread and yields the text;
leaving its iterator early (a closed connection, an exception) also stops the worker and waits
for it, so a caller holding ``Variants.use(...)`` around the loop never switches weights under a
running generation. The same seed is set before each reply, so answers of the three
variants differ only because of their weights.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError
from .data import load_image
from .models import LoadedModel
from .progress import StopFlag


@dataclass(frozen=True)
class GenerationSettings:
    """Per-conversation generation settings.

    Attributes:
        system_prompt: an optional system message.
        max_new_tokens: reply length limit.
        temperature: 0 means greedy decoding.
        top_p: nucleus sampling mass (with temperature > 0).
        seed: set before every reply, the same for every variant.
    """

    system_prompt: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 8192:
            raise ConfigError(
                f"max_new_tokens must be between 1 and 8192, got {self.max_new_tokens}"
            )
        if not 0.0 <= self.temperature <= 5.0:
            raise ConfigError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


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
    vision = loaded.is_vision
    if image is not None and not vision:
        raise ValueError(f"{loaded.spec.name} is a text-only model: it cannot take an image")
    msgs: list[dict[str, Any]] = []
    if system_prompt.strip():
        msgs.append(
            {
                "role": "system",
                "content": [{"type": "text", "text": system_prompt}] if vision else system_prompt,
            }
        )
    for i, m in enumerate(history):
        if not vision:
            msgs.append({"role": m["role"], "content": m["content"]})
            continue
        content = [{"type": "text", "text": m["content"]}]
        if image is not None and i == len(history) - 1:
            content.insert(0, {"type": "image"})
        msgs.append({"role": m["role"], "content": content})
    templater = loaded.processor if vision else loaded.tokenizer
    text = templater.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if vision:
        if isinstance(image, str):
            from .data import Sample

            image = load_image(Sample(prompt="", image=image))
        kwargs = {"images": image} if image is not None else {}
        return dict(loaded.processor(text=text, return_tensors="pt", **kwargs))
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    return dict(ids)


class _StopOnFlag:
    """A stopping criterion: True (for every row) once the flag is set."""

    def __init__(self, flags: Sequence[StopFlag | threading.Event]) -> None:
        self.flags = flags

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        stop = any(
            (f.is_set() if isinstance(f, threading.Event) else f())
            for f in self.flags
            if f is not None
        )
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


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
            stopping_criteria=StoppingCriteriaList([_StopOnFlag([should_stop])]),
            **settings.generate_kwargs(),
        )
    return out.text


def stream_reply(
    loaded: LoadedModel,
    history: Sequence[dict[str, Any]],
    settings: GenerationSettings,
    *,
    image: Any | None = None,
    should_stop: StopFlag = None,
) -> Iterator[str]:
    """Stream a reply: yields the text so far after each new piece of text.

    ``generate_reply`` runs in a worker thread; leaving the iterator early stops it and waits
    for it. (A host that runs all torch work in one thread, like the app, calls
    ``generate_reply`` there instead: see ``hsr_core.worker``.)

    Args:
        loaded: the model (in whatever variant is active).
        history: the conversation, ending with the user's message.
        settings: generation settings (the seed is set before generating).
        image: optional image for vision-language models.
        should_stop: polled after every token; generation ends when it returns True.
    """
    pieces: queue.SimpleQueue = queue.SimpleQueue()
    abandoned = threading.Event()
    done = object()

    def stop() -> bool:
        return abandoned.is_set() or bool(should_stop and should_stop())

    def work() -> None:
        try:
            generate_reply(
                loaded, history, settings, on_text=pieces.put, image=image, should_stop=stop
            )
        except BaseException as e:  # surfaced in the caller's thread below
            pieces.put(e)
        finally:
            pieces.put(done)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while (item := pieces.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        abandoned.set()
        worker.join()
