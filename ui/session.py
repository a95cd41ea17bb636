"""The one shared model of the process, and the small state of each browser session.

``Workbench`` is process-wide: the ``LoadedModel``, its ``Variants`` (one copy of the weights,
switched between original, pruned and realigned), the on-disk ``ResultCache`` of Ships scores
and norm vectors, the loaded calibration data, norm vectors and ``RankCache``s kept in memory,
the per-session Stop flags, and a lock. Every event that touches the model runs in one gradio
concurrency group of size 1 *and* under that lock, so two tabs never interleave.

``Session`` is what one browser tab owns, kept in ``gr.State``: its configs, its Ships scores
``[L, H]``, the key of its norm vectors, its masks (packed, 1/8 byte per weight) and its restore
set. It is frozen: a handler builds a new one with ``dataclasses.replace`` and returns it only
when the step succeeded, so a failing step leaves the earlier results in place. Before a
session's request uses the weights, ``Workbench.install`` puts that session's masks and restore
set into the shared ``Variants``.

``MODEL_THREAD`` is the one thread in which all of that model work runs (see
``hsr_core.worker`` for why one thread).
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsr_core.config import ModelSpec, RealignConfig, ShipsConfig, WandaConfig, fingerprint
from hsr_core.realign import KEEP_MASKS_MAX_WEIGHTS
from hsr_core.worker import ModelThread

if TYPE_CHECKING:
    import torch

    from hsr_core.data import CalibrationData
    from hsr_core.models import LoadedModel
    from hsr_core.pipeline import Norms
    from hsr_core.realign import RankCache, RestoreSet
    from hsr_core.store import ResultCache
    from hsr_core.variants import Variants
    from hsr_core.wanda import Masks


LIVE_CACHE_MAX_WEIGHTS = KEEP_MASKS_MAX_WEIGHTS
"""Models with at most this many attention weights (SmolLM2-135M: 26.5 M) rank every attention
projection right after pruning and keep the unpacked masks (``hsr_core.realign.RankCache``), so
every slider move of the Realign tab is fast; bigger models rank the layers of the selected
heads on first use and unpack masks on every move."""


class SessionError(RuntimeError):
    """A step was asked for before the steps it needs (the message says which)."""


@dataclass(frozen=True)
class DataSpec:
    """Where a session's calibration data comes from (enough to load it again).

    Attributes:
        source: ``builtin``, a VLGuard folder, a file path or a hub dataset id.
        columns: column mapping for files and hub datasets.
        label: how the UI names it.
    """

    source: str = "builtin"
    columns: tuple[tuple[str, str], ...] = ()
    label: str = "built-in"

    @property
    def key(self) -> str:
        return fingerprint({"source": self.source, "columns": list(self.columns)})

    def column_map(self) -> dict[str, str] | None:
        return dict(self.columns) or None


@dataclass(frozen=True)
class Session:
    """One browser session's results (small; lives in ``gr.State``).

    Attributes:
        model: ``Workbench.model_key`` of the model these results belong to.
        model_name: the model's name, for messages.
        data: the calibration data spec.
        ships: the Ships config of ``scores``.
        scores: Ships scores ``[num_layers, num_heads]`` (float32, CPU).
        wanda: the Wanda config of ``norms_key`` and ``masks``.
        norms_key: key of the safety/utility norm vectors in the workbench.
        masks: the pruning masks (True = pruned).
        sparsity: ``hsr_core.wanda.sparsity_report`` of the masks.
        realign: the settings of ``restore``.
        restore: the restore set shown in the Realign tab.
        head: the head shown in detail (``"l-h"``).
    """

    model: str | None = None
    model_name: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    ships: ShipsConfig | None = None
    scores: torch.Tensor | None = None
    wanda: WandaConfig | None = None
    norms_key: str | None = None
    masks: Masks | None = None
    sparsity: dict[str, Any] | None = None
    realign: RealignConfig | None = None
    restore: RestoreSet | None = None
    head: str | None = None


def check_architecture(path: Path, spec: ModelSpec) -> None:
    """Refuse a model HSR cannot map before the process releases the model it has."""
    from hsr_core.models import check_supported

    check_supported(path, trust_remote_code=spec.trust_remote_code)


def model_key(spec: ModelSpec) -> str:
    """Identity of a loaded model: two tabs asking for the same spec share it."""
    return fingerprint(spec)


class _Lru(OrderedDict):
    """A dict that forgets its oldest entries beyond ``size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: str, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value

    def hit(self, key: str) -> Any | None:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


