"""Temporary changes to a model, each inside a context manager that undoes it.

- ``HookSet``: registers forward (pre-)hooks and removes every one of them on exit, also when
  the body raises. A test asserts that no hook is left behind.
- ``head_ablation``: ablates attention heads at the input of ``o_proj`` (docs/METHOD.md), one
  head per batch row, so many ablated copies of a prompt run side by side. ``zero`` removes the
  head's output; ``uniform`` replaces it with the causal running mean of its values
  (undifferentiated attention, the Ships paper's q-scaling as eps -> 0). Acting at ``o_proj``'s
  input makes both independent of the attention kernel.
- ``record_layers``: one intact forward pass that records each decoder layer's input and the
  keyword arguments it was called with (rotary embeddings, including Qwen2-VL's 3-D ones, and
  the attention mask), and the final-norm output; the one way layers are recorded (Ships'
  layer replay and sequential Wanda both use it). ``run_layer`` runs one decoder layer again
  from such a record, with a batch of hidden states that broadcasts against the recorded
  kwargs. ``forward_decoder_only`` runs a model up to its last decoder layer only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .models import ModelAdapter


class HookSet:
    """Context manager owning a set of hooks; all are removed on exit.

    Example:
        >>> with HookSet() as hooks:
        ...     hooks.pre(module, fn)
        ...     model(**inputs)
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def count_hooks(model: nn.Module) -> int:
    """Number of this project's forward (pre-)hooks registered anywhere in ``model``.

    transformers installs hooks of its own (e.g. to capture hidden states), which are not
    counted.
    """
    return sum(
        getattr(fn, "__module__", "").startswith("hsr_core")
        for m in model.modules()
        for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


def causal_running_mean(values: torch.Tensor) -> torch.Tensor:
    """``out[:, t] = mean(values[:, :t+1])`` along dim 1 (the sequence), in float32."""
    seq = values.shape[1]
    counts = torch.arange(1, seq + 1, device=values.device, dtype=torch.float32)
    shape = [1, seq] + [1] * (values.dim() - 2)
    return values.float().cumsum(dim=1) / counts.view(shape)


def add_head_ablation(
    hooks: HookSet,
    adapter: ModelAdapter,
    layer: int,
    row_heads: torch.Tensor | int | Callable[[], torch.Tensor],
    mode: str = "zero",
) -> None:
    """Ablate one head per batch row at ``o_proj``'s input of ``layer``.

    Args:
        hooks: the HookSet that owns the hooks.
        adapter: the model's adapter.
        layer: the decoder layer.
        row_heads: long ``[batch]``: the head ablated in each row, -1 for none; an int to
            ablate that head in every row; or a callable returning the tensor at call time
            (for batches that grow during a replay).
        mode: ``zero`` or ``uniform``.
    """
    H, d_h, group = adapter.num_heads, adapter.head_dim, adapter.group_size
    attn = adapter.attention(layer)
    values: dict[str, torch.Tensor] = {}

    def heads_now(batch: int) -> torch.Tensor:
        if isinstance(row_heads, int):
            return torch.full((batch,), row_heads, dtype=torch.long)
        return row_heads() if callable(row_heads) else row_heads

    if mode == "uniform":

        def grab_values(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            values["v"] = out

        hooks.post(attn.v_proj, grab_values)

    def ablate(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        b, seq, _ = x.shape
        heads = heads_now(b).to(x.device)
        if heads.shape[0] != b:
            raise RuntimeError(f"head ablation got {heads.shape[0]} rows for a batch of {b}")
        x4 = x.view(b, seq, H, d_h)  # [batch, seq, heads, head_dim]
        rows = torch.nonzero(heads >= 0).flatten()
        if rows.numel() == 0:
            return args
        cols = heads[rows]
        if mode == "zero":
            keep = torch.ones(b, H, dtype=x.dtype, device=x.device)
            keep[rows, cols] = 0
            x4 = x4 * keep[:, None, :, None]
        elif mode == "uniform":
            v = values.pop("v").view(b, seq, -1, d_h)  # [batch, seq, kv_heads, head_dim]
            mean = causal_running_mean(v[rows, :, cols // group]).to(
                x.dtype
            )  # [rows, seq, head_dim]
            x4 = x4.clone()
            x4[rows, :, cols] = mean
        else:
            raise ValueError(f"unknown ablation mode {mode!r}")
        return (x4.reshape(b, seq, H * d_h), *args[1:])

    hooks.pre(attn.o_proj, ablate)


@contextmanager
def head_ablation(
    adapter: ModelAdapter, heads: Sequence[tuple[int, int]], mode: str = "zero"
) -> Iterator[None]:
    """Ablate the given ``(layer, head)`` pairs in every batch row (a plain, unbatched ablation)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    with HookSet() as hooks:
        for layer, hs in by_layer.items():
            for h in hs:
                add_head_ablation(hooks, adapter, layer, h, mode)
        yield


@dataclass
class LayerRecord:
    """What one intact forward pass saw.

    Attributes:
        inputs: per decoder layer, its input hidden states ``[batch, seq, hidden]`` (only
            layer 0's when recorded with ``every_input=False``).
        kwargs: per decoder layer, the keyword arguments it was called with (caches left out).
        final: the final-norm output ``[batch, seq, hidden]``; None when the pass stopped
            after the last decoder layer.
    """

    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    final: torch.Tensor | None


class _StopAfterLastLayer(Exception):
    pass


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    return kw


def forward_decoder_only(
    model: nn.Module, adapter: ModelAdapter, inputs: dict[str, torch.Tensor]
) -> None:
    """Run ``model`` up to its last decoder layer, skipping the final norm and the LM head
    (for hooks that only read the decoder's linears)."""

    def stop(_mod: nn.Module, _inp: Any, _out: Any) -> None:
        raise _StopAfterLastLayer

    with HookSet() as hooks:
        hooks.post(adapter.layers[-1], stop)
        with suppress(_StopAfterLastLayer):
            model(**inputs, use_cache=False)


def record_layers(
    model: nn.Module,
    adapter: ModelAdapter,
    inputs: dict[str, torch.Tensor],
    *,
    every_input: bool = True,
    final: bool = True,
) -> LayerRecord:
    """Run the intact model once and record every decoder layer's input and kwargs.

    Args:
        model: the full model (vision tower included, so an image is encoded once here).
        adapter: its adapter.
        inputs: model inputs (Ships: a single prompt; sequential Wanda: a batch).
        every_input: keep every layer's input; False keeps only layer 0's (what a replay of
            all layers in order needs).
        final: run to the final norm and record its output; False stops after the last
            decoder layer.
    """
    n = adapter.num_layers
    hidden: list[torch.Tensor | None] = [None] * n
    kwargs: list[dict[str, Any] | None] = [None] * n
    out: dict[str, torch.Tensor] = {}

    def make_pre(i: int) -> Callable[..., None]:
        def pre(_mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            kw = dict(kw)
            h = args[0] if args else kw.pop("hidden_states")
            if every_input or i == 0:
                hidden[i] = h.detach().clone()
            kwargs[i] = {
                k: v
                for k, v in kw.items()
                if k not in ("past_key_values", "past_key_value", "cache")
            }

        return pre

    def grab_final(_mod: nn.Module, _inp: Any, x: torch.Tensor) -> None:
        out["final"] = x.detach()

    with HookSet() as hooks, torch.inference_mode():
        for i, layer in enumerate(adapter.layers):
            hooks.pre(layer, make_pre(i), with_kwargs=True)
        if final:
            hooks.post(adapter.final_norm, grab_final)
            model(**inputs, **_forward_kwargs(model))
        else:
            forward_decoder_only(model, adapter, inputs)
    recorded = hidden if every_input else hidden[:1]
    if any(k is None for k in kwargs) or any(h is None for h in recorded):
        raise RuntimeError("the intact forward pass did not run every decoder layer")
    if final and "final" not in out:
        raise RuntimeError("the intact forward pass did not run the final norm")
    return LayerRecord(recorded, kwargs, out.get("final"))  # type: ignore[arg-type]


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a decoder layer and return its hidden states (layers return a tensor or a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
