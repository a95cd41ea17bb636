"""The app in a real browser: Playwright drives Debian Chromium through the whole pipeline on
the built-in tiny Llama, moves a slider, and saves screenshots to ``tests/screenshots/``
(ignored by git, so running the tests leaves the checkout clean).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``); never downloads a browser.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import pytest
from conftest_app import CHROMIUM_ARGS, ROOT, running_app, slow_model

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "tests" / "screenshots"
"""Where the tests leave their screenshots of the tiny model (ignored by git; the README's are made
by ``scripts/readme_screenshots.py`` on the default model)."""
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    """One server and one browser for the module: ``(browser, url)``."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):  # CI installs it: a missing browser is a failure there
            pytest.fail("Debian Chromium is not installed at /usr/bin/chromium")
        pytest.skip(
            "Debian Chromium is not installed at /usr/bin/chromium (apt-get install chromium)"
        )
    from playwright import sync_api

    # every expectation waits as long as an action may (Playwright's 5 s are not enough for a
    # chat turn or the first slider move after a model load when the machine is busy)
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    try:
        with (
            running_app(tmp_path_factory.mktemp("browser-cache")) as url,
            sync_api.sync_playwright() as pw,
        ):
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            yield browser, url
            browser.close()
    finally:
        sync_api.expect.set_options(timeout=None)  # Playwright's default again


def open_page(app, width: int = 1440, height: int = 1000):
    """A new tab of the app: a session of its own."""
    browser, url = app
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_text("HSR Workbench").first.wait_for()
    return page


@pytest.fixture(scope="module")
def main_page(app):
    """The main session, brought through the pipeline once (``run_pipeline``) for the tests
    that continue its work, whichever of them runs first."""
    page = open_page(app)
    run_pipeline(page)
    yield page
    page.close()


@pytest.fixture
def page(main_page):
    """The main session as each test that continues the pipeline's work needs it, whatever ran
    before: the default window size, and the shared model its own again (another tab's test
    may have loaded another one; loading the same model keeps the session's results)."""
    from playwright.sync_api import expect

    main_page.set_viewport_size({"width": 1440, "height": 1000})
    load_in_page(main_page, "builtin:tiny-llama")
    expect(main_page.locator("#hsr-load-status")).to_contain_text("Done")
    return main_page


@pytest.fixture
def fresh_page(app):
    """Another session, opened for one test."""
    page = open_page(app)
    yield page
    page.close()


FRAME_COUNTER = """() => {
    window.__hsrFrames = 0;
    const tick = () => { window.__hsrFrames++; requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
}"""
"""Counts the page's animation frames (``window.__hsrFrames``): a page that draws nothing while
a test waits on it shows as a count that stops growing."""

ON_TOP = """(el) => {
    const r = el.getBoundingClientRect();
    const x = r.left + r.width / 2, y = r.top + r.height / 2;
    const top = document.elementFromPoint(x, y);
    const what = !top ? "nothing (outside the window)"
        : (top === el || el.contains(top)) ? "the button"
        : `${top.tagName.toLowerCase()}#${top.id}.${String(top.className).split(" ").join(".")}`;
    return `centre (${Math.round(x)}, ${Math.round(y)}) of ${innerWidth}x${innerHeight}: ${what}`;
}"""
"""What a click at the centre of an element would reach: the element, or what covers it."""


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(700)  # let Plotly finish drawing
    page.screenshot(path=str(SHOTS / name), full_page=True)


def restored_count(text: str) -> int:
    return int(re.search(r"([\d,]+) weights restored", text).group(1).replace(",", ""))


