"""The app end to end through its API: ``app.py`` launched in a subprocess and driven with
``gradio_client`` on the built-in tiny Llama (2 layers, 4 heads, 2 KV heads).

One server serves the whole module (its own cache folder, no hub access). Each test opens
its own ``Client`` (= one browser session) unless it continues the main session's work.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest_app import (
    REALIGN_OUTPUTS,
    api_attribute,
    api_load,
    api_prune,
    api_realign,
    run_api_doc_example,
    running_app,
    slow_model,
    unsupported_model,
)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

TINY = "builtin:tiny-llama"
ENDPOINTS = {
    "/load_model",
    "/load_data",
    "/attribute",
    "/stop",
    "/prune",
    "/realign",
    "/head_detail",
    "/summary",
    "/localize",
}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):
    with running_app(tmp_path_factory.mktemp("app-cache")) as address:
        yield address


def client(url: str) -> Client:
    return Client(url, verbose=False)


def load(c: Client, name: str = TINY):
    return api_load(c, name)


def attribute(c: Client, n: int = 8, *, recompute: bool = False):
    return api_attribute(c, n, recompute=recompute)


def prune(c: Client, sparsity: float = 0.5, structure: str = "unstructured"):
    return api_prune(c, sparsity, structure=structure)


realign = api_realign


def summary(c: Client) -> dict:
    return c.predict(api_name="/summary")


@pytest.fixture(scope="module")
def session(url: str) -> Client:
    """A session that has loaded the tiny model, attributed (8 prompts) and pruned (50%)."""
    c = client(url)
    load(c)
    attribute(c, 8)
    prune(c)
    return c


# ---------------------------------------------------------------------------------------------
# pure parts, in-process (no server)


def test_building_the_demo_loads_no_model() -> None:
    import gradio as gr

    from ui.layout import build_demo
    from ui.workbench import WORKBENCH

    demo = build_demo()  # its time: bench/bench_startup.py
    assert isinstance(demo, gr.Blocks)
    assert WORKBENCH.loaded is None


def test_model_events_run_in_the_model_thread() -> None:
    """Every handler of the model's concurrency group runs in the one model thread, except the
    streaming chat handlers, which submit their turns there themselves (test_chat)."""
    import inspect

    from ui.events import MODEL
    from ui.layout import build_demo
    from ui.workbench import MODEL_THREAD

    demo = build_demo()
    model_fns = [f for f in demo.fns.values() if f.concurrency_id == MODEL["concurrency_id"]]
    names = {f.name for f in model_fns}
    assert {"load_model", "attribute", "prune", "realign", "evaluate"} <= names
    for f in model_fns:
        streaming = inspect.isgeneratorfunction(f.fn)
        assert streaming or getattr(f.fn, "on_model_thread", False), f.name
    # and a wrapped handler really runs there
    from ui.events import on_model_thread

    ran = on_model_thread(lambda: threading.get_ident())()
    assert ran == MODEL_THREAD.ident() != threading.get_ident()


def test_column_mapping_and_data_specs() -> None:
    from hsr_core.config import ConfigError, parse_columns
    from ui.tabs.model import data_spec

    assert parse_columns("prompt=instruction, response=output") == (
        ("prompt", "instruction"),
        ("response", "output"),
    )
    assert parse_columns("") == ()
    with pytest.raises(ConfigError, match="field=column"):
        parse_columns("prompt")
    assert data_spec("built-in", "x", "", None).source == "builtin"
    assert data_spec("VLGuard folder", "/d/VLGuard", "", None).source == "vlguard:/d/VLGuard"
    spec = data_spec("file", "", "prompt=q", "/tmp/up.jsonl")
    assert spec.source == "/tmp/up.jsonl" and spec.column_map() == {"prompt": "q"}
    with pytest.raises(ConfigError, match="hub dataset id"):
        data_spec("hub dataset", "", "", None)


def test_invalid_realign_config_is_a_message() -> None:
    from ui.tabs.realign import realign_config

    cfg, problem = realign_config(0.8, 0.5, 0.7, 4, "head")
    assert cfg is None and "must not exceed max_p" in problem
    cfg, problem = realign_config(0.5, 0.5, 0.7, 4, "head")
    assert cfg is not None and cfg.top_h == 4 and problem == ""


def test_ranking_table_orders_heads_and_puts_unscored_last() -> None:
    from ui.figures import ranking_table

    scores = np.array([[1.0, np.nan], [3.0, 2.0]])  # [L=2, H=2]
    table = ranking_table(scores)
    assert table["head"].tolist() == ["1-0", "1-1", "0-0", "0-1"]
    assert table["rank"].tolist() == [1, 2, 3, 4]
    assert ranking_table(None).empty


def test_heatmap_marks_heads_with_their_rank() -> None:
    from ui.figures import heads_heatmap

    fig = heads_heatmap(np.arange(6.0).reshape(3, 2), [(2, 1), (0, 0)], score_label="angle")
    heat, marks = fig.data
    assert np.asarray(heat.z).shape == (3, 2)
    assert list(marks.x) == [1, 0] and list(marks.y) == [2, 0]
    assert [c[0] for c in marks.customdata] == [1, 2]
    assert tuple(fig.layout.yaxis.range) == (2.5, -0.5)  # layer 0 at the top
    assert list(fig.layout.yaxis.ticktext) == ["0", "1", "2"]
    assert np.asarray(heat.customdata)[1, 0] == "self-attention"


def test_heatmap_outlines_the_picked_head() -> None:
    """The head shown in detail is outlined on its cell (layer on y, head on x), with a legend
    entry naming it; without one there is no outline."""
    from ui.figures import heads_heatmap

    fig = heads_heatmap(np.ones((3, 4)), [(0, 0)], picked=(1, 3))
    (shape,) = fig.layout.shapes
    assert (shape.type, shape.xref, shape.yref) == ("rect", "x", "y")
    assert (shape.x0, shape.x1, shape.y0, shape.y1) == (2.5, 3.5, 0.5, 1.5)
    assert shape.name == "in detail: 1-3" and shape.showlegend
    assert heads_heatmap(np.ones((3, 4)), [(0, 0)]).layout.shapes == ()


def test_heatmap_tells_cross_attention_layers_apart() -> None:
    """Llama-3.2-Vision's cross-attention layers: "2 (cross)" on the axis and in the hover."""
    from ui.figures import heads_heatmap

    fig = heads_heatmap(np.ones((4, 2)), layer_kinds=["self", "self", "cross", "self"])
    heat = fig.data[0]
    assert list(fig.layout.yaxis.tickvals) == [0, 1, 2, 3]
    assert list(fig.layout.yaxis.ticktext) == ["0", "1", "2 (cross)", "3"]
    assert np.asarray(heat.customdata)[:, 1].tolist() == [
        "self-attention",
        "self-attention",
        "cross-attention",
        "self-attention",
    ]
    assert "%{customdata}" in heat.hovertemplate
    many = heads_heatmap(
        np.ones((40, 2)), layer_kinds=["cross" if l % 5 == 3 else "self" for l in range(40)]
    )
    labels = dict(zip(many.layout.yaxis.tickvals, many.layout.yaxis.ticktext, strict=True))
    assert labels[3] == "3 (cross)" and labels[38] == "38 (cross)" and 1 not in labels
    with pytest.raises(ValueError, match="3 layer kinds for 4 layers"):
        heads_heatmap(np.ones((4, 2)), layer_kinds=["self"] * 3)


