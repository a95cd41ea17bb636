"""Chat encoding: samples and conversations through the chat template, with response masks.

The one encoding of chats (``chat_messages`` -> the template -> ``encode_prompt``) serves the
calibration samples (``encode_one``, ``iter_batches``: prompt and answer, with a mask of the
answer's tokens for Wanda's response-token statistics) and the chat (``hsr_core.chat``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import Sample, load_image


@dataclass
class Batch:
    """Model inputs for a batch of samples.

    Attributes:
        inputs: keyword arguments for the model (``input_ids``, ``attention_mask`` and, for
            vision-language models, ``pixel_values`` and friends).
        response_mask: bool ``[batch, seq]``, True on response tokens.
        prompt_lengths: tokens before the response, per sample.
    """

    inputs: dict[str, torch.Tensor]
    response_mask: torch.Tensor
    prompt_lengths: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return Batch(moved, self.response_mask.to(device), self.prompt_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())


def chat_messages(
    history: Sequence[dict[str, Any]],
    *,
    vision: bool,
    image: bool = False,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """Chat-template messages for a conversation: the one encoding of chats, used for
    calibration samples (``messages_for``) and for the chat (``hsr_core.chat.chat_inputs``).

    Args:
        history: ``{"role": "user"|"assistant", "content": str}`` messages, oldest first.
        vision: write contents as typed parts (vision-language processors' templates).
        image: the last message carries the image (placed before its text).
        system: a system message, when not empty.
    """
    msgs: list[dict[str, Any]] = []
    if system and system.strip():
        msgs.append(
            {"role": "system", "content": [{"type": "text", "text": system}] if vision else system}
        )
    for i, m in enumerate(history):
        if not vision:
            msgs.append({"role": m["role"], "content": m["content"]})
            continue
        content: list[dict[str, Any]] = [{"type": "text", "text": m["content"]}]
        if image and i == len(history) - 1:
            content.insert(0, {"type": "image"})
        msgs.append({"role": m["role"], "content": content})
    return msgs


def messages_for(
    sample: Sample, *, vision: bool, system: str | None = None
) -> list[dict[str, Any]]:
    """Chat messages for a sample's request (no answer)."""
    user = [{"role": "user", "content": sample.prompt}]
    return chat_messages(user, vision=vision, image=sample.has_image, system=system)


def encode_prompt(loaded: Any, text: str, image: Any | None = None) -> dict[str, torch.Tensor]:
    """Tokenize a prompt rendered by the chat template (with its image for a vision model).

    Returns:
        Model inputs with batch dimension 1 (``input_ids``, ``attention_mask`` and, for
        vision-language models, ``pixel_values`` and friends).
    """
    if loaded.is_vision:
        kwargs = {"images": image} if image is not None else {}
        return dict(loaded.processor(text=text, return_tensors="pt", **kwargs))
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }


def templater(loaded: Any) -> Any:
    """What renders the chat template: the processor of a vision model, else the tokenizer."""
    return loaded.processor if loaded.is_vision else loaded.tokenizer


def prompt_text(loaded: Any, sample: Sample, system: str | None = None) -> str:
    """The request rendered through the chat template, with the generation prompt."""
    return templater(loaded).apply_chat_template(
        messages_for(sample, vision=loaded.is_vision, system=system),
        add_generation_prompt=True,
        tokenize=False,
    )


def response_text(loaded: Any, sample: Sample, prompt: str, system: str | None = None) -> str:
    """The text the chat template puts after ``prompt`` for the sample's answer."""
    vision = loaded.is_vision
    msgs = messages_for(sample, vision=vision, system=system)
    answer = [{"type": "text", "text": sample.response}] if vision else sample.response
    full = templater(loaded).apply_chat_template(
        msgs + [{"role": "assistant", "content": answer}], tokenize=False
    )
    if full.startswith(prompt):
        return full[len(prompt) :]
    return sample.response + (loaded.tokenizer.eos_token or "")


