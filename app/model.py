"""The KServe model: `load()` brings up the pipeline and the scheduler, `predict()` validates and awaits.

`configure_app()` adds what KServe's own app lacks to the FastAPI app KServe serves: the body-size limit,
per-request metrics, `Retry-After` on every 503, our typed-error handlers, the model card route, the
Swagger UI, the predict request schema in the OpenAPI document, and stopping intake as soon as SIGTERM
arrives (KServe and uvicorn only stop once in-flight connections are done).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import kserve
import orjson
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from kserve.errors import ModelNotFound, ModelNotReady
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.card import CARD_PATH, build_card
from app.errors import (
    RETRY_AFTER_S,
    GenerationFailed,
    RequestInvalid,
    ServiceError,
    ShuttingDown,
    install_exception_handlers,
)
from app.scheduler import Scheduler
from app.schema import CATALOG_EXAMPLE, TIMING_KEYS, Limits, Prediction, Schema, Timings, build_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Everything `python -m app` adds to KServe's flags."""

    model_dir: str = "/mnt/models"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_images: int = 0  # 0: derived from free memory by the placement planner
    max_images_per_request: int = 16
    queue_size: int = 32
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20


class KandinskyModel(kserve.Model):
    """ruDALL-E Kandinsky behind the KServe v1 predict protocol."""

    def __init__(self, name: str, settings: ServerSettings | None = None) -> None:
        super().__init__(name)
        self.settings = settings or ServerSettings()
        self.pipeline: Any = None
        self.scheduler: Scheduler | None = None
        self.schema: Schema | None = None
        self.draining = False

    def load(self) -> bool:
        """Load every component, start the GPU worker, and only then report ready."""
        from app.pipeline import Pipeline  # torch and the networks load here, not at import

        s = self.settings
        self.pipeline = Pipeline.load(
            s.model_dir, device=s.device, dtype=s.dtype, max_batch_images=s.max_batch_images or None
        )
        self.attach(self.pipeline)
        return self.ready

    def attach(self, pipeline: Any) -> None:
        """Serve an already loaded pipeline (load() calls this; tests reuse one pipeline across apps)."""
        s = self.settings
        self.pipeline = pipeline
        self.schema = build_schema(Limits(s.max_images_per_request, int(pipeline.image_vocab_size)))
        self.scheduler = Scheduler(
            pipeline, queue_size=s.queue_size, max_batch_images=pipeline.max_batch_images
        )
        self.scheduler.start()
        self.ready = True
        log.info(
            "model %s ready: batch limit %d images, queue %d requests, deadline %.0f s",
            self.name,
            self.scheduler.max_batch_images,
            s.queue_size,
            s.request_timeout,
        )

    def start(self) -> None:
        # KServe's default start() marks every model ready; ours is ready only once load() succeeded.
        self.ready = self.scheduler is not None and not self.draining

    def begin_drain(self) -> None:
        """Stop intake (readiness and new predicts answer 503); queued and running work goes on."""
        if not self.draining:
            log.info("model %s: draining, no new requests accepted", self.name)
        self.draining = True
        self.ready = False
        if self.scheduler is not None:
            self.scheduler.begin_drain()

    def stop(self) -> None:
        """KServe calls this on shutdown: finish or answer what is queued, then stop the worker."""
        self.begin_drain()
        if self.scheduler is not None:
            # A running batch legitimately takes up to the request deadline; a thread left inside torch
            # at interpreter exit can abort the process instead of exiting 0.
            self.scheduler.stop(timeout=self.settings.request_timeout)
        super().stop()

    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Validate the instances, queue them as one ticket, and answer every instance in order."""
        from app.pipeline import GenerationParams, Job

        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.scheduler is None or self.schema is None:
            raise ModelNotReady(self.name)
        instances = self.schema.parse(payload)
        try:
            jobs = [Job(inst.query, GenerationParams(**inst.params.model_dump())) for inst in instances]
            outcome = await self.scheduler.submit(jobs, timeout=self.settings.request_timeout)
            predictions = [_prediction(result, outcome.queue_seconds) for result in outcome.results]
        except ServiceError:
            raise
        except Exception as exc:
            # KServe's catch-all would put the exception text (which may quote the input) in the body.
            log.exception("predict failed outside the pipeline")
            raise GenerationFailed(f"internal error ({type(exc).__name__}); retry the request") from None
        if len(predictions) == 1:
            return predictions[0]
        return {"ok": True, "predictions": predictions}

    def card(self) -> dict[str, Any]:
        if self.pipeline is None or self.schema is None:
            raise ModelNotReady(self.name)
        manifest = self.pipeline.manifest
        return build_card(self.name, dict(manifest.extra), self.pipeline.describe(), self.schema)


def _prediction(result: Any, queue_seconds: float) -> dict[str, Any]:
    timings = {key: float(result.timings.get(key, 0.0)) for key in TIMING_KEYS if key != "queue"}
    return Prediction(
        images=result.images,
        clip_scores=[float(s) for s in result.clip_scores],
        seed=result.seed,
        ppl=[float(p) for p in result.ppl],
        timings=Timings(queue=round(queue_seconds, 4), **timings),
    ).model_dump()


# ---- the HTTP app ---------------------------------------------------------------------------------


class ServiceMiddleware:
    """Body-size limit (413), `Retry-After` on 503, and predict request metrics, as plain ASGI."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, explain_body: Callable[[bytes], str | None] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # For predict bodies KServe's strict JSON parser rejects without naming a field (NaN, Infinity,
        # 1e999, integers beyond 64 bits): the message that names the field, if one can be given.
        self.explain_body = explain_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_predict = scope["path"].endswith(":predict")
        started = time.perf_counter()
        status = [0]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if message["status"] == 503:
                    headers = list(message.get("headers", []))
                    if not any(k.lower() == b"retry-after" for k, _ in headers):
                        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_limited(scope, receive)
                if body is None:
                    await self._too_large(send_wrapper)
                    return
                problem = self.explain_body(body) if is_predict and self.explain_body else None
                if problem is not None:
                    await _error(send_wrapper, 400, problem)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        except Exception:
            status[0] = status[0] or 500  # answered by Starlette's outermost error middleware
            raise
        finally:
            if is_predict and status[0]:
                metrics.REQUESTS_TOTAL.labels(code=str(status[0])).inc()
                metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)

    async def _read_limited(self, scope: Scope, receive: Receive) -> bytes | None:
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return None
                except ValueError:
                    pass  # a malformed length is the server's (uvicorn's) concern
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body += message.get("body", b"")
            # The declared length can lie (or be absent with chunked encoding): count what arrives.
            if len(body) > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return bytes(body)

    async def _too_large(self, send: Send) -> None:
        await _error(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")


async def _error(send: Send, status: int, message: str) -> None:
    response = JSONResponse(status_code=status, content={"error": message})
    await response({"type": "http"}, _no_receive, send)


def explain_non_strict_json(model: KandinskyModel, body: bytes) -> str | None:
    """The schema's field-naming message for a body only a lenient JSON parser reads, else None.

    KServe parses bodies with orjson, which refuses NaN, Infinity and numbers it cannot hold and says
    only where in the text; Python's parser reads them, and the schema then names the field and range.
    """
    try:
        orjson.loads(body)
        return None  # KServe reads it: the normal path validates it
    except orjson.JSONDecodeError:
        pass
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON at all: KServe's own 400 says so
    if model.schema is None:
        return None
    try:
        model.schema.parse(payload)
    except RequestInvalid as exc:
        return exc.message
    return None


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def configure_app(app: FastAPI, model: KandinskyModel) -> None:
    """Add our middleware, error handlers, card and docs routes, and the SIGTERM drain to KServe's app.

    Call it before KServe's REST server starts: it builds the middleware stack on the first request.
    """
    app.add_middleware(
        ServiceMiddleware,
        max_body_bytes=model.settings.max_body_bytes,
        explain_body=lambda body: explain_non_strict_json(model, body),
    )
    install_exception_handlers(app)

    async def model_card(model_name: str) -> dict[str, Any]:
        if model_name != model.name:
            raise ModelNotFound(model_name)
        return model.card()

    app.add_api_route(CARD_PATH, model_card, methods=["GET"], tags=["Catalog"], summary="Model card")
    if not any(getattr(r, "path", None) == "/docs" for r in app.routes):

        async def swagger_ui() -> HTMLResponse:
            url = app.openapi_url or "/openapi.json"
            return get_swagger_ui_html(openapi_url=url, title=f"{model.name} API")

        app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    _document_predict(app, model)
    _drain_on_signal(app, model.begin_drain)


def _document_predict(app: FastAPI, model: KandinskyModel) -> None:
    """Show the predict body schema in /openapi.json (KServe's handler reads the raw request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=f"{model.name} (KServe v1)", version=app.version, routes=app.routes)
        if model.schema is not None:
            body = model.schema.request.model_json_schema(ref_template="#/components/schemas/{model}")
            defs = body.pop("$defs", {})
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            for path, item in doc.get("paths", {}).items():
                if path.endswith(":predict") and "post" in item:
                    item["post"]["requestBody"] = {
                        "required": True,
                        "content": {"application/json": {"schema": body, "example": CATALOG_EXAMPLE}},
                    }
            app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


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


# The catalog's first client code imports the model under its KFServing-era name.
KFServingKandinskyModel = KandinskyModel
