"""The REST API against a real server: uvicorn on 127.0.0.1 serving a FastAPI app with :func:`install_api`.

The model manager uses a copy of the catalog whose download URLs point at a closed loopback port, so nothing
here can reach the network: a model whose weights are missing fails at once (connection refused), and the
bundled offline weights are converted as in production.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import socket
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from config import Config
from engine.catalog import CATALOG
from engine.concurrency import DeviceLimiter

FAST_MODEL = "realesr-animevideov3-x2"  # small network, bundled offline weights, ×2


# ------------------------------------------------------------------------------------------------ helpers
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_catalog(port: int):
    """The real catalog with every download URL moved to a loopback port where nothing listens."""
    return MappingProxyType({name: dataclasses.replace(spec, url=f"http://127.0.0.1:{port}/{spec.filename}")
                             if spec.url else spec for name, spec in CATALOG.items()})


def _png(width: int = 32, height: int = 32, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=2)
    pixels = np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width × height`` but holds one tiny data chunk (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _png_with_padding(extra_bytes: int) -> bytes:
    """A small valid PNG made bigger than ``extra_bytes`` by a private ancillary chunk."""
    png = _png(32, 32)
    pad = _png_chunk(b"prVt", b"\0" * extra_bytes)
    return png[:-12] + pad + png[-12:]  # before IEND


def _files(data: bytes, name: str = "in.png", mime: str = "image/png") -> dict:
    return {"file": (name, data, mime)}


def _all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


class _BodyReadCounter:
    """Outermost ASGI wrapper: how many body bytes the app (middleware included) pulled for each request."""

    def __init__(self, app):
        self.app, self.per_request = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        index = len(self.per_request)
        self.per_request.append(0)

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                self.per_request[index] += len(message.get("body", b""))
            return message

        await self.app(scope, counting_receive, send)


@contextlib.contextmanager
def serve(services, counter: list | None = None) -> Iterator[str]:
    """Run the app on a free loopback port in a background thread; yields the base URL.

    ``counter``, when given, receives the :class:`_BodyReadCounter` wrapping the app.
    """
    import uvicorn
    from fastapi import FastAPI

    from ui.rest_api import install_api

    fastapi_app = FastAPI()
    install_api(fastapi_app, services)
    app = _BodyReadCounter(fastapi_app)
    if counter is not None:
        counter.append(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _services(config: Config, model_manager, limiter: DeviceLimiter | None = None):
    from engine.intelligent_enhancer import IntelligentEnhancer
    from engine.settings_manager import SettingsManager
    from ui.services import Services

    return Services(config=config, model_manager=model_manager,
                    advisor=IntelligentEnhancer(model_manager=model_manager, config=config, calibrate=False),
                    settings=SettingsManager(config.config_dir),
                    limiter=limiter or DeviceLimiter(concurrency=config.concurrency_per_device,
                                                     max_queue=config.max_queue_size))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def api_env(tmp_path_factory, shared_weights_dir):
    """One config, model manager (offline catalog, fast model pre-loaded) and server for the module."""
    from engine.model_manager import ModelManager

    root = tmp_path_factory.mktemp("api")
    port = _closed_port()
    config = Config.from_env(
        env={}, dotenv_path=None, weights_dir=shared_weights_dir, output_dir=root / "out", temp_dir=root / "tmp",
        config_dir=root / "cfg", log_dir=root / "logs", download_retries=0, download_timeout=2.0,
        mirror_url=f"http://127.0.0.1:{port}", max_upload_mb=1.0, concurrency_per_device=1, max_queue_size=4,
        device="cpu")
    config.ensure_directories()
    manager = ModelManager(config, catalog=_offline_catalog(port))
    manager.load_model(FAST_MODEL, "cpu")  # converts the bundled weights once, before the no-files checks
    services = _services(config, manager)
    counter: list[_BodyReadCounter] = []
    with serve(services, counter) as url:
        yield {"url": url, "config": config, "manager": manager, "services": services, "reads": counter[0]}


@pytest.fixture
def client(api_env) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_env["url"], timeout=60) as c:
        yield c


def _assert_error(response: httpx.Response, status: int, stage: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "stage"}, body
    assert body["stage"] == stage, body
    assert body["error"] and "Traceback" not in body["error"]
    return body


# ------------------------------------------------------------------------------------------------ success
def test_enhance_returns_the_image_at_the_requested_size(client, api_env):
    config = api_env["config"]
    before = _all_files(config.output_dir) + _all_files(config.temp_dir)
    response = client.post("/api/v1/enhance", files=_files(_png(32, 24)),
                           data={"model": FAST_MODEL, "upscale_factor": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success" and set(body) == {"status", "data"}
    data = body["data"]
    assert set(data) == {"restored_image", "format", "width", "height", "metrics", "settings",
                         "processing_time_ms", "warning"}
    assert (data["format"], data["width"], data["height"]) == ("png", 64, 48)
    image = Image.open(io.BytesIO(base64.b64decode(data["restored_image"])))
    assert image.format == "PNG" and image.size == (64, 48)
    assert data["settings"]["model"] == FAST_MODEL and data["settings"]["chosen_by"] == "request"
    assert data["metrics"]["enhanced_width"] == 64 and data["metrics"]["original_bytes"] > 0
    assert data["metrics"]["enhanced_bytes"] == len(base64.b64decode(data["restored_image"]))
    assert isinstance(data["processing_time_ms"], int) and data["processing_time_ms"] >= 0
    assert data["warning"] is None or isinstance(data["warning"], str)
    # Processing is in memory: the app's output and temp folders are untouched.
    assert _all_files(config.output_dir) + _all_files(config.temp_dir) == before == []


def test_the_success_body_streams_its_base64_in_chunks_with_the_exact_length(client, monkeypatch):
    """The same JSON, its base64 text made a chunk at a time (here 111 bytes of image per chunk: dozens of chunks,
    none padded but the last, which strict base64 checks), sent with its exact Content-Length, not chunked."""
    from ui import rest_api

    monkeypatch.setattr(rest_api, "BASE64_CHUNK_BYTES", 111)
    response = client.post("/api/v1/enhance", files=_files(_png(32, 24)),
                           data={"model": FAST_MODEL, "upscale_factor": "2"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert "transfer-encoding" not in response.headers
    body = response.json()
    assert list(body) == ["status", "data"] and body["status"] == "success"
    image = base64.b64decode(body["data"]["restored_image"], validate=True)
    assert len(image) == body["data"]["metrics"]["enhanced_bytes"] > 10 * 111
    assert Image.open(io.BytesIO(image)).size == (64, 48)


def test_enhance_jpeg_output_and_uploads_over_a_megabyte_stay_in_memory(client, monkeypatch):
    """Starlette spools uploads over 1 MB to a temp file; the API must not (a 1.5 MB+ upload, no temp file)."""
    created: list[str] = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "SpooledTemporaryFile"):
        original = getattr(tempfile, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            created.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tempfile, name, spy)
    from starlette import formparsers

    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", tempfile.SpooledTemporaryFile)
    big = _png_with_padding(1_000_000)  # over starlette's 1 MB spool size, under the 1 MiB upload cap
    assert 1_000_000 < len(big) < 1_040_000
    response = client.post("/api/v1/enhance", files=_files(big),
                           data={"model": FAST_MODEL, "upscale_factor": "1.5", "output_format": "jpg"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["format"] == "jpg" and (data["width"], data["height"]) == (48, 48)
    assert Image.open(io.BytesIO(base64.b64decode(data["restored_image"]))).format == "JPEG"
    assert "SpooledTemporaryFile" in created  # the upload went through the spool...
    assert "TemporaryFile" not in created and "NamedTemporaryFile" not in created  # ...and never rolled to disk
    assert "mkstemp" not in created


# ------------------------------------------------------------------------------------------------ errors
def test_gif_is_unsupported_media_type(client):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="GIF")
    body = _assert_error(client.post("/api/v1/enhance", files=_files(buf.getvalue(), "a.png", "image/png"),
                                     data={"model": FAST_MODEL}), 415, "validation")
    assert "GIF" in body["error"]


def test_tiff_is_refused_by_the_api_even_though_the_engine_reads_it(client):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    _assert_error(client.post("/api/v1/enhance", files=_files(buf.getvalue(), "a.tif", "image/tiff"),
                              data={"model": FAST_MODEL}), 415, "validation")


def test_huge_dimensions_are_refused_from_the_header(client, api_env):
    data = _png_header_only(50000, 50000)
    assert len(data) < 200
    body = _assert_error(client.post("/api/v1/enhance", files=_files(data), data={"model": FAST_MODEL}),
                         413, "validation")
    assert "50000" in body["error"]
    assert api_env["services"].limiter.stats().running == 0  # refused before queueing


def test_body_over_the_cap_is_refused_by_content_length(client):
    body = _assert_error(client.post("/api/v1/enhance", files=_files(b"\x89PNG" + b"\0" * 1_200_000),
                                     data={"model": FAST_MODEL}), 413, "validation")
    assert "MB" in body["error"]


def test_declared_content_length_refused_without_body(api_env):
    """Headers announce 500 MB and no body byte follows: the 413 comes without waiting for the body."""
    host, port = api_env["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /api/v1/enhance HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 500000000\r\n\r\n")
        reply = _read_http_response(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"stage":"validation"' in reply


def _read_http_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_chunked_upload_over_the_cap_is_stopped_early(api_env):
    """A chunked body (no Content-Length) is counted as it streams; 413 comes long before the client is done."""
    cap = api_env["config"].max_upload_bytes
    chunk = b"\0" * 65536
    total_chunks = 32 * cap // len(chunk)  # the client would send 32× the cap
    sent = 0
    boundary = b"b0undary"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n")
    host, port = api_env["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(b"POST /api/v1/enhance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n")
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        s.setblocking(False)
        reply = b""
        for _ in range(total_chunks):
            with contextlib.suppress(BlockingIOError):
                reply += s.recv(65536)
            if reply:
                break
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)  # the server stopped reading (or closed): look for its answer
        s.setblocking(True)
        s.settimeout(10)
        with contextlib.suppress(ConnectionResetError, socket.timeout):
            while b"\r\n\r\n" not in reply:
                more = s.recv(65536)
                if not more:
                    break
                reply += more
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # The answer came long before the upload was done (loopback socket buffers absorb a few MB on their own)...
    assert sent < 16 * cap, f"the client managed to send {sent} bytes (cap {cap})"
    # ...and the server read only up to the message that crossed the cap.
    assert api_env["reads"].per_request[-1] < 2 * cap


def test_chunked_upload_via_httpx_generator_gets_413_and_is_not_read_whole(api_env):
    """The same with httpx streaming a generator body: the server pulls about the cap, not the body, then answers."""
    cap = api_env["config"].max_upload_bytes
    reads = api_env["reads"].per_request
    chunk = 65536

    def body():
        yield (b'--bb\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(10 * cap // chunk):  # 10× the cap
            yield b"\0" * chunk

    before = len(reads)
    response = None
    with httpx.Client(base_url=api_env["url"], timeout=30) as c:
        with contextlib.suppress(httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            response = c.post("/api/v1/enhance", content=body(),
                              headers={"Content-Type": "multipart/form-data; boundary=bb"})
    assert len(reads) == before + 1
    # It stops at the message that crosses the cap (uvicorn hands over up to a few hundred KB per message).
    assert reads[-1] < 2 * cap, f"the server read {reads[-1]} bytes of a {10 * cap} byte body"
    if response is not None:  # the client may instead see the closed connection while still sending
        _assert_error(response, 413, "validation")


def test_upscale_factor_out_of_range_is_422(client):
    body = _assert_error(client.post("/api/v1/enhance", files=_files(_png()),
                                     data={"model": FAST_MODEL, "upscale_factor": "99"}), 422, "validation")
    assert "upscale_factor" in body["error"]


def test_fastapi_validation_errors_are_reshaped(client):
    _assert_error(client.post("/api/v1/enhance", data={"model": FAST_MODEL}), 422, "validation")  # no file
    body = _assert_error(client.post("/api/v1/enhance", files=_files(_png()),
                                     data={"model": "NoSuchModel"}), 422, "validation")
    assert "model" in body["error"]
    _assert_error(client.post("/api/v1/enhance", files=_files(_png()),
                              data={"model": FAST_MODEL, "output_format": "bmp"}), 422, "validation")
    _assert_error(client.post("/api/v1/enhance", files=_files(_png()),
                              data={"model": FAST_MODEL, "face_strength": "2"}), 422, "validation")


def test_corrupt_image_is_a_decode_error(client):
    data = _png()[:60]
    _assert_error(client.post("/api/v1/enhance", files=_files(data), data={"model": FAST_MODEL}), 422, "decode")


def test_face_enhance_without_a_face_is_422(client):
    body = _assert_error(client.post("/api/v1/enhance", files=_files(_png(48, 48)),
                                     data={"model": FAST_MODEL, "face_enhance": "true"}), 422, "faces")
    assert "face" in body["error"].lower()


def test_missing_model_weights_is_503_without_server_paths(client, api_env):
    weights_dir = str(api_env["config"].weights_dir)
    response = client.post("/api/v1/enhance", files=_files(_png()), data={"model": "RealESRGAN_x2plus"})
    body = _assert_error(response, 503, "model")
    assert "RealESRGAN_x2plus" in body["error"]
    assert weights_dir not in response.text and "/tmp/" not in response.text
    assert "site-packages" not in response.text


# ------------------------------------------------------------------------------------------------ concurrency
def test_one_inference_at_a_time_and_overflow_gets_429(api_env, monkeypatch):
    """Concurrency 1, a line of 2: of 7 simultaneous requests 3 run (one at a time) and 4 get 429."""
    from engine.inference import pipeline as processor
    from engine.model_manager import ModelManager

    config = api_env["config"].replace(max_queue_size=2)
    limiter = DeviceLimiter(concurrency=1, max_queue=2)
    services = _services(config, api_env["manager"], limiter)
    assert isinstance(services.model_manager, ModelManager)

    gate = threading.Event()
    lock = threading.Lock()
    state = {"active": 0, "peak": 0, "calls": 0}
    real = processor.enhance_image

    def counting_enhance(*args, **kwargs):
        with lock:
            state["active"] += 1
            state["calls"] += 1
            state["peak"] = max(state["peak"], state["active"])
        try:
            gate.wait(30)  # hold the first inference until every request has been answered or queued
            return real(*args, **kwargs)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(processor, "enhance_image", counting_enhance)
    results: list[httpx.Response] = []
    with serve(services) as url:
        def send():
            with httpx.Client(base_url=url, timeout=60) as c:
                r = c.post("/api/v1/enhance", files=_files(_png(16, 16)), data={"model": FAST_MODEL})
            with lock:
                results.append(r)

        threads = [threading.Thread(target=send) for _ in range(7)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not (limiter.running == 1 and limiter.waiting == 2 and len(results) == 4):
            assert time.monotonic() < deadline, (limiter.stats(), len(results))
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(60)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 200, 429, 429, 429, 429]
    assert state["peak"] == 1 and state["calls"] == 3
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["stage"] == "inference"
    assert (limiter.running, limiter.waiting) == (0, 0)


# ------------------------------------------------------------------------------------------------ access
def test_api_key_is_required_when_configured(api_env):
    config = api_env["config"].replace(api_key="s3cret-key")
    services = _services(config, api_env["manager"])
    with serve(services) as url, httpx.Client(base_url=url, timeout=60) as c:
        _assert_error(c.post("/api/v1/enhance", files=_files(_png()), data={"model": FAST_MODEL}), 401,
                      "validation")
        _assert_error(c.post("/api/v1/enhance", files=_files(_png()), data={"model": FAST_MODEL},
                             headers={"X-API-Key": "s3cret-kez"}), 401, "validation")
        _assert_error(c.get("/api/v1/health"), 401, "validation")
        _assert_error(c.get("/api/v1/models", headers={"X-API-Key": ""}), 401, "validation")
        ok = c.post("/api/v1/enhance", files=_files(_png(16, 16)), data={"model": FAST_MODEL},
                    headers={"X-API-Key": "s3cret-key"})
        assert ok.status_code == 200, ok.text
        assert c.get("/api/v1/health", headers={"X-API-Key": "s3cret-key"}).status_code == 200


# ------------------------------------------------------------------------------------------------ info routes
def test_health_reports_device_models_and_queue(client):
    r = client.get("/api/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["device"] == "cpu"
    assert any(m.startswith(FAST_MODEL) for m in body["loaded_models"])
    assert body["queue"]["running"] == 0 and body["queue"]["waiting"] == 0
    assert body["queue"]["concurrency"] == 1


def test_health_reports_a_broken_device_setting_in_words_not_class_names(api_env):
    services = _services(api_env["config"].replace(device="cuda:99"), api_env["manager"])
    with serve(services) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.get("/api/v1/health")
    assert r.status_code == 200
    device = r.json()["device"]
    assert device.startswith("unavailable: ") and "cuda:99" in device and "Error" not in device


def test_models_lists_the_catalog_with_availability_and_no_paths(client):
    r = client.get("/api/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == set(CATALOG)
    assert models[FAST_MODEL]["available"] is True
    assert models["RealESRGAN_x2plus"]["available"] is False
    assert all("path" not in m for m in models.values())


def test_openapi_docs_list_the_routes(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/v1/enhance", "/api/v1/health", "/api/v1/models"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    form = spec["paths"]["/api/v1/enhance"]["post"]
    assert {"413", "415", "422", "429", "503"} <= set(form["responses"])


# ------------------------------------------------------------------------------------------------ pure parts
def test_scrub_paths_keeps_urls_and_hides_paths():
    from utils.errors import scrub_paths

    text = scrub_paths("not in /home/u/.cache/w/x.pth; get https://github.com/a/b.pth or C:\\Users\\me\\w.pth")
    assert "/home/u" not in text and "Users" not in text
    assert "https://github.com/a/b.pth" in text and "x.pth" in text


def test_model_defaults_to_the_advisors_choice(client):
    response = client.post("/api/v1/enhance", files=_files(_png(24, 24)), data={"upscale_factor": "2"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["settings"]["chosen_by"] == "advisor"
    assert data["settings"]["model"] in CATALOG and CATALOG[data["settings"]["model"]].kind == "sr"
    assert (data["width"], data["height"]) == (48, 48)


@pytest.mark.parametrize("failure, status", [(RuntimeError("boom in /srv/secret/app/engine.py"), 500),
                                             (KeyError("/srv/secret/config.json"), 500),
                                             (MemoryError(), 503)])
def test_unexpected_failures_are_scrubbed(client, monkeypatch, caplog, failure, status):
    """A failure inside the pipeline: 500 (or 503 for memory) with no traceback, exception class, exception text
    or server path; an unexpected one is logged in full under the request id the answer carries."""
    from engine.inference import pipeline
    from utils.errors import user_message

    def failing_enhance(*args, **kwargs):
        raise failure

    monkeypatch.setattr(pipeline, "enhance_image", failing_enhance)
    with caplog.at_level("ERROR", logger="ui.rest_api"):
        response = client.post("/api/v1/enhance", files=_files(_png(16, 16)), data={"model": FAST_MODEL})
    body = _assert_error(response, status, "inference")
    assert "/srv" not in response.text and "boom" not in response.text and "Traceback" not in response.text
    assert "secret" not in response.text
    assert type(failure).__name__ not in response.text and "Error" not in body["error"]
    assert body["error"] == user_message(failure)  # the same line the CLI and the UI show
    if status == 500:
        request_id = response.headers["X-Request-ID"]
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert logged and logged[0].exc_info and logged[0].exc_info[1] is failure
