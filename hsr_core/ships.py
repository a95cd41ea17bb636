"""Ships: which attention heads matter for safety (docs/METHOD.md, "Ships"; Zhou et al., arXiv 2410.13708).

For N harmful probe prompts, ``M`` (N x d) stacks the final-norm hidden state at each prompt's
last position for the intact model, and ``M_A(l, h)`` the same with head ``(l, h)`` ablated.
Dataset-level Ships is the sum over ``r = 1..r_main`` of the largest principal angle, in
degrees, between ``span(U[:, :r])`` and ``span(U_A[:, :r])``, ``U`` and ``U_A`` being the left
singular vectors of ``M`` and ``M_A``; for ``r_main = 1`` it is ``degrees(arccos |u1 . u1_A|)``.
Per-prompt Ships is ``KL(p || p_A)`` of the next-token distributions, averaged over prompts.

The naive computation runs one full forward pass per head per prompt. Here each prompt runs
once intact while its decoder layers' inputs are recorded (vision encoding included); then the
heads are processed in batches of ``batch_size`` ablated copies of the prompt, sorted by layer:
a batch starts at the layer of its first head, and the copies for each later head join the
batch at that head's layer, taken from the recorded input. Layers below a head's layer are never
re-run, so the arithmetic is about half the naive loop's, in full batches.

Llama-3.2-Vision: the heads of its cross-attention layers (queries from the text, keys and
values from the image) are scored like the others. Mllama skips those layers for a prompt
without an image, so there ablating such a head changes nothing: the head gets the intact
state for that prompt, and when no probe prompt has an image every cross-attention head scores
exactly 0 (a warning says so). The pipeline's probes for a vision model always carry an
image (a typographic one when the data has none), so this happens only to direct callers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .config import ShipsConfig
from .data import Sample
from .distributed import World, chunk_share, share, world
from .encoding import encode_one
from .heads import Head, all_heads
from .hooks import HookSet, LayerRecord, add_head_ablation, record_layers, run_layer
from .models import LoadedModel
from .progress import StopFlag, check_stop, steps


def ablated_finals(
    loaded: LoadedModel,
    record: LayerRecord,
    heads: Sequence[tuple[int, int]],
    *,
    mode: str = "zero",
    batch_size: int = 16,
    should_stop: StopFlag = None,
    on_batch: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Final-norm hidden state at the last position with each head ablated in turn.

    Args:
        loaded: the model.
        record: the intact pass of one prompt (``record_layers``).
        heads: ``(layer, head)`` pairs, sorted by layer.
        mode: ``zero`` or ``uniform`` ablation.
        batch_size: ablated copies per replay batch.
        should_stop: polled between batches.
        on_batch: called after each replay batch with the fraction of ``heads`` done.

    Returns:
        ``[len(heads), hidden]`` in the model's dtype, one row per head in ``heads`` order. A
        head of a layer the record skipped (Mllama's cross-attention without an image) gets
        the intact state: ablating it changes nothing.
    """
    a = loaded.adapter
    live = [i for i, (l, _) in enumerate(heads) if l not in record.skipped]
    replayed = [heads[i] for i in live]
    outs = []
    for start in range(0, len(replayed), batch_size):
        check_stop(should_stop)
        chunk = replayed[start : start + batch_size]
        first = chunk[0][0]
        x: torch.Tensor | None = None
        with HookSet() as hooks, torch.inference_mode():
            for layer in range(first, a.num_layers):
                if layer in record.skipped:  # a layer the intact pass skipped: the identity
                    continue
                new = [h for (l, h) in chunk if l == layer]
                if new:
                    fresh = record.inputs[layer].expand(len(new), -1, -1)  # [new, seq, hidden]
                    before = 0 if x is None else x.shape[0]
                    # a model spread over GPUs: x is on the previous layer's device
                    x = fresh if x is None else torch.cat([x, fresh.to(x.device)])
                    row_heads = torch.full((x.shape[0],), -1, dtype=torch.long)
                    row_heads[before:] = torch.tensor(new)
                    add_head_ablation(hooks, a, layer, row_heads, mode)
                x = run_layer(a.layers[layer], x, record.kwargs[layer])
            outs.append(a.final_norm(x)[:, -1])  # [chunk, hidden]
        if on_batch is not None:
            on_batch((start + len(chunk)) / len(heads))
    if len(live) == len(heads):
        return torch.cat(outs)
    out = record.final[:, -1].expand(len(heads), -1).clone()  # [heads, hidden]: intact
    if outs:
        out[live] = torch.cat(outs)
    return out


