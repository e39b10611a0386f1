"""A shared server that hostile requests can't take down (issue 16): one regression test per failure seen.

Real servers on 127.0.0.1 (uvicorn for the REST API alone, the whole Gradio app where Gradio's routes matter),
real clients (httpx, and a raw socket that hangs up), the real engine with the bundled offline weights. Nothing
here asserts on elapsed time: waits are for a condition, with a generous timeout.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import httpx
import pytest

from engine.concurrency import DeviceLimiter
from engine.errors import QueueFullError
from tests.conftest import app_config, serve_app
from tests.test_rest_api import FAST_MODEL, _assert_error, _files, _png, _services, serve


def _wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def rest(tmp_path_factory, shared_weights_dir):
    """The REST API alone on a loopback port (fast model loaded); yields (url, services)."""
    from engine.model_manager import ModelManager

    root = tmp_path_factory.mktemp("hardening")
    config = app_config(root, shared_weights_dir, max_upload_mb=4.0, device="cpu")
    config.ensure_directories()
    manager = ModelManager(config)
    manager.load_model(FAST_MODEL, "cpu")
    services = _services(config, manager)
    with serve(services) as url:
        yield url, services


# ------------------------------------------------------------------------------------------------ (6) malformed bodies
@pytest.mark.parametrize("case", ["1500 fields", "1500 files", "no boundary", "2 MB text field"])
def test_malformed_multipart_answers_the_error_contract(rest, case):
    url, _services_ = rest
    with httpx.Client(base_url=url, timeout=60) as c:
        if case == "1500 fields":
            r = c.post("/api/v1/enhance", files=_files(_png()), data={f"f{i}": "1" for i in range(1500)})
        elif case == "1500 files":
            r = c.post("/api/v1/enhance", files=[("file", ("a.png", b"x", "image/png"))] * 1500)
        elif case == "no boundary":
            r = c.post("/api/v1/enhance", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
        else:
            r = c.post("/api/v1/enhance", files=_files(_png()), data={"model": "x" * 2_000_000})
    body = _assert_error(r, 422, "validation")
    assert "multipart" in body["error"] and "HTTPException" not in body["error"]


@pytest.mark.parametrize("method, path, status", [("GET", "/api/v1/nothing-here", 404),
                                                  ("DELETE", "/api/v1/health", 405)])
def test_unknown_routes_and_methods_under_the_api_answer_the_error_contract(rest, method, path, status):
    with httpx.Client(base_url=rest[0], timeout=60) as c:
        _assert_error(c.request(method, path), status, "validation")


# ------------------------------------------------------------------------------------------------ (2) abandoned requests
def _raw_enhance_request(url: str, image: bytes, fields: dict) -> bytes:
    request = httpx.Request("POST", f"{url}/api/v1/enhance", files=_files(image), data=fields)
    body = request.read()
    head = ["POST /api/v1/enhance HTTP/1.1", f"Host: {request.url.host}:{request.url.port}",
            f"Content-Type: {request.headers['content-type']}", f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


def _spy_on(monkeypatch, module, name: str) -> list[str]:
    """Record how each call of ``module.name`` ended (the class name of what it raised, or "finished")."""
    outcomes: list[str] = []
    real = getattr(module, name)

    def spying(*args, **kwargs):
        try:
            result = real(*args, **kwargs)
        except BaseException as exc:
            outcomes.append(type(exc).__name__)
            raise
        outcomes.append("finished")
        return result

    monkeypatch.setattr(module, name, spying)
    return outcomes


def _spy_on_jobs(monkeypatch) -> list[str]:
    """How each REST job ended."""
    from ui import rest_api

    return _spy_on(monkeypatch, rest_api, "run_enhance_job")


# A job of a few hundred tiles: long enough that only a cancellation ends it before the client's hang-up is seen.
_LONG_JOB = {"model": FAST_MODEL, "tile": "32", "upscale_factor": "2"}


def test_a_client_that_hangs_up_frees_its_slot(rest, monkeypatch):
    url, services = rest
    outcomes = _spy_on_jobs(monkeypatch)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_raw_enhance_request(url, _png(512, 512), _LONG_JOB))
        _wait_for(lambda: services.limiter.running == 1, what="the job to start")
    # The socket is closed: the server notices, sets the job's cancel event, the engine stops at its next tile.
    _wait_for(lambda: services.limiter.running == 0 and outcomes, what="the slot to be freed")
    assert outcomes == ["CancelledError"]
    with httpx.Client(base_url=url, timeout=60) as c:  # and the server keeps serving
        assert c.post("/api/v1/enhance", files=_files(_png(16, 16)), data={"model": FAST_MODEL}).status_code == 200


def test_a_waiting_client_that_hangs_up_leaves_the_line(rest, monkeypatch):
    url, services = rest
    outcomes = _spy_on_jobs(monkeypatch)
    holder = services.limiter.try_acquire()  # the device is busy: the request must wait in line
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(_raw_enhance_request(url, _png(16, 16), {"model": FAST_MODEL}))
            _wait_for(lambda: services.limiter.waiting == 1, what="the request to queue")
        _wait_for(lambda: services.limiter.waiting == 0, what="the request to leave the line")
    finally:
        holder.release()
    assert outcomes == [] and services.limiter.running == 0  # it never ran


def test_a_job_over_the_time_limit_is_stopped_with_503(rest, tmp_path):
    _url, services = rest
    # Nothing measured in this config dir (the module's REST jobs taught its estimates): no figure refuses it up
    # front or in the job, so it runs, and is stopped.
    config = services.config.replace(job_time_limit_seconds=0.001, config_dir=tmp_path / "cfg")
    limited = _services(config, services.model_manager)
    with serve(limited) as limited_url, httpx.Client(base_url=limited_url, timeout=120) as c:
        r = c.post("/api/v1/enhance", files=_files(_png(512, 512)), data=_LONG_JOB)
    body = _assert_error(r, 503, "inference")
    assert "time limit" in body["error"].lower() or "longer than" in body["error"]
    assert limited.limiter.running == 0


# ------------------------------------------------------------------------------------------------ (9) Retry-After
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_retry_after_comes_from_the_measured_drain_rate():
    """17 jobs ahead draining at one a second → about 17 s (the old estimate said 34 s for a 17.5 s drain)."""
    clock = _Clock()
    limiter = DeviceLimiter(concurrency=1, max_queue=16, default_job_seconds=10.0, clock=clock)
    for _ in range(5):  # five one-second jobs, back to back
        with limiter.slot():
            clock.now += 1.0
    tickets = [limiter.try_acquire() for _ in range(17)]
    clock.now += 3600  # an idle hour before the refusal does not make the line look slow
    with pytest.raises(QueueFullError) as info:
        limiter.try_acquire()
    assert info.value.retry_after == 17
    for ticket in tickets:
        ticket.release()


def test_retry_after_counts_parallel_slots():
    clock = _Clock()
    limiter = DeviceLimiter(concurrency=2, max_queue=0, clock=clock)
    for _ in range(4):  # two slots, each finishing a 4 s job every 4 s: one completion every 2 s
        a, b = limiter.try_acquire(), limiter.try_acquire()
        clock.now += 4.0
        a.release()
        b.release()
    busy = [limiter.try_acquire(), limiter.try_acquire()]
    assert 2 <= limiter.retry_after() <= 5  # two running jobs at ~2 s per completion (the first pair counts 4 s)
    for ticket in busy:
        ticket.release()


# ------------------------------------------------------------------------------------------------ rate limits
def test_rate_limiter_refuses_over_the_limit_with_the_time_to_the_next_token():
    from ui.access import RateLimiter

    clock = _Clock()
    limiter = RateLimiter(per_minute=2, clock=clock)
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == 30  # one token every 30 s
    assert limiter.take("b") == 0  # per client
    clock.now += 30
    assert limiter.take("a") == 0


# ------------------------------------------------------------------------------------------------ (3) one auth
@pytest.fixture(scope="module")
def keyed_app(tmp_path_factory, shared_weights_dir):
    """The whole app (web UI, Gradio API, REST) with an API key and a rate limit of 4 work requests a minute."""
    with serve_app(tmp_path_factory.mktemp("keyed"), shared_weights_dir, api_key="k3y", rate_limit_per_minute=4,
                   min_free_disk_mb=0) as served:
        yield served


def _gradio_file(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_the_api_key_protects_the_gradio_api_uploads_and_files(keyed_app):
    url, services = keyed_app
    png = _png(24, 24)
    key = {"X-API-Key": "k3y"}
    with httpx.Client(base_url=url, timeout=120) as c:
        _assert_error(c.post("/gradio_api/upload", files={"files": ("a.png", png, "image/png")}), 401,
                      "validation")
        _assert_error(c.post("/gradio_api/call/analyze", json={"data": [_gradio_file("/tmp/x.png")]}), 401,
                      "validation")
        _assert_error(c.post("/gradio_api/call/enhance", json={"data": [_gradio_file("/tmp/x.png"), {}]}), 401,
                      "validation")
        _assert_error(c.get("/gradio_api/file=" + str(Path(services.config.output_dir) / "x.png")), 401,
                      "validation")
        _assert_error(c.get("/api/v1/health"), 401, "validation")
        assert c.get("/").status_code == 200  # the page shell (the sign-in form) stays open

        uploaded = c.post("/gradio_api/upload", files={"files": ("a.png", png, "image/png")}, headers=key)
        assert uploaded.status_code == 200, uploaded.text
        event = c.post("/gradio_api/call/analyze", json={"data": [_gradio_file(uploaded.json()[0])]}, headers=key)
        assert event.status_code == 200, event.text
        stream = c.get(f"/gradio_api/call/analyze/{event.json()['event_id']}", headers=key)
        assert "event: complete" in stream.text and "analysis" in stream.text, stream.text[-500:]

    with httpx.Client(base_url=url, timeout=120) as browser:  # a person signs in with the key as password
        assert browser.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert browser.post("/login", data={"username": "me", "password": "k3y"}).status_code == 200
        assert browser.get("/config").status_code == 200
        signed_in = browser.post("/gradio_api/upload", files={"files": ("a.png", png, "image/png")})
        assert signed_in.status_code == 200, signed_in.text


def test_work_requests_are_rate_limited_per_client_with_retry_after(keyed_app):
    url, _services_ = keyed_app
    key = {"X-API-Key": "k3y"}
    with httpx.Client(base_url=url, timeout=60) as c:
        statuses = [c.post("/gradio_api/upload", files={"files": ("a.png", _png(8, 8), "image/png")},
                           headers=key).status_code for _ in range(6)]
        assert statuses.count(429) >= 2 and 500 not in statuses, statuses
        refused = c.post("/gradio_api/upload", files={"files": ("a.png", _png(8, 8), "image/png")}, headers=key)
        body = _assert_error(refused, 429, "inference")
        assert int(refused.headers["Retry-After"]) >= 1 and "limit" in body["error"]
        assert c.get("/api/v1/health", headers=key).status_code == 200  # reading the status is not work


# ------------------------------------------------------------------------------------------------ (4) retention
def _job_folder(root: Path, name: str, size: int, age_hours: float, now: float) -> Path:
    import os

    folder = root / name
    folder.mkdir(parents=True)
    (folder / "result.png").write_bytes(b"\0" * size)
    stamp = now - age_hours * 3600
    for path in (folder / "result.png", folder):
        os.utime(path, (stamp, stamp))
    return folder


def test_job_folders_expire_by_age_then_by_size_oldest_first(tmp_path, shared_weights_dir):
    from engine.retention import job_roots, sweep

    config = app_config(tmp_path, shared_weights_dir, retention_hours=24, retention_max_mb=1.0)
    web, gradio_cache = job_roots(config)
    now = time.time()
    expired = _job_folder(web, "image-old", 1000, 30, now)
    upload = _job_folder(gradio_cache, "abc123", 400_000, 5, now)  # Gradio's cache counts too
    older = _job_folder(web, "image-older", 400_000, 3, now)
    newer = _job_folder(web, "image-newer", 400_000, 2, now)
    running = _job_folder(web, "image-running", 400_000, 0, now)  # in use: never removed
    report = sweep(config, now=now)
    assert not expired.exists()  # too old
    assert not upload.exists() and not older.exists()  # then the least recently used, until under the cap
    assert newer.exists() and running.exists()
    assert report.removed == 3 and report.kept_bytes == 800_000 <= 2**20


def test_a_new_web_job_sweeps_expired_results(tmp_path, shared_weights_dir):
    """Results were never cleaned up: starting a job now removes folders past the retention age."""
    from engine import retention
    from ui.uploads import new_output_dir

    config = app_config(tmp_path, shared_weights_dir, retention_hours=1, min_free_disk_mb=0)
    retention._last_sweep.clear()
    old = _job_folder(Path(config.output_dir) / "web", "image-20200101", 10, 48, time.time())
    fresh = new_output_dir(config, "image")
    assert fresh.is_dir() and not old.exists()


def test_new_work_is_refused_when_the_disk_is_nearly_full(tmp_path, shared_weights_dir):
    from engine.errors import EngineError
    from ui.uploads import new_output_dir
    from utils.errors import DiskFullError, error_kind

    config = app_config(tmp_path, shared_weights_dir, min_free_disk_mb=1e12)  # more than any disk has free
    with pytest.raises(DiskFullError, match="nearly full") as info:
        new_output_dir(config, "image")
    assert isinstance(info.value, EngineError) and error_kind(info.value).status == 507
    assert not (Path(config.output_dir) / "web").exists() or not any((Path(config.output_dir) / "web").iterdir())


# ------------------------------------------------------------------------------------------------ (5) damaged weights
# The converted offline weights: tests/test_errors.py::test_checksum_mismatch_of_a_converted_file_sets_it_aside...


def test_a_damaged_official_file_in_the_weights_folder_is_set_aside(tmp_path):
    from config import Config
    from engine.model_manager import ModelManager

    config = Config.from_env(env={}, dotenv_path=None, weights_dir=tmp_path, download_retries=0)
    manager = ModelManager(config)
    spec = manager.spec("RealESRGAN_x4plus")
    official = manager.official_path(spec)
    official.write_bytes(b"not the weights")
    assert manager.local_weights("RealESRGAN_x4plus") is None
    assert not official.exists() and len(list(tmp_path.glob(official.name + ".corrupt-*"))) == 1


def test_the_checksum_message_says_what_was_done_not_that_a_file_was_deleted():
    from utils.errors import ChecksumMismatchError

    text = str(ChecksumMismatchError("m", "a" * 64, "b" * 64, "The damaged file was set aside as m.corrupt-1."))
    assert "set aside as m.corrupt-1" in text and "deleted" not in text


# ------------------------------------------------------------------------------------------------ (7), (8) the open app
@pytest.fixture(scope="module")
def open_app(tmp_path_factory, shared_weights_dir):
    """The whole app without authentication (a LAN setup), on a loopback port."""
    with serve_app(tmp_path_factory.mktemp("open"), shared_weights_dir, min_free_disk_mb=0) as (url, services):
        yield url.rstrip("/"), services


def test_gradio_errors_name_no_server_path(open_app):
    url, services = open_app
    config = services.config
    for folder, name in ((config.weights_dir, "x.pth"), (config.config_dir, "settings.json"),
                         (config.log_dir, "realesrgan_app.log")):
        secret = Path(folder).resolve() / name
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("secret")
        r = httpx.get(f"{url}/gradio_api/file={secret}", timeout=30)
        assert r.status_code in (403, 404) and "secret" not in r.text
        assert str(Path(folder).resolve()) not in r.text and str(Path(folder).resolve().parent) not in r.text, r.text


def test_deeply_nested_settings_get_a_settings_message_not_an_unexpected_error(open_app):
    url, _services_ = open_app
    with httpx.Client(base_url=url, timeout=120) as c:
        uploaded = c.post("/gradio_api/upload", files={"files": ("a.png", _png(16, 16), "image/png")}).json()[0]
        nested = '{"a":' * 3000 + "1" + "}" * 3000
        event = c.post("/gradio_api/call/enhance", json={"data": [_gradio_file(uploaded), nested]})
        assert event.status_code == 200, event.text
        stream = c.get(f"/gradio_api/call/enhance/{event.json()['event_id']}").text
    assert "event: error" in stream and "nested too deeply" in stream and "unexpected" not in stream, stream


# ------------------------------------------------------------------------------------------------ (1) admission
def test_analysis_is_admitted_like_enhancement(rest, tmp_path):
    """/analyze decoded outside the job limit (two at once took 8.8 GB): now it needs a slot like a job."""
    from ui.tab_image import analyze_file

    _url, services = rest
    image = tmp_path / "a.png"
    image.write_bytes(_png(32, 32))
    tickets = [services.limiter.try_acquire()]
    try:
        while True:  # every slot busy and the line full
            try:
                tickets.append(services.limiter.try_acquire())
            except QueueFullError:
                break
        with pytest.raises(QueueFullError):
            analyze_file(services, image)
    finally:
        for ticket in tickets:
            ticket.release()
    advice = analyze_file(services, image)  # with a free slot it runs
    assert advice["analysis"] and advice["time_limit"] is None  # seconds at most: within the 600 s limit
    assert services.limiter.running == 0


def test_a_cancelled_analysis_stops_between_its_stages(rest, tmp_path):
    """The advisor checks the job's cancel event before decoding, after the analysis and before each model's
    calibration (the slow part on first use): set during the first calibration, no second one runs."""
    import threading

    from engine.errors import CancelledError
    from engine.intelligent_enhancer import IntelligentEnhancer

    _url, services = rest
    image = tmp_path / "a.png"
    image.write_bytes(_png(32, 32))
    advisor = IntelligentEnhancer(services.model_manager, services.config.replace(config_dir=tmp_path / "cfg"),
                                  device="cpu")  # the default config: no trial
    cancel, calibrated = threading.Event(), []
    measure = advisor.calibrator.macs_per_second

    def first_then_cancel(model, device, network=None, keep=None):  # the real calibration runs; the client leaves
        calibrated.append(model)
        cancel.set()
        return measure(model, device, network, keep)

    advisor.calibrator.macs_per_second = first_then_cancel
    with pytest.raises(CancelledError):
        advisor.advise(str(image), cancel=cancel)
    assert len(calibrated) == 1
    with pytest.raises(CancelledError):  # cancelled before it began: not even decoded
        advisor.advise(str(tmp_path / "missing.png"), cancel=cancel)


def test_the_time_limit_stops_a_gradio_analysis(tmp_path, shared_weights_dir):
    """/analyze runs under the same per-job time limit as enhancement (it was under no limit at all)."""
    with serve_app(tmp_path, shared_weights_dir, min_free_disk_mb=0, job_time_limit_seconds=0.001) as (url, services):
        services.advisor.measure_in_advice = True  # its calibrations (seconds, checked between) outlast the limit
        with httpx.Client(base_url=url.rstrip("/"), timeout=120) as c:
            uploaded = c.post("/gradio_api/upload", files={"files": ("a.png", _png(64, 64), "image/png")}).json()[0]
            event = c.post("/gradio_api/call/analyze", json={"data": [_gradio_file(uploaded)]})
            assert event.status_code == 200, event.text
            stream = c.get(f"/gradio_api/call/analyze/{event.json()['event_id']}").text
        assert services.limiter.running == 0
    assert "event: error" in stream and "REALESRGAN_JOB_TIME_LIMIT_SECONDS" in stream, stream[-500:]


def test_uploads_are_refused_with_507_while_the_disk_is_nearly_full(tmp_path, shared_weights_dir):
    import asyncio

    from fastapi import FastAPI

    from ui.access import AccessGate

    app = FastAPI()
    app.post("/gradio_api/upload")(lambda: {"ok": True})
    app.add_middleware(AccessGate, gradio_app=None,
                       config=app_config(tmp_path, shared_weights_dir, min_free_disk_mb=1e12))

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/gradio_api/upload"), await c.get("/gradio_api/info")

    refused, reading = asyncio.run(post())
    body = _assert_error(refused, 507, "validation")
    assert "nearly full" in body["error"] and reading.status_code != 507


# ------------------------------------------------------------------------------------------------ (2) Gradio jobs
def _spy_on_gradio_jobs(monkeypatch) -> list[str]:
    """How each Gradio image job ended."""
    from ui import tab_image

    return _spy_on(monkeypatch, tab_image, "enhance_file")


_LONG_GRADIO_JOB = {"model": FAST_MODEL, "tile": 32, "outscale": 2}


def test_a_gradio_job_whose_client_goes_away_frees_its_slot(open_app, monkeypatch):
    """A page (or API client) keeps a heartbeat open; when it closes, Gradio runs the app's unload handler, which
    sets the session's job cancel events: the job stops at its next tile and gives its slot back."""
    import uuid

    url, services = open_app
    outcomes = _spy_on_gradio_jobs(monkeypatch)
    session = uuid.uuid4().hex
    with httpx.Client(base_url=url, timeout=120) as c:
        with httpx.Client(timeout=60) as page, page.stream("GET", f"{url}/gradio_api/heartbeat/{session}") as beat:
            lines = beat.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data:")  # the session is open
            uploaded = c.post("/gradio_api/upload",
                              files={"files": ("a.png", _png(768, 768), "image/png")}).json()[0]
            event = c.post("/gradio_api/call/enhance",
                           json={"data": [_gradio_file(uploaded), _LONG_GRADIO_JOB], "session_hash": session})
            assert event.status_code == 200, event.text
            _wait_for(lambda: services.limiter.running == 1, what="the job to start")
        # The heartbeat connection is closed: the client has gone.
    _wait_for(lambda: services.limiter.running == 0 and outcomes, what="the slot to be freed")
    assert outcomes == ["CancelledError"]


