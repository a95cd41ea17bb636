"""Model folders built in place: temporary siblings that outlive no builder, and weight files
checked for damage before they are trusted.

A model folder the project makes (the converted SmolLM2, the built-in tiny models, a merged
safety adapter) is written into a temporary sibling, ``.<name>.tmp-<pid>-<random>``, and
renamed into place when complete. A builder killed midway (a crash, a stopped server) leaves
that sibling behind; ``remove_stale`` deletes the siblings whose builder process is gone, so a
later build cleans up after it, while a build running in another process keeps its own.

``damaged_weights`` reads only the header of each ``*.safetensors`` file (8 bytes of length,
then a JSON table of tensors and their byte ranges) and compares the bytes the table needs
with the file's size, so a truncated or overwritten file is found in microseconds, before a
load fails on it with a bare ``SafetensorError``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

__all__ = ["damaged_weights", "remove_stale", "temp_sibling"]

_HEADER_MAX = 100 * 2**20
"""The largest safetensors header accepted (the format's own limit is 100 MB)."""


_MINE: set[Path] = set()
"""The temporary folders this process made (a restarted server may get the same pid)."""


def temp_sibling(dest: Path, kind: str = "tmp") -> Path:
    """A new empty folder next to ``dest`` for building it: ``.<name>.<kind>-<pid>-<random>``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{kind}-{os.getpid()}-", dir=dest.parent))
    _MINE.add(folder)
    return folder


def _in_use(folder: Path, pid: int) -> bool:
    if pid == os.getpid():
        return folder in _MINE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(dest: Path) -> list[Path]:
    """Delete the temporary siblings of ``dest`` left by builders that are gone.

    Returns:
        The folders deleted.
    """
    dest = Path(dest)
    removed = []
    if not dest.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for folder in dest.parent.glob(f".{dest.name}.{kind}-*"):
            pid = folder.name[len(f".{dest.name}.{kind}-") :].split("-", 1)[0]
            if folder.is_dir() and (not pid.isdigit() or not _in_use(folder, int(pid))):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes long"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(_HEADER_MAX, size - 8):
            return f"{path.name} has a header of {n} bytes in a {size}-byte file"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    ends = [
        t["data_offsets"][1]
        for name, t in header.items()
        if name != "__metadata__" and isinstance(t, dict) and "data_offsets" in t
    ]
    needed = 8 + n + max(ends, default=0)
    if size < needed:
        return f"{path.name} is {size:,} bytes, its header needs {needed:,} (truncated)"
    return None


def damaged_weights(folder: Path) -> str | None:
    """What is wrong with the ``*.safetensors`` files of ``folder``, or None when each is whole.

    Args:
        folder: a model folder (files directly inside it).

    Returns:
        A short description naming the first damaged file, or None.
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            problem = _safetensors_problem(path)
        except OSError as e:
            problem = f"{path.name} cannot be read ({e})"
        if problem is not None:
            return problem
    return None
