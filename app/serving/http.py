"""What KServe's FastAPI app lacks, added by `configure_app` before KServe's REST server starts.

- `ServiceMiddleware`, plain ASGI, around every request: a request id and one access-log line; the
  body read under a time limit (408) and a size limit (413, after draining what the client still sends
  so it reads the answer instead of a reset); predict bodies checked as strict JSON (415 for another
  content type, 400 for invalid UTF-8, bad syntax, duplicate keys or NaN, naming the place or field);
  a client that hangs up cancels its request (its rows leave the batch at the next progress tick;
  counted as 499); `Retry-After` on every 503; the predict metrics.
- Routes registered ahead of KServe's, so they match first: liveness that fails once the model is not
  loaded and readiness that is the model's (KServe's are always true), and 404s for the routes this
  server does not serve (model repository load/unload, explain, model versions, v2 infer).
- Once KServe has registered its handlers (at the first ASGI call), ours replace them: KServe's log
  every client error at ERROR with a traceback and echo exception text in 500s.
- Our typed-error handlers, the model card route, the API document (app/serving/openapi.py), and
  stopping intake as soon as SIGTERM arrives (KServe and uvicorn only stop once in-flight connections
  are done).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import PermissionDenied
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving import metrics
from app.serving.card import CARD_PATH
from app.serving.errors import RETRY_AFTER_S, RequestInvalid, install_exception_handlers

if TYPE_CHECKING:
    from app.serving.model import KandinskyModel

log = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

#: Status counted for a request whose client closed the connection before the answer (nginx's code).
CLIENT_CLOSED = 499
#: How much of an over-limit body is read and dropped, so that the client gets to read the 413.
DRAIN_LIMIT_BYTES = 16 << 20

# KServe routes this server does not serve: the repository API would let anyone unload the model;
# explain and model versions are not implemented for this model (it has one version).
UNSERVED_ROUTES = (
    ("/v1/models/{model_name}:explain", "POST"),
    ("/v2/repository/models/{model_name}/load", "POST"),
    ("/v2/repository/models/{model_name}/unload", "POST"),
    ("/v2/models/{model_name}/versions/{model_version}", "GET"),
    ("/v2/models/{model_name}/versions/{model_version}/ready", "GET"),
    ("/v2/models/{model_name}/versions/{model_version}/infer", "POST"),
)
#: The generation requests counted in kandinsky_requests_total, by protocol (gRPC counts its own).
_PROTOCOL_ROUTES = (
    ("v1", re.compile(r"^/v1/models/[^/]+:predict$")),
    ("jobs", re.compile(r"^/v1/models/[^/]+/jobs$")),
    ("v2", re.compile(r"^/v2/models/[^/]+/infer$")),
    ("openai", re.compile(r"^/openai/v1/images/generations$")),
)


def protocol_of(method: str, path: str) -> str | None:
    """The protocol of a generation request (`kandinsky_requests_total{protocol}`), None for other routes."""
    if method != "POST":
        return None
    return next((name for name, pattern in _PROTOCOL_ROUTES if pattern.match(path)), None)
LIVENESS_PATH = "/v2/health/live"
OPENAI_PREFIX = "/openai/"
READINESS_PATH = "/v2/health/ready"

_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_REQUEST_ID = re.compile(r"^[\w.:-]{1,64}$")


class ServiceMiddleware:
    """Request id, access log, body limits and checks, hang-up cancellation, 503 Retry-After, metrics."""

    def __init__(self, app: ASGIApp, model: KandinskyModel) -> None:
        self.app = app
        self.model = model
        self.max_body_bytes = model.settings.max_body_bytes
        self.body_timeout = model.settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        protocol = protocol_of(scope["method"], scope["path"])
        status = [0]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                if message["status"] == 503 and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._handle(scope, receive, send_wrapper, status)
        except Exception:
            status[0] = status[0] or 500  # answered by Starlette's outermost error middleware
            raise
        finally:
            elapsed = time.perf_counter() - started
            if protocol is not None and status[0]:
                metrics.REQUESTS_TOTAL.labels(code=str(status[0]), protocol=protocol).inc()
                metrics.REQUEST_SECONDS.observe(elapsed)
            _log_access(scope, request_id, status[0], elapsed, protocol)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, status: list[int]) -> None:
        problem = _query_problem(scope)
        if problem is not None:
            await _error(send, 400, problem, scope=scope)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        is_v1 = scope["path"].startswith("/v1/")
        if is_v1 and not _is_json(scope):
            await _error(send, 415, f"Content-Type {_content_type(scope)!r} is not supported: send "
                                    "application/json", close=True)
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._read_body(scope, receive, send)
        except TimeoutError:
            await _error(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                         close=True, scope=scope)
            return
        if body is None:
            return  # answered (413) or the client is gone
        if is_v1:
            is_predict = protocol_of("POST", scope["path"]) in ("v1", "jobs")
            problem = self._json_problem(body, is_predict=is_predict)
            if problem is not None:
                await _error(send, 400, problem)
                return
        elif protocol_of(scope["method"], scope["path"]) == "v2" and _model_in_path(scope) == self.model.name:
            from app.serving.v2 import rest_body_problem

            # KServe would answer a malformed v2 body with FastAPI's 422, or a 500 from its decoding.
            problem = rest_body_problem(body, _lower_headers(scope))
            if problem is not None:
                await _error(send, 400, problem)
                return
        await self._run_watching_disconnect(scope, body, receive, send, status)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse_too_large(scope, receive, send, declared)
            return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            # The declared length can lie (or be absent with chunked encoding): count what arrives.
            if len(body) > self.max_body_bytes:
                more = message.get("more_body", False)
                await self._refuse_too_large(scope, receive, send, None, len(body), more)
                return None
            if not message.get("more_body", False):
                return bytes(body)

    async def _refuse_too_large(
        self, scope: Scope, receive: Receive, send: Send, declared: int | None, read: int = 0,
        more: bool = True,
    ) -> None:
        # Closing on a client that is still sending makes its kernel answer with a reset, and most
        # clients then report the reset instead of our 413: read (and drop) a bounded amount first.
        if declared is None or declared <= DRAIN_LIMIT_BYTES:
            while more and read <= DRAIN_LIMIT_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                read += len(message.get("body", b""))
                more = message.get("more_body", False)
        await _error(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes", close=True,
                     scope=scope)

    def _json_problem(self, body: bytes, *, is_predict: bool) -> str | None:
        """What is wrong with a v1 JSON body, in words that name the place or the field; None if fine."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"body: not valid UTF-8 at byte {exc.start}"
        try:
            payload = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except _DuplicateKey as exc:
            return f"body: duplicate key {exc.key!r} in one JSON object"
        except json.JSONDecodeError as exc:
            return f"body: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        except RecursionError:
            return "body: JSON nested too deeply"
        if is_predict and self.model.schema is not None:
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError:
                # KServe's strict parser refuses NaN, Infinity, 1e999 and integers beyond 64 bits
                # saying only where in the text; the schema names the field and its range.
                try:
                    self.model.schema.parse(payload)
                except RequestInvalid as exc:
                    return exc.message
        return None

    async def _run_watching_disconnect(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, status: list[int]
    ) -> None:
        """Run the app with the body already read, cancelling it if the client closes the connection.

        Cancelling the handler makes `Scheduler.submit` mark its ticket abandoned, so the request's
        rows leave their batch at the next progress tick while the batch's other requests go on.
        """
        gone = asyncio.Event()
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the app reads past the body only to learn of a disconnect
            return {"type": "http.disconnect"}

        handler = asyncio.ensure_future(self.app(scope, replay, send))

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not handler.done() and status[0] == 0:
                        handler.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # cancelled from outside (server shutdown), not by the client
            status[0] = CLIENT_CLOSED
            log.info("client closed the connection; request cancelled")
        finally:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