def test_the_time_limit_stops_a_gradio_job(tmp_path, shared_weights_dir):
    with serve_app(tmp_path, shared_weights_dir, min_free_disk_mb=0, job_time_limit_seconds=0.001) as (url, services):
        with httpx.Client(base_url=url.rstrip("/"), timeout=120) as c:
            uploaded = c.post("/gradio_api/upload", files={"files": ("a.png", _png(64, 64), "image/png")}).json()[0]
            event = c.post("/gradio_api/call/enhance", json={"data": [_gradio_file(uploaded), _LONG_GRADIO_JOB]})
            assert event.status_code == 200, event.text
            stream = c.get(f"/gradio_api/call/enhance/{event.json()['event_id']}").text
        assert services.limiter.running == 0
    assert "event: error" in stream and "REALESRGAN_JOB_TIME_LIMIT_SECONDS" in stream, stream[-500:]


def test_rest_refuses_up_front_a_job_estimated_over_the_time_limit(tmp_path, shared_weights_dir):
    """With a measured throughput on record, a job whose estimate exceeds the limit gets 413 before it queues."""
    import dataclasses
    import json

    from engine.intelligent_enhancer import IntelligentEnhancer, ThroughputCalibrator
    from engine.model_manager import ModelManager

    config = app_config(tmp_path, shared_weights_dir, device="cpu", job_time_limit_seconds=5)
    config.ensure_directories()
    # A slow machine on record: 1 MMAC/s for the fast model (as a calibration would have saved it).
    calibration = tmp_path / "cfg" / "calibration.json"
    calibration.write_text(json.dumps({ThroughputCalibrator(calibration).key(FAST_MODEL, "cpu"): 1e6}))
    manager = ModelManager(config)
    services = _services(config, manager)
    services = dataclasses.replace(services, advisor=IntelligentEnhancer(model_manager=manager, config=config))
    with serve(services) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/api/v1/enhance", files=_files(_png(64, 64)), data={"model": FAST_MODEL})
        body = _assert_error(r, 413, "validation")
        assert "limit of 5 s" in body["error"] and "smaller image" in body["error"], body
        assert services.limiter.running == 0 and services.limiter.waiting == 0
        assert manager.loaded_models() == []  # no model ran to estimate