def test_head_ranks_figure_bins_every_weight_and_draws_the_band() -> None:
    from ui.figures import head_ranks_figure

    rng = np.random.default_rng(0)
    n = 5000
    safety, utility = rng.random(n), rng.random(n)
    pruned = utility > 0.5
    restored = pruned & (utility < 0.7) & (safety < 0.5)
    fig = head_ranks_figure(
        safety, utility, pruned, restored, p=0.5, q=0.5, max_p=0.7, head="3-1", bins=20
    )
    heat, dots, band = fig.data
    assert np.nansum(np.asarray(heat.customdata)) == n  # every weight in one bin
    share = np.asarray(heat.z, dtype=float)
    assert np.nanmax(share[:, :10]) == 0 and np.nanmin(share[:, 10:]) == 1  # pruned = right half
    assert len(dots.x) == restored.sum()
    assert list(band.x) == [0.5, 0.7, 0.7, 0.5, 0.5] and list(band.y) == [0, 0, 0.5, 0.5, 0]
    assert f"{int(restored.sum()):,} restored" in fig.layout.title.text
    other = head_ranks_figure(
        safety, utility, pruned, restored, p=0.5, q=0.5, max_p=0.7, head="0-0", selected=False
    )
    assert "not selected" in other.layout.title.text


def test_sparsity_and_restored_charts() -> None:
    from ui.figures import restored_bars, sparsity_chart

    fig = sparsity_chart({0: 0.5, 1: 0.49}, {"q_proj": 0.5, "down_proj": 0.5}, 0.5)
    assert [len(t.x) for t in fig.data] == [2, 2]
    bars = restored_bars({"1-2": {"q_proj": 3, "o_proj": 1}, "0-0": {"q_proj": 0, "o_proj": 2}})
    assert [t.name for t in bars.data] == ["q_proj", "o_proj"]
    assert list(bars.data[0].y) == [3, 0]
    assert not bars.layout.annotations


