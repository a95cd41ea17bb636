"""Magnitude pruning: ``|W|`` per output row, the baseline every pruning paper reports.

The score of a weight is its absolute value; masks come from ``hsr_core.wanda.mask_from_scores``
(per row: the ``floor(in * sparsity)`` smallest, or the N smallest of every M; ties to the
earlier input). The reference code (``boyiwei/alignment-attribution-code``, ``lib/prune.py``,
``prune_magnitude``, copied from Wanda's) ranks unstructured magnitudes over the whole matrix
instead of per row; this module ranks per row, like every other pruner here, so that the
baseline differs from them in the score only. Magnitude needs no data, so it has one mode.
"""

from __future__ import annotations

from .config import WandaConfig
from .masks import Masks, PackedMask
from .models import LoadedModel
from .wanda import mask_count, mask_from_scores


def magnitude_masks(loaded: LoadedModel, cfg: WandaConfig) -> Masks:
    """Masks pruning the smallest ``|W|`` of each row of every decoder linear.

    Args:
        loaded: the model, with its dense weights in place.
        cfg: sparsity and structure.

    Returns:
        ``{linear name: PackedMask}`` (True = pruned).
    """
    masks: Masks = {}
    for name, _, _, mod in loaded.adapter.iter_linears():
        mask = mask_from_scores(mod.weight.detach().abs().float(), cfg)
        masks[name] = PackedMask.pack(mask, mask_count(mask.shape, cfg))
    return masks