def test_rest_refuses_up_front_a_job_without_a_model_that_no_choice_of_the_advisor_can_finish(tmp_path,
                                                                                              shared_weights_dir):
    """Without ``model`` the advisor chooses in the job; the least any of its choices costs for an image of this
    size (at the rate measured on this device with another model) is checked before queueing, from the header."""
    import dataclasses
    import json

    from engine.intelligent_enhancer import IntelligentEnhancer, ThroughputCalibrator
    from engine.model_manager import ModelManager

    config = app_config(tmp_path, shared_weights_dir, device="cpu", job_time_limit_seconds=5)
    config.ensure_directories()
    calibration = tmp_path / "cfg" / "calibration.json"  # only the photo model measured, on a slow machine
    calibration.write_text(json.dumps({ThroughputCalibrator(calibration).key("RealESRGAN_x4plus", "cpu"): 1e6}))
    manager = ModelManager(config)
    services = dataclasses.replace(_services(config, manager),
                                   advisor=IntelligentEnhancer(model_manager=manager, config=config))
    with serve(services) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/api/v1/enhance", files=_files(_png(64, 64)))
        body = _assert_error(r, 413, "validation")
        assert "with RealESRGAN_x4plus_anime_6B, the quickest model the advisor would choose" in body["error"], body
        assert "limit of 5 s" in body["error"] and services.limiter.running == 0
        assert manager.loaded_models() == []  # neither the advisor nor a model ran