def test_out_of_memory_is_explained() -> None:
    import torch

    from ui.events import explain

    title, message = explain(torch.OutOfMemoryError("CUDA out of memory"))
    assert title == "Out of memory" and "smaller model" in message
    assert explain(RuntimeError("a bug")) is None


def test_eta_is_added_to_the_progress_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import ui.events
    from ui.events import show_eta

    clock = SimpleNamespace(now=100.0)  # a fake clock: no sleep
    monkeypatch.setattr(ui.events, "time", SimpleNamespace(monotonic=lambda: clock.now))

    class Bar:
        def __init__(self) -> None:
            self.desc, self.index, self.length = "Ships attribution", 0, 10

    class Tracker:
        def __init__(self) -> None:
            self.iterables = [Bar()]
            self.sent: list[str] = []

        def _progress_callback(self):
            return lambda bars: self.sent.append(bars[-1].desc)

    tracker = Tracker()
    show_eta(tracker)
    tracker._progress_callback()(tracker.iterables)
    tracker.iterables[-1].index = 4
    clock.now += 12.0  # 4 of 10 done in 12 s
    tracker._progress_callback()(tracker.iterables)
    assert tracker.sent == ["Ships attribution", "Ships attribution · 18 s left"]  # 6 x 3 s


def test_progress_reports_reach_the_page_at_most_twice_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reports closer than the interval are dropped, except a new bar, a closed bar and a bar's
    last step (a page redrawing 100 progress reports a second stops answering clicks)."""
    from types import SimpleNamespace

    import ui.events
    from ui.events import PROGRESS_INTERVAL_S, show_eta

    assert PROGRESS_INTERVAL_S == 0.5
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(ui.events, "time", SimpleNamespace(monotonic=lambda: clock.now))

    class Bar:
        def __init__(self, length: int) -> None:
            self.desc, self.index, self.length = "bar", 0, length

    class Tracker:
        def __init__(self) -> None:
            self.iterables = [Bar(100)]
            self.sent: list[tuple[float, int, int]] = []  # (time, bars, index of the last)

        def _progress_callback(self):
            return lambda bars: self.sent.append((clock.now, len(bars), bars[-1].index))

    tracker = Tracker()
    show_eta(tracker)

    def report() -> None:
        tracker._progress_callback()(tracker.iterables)

    bar = tracker.iterables[0]
    expected = []
    for step in range(100):  # a step every 0.1 s: every fifth reaches the page
        clock.now = round(step * 0.1, 6)
        bar.index = step
        report()
        if step % 5 == 0:
            expected.append((clock.now, 1, step))
    bar.index = 100  # the last step, 0.45 s after the last report sent: sent
    clock.now = 9.95
    report()
    expected.append((9.95, 1, 100))
    inner = Bar(3)
    tracker.iterables.append(inner)  # a new bar at once: sent
    clock.now = 10.05
    report()
    expected.append((10.05, 2, 0))
    inner.index = 1
    clock.now = 10.1  # 0.05 s later, same bars: dropped
    report()
    tracker.iterables.pop()  # the inner bar closed: sent
    clock.now = 10.15
    report()
    expected.append((10.15, 1, 100))
    assert tracker.sent == expected


# ---------------------------------------------------------------------------------------------
# the launched app, through gradio_client


def test_every_action_has_a_named_endpoint(url: str) -> None:
    api = client(url).view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) >= ENDPOINTS


def test_steps_before_loading_a_model_say_what_to_do(url: str) -> None:
    c = client(url)
    for call in (lambda: prune(c), lambda: attribute(c), lambda: realign(c)):
        with pytest.raises(AppError, match="Load a model first"):
            call()
    assert summary(c)["model"] is None


def test_unknown_models_and_missing_folders_are_explained(url: str) -> None:
    c = client(url)
    with pytest.raises(AppError, match="Could not reach the Hugging Face hub"):
        load(c, "no-such-org/no-such-model-hsr")
    with pytest.raises(AppError, match="No folder"):
        load(c, "/no/such/folder/for/hsr")
    with pytest.raises(AppError, match="Unknown built-in model"):
        load(c, "builtin:nope")
    info, *_ = load(c)  # the server is fine and loads the next model
    assert "LlamaForCausalLM" in info


def test_loading_describes_the_model(url: str) -> None:
    c = client(url)
    info, message, status, ships_samples, calib_samples, top_h, *_ = load(c)
    assert "builtin:tiny-llama` " in message  # loaded now, or already by an earlier test
    assert "builtin:tiny-llama` already loaded" in load(c)[1]  # the load just before
    assert "| layers | 2 |" in info
    assert "4 query, 2 KV (GQA)" in info
    assert "vision tower | no" in info
    assert "cpu · float32" in info
    assert TINY in status
    assert top_h["value"] == 8  # min(10, 2 layers x 4 heads)


def test_the_built_in_smollm2_starts_at_its_measured_sparsity() -> None:
    """docs/RESULTS.md measured 40% for the built-in SmolLM2 models (safety gone, the model
    still talks); other models start at the paper's 50%. The load message says why."""
    from types import SimpleNamespace

    import torch

    from ui.tabs import model

    def fake(name: str) -> SimpleNamespace:
        adapter = SimpleNamespace(num_layers=30, num_heads=9)
        return SimpleNamespace(
            spec=SimpleNamespace(name=name), device=torch.device("cpu"), adapter=adapter
        )

    for name in (
        "builtin:smollm2-135m-safe",
        "builtin:smollm2-135m",
        "builtin:smollm2-135m-safe-attn",
    ):
        assert model._step_defaults(fake(name))["sparsity"] == 0.4
    assert model._step_defaults(fake("org/other-model"))["sparsity"] == 0.5
    assert model.DEFAULT_MODEL in model.MEASURED_SPARSITY
    assert "40% sparsity" in model.SPARSITY_WHY.format(pct=40)


