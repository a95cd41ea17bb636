"""Where does the safety live? A localization ladder for one pruning (our study; not in the paper).

HSR assumes that the safety a pruned model loses sits in a few attention heads. The ladder
tests that for the current masks: each rung puts back a different set of pruned weights (or
ablates heads of the dense model) and the same prompts are answered and judged:

    dense            the original weights (all pruned weights back)
    dense_ablated    the original weights with the top-k Ships heads ablated (zero at o_proj's
                     input): does removing Ships' heads unlock harmful answers?
    pruned           nothing back
    hsr              HSR's restore set (the realignment's settings)
    random_heads     as many weights as HSR restored, drawn uniformly from the pruned weights
                     in the head slices of k random heads (one rung per seed: the chance level)
    top_heads        every pruned weight of the top-k Ships heads' slices
    attention        every pruned attention weight (= only the MLPs pruned)
    mlp              every pruned MLP weight (= only attention pruned)

A rung is data (``Rung``): masks and a restore set to install into the one ``Variants`` (no
reload, one weight copy), the variant that answers, and heads to ablate. Rungs that put back
whole slices or modules are masks with those entries cleared, so "every attention weight back"
is, bit for bit, the model with only its MLPs pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .config import EvalConfig, LocalizeConfig, RealignConfig
from .data import Sample
from .evaluate import generate, rates
from .heads import Head, top_heads
from .hooks import head_ablation
from .masks import Masks, PackedMask, pruned_total
from .models import ATTN_PROJS, LoadedModel, ModelAdapter
from .progress import StopFlag, bar, check_stop
from .realign import RestoreSet, head_slice
from .variants import Variants

LABELS = {
    "dense": "dense (original)",
    "dense_ablated": "dense, top-{k} Ships heads ablated",
    "pruned": "pruned",
    "hsr": "HSR ({count:,} weights)",
    "random_heads": "{count:,} weights in {k} random heads (seed {seed})",
    "top_heads": "every pruned weight of the top-{k} heads",
    "attention": "every pruned attention weight",
    "mlp": "every pruned MLP weight",
}


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder.

    Attributes:
        name: one of ``config.RUNGS``.
        label: what it shows, for tables and charts.
        variant: which variant answers (``original``, ``pruned`` or ``realigned``).
        masks: the masks to install (None: keep the installed ones; the dense rungs).
        restore: the restore set to install with them (``realigned`` rungs).
        restored: pruned weights this rung puts back, relative to the pruned model.
        heads: the heads the rung is about (restored into, drawn, or ablated).
        ablate: heads ablated while answering (``dense_ablated``).
        seed: the draw of a ``random_heads`` rung.
    """

    name: str
    label: str
    variant: str
    masks: Masks | None = None
    restore: RestoreSet | None = None
    restored: int = 0
    heads: tuple[Head, ...] = ()
    ablate: tuple[Head, ...] = ()
    seed: int | None = None


# ---------------------------------------------------------------------------------------------
# building the rungs


def _cleared(mask: PackedMask, blocks: Sequence[tuple[slice, slice]] | None = None) -> PackedMask:
    """``mask`` with the given ``(rows, cols)`` blocks unpruned (all of it when None)."""
    if blocks is None:
        return PackedMask.pack(torch.zeros(mask.shape, dtype=torch.bool), 0)
    dense = mask.unpack().clone()
    for rows, cols in blocks:
        dense[rows, cols] = False
    return PackedMask.pack(dense)


def _head_blocks(
    adapter: ModelAdapter, heads: Sequence[Head], shapes: dict[str, tuple[int, ...]], slicing: str
) -> dict[str, list[tuple[slice, slice]]]:
    """The attention blocks of ``heads``, per linear name."""
    blocks: dict[str, list[tuple[slice, slice]]] = {}
    for layer, h in heads:
        for proj in ATTN_PROJS:
            name = adapter.linear_name(layer, proj)
            shape = shapes[name]
            blocks.setdefault(name, []).append(head_slice(adapter, proj, h, shape, slicing))
    return blocks


def without_heads(
    loaded: LoadedModel, masks: Masks, heads: Sequence[Head], slicing: str = "head"
) -> Masks:
    """``masks`` with every pruned weight of the heads' slices put back (q/k/v/o)."""
    shapes = {n: m.shape for n, m in masks.items()}
    blocks = _head_blocks(loaded.adapter, heads, shapes, slicing)
    return {n: (_cleared(m, blocks[n]) if n in blocks else m) for n, m in masks.items()}


