"""An on-disk cache for the durable results: Ships scores and Wanda norm vectors.

Each entry is a safetensors file plus a JSON sidecar, under
``<cache>/results/<kind>/<key>.{safetensors,json}``. The key is the SHA-256 of a canonical JSON
of everything the result depends on: the model (id, revision, dtype and a fingerprint of the
content of its weight files, ``folder_fingerprint``), a fingerprint of the data, and the step's
config. The sidecar repeats that JSON and the file's SHA-256, so a truncated, corrupt or
mismatched entry is detected, deleted and recomputed instead of trusted. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$HSR_CACHE_DIR`` or ``~/.cache/hsr-workbench``."""
    env = os.environ.get("HSR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hsr-workbench"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_DIGESTS: dict[str, str] = {}
"""Content digests of files this process has read, by ``_stat_key``."""

_HUB_BLOB = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
"""A hub cache blob's name: the file's git (sha1) or LFS (sha256) hash."""


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _file_digest(path: Path, memo: Path | None) -> str:
    """The SHA-256 of a file's bytes, read once per file version.

    A file of the Hugging Face hub cache is a link to a blob named by its content's hash: that
    name is the digest (nothing is read). Other digests are remembered by path, size,
    modification time and inode, in this process and in ``memo`` (a JSON file), so a file is
    hashed again only after it was written again.
    """
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _HUB_BLOB.match(target.name):
        return target.name
    key = _stat_key(path)
    if key in _DIGESTS:
        return _DIGESTS[key]
    known: dict[str, str] = {}
    if memo is not None:
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
    digest = known.get(key) or _sha256_file(path)
    _DIGESTS[key] = digest
    if memo is not None and key not in known:
        with suppress(OSError):  # a read-only cache only costs a hash next time
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{memo}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({**known, key: digest}, indent=0))
            os.replace(tmp, memo)
    return digest


def folder_fingerprint(path: Path, memo: Path | None = None) -> str:
    """A fingerprint of a model folder's content: the bytes of its weight, config and tokenizer
    files (``*.safetensors``, ``*.bin``, ``*.json``), by name.

    Rewriting a file with the same bytes (a reconversion) keeps the fingerprint, and so the
    cached results of the model; any change of content changes it. Hashing reads each file
    once per version (``_file_digest``; hub cache files are not read at all).

    Args:
        path: the model folder.
        memo: where digests are remembered between processes (default
            ``<cache>/fingerprints.json``).
    """
    memo = memo if memo is not None else default_cache_dir() / "fingerprints.json"
    files = sorted(
        p
        for p in Path(path).iterdir()
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file()
    )
    rows = [(p.name, _file_digest(p, memo)) for p in files]
    return hashlib.sha256(_canonical(rows).encode()).hexdigest()[:16]


class ResultCache:
    """Keyed store of tensors with integrity checks.

    Args:
        root: the cache root; entries go under ``root/results``.
        enabled: when False, ``load`` always misses and ``save`` does nothing.
    """

    def __init__(self, root: Path | None = None, *, enabled: bool = True) -> None:
        self.root = Path(root or default_cache_dir()) / "results"
        self.enabled = enabled

    def key(self, kind: str, parts: dict[str, Any]) -> str:
        return hashlib.sha256(
            _canonical({"kind": kind, "v": FORMAT_VERSION, **parts}).encode()
        ).hexdigest()[:32]

    def _paths(self, kind: str, parts: dict[str, Any]) -> tuple[Path, Path]:
        base = self.root / kind / self.key(kind, parts)
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def load(self, kind: str, parts: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The cached tensors for this key, or None (missing, corrupt or stale entries)."""
        if not self.enabled:
            return None
        from safetensors.torch import load_file

        data_path, meta_path = self._paths(kind, parts)
        if not data_path.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("parts") != json.loads(_canonical(parts)):
                raise ValueError("key mismatch")
            if meta.get("sha256") != _sha256_file(data_path):
                raise ValueError("checksum mismatch")
            return load_file(data_path)
        except Exception:
            self.invalidate(kind, parts)
            return None

    def save(
        self, kind: str, parts: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> Path | None:
        """Write an entry atomically (temp file + rename); returns its path."""
        if not self.enabled:
            return None
        from safetensors.torch import save_file

        data_path, meta_path = self._paths(kind, parts)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{data_path}.tmp{os.getpid()}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        meta = {
            "parts": json.loads(_canonical(parts)),
            "sha256": _sha256_file(tmp),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "format": FORMAT_VERSION,
        }
        tmp_meta = Path(f"{meta_path}.tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, data_path)
        os.replace(tmp_meta, meta_path)
        return data_path

    def invalidate(self, kind: str, parts: dict[str, Any]) -> None:
        for p in self._paths(kind, parts):
            p.unlink(missing_ok=True)
