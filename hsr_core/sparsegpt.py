"""SparseGPT: one-shot pruning with the optimal update of the kept weights (docs/METHOD.md,
"SparseGPT").

Frantar & Alistarh, arXiv 2301.00774, Algorithm 1; the reference is IST-DASLab/sparsegpt
``sparsegpt.py`` (``SparseGPT.add_batch`` and ``fasterprune``) driven by ``llama.py``
(``llama_sequential``). For a linear with weight ``W`` (out x in) and calibration inputs ``X``
(tokens x in):

- **Hessian** ``H = 2/N * X^T X`` over the N selected tokens, accumulated in float32 (the
  reference's running average divides by the number of *sequences* instead; a constant factor
  that changes nothing below, since the mask rule and the update are invariant to the scale
  of ``H`` and the dampening is relative).
- **Dead inputs** (``H_ii == 0``: an input that is zero on every token) get ``H_ii = 1`` and
  their weights set to 0, as the reference does. Those zeros are part of the updated weight
  but not of the mask unless the mask rule picks them (it picks them first: their score is 0).
- **Dampening** ``H += percdamp * mean(diag H) * I``; then ``U = cholesky(H^-1)``, upper
  (``H^-1 = U^T U``). Row ``i`` of ``U`` is row ``i`` of the inverse Hessian after the inputs
  before ``i`` were eliminated, divided by the square root of its diagonal, so one pass over
  the columns does the optimal brain surgeon updates with no explicit re-inversion.
- **Blocks** of ``blocksize`` columns. In a block, each column ``i`` in order: the pruned rows'
  weights ``w`` give the error ``e = w / U_ii``, the block's remaining columns are updated by
  ``W[:, i:] -= e U[i, i:]`` and the pruned entries set to exactly 0; after the block, the
  columns to its right get the block's errors at once (``W[:, i2:] -= E U[i1:i2, i2:]``).
- **Unstructured mask**, per block and *over all rows of the block at once* (as the
  reference; not per row as Wanda): the score is ``W^2 / U_jj^2`` from the block's values when
  the block starts (already updated by the earlier blocks), and the ``k = int(rows * cols *
  sparsity)`` lowest scores of the block are pruned, ties going to the earlier entry in
  row-major order. So every block, and the layer, has exactly the configured sparsity, while
  single rows have more or fewer. One deliberate difference from the reference: it prunes
  ``score <= sort(score)[k]``, which is ``k + 1`` entries (and more on ties; one entry even
  at sparsity 0); this module prunes exactly ``k``, so the counts are exact.
- **N:M mask** (the reference's ``prunen/prunem`` branch): at the first column of each group
  of M, from the group's current values (updated by the columns before it in the block), the
  N lowest ``W^2 / U_jj^2`` of each row (ties: the earlier input). Groups are aligned to the
  block starts, so ``blocksize`` must be a multiple of M.
- **Sequential over layers** (``sparsegpt_masks``, as ``llama_sequential`` with its default
  ``true_sequential`` off): each decoder layer's Hessians are taken on the outputs of the
  already-pruned layers before it; within a layer every linear's Hessian comes from the same
  (dense) pass of that layer; then the layer runs again with its pruned, updated weights to
  give the next layer's inputs. SparseGPT has no one-shot form, so ``cfg.mode`` is not read.
- **Llama-3.2-Vision**: as Wanda (``hsr_core.wanda``), the ``k_proj`` / ``v_proj`` of a
  cross-attention layer read the vision states, so their ``X`` is every vision token of the
  image tiles the text may attend to, whatever the token selection; a cross-attention layer
  runs (and is pruned from) only the batches with an image, and the others pass it unchanged.

The math runs in float32 (float64 for float64 inputs) on the weight's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import WandaConfig
from .data import Sample
from .encoding import iter_batches
from .hooks import HookSet, record_layers, run_layer
from .masks import Masks, PackedMask
from .models import LoadedModel
from .progress import StopFlag, bar, check_stop
from .wanda import check_all_ran, vision_tiles


class HessianError(ValueError):
    """A damped Hessian is not positive definite (its Cholesky factorization failed)."""


# ---------------------------------------------------------------------------------------------
# one linear


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_pattern(in_f: int, sparsity: float, n: int, m: int, blocksize: int) -> bool:
    """Validate the arguments; True for an N:M pattern."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if n > 0 and m > 0:
        if not n < m:
            raise ValueError(f"N:M pattern needs 1 <= N < M, got {n}:{m}")
        if in_f % m:
            raise ValueError(f"N:M masks need in_features ({in_f}) divisible by M ({m})")
        if blocksize % m:
            raise ValueError(f"SparseGPT's N:M groups need blocksize ({blocksize}) divisible by M")
        return True
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity}")
    return False