def test_rest_refuses_in_the_job_what_nothing_measured_could_check_up_front(tmp_path, shared_weights_dir):
    """Nothing measured on this device yet: the up-front check has no figure, so the job measures the model's
    throughput before its network runs (a 128-pixel calibration) and refuses what is estimated over the limit."""
    import dataclasses

    from PIL import Image

    from engine.intelligent_enhancer import IntelligentEnhancer, ThroughputCalibrator
    from engine.model_manager import ModelManager

    config = app_config(tmp_path, shared_weights_dir, device="cpu", job_time_limit_seconds=30)
    config.ensure_directories()
    manager = ModelManager(config)
    advisor = IntelligentEnhancer(model_manager=manager, config=config)
    advisor.calibrator = ThroughputCalibrator(tmp_path / "cfg" / "calibration.json", busy_share=0)  # kept if busy
    services = dataclasses.replace(_services(config, manager), advisor=advisor)
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "JPEG", quality=1)  # ~25 TMAC: minutes even at 200 GMAC/s
    with serve(services) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/api/v1/enhance", files=_files(buf.getvalue(), "big.jpg", "image/jpeg"),
                   data={"model": FAST_MODEL, "upscale_factor": "1"})
        body = _assert_error(r, 413, "validation")
        assert "6000×6000" in body["error"] and "limit of 30 s" in body["error"], body
        assert advisor.calibrator.cached(FAST_MODEL, "cpu") is not None  # measured in the job
        assert services.limiter.running == 0 and c.get("/api/v1/health").status_code == 200


def test_the_job_watch_turns_a_stop_after_its_time_limit_into_the_time_limit_error():
    import threading

    from engine.errors import CancelledError
    from ui.jobs import JobWatch, cancel_session_jobs
    from utils.errors import JobTimeLimitError

    with pytest.raises(JobTimeLimitError, match="REALESRGAN_JOB_TIME_LIMIT_SECONDS"):
        with JobWatch(0.01) as watch:
            assert watch.cancel.wait(60)  # the engine sees the event at its next tile...
            raise CancelledError("stopped")  # ...and stops
    stopped = threading.Event()
    with pytest.raises(CancelledError):  # a session that goes away stops its jobs: not a time-limit message
        with JobWatch(600, stopped, session="s1"):
            assert cancel_session_jobs("s1") == 1 and stopped.is_set()
            raise CancelledError("stopped")
    assert cancel_session_jobs("s1") == 0  # the finished job is no longer registered
