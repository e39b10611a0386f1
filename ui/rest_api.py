"""The REST API (``/api/v1``): enhance an uploaded image in memory and describe the server, as JSON.

Mounted on the same FastAPI app as the web UI with :func:`install_api`. The contract:

* ``POST /api/v1/enhance`` (multipart ``file`` + options) →
  ``{"status": "success", "data": {"restored_image": <base64>, "format", "width", "height", "metrics",
  "settings", "processing_time_ms", "warning"}}``.
* Every error → ``{"error": <message for a person>, "stage": validation|decode|model|inference|faces|metrics|
  encode}`` with 401 (API key), 413 (bytes or pixels over the limit), 415 (not JPEG/PNG/WebP), 422 (bad
  parameter, undecodable image, no face found when ``face_enhance`` was asked), 429 (queue full, with
  ``Retry-After``), 503 (model unavailable, out of memory), 500 (anything else). Status, stage and message of an
  engine error come from the one error table (:mod:`utils.errors`). Bodies never hold a traceback, an exception
  class or a server path; an unexpected error is logged with a request id, also sent as ``X-Request-ID``.
* ``GET /api/v1/health`` and ``GET /api/v1/models``.

Nothing is written to disk: uploads are parsed into memory (the multipart parser never spools to a temp file)
and the result is encoded in memory. The success body is streamed (:func:`image_response`): the image's base64
text is made a chunk at a time as the client reads it, never held whole. Request bodies are capped by
:class:`BodySizeLimitMiddleware` while they stream, before anything reads them whole. Inference runs in a worker
thread while holding a slot of the device's :class:`~engine.concurrency.DeviceLimiter`.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Literal, Mapping, Union

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import processor
from ui.access import API_KEY_HEADER, key_matches
from engine.settings import FIELDS, EnhanceSettings, FieldSpec
from engine.errors import InputTooLargeError, NoFaceFoundError, QueueFullError, UnsupportedFormatError
from ui.jobs import JobWatch
from utils.errors import Stage, error_kind, is_expected, scrub_paths, user_message

if TYPE_CHECKING:
    from ui.services import Services
    from utils.validation import ImageHeader

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
#: Upload formats the API accepts (PIL format names, as :func:`utils.validation.check_image_header` reports them).
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})



# ------------------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """An error the API answers with ``{"error": message, "stage": stage}`` and ``status``."""

    def __init__(self, status: int, message: str, stage: Stage, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.stage = status, message, stage
        self.headers = dict(headers or {})


class BodyTooLargeError(HTTPException):
    """Raised from the size-capped ``receive`` once a body grows over the limit (an HTTPException, so FastAPI's
    body parsing lets it through unchanged)."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=_too_large_message(limit))


def _too_large_message(limit: int) -> str:
    return (f"The request body is over the upload limit of {limit / 2**20:.1f} MB; send a smaller file "
            "(the server's REALESRGAN_MAX_UPLOAD_MB sets the limit).")


def api_error(exc: BaseException, stage_if_unexpected: Stage = "inference") -> ApiError:
    """The answer for ``exc``: status, stage and message from the error table (:mod:`utils.errors`).

    An unexpected exception (no row in the table) becomes a 500 at ``stage_if_unexpected`` with the generic
    message; its details are logged under a request id that the answer carries in ``X-Request-ID``.
    """
    if isinstance(exc, ApiError):
        return exc
    if not is_expected(exc):
        request_id = uuid.uuid4().hex[:12]
        logger.error("API request %s failed at %s", request_id, stage_if_unexpected, exc_info=exc)
        return ApiError(500, user_message(exc), stage_if_unexpected, {"X-Request-ID": request_id})
    kind = error_kind(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
    return ApiError(kind.status, user_message(exc), kind.stage, headers)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.message, "stage": error.stage}, status_code=error.status,
                        headers=error.headers or None)