def _model_in_path(scope: Scope) -> str:
    """The model name in a `/v2/models/NAME/...` path (another model gets KServe's 404)."""
    parts = scope["path"].split("/")
    return parts[3] if len(parts) > 3 else ""


def _lower_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # a malformed length is the server's (uvicorn's) concern


def _content_type(scope: Scope) -> str:
    return (_header(scope, b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()


def _is_json(scope: Scope) -> bool:
    kind = _content_type(scope)
    return kind == "" or bool(_JSON_TYPE.match(kind))  # no Content-Type: read as JSON, as KServe does


def _query_problem(scope: Scope) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    if scope["path"].startswith("/v2/models/") and "model_version" in query:
        return "model_version: this server serves one unversioned model; omit model_version"
    return None


def _request_id(scope: Scope) -> str:
    given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _log_access(scope: Scope, request_id: str, status: int, elapsed: float, protocol: str | None) -> None:
    route = getattr(scope.get("route"), "path", None) or "-"
    client = scope.get("client") or ("-", 0)
    level = logging.WARNING if status >= 500 else logging.INFO
    access_log.log(
        level,
        '%s "%s %s" %d %.1f ms id=%s%s',
        client[0],
        scope["method"],
        scope["path"],
        status,
        elapsed * 1000,
        request_id,
        f" protocol={protocol}" if protocol else "",
        extra={
            "protocol": protocol,
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "path": scope["path"],
            "status": status,
            "duration_ms": round(elapsed * 1000, 1),
            "client": client[0],
        },
    )


async def _error(send: Send, status: int, message: str, *, close: bool = False, scope: Scope | None = None
                 ) -> None:
    """An error answered by the middleware itself, in the body shape of the route's protocol."""
    headers = {"connection": "close"} if close else None
    content: dict[str, Any] = {"error": message}
    if scope is not None and scope.get("path", "").startswith(OPENAI_PREFIX):
        from app.serving.openai import error_body

        content = error_body(status, message)
    response = JSONResponse(status_code=status, content=content, headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class LockedRepository(ModelRepositoryExtension):
    """KServe's model repository extension without load and unload: this process serves one model.

    gRPC's RepositoryModelLoad/Unload answer PERMISSION_DENIED; the REST routes are not served.
    """

    async def load(self, model_name: str) -> None:
        raise PermissionDenied("this server serves one model; the repository cannot load or unload it")

    async def unload(self, model_name: str) -> None:
        raise PermissionDenied("this server serves one model; the repository cannot load or unload it")


# ---- KServe's app, finished ------------------------------------------------------------------------

# KServe's error classes, with the status its own handlers answer them with.
_KSERVE_ERRORS: dict[type[BaseException], int] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    ModelNotReady: 503,
    ServerNotReady: 503,
    ServerNotLive: 503,
    UnsupportedProtocol: 501,
    NotImplementedError: 501,
    InferenceError: 500,
}


async def kserve_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """KServe's errors with KServe's statuses; a client error is one log line, not a traceback."""
    status = next((s for cls, s in _KSERVE_ERRORS.items() if isinstance(exc, cls)), 500)
    # Client errors and "not ready" are expected conditions: one line, and KServe's own message.
    if status < 500 or isinstance(exc, ModelNotReady | ServerNotReady | ServerNotLive):
        log.warning("%s %s: %d %s", request.method, request.url.path, status, exc)
        message = str(exc)
    else:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"internal error ({type(exc).__name__})"  # the text may quote internals or input
    return JSONResponse(status_code=status, content={"error": message})


def _add_health_and_shadow_routes(app: FastAPI, model: KandinskyModel) -> None:
    """Our liveness and readiness, and 404s for the KServe routes we do not serve.

    Added before KServe registers its own routes, so these match first: KServe's liveness and
    readiness are always true, and its repository routes would let anyone unload the model.
    """

    async def live(request: Request) -> JSONResponse:
        if model.alive:
            return JSONResponse({"live": True})
        return JSONResponse({"error": "the model is not loaded or its worker stopped"}, status_code=503)

    async def ready() -> JSONResponse:
        if model.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"error": f"model {model.name} is not ready"}, status_code=503)

    async def not_served(request: Request) -> JSONResponse:
        return JSONResponse({"error": f"{request.url.path} is not served by this server"}, status_code=404)

    app.add_api_route(LIVENESS_PATH, live, methods=["GET"], tags=["Health"], summary="Liveness")
    app.add_api_route(READINESS_PATH, ready, methods=["GET"], tags=["Health"], summary="Readiness")
    for path, method in UNSERVED_ROUTES:
        app.add_api_route(path, not_served, methods=[method], include_in_schema=False)


