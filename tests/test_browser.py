"""The page in a real browser: `streamlit run app.py` driven by headless Chromium through Playwright.

Choose a model and a GPU with the widgets, check the headline (in GiB) and the chart, follow a
shared link, and save a screenshot (to docs/screenshot.png, the README's picture, only when
CANIRUN_UPDATE_SCREENSHOT=1, so test runs leave the tree clean). Needs Debian's Chromium at
/usr/bin/chromium (CI installs it); skipped, with the reason, where it is missing. No network:
the server runs with HF_HUB_OFFLINE=1 and the catalog is offline.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
README_SCREENSHOT = ROOT / "docs" / "screenshot.png"
TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does it)")
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    env.pop("HF_TOKEN", None)
    log = open(ROOT / ".pytest_cache" / "streamlit-browser-test.log", "w") if (ROOT / ".pytest_cache").is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with status {proc.returncode} before answering")
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read().strip() == b"ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("streamlit did not answer its health check within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not subprocess.DEVNULL:
            log.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _choose(page, label: str, text: str) -> None:
    """Pick `text` in the Streamlit selectbox labelled `label` by typing into its search box."""
    box = page.locator('[data-testid="stSelectbox"]').filter(has=page.get_by_text(label, exact=True))
    box.locator("input").first.click()
    page.keyboard.type(text)
    option = page.get_by_role("option").filter(has_text=text).first
    option.wait_for(timeout=TIMEOUT_MS)
    option.click()


def _headline(page):
    return page.locator("h3").filter(has_text=re.compile(r"GiB|Does not"))


def test_choose_a_model_and_a_gpu(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1440, "height": 1150})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server, timeout=TIMEOUT_MS)
    _headline(page).first.wait_for(timeout=TIMEOUT_MS)
    assert "H100 SXM 80GB" in _headline(page).first.inner_text()

    _choose(page, "Catalog model", "Qwen3-8B")
    page.get_by_text("Qwen3-8B (offline catalog", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    page.locator('[data-testid="stRadio"]').filter(has_text="QLoRA").get_by_text("QLoRA", exact=True).click()
    page.locator('[data-testid="stNumberInputContainer"]').first.wait_for(timeout=TIMEOUT_MS)
    page.locator('[data-testid="stCheckbox"]').filter(has_text="Gradient checkpointing").locator("label").first.click()
    _choose(page, "GPU", "GeForce RTX 4090")
    page.locator("h3").filter(has_text="GeForce RTX 4090").first.wait_for(timeout=TIMEOUT_MS)

    text = _headline(page).first.inner_text()
    assert "Fits on 1 × GeForce RTX 4090" in text and "GiB" in text, text
    chart = page.locator(".js-plotly-plot").first
    chart.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert chart.locator(".bars path").count() > 0  # the stacked bars were drawn
    assert "GiB" in chart.inner_text()
    page.get_by_text("Every GPU that can run it", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("Largest batch", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    assert "model=Qwen3-8B" in page.url and "mode=qlora" in page.url and "gpu=GeForce+RTX+4090" in page.url.replace("%20", "+")
    assert not page.locator('[data-testid="stException"]').count()
    assert not errors, errors

    assert "gradient_checkpointing=true" in page.url
    # Issue 15: the GPU-count box was clipped; its value shows whole now
    count = page.locator('input[aria-label="GPU count"]').first
    count.wait_for(timeout=TIMEOUT_MS)
    assert count.input_value() == "fewest that fit"
    assert count.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), "the GPU count's value is cut off"
    page.locator('[data-testid="stSidebarContent"]').evaluate("e => e.scrollTo(0, 0)")
    page.mouse.move(5, 1100)  # no hover tooltip in the picture
    time.sleep(0.5)  # let plotly finish its transition before the picture
    shot = README_SCREENSHOT if os.environ.get("CANIRUN_UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000
    page.close()


def test_a_shared_link_reproduces_the_view(browser, server):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(f"{server}/?model=Llama-3.1-70B-Instruct&mode=inference&weights=nf4&gpu=A100+SXM+80GB", timeout=TIMEOUT_MS)
    head = page.locator("h3").filter(has_text="A100 SXM 80GB").first
    head.wait_for(timeout=TIMEOUT_MS)
    assert "GiB" in head.inner_text()
    page.get_by_text("Llama-3.1-70B-Instruct (offline catalog", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert not page.locator('[data-testid="stException"]').count()
    page.close()


def test_bad_link_shows_an_error_not_a_traceback(browser, server):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(f"{server}/?batch_size=1000000000&gpu=H100", timeout=TIMEOUT_MS)
    alert = page.locator('[data-testid="stAlertContentError"]').first
    alert.wait_for(timeout=TIMEOUT_MS)
    assert "beyond any real job" in alert.inner_text()
    _headline(page).first.wait_for(timeout=TIMEOUT_MS)  # the rest of the page still answers
    assert not page.locator('[data-testid="stException"]').count()
    page.close()


def test_suggestions_and_the_memory_plot_render(browser, server):
    """Issue 15: a job that does not fit shows what would make it fit, and the memory plot draws."""
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{server}/?model=Qwen3-8B&mode=qlora&gpu=GeForce+RTX+4090", timeout=TIMEOUT_MS)
    box = page.locator(".st-key-suggestions").first
    box.wait_for(timeout=TIMEOUT_MS)
    text = box.inner_text()
    assert "What would make it fit" in text and "turn on gradient checkpointing" in text and "of 23.6 GiB" in text
    plot = page.locator(".st-key-memory_plot .js-plotly-plot").first
    plot.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert "batch size" in plot.inner_text() and "GeForce RTX 4090: 23.6 GiB" in plot.inner_text()
    assert plot.locator(".scatterlayer path").count() > 0  # the lines were drawn
    assert not page.locator('[data-testid="stException"]').count()
    assert not errors, errors
    page.close()
