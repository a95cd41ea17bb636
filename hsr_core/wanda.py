"""Wanda: safety and utility importance of every weight, and pruning masks (docs/METHOD.md, "Wanda").

For a linear layer with weight ``W`` (out x in) and calibration inputs ``X`` (tokens x in), the
Wanda score is ``S_ij = |W_ij| * ||X_:,j||_2`` (Sun et al., arXiv 2306.11695; the safety/utility
split is Wei et al., ICML 2024). The durable state is the *norm vectors* ``||X_:,j||_2``, one
float32 vector of length ``in`` per linear per calibration set; score matrices are recomputed
from the weights when needed and never stored.

Masks are data (``hsr_core.masks``: ``dict[name, PackedMask]``, True meaning *pruned*, packed
8 per byte). Unstructured masks prune the lowest
``floor(in * sparsity)`` scores of each row; N:M masks the lowest N of every M consecutive
inputs. Ties are broken by position (the earlier input is pruned first), so masks are exact
and reproducible.

Llama-3.2-Vision: both kinds of decoder layer are pruned alike. The ``k_proj`` / ``v_proj`` of
a cross-attention layer read the vision states, not the text: their ``X`` is every vision
token of the image tiles the text may attend to (padding tiles left out), whatever token
selection the text linears use. Mllama runs a cross-attention layer only for inputs with an
image, so calibration samples without one give it no statistics (an error says so).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import WandaConfig
from .data import Sample
from .distributed import World, share, world
from .encoding import batch_spans, iter_batches
from .hooks import HookSet, forward_decoder_only, record_layers, run_layer
from .masks import Masks, PackedMask, apply_mask
from .models import LoadedModel
from .progress import StopFlag, bar, check_stop

# ---------------------------------------------------------------------------------------------
# statistics


class _NormCollector:
    """Forward pre-hooks that accumulate per-input-feature sums of squares over chosen tokens.

    Call :meth:`set_batch` before each forward pass. The selected tokens' flat positions are
    found once per batch (one host wait, before the forward pass), so the hooks gather just
    those rows with ``index_select`` and never wait for the GPU; with every token selected
    they read the activations as they are.
    """

    weighted_sum: bool = False
    """Weight tokens 0/1 and sum over all of them instead of gathering the selected ones (no
    index at all; kept as the alternative ``bench/bench_core.py`` times side by side)."""

    fused_norm: bool | None = None
    """Sum squares with ``vector_norm`` (float32 accumulation, no float32 copy); None: on a GPU.
    On the CPU a reduction over dim 0 by ``vector_norm`` is 3 to 9x slower than squaring and
    summing (measured on the development machine), so the CPU squares a float32 copy."""

    def __init__(
        self, modules: dict[str, nn.Linear], vision_inputs: frozenset[str] = frozenset()
    ) -> None:
        self.modules = modules
        self.vision_inputs = vision_inputs  # linears that read Mllama's vision states
        self.sums: dict[str, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None  # flat indices of selected tokens; None: all
        self._weights: torch.Tensor | None = None  # [batch * seq] 0/1, for weighted_sum
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tiles: torch.Tensor | None = None  # CPU bool [batch * images * tiles]; None: all
        self._vision_rows: dict[int, torch.Tensor | None] = {}
        self.partials: list[tuple[str, torch.Tensor]] | None = None
        """When a list: each hook call appends ``(name, sums of squares)`` to it instead of
        adding them to ``sums`` (the processes of a run send them to the main one, which adds
        them in one process's order: ``add_partials``)."""

    def set_batch(self, select: torch.Tensor, tiles: torch.Tensor | None = None) -> bool:
        """Take the next batch's token selection (bool ``[batch, seq]``) and, for the linears
        that read vision states, its image tiles seen by the text (bool ``[batch, images,
        tiles]``, ``vision_tiles``; None: every vision row); False if no token is selected."""
        flat = select.reshape(-1)
        self._last = None
        self._tiles = None if tiles is None else tiles.reshape(-1).cpu()
        self._vision_rows = {}
        if self.weighted_sum:
            self._rows, self._weights = None, flat
            return bool(flat.any())
        rows = flat.nonzero().squeeze(1)
        self._rows = None if rows.numel() == flat.numel() else rows
        return rows.numel() > 0

    def vision_rows(self, n: int) -> torch.Tensor | None:
        """Flat indices of the selected rows of ``n`` vision-state rows (``[batch * images *
        tiles * patches]``, or that reshaped per text row: the same order); None: all."""
        if self._tiles is None:
            return None
        if n not in self._vision_rows:
            if n % self._tiles.numel():
                raise RuntimeError(f"{n} vision rows do not split into {self._tiles.numel()} tiles")
            rows = self._tiles.repeat_interleave(n // self._tiles.numel()).nonzero().squeeze(1)
            self._vision_rows[n] = None if rows.numel() == n else rows
        return self._vision_rows[n]

    def hook(self, name: str) -> Callable[..., None]:
        vision = name in self.vision_inputs

        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            # q/k/v (and gate/up) read the same tensor: compute its statistic once
            if self._last is not None and self._last[0] is x:
                sq = self._last[1]
            else:
                xs = x.reshape(-1, x.shape[-1])  # [tokens, in]
                owned = True  # xs a temporary copy
                if vision:
                    rows = self.vision_rows(xs.shape[0])
                    if rows is None:
                        owned = False
                    else:
                        xs = xs.index_select(0, rows.to(x.device))
                elif self._weights is not None:
                    w = self._weights.to(x.device, x.dtype)  # 0 or 1: exact in any dtype
                    xs = xs * w[:, None]
                elif self._rows is not None:
                    xs = xs.index_select(0, self._rows.to(x.device))
                else:
                    owned = False
                sq = self._sum_of_squares(xs, owned=owned)
                self._last = (x, sq)
            if self.partials is not None:
                self.partials.append((name, sq))
                return
            acc = self.sums.get(name)
            self.sums[name] = sq.clone() if acc is None else acc.add_(sq)

        return fn

    def add_partials(self, partials: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Add recorded ``(name, sums of squares)`` in order, exactly as the hooks add them."""
        for name, sq in partials:
            acc = self.sums.get(name)
            self.sums[name] = sq.clone() if acc is None else acc.add_(sq)

    def _sum_of_squares(self, xs: torch.Tensor, *, owned: bool) -> torch.Tensor:
        """``[in]`` float32 sums of squares of ``xs`` ``[tokens, in]`` over its rows.

        Args:
            owned: ``xs`` is a temporary copy that may be squared in place.
        """
        fused = self.fused_norm if self.fused_norm is not None else xs.is_cuda
        if fused:
            return torch.linalg.vector_norm(xs, dim=0, dtype=torch.float32).square_()
        xf = xs.float()
        return (xf.square_() if owned or xf is not xs else xf.square()).sum(dim=0)

    def norms(self) -> dict[str, torch.Tensor]:
        return {n: s.sqrt().cpu() for n, s in self.sums.items()}


def _token_selection(batch: Any, tokens: str) -> torch.Tensor:
    if tokens == "response":
        return batch.response_mask
    return batch.inputs["attention_mask"].bool()


def vision_tiles(inputs: dict[str, Any]) -> torch.Tensor | None:
    """Bool ``[batch, images, tiles]``: the image tiles some real token of the row may attend
    to (Mllama's ``cross_attention_mask`` ``[batch, seq, images, tiles]``); None without one."""
    cam = inputs.get("cross_attention_mask")
    if cam is None:
        return None
    tokens = inputs["attention_mask"].bool()[:, :, None, None]
    return (cam.bool() & tokens).any(dim=1)


def _vision_inputs(loaded: LoadedModel) -> frozenset[str]:
    """The linears that read vision states: ``k_proj`` and ``v_proj`` of cross-attention."""
    a = loaded.adapter
    return frozenset(a.linear_name(l, p) for l in a.cross_layers for p in ("k_proj", "v_proj"))


def check_all_ran(loaded: LoadedModel, names: Sequence[str], seen: Collection[str]) -> None:
    """Raise when some linears saw no calibration input (Mllama's cross-attention layers skip
    inputs without an image); shared by Wanda's statistics and SparseGPT's Hessians."""
    missing = [n for n in names if n not in seen]
    if not missing:
        return
    a = loaded.adapter
    layers = sorted({a.parse(n)[0] for n in missing})
    if all(a.layer_kind(l) == "cross" for l in layers):
        raise ValueError(
            f"the cross-attention layers {layers} never ran on the calibration samples: "
            "Llama-3.2-Vision runs them only for inputs with an image; give samples with "
            "images (the pipeline gives a vision model typographic ones)"
        )
    raise ValueError(f"no calibration statistics for {missing[:3]}: those linears never ran")


def wanda_norms(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
    desc: str = "Wanda statistics",
) -> dict[str, torch.Tensor]:
    """Input-feature norms ``||X_:,j||_2`` of every decoder linear over a calibration set.

    Args:
        loaded: the model (dense).
        samples: calibration samples with responses.
        cfg: token selection (``response`` or ``all``) and batch size.
        should_stop: polled between batches.
        desc: progress bar label.

    Returns:
        ``{linear name: float32 [in]}`` on the CPU. Under ``accelerate launch`` with several
        processes the batches are split among them and every process returns the norms one
        process would compute, bit for bit on the CPU (``_shared_wanda_norms``).
    """
    w = world()
    if w.size > 1:
        return _shared_wanda_norms(loaded, samples, cfg, w, should_stop=should_stop, desc=desc)
    a = loaded.adapter
    modules = {name: mod for name, _, _, mod in a.iter_linears()}
    collector = _NormCollector(modules, _vision_inputs(loaded))
    device = loaded.device
    n_batches = -(-len(samples) // cfg.batch_size)
    with HookSet() as hooks, torch.inference_mode():
        for name, mod in modules.items():
            hooks.pre(mod, collector.hook(name))
        for batch in bar(
            iter_batches(loaded, samples, cfg.batch_size), desc=desc, total=n_batches, unit="batch"
        ):
            check_stop(should_stop)
            batch = batch.to(device)
            tiles = vision_tiles(batch.inputs)
            if not collector.set_batch(_token_selection(batch, cfg.tokens), tiles):
                continue
            forward_decoder_only(loaded.model, a, batch.inputs)
    if not collector.sums:
        raise ValueError(
            "no calibration tokens were selected: the samples have no responses; "
            "give answers or use tokens='all'"
        )
    check_all_ran(loaded, list(modules), set(collector.sums))
    return collector.norms()


def _shared_wanda_norms(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    w: World,
    *,
    should_stop: StopFlag = None,
    desc: str = "Wanda statistics",
) -> dict[str, torch.Tensor]:
    """``wanda_norms`` across the processes of ``accelerate launch``, equal to one process's.

    The batches are the ones one process forms (``batch_spans``); each process takes a
    contiguous block of them (``share``) and keeps, per batch, every hook call's ``[in]`` sums
    of squares instead of adding them up. The main process receives every process's batches
    and adds their sums in global batch order, call by call: the same float32 additions in the
    same order as one process (adding each process's total instead would group the additions
    differently, and float addition is not associative). It takes the square roots and sends
    the norms to every process; an error (no tokens selected, a linear that never ran) is
    raised on every process alike.
    """
    a = loaded.adapter
    modules = {name: mod for name, _, _, mod in a.iter_linears()}
    collector = _NormCollector(modules, _vision_inputs(loaded))
    device = loaded.device
    spans = batch_spans(samples, cfg.batch_size, vision=loaded.is_vision)
    mine = share(len(spans), w.rank, w.size)
    sent: list[list[tuple[str, torch.Tensor]]] = []  # per batch of mine: hook calls in order
    with HookSet() as hooks, torch.inference_mode():
        for name, mod in modules.items():
            hooks.pre(mod, collector.hook(name))
        for b in bar(mine, desc=f"{desc} ({w.rank + 1}/{w.size})", unit="batch"):
            check_stop(should_stop)
            span = spans[b]
            (batch,) = iter_batches(loaded, samples[span.start : span.stop], len(span))
            batch = batch.to(device)
            collector.partials = []
            if collector.set_batch(_token_selection(batch, cfg.tokens), vision_tiles(batch.inputs)):
                forward_decoder_only(loaded.model, a, batch.inputs)
            on_cpu: dict[int, torch.Tensor] = {}  # q/k/v share one tensor: copy it once
            sent.append([(n, on_cpu.setdefault(id(t), t.cpu())) for n, t in collector.partials])
    gathered = w.gather(sent)
    result: dict[str, torch.Tensor] | str | None = None
    if w.is_main:
        assert gathered is not None
        collector.partials = None
        for batches in gathered:  # rank order, then each rank's batches: global batch order
            for calls in batches:
                collector.add_partials(calls)
        try:
            if not collector.sums:
                raise ValueError(
                    "no calibration tokens were selected: the samples have no responses; "
                    "give answers or use tokens='all'"
                )
            check_all_ran(loaded, list(modules), set(collector.sums))
            result = collector.norms()
        except ValueError as e:
            result = str(e)
    result = w.broadcast(result)
    if isinstance(result, str):
        raise ValueError(result)
    return result


# ---------------------------------------------------------------------------------------------
# masks


def wanda_score(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``|W| * norm`` as float32 ``[out, in]``.

    One product with type promotion (a bf16/fp16 ``|W|`` times a float32 norm is computed in
    float32, exactly as ``|W|.float() * norm``) rather than a float32 copy of ``|W|`` first.
    """
    return torch.mul(weight.detach().abs(), norm.to(weight.device, torch.float32)[None, :])


def mask_from_scores(score: torch.Tensor, cfg: WandaConfig) -> torch.Tensor:
    """Bool ``[out, in]`` mask (True = pruned) from a score matrix.

    Unstructured: in every row the ``floor(in * sparsity)`` lowest scores. N:M: in every group
    of M consecutive inputs of a row, the N lowest. Ties: the earlier input is pruned first.
    """
    out_f, in_f = score.shape
    if cfg.structure == "n:m":
        if in_f % cfg.m:
            raise ValueError(f"N:M masks need in_features ({in_f}) divisible by M ({cfg.m})")
        groups = score.view(out_f, in_f // cfg.m, cfg.m)  # [out, groups, M]
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : cfg.n]
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(-1, order, True)
        return mask.view(out_f, in_f)
    return lowest_k(score, int(in_f * cfg.sparsity))


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries of every row, ties going to the earlier column.

    The same set a stable per-row sort would give, by selection rather than sorting: the k-th
    lowest value is the threshold and everything at or below it is taken. Only rows where more
    than one entry equals the threshold took too many; there, of the entries equal to it, the
    first ``k - below`` in column order are kept. Those rows are rare for real weights (ties
    need ``|W_ij| * n_j == |W_il| * n_l``), so the common case costs one comparison and one
    row count after the selection.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= score.shape[1]:
        return torch.ones_like(score, dtype=torch.bool)
    thr = kth_smallest(score, k)  # [out, 1]
    mask = score <= thr
    over = mask.sum(dim=1) - k  # >= 0: entries equal to the threshold taken beyond the k
    rows = over.nonzero().squeeze(1)
    if rows.numel() and bool((over[rows] < 0).any()):  # only NaN makes a row take fewer
        raise ValueError(
            "Wanda scores are not finite (NaN): a weight or a calibration statistic is inf or "
            "NaN; load the model in bfloat16 or float32 and check its weights"
        )
    if rows.numel():
        sub, t = score[rows], thr[rows]
        at = sub == t
        keep = at.sum(dim=1, keepdim=True) - over[rows, None]  # ties to take, first in order
        mask[rows] = (sub < t) | (at & (at.cumsum(dim=1) <= keep))
    return mask


def kth_smallest(score: torch.Tensor, k: int, *, use_topk: bool | None = None) -> torch.Tensor:
    """The k-th smallest value of every row, ``[out, 1]`` (ties counted, as ``kthvalue``).

    On a GPU it is the largest of the k smallest values from ``topk``: for matrices like a
    7B model's (thousands of rows of thousands) PyTorch's CUDA ``topk`` runs a multi-block
    radix select, 8 bits a pass (``should_use_multiblock`` in ATen's TensorTopK.cu), where
    ``kthvalue`` runs one block per row, 2 bits a pass (SortingRadixSelect.cuh); the value
    is the same. On the CPU ``kthvalue`` (a quickselect per row) is as fast as ``topk``.
    ``bench/bench_core.py`` times both (``mask_stages_s``).

    Args:
        use_topk: force one way (tests run the GPU way on the CPU); default: by device.
    """
    if use_topk is None:
        use_topk = score.device.type == "cuda"
    if use_topk:
        return score.topk(k, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    return score.kthvalue(k, dim=1, keepdim=True).values


def mask_count(shape: Sequence[int], cfg: WandaConfig) -> int:
    """How many entries ``mask_from_scores`` prunes in a matrix of this shape (exactly)."""
    out_f, in_f = shape
    if cfg.structure == "n:m":
        return out_f * (in_f // cfg.m) * cfg.n
    return out_f * min(max(int(in_f * cfg.sparsity), 0), in_f)


def check_finite(name: str, norm: torch.Tensor) -> None:
    """Raise a clear error when a norm vector holds inf or NaN (activations that overflowed,
    typically float16), instead of masks computed from garbage."""
    if not bool(torch.isfinite(norm).all()):
        raise ValueError(
            f"the Wanda statistics of {name} are not finite (inf or NaN): the calibration "
            "activations overflowed; load the model in bfloat16 or float32"
        )


def prune_masks(
    loaded: LoadedModel, utility_norms: dict[str, torch.Tensor], cfg: WandaConfig
) -> Masks:
    """One-shot Wanda masks for every decoder linear from the utility norms.

    Args:
        loaded: the model, with its dense weights in place.
        utility_norms: ``wanda_norms`` over the utility set.
        cfg: sparsity and structure.

    Returns:
        ``{linear name: PackedMask}`` (True = pruned).
    """
    masks: Masks = {}
    for name, _, _, mod in loaded.adapter.iter_linears():
        if name not in utility_norms:
            raise KeyError(f"no utility norms for {name}; were they computed for this model?")
        check_finite(name, utility_norms[name])
        score = wanda_score(mod.weight, utility_norms[name])
        mask = mask_from_scores(score, cfg)
        del score  # free the float32 scores before packing (7B: 180 MB per MLP linear)
        masks[name] = PackedMask.pack(mask, mask_count(mask.shape, cfg))
    return masks


@contextmanager
def _pruned_layer(layer_linears: dict[str, nn.Linear], masks: Masks) -> Iterator[None]:
    """Prune a layer's linears (``apply_mask``) for the duration, then put the originals back."""
    yield from _pruning_layer(layer_linears, masks)


def _pruning_layer(layer_linears: dict[str, nn.Linear], masks: Masks) -> Iterator[None]:
    # the body of ``_pruned_layer``, undecorated so that mutation testing reaches it
    saved = {n: m.weight.detach().clone() for n, m in layer_linears.items()}
    try:
        for n, m in layer_linears.items():
            apply_mask(m.weight, masks[n])
        yield
    finally:
        with torch.no_grad():
            for n, m in layer_linears.items():
                m.weight.copy_(saved[n])


def sequential_masks(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
) -> Masks:
    """Wanda's own sequential pruning: layer by layer, each layer's statistics taken on the
    outputs of the already-pruned layers before it.

    The model's weights are the same on return as on entry (each layer is pruned only while
    its outputs are computed for the next layer).

    Args:
        loaded: the model (dense).
        samples: the utility calibration set.
        cfg: sparsity, structure, token selection and batch size.
        should_stop: polled between layers.

    Returns:
        ``{linear name: PackedMask}`` (True = pruned).
    """
    a = loaded.adapter
    device = loaded.device
    states: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = []
    selects: list[torch.Tensor] = []
    tiles: list[torch.Tensor | None] = []
    for batch in iter_batches(loaded, samples, cfg.batch_size):
        batch = batch.to(device)
        rec = record_layers(loaded.model, a, batch.inputs, every_input=False, final=False)
        states.append(rec.inputs[0])
        kwargs.append(rec.kwargs)  # None for a layer the batch skips (Mllama, no image)
        selects.append(_token_selection(batch, cfg.tokens))
        tiles.append(vision_tiles(batch.inputs))
    masks: Masks = {}
    vision_inputs = _vision_inputs(loaded)
    ran = [[b for b in range(len(states)) if kwargs[b][l] is not None] for l in range(a.num_layers)]
    for layer in bar(range(a.num_layers), desc="Sequential Wanda", unit="layer"):
        check_stop(should_stop)
        linears = {n: m for n, l, _, m in a.iter_linears() if l == layer}
        collector = _NormCollector(linears, vision_inputs)
        with HookSet() as hooks, torch.inference_mode():
            for n, m in linears.items():
                hooks.pre(m, collector.hook(n))
            for b in ran[layer]:
                collector.set_batch(selects[b], tiles[b])
                run_layer(a.layers[layer], states[b], kwargs[b][layer])
        check_all_ran(loaded, list(linears), set(collector.sums))
        norms = collector.norms()
        for n, v in norms.items():
            check_finite(n, v)
        layer_masks = {}
        for n, m in linears.items():
            mask = mask_from_scores(wanda_score(m.weight, norms[n]), cfg)
            layer_masks[n] = PackedMask.pack(mask, mask_count(mask.shape, cfg))
        with _pruned_layer(linears, layer_masks), torch.inference_mode():
            for b in ran[layer]:
                states[b] = run_layer(a.layers[layer], states[b], kwargs[b][layer])
        masks.update(layer_masks)
    return masks


def compute_masks(
    loaded: LoadedModel,
    utility_norms: dict[str, torch.Tensor],
    utility_samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
) -> Masks:
    """Masks in the configured mode (``one-shot`` from the norms, or ``sequential``)."""
    if cfg.mode == "sequential":
        return sequential_masks(loaded, utility_samples, cfg, should_stop=should_stop)
    return prune_masks(loaded, utility_norms, cfg)
