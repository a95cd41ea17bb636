"""The base pruners behind one call: Wanda, SparseGPT, SNIP and magnitude (docs/METHOD.md).

``prune_model`` gives a ``Pruning``: the masks (True = pruned, per decoder linear) and, for a
pruner that changes the weights it keeps (SparseGPT), those updated values in a memory-mapped
store (``hsr_core.variants.UpdatedWeights``). Every pruner prunes the same decoder linears at
the same sparsity and structure (``WandaConfig``): unstructured per output row (SparseGPT per
block of columns, as its reference), or N:M.

The HSR restore set is ranked by the Wanda safety and utility scores whatever the pruner (the
paper's choice, docs/METHOD.md "HSR with other pruners"), so the Wanda statistics are taken for
every pruner (``pipeline.calibrate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PRUNERS, WandaConfig
from .data import Sample
from .masks import Masks
from .models import LoadedModel
from .progress import StopFlag
from .variants import UpdatedWeights, WeightStore
from .wanda import compute_masks


@dataclass(eq=False)
class Pruning:
    """What a pruner gives.

    Attributes:
        masks: ``{linear name: PackedMask}`` (True = pruned).
        updated: the kept weights' new values (SparseGPT), or None (they keep their dense
            values).
        pruner: the pruner's name (``config.PRUNERS``).
    """

    masks: Masks
    updated: UpdatedWeights | None = None
    pruner: str = "wanda"

    def close(self) -> None:
        """Delete the updated weights' scratch file (the masks are plain memory)."""
        if self.updated is not None:
            self.updated.close()


def prune_model(
    loaded: LoadedModel,
    utility_norms: dict[str, torch.Tensor],
    utility_samples: Sequence[Sample],
    cfg: WandaConfig,
    *,
    should_stop: StopFlag = None,
    scratch: Path | None = None,
) -> Pruning:
    """Prune with ``cfg.pruner``; the model's weights must be dense and are the same on return.

    Args:
        loaded: the model, dense.
        utility_norms: Wanda's utility norms (used by one-shot Wanda).
        utility_samples: the utility calibration set, prepared (sequential Wanda, SparseGPT's
            Hessians, SNIP's gradients).
        cfg: pruner, sparsity, structure, mode, token selection, batch size.
        should_stop: polled between batches or layers.
        scratch: where SparseGPT's updated weights are stored (default ``<cache>/variants``).
    """
    if cfg.pruner not in PRUNERS:  # WandaConfig checks it; a hand-built config may not have
        raise ValueError(f"unknown pruner {cfg.pruner!r}; choose from {PRUNERS}")
    if cfg.pruner == "wanda":
        masks = compute_masks(loaded, utility_norms, utility_samples, cfg, should_stop=should_stop)
        return Pruning(masks, None, "wanda")
    if cfg.pruner == "magnitude":
        from .magnitude import magnitude_masks

        return Pruning(magnitude_masks(loaded, cfg), None, "magnitude")
    if cfg.pruner == "snip":
        from .snip import snip_masks

        masks = snip_masks(loaded, utility_samples, cfg, should_stop=should_stop)
        return Pruning(masks, None, "snip")
    from .sparsegpt import sparsegpt_masks

    store = WeightStore(loaded, scratch, copy=False)
    try:
        masks = sparsegpt_masks(
            loaded, utility_samples, cfg, out=store.tensors, should_stop=should_stop
        )
    except BaseException:
        store.close()
        raise
    return Pruning(masks, UpdatedWeights(store, masks), "sparsegpt")
