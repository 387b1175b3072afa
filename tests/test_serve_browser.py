"""`wan-opt serve` in a real headless browser: the system's Chromium, driven by Playwright with that executable
(Playwright never downloads a browser here). Opens the gallery of a tiny sweep, filters it, opens two runs side
by side and checks that the videos play, and in sync.

WAN_OPT_CHROMIUM names the browser when it is not on the PATH as chromium, chromium-browser or google-chrome.
WAN_OPT_SCREENSHOTS=DIR also saves the page's views there as PNGs (docs/images/web-*.png come from this).
"""
import os
import shutil
from pathlib import Path

import pytest

from test_serve import made, server, site  # noqa: F401  (the same sweep and server as the HTTP tests)

pytestmark = pytest.mark.slow
VIEWPORT = {"width": 1440, "height": 900}


def chromium() -> str | None:
    named = os.environ.get("WAN_OPT_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium installed: apt-get install chromium (or set WAN_OPT_CHROMIUM to a Chromium binary)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    # Playwright's waits evaluate strings, which the page's policy forbids; without the policy's help, the page
    # must still never run a prompt's <script> (it writes text nodes only).
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(f"script error: {error}"))
    page.on("dialog", lambda dialog: (page.problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    yield page
    context.close()


def shoot(page, name, height=VIEWPORT["height"]):
    folder = os.environ.get("WAN_OPT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.set_viewport_size({**VIEWPORT, "height": height})
        page.wait_for_timeout(300)
        page.screenshot(path=str(Path(folder) / f"web-{name}.png"))
        page.set_viewport_size(VIEWPORT)


def choose_the_sweep(page):
    page.goto(page.url_base + "/#gallery")
    page.wait_for_selector(".card")
    sweep = page.locator("#set option", has_text="sweep:").first.get_attribute("value")
    page.select_option("#set", sweep)
    page.wait_for_function("document.querySelectorAll('.card').length === 12")


def test_gallery_filter_side_by_side_and_the_videos_play(page, server):  # noqa: F811
    page.url_base = server
    choose_the_sweep(page)
    assert page.locator(".card.failed").count() == 4
    assert "frames=10 is not of the form 4n+1" in page.locator(".card.failed .error").first.inner_text()
    # The previews play as they come into view.
    page.wait_for_function("[...document.querySelectorAll('.card video')].some(v => v.currentTime > 0.2)")
    shoot(page, "gallery")

    page.check('fieldset.facet[data-key="steps"] input[data-value="2"]')
    page.wait_for_function("document.querySelectorAll('.card').length === 6")
    page.select_option("#status", "ok")
    page.wait_for_function("document.querySelectorAll('.card').length === 4")
    assert page.locator("#summary").inner_text().startswith("4 of 12")
    page.uncheck('fieldset.facet[data-key="steps"] input[data-value="2"]')
    page.wait_for_function("document.querySelectorAll('.card').length === 8")

    # Two runs of the same seed and length, one and two steps: side by side.
    page.check('fieldset.facet[data-key="seed"] input[data-value="7"]')
    page.check('fieldset.facet[data-key="frames"] input[data-value="9"]')
    page.wait_for_function("document.querySelectorAll('.card').length === 2")
    for box in page.locator(".card .pick input").all():
        box.check()
    page.click("#open-compare")
    page.wait_for_selector(".tiles video")
    assert page.locator(".tiles video").count() == 2
    assert page.locator("table.knobs.side tr.differs td").first.inner_text() == "steps"
    page.click("#play")
    page.wait_for_function("document.querySelector('.tiles video').currentTime > 0.1")
    played = page.evaluate("""() => new Promise(done => {
        const videos = [...document.querySelectorAll('.tiles video')];
        const first = videos.map(v => v.currentTime), drift = [];
        let samples = 0;
        const timer = setInterval(() => {
            const [a, b] = videos.map(v => v.currentTime), d = videos[0].duration;
            drift.push(Math.min(Math.abs(a - b), d - Math.abs(a - b)));
            if (++samples === 12) {
                clearInterval(timer);
                done({moved: videos.map((v, i) => v.currentTime !== first[i] || v.played.length > 0 && !v.paused),
                      paused: videos.map(v => v.paused), drift: Math.max(...drift.slice(2))});
            }
        }, 100);
    })""")
    assert played["moved"] == [True, True] and played["paused"] == [False, False], played
    assert played["drift"] < 0.2, played  # one clock: within a frame or so of each other
    page.wait_for_selector("svg.chart.lines", timeout=120_000)
    assert page.locator(".metrics svg.chart.lines").count() == 2  # PSNR and SSIM per frame
    assert "B vs A: PSNR" in page.locator(".metrics .legend").inner_text()
    page.click("#play")  # pause: a still frame for the picture
    shoot(page, "side-by-side", height=1250)
    assert page.problems == []


def test_a_prompt_holding_markup_is_shown_as_text(page, server):  # noqa: F811
    page.url_base = server
    page.goto(server + "/#gallery")
    page.fill("#search", "pwned")
    page.wait_for_function("document.querySelectorAll('.card').length === 1")
    page.wait_for_function("document.querySelector('.card video').currentTime > 0")
    # A <script> and an <img onerror> in the prompt: written out as text, neither run.
    assert "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>" in page.locator(".card .prompt").inner_text()
    assert page.evaluate("window.pwned") is None and page.locator("#view img").count() == 0
    page.locator(".card a.prompt").click()
    page.wait_for_selector(".run h1")
    assert "<script>" in page.locator(".run h1").inner_text() and page.evaluate("window.pwned") is None
    assert page.problems == []


def test_the_other_views_draw(page, server):  # noqa: F811
    page.url_base = server
    choose_the_sweep(page)
    page.locator(".card:not(.failed) a.prompt").first.click()
    page.wait_for_selector(".run svg.chart.bars")
    assert "by stage (predicted)" in page.locator(".run .plan").inner_text()
    shoot(page, "run")
    page.goto(server + "/#bench")
    page.wait_for_selector(".bench-body svg.chart.bars")
    assert page.locator(".bench-body svg").count() >= 2  # seconds per step, and the ratio to diffusers
    shoot(page, "benchmarks")
    page.goto(server + "/#new")
    page.wait_for_selector("#plan-preview svg.chart.bars")
    page.select_option("select[name=model]", "wan22_t2v_a14b")
    page.select_option("select[name=hardware]", "h100")
    page.wait_for_function("document.querySelector('#plan-preview').innerText.includes('wan22_t2v_a14b on h100')")
    page.fill("input[name=frames]", "10")
    page.wait_for_selector("#form-error:not([hidden])")
    assert page.locator("#form-error").inner_text() == "frames=10 is not of the form 4n+1: use frames=9 or frames=13."
    page.fill("input[name=frames]", "81")
    page.wait_for_selector("#form-error", state="hidden")
    page.fill("textarea[name=prompt]", "a red fox running through fresh snow")
    shoot(page, "new-run")
    assert page.problems == []