def encode_one(
    loaded: Any, sample: Sample, *, with_response: bool = True, system: str | None = None
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Encode one sample.

    Returns:
        ``(inputs, prompt_len, response_len)`` with batch dimension 1.
    """
    text = prompt_text(loaded, sample, system)
    inputs = encode_prompt(loaded, text, load_image(sample) if loaded.is_vision else None)
    prompt_len = inputs["input_ids"].shape[1]
    resp_len = 0
    if with_response and sample.response:
        resp = loaded.tokenizer(
            response_text(loaded, sample, text, system), add_special_tokens=False
        )["input_ids"]
        resp_len = len(resp)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([resp])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        cam = inputs.get("cross_attention_mask")
        if cam is not None:  # Mllama: the answer sees the image as the prompt's last token does
            # [1, seq, images, tiles]; the last row repeated, as Mllama's generate extends it
            tail = cam[:, -1:].expand(-1, resp_len, *cam.shape[2:])
            inputs["cross_attention_mask"] = torch.cat([cam, tail], dim=1)
        for key in TOKEN_TYPES:  # Qwen2-VL marks its image tokens; the answer is text (0)
            if key in inputs:
                inputs[key] = torch.nn.functional.pad(inputs[key], (0, resp_len), value=0)
    return inputs, prompt_len, resp_len


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    pad: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape), strict=True):
        pad += [0, want - have]
    return torch.nn.functional.pad(t, pad)


TOKEN_TYPES = ("token_type_ids", "mm_token_type_ids")
"""Per-token type ids ``[1, seq]`` (Qwen2-VL's processor marks its image tokens in
``mm_token_type_ids``): a response extends them with 0, padding pads them with 0."""
PER_TOKEN = ("cross_attention_mask", *TOKEN_TYPES)
"""Inputs besides the ids with one row per token in dim 1 (Mllama's ``cross_attention_mask``
``[1, seq, images, tiles]``): padded on the tokens' side, with zeros (padding sees no image)."""


def collate(
    encoded: Sequence[tuple[dict[str, torch.Tensor], int, int]], pad_id: int, *, side: str = "right"
) -> Batch:
    """Pad a list of ``encode_one`` results into a batch.

    Token tensors (and ``PER_TOKEN`` ones) are padded on ``side``; every other tensor (pixel
    values, image sizes, grids) is concatenated along dim 0, zero-padded to a common shape when
    the samples differ.
    """
    seq = max(e[0]["input_ids"].shape[1] for e in encoded)
    ids, att, resp, lens = [], [], [], []
    for inputs, plen, rlen in encoded:
        n = inputs["input_ids"].shape[1]
        gap = seq - n
        left = gap if side == "left" else 0
        right = gap - left
        ids.append(torch.nn.functional.pad(inputs["input_ids"], (left, right), value=pad_id))
        att.append(torch.nn.functional.pad(inputs["attention_mask"], (left, right), value=0))
        r = torch.zeros(1, seq, dtype=torch.bool)
        r[0, left + plen : left + plen + rlen] = True
        resp.append(r)
        lens.append(plen)
    out = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(att)}
    others = {k for e in encoded for k in e[0] if k not in out}
    for k in sorted(others):
        parts = [e[0][k] for e in encoded]
        shape = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
        if k in PER_TOKEN and side == "left":  # the token gap goes first, the rest as usual
            parts = [
                torch.nn.functional.pad(p, [0, 0] * (p.dim() - 2) + [seq - p.shape[1], 0])
                for p in parts
            ]
        out[k] = torch.cat([_pad_to(p, [p.shape[0], *shape[1:]]) for p in parts])
    return Batch(out, torch.cat(resp), lens)


def iter_batches(
    loaded: Any,
    samples: Sequence[Sample],
    batch_size: int,
    *,
    with_response: bool = True,
    side: str = "right",
    system: str | None = None,
) -> Iterator[Batch]:
    """Encode and batch samples (on the CPU; move them with ``Batch.to``), one batch per
    ``batch_spans`` span."""
    pad_id = loaded.tokenizer.pad_token_id
    for span in batch_spans(samples, batch_size, vision=loaded.is_vision):
        yield collate(
            [
                encode_one(loaded, samples[i], with_response=with_response, system=system)
                for i in span
            ],
            pad_id,
            side=side,
        )


def batch_spans(samples: Sequence[Sample], batch_size: int, *, vision: bool) -> list[range]:
    """The positions of the samples in each batch ``iter_batches`` forms: ``batch_size``
    consecutive samples, except that for a vision model a batch never mixes samples with and
    without an image (their inputs differ in kind), so it ends where that changes."""
    spans: list[range] = []
    start = 0
    for i, s in enumerate(samples):
        if i > start and (
            i - start == batch_size or (vision and s.has_image != samples[start].has_image)
        ):
            spans.append(range(start, i))
            start = i
    if len(samples) > start:
        spans.append(range(start, len(samples)))
    return spans