def http_api_error(exc: StarletteHTTPException) -> ApiError:
    """The ``{"error", "stage"}`` answer for an HTTP exception of FastAPI or Starlette (unknown route, wrong
    method, a body that does not parse). A parse failure wrapping our own :class:`ApiError` (too many fields, no
    boundary, a part over the size limit) answers with that error."""
    if isinstance(exc.__cause__, ApiError):
        return exc.__cause__
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else "Invalid request."
    message = message if message.endswith(".") else message + "."
    if exc.status_code == 400:  # "There was an error parsing the body": the client's body, not our failure
        return ApiError(422, message, "validation")
    return ApiError(exc.status_code, message, "validation", exc.headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header", "path", "form")]
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "Invalid request: " + "; ".join(parts) if parts else "Invalid request."


# ------------------------------------------------------------------------------------------------ request plumbing
class _InMemoryFormRequest(Request):
    """A request whose multipart files stay in memory (starlette spools files over 1 MB to a temp file).

    The body is already capped by :class:`BodySizeLimitMiddleware`, so memory is bounded by the upload limit.
    """

    spool_bytes: int = 2**31

    def form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,  # type: ignore[override]
             max_part_size: int = 1024 * 1024):
        return self._in_memory_form(max_files, max_fields, max_part_size)

    async def _in_memory_form(self, max_files, max_fields, max_part_size) -> FormData:
        cached = getattr(self, "_memory_form", None)
        if cached is not None:
            return cached
        try:
            from python_multipart.multipart import parse_options_header
        except ImportError:  # python-multipart < 0.0.13 named its package `multipart`
            from multipart.multipart import parse_options_header

        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if content_type != b"multipart/form-data":
            return await super().form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
        parser = MultiPartParser(self.headers, self.stream(), max_files=max_files, max_fields=max_fields,
                                 max_part_size=max_part_size)
        parser.spool_max_size = self.spool_bytes  # never roll over to a file on disk
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(422, f"The multipart body could not be parsed: {exc.message.rstrip('.')}.",
                           "validation") from None
        self._memory_form = form
        return form


def _route_class(spool_bytes: int) -> type[APIRoute]:
    class ApiRoute(APIRoute):
        """Routes of this API: in-memory uploads, and every error answered as ``{"error", "stage"}``."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                memory_request = _InMemoryFormRequest(request.scope, request.receive)
                memory_request.spool_bytes = spool_bytes
                try:
                    return await handler(memory_request)
                except ApiError as exc:
                    return error_response(exc)
                except RequestValidationError as exc:
                    return error_response(ApiError(422, _validation_message(exc), "validation"))
                except StarletteHTTPException as exc:  # FastAPI's subclass and Starlette's own (body parsing)
                    return error_response(http_api_error(exc))
                except Exception as exc:  # engine errors by the table; anything else is logged, answered 500
                    return error_response(api_error(exc))

            return route

    return ApiRoute


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` on paths under ``path_prefix``, before anything reads them whole.

    A declared ``Content-Length`` over the cap is answered 413 at once, without reading the body. A body without
    one (chunked) is counted as it streams; the chunk that crosses the cap raises :class:`BodyTooLargeError`,
    which becomes a 413 (the rest of the upload is never read, and the server closes the connection).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, path_prefix: str = API_PREFIX):
        self.app, self.max_bytes, self.path_prefix = app, int(max_bytes), path_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.path_prefix):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await error_response(ApiError(413, _too_large_message(self.max_bytes), "validation"))(scope, receive,
                                                                                                  send)
            return
        received = 0
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await error_response(ApiError(413, _too_large_message(self.max_bytes), "validation"))(scope, receive,
                                                                                                  send)


# ------------------------------------------------------------------------------------------------ response models
class ErrorBody(BaseModel):
    error: str
    stage: Stage


class EnhanceData(BaseModel):
    restored_image: str
    format: str
    width: int
    height: int
    metrics: dict[str, Any]
    settings: dict[str, Any]
    processing_time_ms: int
    warning: str | None


class EnhanceResponse(BaseModel):
    status: Literal["success"]
    data: EnhanceData


_ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    401: "Missing or wrong X-API-Key (only when the server has an API key).",
    413: "The upload (bytes) or the image (pixels) is over the server's limits.",
    415: "The file is not JPEG, PNG or WebP.",
    422: "A parameter is out of range, the image cannot be decoded, or face_enhance was asked and no face was found.",
    429: "The server is busy and its wait line is full; retry after Retry-After seconds.",
    500: "Unexpected failure (details in the server log).",
    503: "The model's weights are not available on the server, or it ran out of memory.",
}.items()}


# ------------------------------------------------------------------------------------------------ the work
def rest_fields() -> dict[str, tuple[str, FieldSpec]]:
    """The REST form fields, generated from the one settings model: ``{field name: (setting name, spec)}``."""
    return {spec.rest: (name, spec) for name, spec in FIELDS.items() if spec.rest is not None}


def _annotation(spec: FieldSpec) -> Any:
    """The field's type with the model's choices (an OpenAPI enum) and ranges (minimum/maximum)."""
    if spec.kind == "choice" and callable(spec.choices):  # the models: one imported later is valid too
        return Annotated[str, Field(json_schema_extra=lambda schema: schema.update(enum=list(spec.choice_values())))]
    if spec.kind == "choice":
        return Literal.__getitem__(spec.choice_values())
    if spec.kind == "bool":
        return bool
    number = int if spec.kind == "int" else float
    kinds: list[Any] = [Annotated[number, Field(ge=spec.minimum, le=spec.maximum)]]
    if spec.special:
        kinds.append(Literal.__getitem__(spec.special))
    if spec.allow_auto:
        kinds.append(Literal["auto"])
    return Union.__getitem__(tuple(kinds)) if len(kinds) > 1 else kinds[0]


def _form_parameters() -> list[inspect.Parameter]:
    return [inspect.Parameter(rest, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(spec) | None,
                              default=Form(None, description=f"{spec.help} Accepts {spec.describe()}; left out: "
                                           + ("the advisor's choice." if spec.advised else "the default.")))
            for rest, (_name, spec) in rest_fields().items()]


def explicit_from_form(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a client sent (REST field names → setting names; fields left out are not in the dict)."""
    fields = rest_fields()
    return {fields[rest][0]: value for rest, value in values.items() if rest in fields and value is not None}


