"""KServe's FastAPI app, finished: every touch of KServe's internals is here.

`configure_app` installs the route table of every protocol (ahead of KServe's own routes, so that ours
match first), the middleware that reads it, our typed-error handler, the API document, and SIGTERM drain
(KServe and uvicorn only stop once in-flight connections are done). Once KServe has registered its
handlers (at the first ASGI call), ours replace them: KServe's log every client error at ERROR with a
traceback and echo exception text in 500s. `LockedRepository` is KServe's model repository extension
without load and unload.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

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
from starlette.types import ASGIApp

from app.serving.core.errors import GenerationFailed, ServiceError
from app.serving.protocols import jobs, openai, v1, v2_rest
from app.serving.protocols.routes import ProtocolContext, RouteTable, refusal
from app.serving.web import health
from app.serving.web.middleware import ServiceMiddleware
from app.serving.web.openapi import install_openapi

log = logging.getLogger(__name__)


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


def configure_app(app: FastAPI, ctx: ProtocolContext, drain: Callable[[], None]) -> RouteTable:
    """Add our middleware, error handlers, routes, API document and SIGTERM drain to KServe's app.

    Call it before KServe's REST server starts (it finishes the app on the first ASGI call). Returns
    the route table (every route of every protocol, declared once).
    """
    table = build_table(ctx)
    app.add_middleware(ServiceMiddleware, table=table, settings=ctx.settings, model_name=ctx.name,
                       keys=ctx.keys)
    app.add_exception_handler(ServiceError, service_error_handler)
    for route in table:
        if route.handler is not None:
            doc = route.doc
            app.add_api_route(
                route.path, route.handler, methods=[route.method], include_in_schema=doc is not None,
                tags=[doc.tag] if doc is not None else None, summary=doc.summary if doc is not None else None,
            )
    install_openapi(app, table, ctx.service, api_keys=ctx.keys is not None,
                    tenant_queue=ctx.settings.tenant_queue_size > 0)
    _drain_on_signal(app, drain)
    _after_kserve_setup(app, lambda: _replace_kserve_error_handlers(app))
    return table


def build_table(ctx: ProtocolContext) -> RouteTable:
    """Every route, in the order the API document lists them (predict first); health and the routes we
    do not serve are installed ahead of KServe's own, so they match first."""
    return RouteTable([
        *v1.routes(ctx), *jobs.routes(ctx), *v2_rest.routes(ctx), *openai.routes(ctx),
        *health.routes(ctx.service),
    ])


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Our typed errors in the v1 shape (`{"error"}`; a 500 adds `"ok": false`), with Retry-After (503,
    429) and a 401's `WWW-Authenticate` challenge (a key removed from --api_keys while the request ran)."""
    assert isinstance(exc, ServiceError)  # registered for ServiceError only
    body: dict[str, Any] = {"error": exc.message}
    if isinstance(exc, GenerationFailed):
        body = {"ok": False, **body}
    headers: dict[str, str] = {}
    retry = exc.retry_after()
    if retry is not None:
        headers["Retry-After"] = str(retry)
    if exc.status == 401:
        headers["WWW-Authenticate"] = refusal(request.headers.get("authorization"))[1]
    return JSONResponse(status_code=exc.status, content=body, headers=headers or None)


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