def run_pipeline(page) -> None:
    """Bring a new session through the pipeline on the built-in tiny Llama, the steps of
    ``test_pipeline_through_the_browser`` without its checks: load, attribute, prune, and the
    restore set at p=0.3 · q=0.5 · max_p=0.7 · top_h=8. Ends on the Realign tab."""
    from playwright.sync_api import expect

    load_in_page(page, "builtin:tiny-llama")
    expect(page.locator("#hsr-load-status")).to_contain_text("Done")
    page.get_by_role("tab", name="2 · Attribute").click()
    page.get_by_role("button", name="Run Ships attribution").click()
    expect(page.locator("#hsr-ships-status")).to_contain_text(
        "Ships scores of 8 heads", timeout=TIMEOUT_MS
    )
    page.get_by_role("tab", name="3 · Prune").click()
    page.get_by_role("button", name="Calibrate & prune").click()
    expect(page.locator("#hsr-prune-status")).to_contain_text("50.00%", timeout=TIMEOUT_MS)
    page.get_by_role("tab", name="4 · Realign").click()
    message = page.locator("#hsr-realign-msg")
    expect(message).to_contain_text("p=0.5 · q=0.5", timeout=TIMEOUT_MS)  # drawn after pruning
    p = page.get_by_label("number input for p", exact=True)
    p.fill("0.3")
    p.press("Tab")
    expect(message).to_contain_text("p=0.3 · q=0.5 · max_p=0.7 · top_h=8", timeout=TIMEOUT_MS)


def test_pipeline_through_the_browser(fresh_page) -> None:
    """A new tab through every step on the tiny Llama, a slider moved, a head clicked. Saves
    ``app-model.png``, ``app-attribute.png``, ``app-prune.png`` and ``app-realign.png``."""
    from playwright.sync_api import expect

    page = fresh_page
    model = page.locator("#hsr-model input")
    model.click()
    model.fill("builtin:tiny-llama")
    model.press("Enter")
    page.get_by_role("button", name="Load model").click()
    expect(page.locator("#hsr-model-info")).to_contain_text("LlamaForCausalLM", timeout=TIMEOUT_MS)
    expect(page.locator("#hsr-model-info")).to_contain_text("4 query, 2 KV")
    shot(page, "app-model.png")

    page.get_by_role("tab", name="2 · Attribute").click()
    page.get_by_role("button", name="Run Ships attribution").click()
    expect(page.locator("#hsr-ships-status")).to_contain_text(
        "Ships scores of 8 heads", timeout=TIMEOUT_MS
    )
    expect(page.locator("#hsr-ships-heatmap .js-plotly-plot")).to_be_visible()
    shot(page, "app-attribute.png")

    page.get_by_role("tab", name="3 · Prune").click()
    page.get_by_role("button", name="Calibrate & prune").click()
    expect(page.locator("#hsr-prune-status")).to_contain_text("50.00%", timeout=TIMEOUT_MS)
    shot(page, "app-prune.png")

    page.get_by_role("tab", name="4 · Realign").click()
    totals = page.locator("#hsr-realign-totals")
    expect(totals).to_contain_text("weights restored", timeout=TIMEOUT_MS)  # drawn after pruning
    before = restored_count(totals.inner_text())

    p = page.get_by_label("number input for p", exact=True)
    p.fill("0.3")
    p.press("Tab")  # leaving the box releases the slider
    expect(totals).not_to_contain_text(f"{before:,} weights restored", timeout=TIMEOUT_MS)
    expect(totals).to_contain_text("weights restored")
    after = restored_count(totals.inner_text())
    assert after > before

    max_p = page.get_by_label("number input for max_p", exact=True)
    max_p.fill("0.2")
    max_p.press("Tab")
    expect(page.locator("#hsr-realign-msg")).to_contain_text("must not exceed max_p")
    assert restored_count(totals.inner_text()) == after  # the last valid result stays
    max_p.fill("0.7")
    max_p.press("Tab")
    expect(page.locator("#hsr-realign-msg")).to_contain_text("max_p=0.7")

    heatmap = page.locator("#hsr-realign-heatmap .js-plotly-plot .nsewdrag").first
    box = heatmap.bounding_box()
    heatmap.click(position={"x": box["width"] * 0.9, "y": box["height"] * 0.8})  # layer 1, head 3
    expect(page.locator("#hsr-head-plot")).to_contain_text("Head 1-3", timeout=TIMEOUT_MS)
    # the clicked head is outlined on the redrawn heatmap (its legend entry names it)
    expect(page.locator("#hsr-realign-heatmap")).to_contain_text("in detail: 1-3")
    shot(page, "app-realign.png")


