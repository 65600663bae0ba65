"""Long generations as jobs (SPEC section 7): submit, poll, list, cancel, and a server-sent event stream.

A job is a predict request that answers at once: `POST /v1/models/{name}/jobs` queues its instances as
one scheduler ticket (the same queue, batching, seeds and deadline as predict) and returns 202 with the
job's id; the ticket's listener turns the worker's ticks into the job's status, progress and preview
events. Each subscriber (the submitting connection with `Accept: text/event-stream`, or
`GET .../events`) has its own bounded queue of events; a late one gets the current status first.

Jobs live in this process's memory: finished ones are kept `--job_ttl` seconds and at most `--max_jobs`
of them (oldest dropped first); unfinished ones are bounded by the scheduler's queue.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from kserve.errors import ModelNotFound
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.engine.jobs import Progress
from app.serving import metrics
from app.serving.errors import Conflict, NotFound, RequestInvalid, ServiceError
from app.serving.model import KandinskyModel
from app.serving.openapi import PREDICT_BODY, Operation, register_operations
from app.serving.scheduler import Ticket

log = logging.getLogger(__name__)

JOBS_PATH = "/v1/models/{model_name}/jobs"
JOB_PATH = JOBS_PATH + "/{job_id}"
EVENTS_PATH = JOB_PATH + "/events"
EVENT_STREAM = "text/event-stream"
IDEMPOTENCY_HEADER = "idempotency-key"
#: Events a subscriber may fall behind by; beyond, progress and previews are dropped for it (never the
#: final event), so one slow reader costs bounded memory.
SUBSCRIBER_BACKLOG = 64


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


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


@dataclass(eq=False)
class _Subscriber:
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_BACKLOG))

    def put(self, event: str, data: Any) -> None:
        if event in FINAL:
            while self.queue.full():  # the final event always gets through
                self.queue.get_nowait()
        elif self.queue.full():
            return
        self.queue.put_nowait((event, data))


@dataclass(eq=False)
class Job:
    id: str
    fingerprint: str
    idempotency_key: str | None
    created: float
    images: list[int]  # images_to_gen per instance, to weigh progress
    steps: int = 0
    status: JobStatus = JobStatus.QUEUED
    started: float | None = None
    finished: float | None = None
    finished_at: float | None = None  # time.monotonic(), for the TTL
    step: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    ticket: Ticket | None = None
    task: asyncio.Task[None] | None = None
    subscribers: set[_Subscriber] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def view(self, position: int | None, *, with_result: bool = True) -> dict[str, Any]:
        fraction = self.step / self.steps if self.steps else 0.0
        return {
            "id": self.id,
            "status": self.status.value,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "queue_position": position if self.status == JobStatus.QUEUED else None,
            "progress": {"step": self.step, "steps": self.steps, "fraction": round(fraction, 4)},
            "result": self.result if with_result else None,
            "error": self.error,
        }


class JobStore:
    """Every job of this process: submission, the ticket's events, cancel, expiry."""

    def __init__(self, model: KandinskyModel) -> None:
        self.model = model
        self.ttl = model.settings.job_ttl
        self.max_finished = model.settings.max_jobs
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()  # oldest first
        self.keys: dict[str, str] = {}  # Idempotency-Key -> job id
        self._sweeper: asyncio.Task[None] | None = None

    # ---- submission -------------------------------------------------------------------------------

    def submit(self, payload: Any, idempotency_key: str | None) -> tuple[Job, bool]:
        """Validate and queue a predict body as a job; (the job, whether it is new).

        The same Idempotency-Key with the same body returns the existing job; with another body, 409.
        """
        self.expire()
        fingerprint = _fingerprint(payload)
        if idempotency_key is not None:
            known = self.jobs.get(self.keys.get(idempotency_key, ""))
            if known is not None:
                if known.fingerprint != fingerprint:
                    raise Conflict(f"Idempotency-Key {idempotency_key!r} was used with another body")
                return known, False
        instances = self.model.parse(payload)
        images = [inst.params.images_to_gen for inst in instances]
        job = Job(
            id=uuid.uuid4().hex,
            fingerprint=fingerprint,
            idempotency_key=idempotency_key,
            created=round(time.time(), 3),
            images=images,
        )
        job.ticket = self.model.enqueue(instances, listener=lambda kind, data: self._heard(job, kind, data))
        self.jobs[job.id] = job
        if idempotency_key is not None:
            self.keys[idempotency_key] = job.id
        job.task = asyncio.ensure_future(self._run(job))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self.sweep())
        self._count()
        log.info("job %s queued: %d instance(s), %d image(s)", job.id, len(images), sum(images))
        return job, True

    async def _run(self, job: Job) -> None:
        assert job.ticket is not None
        try:
            predictions = await self.model.results(job.ticket)
        except asyncio.CancelledError:
            return  # cancelled: cancel() already recorded it
        except ServiceError as exc:  # deadline, failed batch, shutdown: the message is for the client
            self._finish(job, JobStatus.FAILED, error=exc.message)
        except Exception as exc:  # never lose a job to a bug: it fails with a generic reason
            log.exception("job %s failed outside the pipeline", job.id)
            self._finish(job, JobStatus.FAILED, error=f"internal error ({type(exc).__name__})")
        else:
            result = predictions[0] if len(predictions) == 1 else {"ok": True, "predictions": predictions}
            job.step = job.steps or job.step
            self._finish(job, JobStatus.SUCCEEDED, result=result)

    # ---- what the worker tells (on the event loop) ------------------------------------------------

    def _heard(self, job: Job, kind: str, data: Any) -> None:
        if job.done:
            return
        if kind == "started":
            job.status, job.started = JobStatus.RUNNING, round(time.time(), 3)
            self._count()
            self._publish(job, "status", job.view(None, with_result=False))
        elif kind == "progress":
            self._progress(job, data)

    def _progress(self, job: Job, progress: Sequence[Progress | None]) -> None:
        known = [(p, n) for p, n in zip(progress, job.images, strict=True) if p is not None]
        if not known:
            return
        job.steps = known[0][0].steps
        # One bar for the whole job: the instances' steps weighed by their images.
        step = sum(p.step * n for p, n in known) // sum(n for _, n in known)
        if step > job.step:
            job.step = step
            self._publish(job, "progress", {"step": step, "steps": job.steps,
                                            "fraction": round(step / job.steps, 4)})
        for instance, p in enumerate(progress):
            if p is not None and p.preview is not None:
                self._publish(job, "preview", {"step": p.step, "instance": instance, "images": p.preview})

    # ---- queries and cancel -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        self.expire()
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} is unknown or expired (finished jobs are kept {self.ttl:g} s)")
        return job

    def view(self, job: Job, *, with_result: bool = True) -> dict[str, Any]:
        position = None
        if job.status == JobStatus.QUEUED and job.ticket is not None and self.model.scheduler is not None:
            position = self.model.scheduler.position(job.ticket)
        return job.view(position, with_result=with_result)

    def recent(self) -> list[dict[str, Any]]:
        self.expire()
        return [self.view(job, with_result=False) for job in reversed(self.jobs.values())]

    def cancel(self, job: Job) -> None:
        """Cancel a queued job (it never runs) or a running one (it stops at the next progress tick,
        its batch partners go on); 409 once it finished."""
        if job.done:
            raise Conflict(f"job {job.id} already {job.status.value}")
        if job.ticket is not None and self.model.scheduler is not None:
            self.model.scheduler.cancel(job.ticket)
        if job.task is not None:
            job.task.cancel()
        self._finish(job, JobStatus.CANCELLED)
        log.info("job %s cancelled", job.id)

    def _finish(self, job: Job, status: JobStatus, *, result: dict[str, Any] | None = None,
                error: str | None = None) -> None:
        if job.done:
            return
        job.status, job.result, job.error = status, result, error
        job.finished, job.finished_at = round(time.time(), 3), time.monotonic()
        self._count()
        self._publish(job, status.value, self._final_data(job))

    # ---- events -----------------------------------------------------------------------------------

    def _publish(self, job: Job, event: str, data: Any) -> None:
        metrics.JOB_EVENTS_TOTAL.labels(event=event).inc()
        for sub in list(job.subscribers):
            sub.put(event, data)

    async def events(self, job: Job, *, owner: bool = False) -> AsyncIterator[ServerSentEvent]:
        """The job's event stream: its status now, then its events to the final one.

        `owner`: this stream submitted the job; if its client goes away first, the job is cancelled.
        """
        sub = _Subscriber()
        job.subscribers.add(sub)
        try:
            yield _event("status", self.view(job, with_result=False))
            if job.done:
                yield _event(job.status.value, self._final_data(job))
                return
            while True:
                event, data = await sub.queue.get()
                yield _event(event, data)
                if event in FINAL:
                    return
        finally:
            job.subscribers.discard(sub)
            if owner and not job.done:
                log.info("job %s: its stream's client went away, cancelling it", job.id)
                self.cancel(job)

    def _final_data(self, job: Job) -> Any:
        if job.status == JobStatus.SUCCEEDED:
            return job.result
        if job.status == JobStatus.FAILED:
            return {"error": job.error}
        return self.view(job, with_result=False)

    # ---- bounds -----------------------------------------------------------------------------------

    def expire(self) -> None:
        """Drop finished jobs past the TTL, then the oldest finished ones beyond `--max_jobs`."""
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        finished.sort(key=lambda j: j.finished_at or 0.0)
        excess = len(finished) - self.max_finished
        dropped = 0
        for n, job in enumerate(finished):
            if n < excess or now - (job.finished_at or now) > self.ttl:
                self._drop(job)
                dropped += 1
        if dropped:
            self._count()

    async def sweep(self) -> None:
        """Expire finished jobs on a timer too, so memory and the `kandinsky_jobs` gauge follow the TTL
        without traffic."""
        while True:
            await asyncio.sleep(min(self.ttl, 60.0) / 2)
            self.expire()

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        if job.idempotency_key is not None and self.keys.get(job.idempotency_key) == job.id:
            del self.keys[job.idempotency_key]

    def _count(self) -> None:
        counts = collections.Counter(job.status for job in self.jobs.values())
        for status in JobStatus:
            metrics.JOBS.labels(status=status.value).set(counts.get(status, 0))


