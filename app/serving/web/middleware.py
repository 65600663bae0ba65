"""`ServiceMiddleware`: plain ASGI around every HTTP request, reading the route table
(app/serving/protocols/routes.py) for what each route needs:

- a request id and one access-log line (with the route's protocol and the caller's tenant);
- with API keys (SPEC section 12), a route declared `auth` refused without a valid
  `Authorization: Bearer <key>` before anything else (401 with `WWW-Authenticate`, in the route's error
  shape: an unauthenticated client learns nothing about the body checks), and the tenant's name put in
  the request's `state` for the handlers;
- the body read under a time limit (408) and a size limit (413: an over-limit body is drained and
  dropped for a bounded time, as nginx's lingering close does, so that a client still writing reads
  the 413 instead of a connection reset, and memory does not grow with the body);
- JSON routes checked as strict JSON (415 for another content type, 400 for invalid UTF-8, bad syntax,
  duplicate keys), then the route's own body check (the schema naming a field of a NaN, a malformed v2
  body), errors in the route's protocol's shape;
- a client that hangs up cancels its request (its rows leave the batch at the next progress tick;
  counted as 499); `Retry-After` on every 503; `kandinsky_requests_total{code, protocol, tenant}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving.core.errors import RETRY_AFTER_S
from app.serving.core.settings import ServerSettings
from app.serving.core.tenants import ApiKeys
from app.serving.observability import metrics
from app.serving.protocols.routes import (
    TENANT_STATE,
    ErrorShape,
    Route,
    RouteTable,
    plain_error,
    refusal,
    scope_tenant,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

#: Status counted for a request whose client closed the connection before the answer (nginx's code).
CLIENT_CLOSED = 499
#: An over-limit body is read and dropped for at most this long in all (nginx's lingering_time) and
#: this long without data (lingering_timeout), then the 413 is sent and the connection closed.
LINGER_S = 30.0
LINGER_IDLE_S = 5.0

_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_REQUEST_ID = re.compile(r"^[\w.:-]{1,64}$")


class ServiceMiddleware:
    """Request id, API keys, access log, body limits and checks, hang-up cancellation, 503 Retry-After,
    metrics. `keys` None: no keys asked for, every route open."""

    def __init__(self, app: ASGIApp, table: RouteTable, settings: ServerSettings, model_name: str,
                 keys: ApiKeys | None = None) -> None:
        self.app = app
        self.table = table
        self.model_name = model_name
        self.keys = keys
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout = settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        if isinstance(scope.get("state"), dict) and TENANT_STATE in scope["state"]:
            # only this middleware names the tenant (a copy: the server's state dict is not ours to edit)
            scope["state"] = {k: v for k, v in scope["state"].items() if k != TENANT_STATE}
        matched = self.table.match(scope["method"], scope["path"])
        route, params = matched if matched is not None else (None, {})
        protocol = route.protocol if route is not None else None
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
            await self._handle(scope, receive, send_wrapper, status, route, params)
        except Exception:
            status[0] = status[0] or 500  # answered by Starlette's outermost error middleware
            raise
        finally:
            elapsed = time.perf_counter() - started
            tenant = scope_tenant(scope)
            if protocol is not None and status[0]:
                metrics.REQUESTS_TOTAL.labels(code=str(status[0]), protocol=protocol,
                                              tenant=tenant or "").inc()
                metrics.REQUEST_SECONDS.observe(elapsed)
            _log_access(scope, request_id, status[0], elapsed, protocol, tenant)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, status: list[int],
                      route: Route | None, params: dict[str, str]) -> None:
        shape = route.error_shape if route is not None else plain_error
        if route is not None and route.auth and self.keys is not None:
            # First: a caller without a valid key learns nothing of the route's checks, and sends no body
            # that is read (uvicorn drops what is left of it once the answer is complete).
            authorization = _header(scope, b"authorization")
            value = authorization.decode("latin-1") if authorization is not None else None
            tenant = self.keys.authenticate(value)
            if tenant is None:
                message, challenge = refusal(value)
                await _error(send, 401, message, shape=shape, headers={"WWW-Authenticate": challenge})
                return
            # The request's own copy of the state: a server that shares one dict never leaks a tenant.
            scope["state"] = {**(scope.get("state") or {}), TENANT_STATE: tenant.name}
        problem = _query_problem(scope)
        if problem is not None:
            await _error(send, 400, problem, shape=shape)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        json_body = route is not None and route.json_body
        if json_body and not _is_json(scope):
            await _error(send, 415, f"Content-Type {_content_type(scope)!r} is not supported: send "
                                    "application/json", close=True, shape=shape)
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._read_body(scope, receive)
        except TimeoutError:
            await _error(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                         close=True, shape=shape)
            return
        if isinstance(body, _TooLarge):
            # Outside the body timeout: once the answer is 413, the drain has its own bound (LINGER_S), and a
            # client slower than --body_timeout still reads the 413 rather than a 408 and a reset.
            await self._refuse_too_large(receive, send, shape, more=body.more)
            return
        if body is None:
            return  # the client is gone
        if route is not None:
            problem = _json_problem(body) if json_body else None
            own = not route.model_scoped or params.get("model_name") == self.model_name
            if problem is None and route.body_check is not None and own:
                problem = route.body_check(body, _lower_headers(scope))
            if problem is not None:
                await _error(send, 400, problem, shape=shape)
                return
        await self._run_watching_disconnect(scope, body, receive, send, status)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | _TooLarge | None:
        """The body; `_TooLarge` once it is known to be over the limit; None if the client is gone."""
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return _TooLarge(more=True)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            # The declared length can lie (or be absent with chunked encoding): count what arrives.
            if len(body) > self.max_body_bytes:
                del body[:]
                return _TooLarge(more=message.get("more_body", False))
            if not message.get("more_body", False):
                return bytes(body)

    async def _refuse_too_large(
        self, receive: Receive, send: Send, shape: ErrorShape, more: bool = True
    ) -> None:
        # Closing on a client that is still sending makes its kernel answer with a reset, and most clients
        # then report the reset instead of our 413: read and drop what it sends, for a bounded time (not
        # a bounded size, which a client can exceed), then answer and close.
        deadline = time.monotonic() + LINGER_S
        while more:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(min(left, LINGER_IDLE_S)):
                    message = await receive()
            except TimeoutError:
                break
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
        await _error(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes", close=True,
                     shape=shape)

    async def _run_watching_disconnect(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, status: list[int]
    ) -> None:
        """Run the app with the body already read, cancelling it if the client closes the connection.

        Cancelling the handler makes `Service.result` give its work up, so the request's
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