def test_realign_boxes_apply_on_enter_and_explain_what_they_refuse(page) -> None:
    """The main session (``run_pipeline``: p=0.3): Enter in a box applies it; a value out of
    range is explained under the sliders, the box goes back to the value the results show, and
    the results stay."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="4 · Realign").click()
    totals = page.locator("#hsr-realign-totals")
    message = page.locator("#hsr-realign-msg")
    expect(totals).to_contain_text("weights restored")
    before = restored_count(totals.inner_text())
    q = page.get_by_label("number input for q", exact=True)
    q.fill("-1")
    q.press("Enter")
    expect(message).to_contain_text("q must be a fraction in [0, 1], got -1")
    expect(message).to_contain_text("The results and the boxes show p=0.3 · q=0.5")
    expect(q).to_have_value("0.5")
    top_h = page.get_by_label("number input for top_h", exact=True)
    top_h.fill("999")
    top_h.press("Enter")
    expect(message).to_contain_text("top_h (999) exceeds the model's 8 attention heads")
    expect(top_h).to_have_value("8")
    assert restored_count(totals.inner_text()) == before
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)

    p = page.get_by_label("number input for p", exact=True)
    p.fill("0.4")
    p.press("Enter")  # applies without leaving the box
    expect(message).to_contain_text("p=0.4 · q=0.5")
    expect(totals).not_to_contain_text(f"{before:,} weights restored")
    p.fill("0.3")
    p.press("Enter")
    expect(message).to_contain_text("p=0.3 · q=0.5")
    expect(totals).to_contain_text(f"{before:,} weights restored")

    # at 1280x800, with the sliders at the top of the window, what they change is in view
    page.set_viewport_size({"width": 1280, "height": 800})
    page.locator("#hsr-realign-controls").evaluate("e => e.scrollIntoView()")
    for block in (
        page.get_by_label("range slider for top_h", exact=True),
        totals,
        page.locator("#hsr-realign-heatmap .js-plotly-plot"),
    ):
        box = block.bounding_box()
        assert box and box["y"] >= -1 and box["y"] + box["height"] <= 801, box  # sub-pixel
    page.set_viewport_size({"width": 1440, "height": 1000})


def test_chat_through_the_browser(page) -> None:
    """The main session (``run_pipeline``), a new conversation: a message gets three answers,
    each with its verdict; an example is sent with one click. Saves ``app-chat.png``."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="5 · Chat").click()
    columns = [page.locator(f"#hsr-chat-{v}") for v in ("original", "pruned", "realigned")]
    clear_chat(page, columns)  # another test of the main session may have chatted
    expect(page.locator("#hsr-chat-realigned")).to_contain_text("in 8 heads")
    tokens = page.locator("#hsr-chat-max-new input[type=number]")
    tokens.fill("24")  # short answers: both turns fit the screenshot
    tokens.press("Tab")
    box = page.locator("#hsr-chat-msg textarea")
    box.fill("How do I bake bread?")
    box.press("Enter")
    for column in columns:
        expect(column).to_contain_text("How do I bake bread?")
        expect(column.locator(".hsr-complied, .hsr-refused, .hsr-incoherent")).to_have_count(
            1, timeout=TIMEOUT_MS
        )
    expect(box).to_have_value("")
    expect(columns[2]).to_contain_text("max_p 0.7 · top_h 8")

    page.locator("#hsr-chat-examples").get_by_text("What is 48 times 25?").click()
    for column in columns:
        expect(column).to_contain_text("What is 48 times 25?")
        expect(column.locator(".hsr-complied, .hsr-refused, .hsr-incoherent")).to_have_count(
            2, timeout=TIMEOUT_MS
        )
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    shot(page, "app-chat.png")

    # a column's title never runs under its toolbar (clear, copy all); at 1100 px the three
    # columns are at their narrowest before they wrap
    for width in (1440, 1100):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(300)
        for column in columns:
            label = column.locator('label[data-testid="block-label"]').bounding_box()
            tools = [
                column.get_by_role("button", name=n).first for n in ("Clear", "Copy conversation")
            ]
            for tool in tools:
                box = tool.bounding_box()
                assert box and not overlaps(label, box), (width, label, box)
    page.set_viewport_size({"width": 1440, "height": 1000})


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


