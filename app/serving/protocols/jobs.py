"""The jobs routes (SPEC section 7): submit, get, list, cancel, and each job's server-sent event stream.

Wire form only: `Jobs` (app/serving/core/jobs.py) does the work; here a JSON body becomes a submission,
a `JobRecord` becomes its JSON view, and typed `JobEvent`s become SSE events (via sse-starlette).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.serving.core.errors import RequestInvalid
from app.serving.core.jobs import Jobs
from app.serving.core.types import JobEvent, JobRecord, JobStatus, Preview, RequestResult, StepProgress
from app.serving.protocols import v1
from app.serving.protocols.routes import PREDICT_BODY, PREDICTION, Operation, ProtocolContext, Route

JOBS_PATH = "/v1/models/{model_name}/jobs"
JOB_PATH = JOBS_PATH + "/{job_id}"
EVENTS_PATH = JOB_PATH + "/events"
EVENT_STREAM = "text/event-stream"
IDEMPOTENCY_HEADER = "idempotency-key"
PROTOCOL = "jobs"


class JobProgressView(BaseModel):
    step: int = Field(description="Image positions sampled so far (per image).")
    steps: int = Field(description="Image positions per image (1024 for Kandinsky).")
    fraction: float = Field(description="step / steps, 0..1.")


class JobView(BaseModel):
    """A job as `GET .../jobs/{id}` shows it; `result` is exactly the predict response once succeeded."""

    id: str
    status: JobStatus
    created: float = Field(description="Unix time of submission.")
    started: float | None = Field(description="Unix time its batch started.")
    finished: float | None = Field(description="Unix time it ended (succeeded, failed or cancelled).")
    queue_position: int | None = Field(
        description="Requests ahead of it in the queue (0: next); null once running."
    )
    progress: JobProgressView
    result: dict[str, Any] | None = Field(description="The predict response, once succeeded.")
    error: str | None


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    created: float = Field(description="Unix time of submission.")


class JobList(BaseModel):
    jobs: list[JobView] = Field(description="The most recent jobs, newest first, without results.")


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


#: A job's events (SPEC section 7) and their data, as `event_data` sends them: `status` first (the job
#: without its result), then `progress` and `preview`, then exactly one final event.
JOB_EVENTS: dict[str, Any] = {
    "status": JobView,
    "progress": JobProgressView,
    "preview": JobPreview,
    "succeeded": PREDICTION,
    "failed": JobFailure,
    "cancelled": JobView,
}
JOB_FINAL_EVENTS = ("succeeded", "failed", "cancelled")




def view(jobs: Jobs, record: JobRecord, *, with_result: bool = True) -> dict[str, Any]:
    """A job's JSON view (`JobView`)."""
    fraction = record.step / record.steps if record.steps else 0.0
    result = v1.response(record.result) if with_result and record.result is not None else None
    return {
        "id": record.id,
        "status": record.status.value,
        "created": record.created,
        "started": record.started,
        "finished": record.finished,
        "queue_position": jobs.position(record),
        "progress": {"step": record.step, "steps": record.steps, "fraction": round(fraction, 4)},
        "result": result,
        "error": record.error,
    }


def event_data(jobs: Jobs, event: JobEvent) -> Any:
    """A typed job event's data as the stream sends it (one JSON value)."""
    data = event.data
    if isinstance(data, JobRecord):
        return view(jobs, data, with_result=False)
    if isinstance(data, RequestResult):
        return v1.response(data)
    if isinstance(data, StepProgress):
        return {"step": data.step, "steps": data.steps, "fraction": round(data.step / data.steps, 4)}
    if isinstance(data, Preview):
        return {"step": data.step, "instance": data.instance, "images": data.images}
    if isinstance(data, str):  # failed: the error
        return {"error": data}
    return data


def sse(jobs: Jobs, events: AsyncIterator[JobEvent]) -> AsyncIterator[ServerSentEvent]:
    async def encoded() -> AsyncIterator[ServerSentEvent]:
        async for event in events:
            data = json.dumps(event_data(jobs, event), separators=(",", ":"))
            yield ServerSentEvent(data=data, event=event.name.value)

    return encoded()


def event_stream(events: AsyncIterator[ServerSentEvent], keepalive: float) -> EventSourceResponse:
    """An SSE response with `: keep-alive` comments every `keepalive` seconds (also OpenAI's streams)."""
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
    keepalive = ctx.settings.keepalive

    def stream(record: JobRecord, *, owner: bool) -> EventSourceResponse:
        return event_stream(sse(jobs, jobs.events(record, owner=owner)), keepalive)

    async def submit(model_name: str, request: Request) -> Response:
        ctx.check_model(model_name)
        try:
            payload = json.loads(await request.body())
        except ValueError:
            raise RequestInvalid("body: not valid JSON") from None
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not 1 <= len(key) <= 255:
            raise RequestInvalid("Idempotency-Key: must be 1..255 characters")
        record, new = jobs.submit(payload, key)
        if _wants_stream(request):
            return stream(record, owner=new)
        location = f"/v1/models/{ctx.name}/jobs/{record.id}"
        body = view(jobs, record, with_result=False) if not new else {
            "id": record.id, "status": record.status.value, "created": record.created}
        return JSONResponse(body, status_code=202 if new else 200, headers={"Location": location})

    async def get_job(model_name: str, job_id: str) -> dict[str, Any]:
        ctx.check_model(model_name)
        return view(jobs, jobs.get(job_id))

    async def list_jobs(model_name: str) -> dict[str, Any]:
        ctx.check_model(model_name)
        return {"jobs": [view(jobs, r, with_result=False) for r in jobs.recent()]}

    async def cancel_job(model_name: str, job_id: str) -> dict[str, Any]:
        ctx.check_model(model_name)
        record = jobs.get(job_id)
        jobs.cancel(record)
        return view(jobs, record, with_result=False)

    async def job_events(model_name: str, job_id: str) -> EventSourceResponse:
        ctx.check_model(model_name)
        return stream(jobs.get(job_id), owner=False)
    stream_doc = (
        "Queues a predict body as a job and answers at once: 202 with `Location`. With "
        "`Accept: text/event-stream`, the job's event stream on this connection instead (200); the "
        "job is cancelled if that connection closes first. `Idempotency-Key`: the same key with the "
        "same body returns the existing job (200), with another body 409. " + _STREAM_TEXT
    )
    not_found = "Unknown model, or unknown or expired job id."
    return [
        Route("POST", JOBS_PATH, handler=submit, protocol=PROTOCOL, json_body=True,
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
        Route("GET", JOBS_PATH, handler=list_jobs, doc=Operation("List jobs", "Jobs", JobList, (404,))),
        Route("GET", JOB_PATH, handler=get_job, doc=Operation(
            "Get a job", "Jobs", JobView, (404,),
            description="`result` is exactly the predict response once `status` is `succeeded`.",
            error_descriptions={404: not_found},
        )),
        Route("DELETE", JOB_PATH, handler=cancel_job, doc=Operation(
            "Cancel a job", "Jobs", JobView, (404, 409),
            description="A queued job never runs; a running one stops at its next progress tick while the "
                        "other requests of its batch go on.",
            error_descriptions={404: not_found, 409: "The job had already finished."},
        )),
        Route("GET", EVENTS_PATH, handler=job_events, doc=Operation(
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
    "one final event: `succeeded` (data: the predict response), `failed` (`{error}`) or `cancelled`. "
    "A `: keep-alive` comment at least every 15 s."
)

