"""HSR: restore safety neurons inside safety heads (docs/METHOD.md; Li et al., ACL 2025 Findings).

For one linear layer, ``T_x(A)`` is the set of the top ``floor(x * numel)`` entries of ``A``
ranked over the whole matrix (ties: the lower flat index ranks higher). The restore candidates
are

    R(p, q, max_p) = (T_q(S) & T_max_p(U)) - T_p(U)

with ``S`` and ``U`` the safety and utility Wanda scores of the dense weights. For each selected
head ``(l, h)`` (the ``top_h`` heads by Ships) a weight of layer ``l``'s attention projections is
restored when it is in R, in the head's slice, and pruned by the mask:

    projection | head (default)                        | reference (released code)
    q_proj     | rows [h*d_h, (h+1)*d_h)               | input columns [h*d_h, (h+1)*d_h)
    k/v_proj   | rows of KV group g = h // (H/K)       | input columns of that group
    o_proj     | columns [h*d_h, (h+1)*d_h)            | all of R

MLP weights are never restored by the paper's method (``scope="heads"``). Our extension
``scope="heads+mlp"`` (not in the paper) also restores, in the MLP projections of each layer
that holds a selected head, the pruned weights in the same band R(p, q, max_p) ranked over the
whole MLP matrix; its accounting is per layer and module. Ranks depend only on the dense
weights and the norms, so
``RankCache`` keeps them across slider moves: a new (p, q, max_p, top_h) costs a few
element-wise comparisons.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import RealignConfig
from .heads import Head, top_heads
from .masks import Masks, PackedMask, pruned_total
from .models import ATTN_PROJS, LoadedModel, ModelAdapter
from .wanda import wanda_score


def descending_ranks(score: torch.Tensor) -> torch.Tensor:
    """Rank of every entry over the whole matrix, 0 = highest (ties: lower flat index first).

    Returns:
        int32 tensor of ``score``'s shape.
    """
    flat = score.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    ranks = torch.empty_like(order, dtype=torch.int32)
    ranks[order] = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
    return ranks.view(score.shape)


def top_fraction(ranks: torch.Tensor, fraction: float) -> torch.Tensor:
    """Membership in ``T_fraction``: the top ``floor(fraction * numel)`` entries."""
    return ranks < int(fraction * ranks.numel())


def candidates(
    rank_s: torch.Tensor,
    rank_u: torch.Tensor,
    p: float,
    q: float,
    max_p: float,
    numel: int | None = None,
) -> torch.Tensor:
    """``R(p, q, max_p) = (T_q(S) & T_max_p(U)) - T_p(U)`` as a bool tensor.

    ``numel`` is the size of the matrix the ranks were taken over, when ``rank_s``/``rank_u``
    hold only part of it (e.g. one head's slice).
    """
    n = rank_s.numel() if numel is None else numel
    return (rank_s < int(q * n)) & (rank_u < int(max_p * n)) & (rank_u >= int(p * n))


def head_slice(
    adapter: ModelAdapter, proj: str, head: int, shape: tuple[int, int], slicing: str = "head"
) -> tuple[slice, slice]:
    """The (rows, cols) block of ``proj``'s weight that belongs to ``head``.

    Args:
        adapter: gives ``head_dim`` and the GQA group size.
        proj: ``q_proj``, ``k_proj``, ``v_proj`` or ``o_proj``.
        head: query head index.
        shape: the weight's ``(out, in)``.
        slicing: ``head`` or ``reference`` (see the module docstring).
    """
    d_h = adapter.head_dim
    g = head // adapter.group_size
    idx = head if proj in ("q_proj", "o_proj") else g
    block = slice(idx * d_h, (idx + 1) * d_h)
    everything = slice(0, None)
    if slicing == "head":
        return (everything, block) if proj == "o_proj" else (block, everything)
    if proj == "o_proj":
        return everything, everything
    return everything, block


@dataclass
class RestoreSet:
    """Which pruned weights go back, and the accounting.

    Attributes:
        indices: ``{linear name: long [n]}`` flat indices into the weight.
        heads: the selected heads, best first.
        per_head: ``{Head: {proj: count}}``: restored weights in each head's slice (a weight in
            the slices of two heads, e.g. a shared KV group, counts for both).
        count: total restored weights (each once).
        pruned_total: weights pruned by the mask (all decoder linears).
        candidates: size of R within the selected heads' slices, pruned or not.
        config: the realignment settings.
        per_module: restored weights per projection (MLP ones only with ``heads+mlp``).
        mlp_per_layer: ``{layer: {proj: count}}`` restored in MLPs (``heads+mlp`` only).
        mlp_candidates: size of R in those MLP projections, pruned or not.
    """

    indices: dict[str, torch.Tensor]
    heads: list[Head]
    per_head: dict[Head, dict[str, int]]
    count: int
    pruned_total: int
    candidates: int
    config: RealignConfig
    per_module: dict[str, int] = field(default_factory=dict)
    mlp_per_layer: dict[int, dict[str, int]] = field(default_factory=dict)
    mlp_candidates: int = 0

    @property
    def per_10k_pruned(self) -> float:
        """Restored weights per ten thousand pruned weights (the paper's ‱)."""
        return 1e4 * self.count / self.pruned_total if self.pruned_total else 0.0

    def restored_in(self, head: Head) -> int:
        """Restored weights in one selected head's slices (0 for a head not selected)."""
        return sum(self.per_head.get(head, {}).values())

    def summary(self) -> dict[str, Any]:
        """The accounting as JSON (heads written ``"l-h"``), as ``summary.json`` has it."""
        out = {
            "selected_heads": [h.label for h in self.heads],
            "restored": self.count,
            "restored_per_10k_pruned": self.per_10k_pruned,
            "restore_candidates_in_heads": self.candidates,
            "restored_per_head": {h.label: dict(c) for h, c in self.per_head.items()},
            "restored_per_module": self.per_module,
        }
        if self.config.scope != "heads":
            out.update(
                restore_scope=f"{self.config.scope} (our extension; the paper restores "
                "attention heads only)",
                restored_mlp_per_layer={str(k): dict(v) for k, v in self.mlp_per_layer.items()},
                restore_candidates_in_mlp=self.mlp_candidates,
            )
        return out


KEEP_MASKS_MAX_WEIGHTS = 64_000_000
"""Models with at most this many attention weights (SmolLM2-135M: 26.5 M) keep the unpacked
masks of the attention projections between calls (1 byte a weight), so a new realignment
setting does not unpack them again."""


class RankCache:
    """Safety and utility ranks of the attention projections, computed once per linear.

    Args:
        loaded: the model.
        safety_norms, utility_norms: ``wanda_norms`` of the two sets.
        weight_of: returns the *dense* weight of a linear by name (default: the module's
            current weight, which must then be dense).
        device: where ranks are computed and kept (default: the weight's device); the CPU
            keeps GPU memory free for generation.
        keep_masks: keep unpacked masks between calls (default: for models with at most
            ``KEEP_MASKS_MAX_WEIGHTS`` attention weights).
        scores: ``{linear name: (safety scores, utility scores)}`` float ``[out, in]`` to rank
            by instead of the Wanda scores (SNIP's: ``RealignConfig.ranking``); a linear not in
            it is ranked by its Wanda scores.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        safety_norms: dict[str, torch.Tensor],
        utility_norms: dict[str, torch.Tensor],
        weight_of: Callable[[str], torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
        keep_masks: bool | None = None,
        scores: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.loaded = loaded
        self.scores = scores or {}
        self.safety_norms = safety_norms
        self.utility_norms = utility_norms
        self.weight_of = weight_of or (lambda name: loaded.model.get_submodule(name).weight)
        self.device = device
        if keep_masks is None:
            attn = sum(
                m.weight.numel() for *_, m in loaded.adapter.iter_linears(attention_only=True)
            )
            keep_masks = attn <= KEEP_MASKS_MAX_WEIGHTS
        self.keep_masks = keep_masks
        self._ranks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[str, tuple[PackedMask, torch.Tensor]] = {}

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(safety ranks, utility ranks)`` of a linear, int32 ``[out, in]``."""
        if name not in self._ranks and name in self.scores:
            safety, utility = self.scores[name]
            if self.device is not None:
                safety, utility = safety.to(self.device), utility.to(self.device)
            self._ranks[name] = (descending_ranks(safety), descending_ranks(utility))
        if name not in self._ranks:
            w = self.weight_of(name)
            if self.device is not None:
                w = w.to(self.device)
            self._ranks[name] = (
                descending_ranks(wanda_score(w, self.safety_norms[name])),
                descending_ranks(wanda_score(w, self.utility_norms[name])),
            )
        return self._ranks[name]

    def pruned(self, name: str, mask: PackedMask) -> torch.Tensor:
        """``mask`` unpacked on the ranks' device (kept while the same mask comes back)."""
        hit = self._masks.get(name)
        if hit is not None and hit[0] is mask:
            return hit[1]
        unpacked = mask.unpack(self.get(name)[0].device)
        if self.keep_masks:
            self._masks[name] = (mask, unpacked)
        return unpacked


def restore_set(
    loaded: LoadedModel,
    masks: Masks,
    scores: torch.Tensor,
    cfg: RealignConfig,
    ranks: RankCache,
    *,
    heads: Sequence[Head | tuple[int, int]] | None = None,
) -> RestoreSet:
    """The HSR restore set for the ``top_h`` heads by Ships score.

    Args:
        loaded: the model.
        masks: the pruning masks (True = pruned).
        scores: Ships scores ``[num_layers, num_heads]``.
        cfg: p, q, max_p, top_h and slicing.
        ranks: the rank cache over the dense weights and both norm sets.
        heads: use these heads instead of the top ``top_h`` by score.

    Returns:
        The restore set with its accounting.
    """
    a = loaded.adapter
    cfg.check_heads(a.num_layers, a.num_heads)
    chosen = [Head(*h) for h in heads] if heads is not None else top_heads(scores, cfg.top_h)
    by_layer: dict[int, list[int]] = {}
    for l, h in chosen:
        by_layer.setdefault(l, []).append(h)
    indices: dict[str, torch.Tensor] = {}
    per_head = {h: {p: 0 for p in ATTN_PROJS} for h in chosen}
    with_mlp = cfg.scope == "heads+mlp"
    per_module = {p: 0 for p in ATTN_PROJS + (a.mlp_projs if with_mlp else ())}
    mlp_per_layer: dict[int, dict[str, int]] = {}
    n_candidates = n_mlp_candidates = 0
    for layer, layer_heads in sorted(by_layer.items()):
        for proj in ATTN_PROJS:
            name = a.linear_name(layer, proj)
            rank_s, rank_u = ranks.get(name)
            pruned = ranks.pruned(name, masks[name])
            n_in, numel = rank_s.shape[1], rank_s.numel()
            # a head's block of a projection; heads sharing a KV group share their k/v block,
            # and distinct blocks never overlap, so the union is the disjoint union of blocks
            blocks: dict[tuple[int | None, ...], list[int]] = {}
            for h in layer_heads:
                rows, cols = head_slice(a, proj, h, tuple(rank_s.shape), cfg.slicing)
                blocks.setdefault((rows.start, rows.stop, cols.start, cols.stop), []).append(h)
            found = []
            for (r0, r1, c0, c1), owners in blocks.items():
                rows, cols = slice(r0, r1), slice(c0, c1)
                r = candidates(
                    rank_s[rows, cols], rank_u[rows, cols], cfg.p, cfg.q, cfg.max_p, numel=numel
                )
                restored = r & pruned[rows, cols]
                n_candidates += int(r.sum())
                count = int(restored.sum())
                for h in owners:
                    per_head[Head(layer, h)][proj] = count
                local = torch.nonzero(restored)  # [n, 2] block coordinates
                found.append((local[:, 0] + (r0 or 0)) * n_in + local[:, 1] + (c0 or 0))
            idx = torch.cat(found).sort().values if found else torch.empty(0, dtype=torch.long)
            if idx.numel():
                indices[name] = idx
                per_module[proj] += idx.numel()
        if with_mlp:  # our extension: the same band, over each whole MLP matrix of the layer
            mlp_per_layer[layer] = {}
            for proj in a.mlp_projs:
                name = a.linear_name(layer, proj)
                rank_s, rank_u = ranks.get(name)
                r = candidates(rank_s, rank_u, cfg.p, cfg.q, cfg.max_p)
                restored = (r & ranks.pruned(name, masks[name])).reshape(-1)
                n_mlp_candidates += int(r.sum())
                idx = torch.nonzero(restored).squeeze(1)
                mlp_per_layer[layer][proj] = idx.numel()
                if idx.numel():
                    indices[name] = idx
                    per_module[proj] += idx.numel()
    return RestoreSet(
        indices=indices,
        heads=chosen,
        per_head=per_head,
        count=sum(v.numel() for v in indices.values()),
        pruned_total=pruned_total(masks),
        candidates=n_candidates,
        config=cfg,
        per_module=per_module,
        mlp_per_layer=mlp_per_layer,
        mlp_candidates=n_mlp_candidates,
    )


def head_rank_points(
    loaded: LoadedModel,
    masks: Masks,
    ranks: RankCache,
    head: Head | tuple[int, int],
    cfg: RealignConfig,
    *,
    max_points: int = 20000,
    seed: int = 0,
) -> dict[str, Any]:
    """Safety and utility ranks (as top fractions) of one head's weights, for plotting.

    Returns:
        ``{"safety": float[n], "utility": float[n], "pruned": bool[n], "restored": bool[n],
        "candidate": bool[n], "proj": int8[n] (index into ``ATTN_PROJS``), "total": int}`` with
        at most ``max_points``
        weights drawn at random (reproducibly) from the head's slices of all four projections.
    """
    a = loaded.adapter
    layer, h = head
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("safety", "utility", "pruned", "candidate", "proj")
    }
    for proj in ATTN_PROJS:
        name = a.linear_name(layer, proj)
        rank_s, rank_u = ranks.get(name)
        rows, cols = head_slice(a, proj, h, tuple(rank_s.shape), cfg.slicing)
        n = rank_s.numel()
        rs, ru = rank_s[rows, cols].reshape(-1), rank_u[rows, cols].reshape(-1)
        parts["safety"].append(rs.double() / n)
        parts["utility"].append(ru.double() / n)
        parts["pruned"].append(ranks.pruned(name, masks[name])[rows, cols].reshape(-1))
        parts["candidate"].append(candidates(rs, ru, cfg.p, cfg.q, cfg.max_p, numel=n))
        parts["proj"].append(torch.full((rs.numel(),), ATTN_PROJS.index(proj), dtype=torch.int8))
    out = {k: torch.cat(v) for k, v in parts.items()}
    total = out["safety"].numel()
    keep = torch.arange(total)
    if total > max_points:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(total, generator=g)[:max_points].sort().values
    res = {k: v[keep].cpu() for k, v in out.items()}
    res["restored"] = res["candidate"] & res["pruned"]
    res["total"] = total
    return res