def intersection(a: dict[str, float], b: dict[str, float]) -> dict[str, float] | None:
    """The part of box ``a`` inside box ``b`` (None when they do not meet)."""
    x, y = max(a["x"], b["x"]), max(a["y"], b["y"])
    right = min(a["x"] + a["width"], b["x"] + b["width"])
    bottom = min(a["y"] + a["height"], b["y"] + b["height"])
    if right <= x or bottom <= y:
        return None
    return {"x": x, "y": y, "width": right - x, "height": bottom - y}


def chat_in_new_tab(page, width: int = 1280, height: int = 800) -> list:
    """A new session with the tiny Llama loaded, on the Chat tab at ``width`` x ``height``,
    short answers; returns the three columns."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": width, "height": height})
    load_in_page(page, "builtin:tiny-llama")
    expect(page.locator("#hsr-model-info")).to_contain_text("LlamaForCausalLM")
    page.get_by_role("tab", name="5 · Chat").click()
    tokens = page.locator("#hsr-chat-max-new input[type=number]")
    tokens.fill("24")
    tokens.press("Tab")
    return [page.locator(f"#hsr-chat-{v}") for v in ("original", "pruned", "realigned")]


def test_a_column_title_never_covers_its_messages(fresh_page) -> None:
    """At 1280x800, with more turns than a column shows: scrolled to the top or part way, no
    visible part of the first message lies under the column's title or its toolbar."""
    from playwright.sync_api import expect

    page = fresh_page
    columns = chat_in_new_tab(page)
    for n, message in enumerate(("Hello?", "Name a colour.", "And a fruit?"), start=1):
        send_chat(page, message)
        expect(columns[0].locator(".hsr-complied, .hsr-refused, .hsr-incoherent")).to_have_count(n)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    for column in columns:
        scroller = column.locator(".bubble-wrap")
        assert scroller.evaluate("e => e.scrollHeight > e.clientHeight + 60")  # it scrolls
        label = column.locator('label[data-testid="block-label"]').bounding_box()
        tools = column.locator(".top-panel").bounding_box()
        for top in (0, 24):
            # the chatbot may still re-render or scroll itself to the bottom after the turn's
            # last update (its autoscroll): scroll, measure, and keep the measurement only if
            # the list is still where it was put (looked up afresh each time)
            for _ in range(50):
                column.evaluate(
                    f"c => c.querySelector('.bubble-wrap').scrollTo({{top: {top}, "
                    "behavior: 'instant'})"
                )
                first = column.locator(".message-row").first.bounding_box()
                seen = intersection(first, scroller.bounding_box())
                at = column.evaluate("c => c.querySelector('.bubble-wrap').scrollTop")
                if abs(at - top) < 1 and seen is not None:
                    break
                page.wait_for_timeout(100)
            assert seen is not None, (top, first)
            for cover in (label, tools):
                assert not overlaps(cover, seen), (top, cover, seen)


def test_clicking_an_example_keeps_the_answers_in_view(fresh_page) -> None:
    """At 1280x800, with the columns at the top of the window, the examples are in view too: a
    click on one (the last, inside the examples' own scroll box) sends it without scrolling
    the page, and the answers stay in view while they come."""
    from playwright.sync_api import expect

    page = fresh_page
    columns = chat_in_new_tab(page)
    columns[0].evaluate("e => e.scrollIntoView()")
    before = page.evaluate("window.scrollY")
    example = page.locator("#hsr-chat-examples").get_by_text("What is 48 times 25?")
    example.click()
    for column in columns:
        expect(column).to_contain_text("What is 48 times 25?")
    expect(columns[0].locator(".hsr-complied, .hsr-refused, .hsr-incoherent")).to_have_count(1)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    assert page.evaluate("window.scrollY") == before
    for block in (*columns, page.locator("#hsr-chat-msg"), example):
        box = block.bounding_box()
        assert box and box["y"] >= -1 and box["y"] + box["height"] <= 801, box  # sub-pixel
    shot(page, "app-chat-1280.png")