def test_realign_explains_values_out_of_range(session: Client) -> None:
    """Values the sliders cannot hold are explained in words (not gradio's range check), the
    boxes are set back to the values of the restore set in use, and it stays as it was."""
    before = realign(session, p=0.3)
    assert before["restore"]["restored"] > 0
    for bad, words in (
        (dict(q=-1), "q must be a fraction in [0, 1], got -1"),
        (dict(top_h=999), "top_h (999) exceeds the model's 8 attention heads"),
    ):
        out = realign(session, p=0.3, **bad)
        assert "Nothing changed" in out["message"] and words in out["message"], out["message"]
        assert "The results and the boxes show p=0.3 · q=0.5" in out["message"]
        assert (out["q"], out["top_h"]) == (0.5, 8)
    assert summary(session)["restore"]["restored"] == before["restore"]["restored"]


def test_realign_before_prune_is_an_error(url: str) -> None:
    c = client(url)
    load(c)
    attribute(c, 8)
    with pytest.raises(AppError, match="Prune first"):
        realign(c)
    assert summary(c)["ships"]["top_heads"]  # the scores are kept


def test_attribute_scores_every_head(session: Client) -> None:
    status, message, heatmap, table = attribute(session, 8)
    assert "8 heads over 8 probe prompts" in message
    assert "from the cache" in message  # the session fixture computed them
    assert table["headers"] == ["rank", "head", "layer", "head index", "score"]
    assert len(table["data"]) == 8
    assert [r[0] for r in table["data"]] == list(range(1, 9))
    scores = [r[4] for r in table["data"]]
    assert scores == sorted(scores, reverse=True)
    fig = json.loads(heatmap["plot"])
    assert fig["data"][0]["type"] == "heatmap"
    assert "layer %{y}" in fig["data"][0]["hovertemplate"]