def _event(name: str, data: Any) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, separators=(",", ":")), event=name)


def _fingerprint(payload: Any) -> str:
    try:
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        canonical = repr(payload)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _wants_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


def install_jobs(app: FastAPI, model: KandinskyModel) -> JobStore:
    """Add the job routes to the app; returns the store (tests look inside it)."""
    store = JobStore(model)
    keepalive = model.settings.keepalive

    def check_model(model_name: str) -> None:
        if model_name != model.name:
            raise ModelNotFound(model_name)

    def stream(job: Job, *, owner: bool) -> EventSourceResponse:
        return EventSourceResponse(
            store.events(job, owner=owner),
            ping=keepalive,
            ping_message_factory=lambda: ServerSentEvent(comment="keep-alive"),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def submit(model_name: str, request: Request) -> Response:
        check_model(model_name)
        try:
            payload = json.loads(await request.body())
        except ValueError:
            raise RequestInvalid("body: not valid JSON") from None
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not 1 <= len(key) <= 255:
            raise RequestInvalid("Idempotency-Key: must be 1..255 characters")
        job, new = store.submit(payload, key)
        if _wants_stream(request):
            return stream(job, owner=new)
        location = f"/v1/models/{model.name}/jobs/{job.id}"
        body = store.view(job, with_result=False) if not new else {
            "id": job.id, "status": job.status.value, "created": job.created}
        return JSONResponse(body, status_code=202 if new else 200, headers={"Location": location})

    async def get_job(model_name: str, job_id: str) -> dict[str, Any]:
        check_model(model_name)
        return store.view(store.get(job_id))

    async def list_jobs(model_name: str) -> dict[str, Any]:
        check_model(model_name)
        return {"jobs": store.recent()}

    async def cancel_job(model_name: str, job_id: str) -> dict[str, Any]:
        check_model(model_name)
        job = store.get(job_id)
        store.cancel(job)
        return store.view(job, with_result=False)

    async def job_events(model_name: str, job_id: str) -> EventSourceResponse:
        check_model(model_name)
        return stream(store.get(job_id), owner=False)

    app.add_api_route(JOBS_PATH, submit, methods=["POST"], tags=["Jobs"], summary="Submit a job")
    app.add_api_route(JOBS_PATH, list_jobs, methods=["GET"], tags=["Jobs"], summary="List jobs")
    app.add_api_route(JOB_PATH, get_job, methods=["GET"], tags=["Jobs"], summary="Get a job")
    app.add_api_route(JOB_PATH, cancel_job, methods=["DELETE"], tags=["Jobs"], summary="Cancel a job")
    app.add_api_route(EVENTS_PATH, job_events, methods=["GET"], tags=["Jobs"], summary="Job events")
    app.state.kandinsky_jobs = store
    return store


_STREAM_TEXT = (
    "Events (`event:` name, `data:` one JSON line): `status` first (the job without its result), "
    "`progress` `{step, steps, fraction}` as image rows complete, `preview` `{step, instance, images}` "
    "when `preview_every` > 0 (base64 JPEG 256x256 per image, rows not yet sampled grey), then exactly "
    "one final event: `succeeded` (data: the predict response), `failed` (`{error}`) or `cancelled`. "
    "A `: keep-alive` comment at least every 15 s."
)

register_operations({
    ("POST", JOBS_PATH): Operation(
        "Submit a job",
        "Jobs",
        JobCreated,
        (400, 404, 408, 409, 413, 415, 503),
        description=(
            "Queues a predict body as a job and answers at once: 202 with `Location`. With "
            "`Accept: text/event-stream`, the job's event stream on this connection instead (200); the "
            "job is cancelled if that connection closes first. `Idempotency-Key`: the same key with the "
            "same body returns the existing job (200), with another body 409. " + _STREAM_TEXT
        ),
        ok_status=202,
        ok_description="Queued: `{id, status, created}`.",
        ok_headers={"Location": "The job's URL."},
        request=PREDICT_BODY,
        other_ok={200: ("The event stream (`Accept: text/event-stream`), or the existing job of this "
                        "Idempotency-Key.", None)},
        error_descriptions={409: "The Idempotency-Key was used with another body."},
    ),
    ("GET", JOBS_PATH): Operation("List jobs", "Jobs", JobList, (404,)),
    ("GET", JOB_PATH): Operation(
        "Get a job", "Jobs", JobView, (404,),
        description="`result` is exactly the predict response once `status` is `succeeded`.",
        error_descriptions={404: "Unknown model, or unknown or expired job id."},
    ),
    ("DELETE", JOB_PATH): Operation(
        "Cancel a job", "Jobs", JobView, (404, 409),
        description="A queued job never runs; a running one stops at its next progress tick while the "
                    "other requests of its batch go on.",
        error_descriptions={404: "Unknown model, or unknown or expired job id.",
                            409: "The job had already finished."},
    ),
    ("GET", EVENTS_PATH): Operation(
        "Follow a job's events", "Jobs", None, (404,),
        description=_STREAM_TEXT + " A finished job's stream sends its final event and closes.",
        ok_media=(EVENT_STREAM,),
        error_descriptions={404: "Unknown model, or unknown or expired job id."},
    ),
})