class Workbench:
    """The process-wide model and everything derived from it that sessions share.

    Args:
        cache_root: the project's cache root (default ``$HSR_CACHE_DIR`` or
            ``~/.cache/hsr-workbench``); holds built-in models, cached results and the
            variants' scratch file.
    """

    def __init__(self, cache_root: Path | None = None) -> None:
        from hsr_core.store import default_cache_dir

        self.cache_root = Path(cache_root or default_cache_dir())
        self.lock = threading.RLock()
        self.loaded: LoadedModel | None = None
        self.variants: Variants | None = None
        self.model_key: str | None = None
        self._cache: ResultCache | None = None
        self._data: _Lru = _Lru(4)
        self._norms: _Lru = _Lru(4)
        self._ranks: _Lru = _Lru(2)
        self._stops: dict[str, threading.Event] = {}

    @property
    def cache(self) -> ResultCache:
        if self._cache is None:
            from hsr_core.store import ResultCache

            self._cache = ResultCache(self.cache_root)
        return self._cache

    # -- the model ------------------------------------------------------------------------

    def load(self, spec: ModelSpec, log: Callable[[str], None] | None = None) -> bool:
        """Make ``spec`` the process's model; returns False when it was loaded already.

        The name is resolved first (unknown ids, missing folders and download failures raise
        while the previous model stays loaded); only then is the previous model released.
        """
        from hsr_core.models import load_model, resolve_path

        with self.lock:
            key = model_key(spec)
            if key == self.model_key and self.loaded is not None:
                return False
            path = resolve_path(spec, self.cache_root, log or (lambda _m: None))
            check_architecture(path, spec)
            self.release()
            from hsr_core.variants import Variants

            loaded = load_model(spec, cache_dir=self.cache_root, log=log)
            self.loaded = loaded
            self.variants = Variants(loaded, scratch=self.cache_root / "variants")
            self.model_key = key
            return True

    def release(self) -> None:
        """Drop the model and everything derived from it (frees its memory)."""
        with self.lock:
            if self.variants is not None:
                self.variants.close()
            self.loaded = self.variants = self.model_key = None
            self._norms.clear()
            self._ranks.clear()
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def require(self, session: Session) -> LoadedModel:
        """The shared model, when it is the one the session's results belong to.

        Raises:
            SessionError: no model loaded for this session, or another tab replaced it.
        """
        if session.model is None:
            raise SessionError("Load a model first (tab 1, Model & data).")
        if self.loaded is None:
            raise SessionError(
                f"No model is loaded now (a later load, maybe in another tab, failed after "
                f"releasing it). Press Load to load {session.model_name} again."
            )
        if session.model != self.model_key:
            now = self.loaded.spec.name
            raise SessionError(
                f"Another tab replaced the shared model: {now} is loaded now, and this tab's "
                f"results belong to {session.model_name}. Press Load to load it again (one "
                "model is shared by every tab of this app)."
            )
        return self.loaded

    def install(self, session: Session) -> Variants:
        """Put the session's masks and restore set into the shared variants."""
        with self.lock:
            self.require(session)
            v = self.variants
            if v.masks is not session.masks:
                v.set_masks(session.masks)
            if session.masks is not None and v.restore is not session.restore:
                v.set_restore(session.restore)
            return v

    # -- data, norms, ranks ---------------------------------------------------------------

    def calibration(self, spec: DataSpec) -> CalibrationData:
        """The calibration sets of ``spec`` (loaded once, then kept)."""
        from hsr_core.data import load_calibration

        with self.lock:
            hit = self._data.hit(spec.key)
        if hit is None:  # read (or download) without holding up the model's events
            hit = load_calibration(spec.source, columns=spec.column_map())
            with self.lock:
                self._data.put(spec.key, hit)
        return hit

    def norms_key(self, data: DataSpec, cfg: WandaConfig) -> str:
        return fingerprint({"model": self.model_key, "data": data.key, "stats": cfg.stats_key()})

    def put_norms(self, key: str, norms: Norms) -> None:
        with self.lock:
            self._norms.put(key, norms)

    def norms(self, session: Session) -> Norms:
        """The session's norm vectors (from memory, else from the on-disk cache)."""
        from hsr_core import pipeline

        with self.lock:
            self.require(session)
            hit = self._norms.hit(session.norms_key)
            if hit is None:
                calib = self.calibration(session.data)
                hit = pipeline.calibrate(self.loaded, calib, session.wanda, self.cache).value
                self._norms.put(session.norms_key, hit)
            return hit

    def rank_cache(self, session: Session) -> RankCache:
        """One ``RankCache`` per (model, norms), shared by every session that uses them."""
        from hsr_core import pipeline

        with self.lock:
            hit = self._ranks.hit(session.norms_key)
            if hit is None:
                hit = self._ranks.put(
                    session.norms_key, pipeline.rank_cache(self.variants, self.norms(session))
                )
            return hit

    def attention_weights(self) -> int:
        """How many weights the loaded model's attention projections hold."""
        a = self.loaded.adapter
        return sum(m.weight.numel() for *_, m in a.iter_linears(attention_only=True))

    def live_masks(self, session: Session) -> Masks:
        """The session's masks for the live view (the rank cache keeps them unpacked)."""
        return session.masks

    # -- stopping -------------------------------------------------------------------------

    def stop_event(self, session_hash: str | None) -> threading.Event:
        """The Stop flag of one browser session."""
        return self._stops.setdefault(session_hash or "", threading.Event())

    def forget(self, session_hash: str | None) -> None:
        self._stops.pop(session_hash or "", None)


WORKBENCH = Workbench()
"""The process's workbench (built lazily: nothing is loaded at import)."""

MODEL_THREAD = ModelThread()
"""The thread every model step of the app runs in (``hsr_core.worker``: one OpenMP team, so
CPU decoding is not slowed down by the handler pool's threads). ``ui.layout`` sends the
handlers of the model's events here; the chat's turns submit their generation here."""


DOWNLOADS_KEPT_S = 600
"""Files made for download are kept this long: gradio copies a handler's file into its own
cache when the handler returns, so the original is only needed that long."""


def download_dir(kind: str) -> Path:
    """A fresh folder for files a handler returns for download (exports, zips).

    Folders of the same ``kind`` older than ``DOWNLOADS_KEPT_S`` are deleted first, so that
    exported models do not pile up in the temporary folder.
    """
    import shutil
    import tempfile
    import time

    root = Path(tempfile.gettempdir()) / "hsr-workbench" / kind
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        try:
            if time.time() - old.stat().st_mtime > DOWNLOADS_KEPT_S:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another request deleted it meanwhile
            continue
    return Path(tempfile.mkdtemp(dir=root))
