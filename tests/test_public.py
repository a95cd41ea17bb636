"""Public mode (``ui.public``): the policy read from the environment, its refusals in-process,
the page it builds, and then an app launched in public mode on the built-in tiny Llama, driven
with ``gradio_client`` as a visitor would (every refusal has its words, through the API).

``tests/test_space.py`` launches the app as a Space (``SPACE_ID``, ``requirements.txt`` alone,
the built-in SmolLM2 from a hub cache); this module keeps to the tiny model and the fast paths.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest_app import ROOT, api_attribute, api_load, api_prune, api_realign, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from hsr_core.config import ModelSpec
from ui import public
from ui.public import BUILTIN_MODELS, DEFAULT_MODEL, Policy, Refused

TINY = "builtin:tiny-llama"
LIMIT_MB = 0.01  # 10 kB: the tests' uploads stay small
PUBLIC_ENV = {
    "HSR_PUBLIC": "1",
    "HSR_MODEL": TINY,
    "HSR_MODELS": "org/allowed-model",
    "HSR_DATASETS": "org/allowed-data",
    "HSR_MAX_UPLOAD_MB": str(LIMIT_MB),
}


def public_policy(**kw) -> Policy:
    return replace(Policy.from_env(PUBLIC_ENV), **kw)


def rows_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def calibration_rows(n: int = 3, **extra) -> list[dict]:
    return [
        {"prompt": f"How do I hurt someone, way {i}?", "response": "I can't.", "harmful": True}
        | extra
        for i in range(n)
    ] + [
        {"prompt": f"Name a fruit ({i}).", "response": "An apple.", "harmful": False} | extra
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# the policy, from the environment


def test_local_use_is_not_public_and_changes_nothing(tmp_path: Path) -> None:
    p = Policy.from_env({})
    assert not p.public
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 20_000_000)
    p.check_model(ModelSpec("/any/local/folder", dtype="float32", device="cpu"))
    p.check_data("VLGuard folder", "/data/VLGuard", None)
    p.check_data("hub dataset", "any/dataset", None)
    p.check_data("file", "/etc/hostname", None)
    assert p.check_upload(big, "file") == str(big)
    p.check_push_token("")
    assert p.image_paths
    assert p.state_options(print) == {} and p.launch_options() == {} and p.blocks_options() == {}
    assert p.queue_options() is None
    assert p.model_choices(["a", "b"]) == ["a", "b"]
    assert p.data_sources(["built-in", "VLGuard folder"]) == ["built-in", "VLGuard folder"]


@pytest.mark.parametrize(
    ("env", "public_mode"),
    [
        ({}, False),
        ({"SPACE_ID": "someone/hsr-workbench"}, True),
        ({"HSR_PUBLIC": "1"}, True),
        ({"HSR_PUBLIC": "true"}, True),
        ({"SPACE_ID": "someone/hsr-workbench", "HSR_PUBLIC": "0"}, False),
        ({"SPACE_ID": ""}, False),
    ],
)
def test_public_mode_is_on_in_a_space_or_when_asked(env: dict, public_mode: bool) -> None:
    assert Policy.from_env(env).public is public_mode


def test_the_allow_list_is_the_built_in_models_and_hsr_models() -> None:
    p = Policy.from_env({"SPACE_ID": "x/y", "HSR_MODELS": " org/a, org/b ,org/a,"})
    assert p.model == DEFAULT_MODEL
    assert p.models == (*BUILTIN_MODELS, "org/a", "org/b")
    assert "builtin:smollm2-135m-safe" in BUILTIN_MODELS and TINY in BUILTIN_MODELS
    assert p.datasets == () and p.max_upload_mb == 10 and p.max_upload_bytes == 10_000_000
    assert p.session_ttl_s == 3600 and p.queue_size == 20
    served = Policy.from_env({"HSR_PUBLIC": "1", "HSR_MODEL": "org/b", "HSR_MODELS": "org/b"})
    assert served.served == ModelSpec("org/b")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"HSR_PUBLIC": "maybe"}, "HSR_PUBLIC must be 1 or 0"),
        ({"HSR_MODEL": "org/elsewhere"}, "not on the allow-list.*add it to HSR_MODELS"),
        ({"HSR_MODELS": "/srv/models/mine"}, "never loads a local path"),
        ({"HSR_MODELS": "org/../etc"}, "never loads a local path"),
        ({"HSR_DATASETS": "./data.jsonl"}, "HSR_DATASETS may name hub dataset ids"),
        ({"HSR_MAX_UPLOAD_MB": "lots"}, "HSR_MAX_UPLOAD_MB must be a number"),
        ({"HSR_SESSION_TTL_S": "0"}, "HSR_SESSION_TTL_S must be above 0"),
    ],
)
def test_a_policy_that_cannot_be_kept_stops_the_start(env: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Policy.from_env({"SPACE_ID": "x/y", **env})


# ---------------------------------------------------------------------------------------------
# refusals, in-process


def test_only_the_served_model_loads() -> None:
    p = public_policy()
    p.check_model(ModelSpec(TINY))
    for name, match in (
        ("builtin:tiny-llava-next", "serves builtin:tiny-llama to every visitor.*operator"),
        ("org/allowed-model", "only its operator changes that"),
        ("org/elsewhere", "org/elsewhere is not on this public app's allow-list"),
        ("builtin:nope", "not on this public app's allow-list"),
        ("/etc", "never opens files or folders of its server"),
        ("/no/such/folder", "never opens files or folders of its server"),
        ("./models/x", "local paths are refused"),
        ("a/b/c", "local paths are refused"),
    ):
        with pytest.raises(Refused, match=match):
            p.check_model(ModelSpec(name))
    with pytest.raises(Refused, match="dtype auto and device auto"):
        p.check_model(ModelSpec(TINY, dtype="float16"))
    with pytest.raises(Refused, match="dtype auto and device auto"):
        p.check_model(ModelSpec(TINY, device="cpu"))


def test_data_comes_from_no_server_file(tmp_path: Path) -> None:
    p = public_policy()
    p.check_data("built-in", "", None)
    p.check_data("hub dataset", "org/allowed-data", None)
    small = rows_file(tmp_path / "small.jsonl", calibration_rows(1))
    p.check_data("file", "", str(small))
    p.check_data("file", "/etc/hostname", str(small))  # the upload is used, not the path
    for args, match in (
        (("VLGuard folder", "/data/VLGuard", None), "VLGuard folder is a folder on the server"),
        (("hub dataset", "org/other", None), "org/other is not on this app's allow-list"),
        (("file", "/etc/hostname", None), "names a file on the server"),
    ):
        with pytest.raises(Refused, match=match) as refused:
            p.check_data(*args)
        assert "org/allowed-data" in str(refused.value)  # says what is allowed instead
    assert p.data_sources(["built-in", "VLGuard folder", "hub dataset", "file"]) == [
        "built-in",
        "hub dataset",
        "file",
    ]
    assert "hub dataset" not in public_policy(datasets=()).data_sources(["hub dataset"])


def test_uploads_are_limited(tmp_path: Path) -> None:
    p = public_policy()
    at_limit = tmp_path / "at.jsonl"
    at_limit.write_bytes(b"x" * p.max_upload_bytes)
    assert p.check_upload(at_limit, "file") == str(at_limit)
    over = tmp_path / "over.jsonl"
    over.write_bytes(b"x" * (p.max_upload_bytes + 1))
    with pytest.raises(Refused, match=r"uploaded data file is 0\.0 MB.*at most 0\.01 MB"):
        p.check_data("file", "", str(over))
    with pytest.raises(Refused, match="evaluation file"):
        p.check_upload(over, "evaluation file")
    assert p.check_upload(None, "file") is None


def test_pushing_needs_the_visitors_own_token() -> None:
    p = public_policy()
    p.check_push_token("hf_mine")
    for token in ("", "   "):
        with pytest.raises(Refused, match="your own Hugging Face write token"):
            p.check_push_token(token)


def test_refusals_are_messages_with_their_own_title() -> None:
    from ui.events import explain

    title, message = explain(Refused("not here"))
    assert title == "Not allowed in this public app" and message == "not here"


def test_public_data_may_not_name_image_files(tmp_path: Path, monkeypatch) -> None:
    """Rows naming an image are refused before the path is looked at, whether it exists or
    not (so a visitor learns nothing of the server's files)."""
    from hsr_core import pipeline
    from ui.tabs.model import data_spec

    monkeypatch.setattr(public, "POLICY", public_policy())
    for image in ("/etc/hostname", "/no/such/image.png"):
        upload = rows_file(tmp_path / "rows.jsonl", calibration_rows(1, image=image))
        spec = data_spec("file", "", "", str(upload))
        assert not spec.image_paths
        with pytest.raises(pipeline.DataError, match="row 1: names an image file") as e:
            pipeline.load_calibration(spec.source, image_paths=spec.image_paths)
        assert "does not exist" not in str(e.value)
        with pytest.raises(pipeline.DataError, match="names an image file"):
            pipeline.load_eval(upload, image_paths=False)
    assert data_spec("built-in", "", "", None).image_paths  # nothing to name there
    monkeypatch.setattr(public, "POLICY", Policy())
    assert data_spec("file", "", "", str(upload)).image_paths  # local use: as before


# ---------------------------------------------------------------------------------------------
# the page public mode builds


def states(demo) -> list:
    import gradio as gr

    return [b for b in demo.blocks.values() if isinstance(b, gr.State)]


def test_the_page_in_public_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from ui.layout import build_demo, launch_kwargs
    from ui.workbench import WORKBENCH

    local = build_demo()
    assert all(s.time_to_live == float("inf") for s in states(local))
    assert "max_file_size" not in launch_kwargs() and local._queue.max_size is None

    monkeypatch.setattr(public, "POLICY", public_policy(session_ttl_s=600, queue_size=7))
    demo = build_demo()
    kept = states(demo)
    assert kept and all(s.time_to_live == 600 for s in kept)
    session_state = next(s for s in kept if type(s.value).__name__ == "Session")
    assert session_state.delete_callback == WORKBENCH.drop
    assert demo._queue.max_size == 7
    assert launch_kwargs()["max_file_size"] == 10_000
    assert demo.delete_cache == (600, 600)
    model_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "hsr-model")
    assert [c[1] for c in model_box.choices] == [TINY] and model_box.value == TINY
    unloads = [f for f in demo.fns.values() if any(t[1] == "unload" for t in f.targets)]
    assert {f.name for f in unloads} == {"forget", "drop_state"}


