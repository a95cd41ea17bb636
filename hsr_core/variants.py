"""One copy of the weights, three variants: ``original``, ``pruned`` and ``realigned``.

Pruned and realigned share the pruning mask except for the restored set, so the model switches
between them by changing weights in place:

    original -> pruned      zero the masked weights (multiply by the unpacked "keep" mask),
                            or, for a pruner that updates the weights it keeps (SparseGPT),
                            copy its values in from a second store (``UpdatedWeights``)
    pruned   -> realigned   write back the restored weights' dense values (a few thousand)
    realigned-> pruned      zero those again
    any      -> original    copy the dense weights back

The dense values of the decoder linears are written once to a scratch file in the cache folder
and memory-mapped (``torch.from_file``), so they live in the OS page cache rather than in the
process's memory: the three variants cost one copy of the weights plus the packed masks (1/16
of bf16 weights); SparseGPT's updated weights are a second such file. ``Variants.use`` is the one context manager through which weights change; it
always switches back, also when the body raises.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .masks import Masks, apply_mask
from .models import LoadedModel
from .realign import RestoreSet
from .store import default_cache_dir

VARIANTS = ("original", "pruned", "realigned")


class VariantError(RuntimeError):
    """A variant was asked for before the step that defines it (e.g. realign before prune)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WeightStore:
    """Values shaped like the decoder linears' weights, in a memory-mapped scratch file.

    The pages live in the OS page cache, not in the process's anonymous memory, so a store
    costs disk (or page cache) rather than a second copy of the weights in RAM.

    Args:
        loaded: the model whose decoder linears give the layout (and, with ``copy``, the values).
        root: where scratch folders go (``<cache>/variants``).
        copy: take the weights' current values (the dense store); False: zeros, to be written
            (SparseGPT writes its updated weights into one).
    """

    def __init__(self, loaded: LoadedModel, root: Path | None = None, *, copy: bool = True) -> None:
        root = Path(root or default_cache_dir() / "variants")
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("pid*-*"):  # scratch left by a process that died
            try:
                if not _pid_alive(int(old.name[3:].split("-")[0])):
                    shutil.rmtree(old, ignore_errors=True)
            except ValueError:
                continue
        self.folder = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=root))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.tensors: dict[str, torch.Tensor] = {}
        layout: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
        for name, _, _, mod in loaded.adapter.iter_linears():
            layout.setdefault(mod.weight.dtype, []).append((name, mod.weight))
        for i, (dtype, items) in enumerate(layout.items()):
            # a shared mapping creates the file and takes the values straight from the weights
            # (no Python bytes copy, and no numpy view, which would pin the weights' storage)
            total = sum(w.numel() for _, w in items)
            path = self.folder / f"weights{i}.bin"
            flat = torch.from_file(str(path), shared=True, size=total, dtype=dtype)
            offset = 0
            for name, w in items:
                part = flat[offset : offset + w.numel()]
                if copy:
                    part.copy_(w.detach().reshape(-1))
                self.tensors[name] = part.view(w.shape)
                offset += w.numel()

    def close(self) -> None:
        self.tensors.clear()
        self._finalizer()


@dataclass(eq=False)
class UpdatedWeights:
    """A pruner's own values for the weights it keeps (SparseGPT's update of the kept weights).

    Attributes:
        store: the pruned model's decoder-linear weights, 0 where ``masks`` prune.
        masks: the masks the pruner chose with them.

    With updated weights installed, the pruned variant holds ``store``'s values; a weight the
    installed masks keep but ``masks`` pruned (a localization rung putting a whole module back)
    gets its dense value, like every restored weight: HSR puts restored weights back at their
    dense value while the kept weights keep the pruner's update (docs/METHOD.md, "SparseGPT").
    """

    store: WeightStore
    masks: Masks

    def close(self) -> None:
        self.store.close()