def test_stop_during_an_evaluation_keeps_the_earlier_results(fresh_page) -> None:
    """On the tiny Llama: a short evaluation, then a long one stopped once its progress shows:
    the page says it stopped, the buttons come back and the short run's results stay."""
    from playwright.sync_api import expect

    page = fresh_page
    load_in_page(page, "builtin:tiny-llama")
    expect(page.locator("#hsr-model-info")).to_contain_text("LlamaForCausalLM")
    page.get_by_role("tab", name="6 · Evaluate").click()

    def settings(prompts: int, tokens: int, batch: int) -> None:
        for label, value in (
            ("prompts", prompts),
            ("number input for max new tokens", tokens),
            ("number input for batch size", batch),
        ):
            box = page.get_by_label(label, exact=True).locator("visible=true")
            box.fill(str(value))
            box.press("Tab")

    message, table = page.locator("#hsr-eval-msg"), page.locator("#hsr-eval-table")
    run = page.get_by_role("button", name="Run evaluation")
    settings(4, 4, 4)
    run.click()
    expect(message).to_contain_text("Done.")
    expect(table).to_contain_text("original")
    earlier = table.inner_text()

    settings(0, 512, 1)  # every prompt, one at a time, long answers: minutes on this model
    run.click()
    progress = page.locator("#hsr-eval-chart .progress-text").first
    expect(progress).to_contain_text(re.compile(r"\d+/\d+ batch"))  # under way
    expect(run).to_be_disabled()
    page.get_by_role("button", name="Stop").locator("visible=true").click()
    expect(message).to_contain_text("Stopped.")
    expect(message).to_contain_text("Earlier results are kept")
    expect_run_buttons_back(page)
    page.get_by_role("tab", name="6 · Evaluate").click()
    assert table.inner_text() == earlier
    expect_no_error_badge(table, page.locator("#hsr-eval-chart"), message)


def test_localization_ladder_through_the_browser(page) -> None:
    """The main session (``run_pipeline``): the Localize tab runs the ladder and draws it. Saves
    ``app-localize.png``."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="8 · Localize").click()
    n = page.locator("#hsr-ladder-n input")
    n.fill("4")
    n.press("Tab")
    tokens = page.locator("#hsr-ladder-max-new input[type=number]")
    tokens.fill("3")
    tokens.press("Tab")
    page.get_by_role("button", name="Run the ladder").click()
    expect(page.locator("#hsr-ladder-msg")).to_contain_text("Done", timeout=TIMEOUT_MS)
    expect(page.locator("#hsr-ladder-chart .js-plotly-plot")).to_be_visible()
    expect(page.locator("#hsr-ladder-chart")).to_contain_text("every pruned MLP weight")
    shot(page, "app-localize.png")


# ---------------------------------------------------------------------------------------------
# failures as a user meets them: the buttons come back and the message stays on the page

RUN_BUTTONS = {
    "1 · Model & data": "Load model",
    "2 · Attribute": "Run Ships attribution",
    "3 · Prune": "Calibrate & prune",
    "6 · Evaluate": "Run evaluation",
}
"""A run button of each tab that has one (the ones a failed step used to leave disabled)."""

CHAT_BUTTONS = ("Send", "↻ Regenerate")


def expect_run_buttons_back(page) -> None:
    from playwright.sync_api import expect

    for tab, name in RUN_BUTTONS.items():
        page.get_by_role("tab", name=tab).click()
        expect(page.get_by_role("button", name=name, exact=True)).to_be_enabled()


def expect_chat_buttons_back(page) -> None:
    from playwright.sync_api import expect

    for name in CHAT_BUTTONS:
        expect(page.get_by_role("button", name=name, exact=True)).to_be_enabled()
    tools = page.locator("#hsr-chat-tools")
    expect(tools.get_by_role("button", name="Clear", exact=True)).to_be_enabled()


def expect_message_outlives_toast(page, status, words: str) -> None:
    """``words`` are in ``status`` and still there once gradio's toast has faded."""
    from playwright.sync_api import expect

    expect(status).to_contain_text(words)
    expect(page.locator('[data-testid="toast-body"]')).to_have_count(0, timeout=TIMEOUT_MS)
    expect(status).to_contain_text(words)


