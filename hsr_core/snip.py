"""SNIP: connection sensitivity ``|W ⊙ ∂L/∂W|`` of every decoder linear, and its pruning masks.

SNIP (Lee et al., arXiv 1810.02340) scores a weight by ``|W_ij * ∂L/∂W_ij|``. Wei et al.
(ICML 2024) use it for LLMs in their reference code (``boyiwei/alignment-attribution-code``,
commit ``0b0e707``), as ``--prune_method wandg``: ``lib/model_wrapper.py``, ``prune_wandg`` and
``_prune_core(prune_mode="gradient")``, with the data of ``lib/data.py`` (``get_align``,
``get_alpaca`` with ``disentangle``). What that code does, and what this module does:

- **Loss.** Each calibration sample is one batch of its own; ``labels`` are the tokens with the
  prompt set to ``-100``, and ``loss = model(input_ids=inp, labels=tar)[0]``: the transformers
  causal-LM loss, the *mean* cross-entropy over the sample's response tokens (shifted: the
  logits at position ``t - 1`` predict token ``t``). Here: the same mean per sample, over the
  response tokens (``cfg.tokens == "response"``) or over every non-padding token except image
  placeholders (``"all"``; the reference's undisentangled data labels only a window's last
  token, a mode it does not use with SNIP).
- **Accumulation.** ``saved_grad += weight.grad.abs()`` after each sample's backward (after
  ``model.zero_grad()``), then ``W_metric = |W| * saved_grad``: the score is
  ``sum_s |W ⊙ g_s|`` with ``g_s`` one sample's gradient, *not* ``|W ⊙ sum_s g_s|`` (that is
  the unused ``prune_wandg_v1``). Here the same sum over samples, for any ``cfg.batch_size``:
  a batch runs as one forward and one backward of the sum of its samples' mean losses (the
  samples do not interact, so each sample's output gradient is its own), and a tensor hook on
  each linear's output forms every sample's weight gradient ``g_s = δ_sᵀ X_s`` from its
  output gradient ``δ_s`` and input ``X_s`` before ``|·|`` is summed. The reference sums in
  the model's dtype (bf16); here gradients are computed in the model's dtype and the sums are
  float32.
- **Memory.** The reference turns on ``requires_grad`` for one layer's linears at a time and
  runs every sample once per layer. Here no parameter requires a gradient at all (every
  ``requires_grad`` is False for the duration and restored after): a scored linear whose
  output is not yet in the graph (its input depends on nothing scored: the first scored
  layer's q/k/v, Mllama's cross-attention k/v of the image states) has its output made a leaf
  that requires grad, so autograd builds the graph from the scored layers on only (the vision
  tower, embeddings and earlier layers never enter it) and no ``.grad`` is ever written; the
  weight gradients exist only as one ``[out, in]`` product per sample inside the hook. One
  pass holds a float32 sum per scored weight (4 bytes a weight; ``sequential`` holds one
  layer's).
  Logits are formed only at the predicted positions (the final norm's output through
  ``lm_head``, with the config's ``final_logit_softcapping`` where set), not over the whole
  batch and vocabulary.
- **Masks.** ``_prune_core`` prunes per output row: unstructured, a stable sort of each row
  and its ``int(in * sparsity)`` lowest; N:M, the N lowest of each group of M
  (``torch.topk``). Here ``hsr_core.wanda.mask_from_scores`` (the same rows; ties go to the
  earlier input, which ``topk`` leaves unspecified).
- **Order.** ``prune_wandg`` walks the layers in order and prunes each (zeroes its weights in
  place) before taking the next layer's gradients, so layer ``i``'s scores come from a model
  whose layers ``< i`` are already pruned and whose later layers are dense; with
  ``--dump_wanda_score`` (the scores its attribution and set-difference use) nothing is
  pruned and every layer's scores come from the dense model. ``snip_masks`` does the first in
  ``sequential`` mode and the second in ``one-shot`` mode; ``snip_scores`` always returns the
  dense model's scores. The weights are the same on return as on entry in both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import WandaConfig
from .data import Sample
from .encoding import Batch, iter_batches
from .hooks import HookSet
from .masks import Masks, PackedMask, apply_mask
from .models import LoadedModel
from .progress import StopFlag, bar, check_stop
from .wanda import mask_count, mask_from_scores

_DESC = "SNIP gradients"


class _StopAfterFinalNorm(Exception):
    """Raised by the final norm's hook: the LM head runs on the selected positions only."""


