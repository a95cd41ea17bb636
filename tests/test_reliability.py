"""The app under load and after faults (docs/RELIABILITY.md).

- Load: several ``gradio_client`` sessions on loopback at once, each with its own pruning,
  mixing realign moves and chat turns (a bounded number of requests each). Every result must be
  the one the session got alone (no leak between sessions), every request must end (no
  deadlock), and the realign latency under load is printed (no timing is asserted).
- Faults: the server is killed (SIGKILL, so none of its clean-up runs) in the middle of a Ships
  run and in the middle of the built-in SmolLM2's conversion; the next start must recover with
  nothing lost that was finished before.

Each test starts its own server with its own cache folder.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest_app import (
    api_attribute,
    api_load,
    api_prune,
    api_realign,
    app_process,
    running_app,
    slow_model,
)
from gradio_client import Client

TINY = "builtin:tiny-llama"
SESSIONS = 4
ROUNDS = 3
"""Each session's realign + chat rounds in the concurrent phase (bounded requests)."""
DEADLOCK_S = 900
"""How long the concurrent phase may take before it counts as stuck (not a timing claim)."""


def chat_answers(c: Client, message: str) -> dict[str, str]:
    """One turn of a fresh conversation: each column's answer text."""
    c.predict(api_name="/chat_clear")
    *_, turn = c.predict(
        message=message,
        image=None,
        system_prompt="",
        max_new_tokens=8,
        temperature=0,
        top_p=1,
        seed=0,
        api_name="/chat",
    )
    return {v: a["text"] for v, a in turn["answers"].items()}


def test_concurrent_sessions_keep_their_own_results(tmp_path: Path) -> None:
    with running_app(tmp_path / "cache") as url:
        clients = [Client(url, verbose=False) for _ in range(SESSIONS)]
        sparsity = [0.3, 0.4, 0.5, 0.6][:SESSIONS]
        p = [0.2, 0.3, 0.4, 0.5][:SESSIONS]
        message = "Name three fruits."
        alone = []
        for c, s, pi in zip(clients, sparsity, p, strict=True):  # each session alone first
            api_load(c, TINY)
            api_attribute(c, 8)
            api_prune(c, s)
            restored = api_realign(c, p=pi)["restore"]["restored"]
            alone.append({"restored": restored, "answers": chat_answers(c, message)})
        assert len({a["restored"] for a in alone}) == SESSIONS  # the sessions really differ
        assert len({a["answers"]["pruned"] for a in alone}) > 1

        latencies: list[float] = []

        def work(i: int) -> list[dict]:
            c, seen = clients[i], []
            for r in range(ROUNDS):
                if (i + r) % 2:  # chat first in every other round: the requests interleave
                    seen.append({"answers": chat_answers(c, message)})
                t0 = time.perf_counter()
                seen.append({"restored": api_realign(c, p=p[i])["restore"]["restored"]})
                latencies.append(time.perf_counter() - t0)
                if not (i + r) % 2:
                    seen.append({"answers": chat_answers(c, message)})
            return seen

        with ThreadPoolExecutor(SESSIONS) as pool:
            futures = [pool.submit(work, i) for i in range(SESSIONS)]
            results = [f.result(timeout=DEADLOCK_S) for f in futures]  # a deadlock fails here
        for i, seen in enumerate(results):
            assert len(seen) == 2 * ROUNDS
            for result in seen:
                for key, value in result.items():
                    assert value == alone[i][key], (i, key)  # no other session's masks or answers
        print(
            f"\nrealign under load ({SESSIONS} sessions, realign and chat mixed): "
            f"median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s "
            f"over {len(latencies)} requests"
        )


