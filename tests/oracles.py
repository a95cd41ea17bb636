"""Slow, obvious reimplementations that several test files check the core against."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM  # the model code loaded once, at collection

from hsr_core import stats
from hsr_core.data import Sample
from hsr_core.encoding import encode_one
from hsr_core.hooks import HookSet
from hsr_core.models import LoadedModel


def scan_wilson(k: int, n: int, z: float = stats.Z95, step: float = 1e-5) -> tuple[float, float]:
    """The Wilson interval as the score test's acceptance region, scanned: every ``p0`` on a
    grid of ``step`` with ``|k/n - p0| <= z * sqrt(p0 (1 - p0) / n)``; its lowest and highest."""
    p = k / n
    accepted = [
        i * step
        for i in range(int(1 / step) + 1)
        if abs(p - i * step) <= z * math.sqrt(i * step * (1 - i * step) / n)
    ]
    return min(accepted), max(accepted)


def selected_rows(
    loaded: LoadedModel, samples: Sequence[Sample], tokens: str = "response", names=None
) -> dict[str, list[torch.Tensor]]:
    """Every linear's (or those ``names``) selected input rows, float64, one sample at a time
    (no padding): the response tokens (``tokens="response"``) or all of them (``"all"``).

    Mllama's cross-attention k/v read the vision states ``[images * tiles, patches, hidden]``:
    their rows are every patch of the tiles some token of the sample may attend to."""
    a = loaded.adapter
    vision = {a.linear_name(l, p) for l in a.cross_layers for p in ("k_proj", "v_proj")}
    mods = {n: m for n, _, _, m in a.iter_linears()}
    seen: dict[str, list[torch.Tensor]] = {}
    for s in samples:
        inputs, plen, rlen = encode_one(loaded, s)
        keep = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
        if tokens == "response":
            keep[plen : plen + rlen] = True
        else:
            keep[:] = True

        def grab(_m, args, name, keep=keep, inputs=inputs):
            x = args[0]
            if name in vision:
                tiles = inputs["cross_attention_mask"][0].bool().any(dim=0).reshape(-1)
                rows = x[tiles].reshape(-1, x.shape[-1])
            else:
                rows = x[0][keep]
            seen.setdefault(name, []).append(rows.double())

        with HookSet() as hooks, torch.no_grad():
            for name in mods if names is None else names:
                hooks.pre(mods[name], lambda m, args, name=name: grab(m, args, name))
            loaded.model(**inputs)
    return seen


def naive_norms(
    loaded: LoadedModel, samples: Sequence[Sample], tokens: str = "response"
) -> dict[str, torch.Tensor]:
    """Wanda's input norms the slow way (float64): ``selected_rows``' column norms."""
    seen = selected_rows(loaded, samples, tokens)
    return {n: torch.cat(xs).square().sum(dim=0).sqrt() for n, xs in seen.items()}


def pruned_layer_by_layer(
    loaded: LoadedModel, layer_masks: Callable[[int], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Sequential pruning the slow way: layer by layer, ``layer_masks(layer)`` gives the masks
    of that layer's linears (computed with the layers before it pruned, i.e. zeroed), which are
    then zeroed; every weight is put back at the end, also after an error."""
    a = loaded.adapter
    mods = {n: m for n, _, _, m in a.iter_linears()}
    dense = {n: m.weight.detach().clone() for n, m in mods.items()}
    masks: dict[str, torch.Tensor] = {}
    try:
        for layer in range(a.num_layers):
            new = layer_masks(layer)
            masks.update(new)
            with torch.no_grad():
                for name, mask in new.items():
                    mods[name].weight.masked_fill_(mask, 0)
    finally:
        with torch.no_grad():
            for name, mod in mods.items():
                mod.weight.copy_(dense[name])
    return masks


def memory_llama(**overrides) -> LoadedModel:
    """The built-in tiny Llama's shape (2 layers, 4 heads, 2 KV heads, hidden 64, MLP 128),
    or that config with ``overrides``, built in memory with seed 0: not saved or loaded."""
    from hsr_core.builtin import build_tokenizer, tiny_llama_config
    from hsr_core.models import ModelSpec, build_adapter

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tok, **overrides)).eval()
    return LoadedModel(ModelSpec("tiny"), Path("."), model, tok, None, build_adapter(model))


class Spy:
    """Wrap a function of a module, recording each call's arguments."""

    def __init__(self, monkeypatch, owner, name):
        self.calls: list[tuple[tuple, dict]] = []
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)


def loop_bootstrap(columns, statistic, resamples: int, seed: int) -> list:
    """The paired bootstrap as a plain loop: ``resamples`` draws of the rows (numpy's generator
    with ``seed``, ``integers(0, n, n)`` each), ``statistic`` of each draw's columns; the values
    that are not None, in draw order."""
    rng = np.random.default_rng(seed)
    n = len(columns[0])
    out = []
    for _ in range(resamples):
        idx = [int(i) for i in rng.integers(0, n, n)]
        value = statistic(*[[col[i] for i in idx] for col in columns])
        if value is not None:
            out.append(value)
    return out


def slow_row_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` lowest of each row by a sort on (value, column): ties to the earlier column."""
    out_f, in_f = score.shape
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for i in range(out_f):
        row = score[i].tolist()
        for j in sorted(range(in_f), key=lambda j: (row[j], j))[: max(k, 0)]:
            mask[i, j] = True
    return mask


def slow_nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The ``n`` lowest of each group of ``m`` consecutive entries of each row, by a sort on
    (value, column): ties to the earlier column."""
    mask = torch.zeros(score.shape, dtype=torch.bool)
    for i in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            group = sorted((score[i, g + j].item(), g + j) for j in range(m))
            for _, j in group[:n]:
                mask[i, j] = True
    return mask