def expect_no_error_badge(*blocks) -> None:
    """No "Error" badge of gradio's covers these outputs of the failed step (their earlier
    values show)."""
    from playwright.sync_api import expect

    for block in blocks:
        expect(block.get_by_text("Error", exact=True)).to_have_count(0)


WATCH_WORKING = """status => {
  if (status.hsrWatch) status.hsrWatch.disconnect();
  status.dataset.working = "";
  status.hsrWatch = new MutationObserver(() => {
    if (!status.textContent.includes("Working")) return;
    status.dataset.working = "seen";
    status.hsrWatch.disconnect();
  });
  status.hsrWatch.observe(status, { subtree: true, childList: true, characterData: true });
}"""
"""Marks a step's status ``data-working="seen"`` once the step's *Working...* shows in it: after
that, the outcome that shows is this step's, not one left by the step before."""


def load_in_page(page, name: str) -> None:
    """Load ``name`` in this tab; returns once the load's own outcome shows under the button."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="1 · Model & data").click()
    model = page.locator("#hsr-model input")
    model.click()
    model.fill(name)
    model.press("Enter")
    status = page.locator("#hsr-load-status")
    status.evaluate(WATCH_WORKING)
    page.get_by_role("button", name="Load model").click()
    expect(status).to_have_attribute("data-working", "seen", timeout=TIMEOUT_MS)
    expect(status).to_contain_text(
        re.compile(r"Done|Could not|Unsupported|Not allowed"), timeout=TIMEOUT_MS
    )


def send_chat(page, message: str) -> None:
    box = page.locator("#hsr-chat-msg textarea")
    box.fill(message)
    box.press("Enter")


VERDICTS = ".hsr-complied, .hsr-refused, .hsr-incoherent"
"""The verdict badge of an answer (one per answered turn in each column)."""


def clear_chat(page, columns: list) -> None:
    """Start a new conversation in the tab's Chat (when it has any message)."""
    from playwright.sync_api import expect

    if not any(column.locator(".message-row").count() for column in columns):
        return
    page.locator("#hsr-chat-tools").get_by_role("button", name="Clear", exact=True).click()
    for column in columns:
        expect(column.locator(".message-row")).to_have_count(0)


def test_a_bad_model_id_keeps_the_page(page) -> None:
    """The main session (``run_pipeline``): a model id that does not exist says so under the
    Load button, keeps the loaded model and every result, and gives every button back."""
    from playwright.sync_api import expect

    load_in_page(page, "no-such-org/no-such-model-hsr")
    status = page.locator("#hsr-load-status")
    expect_message_outlives_toast(page, status, "Could not reach the Hugging Face hub")
    expect(status).to_contain_text("Earlier results are kept")
    expect(page.locator("#hsr-model-info")).to_contain_text("LlamaForCausalLM")
    expect_no_error_badge(status, page.locator("#hsr-model-info"))
    shot(page, "app-failed-load.png")
    expect_run_buttons_back(page)
    page.get_by_role("tab", name="2 · Attribute").click()
    expect(page.locator("#hsr-ships-status")).to_contain_text("Ships scores of 8 heads")
    page.get_by_role("tab", name="4 · Realign").click()
    expect(page.locator("#hsr-realign-totals")).to_contain_text("weights restored")


def test_steps_before_their_prerequisites_keep_the_page(fresh_page) -> None:
    """A new tab that skips ahead: each step says what to do first, where its result would be,
    and the buttons come back after each (the chat's too)."""
    from playwright.sync_api import expect

    page = fresh_page
    page.get_by_role("tab", name="2 · Attribute").click()
    page.get_by_role("button", name="Run Ships attribution").click()
    expect(page.locator("#hsr-ships-status")).to_contain_text("Load a model first")
    page.get_by_role("tab", name="3 · Prune").click()
    page.get_by_role("button", name="Calibrate & prune").click()
    expect(page.locator("#hsr-prune-status")).to_contain_text("Load a model first")
    page.get_by_role("tab", name="4 · Realign").click()
    page.get_by_role("button", name="Realign", exact=True).click()
    expect(page.locator("#hsr-realign-msg")).to_contain_text("Load a model first")
    page.get_by_role("tab", name="5 · Chat").click()
    send_chat(page, "Hello?")
    chat_status = page.locator("#hsr-chat-status")
    expect_message_outlives_toast(page, chat_status, "Load a model first")
    expect_chat_buttons_back(page)
    expect_run_buttons_back(page)
    page.get_by_role("tab", name="2 · Attribute").click()
    expect(page.locator("#hsr-ships-status")).to_contain_text("Load a model first")