def test_a_gone_session_leaves_nothing_in_the_shared_model(cache_root: Path) -> None:
    """``Workbench.drop`` (the state's delete callback) takes the session's masks out of the
    shared variants, and only that session's."""
    from hsr_core import pipeline
    from hsr_core.config import WandaConfig
    from ui.session import DataSpec, Session
    from ui.workbench import MODEL_THREAD, Workbench

    wb = Workbench(cache_root / "drop")
    wb.load(ModelSpec(TINY))
    cfg = WandaConfig(num_samples=2)
    calib = wb.calibration(DataSpec())
    with wb.variants.use("original") as dense:
        safety, utility = pipeline.calibration_samples(dense, calib, cfg)
        norms = pipeline.calibrate(dense, safety, utility, cfg, wb.cache).value
        masks = pipeline.prune(dense, norms, utility, cfg).value.masks
    mine = Session(wb.model_key, TINY, masks=masks)
    wb.install(mine)
    with wb.variants.use("pruned"):
        pass
    other = replace(mine, masks=dict(masks))  # equal masks, another session's object
    wb.drop(other)
    wb.drop(Session())
    MODEL_THREAD.call(lambda: None)  # the drops ran before this (one queue)
    assert wb.variants.masks is masks
    wb.drop(mine)
    MODEL_THREAD.call(lambda: None)
    assert wb.variants.masks is None and wb.variants.restore is None
    assert wb.variants.current == "original"
    wb.release()