@contextmanager
def _no_parameter_grads(model: nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` False for the duration, restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _SampleGradients:
    """Forward hooks that sum ``|g_s|``, each sample's weight gradient, over the samples.

    A linear's forward hook keeps its input ``X`` ``[batch, seq, in]`` and registers a hook on
    its output, which receives ``δ = ∂L/∂Y`` ``[batch, seq, out]`` in the backward pass; sample
    ``s``'s weight gradient is ``δ_sᵀ X_s`` (what autograd would put in ``weight.grad`` for
    that sample alone), computed in the model's dtype, its absolute value added to a float32
    ``[out, in]`` sum.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.sums = {
            n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
            for n, m in modules.items()
        }
        self.batch_size = 0

    def hook(self, name: str) -> Callable[..., torch.Tensor]:
        def forward(
            _mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
        ) -> torch.Tensor:
            if not out.requires_grad:  # nothing scored upstream: the graph starts here
                out = out.detach().requires_grad_(True)
            x = args[0].detach()
            batch = self.batch_size

            def backward(grad: torch.Tensor) -> None:
                xs = x.reshape(batch, -1, x.shape[-1])  # [batch, seq, in]
                gs = grad.reshape(batch, -1, grad.shape[-1])  # [batch, seq, out]
                acc = self.sums[name]
                for s in range(batch):
                    acc.add_((gs[s].transpose(0, 1) @ xs[s]).abs_())  # [out, in]

            out.register_hook(backward)
            return out

        return forward


def _image_token_ids(model: nn.Module) -> list[int]:
    cfg = model.config
    ids = []
    for attr in ("image_token_id", "image_token_index", "video_token_id"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


def loss_targets(batch: Batch, tokens: str, image_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Bool ``[batch, seq]``: the tokens whose prediction enters the loss (where the reference's
    ``labels`` are not ``-100``; the logits one position earlier predict them, so the first
    token never counts).

    Args:
        batch: an encoded batch.
        tokens: ``response`` (the answer's tokens) or ``all`` (every non-padding token that is
            not an image placeholder).
        image_token_ids: placeholder token ids never predicted with ``all``.
    """
    if tokens == "response":
        return batch.response_mask
    ids = batch.inputs["input_ids"]
    sel = batch.inputs["attention_mask"].bool()
    for t in image_token_ids:
        sel = sel & (ids != t)
    return sel


def _logits(loaded: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head`` of final-norm outputs ``[n, hidden]`` -> ``[n, vocab]`` in float32 (float64
    for a float64 model), soft-capped where the config says so (Gemma 2), as the model's own
    forward does."""
    logits = loaded.adapter.lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    cfg = loaded.model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _batch_loss(loaded: LoadedModel, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
    """Sum over the batch's samples of each one's mean cross-entropy over its ``targets``."""
    a = loaded.adapter
    final: dict[str, torch.Tensor] = {}

    def grab(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        final["h"] = out
        raise _StopAfterFinalNorm

    with HookSet() as hooks:
        hooks.post(a.final_norm, grab)
        with suppress(_StopAfterFinalNorm):
            loaded.model(**batch.inputs, use_cache=False)
    h = final["h"]  # [batch, seq, hidden]
    sel = targets[:, 1:].to(h.device)  # [batch, seq - 1]: position t - 1 predicts token t
    labels = batch.inputs["input_ids"][:, 1:].to(h.device)[sel]  # [n]
    logits = _logits(loaded, h[:, :-1][sel])  # [n, vocab]
    per_sample = sel.sum(dim=1).clamp(min=1).float()  # [batch]
    weight = (1.0 / per_sample)[:, None].expand_as(sel)[sel]  # [n]: 1 / its sample's count
    ce = F.cross_entropy(logits, labels, reduction="none")  # [n]
    return (ce * weight).sum()


def _gradient_pass(
    loaded: LoadedModel,
    batches: Iterable[Batch],
    cfg: WandaConfig,
    layers: Sequence[int],
    progress: Any,
    should_stop: StopFlag,
    names: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``sum_s |g_s|`` float32 ``[out, in]`` of the linears of ``layers`` (only ``names``,
    when given) over the batches.

    Raises:
        ValueError: no batch had a token to predict.
    """
    a = loaded.adapter
    wanted = set(layers)
    modules = {
        n: m
        for n, layer, _, m in a.iter_linears()
        if layer in wanted and (names is None or n in names)
    }
    image_ids = _image_token_ids(loaded.model)
    device = loaded.device
    any_tokens = False
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        _no_parameter_grads(loaded.model),
        HookSet() as hooks,
    ):
        grads = _SampleGradients(modules)  # here: under a caller's inference_mode, the sums
        # made outside would be inference tensors, which the backward hooks cannot add to
        for n, m in modules.items():
            hooks.post(m, grads.hook(n))
        for batch in batches:
            check_stop(should_stop)
            targets = loss_targets(batch, cfg.tokens, image_ids)
            if bool(targets[:, 1:].any()):
                any_tokens = True
                batch = batch.to(device)
                grads.batch_size = targets.shape[0]
                _batch_loss(loaded, batch, targets).backward()
            progress.update(1)
    if not any_tokens:
        what = "response" if cfg.tokens == "response" else "non-padding"
        raise ValueError(
            f"no {what} tokens were selected for the SNIP loss: the samples have no "
            "responses (or are empty); give answers or use tokens='all'"
        )
    return grads.sums


def snip_scores(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
    names: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """SNIP importance ``sum_s |W ⊙ ∂L_s/∂W|`` of every decoder linear (or only ``names``), on
    the dense model.

    ``L_s`` is sample ``s``'s language-model loss, the mean cross-entropy over its response
    tokens (every non-padding token when ``cfg.tokens == "all"``), summed over the samples
    as the reference does (module docstring). The model's weights, ``requires_grad`` flags
    and ``.grad`` attributes are as before on return, also when stopped.

    Args:
        loaded: the model (dense).
        samples: calibration samples with responses.
        cfg: token selection and batch size.
        should_stop: polled between batches (raises ``Cancelled``).

    Returns:
        ``{linear name: float32 [out, in]}`` on each weight's device.

    Raises:
        ValueError: no token is selected for the loss.
    """
    a = loaded.adapter
    n_batches = -(-len(samples) // cfg.batch_size)
    with bar(desc=_DESC, total=n_batches, unit="batch") as progress:
        sums = _gradient_pass(
            loaded,
            iter_batches(loaded, samples, cfg.batch_size),
            cfg,
            range(a.num_layers),
            progress,
            should_stop,
            names,
        )
    # sum_s |W ⊙ g_s| = |W| ⊙ sum_s |g_s|, in place (float32 times the weights' dtype)
    return {
        n: sums[n].mul_(m.weight.detach().abs()) for n, _, _, m in a.iter_linears() if n in sums
    }


def _pack(score: torch.Tensor, cfg: WandaConfig) -> PackedMask:
    mask = mask_from_scores(score, cfg)
    return PackedMask.pack(mask, mask_count(mask.shape, cfg))


def snip_masks(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
) -> Masks:
    """SNIP pruning masks, per output row (``hsr_core.wanda.mask_from_scores``).

    ``one-shot``: from ``snip_scores`` of the dense model. ``sequential`` (the reference's
    ``prune_wandg``): layer by layer, each layer's gradients taken with the layers before it
    pruned, one pass over the samples per layer. The weights are the same on return.

    Args:
        loaded: the model (dense).
        samples: the utility calibration set.
        cfg: sparsity, structure, mode, token selection and batch size.
        should_stop: polled between batches (raises ``Cancelled``).

    Returns:
        ``{linear name: PackedMask}`` (True = pruned).
    """
    if cfg.mode != "sequential":
        scores = snip_scores(loaded, samples, cfg, should_stop=should_stop)
        masks: Masks = {}
        for name in list(scores):
            masks[name] = _pack(scores.pop(name), cfg)
        return masks
    return _sequential_masks(loaded, samples, cfg, should_stop)


def _sequential_masks(
    loaded: LoadedModel, samples: Sequence[Sample], cfg: WandaConfig, should_stop: StopFlag
) -> Masks:
    a = loaded.adapter
    batches = list(iter_batches(loaded, samples, cfg.batch_size))
    masks: Masks = {}
    saved: list[tuple[torch.Tensor, PackedMask, torch.Tensor]] = []  # weight, mask, its values
    try:
        with bar(desc=_DESC, total=a.num_layers * len(batches), unit="batch") as progress:
            for layer in range(a.num_layers):
                sums = _gradient_pass(loaded, batches, cfg, [layer], progress, should_stop)
                for name, lay, _, mod in a.iter_linears():
                    if lay != layer:
                        continue
                    w = mod.weight
                    masks[name] = mask = _pack(sums.pop(name).mul_(w.detach().abs()), cfg)
                    if layer + 1 < a.num_layers:  # later layers' gradients see it pruned
                        values = w.detach()[mask.unpack(w.device)].cpu()
                        saved.append((w, mask, values))
                        apply_mask(w, mask)
    finally:
        with torch.no_grad():
            for w, mask, values in saved:
                w[mask.unpack(w.device)] = values.to(w.device)
    return masks
