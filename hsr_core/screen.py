"""Ships screening (our extension, not in the paper): every head scored by one backward pass.

Attribution patching (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms
Automated Circuit Discovery") applied to Ships (docs/METHOD.md, "Ships screening"). Ablating
head ``(l, h)`` changes its slice ``z`` of ``o_proj``'s input by ``delta = z_abl - z`` (``-z``
for ``zero``, the causal running mean of its values minus ``z`` for ``uniform``; on a
cross-attention layer, the mean of its values over the vision tokens each query may see,
as ``hooks.add_head_ablation`` does). To first
order the final-norm state at the last position ``f`` moves by ``J delta`` and, for any
direction ``c``, ``c . J delta = <d(c . f)/dz, delta>``: one backward pass of ``c . f`` gives
that number for every head at once.

Both Ships metrics are at their minimum on the intact model, so their own gradient is 0. The
surrogates are linear (angle) or quadratic (KL) in ``J delta``:

- **angle** (dataset-level): with ``M = U S V^T`` the intact states, the first-order change of
  the leading left singular vectors under ``M + E`` has components
  ``(s_j (u_k . E v_j) + s_k (u_j . E v_k)) / (s_j^2 - s_k^2)`` on ``u_k`` (k > r). Screening
  keeps the first term, whose input ``E v_j`` (row ``i``: ``v_j . J_i delta``) is one backward
  pass per prompt and direction ``j <= r_main``; the second is smaller by ``s_k / s_j`` and
  left out. The largest principal angle is the spectral norm of that ``(N - r) x r`` block,
  reported as ``degrees(atan(.))``.
- **kl** (per prompt): ``KL(p || p_A) ~ 1/2 dl^T (diag p - p p^T) dl`` with ``dl = W J delta``
  the change of the logits. ``W^T (diag p - p p^T) W = B^T B`` with rows
  ``sqrt(p_t) (W_t - p^T W)`` over the ``top_tokens`` likeliest tokens; its ``directions``
  leading eigenvectors ``q`` (eigenvalues ``lam``) give ``1/2 sum lam (q . J delta)^2``, one
  backward pass per direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ShipsConfig
from .data import Sample
from .encoding import encode_one
from .heads import top_heads
from .hooks import HookSet, causal_running_mean, uniform_cross_mean
from .models import LoadedModel, ModelAdapter
from .progress import StopFlag, bar, check_stop
from .ships import ships_scores


class _StopAtFinalNorm(Exception):
    pass


def cross_layers(adapter: ModelAdapter) -> set[int]:
    """The cross-attention layers (Mllama's), which a prompt without an image skips."""
    return {i for i, kind in enumerate(adapter.layer_kinds()) if kind == "cross"}


@dataclass
class TrackedPass:
    """One forward pass of a prompt with every head's ablation direction tracked for autograd.

    Attributes:
        final: the final-norm state at the last position ``[hidden]``, part of the graph.
        leaves: per layer, a zero tensor ``[1, seq, H * d_h]`` added to ``o_proj``'s input; the
            gradient of anything with respect to it is the gradient with respect to that input.
            None for a layer that did not run (a skipped cross-attention layer).
        deltas: per layer, ``z_ablated - z`` ``[seq, H, d_h]`` (detached, float32), or None.
    """

    final: torch.Tensor
    leaves: list[torch.Tensor | None]
    deltas: list[torch.Tensor | None]


def tracked_pass(loaded: LoadedModel, inputs: dict[str, torch.Tensor], mode: str) -> TrackedPass:
    """Run one prompt intact with gradients on, recording each head's ablation direction.

    Args:
        loaded: the model.
        inputs: one encoded prompt (batch 1), on the model's device.
        mode: ``zero`` or ``uniform`` ablation.
    """
    if mode not in ("zero", "uniform"):
        raise ValueError(f"unknown ablation mode {mode!r}")
    a = loaded.adapter
    H, d_h, group = a.num_heads, a.head_dim, a.group_size
    cross = cross_layers(a)
    kv_of = torch.arange(H) // group  # each query head's KV head
    leaves: list[torch.Tensor | None] = [None] * a.num_layers
    deltas: list[torch.Tensor | None] = [None] * a.num_layers
    values: dict[int, torch.Tensor] = {}
    masks: dict[int, torch.Tensor | None] = {}
    out: dict[str, torch.Tensor] = {}

    def grab_mask(layer: int):
        def fn(_mod: nn.Module, _args: Any, kw: dict[str, Any]) -> None:
            masks[layer] = kw.get("attention_mask")

        return fn

    def grab_values(layer: int):
        def fn(_mod: nn.Module, _inp: Any, v: torch.Tensor) -> None:
            values[layer] = v.detach()

        return fn

    def track(layer: int):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]
            if x.shape[0] != 1:
                raise RuntimeError(
                    f"screening runs one prompt at a time, got a batch of {x.shape[0]}"
                )
            seq = x.shape[1]
            z = x.detach().float().view(seq, H, d_h)  # [seq, heads, head_dim]
            if mode == "zero":
                deltas[layer] = -z
            elif layer in cross:  # uniform over the vision tokens each query may see
                v = values.pop(layer).float().reshape(-1, a.num_kv_heads, d_h)  # [vision, K, d_h]
                per_head = v[:, kv_of].transpose(0, 1)  # [heads, vision, head_dim]
                rows = torch.zeros(H, dtype=torch.long)  # one prompt: every head reads its mask
                mean = uniform_cross_mean(per_head, masks.pop(layer, None), rows, seq)
                deltas[layer] = mean.transpose(0, 1) - z  # [seq, heads, head_dim]
            else:
                v = values.pop(layer).float().view(1, seq, -1, d_h)  # [1, seq, kv_heads, head_dim]
                mean = causal_running_mean(v)[0]  # [seq, kv_heads, head_dim]
                deltas[layer] = mean[:, kv_of] - z
            leaf = torch.zeros_like(x, requires_grad=True)
            leaves[layer] = leaf
            return (x + leaf, *args[1:])

        return fn

    def stop(_mod: nn.Module, _inp: Any, x: torch.Tensor) -> None:
        out["final"] = x
        raise _StopAtFinalNorm

    with HookSet() as hooks, torch.enable_grad():
        for layer in range(a.num_layers):
            attn = a.attention(layer)
            if mode == "uniform":
                hooks.post(attn.v_proj, grab_values(layer))
                if layer in cross:
                    hooks.pre(attn, grab_mask(layer), with_kwargs=True)
            hooks.pre(attn.o_proj, track(layer))
        hooks.post(a.final_norm, stop)
        with suppress(_StopAtFinalNorm):
            loaded.model(**inputs, use_cache=False)
    skipped = {i for i, t in enumerate(leaves) if t is None}
    if "final" not in out or not skipped <= cross:
        raise RuntimeError("the tracked forward pass did not run every decoder layer")
    return TrackedPass(out["final"][0, -1], leaves, deltas)