@pytest.fixture
def public_demo(monkeypatch: pytest.MonkeyPatch):
    """``build_demo`` in public mode, launched in this process; yields (url, dropped sessions).

    The heartbeat runs every half second, so a closed client is seen closed at once."""
    from conftest_app import free_port

    from ui.layout import build_demo, launch_kwargs
    from ui.workbench import WORKBENCH

    def launch(**policy):
        monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")
        monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        monkeypatch.setattr(public, "POLICY", public_policy(**policy))
        dropped: list = []
        monkeypatch.setattr(WORKBENCH, "drop", dropped.append)
        demo = build_demo()
        port = free_port()
        kwargs = {k: v for k, v in launch_kwargs().items() if k == "max_file_size"}
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **kwargs)
        demos.append(demo)
        return f"http://127.0.0.1:{port}/", dropped

    demos: list = []
    yield launch
    for demo in demos:
        demo.close()


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def load_builtin_data(c: Client):
    return c.predict(source="built-in", location="", columns="", upload=None, api_name="/load_data")


def test_a_closed_tabs_state_is_deleted_at_once(public_demo) -> None:
    url, dropped = public_demo()
    c = Client(url, verbose=False)
    load_builtin_data(c)  # the session's state is written
    time.sleep(1.0)
    assert dropped == []  # open: kept
    c.close()
    assert wait_for(lambda: dropped), "the closed session's state was not deleted"
    assert type(dropped[0]).__name__ == "Session"


def test_an_idle_sessions_state_expires(public_demo) -> None:
    url, dropped = public_demo(session_ttl_s=1)
    c = Client(url, verbose=False)
    load_builtin_data(c)
    assert wait_for(lambda: dropped, timeout=10), "the state outlived its time-to-live"
    c.close()


# ---------------------------------------------------------------------------------------------
# the app in public mode, through gradio_client


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):
    with running_app(tmp_path_factory.mktemp("public-app-cache"), env=PUBLIC_ENV) as address:
        yield address


def client(url: str) -> Client:
    return Client(url, verbose=False)


def summary(c: Client) -> dict:
    return c.predict(api_name="/summary")


