"""Shared fixtures: tiny models built in-process from configs, loaded through the real loader.

The built-in tiny models are written once per test session into a temporary cache folder
(``HSR_CACHE_DIR``); every test that changes weights gets its own freshly loaded model.

``HSR_TEST_ORDER=reverse`` or ``HSR_TEST_ORDER=seed:N`` runs the collected tests in reverse, or
the files in a random order (seeded) and each file's tests in a random order, to check that no
test needs another to run before it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from tiny_models import BUILDERS

from hsr_core.builtin import save_tiny_llama
from hsr_core.models import load_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Reorder the tests as ``HSR_TEST_ORDER`` says (``reverse``, ``seed:N``); as collected
    when it is unset."""
    order = os.environ.get("HSR_TEST_ORDER", "")
    if order == "reverse":
        items.reverse()
    elif order.startswith("seed:"):  # files in a random order, each file's tests too
        rng = random.Random(int(order.removeprefix("seed:")))
        files: dict[str, list[pytest.Item]] = {}
        for item in items:
            files.setdefault(item.nodeid.split("::")[0], []).append(item)
        groups = list(files.values())
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
        items[:] = [item for group in groups for item in group]
    elif order:
        raise pytest.UsageError(f"HSR_TEST_ORDER must be reverse or seed:N, got {order!r}")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hsr-cache")
    os.environ["HSR_CACHE_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def mha_folder(tmp_path_factory: pytest.TempPathFactory, cache_root: Path) -> Path:
    """A tiny Llama with multi-head attention (4 heads, 4 KV heads), saved to a folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-mha"), num_key_value_heads=4)


@pytest.fixture
def tiny_llama(cache_root: Path):
    """The built-in tiny Llama (GQA: 4 heads, 2 KV heads), freshly loaded."""
    torch.manual_seed(0)
    return load_model("builtin:tiny-llama", cache_dir=cache_root)


@pytest.fixture
def tiny_mha(mha_folder: Path, cache_root: Path):
    return load_model(str(mha_folder), cache_dir=cache_root)


@pytest.fixture
def tiny_llava(cache_root: Path):
    """The built-in tiny LLaVA-NeXT (CLIP tower + tiny Llama)."""
    return load_model("builtin:tiny-llava-next", cache_dir=cache_root)


@pytest.fixture
def tiny_mllama(cache_root: Path):
    """The built-in tiny Llama-3.2-Vision (tiled vision tower; 4 decoder layers, layer 2 a
    cross-attention layer)."""
    return load_model("builtin:tiny-mllama", cache_dir=cache_root)


@pytest.fixture(scope="session")
def arch_folder(tmp_path_factory: pytest.TempPathFactory, cache_root: Path):
    """``arch_folder(name)``: the folder of the tiny model ``name`` of ``tests/tiny_models.py``
    (Mistral, Qwen2, plain LLaVA, Qwen2-VL, Qwen2.5-VL), built on first use in the session."""
    made: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in made:
            made[name] = BUILDERS[name](tmp_path_factory.mktemp(f"tiny-{name}"))
        return made[name]

    return folder


@pytest.fixture(params=["gqa", "mha", "llava", "mllama", *BUILDERS])
def any_tiny(request: pytest.FixtureRequest, cache_root: Path, mha_folder: Path, arch_folder):
    """Each tiny architecture in turn: every one ``hsr_core.models.SUPPORTED`` names
    (``llava`` is LLaVA-NeXT, ``plain-llava`` LlavaForConditionalGeneration)."""
    names = {
        "gqa": "builtin:tiny-llama",
        "mha": str(mha_folder),
        "llava": "builtin:tiny-llava-next",
        "mllama": "builtin:tiny-mllama",
    }
    name = names.get(request.param) or str(arch_folder(request.param))
    return load_model(name, cache_dir=cache_root)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch):
    """Point huggingface_hub at a given cache folder, offline; forget verified hashes.

    huggingface_hub reads its settings at import, so its constants are patched too."""
    from huggingface_hub import constants

    from hsr_core import smollm2

    def use(cache: Path) -> Path:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HOME", str(cache.parent / "hf-home"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        return cache

    monkeypatch.setattr(smollm2, "_verified", set())
    return use
