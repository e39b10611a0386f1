"""One gate in front of everything the server does: authentication and per-client rate limits.

:class:`AccessGate` is an ASGI middleware on the whole app (web UI, Gradio's API, the REST API, file routes).
When ``REALESRGAN_API_KEY`` or Gradio auth (``REALESRGAN_AUTH``) is configured, every route that runs work or
serves files needs either the ``X-API-Key`` header or the session cookie of a signed-in web user; only the page
shell, its static assets and the sign-in routes stay open. A request with a valid key is handed to Gradio as a
signed-in session, so Gradio's own checks (``/gradio_api/upload``, ``/gradio_api/call/*``, ``/file=``) accept
it. With only an API key configured, the web UI's sign-in takes the key as password (see :func:`gradio_auth`).

Work requests (``POST`` to ``/api/v1/enhance``, ``/gradio_api/upload``, ``/gradio_api/call/*``,
``/gradio_api/queue/join``...) are also limited per client address by a token bucket; over the limit the answer
is 429 with a ``Retry-After`` of when the next request will be accepted; while the results' disk is nearly full
they are refused with 507 (:func:`engine.retention.check_free_space`, which also sweeps expired job folders and
Gradio's cache).
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import threading
import time
from typing import Callable

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.retention import check_free_space
from utils.errors import DiskFullError, scrub_paths, user_message

API_KEY_HEADER = "X-API-Key"
API_KEY_USER = "api-key"  # the user name a key-authenticated request has inside Gradio

#: Paths anyone may fetch: the page shell, static assets and the sign-in flow (no work, no user files).
_PUBLIC_EXACT = frozenset({"/", "/login", "/login/", "/logout", "/favicon.ico", "/manifest.json", "/theme.css",
                           "/config", "/config/", "/gradio_api/login_check", "/gradio_api/login_check/",
                           "/gradio_api/app_id", "/gradio_api/app_id/", "/gradio_api/startup-events"})
_PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/gradio_api/heartbeat/")

#: POST routes that start work or store a file: what the rate limit counts.
_WORK_PREFIXES = ("/api/v1/enhance", "/gradio_api/upload", "/gradio_api/call/", "/gradio_api/queue/join",
                  "/gradio_api/run/", "/gradio_api/api/")


def key_matches(provided: str | None, expected: str | None) -> bool:
    """True when ``provided`` equals the configured key (compared in constant time)."""
    if not expected or provided is None:
        return False
    return hmac.compare_digest(provided.encode("utf-8"), expected.encode("utf-8"))


def gradio_auth(config) -> tuple[str, str] | Callable[[str, str], bool] | None:
    """What Gradio's sign-in accepts: the configured ``user:password``; else, with only an API key, any user
    name with the key as password; else None (no sign-in)."""
    if config.auth_pair:
        return config.auth_pair
    if config.api_key:
        return lambda _user, password: key_matches(password, config.api_key)
    return None


def is_public(path: str) -> bool:
    return path in _PUBLIC_EXACT or path.startswith(_PUBLIC_PREFIXES)


def is_work(method: str, path: str) -> bool:
    return method == "POST" and path.startswith(_WORK_PREFIXES)


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute, bursts up to ``per_minute``. Thread-safe.

    ``clock`` is injectable for tests.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_clients: int = 10000):
        self.per_minute = int(per_minute)
        self._rate = self.per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, last refill time)
        self._lock = threading.Lock()
        self._max_clients = max_clients

    def take(self, client: str) -> int:
        """Spend one request of ``client``: 0 when allowed, else the whole seconds until the next is allowed."""
        if self.per_minute <= 0:
            return 0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                if len(self._buckets) >= self._max_clients and client not in self._buckets:
                    self._forget_full_buckets(now)
                self._buckets[client] = (tokens - 1.0, now)
                return 0
            self._buckets[client] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self._rate))

    def _forget_full_buckets(self, now: float) -> None:
        """Drop clients whose bucket has refilled (they are indistinguishable from new ones)."""
        for client, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self._rate >= self.per_minute:
                del self._buckets[client]


class AccessGate:
    """ASGI middleware: authentication (when configured) and per-client rate limits for the whole app.

    Args:
        app: the wrapped ASGI app.
        gradio_app: Gradio's app (its ``tokens`` and ``cookie_id`` identify signed-in sessions); None for an
            app without Gradio.
        config: the app's :class:`config.Config` (``api_key``, ``auth``, ``rate_limit_per_minute``).
    """

    def __init__(self, app: ASGIApp, gradio_app=None, config=None, rate_limiter: RateLimiter | None = None):
        self.app, self.gradio_app, self.config = app, gradio_app, config
        self.protected = bool(config.api_key or config.auth_pair)
        self.rate_limiter = rate_limiter or RateLimiter(config.rate_limit_per_minute)
        self._key_session: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = Headers(scope=scope)
        if self.protected and not is_public(path):
            if key_matches(headers.get(API_KEY_HEADER), self.config.api_key):
                scope = self._as_signed_in(scope, headers)
            elif not self._signed_in(headers):
                await _reply(scope, send, 401, f"Sign in, or send a valid {API_KEY_HEADER} header: this server "
                             "requires authentication.", {"WWW-Authenticate": "ApiKey"})
                return
        if scope["type"] == "http" and is_work(scope.get("method", ""), path):
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = self.rate_limiter.take(client)
            if wait:
                await _reply(scope, send, 429, f"Too many requests from this address (the limit is "
                             f"{self.rate_limiter.per_minute} a minute); try again in {wait} s.",
                             {"Retry-After": str(wait)}, stage="inference")
                return
            try:  # sweeps expired job folders and Gradio's cache (at most once a minute), refuses a full disk
                await anyio.to_thread.run_sync(check_free_space, self.config)
            except DiskFullError as exc:
                await _reply(scope, send, 507, user_message(exc), {})
                return
        if scope["type"] == "http" and not path.startswith("/api/"):
            send = _scrubbing_error_bodies(send)
        await self.app(scope, receive, send)

    # ---------------------------------------------------------------- Gradio sessions
    def _cookie_names(self) -> tuple[str, ...]:
        cookie_id = getattr(self.gradio_app, "cookie_id", None)
        if cookie_id is None:
            return ()
        return f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"

    def _signed_in(self, headers: Headers) -> bool:
        tokens = getattr(self.gradio_app, "tokens", None)
        if not tokens:
            return False
        cookies = _cookies(headers)
        return any(cookies.get(name) in tokens for name in self._cookie_names())

    def _as_signed_in(self, scope: Scope, headers: Headers) -> Scope:
        """The scope with a Gradio session cookie added, so Gradio's own login check accepts a key's request."""
        names = self._cookie_names()
        tokens = getattr(self.gradio_app, "tokens", None)
        if not names or tokens is None:
            return scope
        if self._key_session is None or self._key_session not in tokens:
            self._key_session = secrets.token_urlsafe(24)
            tokens[self._key_session] = API_KEY_USER
        cookie = "; ".join(filter(None, [headers.get("cookie"), f"{names[1]}={self._key_session}"]))
        raw = [(k, v) for k, v in scope["headers"] if k.lower() != b"cookie"]
        raw.append((b"cookie", cookie.encode("latin-1")))
        return dict(scope, headers=raw)


#: Error bodies larger than this are passed through unchanged (ours and Gradio's are a few hundred bytes).
_SCRUB_MAX_BYTES = 64 * 1024


def _scrubbing_error_bodies(send: Send) -> Send:
    """Wrap ``send`` so that error answers (4xx/5xx) of Gradio's routes name no server path: Gradio's own
    messages quote them ("File not allowed: /home/.../weights/x.pth"). Other answers pass through untouched."""
    state: dict = {}

    async def scrubbing_send(message) -> None:
        if message["type"] == "http.response.start" and message.get("status", 200) >= 400:
            state["start"], state["body"] = message, b""
            return
        if "start" not in state:
            await send(message)
            return
        if message["type"] == "http.response.body":
            state["body"] += message.get("body", b"")
            if message.get("more_body", False) and len(state["body"]) <= _SCRUB_MAX_BYTES:
                return
            body = state["body"]
            if len(body) <= _SCRUB_MAX_BYTES:
                body = scrub_paths(body.decode("utf-8", "replace")).encode("utf-8")
            start = state.pop("start")
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            more = message.get("more_body", False)
            if not more:
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": more})
            return
        await send(message)

    return scrubbing_send


def _cookies(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in headers.get("cookie", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name] = value
    return out


async def _reply(scope: Scope, send: Send, status: int, message: str, headers: dict[str, str],
                 stage: str = "validation") -> None:
    """Answer with the API's error body ``{"error", "stage"}`` (a websocket is closed instead)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"error": message, "stage": stage}).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