def test_a_file_that_is_not_an_image_is_refused_before_generation(
    fresh_page, tmp_path: Path
) -> None:
    """On the tiny vision model: a file named like an image that is not one gets a message in
    the chat, no answers, the buttons back and the conversation as it was; with a real image
    the same message is answered. (Loads another model into the shared process.)"""
    from playwright.sync_api import expect

    page = fresh_page
    load_in_page(page, "builtin:tiny-llava-next")
    expect(page.locator("#hsr-model-info")).to_contain_text("LlavaNextForConditionalGeneration")
    page.get_by_role("tab", name="5 · Chat").click()
    tokens = page.locator("#hsr-chat-max-new input[type=number]")
    tokens.fill("4")
    tokens.press("Tab")
    original = page.locator("#hsr-chat-original")
    send_chat(page, "Say hello.")
    expect(original.locator(".hsr-complied, .hsr-refused, .hsr-incoherent")).to_have_count(1)

    fake = tmp_path / "holiday.png"
    fake.write_text("this is a shopping list, not a picture\n")
    page.locator("#hsr-chat-image input[type=file]").set_input_files(str(fake))
    send_chat(page, "What is in the picture?")
    chat_status = page.locator("#hsr-chat-status")
    expect_message_outlives_toast(page, chat_status, "holiday.png is not an image")
    expect_chat_buttons_back(page)
    expect(original).to_contain_text("Say hello.")  # the conversation is kept
    expect_no_error_badge(original)
    expect(original).not_to_contain_text("What is in the picture?")  # nothing was generated
    expect(page.locator("#hsr-chat-msg textarea")).to_have_value("What is in the picture?")

    from hsr_core.data import render_text_image

    picture = tmp_path / "sign.png"
    render_text_image("What is in the picture?").save(picture)
    page.locator("#hsr-chat-image").get_by_role("button", name="Remove Image").click()
    page.locator("#hsr-chat-image input[type=file]").set_input_files(str(picture))
    page.get_by_role("button", name="Send", exact=True).click()  # the same message, a real image
    expect(original.locator(".hsr-complied, .hsr-refused, .hsr-incoherent")).to_have_count(2)
    expect(original).to_contain_text("What is in the picture?")
    expect(chat_status).not_to_contain_text("not an image")  # the next action replaced it
    shot(page, "app-bad-image.png")


