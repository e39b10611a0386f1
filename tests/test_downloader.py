"""engine.downloader against a real HTTP server on 127.0.0.1 (never the network)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest

from engine.downloader import DownloadPolicy, download_file, sha256_file
from engine.errors import ChecksumMismatchError, DownloadError

REPO_ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = random.Random(0).randbytes(200_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Server:
    """A local HTTP server whose per-request behaviour is set by each test through ``handle``."""

    url: str
    handle: Callable[[BaseHTTPRequestHandler, int], None] | None = None
    requests: list[dict[str, str | None]] = field(default_factory=list)


def send_payload(
    h: BaseHTTPRequestHandler, data: bytes = PAYLOAD, *, cut_at: int | None = None, delay: float = 0.0
) -> None:
    """Serve ``data`` honouring ``Range``; stop after ``cut_at`` body bytes and close the socket if given."""
    start = 0
    match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
    if match:
        start = int(match.group(1))
        if start >= len(data):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(data)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
        h.send_response(200)
    body = data[start:]
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if cut_at is not None:
        body = body[:cut_at]
    step = 4096 if delay else len(body)
    for i in range(0, len(body), step):
        h.wfile.write(body[i : i + step])
        h.wfile.flush()
        time.sleep(delay)
    if cut_at is not None:
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            state.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                   "agent": self.headers.get("User-Agent")})
            try:
                assert state.handle is not None
                state.handle(self, len(state.requests))
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/model.pth"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_plain_download_verifies_and_reports_progress(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: send_payload(h)
    calls: list[tuple[int, int | None]] = []
    dest = tmp_path / "weights" / "model.pth"
    result = download_file(server.url, dest, sha256=PAYLOAD_SHA, expected_size=len(PAYLOAD),
                           progress=lambda done, total: calls.append((done, total)))
    assert result == dest and dest.read_bytes() == PAYLOAD
    assert not dest.with_name("model.pth.part").exists()
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert server.requests[0]["agent"] and "Python-urllib" not in server.requests[0]["agent"]
    assert sha256_file(dest) == PAYLOAD_SHA


def test_second_call_finds_file_done_without_a_request(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: send_payload(h)
    dest = tmp_path / "model.pth"
    download_file(server.url, dest, sha256=PAYLOAD_SHA)
    download_file(server.url, dest, sha256=PAYLOAD_SHA)
    assert len(server.requests) == 1


def test_concurrent_downloads_of_one_file_fetch_it_once(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: send_payload(h, delay=0.002)
    dest = tmp_path / "model.pth"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            download_file(server.url, dest, sha256=PAYLOAD_SHA)
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_resumes_after_cut_connection(server: Server, tmp_path: Path) -> None:
    half = len(PAYLOAD) // 2
    server.handle = lambda h, n: send_payload(h, cut_at=half if n == 1 else None)
    dest = tmp_path / "model.pth"
    download_file(server.url, dest, sha256=PAYLOAD_SHA, policy=DownloadPolicy(backoff=0.01))
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [None, f"bytes={half}-"]


def test_retries_503_then_succeeds(server: Server, tmp_path: Path) -> None:
    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        if n <= 3:
            h.send_error(503, "Busy")
        else:
            send_payload(h)

    server.handle = handle
    dest = tmp_path / "model.pth"
    download_file(server.url, dest, sha256=PAYLOAD_SHA, policy=DownloadPolicy(backoff=0.01))
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 4


def test_gives_up_after_retries(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: h.send_error(503, "Busy")
    with pytest.raises(DownloadError, match="after 3 attempts"):
        download_file(server.url, tmp_path / "model.pth", sha256=PAYLOAD_SHA,
                      policy=DownloadPolicy(retries=2, backoff=0.01))
    assert len(server.requests) == 3 and not (tmp_path / "model.pth").exists()


def test_wrong_hash_deletes_everything(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: send_payload(h)
    dest = tmp_path / "model.pth"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as info:
        download_file(server.url, dest, sha256=wrong, name="RealESRGAN_x4plus")
    assert (info.value.name, info.value.expected, info.value.actual) == ("RealESRGAN_x4plus", wrong, PAYLOAD_SHA)
    assert wrong in str(info.value) and PAYLOAD_SHA in str(info.value)
    assert not dest.exists() and not dest.with_name("model.pth.part").exists()


def test_wrong_size_is_rejected(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: send_payload(h)
    dest = tmp_path / "model.pth"
    with pytest.raises(DownloadError, match=f"expected {len(PAYLOAD) + 1}"):
        download_file(server.url, dest, sha256=PAYLOAD_SHA, expected_size=len(PAYLOAD) + 1)
    assert not dest.exists() and not dest.with_name("model.pth.part").exists()


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        del h.headers["Range"]
        send_payload(h)

    server.handle = handle
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(b"stale bytes from another file")
    download_file(server.url, dest, sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD and server.requests[0]["range"] == "bytes=29-"


def test_416_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: send_payload(h)
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(b"x" * (len(PAYLOAD) + 10))
    download_file(server.url, dest, sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD) + 10}-", None]


def test_404_raises_without_retrying(server: Server, tmp_path: Path) -> None:
    server.handle = lambda h, n: h.send_error(404, "Not Found")
    with pytest.raises(DownloadError, match="404") as info:
        download_file(server.url, tmp_path / "model.pth", sha256=PAYLOAD_SHA, policy=DownloadPolicy(backoff=0.01))
    assert server.url in str(info.value) and "by hand" in str(info.value)
    assert not isinstance(info.value, ChecksumMismatchError)
    assert len(server.requests) == 1


def test_sigkill_mid_stream_leaves_no_final_file_and_rerun_resumes(server: Server, tmp_path: Path) -> None:
    sent = 6 * 4096
    killed = threading.Event()

    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        if n > 1:
            send_payload(h)
            return
        h.send_response(200)  # the first client gets part of the file, then nothing until it has been killed
        h.send_header("Content-Length", str(len(PAYLOAD)))
        h.end_headers()
        h.wfile.write(PAYLOAD[:sent])
        h.wfile.flush()
        killed.wait(timeout=300)

    server.handle = handle
    dest = tmp_path / "model.pth"
    part = dest.with_name("model.pth.part")
    code = (
        "import sys; from pathlib import Path; from engine.downloader import download_file; "
        "download_file(sys.argv[1], Path(sys.argv[2]), sha256=sys.argv[3])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, server.url, str(dest), PAYLOAD_SHA], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        deadline = time.monotonic() + 120  # a bound for a hung child only
        while not (part.exists() and part.stat().st_size >= 2 * 4096):  # on disk (the rest may be buffered)
            assert proc.poll() is None and time.monotonic() < deadline, "download did not start streaming"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed.set()
    received = part.stat().st_size
    assert proc.returncode == -signal.SIGKILL and not dest.exists()
    assert 0 < received <= sent

    download_file(server.url, dest, sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[-1]["range"] == f"bytes={received}-"


def test_stalled_stream_times_out_and_resumes(server: Server, tmp_path: Path) -> None:
    half = len(PAYLOAD) // 2

    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        if n == 1:
            h.send_response(200)
            h.send_header("Content-Length", str(len(PAYLOAD)))
            h.end_headers()
            h.wfile.write(PAYLOAD[:half])
            h.wfile.flush()
            time.sleep(1.0)  # stall well past the client's read timeout
        else:
            send_payload(h)

    server.handle = handle
    dest = tmp_path / "model.pth"
    download_file(server.url, dest, sha256=PAYLOAD_SHA, policy=DownloadPolicy(timeout=0.2, backoff=0.01))
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [None, f"bytes={half}-"]


def test_unresolvable_host_fails_at_once_without_retries(tmp_path, caplog):
    """Offline (no DNS), a download fails at the first attempt with a clear message instead of backing off for a
    minute. (Counted in attempts, not seconds: how long the resolver takes to say no depends on the machine.)"""
    with caplog.at_level(logging.WARNING, logger="engine.downloader"):
        with pytest.raises(DownloadError, match="no network or DNS"):
            download_file("http://nonexistent.invalid/w.pth", tmp_path / "w.pth", sha256=None,
                          policy=DownloadPolicy(retries=4, backoff=0.01))
    assert [r.message for r in caplog.records if "retrying" in r.message] == []
    assert not (tmp_path / "w.pth").exists()


def test_download_policy_is_validated_on_construction():
    assert DownloadPolicy() == DownloadPolicy(timeout=60.0, retries=4, backoff=1.0)
    for field, value in (("timeout", 0), ("timeout", float("nan")), ("retries", -1), ("retries", 2.0),
                         ("retries", True), ("backoff", -0.5), ("backoff", "1")):
        with pytest.raises(ValueError, match=f"DownloadPolicy.{field} must be"):
            DownloadPolicy(**{field: value})