def check_upload(data: bytes, config) -> "ImageHeader":
    """Refuse an upload from its header alone: wrong type (415), too many bytes or pixels (413), unreadable (422).

    Raises:
        UnsupportedFormatError: not JPEG, PNG or WebP (judged from the content).
        InputTooLargeError: over the byte or pixel limit.
        InvalidInputError: empty or damaged.
    """
    from utils.validation import check_image_header

    header = check_image_header(data, max_pixels=config.max_input_pixels, max_bytes=config.max_upload_bytes)
    if header.format not in ACCEPTED_FORMATS:
        raise UnsupportedFormatError(f"{header.format} files are not accepted by the API; send JPEG, PNG or WebP.")
    return header


def check_time_estimate(services: "Services", header: "ImageHeader", explicit: Mapping[str, Any]) -> None:
    """Refuse up front a job whose estimate (this machine's measured throughput) exceeds the per-job time limit:
    with the model the client named, else with the quickest model the advisor may choose for an image of this size
    (its actual choice is checked in the job, before its network runs: ``BatchServices.time_limit``).

    Only from what was measured already: no model runs just to estimate, and no pixel is decoded.

    Raises:
        InputTooLargeError: the estimate is over ``job_time_limit_seconds`` (413; the message says what to change).
    """
    if services.advisor is None:
        return
    limit, outscale = services.config.job_time_limit_seconds, explicit.get("outscale")
    if explicit.get("model"):
        services.advisor.check_time_limit(str(explicit["model"]), header.width, header.height, limit,
                                          outscale=outscale)
    else:
        services.advisor.check_auto_time_limit(header.width, header.height, limit, outscale)


