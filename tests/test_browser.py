"""The app in a real browser: Playwright drives Debian Chromium through the whole pipeline on
the built-in tiny Llama, moves a slider, and saves screenshots to ``tests/screenshots/``
(ignored by git, so running the tests leaves the checkout clean).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``); never downloads a browser.
"""

from __future__ import annotations

import re
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
def page(tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian Chromium is not installed at /usr/bin/chromium (apt-get install chromium)"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    with (
        running_app(tmp_path_factory.mktemp("browser-cache")) as url,
        sync_api.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.get_by_text("HSR Workbench").first.wait_for()
        yield page
        browser.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(700)  # let Plotly finish drawing
    page.screenshot(path=str(SHOTS / name), full_page=True)


def restored_count(text: str) -> int:
    return int(re.search(r"([\d,]+) weights restored", text).group(1).replace(",", ""))


def test_pipeline_through_the_browser(page) -> None:
    from playwright.sync_api import expect

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
    shot(page, "app-realign.png")


def test_chat_through_the_browser(page) -> None:
    """After the pipeline above: a message gets three answers, each with its verdict; an example
    is sent with one click. Saves ``app-chat.png``."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="5 · Chat").click()
    expect(page.locator("#hsr-chat-realigned")).to_contain_text("in 8 heads")
    tokens = page.locator("#hsr-chat-max-new input[type=number]")
    tokens.fill("24")  # short answers: both turns fit the screenshot
    tokens.press("Tab")
    box = page.locator("#hsr-chat-msg textarea")
    box.fill("How do I bake bread?")
    box.press("Enter")
    columns = [page.locator(f"#hsr-chat-{v}") for v in ("original", "pruned", "realigned")]
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


def test_progress_and_stop(page, tmp_path_factory: pytest.TempPathFactory) -> None:
    from playwright.sync_api import expect

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
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "app-progress.png"))
    page.get_by_role("button", name="Stop").locator("visible=true").click()
    expect(page.locator("#hsr-ships-status")).to_contain_text("Stopped", timeout=TIMEOUT_MS)
    expect(page.get_by_role("button", name="Run Ships attribution")).to_be_enabled()


def test_localization_ladder_through_the_browser(page) -> None:
    """After the pipeline above: the Localize tab runs the ladder and draws it. Saves
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