def _replace_kserve_error_handlers(app: FastAPI) -> None:
    for exc_class in (*_KSERVE_ERRORS, Exception):
        app.add_exception_handler(exc_class, kserve_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's and FastAPI's own errors (a body that is not JSON, 404, 405) in our `{"error"}` shape."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code < 500:
        log.warning("%s %s: %d %s", request.method, request.url.path, exc.status_code, exc.detail)
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)},
                        headers=getattr(exc, "headers", None))


async def request_validation_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a body that does not fit a route's model (KServe's v2 infer) -> our 400,
    naming the place: `inputs[0].datatype: Field required`."""
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    log.warning("%s %s: 400 %s", request.method, request.url.path, "; ".join(parts))
    return JSONResponse(status_code=400, content={"error": "; ".join(parts)})


def _after_kserve_setup(app: FastAPI, finish: Callable[[], None]) -> None:
    # KServe registers its exception handlers when its REST server starts, after our configure_app
    # (and for its own classes they would replace ours); Starlette builds the middleware stack (and
    # copies the handlers into it) on the first ASGI call, the lifespan's. That first build is the one
    # moment after KServe and before any request, in the real server and under a test client alike.
    build = app.build_middleware_stack

    def build_after_finishing() -> ASGIApp:
        finish()
        app.build_middleware_stack = build  # type: ignore[method-assign]
        return build()

    app.build_middleware_stack = build_after_finishing  # type: ignore[method-assign]


def configure_app(app: FastAPI, model: KandinskyModel) -> None:
    """Add our middleware, error handlers, routes, API document and SIGTERM drain to KServe's app.

    Call it before KServe's REST server starts (it finishes the app on the first ASGI call).
    """
    from app.serving.jobs import install_jobs
    from app.serving.openai import install_openai
    from app.serving.openapi import install_openapi
    from app.serving.page import install_page

    app.add_middleware(ServiceMiddleware, model=model)
    install_exception_handlers(app)

    async def model_card(model_name: str) -> dict[str, Any]:
        if model_name != model.name:
            raise ModelNotFound(model_name)
        return model.card()

    app.add_api_route(CARD_PATH, model_card, methods=["GET"], tags=["Catalog"], summary="Model card")
    _add_health_and_shadow_routes(app, model)
    install_page(app)
    install_jobs(app, model)
    install_openai(app, model)
    install_openapi(app, model)
    _drain_on_signal(app, model.begin_drain)
    _after_kserve_setup(app, lambda: _replace_kserve_error_handlers(app))


def _drain_on_signal(app: FastAPI, drain: Callable[[], None]) -> None:
    # uvicorn installs its SIGTERM handler when it starts serving (before the lifespan starts); we chain
    # ours in front of it there, so intake stops at once while uvicorn waits for in-flight requests.
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(sig)

                def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                    drain()
                    if callable(previous):
                        previous(signum, frame)

                signal.signal(sig, handler)
        async with original(a) as state:
            yield state

    app.router.lifespan_context = lifespan
