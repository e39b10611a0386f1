"""The web UI in a real browser: headless Debian Chromium driven by Playwright uploads an image, sees the
advisor's recommendation, clicks Enhance, waits for the before/after slider and saves a screenshot.

Needs ``/usr/bin/chromium`` (``scripts/ensure_browser.sh`` installs it in CI); skipped with the reason otherwise.
Set ``UI_SCREENSHOT_DIR`` to keep the screenshots somewhere to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import serve_app

DATA = Path(__file__).resolve().parent / "data"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"{CHROMIUM} is missing (run scripts/ensure_browser.sh to install Debian's chromium)"),
]



@pytest.fixture(scope="module")
def app_url(tmp_path_factory, shared_weights_dir):
    with serve_app(tmp_path_factory.mktemp("ui_browser"), shared_weights_dir) as (url, _services):
        yield url


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context.new_page()
        finally:
            context.close()


def _keep(screenshot: Path) -> None:
    target = os.environ.get("UI_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(target) / screenshot.name)


def test_upload_enhance_and_compare_in_the_browser(app_url, page, tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.open(DATA / "images" / "children_alpha_crop.png").convert("RGB").crop((0, 0, 48, 40)).save(photo)

    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#enhance-button").wait_for(state="visible", timeout=60_000)
    assert "Real-ESRGAN Ultimate" in page.title()

    page.locator("#input-image input[type=file]").set_input_files(str(photo))
    advice = page.locator("#advice")
    advice.get_by_text("What the app sees").wait_for(timeout=90_000)
    assert "Recommended" in advice.inner_text()

    page.locator("#enhance-button").click()
    after = page.locator("#result-slider img")
    after.nth(1).wait_for(state="visible", timeout=180_000)
    assert after.count() == 2  # before and after
    metrics = page.locator("#result-metrics")
    metrics.get_by_text("48×40").wait_for(timeout=30_000)
    assert "→" in metrics.inner_text()
    page.locator("#download-result").wait_for(state="visible", timeout=30_000)

    shot = tmp_path / "ui_after_enhance.png"
    page.screenshot(path=str(shot), full_page=True)
    _keep(shot)
    with Image.open(shot) as im:
        assert im.size[0] >= 1000


def test_the_other_tabs_render(app_url, page, tmp_path):
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#enhance-button").wait_for(state="visible", timeout=60_000)
    page.get_by_role("tab", name="System Info").click()
    page.locator("#system-info").get_by_text("Devices").wait_for(timeout=60_000)
    assert "RealESRGAN_x4plus" in page.locator("#model-table").inner_text()
    shot = tmp_path / "ui_system_tab.png"
    page.screenshot(path=str(shot), full_page=True)
    _keep(shot)
    page.get_by_role("tab", name="Presets").click()
    page.locator("#preset-name").locator("textarea, input").first.fill("Browser preset")
    page.locator("#preset-save").click()
    page.locator("#preset-status").get_by_text("Browser preset").wait_for(timeout=30_000)