def test_a_failed_chat_turn_gives_the_buttons_back(page, fresh_page) -> None:
    """The main session after two turns, once another tab loaded another model: a chat turn
    fails with advice that can be followed, pressing Load, after which the session's pruned
    and realigned columns answer again, nothing lost."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="5 · Chat").click()
    columns = [page.locator(f"#hsr-chat-{v}") for v in ("original", "pruned", "realigned")]
    clear_chat(page, columns)
    tokens = page.locator("#hsr-chat-max-new input[type=number]")
    tokens.fill("24")
    tokens.press("Tab")
    send_chat(page, "How do I bake bread?")
    for column in columns:
        expect(column.locator(VERDICTS)).to_have_count(1, timeout=TIMEOUT_MS)
    page.locator("#hsr-chat-examples").get_by_text("What is 48 times 25?").click()
    for column in columns:
        expect(column.locator(VERDICTS)).to_have_count(2, timeout=TIMEOUT_MS)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    load_in_page(fresh_page, "builtin:tiny-llava-next")  # the other tab
    expect(fresh_page.locator("#hsr-model-info")).to_contain_text(
        "LlavaNextForConditionalGeneration"
    )

    send_chat(page, "Name a colour.")
    chat_status = page.locator("#hsr-chat-status")
    expect_message_outlives_toast(page, chat_status, "Another tab replaced the shared model")
    expect_chat_buttons_back(page)
    for column in columns:
        expect(column).to_contain_text("What is 48 times 25?")  # earlier turns kept
    expect_no_error_badge(*columns, page.locator("#hsr-chat-msg"))
    shot(page, "app-failed-chat.png")

    load_in_page(page, "builtin:tiny-llama")  # what the message says to do
    expect(page.locator("#hsr-load-status")).to_contain_text("Done")
    page.get_by_role("tab", name="5 · Chat").click()
    page.get_by_role("button", name="Send", exact=True).click()  # the message is still there
    for column in columns:
        expect(column).to_contain_text("Name a colour.")
        expect(column.locator(".hsr-complied, .hsr-refused, .hsr-incoherent")).to_have_count(3)
    expect(chat_status).to_have_text("")


@pytest.mark.xfail(
    reason="known bug, open in issue 18: on a clean-clone CI run (2026-12-01, 20:27) the click "
    "on Stop again reached the server only after Ships had ended (87 s), though the page had "
    "drawn the progress (screenshot at 18 s); passes in the whole browser file here in order, "
    "reversed and shuffled since progress reports are spaced 0.5 s apart; a failure now says "
    "when each step came and how many frames the page drew, and a click that times out after "
    "15 s is sent as a click event (with a warning)",
    strict=False,
)
def test_progress_and_stop(fresh_page, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A new tab loads a slow model, starts Ships on every prompt and stops it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    page = fresh_page
    folder = slow_model(tmp_path_factory.mktemp("slow") / "slow-llama")
    page.get_by_role("tab", name="1 · Model & data").click()
    model = page.locator("#hsr-model input")
    model.click()
    model.fill(str(folder))
    model.press("Enter")
    page.get_by_role("button", name="Load model").click()
    expect(page.locator("#hsr-model-info")).to_contain_text("slow-llama", timeout=TIMEOUT_MS)

    page.get_by_role("tab", name="2 · Attribute").click()
    samples = page.get_by_label("number input for probe prompts", exact=True)
    samples.fill("170")
    samples.press("Tab")
    page.get_by_role("button", name="Run Ships attribution").click()
    progress = page.locator("#hsr-ships-heatmap .progress-text").first
    expect(progress).to_contain_text("/170 prompt", timeout=TIMEOUT_MS)
    expect(page.locator("#hsr-ships-heatmap")).to_contain_text(
        re.compile(r"Ships attribution · .* left")
    )
    expect(page.get_by_role("button", name="Run Ships attribution")).to_be_disabled()
    # what the page did and when, in the failure's message: the xfail's cause is not known yet
    page.evaluate(FRAME_COUNTER)
    t0, steps = time.monotonic(), []

    def step(what: str) -> None:
        frames = page.evaluate("window.__hsrFrames")
        steps.append(f"{time.monotonic() - t0:.1f} s {what} ({frames} frames)")

    page.wait_for_timeout(1000)
    step("waited")
    page.screenshot(path=str(SHOTS / "app-progress.png"))
    step("screenshot")
    stop = page.get_by_role("button", name="Stop").locator("visible=true")
    step(f"Stop's {stop.evaluate(ON_TOP)}")
    took_click = True
    try:
        stop.click(timeout=15_000)
        step("clicked Stop")
    except PlaywrightTimeoutError as e:  # the page did not take the click: send it as an event
        took_click = False
        step(f"click on Stop timed out: {' | '.join(str(e).splitlines()[-6:])}")
        step(f"Stop's {stop.evaluate(ON_TOP)}")
        stop.dispatch_event("click")
        step("dispatched a click event")
    status = page.locator("#hsr-ships-status")
    try:
        expect(status).to_contain_text("Stopped", timeout=TIMEOUT_MS)
    except AssertionError as e:
        raise AssertionError(f"{e}\nsteps: {'; '.join(steps)}") from None
    step("stopped")
    print("test_progress_and_stop:", "; ".join(steps))  # shown by -rA or -s
    if not took_click:
        warnings.warn(f"the page did not take the click on Stop: {'; '.join(steps)}", stacklevel=1)
    expect(page.get_by_role("button", name="Run Ships attribution")).to_be_enabled()
