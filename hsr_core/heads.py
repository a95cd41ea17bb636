"""Attention heads: the one type, its ``"l-h"`` label, and the one ranking of Ships scores.

A head is ``Head(layer, head)`` (a named tuple, so it also equals the plain ``(layer, head)``
tuple). Files and the UI write it as the string ``"l-h"`` (the Ships reference's format):
``Head.label`` writes it and ``Head.parse`` reads it; everything else passes the typed value.
``top_heads`` is the one ranking of a ``[num_layers, num_heads]`` score table: best first,
NaN last, ties broken by layer and then head.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Head(NamedTuple):
    """One attention head: decoder layer ``layer``, query head ``head`` within it."""

    layer: int
    head: int

    @property
    def label(self) -> str:
        """The head as written in files and shown in the UI: ``"l-h"``."""
        return f"{self.layer}-{self.head}"

    @classmethod
    def parse(cls, text: str, num_layers: int | None = None, num_heads: int | None = None) -> Head:
        """``"l-h"`` -> ``Head(l, h)``, checked against the geometry when it is given.

        Raises:
            ValueError: with a message that says what a head looks like, or which heads exist.
        """
        try:
            layer, head = (int(x) for x in str(text).strip().split("-"))
        except ValueError:
            raise ValueError(f"{text!r} is not a head; write it as layer-head, e.g. 3-1") from None
        if layer < 0 or head < 0:
            raise ValueError(f"{text!r} is not a head: layer and head count from 0")
        known = num_layers is not None and num_heads is not None
        if known and not (layer < num_layers and head < num_heads):
            raise ValueError(
                f"head {text} is outside the model's {num_layers} layers x {num_heads} heads"
            )
        return cls(layer, head)


def all_heads(num_layers: int, num_heads: int) -> list[Head]:
    """Every head, layer-major."""
    return [Head(l, h) for l in range(num_layers) for h in range(num_heads)]


def top_heads(scores: torch.Tensor, k: int | None = None) -> list[Head]:
    """The ``k`` highest-scoring heads (all when None), best first.

    Args:
        scores: ``[num_layers, num_heads]`` (a tensor or anything ``torch.as_tensor`` takes).
        k: how many.

    NaN scores rank last; equal scores go by layer, then head.
    """
    scores = torch.as_tensor(scores)
    num_heads = scores.shape[1]
    flat = torch.nan_to_num(scores.flatten().double(), nan=-math.inf).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return [Head(i // num_heads, i % num_heads) for i in order[: len(flat) if k is None else k]]