def test_screening_mode_is_labelled_as_ours(url: str) -> None:
    c = client(url)
    load(c)
    status, message, heatmap, table = c.predict(
        num_samples=4,
        ablation="zero",
        metric="angle",
        r_main=1,
        ships_mode="screen",
        recompute=False,
        api_name="/attribute",
    )
    assert "Screening (our extension)" in message and "re-scored by exact Ships" in message
    assert len(table["data"]) == 8
    assert summary(c)["ships"]["config"]["mode"] == "screen"


def test_prune_reports_sparsity(session: Client) -> None:
    status, message, chart = prune(session)
    assert "50.00%" in message
    assert "36,864 of 73,728" in message
    fig = json.loads(chart["plot"])
    assert len(fig["data"][0]["x"]) == 2  # one bar per layer
    assert summary(session)["pruning"]["sparsity"] == pytest.approx(0.5)


def test_realign_sliders_change_the_restore_set(session: Client) -> None:
    a = realign(session, p=0.5, q=0.5, max_p=0.7)
    b = realign(session, p=0.3, q=0.8, max_p=0.9)
    assert a["restore"]["restored"] != b["restore"]["restored"]
    assert b["restore"]["restored"] > a["restore"]["restored"] > 0
    assert f"{b['restore']['restored']:,} weights restored" in b["totals"]
    assert "‱" in b["totals"]
    assert len(b["restore"]["selected_heads"]) == 8
    assert b["head"]["value"] == b["restore"]["selected_heads"][0]
    bars = json.loads(b["bars"]["plot"])
    assert [t["name"] for t in bars["data"]] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    head_fig = json.loads(b["head_plot"]["plot"])
    assert "restored" in head_fig["layout"]["title"]["text"]
    assert summary(session)["restore"]["restored"] == b["restore"]["restored"]


def test_head_detail_shows_any_head(session: Client) -> None:
    realign(session, top_h=2)
    fig, dropdown, heatmap = session.predict(head="1-3", api_name="/head_detail")
    title = json.loads(fig["plot"])["layout"]["title"]["text"]
    assert title.startswith("Head 1-3")
    assert dropdown["value"] == "1-3"
    (outline,) = json.loads(heatmap["plot"])["layout"]["shapes"]  # the head in detail, marked
    assert (outline["x0"], outline["y0"], outline["name"]) == (2.5, 0.5, "in detail: 1-3")
    with pytest.raises(AppError, match="outside the model"):
        session.predict(head="7-0", api_name="/head_detail")


def test_invalid_realign_settings_are_explained_in_place(session: Client) -> None:
    before = realign(session, p=0.4)["restore"]["restored"]
    bad = realign(session, p=0.8, max_p=0.7)
    assert "must not exceed max_p" in bad["message"]
    assert bad["restore"] == {"__type__": "update"}  # nothing else changes
    too_many = realign(session, top_h=20)
    assert "exceeds the model's 8 attention heads" in too_many["message"]
    assert summary(session)["restore"]["restored"] == before


