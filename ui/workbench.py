"""The one shared model of the process (``Workbench``), the model thread, and download folders.

``Workbench`` is process-wide: the ``LoadedModel``, its ``Variants`` (one copy of the weights,
switched between original, pruned and realigned), the on-disk ``ResultCache`` of Ships scores
and norm vectors, the loaded calibration data, norm vectors and ``RankCache``s kept in memory,
the per-session Stop flags, and a lock. Every event that touches the model runs in one gradio
concurrency group of size 1 *and* under that lock, so two tabs never interleave. It owns the
variants: before a session's request uses the weights, ``Workbench.install`` puts that
session's masks and restore set into them (``Variants.install``).

``MODEL_THREAD`` is the one thread in which all of that model work runs (see
``hsr_core.worker`` for why one thread). The core is reached through ``hsr_core.pipeline`` only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hsr_core import pipeline
from hsr_core.config import ModelSpec, WandaConfig, fingerprint
from ui.session import DataSpec, Session, SessionError

LIVE_CACHE_MAX_WEIGHTS = pipeline.KEEP_MASKS_MAX_WEIGHTS
"""Models with at most this many attention weights (SmolLM2-135M: 26.5 M) rank every attention
projection right after pruning and keep the unpacked masks (``RankCache``), so every slider
move of the Realign tab is fast; bigger models rank the layers of the selected heads on first
use and unpack masks on every move."""


log = logging.getLogger("hsr.app")


def _log_failure(done: Future) -> None:
    """Log the error of work queued without anyone waiting for it."""
    if done.exception() is not None:
        log.error("queued model work failed", exc_info=done.exception())


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
        self.cache_root = Path(cache_root or pipeline.default_cache_dir())
        self.lock = threading.RLock()
        self.loaded: pipeline.LoadedModel | None = None
        self.variants: pipeline.Variants | None = None
        self.model_key: str | None = None
        self._cache: pipeline.ResultCache | None = None
        self._data: _Lru = _Lru(4)
        self._norms: _Lru = _Lru(4)
        self._ranks: _Lru = _Lru(2)
        self._stops: dict[str, StopFlag] = {}
        self._stops_lock = threading.Lock()

    @property
    def cache(self) -> pipeline.ResultCache:
        if self._cache is None:
            self._cache = pipeline.ResultCache(self.cache_root)
        return self._cache

    # -- the model ------------------------------------------------------------------------

    def load(self, spec: ModelSpec, log: Callable[[str], None] | None = None) -> bool:
        """Make ``spec`` the process's model; returns False when it was loaded already.

        The name is resolved first (unknown ids, missing folders and download failures raise
        while the previous model stays loaded); only then is the previous model released.
        Progress is a bar of these steps (finding, downloading or converting the model;
        loading its weights; the variants), with the core's own bars inside them (a
        download's bytes, a conversion's tensors, checkpoint shards).
        """
        with self.lock:
            key = model_key(spec)
            if key == self.model_key and self.loaded is not None:
                return False
            with pipeline.bar(total=3, desc=f"Loading {spec.name}", unit="step") as steps:
                pipeline.prepare_model(spec, self.cache_root, log)  # raises before the release
                steps.update()
                self.release()
                loaded = pipeline.load_model(spec, cache_dir=self.cache_root, log=log)
                steps.update()
                self.loaded = loaded
                self.variants = pipeline.Variants(loaded, scratch=self.scratch)
                self.model_key = key
                steps.update()
            return True

    @property
    def scratch(self) -> Path:
        """Where the variants' scratch files go (the dense weights; SparseGPT's updates)."""
        return self.cache_root / "variants"

    def release(self) -> None:
        """Drop the model and everything derived from it (frees its memory)."""
        with self.lock:
            if self.variants is not None:
                self.variants.close()
            self.loaded = self.variants = self.model_key = None
            self._norms.clear()
            self._ranks.clear()
            pipeline.free_memory()

    def require(self, session: Session) -> pipeline.LoadedModel:
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

    def install(self, session: Session) -> pipeline.Variants:
        """Put the session's masks and restore set into the shared variants."""
        with self.lock:
            self.require(session)
            self.variants.install(session.masks, session.restore, session.updated)
            return self.variants

    def drop(self, session: Session) -> None:
        """Forget a session that is gone (its state expired or its tab closed): when its masks
        are the ones in the shared variants, they and its restore set leave them, so the model
        holds nothing of it. Queued for the model thread; returns at once (gradio calls this
        from its event loop, as the ``delete_callback`` of the session's ``gr.State``).
        """
        masks = session.masks
        if masks is None:
            return

        def forget() -> None:
            with self.lock:
                if self.variants is not None and self.variants.masks is masks:
                    self.variants.install(None, None)

        MODEL_THREAD.submit(forget).add_done_callback(_log_failure)

    # -- data, norms, ranks ---------------------------------------------------------------

    def calibration(self, spec: DataSpec) -> pipeline.CalibrationData:
        """The calibration sets of ``spec`` (loaded once, then kept)."""
        with self.lock:
            hit = self._data.hit(spec.key)
        if hit is None:  # read (or download) without holding up the model's events
            hit = pipeline.load_calibration(
                spec.source, columns=spec.column_map(), image_paths=spec.image_paths
            )
            with self.lock:
                self._data.put(spec.key, hit)
        return hit

    def norms_key(self, data: DataSpec, cfg: WandaConfig) -> str:
        return fingerprint({"model": self.model_key, "data": data.key, "stats": cfg.stats_key()})

    def put_norms(self, key: str, norms: pipeline.Norms) -> None:
        with self.lock:
            self._norms.put(key, norms)

    def norms(self, session: Session) -> pipeline.Norms:
        """The session's norm vectors (from memory, else from the on-disk cache)."""
        with self.lock:
            self.require(session)
            hit = self._norms.hit(session.norms_key)
            if hit is None:
                calib = self.calibration(session.data)
                with self.variants.use("original") as dense:
                    sets = pipeline.calibration_samples(dense, calib, session.wanda)
                    hit = pipeline.calibrate(dense, *sets, session.wanda, self.cache).value
                self._norms.put(session.norms_key, hit)
            return hit

    def rank_cache(self, session: Session) -> pipeline.RankCache:
        """One ``RankCache`` per (model, norms), shared by every session that uses them."""
        with self.lock:
            hit = self._ranks.hit(session.norms_key)
            if hit is None:
                hit = self._ranks.put(
                    session.norms_key, pipeline.rank_cache(self.variants, self.norms(session))
                )
            return hit

    # -- stopping -------------------------------------------------------------------------

    def stop_event(self, session_hash: str | None) -> StopFlag:
        """The Stop flag of one browser session."""
        with self._stops_lock:
            return self._stops.setdefault(session_hash or "", StopFlag())

    @contextmanager
    def job_stop(self, session_hash: str | None, since: float) -> Iterator[StopFlag]:
        """The session's Stop flag for a job queued at ``since``, held until the job ends.

        The flag is cleared of a Stop sent before ``since`` (``StopFlag.clear_before``). While
        a job holds it, ``forget`` keeps it: gradio runs a session's ``unload`` when its
        heartbeat connection drops, which can happen with the page still open, and a Stop
        from that page must still reach the running job.
        """
        key = session_hash or ""
        with self._stops_lock:
            flag = self._stops.setdefault(key, StopFlag())
            flag.jobs += 1
        flag.clear_before(since)
        try:
            yield flag
        finally:
            with self._stops_lock:
                flag.jobs -= 1
                if not flag.jobs and flag.forgotten and self._stops.get(key) is flag:
                    del self._stops[key]

    def forget(self, session_hash: str | None) -> None:
        """Drop a closed session's Stop flag, at once or when the last job holding it ends."""
        key = session_hash or ""
        with self._stops_lock:
            flag = self._stops.get(key)
            if flag is not None and flag.jobs:
                flag.forgotten = True
            else:
                self._stops.pop(key, None)