def wait_for(condition, what: str, timeout: float = 300.0, every: float = 0.05) -> None:
    """Return once ``condition()`` holds (it reads state: a file, a job's progress)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout:.0f} s")
        time.sleep(every)


def cache_entries(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in (cache / "results").rglob("*") if p.is_file()}


def test_killed_mid_ships_the_next_start_keeps_every_finished_result(tmp_path: Path) -> None:
    """Kill the server while Ships runs on a slow model: the tiny model's Ships scores and Wanda
    statistics computed before are still used from the cache by the next start, no half-written
    entry is left, and Ships on the slow model then runs from the start."""
    cache = tmp_path / "cache"
    slow = slow_model(tmp_path / "slow-llama")
    with app_process(cache) as app:
        c = Client(app.url, verbose=False)
        api_load(c, TINY)
        api_attribute(c, 8)
        api_prune(c, 0.5)
        finished = cache_entries(cache)
        api_load(c, str(slow))
        job = c.submit(
            num_samples=170,
            ablation="zero",
            metric="angle",
            r_main=1,
            recompute=False,
            api_name="/attribute",
        )

        def scoring() -> bool:
            units = job.status().progress_data or []
            return any(u.unit == "prompt" and (u.index or 0) >= 1 for u in units)

        wait_for(scoring, "Ships progress on the slow model")
        app.kill()
    assert cache_entries(cache) == finished  # nothing of the killed run, nothing lost

    with app_process(cache) as app:
        c = Client(app.url, verbose=False)
        api_load(c, TINY)
        _, message, *_ = api_attribute(c, 8)
        assert "from the cache" in message
        _, message, _ = api_prune(c, 0.5)
        assert "statistics of 16 samples per set from the cache" in message
        api_load(c, str(slow))
        _, message, *_ = api_attribute(c, 4)
        assert "Done" in message and "from the cache" not in message


@pytest.mark.slow
def test_killed_mid_conversion_the_next_start_converts_again(tmp_path: Path) -> None:
    """Kill the server while it converts the built-in SmolLM2 from its GGUF file: the next start
    removes the half-written folder, converts again and says so, and the model loads."""
    cache = tmp_path / "cache"
    models = cache / "models"

    def leftovers() -> list[Path]:
        return list(models.glob(".smollm2-135m-instruct.tmp-*")) if models.is_dir() else []

    with app_process(cache) as app:
        job = Client(app.url, verbose=False).submit(
            name="builtin:smollm2-135m", dtype="auto", device="auto", api_name="/load_model"
        )
        wait_for(lambda: bool(leftovers()), "the conversion's temporary folder")
        app.kill()
        assert not job.done() or job.status().success is False
    left = leftovers()
    assert left and not (models / "smollm2-135m-instruct").exists()

    with app_process(cache) as app:
        info, message, *_ = api_load(Client(app.url, verbose=False), "builtin:smollm2-135m")
        assert "LlamaForCausalLM" in info
        assert "left by an interrupted conversion" in message
    assert not leftovers() and all(not p.exists() for p in left)
    assert (models / "smollm2-135m-instruct" / ".hsr-converted.json").is_file()


def test_an_export_leaves_one_copy_and_a_folder_takes_any_size(tmp_path: Path) -> None:
    """One export of the model leaves its zip, once, where gradio serves it from (no folder,
    no second copy in the temporary folder); saving to a folder leaves only that folder."""
    import zipfile

    temp, served = tmp_path / "tmp", tmp_path / "gradio"
    temp.mkdir()
    env = {"TMPDIR": str(temp), "GRADIO_TEMP_DIR": str(served)}
    with running_app(tmp_path / "cache", env=env) as url:
        c = Client(url, verbose=False)
        api_load(c, TINY)
        api_attribute(c, 8)
        api_prune(c, 0.5)
        api_realign(c)
        zip_path, message = c.predict(variant="realigned", api_name="/export_model")
        assert "Done" in message
        with zipfile.ZipFile(zip_path) as z:
            assert any(n.endswith("model.safetensors") for n in z.namelist())
        saved = tmp_path / "saved"
        message = c.predict(variant="pruned", folder=str(saved), api_name="/save_model")
        assert f"Saved** the pruned model to `{saved}`" in message
        assert (saved / "model.safetensors").is_file() and (saved / "README.md").is_file()

    def weights(root: Path) -> list[Path]:
        return [p for p in root.rglob("*") if p.suffix in (".zip", ".safetensors")]

    (served_zip,) = weights(served)
    assert served_zip.suffix == ".zip"
    assert weights(temp) == []  # nothing left in the temporary folder


def test_a_model_too_big_for_a_zip_is_pointed_to_a_folder(monkeypatch) -> None:
    from ui.tabs import export

    monkeypatch.setattr(export, "_require_variant", lambda state, variant: None)
    monkeypatch.setattr(export.WORKBENCH, "require", lambda state: None)
    monkeypatch.setattr(export, "_size_mb", lambda: 13_500.0)
    with pytest.raises(Exception, match="13.2 GB, too big to download as a zip") as e:
        export.export_model("pruned", None, None)
    assert "save it to a folder of this machine, or push it to the hub" in str(e.value)
