"""Jobs (SPEC section 7): a request that answers at once and is followed by its id. `Jobs` submits the
request through the `Service` (the same queue, batching, seeds and deadline as predict), turns the work's
events into the job's record and its typed events, and keeps both in a `JobStore`.

Each event is one object shared by every subscriber, encoded once by the protocol layer's encoder (the
core never looks at the bytes). A finished job's final event is sealed at once: its result is then held
only as those bytes, which the store counts against its byte bound, and which every late subscriber
gets as the same bytes object. Previews are rendered only while the job has an open stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from app.serving.core.errors import Conflict, NotFound, ServiceError
from app.serving.core.service import Service
from app.serving.core.types import (
    Event,
    EventEncoder,
    JobEvent,
    JobEventName,
    JobRecord,
    JobStatus,
    Preview,
    Progressed,
    RequestResult,
    Started,
    StepProgress,
    progress_step,
)
from app.serving.queue.base import JobStore, Work

log = logging.getLogger(__name__)


class JobService(Protocol):
    """What the jobs protocol calls: `Jobs` (in this process) or `queue.redis_jobs.RedisJobs` (Redis)."""

    async def submit(self, payload: Any, idempotency_key: str | None, tenant: str | None = None
                     ) -> tuple[JobRecord, bool]: ...

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord: ...

    async def recent(self, limit: int | None = None, tenant: str | None = None, before: int | None = None
                     ) -> list[JobRecord]: ...

    async def snapshot(self, record: JobRecord) -> JobRecord: ...

    async def cancel(self, record: JobRecord) -> None: ...

    def events(self, record: JobRecord, *, owner: bool = False, idle: float | None = None,
               after: str | None = None) -> AsyncGenerator[JobEvent | None, None]: ...


class Jobs:
    """Submit, get, list, cancel and follow jobs of one served model, in this process."""

    def __init__(self, service: Service, store: JobStore, *, ttl: float, encode: EventEncoder,
                 worker: str | None = None) -> None:
        self.service = service
        self.worker = worker  # this replica's name, for the job view
        self.store = store
        self.ttl = ttl  # seconds a finished job is kept, for messages
        self.encode = encode  # an event -> its bytes on the wire (the protocol layer's)
        self._work: dict[str, Work] = {}  # job id -> its queued or running work
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def submit(self, payload: Any, idempotency_key: str | None, tenant: str | None = None
                     ) -> tuple[JobRecord, bool]:
        """Validate and queue a predict body as a job; (the job, whether it is new).

        The same Idempotency-Key with the same body returns the existing job; with another body, 409.
        """
        self.store.expire()
        fprint = fingerprint(payload)
        if idempotency_key is not None:
            known = self.store.by_key(idempotency_key, tenant)
            if known is not None:
                if known.fingerprint != fprint:
                    raise Conflict(f"Idempotency-Key {idempotency_key!r} was used with another body")
                return known, False
        instances = self.service.parse(payload)
        request = self.service.request(instances, "jobs", tenant)
        record = JobRecord(
            id=uuid.uuid4().hex,
            fingerprint=fprint,
            idempotency_key=idempotency_key,
            created=round(time.time(), 3),
            images=[int(job.params.images_to_gen) for job in request.instances],
            tenant=tenant,
        )
        work = await self.service.submit(request, listener=lambda event: self._heard(record, event),
                                         wants_previews=lambda: self.store.watched(record.id))
        self._work[record.id] = work
        self.store.add(record)
        self._tasks[record.id] = asyncio.ensure_future(self._run(record, work))
        log.info("job %s queued: %d instance(s), %d image(s)", record.id, len(record.images), request.images)
        return record, True

    async def _run(self, record: JobRecord, work: Work) -> None:
        try:
            result = await self.service.result(work)
        except asyncio.CancelledError:
            return  # cancelled: cancel() already recorded it
        except ServiceError as exc:  # deadline, failed batch, shutdown: the message is for the client
            self._finish(record, JobStatus.FAILED, error=exc.message)
        except Exception as exc:  # never lose a job to a bug: it fails with a generic reason
            log.exception("job %s failed outside the pipeline", record.id)
            self._finish(record, JobStatus.FAILED, error=f"internal error ({type(exc).__name__})")
        else:
            self._finish(record, JobStatus.SUCCEEDED, result=result)
        finally:
            self._tasks.pop(record.id, None)

    # ---- what the worker tells (on the event loop) ------------------------------------------------

    def _heard(self, record: JobRecord, event: Event) -> None:
        if record.done:
            return
        events = on_started(record, self.worker) if isinstance(event, Started) else (
            on_progress(record, event) if isinstance(event, Progressed) else [])
        if events:
            self.store.save(record)
        for job_event in events:
            self._publish(record, job_event)

    # ---- queries and cancel -----------------------------------------------------------------------

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job of that id if it is `tenant`'s; another tenant's job is as unknown as a missing one."""
        record = self.store.get(job_id)
        if record is None or record.tenant != tenant:
            raise not_found(job_id, self.ttl)
        return record

    async def recent(self, limit: int | None = None, tenant: str | None = None, before: int | None = None
                     ) -> list[JobRecord]:
        """The most recent jobs, newest first; `before`: only those older than the job of that `seq`."""
        return self.store.recent(limit, tenant, before)

    async def position(self, record: JobRecord) -> int | None:
        """Requests ahead of a queued job (0: next); None once it runs or ended."""
        work = self._work.get(record.id)
        if record.status != JobStatus.QUEUED or work is None:
            return None
        return await self.service.position(work)

    async def snapshot(self, record: JobRecord) -> JobRecord:
        """The record as it is now, with its queue position (status events carry one)."""
        return self._view(record, await self.position(record))

    @staticmethod
    def _view(record: JobRecord, position: int | None = None) -> JobRecord:
        """A copy of the record as it is now (events carry copies: the record changes on)."""
        return dataclasses.replace(record, queue_position=position)

    async def cancel(self, record: JobRecord) -> None:
        """Cancel a queued job (it never runs) or a running one (it stops at the next progress tick,
        its batch partners go on); 409 once it finished."""
        if record.done:
            raise Conflict(f"job {record.id} already {record.status.value}")
        work = self._work.get(record.id)
        if work is not None:
            self.service.cancel(work)
        task = self._tasks.get(record.id)
        if task is not None:
            task.cancel()
        self._finish(record, JobStatus.CANCELLED)
        log.info("job %s cancelled", record.id)

    def _finish(self, record: JobRecord, status: JobStatus, *, result: RequestResult | None = None,
                error: str | None = None) -> None:
        if record.done:
            return
        self._work.pop(record.id, None)
        final = on_final(record, status, result=result, error=error)
        record.finished_at = time.monotonic()
        wire = final.seal(self.encode)  # the result is held once, as the bytes every stream sends
        record.final = final
        if status == JobStatus.SUCCEEDED:
            record.result_bytes = len(wire)
        self.store.save(record)  # counts the result against the byte bound (an older one may expire)
        self.store.publish(record, final)

    # ---- events -----------------------------------------------------------------------------------

    def _publish(self, record: JobRecord, event: JobEvent) -> None:
        if self.store.watched(record.id):
            event.encoded(self.encode)  # once, here: every subscriber sends these bytes
        self.store.publish(record, event)

    async def events(self, record: JobRecord, *, owner: bool = False, idle: float | None = None,
                     after: str | None = None) -> AsyncGenerator[JobEvent | None, None]:
        """The job's events: its status now, then its events to the final one; with `idle`, a None at
        least every `idle` seconds in between, whether events come or not (the stream's cue for a
        keep-alive comment).

        `owner`: this stream submitted the job; if its reader goes away first, the job is cancelled.
        `after` (a `Last-Event-ID`): events in this process carry no ids, so it changes nothing here.
        """
        subscription = self.store.subscribe(record)
        clock = asyncio.get_running_loop().time
        due = None if idle is None else clock() + idle
        try:
            yield JobEvent(JobEventName.STATUS, await self.snapshot(record))
            if record.done:
                yield self.final_event(record)
                return
            while True:
                event = await subscription.next(None if due is None else max(0.0, due - clock()))
                if event is not None:
                    yield event
                    if event.name.final:
                        return
                if idle is not None and due is not None and clock() >= due:
                    yield None
                    due = clock() + idle
        finally:
            await subscription.aclose()
            if owner and not record.done:
                log.info("job %s: its stream's client went away, cancelling it", record.id)
                await self.cancel(record)

    def final_event(self, record: JobRecord) -> JobEvent:
        """A finished job's final event, the same object (and bytes) for every late subscriber: the result
        (succeeded), the error (failed), the record (cancelled). Once a result expired: `succeeded` with
        the record, which says `result_expired`."""
        if record.final is None:  # its result expired
            record.final = JobEvent(JobEventName(record.status.value), self._view(record))
            record.final.seal(self.encode)
        return record.final