class StopFlag(threading.Event):
    """A session's Stop flag that remembers when it was last set, so that a job starting
    can tell a Stop meant for it (sent while it waited in the queue) from an older one."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self.set_at = -math.inf
        """``time.monotonic()`` of the last ``set``."""
        self.jobs = 0
        """Running jobs holding the flag (``Workbench.job_stop``)."""
        self.forgotten = False
        """The session ended while a job held the flag: dropped when the last one ends."""

    def set(self) -> None:
        with self._guard:
            self.set_at = time.monotonic()
            super().set()

    def clear_before(self, since: float) -> None:
        """Clear the flag unless it was set at or after ``since`` (a job's time of joining
        the queue): a Stop sent after the job was asked for is the job's, and it stops at
        its first check; an older one is not."""
        with self._guard:
            if self.set_at < since:
                self.clear()


WORKBENCH = Workbench()
"""The process's workbench (built lazily: nothing is loaded at import)."""

MODEL_THREAD = pipeline.ModelThread()
"""The thread every model step of the app runs in (``hsr_core.worker``: one OpenMP team, so
CPU decoding is not slowed down by the handler pool's threads). ``ui.layout`` sends the
handlers of the model's events here (``ui.events``); the chat's turns run here."""


DOWNLOADS_KEPT_S = 600
"""Files made for download are kept this long: gradio copies a handler's file into its own
cache when the handler returns, so the original is only needed that long."""


def download_dir(kind: str, under: Path | None = None) -> Path:
    """A fresh folder for files a handler returns for download (exports, zips).

    Folders of the same ``kind`` older than ``DOWNLOADS_KEPT_S`` are deleted first, so that
    exported models do not pile up in the temporary folder.

    Args:
        kind: a name for the kind of file (one folder of them per kind).
        under: where the kinds' folders are (default ``<temp>/hsr-workbench``); gradio's own
            cache folder for a file gradio should serve as it is, without a copy of its own.
    """
    import shutil
    import tempfile
    import time

    root = Path(under or Path(tempfile.gettempdir()) / "hsr-workbench") / kind
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        try:
            if time.time() - old.stat().st_mtime > DOWNLOADS_KEPT_S:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another request deleted it meanwhile
            continue
    return Path(tempfile.mkdtemp(dir=root))