def test_malformed_data_file_is_explained(session: Client, tmp_path: Path) -> None:
    realign(session)  # a restore set, to be kept
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "hello", "harmful": false}\n{not json\n')
    with pytest.raises(AppError, match="row 2: not valid JSON"):
        session.predict(
            source="file",
            location="",
            columns="",
            upload=handle_file(str(bad)),
            api_name="/load_data",
        )
    with pytest.raises(AppError, match="column mapping"):
        session.predict(
            source="file",
            location="",
            columns="prompt",
            upload=handle_file(str(bad)),
            api_name="/load_data",
        )
    kept = summary(session)
    assert kept["data"] == "built-in"
    assert kept["pruning"] is not None and kept["restore"] is not None


def test_uploaded_data_with_a_column_mapping_loads(url: str, tmp_path: Path) -> None:
    rows = [
        {
            "instruction": f"How do I hurt someone, way {i}?",
            "output": "I can't help with that.",
            "unsafe": "yes",
        }
        for i in range(3)
    ] + [
        {"instruction": f"Name a fruit, please ({i}).", "output": "An apple.", "unsafe": "no"}
        for i in range(3)
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = client(url)
    info, *_ = c.predict(
        source="file",
        location="",
        columns="prompt=instruction,response=output,harmful=unsafe",
        upload=handle_file(str(path)),
        api_name="/load_data",
    )
    assert "3 harmful requests" in info and "3 benign requests" in info


def test_api_doc_example_runs(url: str) -> None:
    out = run_api_doc_example(url, "/realign")
    assert re.search(r"p=0.3: restored \d+ weights", out)
    assert "top heads" in out


def test_unsupported_architecture_is_explained(
    url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    c = client(url)
    load(c)
    folder = unsupported_model(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")
    with pytest.raises(AppError, match="Unsupported architecture GPT2LMHeadModel"):
        load(c, str(folder))
    status, message, *_ = attribute(c, 2)  # refused before the loaded model was released
    assert "Ships scores of 8 heads" in message


def test_another_tab_loading_a_model_is_explained(url: str) -> None:
    mine, other = client(url), client(url)
    load(mine)
    attribute(mine, 8)
    prune(mine)
    realign(mine)
    load(other, "builtin:tiny-llava-next")
    with pytest.raises(AppError, match="Another tab replaced the shared model"):
        realign(mine)
    load(mine)  # loading it again brings the session back, its results intact
    assert realign(mine)["restore"]["restored"] > 0


def test_two_sessions_work_at_once(url: str) -> None:
    """Concurrent sessions on the same model are serialized, not mixed up."""
    results: dict[str, int] = {}

    def work(name: str, p: float) -> None:
        c = client(url)
        load(c)
        attribute(c, 8)
        prune(c)
        results[name] = realign(c, p=p)["restore"]["restored"]

    threads = [threading.Thread(target=work, args=(n, p)) for n, p in (("a", 0.3), ("b", 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    single = client(url)
    load(single)
    attribute(single, 8)
    prune(single)
    assert results["a"] == realign(single, p=0.3)["restore"]["restored"]
    assert results["b"] == realign(single, p=0.5)["restore"]["restored"]


def test_stop_interrupts_attribution_and_keeps_earlier_scores(
    url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """It loads a slower model, and puts the tiny one back for the tests after it (the
    sessions of the module share the server's model)."""
    c = client(url)
    try:
        load(c, str(slow_model(tmp_path_factory.mktemp("slow") / "slow-llama")))
        attribute(c, 2)
        job = c.submit(
            num_samples=170,
            ablation="zero",
            metric="angle",
            r_main=1,
            recompute=True,
            api_name="/attribute",
        )
        # Stop once the job reports progress: a Stop of a running job (one sent while it waits
        # in the queue is the next test's)
        deadline = time.monotonic() + 300
        while not (job.status().progress_data or job.done()):
            assert time.monotonic() < deadline, "the attribution never reported progress"
            time.sleep(0.05)
        assert not job.done(), "the attribution ended before Stop could be sent"
        c.predict(api_name="/stop")
        status, message, heatmap, table = job.result(timeout=300)
        assert "Stopped" in message
        kept = summary(c)["ships"]
        assert kept["config"]["num_samples"] == 2
        assert len(kept["top_heads"]) == 10
    finally:
        load(c)


def test_a_stop_sent_while_the_job_waits_in_the_queue_stops_it(
    url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Session B's attribution waits in the model's group behind session A's; B's Stop, sent
    while it waits, stops it as soon as it starts (the job used to clear its session's flag on
    starting, so a Stop sent while it waited was lost and it ran to its end)."""
    from gradio_client.utils import Status

    a, b = client(url), client(url)
    folder = str(slow_model(tmp_path_factory.mktemp("slow-queue") / "slow-llama"))
    args = dict(num_samples=170, ablation="zero", metric="angle", r_main=1, recompute=True)
    try:
        load(a, folder)
        load(b, folder)  # the same model: A's session keeps it
        first = a.submit(**args, api_name="/attribute")
        deadline = time.monotonic() + 300
        while not (first.status().progress_data or first.done()):
            assert time.monotonic() < deadline, "A's attribution never reported progress"
            time.sleep(0.05)
        assert not first.done(), "A's attribution ended before B's was queued"
        second = b.submit(**args, api_name="/attribute")
        while second.status().code != Status.IN_QUEUE:  # the server has queued it
            assert time.monotonic() < deadline and not first.done(), second.status()
            time.sleep(0.05)
        b.predict(api_name="/stop")  # B's job has not started: A's holds the model
        a.predict(api_name="/stop")
        assert "Stopped" in first.result(timeout=300)[1]
        assert "Stopped" in second.result(timeout=300)[1]
    finally:
        load(a)


def test_stop_flags_keep_a_stop_sent_after_the_job_was_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``StopFlag.clear_before``: a Stop older than the job's queueing is cleared, one sent at
    or after it is kept (times from a fake clock)."""
    from types import SimpleNamespace

    import ui.workbench
    from ui.workbench import StopFlag

    clock = SimpleNamespace(now=10.0)
    monkeypatch.setattr(ui.workbench, "time", SimpleNamespace(monotonic=lambda: clock.now))
    flag = StopFlag()
    flag.clear_before(5.0)
    assert not flag.is_set()  # never set
    flag.set()  # at 10
    flag.clear_before(10.5)  # a job queued after the Stop: not its Stop
    assert not flag.is_set()
    flag.set()  # at 10
    flag.clear_before(10.0)  # queued at the same moment: kept
    assert flag.is_set()
    flag.clear_before(9.0)  # queued before the Stop: kept
    assert flag.is_set()
    flag.clear()
    assert not flag.is_set() and flag.set_at == 10.0


def test_a_stop_reaches_the_running_job_after_its_session_was_forgotten() -> None:
    """gradio runs a session's ``unload`` (``events.forget``) when its heartbeat connection
    drops, which can happen with the page still open: the running jobs keep their Stop
    flag, a Stop from that page still reaches them, and the flag goes when the last ends
    (before: ``forget`` dropped it, and the Stop went to a new flag no job read)."""
    from types import SimpleNamespace

    from ui import events
    from ui.workbench import WORKBENCH

    page = SimpleNamespace(session_hash="forgotten-while-running")
    with events.stoppable(page) as first, events.stoppable(page) as second:
        events.forget(page)  # the heartbeat dropped
        assert page.session_hash in WORKBENCH._stops  # held by the two jobs
        assert not first() and not second()
        events.stop(page)
        assert first() and second()
    assert page.session_hash not in WORKBENCH._stops  # dropped when the last job ended
    with events.stoppable(page) as third:  # a new job: a new flag, not stopped
        assert not third()
    assert page.session_hash in WORKBENCH._stops  # not forgotten this time: kept
    events.forget(page)  # no job holds it: dropped at once
    assert page.session_hash not in WORKBENCH._stops


def test_the_localization_ladder_runs_through_the_api(url: str) -> None:
    """The Localize tab's /localize: refused before pruning; then every rung, in order, with
    its count of weights put back, its ASR and its Wilson interval."""
    c = client(url)
    load(c)
    with pytest.raises(AppError, match="Prune first"):
        c.predict(20, 4, 2, 0, "keyword", api_name="/localize")
    attribute(c, 8)
    prune(c)
    realign(c, top_h=3)
    msg, chart, table, ladder = c.predict(4, 3, 2, 0, "reference", api_name="/localize")
    assert "**Done.**" in msg and "reference judge" in msg
    assert ladder["judge"]["name"] == "reference"
    rungs = ladder["rungs"]
    assert [r["name"] for r in rungs] == [
        "dense",
        "dense_ablated",
        "pruned",
        "hsr",
        "random_heads",
        "random_heads",
        "top_heads",
        "attention",
        "mlp",
    ]
    restored = summary(c)["restore"]["restored"]
    by = {r["name"]: r for r in rungs}
    assert by["dense"]["restored"] == 36_864 and by["pruned"]["restored"] == 0
    assert (
        by["hsr"]["restored"] == restored
        and by["hsr"]["heads"] == summary(c)["restore"]["selected_heads"]
    )
    assert [r["restored"] for r in rungs if r["name"] == "random_heads"] == [restored] * 2
    assert by["attention"]["restored"] + by["mlp"]["restored"] == 36_864
    for r in rungs:
        lo, hi = r["asr_ci"]
        assert lo <= r["asr"] <= hi and r["n_harmful"] + r["n_benign"] == 4
    assert len(table["data"]) == len(rungs)
    fig = json.loads(chart["plot"])
    assert fig["data"][0]["orientation"] == "h"
    assert summary(c)["restore"]["restored"] == restored  # the session's own state is back


def test_heads_plus_mlp_scope_is_labelled_as_ours(session: Client) -> None:
    heads = realign(session, p=0.3, q=0.8, max_p=0.9)
    both = session.predict(
        p=0.3,
        q=0.8,
        max_p=0.9,
        top_h=8,
        slicing="head",
        head=None,
        scope="heads+mlp (our extension)",
        api_name="/realign",
    )
    out = dict(zip(REALIGN_OUTPUTS, both, strict=True))
    assert "our extension" in out["message"] and "our extension" in out["totals"]
    assert out["restore"]["restored"] > heads["restore"]["restored"]
    assert "our extension" in out["restore"]["restore_scope"]
    realign(session, p=0.5, q=0.5, max_p=0.7)  # back to the paper's scope for later tests


def test_each_pruner_through_the_api(session: Client) -> None:
    """The Prune tab's pruner choice reaches the core: SparseGPT's masks differ from Wanda's
    at the same sparsity, the message and the summary name the pruner, a mode the pruner does
    not have is explained, and realign works on top of each."""
    wanda = summary(session)
    for pruner, mode in (
        ("sparsegpt", "sequential"),
        ("snip", "one-shot"),
        ("magnitude", "one-shot"),
    ):
        status, message, chart = session.predict(
            sparsity=0.5,
            structure="unstructured",
            mode=mode,
            num_samples=16,
            recompute=False,
            pruner=pruner,
            api_name="/prune",
        )
        label = {"sparsegpt": "SparseGPT", "snip": "SNIP", "magnitude": "magnitude"}[pruner]
        assert f"with **{label}**" in message and "50.00%" in message
        assert ("SparseGPT's update" in message) == (pruner == "sparsegpt")
        s = summary(session)
        assert s["pruning"]["config"]["pruner"] == pruner
        out = realign(session, p=0.3, q=0.8, max_p=0.9)
        assert out["restore"]["restored"] > 0
    with pytest.raises(AppError, match="magnitude has no sequential mode"):
        session.predict(
            sparsity=0.5,
            structure="unstructured",
            mode="sequential",
            num_samples=16,
            recompute=False,
            pruner="magnitude",
            api_name="/prune",
        )
    prune(session)  # back to Wanda 50% for the later tests
    assert summary(session)["pruning"]["config"]["pruner"] == "wanda"
    assert wanda["pruning"]["config"]["pruner"] == "wanda"