def test_the_served_model_loads_and_no_other(url: str) -> None:
    c = client(url)
    info, message, *_ = api_load(c, TINY)
    assert "| layers | 2 |" in info and TINY in message
    for name, match in (
        ("builtin:tiny-llava-next", "only its operator changes that"),
        ("org/allowed-model", "only its operator changes that"),
        ("org/elsewhere", "not on this public app's allow-list"),
        (str(ROOT), "never opens files or folders of its server"),
        ("/no/such/folder", "never opens files or folders of its server"),
    ):
        with pytest.raises(AppError, match=match):
            api_load(c, name)
    with pytest.raises(AppError, match="dtype auto and device auto") as refused:
        c.predict(name=TINY, dtype="float16", device="auto", api_name="/load_model")
    assert refused.value.title == "Load model: Not allowed in this public app"
    assert summary(c)["loaded_model"] == TINY


def test_two_visitors_cannot_change_each_others_model(url: str) -> None:
    mine, other = client(url), client(url)
    api_load(mine, TINY)
    api_attribute(mine, 8)
    api_prune(mine)
    before = api_realign(mine)["restore"]["restored"]
    _, message, *_ = api_load(other, TINY)
    assert "already loaded" in message  # the served model is selected, not reloaded
    with pytest.raises(AppError, match="only its operator"):
        api_load(other, "builtin:tiny-llava-next")
    assert api_realign(mine)["restore"]["restored"] == before  # no "another tab replaced it"
    *columns, _msg, turn = mine.predict(
        message="Name a fruit.",
        image=None,
        system_prompt="",
        max_new_tokens=4,
        temperature=0,
        top_p=1,
        seed=0,
        api_name="/chat",
    )
    assert turn["model"] == TINY
    assert {a["status"] for a in turn["answers"].values()} <= {"answered", "refused"}
    assert summary(other)["loaded_model"] == TINY


def test_data_from_the_server_is_refused(url: str, tmp_path: Path) -> None:
    c = client(url)
    server_file = ROOT / "assets" / "data" / "harmful.jsonl"
    for source, location, match in (
        ("file", str(server_file), "names a file on the server"),
        ("hub dataset", "org/other", "not on this app's allow-list"),
        ("VLGuard folder", "/data/VLGuard", "not in the list of choices"),  # not offered
    ):
        with pytest.raises(AppError, match=match):
            c.predict(
                source=source, location=location, columns="", upload=None, api_name="/load_data"
            )
    with pytest.raises(AppError, match="the dataset 'org/allowed-data' is not in the local hub"):
        c.predict(  # allowed: it gets as far as the (offline) hub
            source="hub dataset",
            location="org/allowed-data",
            columns="",
            upload=None,
            api_name="/load_data",
        )
    pictured = rows_file(tmp_path / "pictured.jsonl", calibration_rows(2, image="/etc/hostname"))
    with pytest.raises(AppError, match="names an image file"):
        c.predict(
            source="file",
            location="",
            columns="",
            upload=handle_file(str(pictured)),
            api_name="/load_data",
        )
    fine = rows_file(tmp_path / "fine.jsonl", calibration_rows(3))
    info, *_ = c.predict(
        source="file", location="", columns="", upload=handle_file(str(fine)), api_name="/load_data"
    )
    assert "3 harmful requests" in info


def test_oversized_uploads_are_refused(url: str, tmp_path: Path) -> None:
    c = client(url)
    big = rows_file(tmp_path / "big.jsonl", calibration_rows(200))
    assert big.stat().st_size > LIMIT_MB * 1e6
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10000 bytes"):
        c.predict(
            source="file",
            location="",
            columns="",
            upload=handle_file(str(big)),
            api_name="/load_data",
        )
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        c.predict(source="upload", upload=handle_file(str(big)), api_name="/evaluate")
    # and the server refuses it too, whatever the client checks
    with open(big, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.jsonl", f)}, timeout=30)
    assert r.status_code == 413 and "maximum allowed size" in r.text


def test_evaluation_uploads_name_no_server_files(url: str, tmp_path: Path) -> None:
    c = client(url)
    api_load(c, TINY)
    rows = [{"prompt": "Hi", "harmful": False, "image": "/etc/hostname"}]
    pictured = rows_file(tmp_path / "eval.jsonl", rows)
    with pytest.raises(AppError, match="names an image file"):
        c.predict(source="upload", upload=handle_file(str(pictured)), api_name="/evaluate")


def test_pushing_needs_a_token_of_ones_own(url: str) -> None:
    c = client(url)
    with pytest.raises(AppError, match="your own Hugging Face write token"):
        c.predict(
            variant="pruned", repo_id="me/model", token="", private=True, api_name="/push_to_hub"
        )