def sparsegpt_count(
    shape: Sequence[int], *, sparsity: float, n: int = 0, m: int = 0, blocksize: int = 128
) -> int:
    """How many entries ``sparsegpt_linear`` prunes in a weight of this shape (exactly).

    Unstructured: ``int(rows * cols * sparsity)`` in every block of ``blocksize`` columns;
    N:M: N of every M inputs of every row.
    """
    out_f, in_f = shape
    if _check_pattern(in_f, sparsity, n, m, blocksize):
        return out_f * (in_f // m) * n
    return sum(
        int(out_f * (min(i1 + blocksize, in_f) - i1) * sparsity) for i1 in range(0, in_f, blocksize)
    )


def _lowest_flat(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries of a matrix, ties to the earlier (row-major) one."""
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        flat[torch.sort(score.reshape(-1), stable=True).indices[:k]] = True
    return flat.view(score.shape)


def _lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries of every row, ties to the earlier column."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return mask


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = h^-1`` (the reference's cholesky, cholesky_inverse, cholesky)."""
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        up, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
        if int(info) == 0:
            return up
    raise HessianError(
        "the damped Hessian is not positive definite (Cholesky failed); use more calibration "
        "samples (or tokens='all') or a larger percdamp"
    )


def sparsegpt_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one linear (Algorithm 1; the reference's ``fasterprune``).

    Args:
        weight: ``[out, in]``, any float dtype; not modified.
        hessian: ``[in, in]``, ``2/N * X^T X`` over the calibration tokens (float32; float64
            gives float64 math); not modified.
        sparsity: fraction pruned in every block of columns (unstructured).
        n, m: an N:M pattern when both are > 0 (``n`` of every ``m`` consecutive inputs of
            each row pruned); then ``sparsity`` is not read.
        blocksize: columns per block (lazy batch updates; for N:M a multiple of ``m``).
        percdamp: dampening, a fraction of the mean of the Hessian's diagonal.

    Returns:
        ``(updated weight [out, in] in weight's dtype, pruned entries exactly 0,
        bool mask [out, in] True = pruned)``, on the weight's device.

    Raises:
        HessianError: the damped Hessian is not positive definite.
        ValueError: bad shapes or pattern, or a Hessian that is not finite.
    """
    if weight.dim() != 2:
        raise ValueError(f"SparseGPT prunes a [out, in] matrix, got a weight of {weight.shape}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"a Hessian of {tuple(hessian.shape)} does not fit a weight of {weight.shape}"
        )
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    nm = _check_pattern(cols, sparsity, n, m, blocksize)
    dtype, dev = _compute_dtype(weight, hessian), weight.device
    # detached copies: autograd records nothing below, so no ``torch.no_grad`` is needed (a
    # decorator would also hide the function from mutmut 3, which skips decorated functions)
    W = weight.detach().to(dev, dtype, copy=True)
    H = hessian.detach().to(dev, dtype, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise ValueError(
            "the Hessian is not finite (inf or NaN): the calibration activations overflowed; "
            "load the model in bfloat16 or float32"
        )

    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = _inverse_cholesky(H)
    del H
    diag = U.diagonal()

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=dev)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # [out, block]
        E1 = torch.zeros_like(W1)  # the block's errors e = w / U_ii (0 where kept)
        U1 = U[i1:i2, i1:i2]
        d1 = diag[i1:i2]
        if nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = _lowest_flat(W1.square() / d1.square(), int(W1.numel() * sparsity))
        for i in range(i2 - i1):
            if nm and i % m == 0:
                group = W1[:, i : i + m].square() / d1[i : i + m].square()  # [out, m]
                mask1[:, i : i + m] = _lowest_per_row(group, n)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            err = (w - q) / d1[i]
            W1[:, i:].sub_(torch.outer(err, U1[i, i:]))
            W1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].sub_(E1 @ U[i1:i2, i2:])
        mask[:, i1:i2] = mask1
    return W.to(weight.dtype), mask


# ---------------------------------------------------------------------------------------------
# Hessians


def _token_selection(batch: Any, tokens: str) -> torch.Tensor:
    """The tokens the statistics read (``[batch, seq]`` bool), as Wanda selects them."""
    if tokens == "response":
        return batch.response_mask
    return batch.inputs["attention_mask"].bool()


class HessianCollector:
    """Forward pre-hooks that accumulate ``X^T X`` of each linear's input over chosen tokens.

    Call :meth:`set_batch` before each forward pass. Linears that read the same input tensor
    (q/k/v, gate/up) share one accumulator, computed once per batch.

    Args:
        vision_inputs: the linears that read vision states (Mllama's cross-attention k/v):
            they sum the vision tokens of the tiles the text sees, not the selected text tokens.
    """

    def __init__(self, vision_inputs: frozenset[str] = frozenset()) -> None:
        self.vision_inputs = vision_inputs
        self.sums: dict[str, torch.Tensor] = {}  # float32 [in, in] per group leader
        self.counts: dict[str, int] = {}  # tokens summed per group leader
        self.alias: dict[str, str] = {}  # linear -> the leader whose input it shares
        self._rows: torch.Tensor | None = None  # flat indices of selected tokens; None: all
        self._tiles: torch.Tensor | None = None  # CPU bool [batch * images * tiles]; None: all
        self._last: tuple[torch.Tensor, str] | None = None

    def set_batch(self, select: torch.Tensor, tiles: torch.Tensor | None = None) -> bool:
        """Take the next batch's token selection (bool ``[batch, seq]``) and its image tiles
        seen by the text (bool ``[batch, images, tiles]``, ``wanda.vision_tiles``; None: every
        vision row); False if no token is selected."""
        flat = select.reshape(-1)
        self._last = None
        self._tiles = None if tiles is None else tiles.reshape(-1).cpu()
        rows = flat.nonzero().squeeze(1)
        self._rows = None if rows.numel() == flat.numel() else rows
        return rows.numel() > 0

    def _vision_rows(self, n: int) -> torch.Tensor | None:
        """Selected rows of ``n`` flat vision-state rows (``[batch * images * tiles *
        patches]`` in that order, as Wanda reads them); None: all."""
        if self._tiles is None:
            return None
        if n % self._tiles.numel():
            raise RuntimeError(f"{n} vision rows do not split into {self._tiles.numel()} tiles")
        rows = self._tiles.repeat_interleave(n // self._tiles.numel()).nonzero().squeeze(1)
        return None if rows.numel() == n else rows

    def hook(self, name: str) -> Callable[..., None]:
        """The forward pre-hook for the linear ``name``."""
        vision = name in self.vision_inputs

        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                leader = self._last[1]
                if self.alias.setdefault(name, leader) != leader or name in self.sums:
                    raise RuntimeError(f"{name} shares its input inconsistently across batches")
                return
            if name in self.alias:
                raise RuntimeError(f"{name} shares its input inconsistently across batches")
            xs = x.reshape(-1, x.shape[-1])  # [tokens, in]
            rows = self._vision_rows(xs.shape[0]) if vision else self._rows
            if rows is not None:
                xs = xs.index_select(0, rows.to(x.device))
            xf = xs.float()
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(
                    xf.shape[1], xf.shape[1], dtype=torch.float32, device=xf.device
                )
            acc.addmm_(xf.T, xf)
            self.counts[name] = self.counts.get(name, 0) + xf.shape[0]
            self._last = (x, name)

        return fn

    def hessians(self) -> dict[str, torch.Tensor]:
        """``{linear: 2/N * X^T X}`` float32 ``[in, in]``; linears sharing an input share one
        tensor (do not modify them in place). Empties the collector."""
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():  # the sums are inference tensors when hooked under it
            for leader, s in self.sums.items():
                out[leader] = s.mul_(2.0 / self.counts[leader])
        for name, leader in self.alias.items():
            out[name] = out[leader]
        self.sums, self.counts, self.alias = {}, {}, {}
        return out


def hessians(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    names: Sequence[str] | None = None,
    should_stop: StopFlag = None,
) -> dict[str, torch.Tensor]:
    """Hessians ``2/N * X^T X`` of decoder linears of the model as it is (one pass, no pruning).

    A 7B model's Hessians for every linear take about 20 GB in float32; pass ``names`` for a
    few, or use ``sparsegpt_masks``, which holds one layer's at a time.

    Args:
        loaded: the model.
        samples: calibration samples.
        cfg: token selection (``response`` or ``all``) and batch size.
        names: the linears (default: every decoder linear).
        should_stop: polled between batches.

    Returns:
        ``{linear name: float32 [in, in]}`` on the model's device.
    """
    a = loaded.adapter
    modules = {n: mod for n, _, _, mod in a.iter_linears()}
    wanted = list(modules) if names is None else list(names)
    unknown = [n for n in wanted if n not in modules]
    if unknown:
        raise KeyError(f"not decoder linears of this model: {unknown[:3]}")
    collector = HessianCollector(_vision_inputs(loaded))
    with HookSet() as hooks, torch.inference_mode():
        for n in wanted:
            hooks.pre(modules[n], collector.hook(n))
        for batch in iter_batches(loaded, samples, cfg.batch_size):
            check_stop(should_stop)
            batch = batch.to(loaded.device)
            tiles = vision_tiles(batch.inputs)
            if collector.set_batch(_token_selection(batch, cfg.tokens), tiles):
                loaded.model(**batch.inputs, use_cache=False)
    if not collector.sums:
        raise ValueError(_NO_TOKENS)
    hs = collector.hessians()
    check_all_ran(loaded, wanted, hs)
    return hs


_NO_TOKENS = (
    "no calibration tokens were selected: the samples have no responses; "
    "give answers or use tokens='all'"
)


def _vision_inputs(loaded: LoadedModel) -> frozenset[str]:
    """The linears that read vision states: ``k_proj`` and ``v_proj`` of cross-attention."""
    a = loaded.adapter
    return frozenset(a.linear_name(l, p) for l in a.cross_layers for p in ("k_proj", "v_proj"))


# ---------------------------------------------------------------------------------------------
# the model, layer by layer


@contextmanager
def _weights_swapped(
    linears: Mapping[str, nn.Linear], values: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Give a layer's linears the given weights for the duration, then put the originals back
    (bit-exactly, also when the body raises)."""
    yield from _swapping_weights(linears, values)


def _swapping_weights(
    linears: Mapping[str, nn.Linear], values: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    # the body of ``_weights_swapped``, undecorated so that mutation testing reaches it
    saved = {n: m.weight.detach().clone() for n, m in linears.items()}
    try:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(values[n])
        yield
    finally:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(saved[n])


def _check_out(
    loaded: LoadedModel, out: Mapping[str, torch.Tensor], cfg: WandaConfig, blocksize: int
) -> None:
    """Refuse, before any work, output tensors that do not fit and patterns that cannot apply."""
    n, m = (cfg.n, cfg.m) if cfg.structure == "n:m" else (0, 0)
    for name, _, _, mod in loaded.adapter.iter_linears():
        try:
            sparsegpt_count(mod.weight.shape, sparsity=cfg.sparsity, n=n, m=m, blocksize=blocksize)
        except ValueError as e:
            raise ValueError(f"SparseGPT on {name}: {e}") from None
        if name not in out:
            raise ValueError(f"no output tensor for {name}: preallocate one per decoder linear")
        t, w = out[name], mod.weight
        if tuple(t.shape) != tuple(w.shape) or t.dtype != w.dtype:
            raise ValueError(
                f"the output tensor for {name} is {tuple(t.shape)} {t.dtype}; "
                f"the weight is {tuple(w.shape)} {w.dtype}"
            )


def sparsegpt_masks(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    out: Mapping[str, torch.Tensor],
    should_stop: StopFlag = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Masks:
    """Sequential SparseGPT over the decoder layers (as ``llama_sequential`` of the reference).

    Each layer's Hessians are taken on the outputs of the already-pruned earlier layers; within
    a layer, every linear's from the same pass of the dense layer. The model's weights are the
    same on return as on entry (each layer holds its pruned weights only while its outputs are
    computed for the next layer), also on error or stop.

    Args:
        loaded: the model (dense).
        samples: the calibration set (the utility set).
        cfg: sparsity, structure (``n``, ``m``), token selection and batch size (``mode`` is
            not read: SparseGPT is sequential).
        out: a preallocated tensor per decoder linear (same shape and dtype as its weight; any
            device, e.g. memory-mapped on the CPU) that receives the updated pruned weight.
        should_stop: polled between linears.
        blocksize, percdamp: as ``sparsegpt_linear``.

    Returns:
        ``{linear name: PackedMask}`` (True = pruned).

    Raises:
        HessianError: a linear's damped Hessian is not positive definite (named).
    """
    a = loaded.adapter
    _check_out(loaded, out, cfg, blocksize)
    n, m = (cfg.n, cfg.m) if cfg.structure == "n:m" else (0, 0)
    device = loaded.device
    states: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any] | None]] = []  # None: a layer the batch skips (Mllama)
    selects: list[torch.Tensor] = []
    tiles: list[torch.Tensor | None] = []
    for batch in iter_batches(loaded, samples, cfg.batch_size):
        check_stop(should_stop)
        batch = batch.to(device)
        rec = record_layers(loaded.model, a, batch.inputs, every_input=False, final=False)
        states.append(rec.inputs[0])
        kwargs.append(rec.kwargs)
        selects.append(_token_selection(batch, cfg.tokens))
        tiles.append(vision_tiles(batch.inputs))
    if not any(bool(s.any()) for s in selects):
        raise ValueError(_NO_TOKENS)
    vision_inputs = _vision_inputs(loaded)
    masks: Masks = {}
    for layer in bar(range(a.num_layers), desc="SparseGPT", unit="layer"):
        check_stop(should_stop)
        ran = [b for b in range(len(states)) if kwargs[b][layer] is not None]
        linears = {name: mod for name, l, _, mod in a.iter_linears() if l == layer}
        collector = HessianCollector(vision_inputs)
        with HookSet() as hooks, torch.inference_mode():
            for name, mod in linears.items():
                hooks.pre(mod, collector.hook(name))
            for b in ran:
                if collector.set_batch(selects[b], tiles[b]):
                    run_layer(a.layers[layer], states[b], kwargs[b][layer])
        hs = collector.hessians()
        check_all_ran(loaded, list(linears), hs)
        pruned: dict[str, torch.Tensor] = {}
        for name, mod in linears.items():
            check_stop(should_stop)
            try:
                w, mask = sparsegpt_linear(
                    mod.weight,
                    hs.pop(name),
                    sparsity=cfg.sparsity,
                    n=n,
                    m=m,
                    blocksize=blocksize,
                    percdamp=percdamp,
                )
            except HessianError as e:
                raise HessianError(f"SparseGPT on {name}: {e}") from None
            except ValueError as e:
                raise ValueError(f"SparseGPT on {name}: {e}") from None
            out[name].copy_(w)
            count = sparsegpt_count(
                mask.shape, sparsity=cfg.sparsity, n=n, m=m, blocksize=blocksize
            )
            masks[name] = PackedMask.pack(mask, count)
            pruned[name] = w
            del mask
        del hs
        with _weights_swapped(linears, pruned), torch.inference_mode():
            for b in ran:
                states[b] = run_layer(a.layers[layer], states[b], kwargs[b][layer])
        del pruned
    return masks