# ---- a job's transitions: the record's changes and the events they send, wherever its work runs ------


def on_started(record: JobRecord, worker: str | None) -> list[JobEvent]:
    """Its work started (again, after a takeover): running, on `worker`; a `status` event."""
    record.status, record.started, record.worker = JobStatus.RUNNING, round(time.time(), 3), worker
    return [JobEvent(JobEventName.STATUS, dataclasses.replace(record, queue_position=None))]


def on_progress(record: JobRecord, event: Progressed) -> list[JobEvent]:
    """A progress tick: a `progress` event when the bar moved (never back, after a takeover too), and
    the previews it carries."""
    bar = progress_step(event.instances, record.images)
    if bar is None:
        return []
    step, record.steps = bar
    events = []
    if step > record.step:
        record.step = step
        events.append(JobEvent(JobEventName.PROGRESS, StepProgress(step, record.steps)))
    for instance, p in enumerate(event.instances):
        if p is not None and p.preview is not None:
            events.append(JobEvent(JobEventName.PREVIEW, Preview(p.step, instance, p.preview)))
    return events


def on_final(record: JobRecord, status: JobStatus, *, result: RequestResult | None = None,
             error: str | None = None) -> JobEvent:
    """It ended: the record's final status and its final event (the result, the error, or the record)."""
    record.status, record.error = status, error
    record.finished = round(time.time(), 3)
    if status == JobStatus.SUCCEEDED:
        record.step = record.steps or record.step
    data: Any = result if status == JobStatus.SUCCEEDED else error if status == JobStatus.FAILED else None
    return JobEvent(JobEventName(status.value),
                    data if data is not None else dataclasses.replace(record, queue_position=None))


def not_found(job_id: str, ttl: float) -> NotFound:
    """The 404 of a job id that is unknown, expired or another tenant's (one message for all three)."""
    return NotFound(f"job {job_id!r} is unknown or expired (finished jobs are kept {ttl:g} s)")


def fingerprint(payload: Any) -> str:
    try:
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        canonical = repr(payload)
    return hashlib.sha256(canonical.encode()).hexdigest()