def directional_effects(tracked: TrackedPass, directions: torch.Tensor) -> torch.Tensor:
    """First-order change of ``c . f`` when each head is ablated, for each direction ``c``.

    Args:
        tracked: a ``tracked_pass``.
        directions: ``[k, hidden]``; one backward pass each.

    Returns:
        ``[k, num_layers, num_heads]`` float64: ``<d(c . f)/dz_h, delta_h>``.
    """
    k = directions.shape[0]
    ran = [i for i, leaf in enumerate(tracked.leaves) if leaf is not None]
    leaves = [tracked.leaves[i] for i in ran]
    H = tracked.deltas[ran[0]].shape[1]
    out = torch.zeros(k, len(tracked.leaves), H, dtype=torch.float64)  # a skipped layer: 0
    c_all = directions.to(device=tracked.final.device, dtype=tracked.final.dtype)
    for j in range(k):
        grads = torch.autograd.grad(tracked.final @ c_all[j], leaves, retain_graph=j < k - 1)
        for i, g in zip(ran, grads, strict=True):
            d = tracked.deltas[i]
            g = g[0].float().view(d.shape)  # [seq, heads, head_dim]
            out[j, i] = (g * d).sum(dim=(0, 2)).double().cpu()  # [heads]
    return out


def intact_final(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final-norm state at the last position of the intact model ``[hidden]`` (one forward
    pass that stops at the final norm)."""
    out: dict[str, torch.Tensor] = {}

    def stop(_mod: nn.Module, _inp: Any, x: torch.Tensor) -> None:
        out["final"] = x[0, -1].detach()
        raise _StopAtFinalNorm

    with HookSet() as hooks, torch.inference_mode():
        hooks.post(loaded.adapter.final_norm, stop)
        with suppress(_StopAtFinalNorm):
            loaded.model(**inputs, use_cache=False)
    return out["final"]


def angle_estimate(M: torch.Tensor, T: torch.Tensor, r_main: int = 1) -> torch.Tensor:
    """First-order Ships angle from the directional effects ``T``.

    Args:
        M: ``[N, d]`` intact states.
        T: ``[r_main, N, heads]``: ``T[j, i, h] = v_j . (change of row i)`` with ``v_j`` the
            ``j``-th right singular vector of ``M``.
        r_main: leading directions summed over.

    Returns:
        ``[heads]`` float64 degrees: for each ``r``, ``atan`` of the spectral norm of the
        block ``C[k, j] = s_j (u_k . T_j) / (s_j^2 - s_k^2)``, ``k > r >= j``, summed over ``r``.
    """
    M = M.double()
    N = M.shape[0]
    U, S, _ = torch.linalg.svd(M, full_matrices=True)  # U [N, N]; S [min(N, d)]
    s = torch.zeros(N, dtype=torch.float64)
    s[: S.shape[0]] = S
    proj = torch.einsum("nk,jnh->hkj", U, T.double())  # [heads, N, r_main]: u_k . T_j
    total = torch.zeros(T.shape[2], dtype=torch.float64)
    for r in range(1, r_main + 1):
        sj = s[:r]  # [r]
        sk = s[r:]  # [N - r]
        gap = sj[None, :] ** 2 - sk[:, None] ** 2  # [N - r, r]
        C = proj[:, r:, :r] * sj[None, None, :] / gap  # [heads, N - r, r]
        total += torch.rad2deg(torch.atan(torch.linalg.matrix_norm(C, ord=2)))
    return total


def fisher_directions(
    loaded: LoadedModel, final: torch.Tensor, *, top_tokens: int = 256, directions: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading eigenpairs of ``W^T (diag p - p p^T) W`` at one prompt's last position.

    Args:
        loaded: the model (its LM head's weight is ``W``).
        final: the final-norm state ``[hidden]``.
        top_tokens: tokens kept (the likeliest); the rest of the vocabulary carries little
            probability and is left out of the matrix (not out of ``p^T W``).
        directions: eigenpairs returned.

    Returns:
        ``(lam [k], q [k, hidden])`` float64, ``k = min(directions, top_tokens, hidden)``.
    """
    W = loaded.adapter.lm_head.weight.detach()
    with torch.no_grad():  # not inference mode: the directions enter a backward pass
        logits = loaded.adapter.lm_head(final.detach()[None])[0].double()  # [vocab]
        p = torch.softmax(logits, dim=-1)
        mean_row = (p.to(W.dtype) @ W).double()  # [hidden]: p^T W
        k = min(top_tokens, p.shape[0])
        pt, idx = p.topk(k)
        B = pt.sqrt()[:, None] * (W[idx].double() - mean_row)  # [k, hidden]
        _, sv, Vh = torch.linalg.svd(B, full_matrices=False)
    n = min(directions, sv.shape[0])
    return (sv[:n] ** 2).cpu(), Vh[:n].cpu()


def screen_scores(
    loaded: LoadedModel,
    prompts: Sequence[Sample],
    cfg: ShipsConfig,
    *,
    kl_directions: int = 1,
    top_tokens: int = 256,
    should_stop: StopFlag = None,
) -> torch.Tensor:
    """Screening estimate of every head's Ships score (our extension; module docstring).

    Args:
        loaded: the model.
        prompts: the harmful probe prompts (responses ignored).
        cfg: metric, ablation mode and r_main (as for exact Ships).
        kl_directions: eigen-directions of the Fisher matrix per prompt (``kl``): one backward
            pass each.
        top_tokens: tokens kept in the Fisher matrix (``kl``).
        should_stop: polled between prompts.

    Returns:
        ``[num_layers, num_heads]`` float32 estimates in the exact metric's units (degrees for
        ``angle``, nats for ``kl``).
    """
    a = loaded.adapter
    if cfg.metric == "angle" and len(prompts) < max(2, cfg.r_main):
        raise ValueError(
            f"dataset-level Ships needs at least {max(2, cfg.r_main)} probe prompts "
            f"(got {len(prompts)}): with one prompt every angle is 0"
        )
    device = loaded.device
    encoded = []
    for sample in prompts:
        inputs, _, _ = encode_one(loaded, sample, with_response=False)
        encoded.append({k: v.to(device) for k, v in inputs.items()})
    L, H = a.num_layers, a.num_heads
    if cfg.metric == "angle":
        # the intact states first: the backward directions are their right singular vectors
        finals = []
        for inputs in bar(encoded, desc="Ships screening: intact", unit="prompt"):
            check_stop(should_stop)
            finals.append(intact_final(loaded, inputs).double().cpu())
        M = torch.stack(finals)  # [N, hidden]
        V = torch.linalg.svd(M, full_matrices=False).Vh[: cfg.r_main]  # [r_main, hidden]
        T = torch.empty(cfg.r_main, len(encoded), L * H, dtype=torch.float64)
        for i, inputs in enumerate(bar(encoded, desc="Ships screening", unit="prompt")):
            check_stop(should_stop)
            tracked = tracked_pass(loaded, inputs, cfg.ablation)
            T[:, i] = directional_effects(tracked, V).view(cfg.r_main, L * H)
        values = angle_estimate(M, T, cfg.r_main)
    else:
        values = torch.zeros(L * H, dtype=torch.float64)
        for inputs in bar(encoded, desc="Ships screening", unit="prompt"):
            check_stop(should_stop)
            tracked = tracked_pass(loaded, inputs, cfg.ablation)
            lam, q = fisher_directions(
                loaded, tracked.final, top_tokens=top_tokens, directions=kl_directions
            )
            t = directional_effects(tracked, q).view(len(lam), L * H)  # [k, heads]
            values += 0.5 * (lam[:, None] * t**2).sum(0)
        values /= len(encoded)
    if not torch.isfinite(values).all():
        raise RuntimeError("screening produced non-finite scores (degenerate singular values?)")
    return values.float().view(L, H)


@dataclass
class ScreenResult:
    """Screening mode's result (our extension): exact Ships on the best candidates only.

    Attributes:
        scores: ``[num_layers, num_heads]`` float32, the table every ranking reads: exact
            Ships scores for the re-scored heads; for the others their screening estimate
            times ``scale``, which puts every one of them below the lowest exact score.
        exact: ``[num_layers, num_heads]`` bool, True where ``scores`` is an exact score.
        screening: ``[num_layers, num_heads]`` float32, the raw screening estimates.
        scale: the factor applied to the screening estimates of the heads not re-scored
            (1 when they already ranked below every exact score).
    """

    scores: torch.Tensor
    exact: torch.Tensor
    screening: torch.Tensor
    scale: float


def merge_ranking(screening: torch.Tensor, exact_scores: torch.Tensor) -> ScreenResult:
    """Combine screening estimates with exact scores of some heads (NaN elsewhere).

    The heads with an exact score rank first, by it; the others follow in screening order,
    their estimates scaled by one factor ``f <= 1`` so the largest lands just below the
    smallest exact score (when that is not positive, they are shifted below it instead).

    Args:
        screening: ``[L, H]`` screening estimates.
        exact_scores: ``[L, H]`` exact Ships scores, NaN for the heads not re-scored.
    """
    exact = torch.isfinite(exact_scores)
    if not exact.any():
        raise ValueError("no head has an exact score")
    scores = screening.double().clone()
    scores[exact] = exact_scores.double()[exact]
    scale = 1.0
    others = ~exact
    if not others.any():
        return ScreenResult(scores.float(), exact, screening.float(), scale)
    low = float(scores[exact].min())
    high = float(scores[others].max())
    if high >= low:
        if low > 0:
            scale = low / high
            scores[others] *= scale
        else:
            scores[others] -= high - low
    out = scores.float()
    # strictly below the lowest exact score, also after rounding to float32
    below = torch.nextafter(out[exact].min(), torch.tensor(-math.inf))
    out[others] = out[others].clamp(max=float(below))
    return ScreenResult(out, exact, screening.float(), scale)


def screen_then_exact(
    loaded: LoadedModel,
    prompts: Sequence[Sample],
    cfg: ShipsConfig,
    *,
    top_h: int,
    should_stop: StopFlag = None,
) -> ScreenResult:
    """Screening mode (our extension): screen every head, then exact Ships on the
    ``cfg.candidates x top_h`` best by the screen (all heads when that is every head).

    Args:
        loaded: the model.
        prompts: the harmful probe prompts.
        cfg: the Ships config (``candidates`` is ``c``).
        top_h: the number of heads HSR keeps (``RealignConfig.top_h``).
        should_stop: polled between prompts and batches.
    """
    a = loaded.adapter
    total = a.num_layers * a.num_heads
    if not 1 <= top_h <= total:
        raise ValueError(f"top_h must be in 1..{total}, got {top_h}")
    screening = screen_scores(loaded, prompts, cfg, should_stop=should_stop)
    n = min(total, cfg.candidates * top_h)
    picked = [tuple(h) for h in top_heads(screening, n)]
    exact_scores = ships_scores(loaded, prompts, cfg, heads=picked, should_stop=should_stop)
    return merge_ranking(screening, exact_scores)