@dataclass(frozen=True)
class _TooLarge:
    """The body is over the limit; `more`: the client is still sending it."""

    more: bool


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_problem(body: bytes) -> str | None:
    """What is wrong with a JSON body, in words that name the place; None if fine."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"body: not valid UTF-8 at byte {exc.start}"
    try:
        json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as exc:
        return f"body: duplicate key {exc.key!r} in one JSON object"
    except json.JSONDecodeError as exc:
        return f"body: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return "body: JSON nested too deeply"
    return None


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


def _log_access(scope: Scope, request_id: str, status: int, elapsed: float, protocol: str | None,
                tenant: str | None) -> None:
    route = getattr(scope.get("route"), "path", None) or "-"
    client = scope.get("client") or ("-", 0)
    level = logging.WARNING if status >= 500 else logging.INFO
    access_log.log(
        level,
        '%s "%s %s" %d %.1f ms id=%s%s%s',
        client[0],
        scope["method"],
        scope["path"],
        status,
        elapsed * 1000,
        request_id,
        f" protocol={protocol}" if protocol else "",
        f" tenant={tenant}" if tenant else "",  # a configured name: never the key
        extra={
            "protocol": protocol,
            "tenant": tenant,
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "path": scope["path"],
            "status": status,
            "duration_ms": round(elapsed * 1000, 1),
            "client": client[0],
        },
    )


async def _error(send: Send, status: int, message: str, *, close: bool = False,
                 shape: ErrorShape = plain_error, headers: dict[str, str] | None = None) -> None:
    """An error answered by the middleware itself, in the body shape of the route's protocol."""
    headers = {**(headers or {}), **({"connection": "close"} if close else {})}
    response = JSONResponse(status_code=status, content=shape(status, message), headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


