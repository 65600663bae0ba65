"""The jobs routes (SPEC section 7): submit, get, list, cancel, and each job's server-sent event stream.

Wire form only: `Jobs` (app/serving/core/jobs.py) does the work; here a JSON body becomes a submission,
a `JobRecord` becomes its JSON view, and typed `JobEvent`s become SSE bytes (`encode_event`, which `Jobs`
calls once per event: every subscriber sends the same bytes object). Every route needs an API key when the
server has them (SPEC section 12), and acts as the key's tenant: a tenant submits, lists, follows and
cancels only its own jobs (another's id is a 404, as an unknown one).

What a slow or idle client costs is bounded by bytes: an event goes out in slices of at most
`CHUNK_BYTES` (memoryviews of the shared bytes), so the server's flow control (it waits for the socket
to drain before it writes the next message) leaves about one slice and the transport's buffer unread per
client; a send that cannot complete within `--send_timeout` drops the client (its socket aborted, since
closing waits for a peer that never reads) and counts it in `kandinsky_event_subscribers_dropped_total`.
A kept result is sent the same way by `GET .../jobs/{id}`, spliced from the final event's bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from app.serving.core.errors import RequestInvalid
from app.serving.core.types import (
    JobEvent,
    JobEventName,
    JobRecord,
    JobStatus,
    Preview,
    RequestResult,
    StepProgress,
)
from app.serving.observability import metrics
from app.serving.protocols import v1
from app.serving.protocols.routes import PREDICT_BODY, Operation, ProtocolContext, Route

log = logging.getLogger(__name__)

JOBS_PATH = "/v1/models/{model_name}/jobs"
JOB_PATH = JOBS_PATH + "/{job_id}"
EVENTS_PATH = JOB_PATH + "/events"
EVENT_STREAM = "text/event-stream"
IDEMPOTENCY_HEADER = "idempotency-key"
PROTOCOL = "jobs"
#: The most bytes one ASGI message of a stream or a result carries.
CHUNK_BYTES = 64 << 10
KEEP_ALIVE = b": keep-alive\r\n\r\n"
_EVENT_END = b"\r\n\r\n"
#: Listing pages: jobs per page by default and at most.
LIST_LIMIT, LIST_LIMIT_MAX = 50, 500
_CURSOR_PREFIX = "jobs:"
#: Clients dropped for --send_timeout are logged at most this often (seconds), with a count.
DROP_LOG_EVERY_S = 10.0


class JobProgressView(BaseModel):
    step: int = Field(description="Image positions sampled so far (per image).")
    steps: int = Field(description="Image positions per image (1024 for Kandinsky).")
    fraction: float = Field(description="step / steps, 0..1.")


class JobView(BaseModel):
    """A job as `GET .../jobs/{id}` shows it; `result` is exactly the predict response once succeeded,
    while the result is kept (`result_expired` once it is not)."""

    id: str
    status: JobStatus
    created: float = Field(description="Unix time of submission.")
    started: float | None = Field(description="Unix time its batch started.")
    finished: float | None = Field(description="Unix time it ended (succeeded, failed or cancelled).")
    queue_position: int | None = Field(
        description="Requests ahead of it in the queue (0: next); null once running."
    )
    progress: JobProgressView
    result: dict[str, Any] | None = Field(
        description="The predict response, once succeeded and while kept (null in listings, status events, "
                    "and once `result_expired`)."
    )
    error: str | None
    result_expired: bool = Field(
        False,
        description="The job succeeded but its result is no longer kept: the server keeps results up to "
                    "`--max_job_bytes` in all and drops the oldest first; the record stays.",
    )
    worker: str | None = Field(
        None, description="The replica (`--replica_name`) whose worker runs or ran it; null while queued."
    )


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    created: float = Field(description="Unix time of submission.")


class JobList(BaseModel):
    jobs: list[JobView] = Field(description="The most recent jobs, newest first, without results.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class JobPreview(BaseModel):
    """The data of a `preview` event."""

    step: int = Field(description="Image positions sampled so far (per image).")
    instance: int = Field(description="The instance (index in `instances`) these images belong to.")
    images: list[str] = Field(
        description="Base64 JPEG 256x256 of each partial image, the rows not yet sampled grey."
    )


class JobFailure(BaseModel):
    """The data of a `failed` event."""

    error: str


#: A `succeeded` event's data: the predict response; for a late subscriber once the result expired, the
#: job's view (its `result` null and `result_expired` true).
SUCCEEDED_DATA: dict[str, Any] = {"oneOf": [
    {"$ref": "#/components/schemas/Prediction"},
    {"$ref": "#/components/schemas/MultiPrediction"},
    {"$ref": "#/components/schemas/JobView"},
]}

#: A job's events (SPEC section 7) and their data, as `encode_event` sends them: `status` first (the job
#: without its result), then `progress` and `preview`, then exactly one final event.
JOB_EVENTS: dict[str, Any] = {
    "status": JobView,
    "progress": JobProgressView,
    "preview": JobPreview,
    "succeeded": SUCCEEDED_DATA,
    "failed": JobFailure,
    "cancelled": JobView,
}
JOB_FINAL_EVENTS = ("succeeded", "failed", "cancelled")


def view(record: JobRecord) -> dict[str, Any]:
    """A job's JSON view (`JobView`) without its result; `queue_position` as the record carries it (take
    a `Jobs.snapshot`)."""
    fraction = record.step / record.steps if record.steps else 0.0
    return {
        "id": record.id,
        "status": record.status.value,
        "created": record.created,
        "started": record.started,
        "finished": record.finished,
        "queue_position": record.queue_position,
        "progress": {"step": record.step, "steps": record.steps, "fraction": round(fraction, 4)},
        "result": None,
        "error": record.error,
        "result_expired": record.result_expired,
        "worker": record.worker,
    }


def event_data(event: JobEvent) -> Any:
    """A typed job event's data as the stream sends it (one JSON value)."""
    data = event.data
    if isinstance(data, JobRecord):
        return view(data)
    if isinstance(data, RequestResult):
        return v1.response(data)
    if isinstance(data, StepProgress):
        return {"step": data.step, "steps": data.steps, "fraction": round(data.step / data.steps, 4)}
    if isinstance(data, Preview):
        return {"step": data.step, "instance": data.instance, "images": data.images}
    if isinstance(data, str):  # failed: the error
        return {"error": data}
    return data


