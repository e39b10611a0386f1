"""The web UI in a real browser: headless Debian Chromium driven by Playwright uploads an image, sees the
advisor's recommendation, clicks Enhance, waits for the before/after slider and saves a screenshot; imports a
model in the System tab and compares two models on one image.

Needs ``/usr/bin/chromium`` (``scripts/ensure_browser.sh`` installs it in CI); skipped with the reason otherwise.
Set ``UI_SCREENSHOT_DIR`` to keep the screenshots somewhere to look at.
"""

from __future__ import annotations

import os
import re
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


def test_import_a_model_in_the_system_tab_and_compare_two_models(page, tmp_path):
    """Import a tiny SPAN model through the System tab's upload, then compare it with a second imported model on
    one image in the Image tab: both on the slider, with time and metrics for each."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.SPAN import SPAN

    from engine.models.user_catalog import UserCatalog

    torch.manual_seed(0)
    span = tmp_path / "tiny-span.safetensors"
    save_file(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2).state_dict(), span)
    compact = tmp_path / "tiny-compact.pth"
    torch.save(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict(), compact)
    UserCatalog(tmp_path / "weights").import_model(str(compact), kind="anime")
    photo = tmp_path / "photo.png"
    Image.open(DATA / "images" / "children_alpha_crop.png").convert("RGB").crop((0, 0, 32, 24)).save(photo)

    with serve_app(tmp_path / "app", tmp_path / "weights") as (url, services):
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#enhance-button").wait_for(state="visible", timeout=60_000)
        page.get_by_role("tab", name="System Info").click()
        page.locator("#import-panel").get_by_text("Add your own model").click()
        page.locator("#import-file input[type=file]").set_input_files(str(span))
        page.locator("#import-name").locator("input, textarea").first.fill("browser-span")
        page.locator("#import-button").click()
        page.locator("#import-status").get_by_text("Imported browser-span").wait_for(timeout=90_000)
        assert "browser-span" in page.locator("#model-table").inner_text()
        assert services.model_manager.spec("browser-span").arch == "SPAN"

        page.get_by_role("tab", name="Image Enhancement").click()
        page.locator("input[aria-label='Model']:visible").first.click()  # offered at once, no reload needed
        page.get_by_role("option", name=re.compile("browser-span")).first.wait_for(timeout=30_000)
        page.keyboard.press("Escape")
        page.locator("#input-image input[type=file]").set_input_files(str(photo))
        page.locator("#advice").get_by_text("What the app sees").wait_for(timeout=90_000)
        page.locator("#compare-panel").get_by_text("Compare models").click()
        chooser = page.locator("#compare-models input")
        for name in ("browser-span", "tiny-compact"):
            chooser.click()
            page.get_by_role("option", name=name).first.click()
        page.locator("#compare-button").click()
        table = page.locator("#compare-metrics")
        table.get_by_text("tiny-compact").wait_for(timeout=180_000)
        text = table.inner_text()
        assert "browser-span" in text and "64×48" in text and " s" in text
        assert page.locator("#result-slider img").count() == 2
        assert page.locator("#compare-gallery img").count() >= 2
        shot = tmp_path / "ui_compare_models.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
    from engine.catalog import use_user_catalog

    use_user_catalog(None)  # the app's catalog in tmp_path is gone; later tests start clean