def _json_safe(value: Any) -> Any:
    """Plain JSON types (numpy scalars → Python, NaN/inf → None, tuples → lists)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    return str(value)


def run_enhance_job(services: "Services", data: bytes, explicit: Mapping[str, Any],
                    cancel: threading.Event | None = None) -> tuple[dict, bytes]:
    """Decode, (advise), enhance, check faces, encode and measure one upload through the batch runner. Blocking;
    runs in a worker thread. Without a ``model`` the advisor chooses, and every field the client sent wins.

    Returns:
        The ``data`` object of the success response without its ``restored_image``, and the encoded image that
        :func:`image_response` sends as that field (the output's pixels are freed when this returns).

    Raises:
        ApiError: any failure, with its status and stage.
    """
    from utils.image_io import encode_image
    from utils.metrics import file_metrics

    config = services.config
    started = time.perf_counter()
    job = processor.BatchJob(settings=EnhanceSettings.from_mapping(explicit), explicit=dict(explicit),
                             auto="model" not in explicit)
    engine_services = processor.BatchServices(services.model_manager, config, services.advisor,
                                              time_limit=config.job_time_limit_seconds)
    with services.model_manager.holding(len(data)):  # the upload stays in memory until the job is done
        item = processor.run_batch([processor.BatchInput(data, Path("upload"))], job, engine_services,
                                   cancel=cancel).items[0]
    if not item.ok:
        raise api_error(item.exception or RuntimeError(item.error)) from None
    result = item.result
    settings = result.settings

    if settings.face_enhance and result.faces_detected == 0:
        why = "; ".join(result.warnings)
        raise api_error(NoFaceFoundError(
            "No face was found in the image, and face_enhance=true requires at least one face (send "
            "face_enhance=false to upscale it without face restoration)" + (f". {why}" if why else ".")))

    try:
        encoded = encode_image(result.pixels, processor.output_format_for(result), quality=settings.quality,
                               icc_profile=result.icc_profile, exif=result.exif, in_place=True)
    except Exception as exc:  # encoder failures are ours, not the client's
        raise api_error(exc, "encode") from None

    try:
        metrics = dict(result.metrics)
        metrics.update(file_metrics(result.input_size, result.size, len(data), len(encoded.data)))
        metrics = _json_safe(metrics)
    except Exception as exc:  # a metric that cannot be computed must not look like a bad image
        raise api_error(exc, "metrics") from None

    warnings = [scrub_paths(w) for w in (*result.warnings, *encoded.warnings)]
    return {
        "format": encoded.format,
        "width": result.size[0],
        "height": result.size[1],
        "metrics": metrics,
        "settings": _json_safe({
            "model": result.model, "chosen_by": "advisor" if job.auto else "request",
            "upscale_factor": round(result.outscale, 4), "face_enhance": settings.face_enhance,
            "face_model": settings.face_model, "face_strength": settings.face_strength,
            "denoise_strength": settings.denoise_strength, "output_format": encoded.format, "tile": result.tile,
            "precision": result.precision, "device": result.device, "faces_detected": result.faces_detected,
            "faces_restored": result.faces_restored,
        }),
        "processing_time_ms": int(round((time.perf_counter() - started) * 1000)),
        "warning": " ".join(w if w.endswith(".") else w + "." for w in dict.fromkeys(warnings)) or None,
    }, encoded.data


BASE64_CHUNK_BYTES = 3 * 2 ** 20
"""Bytes of the encoded image turned into base64 text at a time while the success body streams (a multiple of 3,
so no chunk but the last is padded)."""


def image_response(data: Mapping[str, Any], image: bytes) -> StreamingResponse:
    """The success body ``{"status": "success", "data": {"restored_image": <base64 of image>, **data}}``, the same
    JSON as before, streamed with its exact ``Content-Length``: the base64 text is made
    :data:`BASE64_CHUNK_BYTES` at a time as the client reads. Whole, it was held ~5 times over (base64 bytes, their
    str, the JSON str and its bytes, the socket's buffer): ~5x the encoded file on top of the job's plan."""
    fields = json.dumps(dict(data), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    head = b'{"status":"success","data":{"restored_image":"'
    tail = b'"' + (b"," + fields[1:] if len(fields) > 2 else b"}") + b"}"
    length = len(head) + 4 * math.ceil(len(image) / 3) + len(tail)

    def body() -> Iterator[bytes]:
        yield head
        view = memoryview(image)
        for start in range(0, len(view), BASE64_CHUNK_BYTES):
            yield base64.b64encode(view[start:start + BASE64_CHUNK_BYTES])
        yield tail

    return StreamingResponse(body(), media_type="application/json", headers={"Content-Length": str(length)})


def _job_in_slot(services: "Services", ticket, data: bytes, explicit: Mapping[str, Any],
                 cancel: threading.Event) -> tuple[dict, bytes]:
    """Wait for the ticket's turn (leaving the line if ``cancel`` is set), run the job, give the slot back."""
    try:
        ticket.wait(cancel=cancel)
        return run_enhance_job(services, data, explicit, cancel=cancel)
    finally:
        ticket.release()


#: How often a running request checks whether its client is still connected (seconds).
DISCONNECT_POLL_SECONDS = 0.25


async def run_cancellable(request: Request, work: Callable[[threading.Event], Any], time_limit: float,
                          release: Callable[[], None]) -> Any:
    """Run ``work(cancel)`` in a worker thread; set ``cancel`` when the client hangs up or ``time_limit`` passes.

    The engine checks ``cancel`` at every tile, so an abandoned or overlong job stops within a tile and its slot
    is freed (``release`` runs when the worker really ends, never before).

    Raises:
        ApiError: 503 when the time limit stopped the job.
    """
    watch = JobWatch(time_limit)  # owns the cancel event; its timer sets it when the time limit passes
    cancel = watch.cancel
    finished = anyio.Event()
    outcome: dict[str, Any] = {}

    async def run() -> None:
        try:
            outcome["value"] = await anyio.to_thread.run_sync(work, cancel)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc
        finally:
            release()
            finished.set()

    async def watch_client() -> None:
        while not finished.is_set():
            with anyio.move_on_after(DISCONNECT_POLL_SECONDS):
                await finished.wait()
            if not finished.is_set() and not cancel.is_set() and await request.is_disconnected():
                logger.info("client went away; cancelling its job")
                cancel.set()

    with watch:
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            group.start_soon(watch_client)
    if "error" in outcome:
        if watch.timed_out.is_set():
            raise api_error(watch.time_limit_error()) from None
        raise outcome["error"]
    return outcome["value"]


# ------------------------------------------------------------------------------------------------ the router
def create_api_router(services: "Services") -> APIRouter:
    """The ``/api/v1`` routes bound to ``services`` (its config, model manager, advisor and limiter)."""
    config = services.config
    router = APIRouter(prefix=API_PREFIX, tags=["api"], route_class=_route_class(config.max_upload_bytes + 1),
                       responses={401: _ERRORS[401], 500: _ERRORS[500]})
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="Required when the server sets REALESRGAN_API_KEY.")

    def require_key(provided: str | None = Depends(key_header)) -> None:
        if not config.api_key:
            return
        if not key_matches(provided, config.api_key):
            raise ApiError(401, f"A valid {API_KEY_HEADER} header is required for this API.", "validation",
                           headers={"WWW-Authenticate": "ApiKey"})

    # Documented (and checked) only when the server has a key: the OpenAPI document says what this server wants.
    key_check = [Depends(require_key)] if config.api_key else []

    async def enhance(request: Request, file: UploadFile = File(..., description="The image: JPEG, PNG or WebP."),
                      **options: Any) -> Response:
        data = await file.read()
        await file.close()
        header = check_upload(data, config)
        explicit = explicit_from_form(options)
        if explicit.get("face_enhance") and not config.enable_face_enhancement:
            raise ApiError(422, "Face enhancement is turned off on this server; send face_enhance=false.",
                           "validation")
        EnhanceSettings.from_mapping(explicit)  # a bad combination is the client's fault: 422 before queueing
        check_time_estimate(services, header, explicit)  # 413 before queueing when it can't finish in time
        ticket = services.limiter.try_acquire()  # QueueFullError: 429 with Retry-After
        fields, image = await run_cancellable(request, lambda cancel: _job_in_slot(services, ticket, data,
                                                                                   explicit, cancel),
                                              config.job_time_limit_seconds, ticket.release)
        return image_response(fields, image)

    fixed = [inspect.signature(enhance).parameters[name] for name in ("request", "file")]
    enhance.__signature__ = inspect.Signature([*fixed, *_form_parameters()],  # type: ignore[attr-defined]
                                              return_annotation=Response)
    router.post(
        "/enhance", response_model=EnhanceResponse, dependencies=key_check,
        responses={code: _ERRORS[code] for code in (413, 415, 422, 429, 503)},
        summary="Enhance an image",
        description=(
            "Upscale a JPEG, PNG or WebP image (and optionally restore faces) in memory; the result comes back "
            "base64-encoded. Every option has the range of the app's one settings model; without `model` the "
            "settings advisor chooses for this image, and every option you send wins over its choice. "
            "With `face_enhance=true` the image must contain at least one detectable face, otherwise the answer "
            "is 422 with stage `faces`. At most the configured number of images are processed at once; further "
            "requests wait in a bounded line and beyond it get 429 with Retry-After."),
    )(enhance)

    @router.get("/health", dependencies=key_check, summary="Server status")
    async def health() -> dict:
        from utils.gpu import resolve_device

        try:
            device = str(resolve_device(config.device))
        except Exception as exc:  # a broken device setting is reported, not raised, by a health check
            if not is_expected(exc):
                logger.error("health: device %r could not be resolved", config.device, exc_info=exc)
            device = f"unavailable: {user_message(exc)}"
        return {"status": "ok", "device": device, "loaded_models": services.model_manager.loaded_models(),
                "queue": services.limiter.stats().as_dict()}

    @router.get("/models", dependencies=key_check, summary="Model catalog with availability")
    async def models() -> dict:
        statuses = await anyio.to_thread.run_sync(services.model_manager.list_models)
        return {"models": [{k: v for k, v in s.as_dict().items() if k != "path"} for s in statuses]}

    # ---------------------------------------------------------------- the user's own models (import, remove)
    @router.post("/models/import", dependencies=[Depends(require_key)], responses={
        code: _ERRORS[code] for code in (413, 422, 503)}, summary="Import your own model")
    async def import_model(file: UploadFile | None = File(None, description="A .pth/.pt/.ckpt/.safetensors file."),
                           url: str | None = Form(None, description="Or an http(s) URL to download it from."),
                           name: str | None = Form(None), kind: str = Form("general"),
                           sha256: str | None = Form(None), license: str = Form("")) -> dict:
        """Import a model like ``python main.py models add``: checked, hashed, copied into the weights dir."""
        data = await file.read() if file is not None else None
        return {"model": await anyio.to_thread.run_sync(
            lambda: _import_model(services, data, file.filename if file else None, url, name, kind, sha256,
                                  license))}

    @router.delete("/models/{name}", dependencies=[Depends(require_key)], summary="Remove an imported model")
    async def remove_model(name: str) -> dict:
        await anyio.to_thread.run_sync(lambda: _remove_model(services, name))
        return {"removed": name}

    return router


def _answer_http_errors_under_the_prefix(app: FastAPI) -> None:
    """Unknown routes and wrong methods under ``/api/v1`` answer ``{"error", "stage"}`` too; other paths (the web
    UI's) keep the handler they had."""
    from fastapi.exception_handlers import http_exception_handler

    previous = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)

    async def handler(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith(API_PREFIX) and isinstance(exc, StarletteHTTPException):
            return error_response(http_api_error(exc))
        return await previous(request, exc)

    app.add_exception_handler(StarletteHTTPException, handler)


def _import_model(services: "Services", data: bytes | None, filename: str | None, url: str | None,
                  name: str | None, kind: str, sha256: str | None, license: str) -> dict:
    """Import an uploaded file (through a private temp file) or a URL into the user catalog; the entry as JSON."""
    import tempfile

    from engine.downloader import DownloadPolicy
    from engine.errors import InvalidSettingsError

    catalog = services.model_manager.user_catalog
    if catalog is None:
        raise InvalidSettingsError("This server's model catalog is fixed; models cannot be imported.")
    if (data is None) == (not url):
        raise InvalidSettingsError("Send either a model file or a url, not both or neither.")
    config = services.config
    policy = DownloadPolicy(timeout=config.download_timeout, retries=config.download_retries)
    if url:
        return catalog.import_model(url, name=name, kind=kind, sha256=sha256, license=license, policy=policy).as_dict()
    upload = Path(filename or "model").name
    config.temp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.temp_dir) as folder:
        path = Path(folder) / upload
        path.write_bytes(data or b"")
        model = catalog.import_model(str(path), name=name or Path(upload).stem, kind=kind, sha256=sha256,
                                     license=license)
    return model.as_dict()


def _remove_model(services: "Services", name: str) -> None:
    from engine.errors import InvalidSettingsError

    if services.model_manager.user_catalog is None:
        raise InvalidSettingsError("This server's model catalog is fixed; models cannot be removed.")
    services.model_manager.user_catalog.remove(name)
    services.model_manager.unload_model(name)


def install_api(app: FastAPI, services: "Services") -> None:
    """Add the ``/api/v1`` routes and the body-size cap for them to ``app`` (call before the app starts)."""
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=services.config.max_upload_bytes, path_prefix=API_PREFIX)
    app.include_router(create_api_router(services))
    _answer_http_errors_under_the_prefix(app)
    logger.info("REST API at %s (API key %s, body limit %.1f MB)", API_PREFIX,
                "required" if services.config.api_key else "not required", services.config.max_upload_bytes / 2**20)