def encode_data(event: JobEvent) -> bytes:
    """An event's data as the stream sends it: one line of ASCII JSON (what a shared store keeps)."""
    if event.raw is not None:
        return event.raw
    return json.dumps(event_data(event), separators=(",", ":")).encode("ascii")  # no line breaks


def encode_event(event: JobEvent) -> bytes:
    """An event as the stream sends it: `event: NAME`, `id: ID` when it has one (a shared store's, for
    `Last-Event-ID`), `data: <one line of JSON>`, a blank line. `Jobs` calls it once per event (its
    `EventEncoder`)."""
    return b"".join((_event_head(event.name, event.event_id), encode_data(event), _EVENT_END))


def _event_head(name: JobEventName, event_id: str | None = None) -> bytes:
    if event_id is not None:
        return f"event: {name.value}\r\nid: {event_id}\r\ndata: ".encode()
    return f"event: {name.value}\r\ndata: ".encode()


def _slices(data: bytes | memoryview) -> list[memoryview]:
    view_ = memoryview(data)
    return [view_[at:at + CHUNK_BYTES] for at in range(0, len(view_), CHUNK_BYTES)]


# ---- sending under a time limit -------------------------------------------------------------------------


def drop_connection(send: Send) -> None:
    """Reset the connection behind an ASGI `send`: closing would wait for a peer that never reads, and
    even an aborted socket lingers in the kernel while it has unsent data, so linger 0 (an RST) first."""
    transport = connection_transport(send)
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        log.warning("could not reach the connection to abort it; the server closes it instead")