def principal_angle_sum(M: torch.Tensor, M_A: torch.Tensor, r_main: int = 1) -> torch.Tensor:
    """Sum over r = 1..r_main of the largest principal angle (degrees) of the leading subspaces.

    Args:
        M: ``[N, d]`` intact states.
        M_A: ``[heads, N, d]`` ablated states.
        r_main: number of leading left singular directions.

    Returns:
        ``[heads]`` float64 angles in degrees.
    """
    U = torch.linalg.svd(M.double(), full_matrices=False).U  # [N, k]
    U_A = torch.linalg.svd(M_A.double(), full_matrices=False).U  # [heads, N, k]
    total = torch.zeros(M_A.shape[0], dtype=torch.float64)
    for r in range(1, r_main + 1):
        u, ua = U[:, :r], U_A[:, :, :r]
        cross = u.T @ ua  # [heads, r, r]: cosines of the principal angles are its singular values
        cos = torch.linalg.svdvals(cross).min(dim=-1).values
        resid = ua - u @ cross  # component of span(U_A) outside span(U)
        sin = torch.linalg.matrix_norm(resid, ord=2)
        total += torch.rad2deg(torch.atan2(sin, cos))  # stable for small and right angles alike
    return total


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from logits ``[rows, vocab]``."""
    logp = torch.log_softmax(p_logits.double(), dim=-1)
    logq = torch.log_softmax(q_logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def ships_scores(
    loaded: LoadedModel,
    prompts: Sequence[Sample],
    cfg: ShipsConfig,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    should_stop: StopFlag = None,
) -> torch.Tensor:
    """Ships score of every head over a set of harmful probe prompts.

    Args:
        loaded: the model.
        prompts: harmful requests (their responses are ignored; images are used).
        cfg: metric, ablation mode, r_main and batch size.
        heads: restrict to these heads (the rest score NaN); all heads by default.
        should_stop: polled between batches; raises ``Cancelled`` when it returns True.

    Returns:
        ``[num_layers, num_heads]`` float32 scores (degrees for ``angle``, nats for ``kl``).
        Mllama's cross-attention heads score exactly 0 when no prompt has an image (warned).
        Under ``accelerate launch`` with several processes the prompts (or heads) are split
        among them and every process returns the table one process would compute, bit for
        bit on the CPU (``_shared_ships_scores``).
    """
    a = loaded.adapter
    if cfg.metric == "angle" and len(prompts) < max(2, cfg.r_main):
        raise ValueError(
            f"dataset-level Ships needs at least {max(2, cfg.r_main)} probe prompts "
            f"(got {len(prompts)}): with one prompt every angle is 0"
        )
    heads = sorted(heads) if heads is not None else all_heads(a.num_layers, a.num_heads)
    w = world()
    if w.size > 1:  # accelerate launch: a share of the prompts (or heads) per process
        return _shared_ships_scores(loaded, prompts, cfg, heads, w, should_stop)
    device = loaded.device
    intact, ablated, kl = [], [], torch.zeros(len(heads), dtype=torch.float64)
    batch = cfg.batch_size
    never_ran = set(a.cross_layers)  # cross-attention layers no prompt has run yet
    # the bar moves after each replay batch: a prompt of a large model takes tens of seconds
    for sample, advance in steps(prompts, desc="Ships attribution", unit="prompt"):
        check_stop(should_stop)
        inputs, _, _ = encode_one(loaded, sample, with_response=False)
        record = record_layers(loaded.model, a, {k: v.to(device) for k, v in inputs.items()})
        never_ran &= record.skipped
        finals, batch = _replay(loaded, record, heads, cfg, batch, should_stop, advance)
        base = record.final[:, -1]  # [1, hidden]
        if cfg.metric == "angle":
            intact.append(base.float().cpu())
            ablated.append(finals.float().cpu())
        else:
            with torch.inference_mode():
                kl += _kl(a.lm_head(base), a.lm_head(finals)).cpu()
    if cfg.metric == "angle":
        M = torch.cat(intact)  # [N, hidden]
        M_A = torch.stack(ablated, dim=1)  # [heads, N, hidden]
        values = principal_angle_sum(M, M_A, cfg.r_main)
    else:
        values = kl / len(prompts)
    return _score_table(a.num_layers, a.num_heads, heads, values, never_ran)


def _replay(
    loaded: LoadedModel,
    record: LayerRecord,
    heads: Sequence[tuple[int, int]],
    cfg: ShipsConfig,
    batch: int,
    should_stop: StopFlag,
    advance: Callable[[float], None] | None,
) -> tuple[torch.Tensor, int]:
    """``ablated_finals`` of one prompt, halving the batch on running out of memory; returns
    the states and the batch size that fitted (kept for the next prompt)."""
    while True:
        try:
            finals = ablated_finals(
                loaded,
                record,
                heads,
                mode=cfg.ablation,
                batch_size=batch,
                should_stop=should_stop,
                on_batch=advance,
            )
            return finals, batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)  # fewer ablated copies side by side, same result
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _score_table(
    num_layers: int,
    num_heads: int,
    heads: Sequence[tuple[int, int]],
    values: torch.Tensor,
    never_ran: set[int],
) -> torch.Tensor:
    """``[num_layers, num_heads]`` float32 scores from ``values`` in ``heads`` order (NaN for
    the heads not scored, 0 for those of a layer no prompt ran, warned)."""
    scores = torch.full((num_layers, num_heads), math.nan)
    for (l, h), v in zip(heads, values.tolist(), strict=True):
        scores[l, h] = 0.0 if l in never_ran else v  # exactly: the layer never ran
    if never_ran and any(l in never_ran for l, _ in heads):
        warnings.warn(
            f"no probe prompt has an image, so the cross-attention layers "
            f"{sorted(never_ran)} never ran (Mllama skips them without one): their heads "
            "score 0, which says nothing about them; give the probes images",
            stacklevel=3,
        )
    return scores


def _shared_ships_scores(
    loaded: LoadedModel,
    prompts: Sequence[Sample],
    cfg: ShipsConfig,
    heads: list[tuple[int, int]],
    w: World,
    should_stop: StopFlag,
) -> torch.Tensor:
    """``ships_scores`` across the processes of ``accelerate launch``, equal to one process's.

    With at least as many prompts as processes each process takes a contiguous block of the
    prompts (``share``) and replays every head on them; it sends the main process, per prompt,
    the intact and ablated final states (``angle``: ``[1, d]`` and ``[heads, d]`` float32) or
    the KL of every head (``kl``: ``[heads]`` float64). With fewer prompts every process runs
    every prompt's intact pass and replays a share of the heads in whole replay batches
    (``chunk_share``), so its batches are the ones one process forms; it sends its
    ``[share, d]`` states, and the main process assembles each prompt's ``[heads, d]``.

    The main process then computes what one process computes from the same tensors in the same
    order (the SVDs over the prompts in prompt order; the KLs added prompt by prompt) and sends
    the table to every process. Each prompt's replay is the same arithmetic on the same shapes
    as in one process, so on the CPU in float32 the scores are the same bit for bit.
    """
    a = loaded.adapter
    device = loaded.device
    heads = w.broadcast(heads)  # one list for all (a screening pass could differ per GPU)
    by_heads = len(prompts) < w.size
    mine = range(len(prompts)) if by_heads else share(len(prompts), w.rank, w.size)
    batch = cfg.batch_size
    parts: list[tuple] = []  # what this process sends, per prompt of ``mine``
    kept: list[tuple[torch.Tensor, set[int]]] = []  # by heads, main: each prompt's base, skipped
    desc = f"Ships attribution ({w.rank + 1}/{w.size})"
    for i, advance in steps(list(mine), desc=desc, unit="prompt"):
        check_stop(should_stop)
        inputs, _, _ = encode_one(loaded, prompts[i], with_response=False)
        record = record_layers(loaded.model, a, {k: v.to(device) for k, v in inputs.items()})
        base = record.final[:, -1]  # [1, hidden]
        if by_heads:
            live = [h for h in heads if h[0] not in record.skipped]
            span = chunk_share(len(live), cfg.batch_size, w.rank, w.size)
            if len(span):
                finals, batch = _replay(
                    loaded, record, live[span.start : span.stop], cfg, batch, should_stop, advance
                )
            else:
                finals = base[:0]  # [0, hidden]: no whole batch left for this process
            parts.append((finals.cpu(),))
            if w.is_main:
                kept.append((base, set(record.skipped)))
            continue
        finals, batch = _replay(loaded, record, heads, cfg, batch, should_stop, advance)
        if cfg.metric == "angle":
            parts.append((base.float().cpu(), finals.float().cpu(), set(record.skipped)))
        else:
            with torch.inference_mode():
                parts.append((_kl(a.lm_head(base), a.lm_head(finals)).cpu(), set(record.skipped)))
    gathered = w.gather(parts)
    scores = None
    if w.is_main:
        assert gathered is not None
        intact, ablated, kl = [], [], torch.zeros(len(heads), dtype=torch.float64)
        never_ran = set(a.cross_layers)
        if by_heads:
            for p, (base, skipped) in enumerate(kept):
                never_ran &= skipped
                live_rows = torch.cat([g[p][0] for g in gathered])  # [live, hidden], head order
                live = [j for j, (l, _) in enumerate(heads) if l not in skipped]
                if len(live) == len(heads):
                    finals = live_rows
                else:  # as ablated_finals: the intact state for a head of a skipped layer
                    finals = base.cpu().expand(len(heads), -1).clone()
                    if live:
                        finals[live] = live_rows
                if cfg.metric == "angle":
                    intact.append(base.float().cpu())
                    ablated.append(finals.float())
                else:
                    with torch.inference_mode():
                        kl += _kl(a.lm_head(base), a.lm_head(finals.to(device))).cpu()
        else:
            for part in (x for g in gathered for x in g):  # prompt order: blocks in rank order
                never_ran &= part[-1]
                if cfg.metric == "angle":
                    intact.append(part[0])
                    ablated.append(part[1])
                else:
                    kl += part[0]
        if cfg.metric == "angle":
            M = torch.cat(intact)  # [N, hidden]
            M_A = torch.stack(ablated, dim=1)  # [heads, N, hidden]
            values = principal_angle_sum(M, M_A, cfg.r_main)
        else:
            values = kl / len(prompts)
        scores = _score_table(a.num_layers, a.num_heads, heads, values, never_ran)
    return w.broadcast(scores)


def write_heads_jsonl(scores: torch.Tensor, path: str | Path) -> Path:
    """Write the reference's interop format: one JSON line mapping every ``"l-h"`` to its score."""
    row = {head.label: float(scores[head]) for head in all_heads(*scores.shape)}
    path = Path(path)
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return path


def read_heads_jsonl(path: str | Path, num_layers: int, num_heads: int) -> torch.Tensor:
    """Read a ``heads.jsonl`` (the last line wins) back into ``[num_layers, num_heads]``."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty heads file")
    row = json.loads(lines[-1])
    scores = torch.full((num_layers, num_heads), math.nan)
    for key, value in row.items():
        try:
            head = Head.parse(key, num_layers, num_heads)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        scores[head] = float(value)
    return scores