class Variants:
    """Switch one loaded model between its original, pruned and realigned weights.

    Args:
        loaded: the model (dense when this is created).
        scratch: folder for the dense-weights scratch file (default ``<cache>/variants``).

    The masks stay packed (1 bit a weight); pruning applies them one linear at a time
    (``hsr_core.masks.apply_mask``). Whoever owns the variants (the command line, the app's
    workbench) puts masks and a restore set in with ``install``.
    """

    def __init__(self, loaded: LoadedModel, scratch: Path | None = None) -> None:
        self.loaded = loaded
        self.scratch = scratch
        self.current = "original"
        self.masks: Masks | None = None
        self.restore: RestoreSet | None = None
        self.updated: UpdatedWeights | None = None
        self._store: WeightStore | None = None
        self._lock = threading.RLock()
        self._modules = {name: mod for name, _, _, mod in loaded.adapter.iter_linears()}

    # -- state ------------------------------------------------------------------------------

    def _dense(self) -> WeightStore:
        if self._store is None:
            if self.current != "original":
                raise RuntimeError("the dense store must be made while the model is dense")
            self._own_weights()
            self._store = WeightStore(self.loaded, self.scratch)
        return self._store

    def _own_weights(self) -> None:
        """Give the decoder linears' CPU weights memory of their own, in bulk.

        transformers memory-maps safetensors on the CPU, so a freshly loaded weight lives in
        the file's pages; the first in-place write to it (the first switch to ``pruned``) then
        copies it page by page on faults: 1.5 s for SmolLM2-135M's linears on a 2-core CPU,
        where a clone takes 0.11 s. Done once, just before the dense store is made (the prune
        step), and only for weights in memory torch did not allocate (a memory map's storage is
        not resizable); the memory is the same either way after the first switch.
        """
        for mod in self._modules.values():
            w = mod.weight
            if w.device.type == "cpu" and not w.untyped_storage().resizable():
                w.data = w.data.clone()  # .data: outside autograd, no torch.no_grad needed

    def dense_weight(self, name: str) -> torch.Tensor:
        """The dense weight of a decoder linear, whatever variant is active."""
        with self._lock:
            if self.current == "original":
                return self._modules[name].weight.detach()
            return self._dense().tensors[name].to(self._modules[name].weight.device)

    def available(self) -> list[str]:
        """Variants that can be switched to now."""
        return (
            ["original"]
            + (["pruned"] if self.masks else [])
            + (["realigned"] if self.masks and self.restore else [])
        )

    def install(
        self,
        masks: Masks | None,
        restore: RestoreSet | None = None,
        updated: UpdatedWeights | None = None,
    ) -> None:
        """Use these pruning masks, this restore set and these updated weights (SparseGPT's;
        None: the kept weights keep their dense values): the one call that changes them.

        What is already installed is kept (compared by identity), so installing a session's
        state before each of its requests costs nothing when it did not change. The active
        variant stays active when it still exists, else the model falls back to ``pruned``
        (no restore set) or ``original`` (no masks).
        """
        with self._lock:
            if restore is not None and masks is None:
                raise VariantError("prune first: a restore set needs the pruning masks")
            if updated is not None and masks is None:
                raise VariantError("prune first: updated weights need the pruning masks")
            prev = self.current
            if masks is not self.masks or updated is not self.updated:
                self.set_masks(masks, updated)
            if restore is not self.restore:
                self.set_restore(restore)
            if prev == "realigned" and self.restore is not None:
                self.switch("realigned")

    def set_masks(self, masks: Masks | None, updated: UpdatedWeights | None = None) -> None:
        """Use new pruning masks (and the pruner's updated weights, if it has them); the restore
        set is dropped: it was made for the old masks."""
        with self._lock:
            prev = self.current
            self.switch("original")
            self.masks = masks
            self.updated = updated if masks is not None else None
            self.restore = None
            if masks is not None:
                self._dense()
                self.switch("pruned" if prev != "original" else "original")

    def set_restore(self, restore: RestoreSet | None) -> None:
        """Use a new restore set; the active variant stays active."""
        with self._lock:
            if restore is not None and self.masks is None:
                raise VariantError("prune first: a restore set needs the pruning masks")
            prev = self.current
            if prev == "realigned":
                self.switch("pruned")
            self.restore = restore
            if prev == "realigned" and restore is not None:
                self.switch("realigned")

    # -- switching --------------------------------------------------------------------------

    def switch(self, variant: str) -> None:
        """Make ``variant`` the active one, changing weights in place.

        A switch that fails part way (out of memory, an interrupt) puts the weights back to the
        variant that was active before (through the dense copy) and raises: the model is never
        left between two variants.
        """
        with self._lock, torch.no_grad():
            if variant not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
            if variant == self.current:
                return
            if variant != "original" and self.masks is None:
                raise VariantError(f"no {variant} model yet: run the prune step first")
            if variant == "realigned" and self.restore is None:
                raise VariantError("no realigned model yet: run the realign step first")
            prev = self.current
            try:
                self._switch(variant)
            except BaseException:
                self._recover(prev)
                raise

    def _recover(self, prev: str) -> None:
        """After a failed switch: the dense weights back everywhere, then ``prev`` again."""
        if self._store is None:  # failed before any weight changed
            self.current = prev
            return
        for name, mod in self._modules.items():
            mod.weight.copy_(self._store.tensors[name])
        self.current = "original"
        if prev != "original":
            self._switch(prev)

    def _switch(self, variant: str) -> None:
        with self._lock:
            if variant == "original":
                store = self._dense()
                for name, mod in self._modules.items():
                    mod.weight.copy_(store.tensors[name])
            elif self.current == "original":
                self._dense()
                for name, mod in self._modules.items():
                    if self.updated is None:
                        apply_mask(mod.weight, self.masks[name])
                    else:
                        self._write_updated(name, mod.weight)
                if variant == "realigned":
                    self._put_back_restored()
            elif variant == "realigned":  # from pruned
                self._put_back_restored()
            else:  # realigned -> pruned
                for name, idx in self.restore.indices.items():
                    w = self._modules[name].weight
                    w.view(-1)[idx.to(w.device)] = 0
            self.current = variant

    def _write_updated(self, name: str, w: torch.Tensor) -> None:
        """The pruned weight from the pruner's updated values: the store's values, except that
        a weight the installed mask keeps but the pruner's mask pruned takes its dense value,
        and a weight the installed mask prunes is 0."""
        w.copy_(self.updated.store.tensors[name])
        mine, theirs = self.masks[name], self.updated.masks[name]
        if mine is theirs:
            return
        back = theirs.unpack(w.device) & mine.unpack_keep(w.device)
        if bool(back.any()):
            idx = back.view(-1).nonzero().squeeze(1)
            w.view(-1)[idx] = self._dense().tensors[name].view(-1)[idx.cpu()].to(w.device)
        apply_mask(w, mine)

    def _put_back_restored(self) -> None:
        store = self._dense()
        for name, idx in self.restore.indices.items():
            w = self._modules[name].weight
            w.view(-1)[idx.to(w.device)] = store.tensors[name].view(-1)[idx.cpu()].to(w.device)

    @contextmanager
    def use(self, variant: str) -> Iterator[LoadedModel]:
        """Activate ``variant`` for the body, then switch back to what was active before."""
        yield from self._using(variant)

    def _using(self, variant: str) -> Iterator[LoadedModel]:
        # the body of ``use``, undecorated so that mutation testing reaches it (docs/MUTATION.md)
        with self._lock:
            prev = self.current
            self.switch(variant)
            try:
                yield self.loaded
            finally:
                self.switch(prev)

    def close(self) -> None:
        """Back to the original weights; delete the scratch file."""
        with self._lock:
            if self.current != "original":
                self.switch("original")
            if self._store is not None:
                self._store.close()
                self._store = None
