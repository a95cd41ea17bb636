"""Model folders the project builds: damaged weights found and rebuilt, temporary folders of
killed builds removed, and fingerprints of a folder's content (not of its files' times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hsr_core import builtin, smollm2
from hsr_core.config import ModelSpec
from hsr_core.folders import damaged_weights, remove_stale, temp_sibling
from hsr_core.models import ModelLoadError, load_model, resolve_path
from hsr_core.store import folder_fingerprint


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_damaged_weights_finds_truncated_and_garbled_files(tmp_path: Path) -> None:
    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    assert damaged_weights(tmp_path) is None
    truncate(tmp_path / "model.safetensors")
    assert "truncated" in damaged_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 100)
    assert "header" in damaged_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    assert "3 bytes" in damaged_weights(tmp_path)


def test_temporary_folders_of_gone_builders_are_removed(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    stale = tmp_path / f".model.tmp-{dead_pid()}-x1"
    legacy = tmp_path / ".model.tmp-abc123"  # named before the builder's pid was in the name
    old = tmp_path / f".model.old-{dead_pid()}-x2"
    other = tmp_path / f".model.tmp-{os.getppid()}-x3"  # a live builder in another process
    for folder in (stale, legacy, old, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    mine = temp_sibling(dest)  # this process's build, running now
    same_pid_earlier = tmp_path / f".model.tmp-{os.getpid()}-x4"  # a restarted server's pid
    same_pid_earlier.mkdir()
    assert sorted(remove_stale(dest)) == sorted([stale, legacy, old, same_pid_earlier])
    assert other.is_dir() and mine.is_dir()


def test_a_damaged_builtin_model_is_rebuilt(tmp_path: Path) -> None:
    folder = builtin.materialize("tiny-llama", cache_dir=tmp_path)
    good = (folder / "model.safetensors").read_bytes()
    truncate(folder / "model.safetensors")
    (folder.parent / f".{folder.name}.tmp-{dead_pid()}-x").mkdir()  # a build killed midway
    again = builtin.materialize("tiny-llama", cache_dir=tmp_path)
    assert again == folder and damaged_weights(folder) is None
    assert (folder / "model.safetensors").read_bytes() == good  # rebuilt the same
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    loaded = load_model("builtin:tiny-llama", cache_dir=tmp_path)
    assert loaded.adapter.num_layers == 2


def test_a_damaged_folder_is_explained_before_loading(tmp_path: Path) -> None:
    folder = builtin.save_tiny_llama(tmp_path / "mine")
    truncate(folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"damaged \(model.safetensors is .* \(truncated\)"):
        resolve_path(ModelSpec(str(folder)), tmp_path, lambda _m: None)


@pytest.fixture
def fake_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """convert_smollm2 with a tiny Llama for the GGUF's weights (no GGUF file is read)."""
    gguf = tmp_path / smollm2.GGUF_FILENAME
    gguf.write_bytes(b"GGUF")

    def convert_into(folder: Path, _gguf: Path, log) -> None:
        log("Saving the converted model...")
        builtin.save_tiny_llama(folder)

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", lambda log=None: gguf)
    monkeypatch.setattr(smollm2, "_packaged_gguf", lambda: (_ for _ in ()).throw(FileNotFoundError))
    monkeypatch.setattr(smollm2, "_convert_into", convert_into)
    return tmp_path / "models" / "smollm2-135m-instruct"


def test_a_truncated_conversion_is_converted_again_with_a_message(fake_conversion: Path) -> None:
    dest = fake_conversion
    smollm2.convert_smollm2(dest)
    truncate(dest / "model.safetensors")
    messages: list[str] = []
    assert smollm2.convert_smollm2(dest, log=messages.append) == dest
    assert any("is damaged (model.safetensors is" in m for m in messages), messages
    assert damaged_weights(dest) is None
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # nothing left aside


def test_an_interrupted_conversion_leaves_no_folder_behind(fake_conversion: Path) -> None:
    dest = fake_conversion
    dest.parent.mkdir(parents=True)
    killed = dest.parent / f".{dest.name}.tmp-{dead_pid()}-abc"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 4096)
    messages: list[str] = []
    smollm2.convert_smollm2(dest, log=messages.append)
    assert not killed.exists()
    assert any("left by an interrupted conversion" in m for m in messages), messages
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_the_fingerprint_follows_content_not_times(tmp_path: Path) -> None:
    folder = builtin.save_tiny_llama(tmp_path / "model")
    memo = tmp_path / "fingerprints.json"
    before = folder_fingerprint(folder, memo)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # rewritten with the same bytes: a new time and inode
    os.utime(weights, ns=(1, 1))
    assert folder_fingerprint(folder, memo) == before
    changed = bytearray(data)
    changed[-1] ^= 1
    weights.write_bytes(bytes(changed))
    assert folder_fingerprint(folder, memo) != before
    assert len(json.loads(memo.read_text())) >= 3  # digests kept for the next process


def test_a_hub_snapshot_is_fingerprinted_by_its_blob_names(tmp_path: Path) -> None:
    """Files of the hub cache link to blobs named by their hash: nothing is read."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / ("c" * 40)
    blobs.mkdir()
    snap.mkdir(parents=True)
    sha = "a" * 64
    (blobs / sha).write_bytes(b"not read")
    (snap / "model.safetensors").symlink_to(blobs / sha)
    first = folder_fingerprint(snap, tmp_path / "memo.json")
    (blobs / sha).write_bytes(b"changed, but the blob's name says what it holds")
    assert folder_fingerprint(snap, tmp_path / "memo.json") == first
    assert not (tmp_path / "memo.json").exists()
