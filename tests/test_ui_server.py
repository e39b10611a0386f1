"""The web app served on 127.0.0.1: the named API endpoints answer gradio_client, a decompression bomb is refused
with a clear message and the app keeps serving, and the REST API lives on the same server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import serve_app

DATA = Path(__file__).resolve().parent / "data"



@pytest.fixture(scope="module")
def served(tmp_path_factory, shared_weights_dir):
    """The app launched in this process on a random local port; yields (url, services)."""
    with serve_app(tmp_path_factory.mktemp("ui_server"), shared_weights_dir) as served_app:
        yield served_app


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False)


@pytest.fixture
def tiny_png(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "tiny.png"
    Image.open(DATA / "images" / "children_alpha_crop.png").convert("RGB").crop((0, 0, 32, 24)).save(path)
    return path


def test_enhance_endpoint_with_defaults_returns_the_image_first(client, tiny_png, served):
    from PIL import Image

    image_path, report = client.predict(_file(tiny_png), api_name="/enhance")
    with Image.open(image_path) as im:
        assert im.size == (128, 96)  # the default model's native ×4
    assert report["output_size"] == [128, 96] and report["input_size"] == [32, 24]
    outputs = list(Path(served[1].config.output_dir).rglob("tiny_enhanced.png"))
    assert outputs, "the result is saved in a per-job folder under the output dir"


def test_enhance_endpoint_with_settings(client, tiny_png):
    from PIL import Image

    image_path, report = client.predict(_file(tiny_png), {"model": "realesr-animevideov3-x2", "output_format": "jpg"},
                                        api_name="/enhance")
    with Image.open(image_path) as im:
        assert im.size == (64, 48) and im.format == "JPEG"
    assert report["model"] == "realesr-animevideov3-x2"


def test_analyze_endpoint_returns_the_advisors_json(client, tiny_png):
    advice = client.predict(_file(tiny_png), api_name="/analyze")
    assert set(advice) >= {"settings", "reasoning", "analysis"}
    assert advice["analysis"]["resolution"] == "32x24"
    assert advice["settings"]["model"]


def test_decompression_bomb_is_refused_and_the_app_keeps_serving(client, tmp_path, tiny_png):
    from gradio_client.exceptions import AppError

    from tests.test_ui import png_header_only

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(50000, 50000))
    with pytest.raises(AppError) as refused:
        client.predict(_file(bomb), api_name="/enhance")
    message = str(refused.value)
    assert "too large" in message and "50000×50000" in message
    assert str(tmp_path) not in message and "Traceback" not in message
    image_path, _report = client.predict(_file(tiny_png), {"model": "realesr-animevideov3-x2"}, api_name="/enhance")
    assert Path(image_path).is_file()


def test_files_outside_the_apps_folders_are_not_served(served):
    import httpx

    url = served[0].rstrip("/")
    for target in ("/etc/passwd", str(Path(served[1].config.config_dir) / "settings.json")):
        response = httpx.get(f"{url}/gradio_api/file={target}", timeout=10)
        assert response.status_code in (403, 404), target


def test_rest_api_is_on_the_same_server(served):
    import httpx

    response = httpx.get(served[0].rstrip("/") + "/api/v1/health", timeout=10)
    assert response.status_code == 200


def _file(path: Path):
    from gradio_client import handle_file

    return handle_file(str(path))


def test_the_rest_api_and_the_access_gate_are_in_place_before_the_server_answers(tmp_path, shared_weights_dir,
                                                                                 monkeypatch):
    """Added once ``launch()`` had returned, they missed the server's first ~40 ms: a POST to /api/v1 right after
    the UI's first 200 got 404, and the UI answered without the access gate. They are installed in the server's
    own start-up (its lifespan), which runs before it accepts a connection: in the server's thread, not in the
    caller's after the launch."""
    import threading

    import httpx

    from ui import app as app_module
    from ui.access import API_KEY_HEADER

    installed_on = []
    install = app_module.install_access_gate

    def recorded(app, config):
        installed_on.append(threading.current_thread())
        install(app, config)

    monkeypatch.setattr(app_module, "install_access_gate", recorded)
    with serve_app(tmp_path, shared_weights_dir, api_key="k3y") as (url, _services):
        assert len(installed_on) == 1 and installed_on[0] is not threading.current_thread()
        health = httpx.get(url.rstrip("/") + "/api/v1/health", headers={API_KEY_HEADER: "k3y"}, timeout=10)
        assert health.status_code == 200
        assert httpx.post(url.rstrip("/") + "/api/v1/enhance", timeout=10).status_code == 401  # the gate is on