def connection_transport(send: Any) -> asyncio.WriteTransport | None:
    """The transport of the connection an ASGI `send` writes to, or None if it cannot be found.

    ASGI has no message that aborts a connection. uvicorn's `send` is a bound method of its
    request-response cycle, which holds the connection's transport; every middleware wraps it in a
    closure (or a partial) over the `send` it was given, so the walk follows those closures down.
    """
    todo: list[Any] = [send]
    seen: set[int] = set()
    while todo and len(seen) < 64:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        transport = getattr(getattr(fn, "__self__", None), "transport", None)
        if isinstance(transport, asyncio.WriteTransport):
            return transport
        inner = getattr(fn, "func", None)  # functools.partial
        if callable(inner):
            todo.append(inner)
        for cell in getattr(fn, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if callable(cell.cell_contents):
                    todo.append(cell.cell_contents)
    return None


class _DropLog:
    """Dropped clients are logged at most every DROP_LOG_EVERY_S seconds, with a count (many idle
    clients are one line, not one each)."""

    def __init__(self) -> None:
        self.unlogged = 0
        self.logged_at = float("-inf")

    def report(self, what: str, send_timeout: float) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if now - self.logged_at >= DROP_LOG_EVERY_S:
            log.warning("%s: %d client(s) read nothing for %g s; disconnected", what, self.unlogged,
                        send_timeout)
            self.unlogged, self.logged_at = 0, now


_DROPS = _DropLog()


class JobEventStream(EventSourceResponse):
    """A job's event stream: the events' shared bytes in slices, `: keep-alive` comments between events
    (written by the stream itself, so that no comment lands inside a sliced event: sse-starlette's own
    ping is off), and a client whose send makes no progress for `send_timeout` seconds dropped."""

    def __init__(self, chunks: AsyncIterator[bytes | memoryview], send_timeout: float) -> None:
        super().__init__(chunks, ping=0, send_timeout=send_timeout,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            metrics.EVENT_SUBSCRIBERS_DROPPED.inc()
            _DROPS.report("event stream", self.send_timeout or 0.0)
            drop_connection(send)
            await asyncio.sleep(0)  # the server hears of the lost connection before the app returns


async def stream_chunks(events: AsyncGenerator[JobEvent | None, None]) -> AsyncIterator[bytes | memoryview]:
    """Job events (None: idle, a keep-alive is due) -> what the stream writes, each at most CHUNK_BYTES."""
    async with contextlib.aclosing(events):
        async for event in events:
            if event is None:
                yield KEEP_ALIVE
                continue
            for piece in _slices(event.encoded(encode_event)):
                yield piece


class PiecesResponse(Response):
    """A JSON body sent as it is held (shared bytes included) in slices of at most CHUNK_BYTES; a client
    whose send makes no progress for `send_timeout` seconds is dropped."""

    media_type = "application/json"

    def __init__(self, pieces: Sequence[bytes | memoryview], send_timeout: float) -> None:
        super().__init__(None, headers={"Content-Length": str(sum(len(p) for p in pieces))})
        self.pieces, self.send_timeout = pieces, send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        slices = [s for piece in self.pieces for s in _slices(piece)]
        try:
            for n, piece in enumerate(slices):
                async with asyncio.timeout(self.send_timeout):
                    await send({"type": "http.response.body", "body": bytes(piece),
                                "more_body": n < len(slices) - 1})
        except TimeoutError:
            _DROPS.report("job result", self.send_timeout)
            drop_connection(send)
            await asyncio.sleep(0)


def job_response(record: JobRecord, send_timeout: float) -> Response:
    """`GET .../jobs/{id}`: the view, with the result spliced in from the final event's bytes."""
    body = view(record)
    final = record.final
    if not record.holds_result or final is None or (final.wire is None and final.raw is None):
        return JSONResponse(body)
    del body["result"]
    head = json.dumps(body, separators=(",", ":"))[:-1] + ',"result":'
    if final.raw is not None:
        result = memoryview(final.raw)
    else:
        assert final.wire is not None
        start = len(_event_head(final.name, final.event_id))
        result = memoryview(final.wire)[start:len(final.wire) - len(_EVENT_END)]
    return PiecesResponse([head.encode(), result, b"}"], send_timeout)


# ---- listing pages --------------------------------------------------------------------------------------


def parse_limit(values: list[str]) -> int:
    """`limit`: jobs per page, 1..LIST_LIMIT_MAX (LIST_LIMIT when absent); anything else a 400."""
    if not values:
        return LIST_LIMIT
    allowed = f"an integer from 1 to {LIST_LIMIT_MAX}"
    if len(values) > 1:
        raise RequestInvalid(f"limit: give it once, must be {allowed}")
    text = values[0]
    if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= LIST_LIMIT_MAX:
        raise RequestInvalid(f"limit: must be {allowed}, got {_quoted(text)}")
    return int(text)


def parse_cursor(values: list[str]) -> int | None:
    """`cursor`: the `next_cursor` of a previous page (opaque to clients); anything else a 400."""
    if not values:
        return None
    problem = "cursor: not a cursor this server gave; pass `next_cursor` of the previous page"
    if len(values) > 1 or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", values[0]):
        raise RequestInvalid(problem)
    try:
        text = base64.urlsafe_b64decode(values[0] + "=" * (-len(values[0]) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise RequestInvalid(problem) from None
    seq = text.removeprefix(_CURSOR_PREFIX)
    if not text.startswith(_CURSOR_PREFIX) or not re.fullmatch(r"[1-9][0-9]{0,17}", seq):
        raise RequestInvalid(problem)
    return int(seq)


def make_cursor(record: JobRecord) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{record.seq}".encode()).decode().rstrip("=")


def _quoted(text: str) -> str:
    shown = text if len(text) <= 20 else text[:20] + "..."
    return json.dumps(shown)


def event_stream(events: AsyncIterator[ServerSentEvent], keepalive: float) -> EventSourceResponse:
    """An SSE response with `: keep-alive` comments every `keepalive` seconds (OpenAI's streams; job
    streams are `JobEventStream`s)."""
    return EventSourceResponse(
        events,
        ping=keepalive,
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive"),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _wants_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


def routes(ctx: ProtocolContext) -> list[Route]:
    jobs = ctx.jobs
    keepalive, send_timeout = ctx.settings.keepalive, ctx.settings.send_timeout

    def stream(record: JobRecord, *, owner: bool, after: str | None = None) -> JobEventStream:
        events = jobs.events(record, owner=owner, idle=keepalive, after=after)
        return JobEventStream(stream_chunks(events), send_timeout)

    async def submit(model_name: str, request: Request) -> Response:
        tenant = ctx.tenant(request)
        ctx.check_model(model_name)
        try:
            payload = json.loads(await request.body())
        except ValueError:
            raise RequestInvalid("body: not valid JSON") from None
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not 1 <= len(key) <= 255:
            raise RequestInvalid("Idempotency-Key: must be 1..255 characters")
        record, new = await jobs.submit(payload, key, tenant)
        if new:
            metrics.JOBS_SUBMITTED_TOTAL.labels(tenant=tenant or "").inc()
        if _wants_stream(request):
            return stream(record, owner=new)
        location = f"/v1/models/{ctx.name}/jobs/{record.id}"
        body = view(await jobs.snapshot(record)) if not new else {
            "id": record.id, "status": record.status.value, "created": record.created}
        return JSONResponse(body, status_code=202 if new else 200, headers={"Location": location})

    async def get_job(model_name: str, job_id: str, request: Request) -> Response:
        tenant = ctx.tenant(request)
        ctx.check_model(model_name)
        return job_response(await jobs.snapshot(await jobs.get(job_id, tenant)), send_timeout)

    async def list_jobs(model_name: str, request: Request) -> dict[str, Any]:
        tenant = ctx.tenant(request)
        ctx.check_model(model_name)
        limit = parse_limit(request.query_params.getlist("limit"))
        before = parse_cursor(request.query_params.getlist("cursor"))
        page = await jobs.recent(limit + 1, tenant, before)
        more, page = len(page) > limit, page[:limit]
        return {"jobs": [view(await jobs.snapshot(r)) for r in page],
                "next_cursor": make_cursor(page[-1]) if more else None}

    async def cancel_job(model_name: str, job_id: str, request: Request) -> dict[str, Any]:
        tenant = ctx.tenant(request)
        ctx.check_model(model_name)
        record = await jobs.get(job_id, tenant)
        await jobs.cancel(record)
        return view(await jobs.snapshot(record))

    async def job_events(model_name: str, job_id: str, request: Request) -> JobEventStream:
        tenant = ctx.tenant(request)
        ctx.check_model(model_name)
        record = await jobs.get(job_id, tenant)
        return stream(record, owner=False, after=request.headers.get("last-event-id"))

    stream_doc = (
        "Queues a predict body as a job and answers at once: 202 with `Location`. With "
        "`Accept: text/event-stream`, the job's event stream on this connection instead (200); the "
        "job is cancelled if that connection closes first. `Idempotency-Key`: the same key with the "
        "same body returns the existing job (200), with another body 409. " + _STREAM_TEXT
    )
    not_found = "Unknown model, or unknown or expired job id."
    return [
        Route("POST", JOBS_PATH, handler=submit, protocol=PROTOCOL, auth=True, json_body=True,
              body_check=v1.schema_check(ctx.service), model_scoped=False, doc=Operation(
                  "Submit a job",
                  "Jobs",
                  JobCreated,
                  (400, 404, 408, 409, 413, 415, 503),
                  description=stream_doc,
                  ok_status=202,
                  ok_description="Queued: `{id, status, created}`.",
                  ok_headers={"Location": "The job's URL."},
                  request=PREDICT_BODY,
                  other_ok={200: ("The job's event stream (`Accept: text/event-stream`), or the existing job "
                                  "of this Idempotency-Key (without its result).", JobView)},
                  error_descriptions={409: "The Idempotency-Key was used with another body."},
                  stream_events=JOB_EVENTS,
                  stream_status=200,
                  stream_final=JOB_FINAL_EVENTS,
              )),
        Route("GET", JOBS_PATH, handler=list_jobs, auth=True, doc=Operation(
            "List jobs", "Jobs", JobList, (400, 404),
            description="The most recent jobs, newest first, without their results, a page at a time: "
                        "`next_cursor` (null on the last page) passed as `cursor` gives the next, older "
                        "page.",
            query=LIST_QUERY,
            error_descriptions={400: "`limit` or `cursor` is invalid (the error names which)."},
        )),
        Route("GET", JOB_PATH, handler=get_job, auth=True, doc=Operation(
            "Get a job", "Jobs", JobView, (404,),
            description="`result` is exactly the predict response once `status` is `succeeded`, while the "
                        "server keeps it: results are kept up to `--max_job_bytes` in all (the oldest "
                        "dropped first) and `--job_ttl` seconds; a dropped one reads `result: null`, "
                        "`result_expired: true`.",
            error_descriptions={404: not_found},
        )),
        Route("DELETE", JOB_PATH, handler=cancel_job, auth=True, doc=Operation(
            "Cancel a job", "Jobs", JobView, (404, 409),
            description="A queued job never runs; a running one stops at its next progress tick while the "
                        "other requests of its batch go on.",
            error_descriptions={404: not_found, 409: "The job had already finished."},
        )),
        Route("GET", EVENTS_PATH, handler=job_events, auth=True, doc=Operation(
            "Follow a job's events", "Jobs", None, (404,),
            description=_STREAM_TEXT + " A finished job's stream sends its final event and closes.",
            ok_description="The job's events.",
            error_descriptions={404: not_found},
            stream_events=JOB_EVENTS,
            stream_final=JOB_FINAL_EVENTS,
        )),
    ]


_STREAM_TEXT = (
    "Events (`event:` name, `data:` one JSON line): `status` first (the job without its result), "
    "`progress` `{step, steps, fraction}` as image rows complete, `preview` `{step, instance, images}` "
    "when `preview_every` > 0 (base64 JPEG 256x256 per image, rows not yet sampled grey), then exactly "
    "one final event: `succeeded` (data: the predict response; for a late subscriber once the result "
    "expired, the job's view with `result_expired: true`), `failed` (`{error}`) or `cancelled`. "
    "A `: keep-alive` comment at least every 15 s (`--keepalive`). A slow reader may miss older progress "
    "and previews (it gets the newest), never the final event; a client that reads nothing for "
    "`--send_timeout` seconds is disconnected. With `--redis_url` (jobs shared by the replicas) every "
    "event but the first `status` carries an `id:`; reconnecting to `/events` on any replica with "
    "`Last-Event-ID` resumes with the events after it."
)

#: The listing's query parameters (documented in the API document).
LIST_QUERY: dict[str, tuple[dict[str, Any], str]] = {
    "limit": ({"type": "integer", "minimum": 1, "maximum": LIST_LIMIT_MAX, "default": LIST_LIMIT},
              f"Jobs per page, 1 to {LIST_LIMIT_MAX} (default {LIST_LIMIT})."),
    "cursor": ({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
               "Opaque: the `next_cursor` of the previous page."),
}

