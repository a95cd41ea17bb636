"""Helpers of the app and browser tests: run ``app.py`` in a subprocess on a free port, and
make a model slow enough to stop.

The app gets its own cache folder (``HSR_CACHE_DIR``), no hub access (``HF_HUB_OFFLINE=1``, so
that an unknown hub id fails at once instead of after retries) and no analytics.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``pytest`` run without ``python -m``
    sys.path.insert(0, str(ROOT))


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
"""Flags for Debian's Chromium under Playwright (no sandbox in containers, no network chatter)."""


def run_api_doc_example(url: str, endpoint: str) -> str:
    """Run the first ``python`` block of docs/API.md that calls ``endpoint`` against ``url``.

    Returns its standard output; fails the test with its standard error when it fails.
    """
    import re

    doc = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    code = next(b for b in blocks if f'api_name="{endpoint}"' in b)
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HSR_URL": url},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


# the app's API, as the tests and bench/bench_app_chat.py drive it


def api_load(c: Any, name: str) -> Any:
    return c.predict(name=name, dtype="auto", device="auto", api_name="/load_model")


def api_attribute(c: Any, num_samples: int = 8, *, recompute: bool = False) -> Any:
    return c.predict(
        num_samples=num_samples,
        ablation="zero",
        metric="angle",
        r_main=1,
        recompute=recompute,
        api_name="/attribute",
    )


def api_prune(
    c: Any, sparsity: float = 0.5, *, structure: str = "unstructured", num_samples: int = 16
) -> Any:
    return c.predict(
        sparsity=sparsity,
        structure=structure,
        mode="one-shot",
        num_samples=num_samples,
        recompute=False,
        api_name="/prune",
    )


REALIGN_OUTPUTS = [
    "status",
    "message",
    "totals",
    "heatmap",
    "bars",
    "head",
    "head_plot",
    "p",
    "q",
    "max_p",
    "top_h",
    "restore",
]


def api_realign(
    c: Any, p=0.5, q=0.5, max_p=0.7, top_h=8, slicing="head", head=None
) -> dict[str, Any]:
    """Outputs of /realign by name."""
    out = c.predict(
        p=p, q=q, max_p=max_p, top_h=top_h, slicing=slicing, head=head, api_name="/realign"
    )
    return dict(zip(REALIGN_OUTPUTS, out, strict=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(
    cache_dir: Path,
    *,
    timeout: float = 180.0,
    app_dir: Path = ROOT,
    port: int | None = None,
    env: dict[str, str] | None = None,
    python: str | Path = sys.executable,
) -> Iterator[str]:
    """Start ``python app.py`` (of ``app_dir``); yield its URL once it answers; stop it after.

    ``env`` adds to (or overrides) the environment described above; ``python`` is the
    interpreter (another virtual environment's, for the Space simulation).

    Raises:
        RuntimeError: with the server's log when it exits or does not answer in time, or
            when it died while the caller used it.
    """
    with app_process(
        cache_dir, timeout=timeout, app_dir=app_dir, port=port, env=env, python=python
    ) as app:
        yield app.url
        if app.proc.poll() is not None:
            raise RuntimeError(f"app.py died during the tests:\n{app.log.read_text()}")


class App:
    """A running ``app.py``: its URL, its process and its log file."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: no clean-up of its own runs) and wait for it."""
        self.proc.kill()
        self.proc.wait()


@contextmanager
def app_process(
    cache_dir: Path,
    *,
    timeout: float = 180.0,
    app_dir: Path = ROOT,
    port: int | None = None,
    env: dict[str, str] | None = None,
    python: str | Path = sys.executable,
) -> Iterator[App]:
    """``running_app``, yielding the ``App`` (the fault tests kill it midway)."""
    port = port or free_port()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(cache_dir) / "server.log"
    env = {
        **os.environ,
        "HSR_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(python), "app.py"], cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"app.py did not answer in {timeout:.0f} s:\n{log_path.read_text()}"
                )
            time.sleep(0.5)
        yield App(url, proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def slow_model(folder: Path) -> Path:
    """A random Llama (16 layers, 8 heads, 4 KV heads, hidden 192) saved as a folder.

    Ships over all 170 built-in harmful prompts takes about two minutes on a 2-core CPU (the
    built-in tiny Llama takes about a second), so a test can stop it midway. With 8 layers it
    took 24.6 s on an idle CI machine, and the browser test's Stop came after the end.
    """
    from hsr_core.builtin import save_tiny_llama

    return save_tiny_llama(
        Path(folder),
        num_hidden_layers=16,
        hidden_size=192,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=384,
    )


def unsupported_model(folder: Path) -> Path:
    """A tiny GPT-2 (fused attention, no q/k/v/o projections) with a chat template: it loads,
    but HSR cannot map its heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hsr_core.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