def without_modules(loaded: LoadedModel, masks: Masks, *, attention: bool) -> Masks:
    """``masks`` with every attention linear (``attention=True``) or every MLP linear unpruned."""
    a = loaded.adapter
    keep_attention = set(a.linear_names(attention_only=True))
    return {n: (_cleared(m) if (n in keep_attention) == attention else m) for n, m in masks.items()}


def random_head_restore(
    loaded: LoadedModel,
    masks: Masks,
    k: int,
    count: int,
    seed: int,
    cfg: RealignConfig,
) -> RestoreSet:
    """``count`` pruned weights drawn uniformly from the head slices of ``k`` random heads.

    The heads are drawn uniformly without replacement from all ``num_layers * num_heads``
    heads; then ``count`` weights without replacement from the pruned weights in the union of
    their q/k/v/o slices (``cfg.slicing``). Fewer are restored when fewer are pruned there.
    Reproducible: both draws come from one ``torch.Generator`` seeded with ``seed``.
    """
    a = loaded.adapter
    g = torch.Generator().manual_seed(seed)
    total = a.num_layers * a.num_heads
    drawn = sorted(
        Head(int(i) // a.num_heads, int(i) % a.num_heads)
        for i in torch.randperm(total, generator=g)[: min(k, total)]
    )
    shapes = {n: m.shape for n, m in masks.items()}
    blocks = _head_blocks(a, drawn, shapes, cfg.slicing)
    pools: list[tuple[str, torch.Tensor]] = []
    for name in sorted(blocks):
        inside = torch.zeros(shapes[name], dtype=torch.bool)
        for rows, cols in blocks[name]:
            inside[rows, cols] = True
        pool = torch.nonzero((inside & masks[name].unpack()).reshape(-1)).squeeze(1)
        pools.append((name, pool))
    available = sum(p.numel() for _, p in pools)
    picked = torch.randperm(available, generator=g)[: min(count, available)].sort().values
    indices: dict[str, torch.Tensor] = {}
    start = 0
    for name, pool in pools:
        mine = picked[(picked >= start) & (picked < start + pool.numel())] - start
        if mine.numel():
            indices[name] = pool[mine].sort().values
        start += pool.numel()
    per_module = {p: 0 for p in ATTN_PROJS}
    for name, idx in indices.items():
        per_module[a.parse(name)[1]] += idx.numel()
    per_head = {}
    for head in drawn:
        per_head[head] = {}
        for proj in ATTN_PROJS:
            name = a.linear_name(head.layer, proj)
            rows, cols = head_slice(a, proj, head.head, shapes[name], cfg.slicing)
            idx = indices.get(name, torch.empty(0, dtype=torch.long))
            r, c = idx // shapes[name][1], idx % shapes[name][1]
            inside = (r >= (rows.start or 0)) & (r < (rows.stop or shapes[name][0]))
            inside &= (c >= (cols.start or 0)) & (c < (cols.stop or shapes[name][1]))
            per_head[head][proj] = int(inside.sum())
    return RestoreSet(
        indices=indices,
        heads=list(drawn),
        per_head=per_head,
        count=sum(v.numel() for v in indices.values()),
        pruned_total=pruned_total(masks),
        candidates=available,
        config=cfg,
        per_module=per_module,
    )


def plan(
    loaded: LoadedModel,
    masks: Masks,
    scores: torch.Tensor,
    hsr: RestoreSet | None,
    cfg: LocalizeConfig,
    realign: RealignConfig | None = None,
) -> list[Rung]:
    """The ladder's rungs for these masks, Ships scores and HSR restore set.

    Args:
        loaded: the model.
        masks: the pruning masks.
        scores: Ships scores ``[num_layers, num_heads]``.
        hsr: HSR's restore set for ``masks`` (None: no ``hsr`` rung, and the random-head
            control restores as many weights as the top-k heads' slices hold at most).
        cfg: which rungs, k, seeds.
        realign: the realignment settings (slicing, top_h); default: ``hsr``'s, else defaults.
    """
    a = loaded.adapter
    realign = realign or (hsr.config if hsr is not None else RealignConfig())
    k = min(cfg.top_k or realign.top_h, a.num_layers * a.num_heads)
    top = tuple(top_heads(scores, k))
    total = pruned_total(masks)
    rungs: list[Rung] = []

    def add(name: str, variant: str, new_masks: Masks | None = None, **kw: Any) -> None:
        if name not in cfg.rungs:
            return
        restored = kw.pop("restored", None)
        if restored is None:
            restored = total - pruned_total(new_masks) if new_masks is not None else 0
        fields = {"k": k, "count": kw.get("count", restored), "seed": kw.get("seed")}
        kw.pop("count", None)
        label = LABELS[name].format(**fields)
        rungs.append(Rung(name, label, variant, new_masks, restored=restored, **kw))

    for name in cfg.rungs:  # in the order asked for
        if name == "dense":
            add("dense", "original", restored=total)
        elif name == "dense_ablated":
            add("dense_ablated", "original", restored=total, heads=top, ablate=top)
        elif name == "pruned":
            add("pruned", "pruned", masks)
        elif name == "hsr" and hsr is not None:
            add("hsr", "realigned", masks, restore=hsr, restored=hsr.count, heads=tuple(hsr.heads))
        elif name == "random_heads":
            count = hsr.count if hsr is not None else total
            for i in range(cfg.seeds):
                rs = random_head_restore(loaded, masks, k, count, cfg.seed + i, realign)
                add(
                    "random_heads",
                    "realigned",
                    masks,
                    restore=rs,
                    restored=rs.count,
                    count=rs.count,
                    heads=tuple(rs.heads),
                    seed=cfg.seed + i,
                )
        elif name == "top_heads":
            add(
                "top_heads", "pruned", without_heads(loaded, masks, top, realign.slicing), heads=top
            )
        elif name == "attention":
            add("attention", "pruned", without_modules(loaded, masks, attention=True))
        elif name == "mlp":
            add("mlp", "pruned", without_modules(loaded, masks, attention=False))
    return rungs


# ---------------------------------------------------------------------------------------------
# running them


Judge = Callable[[Sequence[Sample], Sequence[str]], list[dict[str, Any]]]
"""Answers -> one record per prompt with at least ``harmful`` and ``refusal``."""


def run(
    variants: Variants,
    rungs: Sequence[Rung],
    samples: Sequence[Sample],
    cfg: EvalConfig,
    judge: Judge,
    *,
    should_stop: StopFlag = None,
    on_rung: Callable[[int, Rung], None] | None = None,
) -> list[dict[str, Any]]:
    """Answer ``samples`` on every rung and judge the answers.

    The installed masks and restore set are put back afterwards, also after an exception or
    a stop.

    Returns:
        Per rung: ``name``, ``label``, ``variant``, ``seed``, ``heads``, ``restored``,
        ``restored_per_10k_pruned``, the rates of ``evaluate.rates`` (with their Wilson 95%
        intervals in ``ci95``; ``asr_ci`` and ``refusal_rate_benign_ci`` repeat the two the
        ladder is read by) and the judged answers (refused / complied / incoherent).
    """
    before = (variants.masks, variants.restore, variants.updated)
    pruned = pruned_total(before[0]) if before[0] else 0
    out = []
    try:
        for i, rung in enumerate(bar(rungs, desc="Localization ladder", unit="rung")):
            check_stop(should_stop)
            if on_rung:
                on_rung(i, rung)
            if rung.masks is not None:
                # a pruner's updated weights stay; a weight a rung puts back is dense
                variants.install(rung.masks, rung.restore, before[2])
            ablated = head_ablation(variants.loaded.adapter, rung.ablate) if rung.ablate else None
            with variants.use(rung.variant) as loaded, ablated or nullcontext():
                answers = generate(loaded, samples, cfg, should_stop=should_stop, desc=rung.label)
            rows = judge(samples, answers)
            measured = rates(rows)
            out.append(
                {
                    "name": rung.name,
                    "label": rung.label,
                    "variant": rung.variant,
                    "seed": rung.seed,
                    "heads": [h.label for h in rung.heads],
                    "restored": rung.restored,
                    "restored_per_10k_pruned": 1e4 * rung.restored / pruned if pruned else 0.0,
                    **measured,
                    "asr_ci": measured["ci95"]["asr"],
                    "refusal_rate_benign_ci": measured["ci95"]["refusal_rate_benign"],
                    "answers": rows,
                }
            )
    finally:
        variants.install(*before)
    return out
