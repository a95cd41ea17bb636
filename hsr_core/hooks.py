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

Llama-3.2-Vision's cross-attention layers take the vision states (``cross_attention_states``),
their mask and ``full_text_row_masked_out_mask`` as kwargs, recorded and replayed per layer
like the rest; Mllama skips those layers when a prompt has no image, and a record says which
layers did not run (``LayerRecord.skipped``). A cross-attention head is ablated at ``o_proj``'s
input like any other; ``uniform`` makes its attention uniform over the vision tokens the
query may see (its values' mean under the cross-attention mask).
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
    K = adapter.num_kv_heads
    attn = adapter.attention(layer)
    cross = adapter.layer_kind(layer) == "cross"
    values: dict[str, torch.Tensor | None] = {}

    def heads_now(batch: int) -> torch.Tensor:
        if isinstance(row_heads, int):
            return torch.full((batch,), row_heads, dtype=torch.long)
        return row_heads() if callable(row_heads) else row_heads

    if mode == "uniform":

        def grab_values(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            values["v"] = out

        hooks.post(attn.v_proj, grab_values)
        if cross:

            def grab_mask(_mod: nn.Module, _args: Any, kw: dict[str, Any]) -> None:
                values["mask"] = kw.get("attention_mask")

            hooks.pre(attn, grab_mask, with_kwargs=True)

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
        elif mode == "uniform" and cross:
            v = values.pop("v").reshape(b, -1, K, d_h)  # [batch, vision tokens, kv_heads, d_h]
            vg = v[rows, :, cols // group].float()  # [rows, vision tokens, head_dim]
            x4 = x4.clone()
            x4[rows, :, cols] = uniform_cross_mean(vg, values.pop("mask", None), rows, seq).to(
                x.dtype
            )
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


def uniform_cross_mean(
    values: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor, seq: int
) -> torch.Tensor:
    """A cross-attention head's output under uniform attention: for every query position, the
    mean of its values over the vision tokens the mask lets it see.

    Args:
        values: ``[rows, vision tokens, head_dim]`` float32, the head's values per batch row.
        mask: the additive cross-attention mask ``[batch or 1, 1, seq, vision tokens]`` (0 where
            a token may look, the dtype's minimum elsewhere; Mllama zeroes the rows of tokens
            that see no image, which then look everywhere), a bool mask (True: may look), or
            None (every query sees every vision token).
        rows: the batch rows ``values`` belong to.
        seq: query positions.

    Returns:
        ``[rows, seq, head_dim]`` float32.
    """
    if mask is None:
        return values.mean(dim=1, keepdim=True).expand(-1, seq, -1)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed[:, 0]  # [batch or 1, seq, vision tokens]
    allowed = (allowed[rows] if allowed.shape[0] > 1 else allowed.expand(len(rows), -1, -1)).float()
    return (allowed @ values) / allowed.sum(dim=-1, keepdim=True).clamp_min(1.0)


@contextmanager
def head_ablation(
    adapter: ModelAdapter, heads: Sequence[tuple[int, int]], mode: str = "zero"
) -> Iterator[None]:
    """Ablate the given ``(layer, head)`` pairs in every batch row (a plain, unbatched ablation)."""
    yield from _head_ablation(adapter, heads, mode)


def _head_ablation(
    adapter: ModelAdapter, heads: Sequence[tuple[int, int]], mode: str
) -> Iterator[None]:
    # the body of ``head_ablation``, undecorated so that mutation testing reaches it
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
        kwargs: per decoder layer, the keyword arguments it was called with (caches left out;
            Mllama's vision states stored per text row, ``[batch, vision tokens, hidden]``,
            which its cross-attention reads alike); None for a skipped layer.
        final: the final-norm output ``[batch, seq, hidden]``; None when the pass stopped
            after the last decoder layer.
        skipped: the layers that did not run: Mllama's cross-attention layers when the
            inputs hold no image (the identity then; ``inputs`` of such a layer is None).
    """

    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    final: torch.Tensor | None
    skipped: frozenset[int] = frozenset()


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

    def stop(_mod: nn.Module, *_: Any) -> None:
        raise _StopAfterLastLayer

    with HookSet() as hooks:
        hooks.post(adapter.layers[-1], stop)
        hooks.pre(adapter.final_norm, stop)  # the last layer may be skipped (Mllama, no image)
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
            states = kwargs[i].get("cross_attention_states")
            if states is not None:
                # Mllama hands [batch * images * tiles, patches, hidden]; its cross-attention
                # reads them as k_proj(states).view(batch, -1, K, d_h), i.e. per text row:
                # stored so, a replay with more rows than recorded broadcasts them (run_layer)
                kwargs[i]["cross_attention_states"] = states.reshape(h.shape[0], -1, h.shape[-1])

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
    skipped = frozenset(i for i, k in enumerate(kwargs) if k is None)
    if any(adapter.layer_kind(i) != "cross" for i in skipped):
        raise RuntimeError("the intact forward pass did not run every decoder layer")
    if not every_input and 0 in skipped:
        raise RuntimeError("the intact forward pass skipped decoder layer 0")
    recorded = hidden if every_input else hidden[:1]
    if final and "final" not in out:
        raise RuntimeError("the intact forward pass did not run the final norm")
    return LayerRecord(recorded, kwargs, out.get("final"), skipped)  # type: ignore[arg-type]


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a decoder layer and return its hidden states (layers return a tensor or a tuple).

    A record of one row replayed with ``batch`` rows: the recorded kwargs broadcast, and
    Mllama's vision states (one row, ``record_layers``) are expanded to the batch (a view).
    """
    states = kwargs.get("cross_attention_states")
    if states is not None and states.shape[0] != hidden.shape[0]:
        if states.shape[0] != 1:
            raise ValueError(
                f"vision states recorded for {states.shape[0]} rows cannot be replayed with "
                f"{hidden.shape[0]}"
            )
        kwargs = {**kwargs, "cross_attention_states": states.expand(hidden.shape[0], -1, -1)}
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
