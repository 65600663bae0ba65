"""The two interfaces between the Service and the work: `WorkQueue` (requests waiting for and running on
the GPU worker) and `JobStore` (job records, their events and results, idempotency keys, retention).

Today's in-process behaviour is the first implementation of each (`local.LocalQueue`,
`memory_jobs.MemoryJobStore`); a Redis one (many replicas as one service) implements the same calls.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from app.serving.core.errors import ServiceError
from app.serving.core.types import Event, ImageRequest, JobEvent, JobRecord, Listener, RequestResult


@dataclass(eq=False)
class Work:
    """One request in the queue: what the service submitted and the times that bound it."""

    request: ImageRequest
    enqueued: float  # time.monotonic()
    deadline: float  # time.monotonic()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False  # the requester gave up (deadline, hang-up or cancel)
    #: Whether anyone would see a preview now (a job with a stream open); asked before each is rendered.
    wants_previews: Callable[[], bool] = field(default=lambda: True)
    #: Each instance's last progress told (None: none yet), for previews told between ticks.
    last_progress: tuple[Any, ...] = ()

    @property
    def images(self) -> int:
        return self.request.images


async def await_answer(waiters: dict[str, Any], work: Work) -> RequestResult:
    """A queue's `outcome`: await the future of `waiters[work.id]` (anything with a `future`) shielded,
    so that a waiter who gives up does not cancel what the worker will answer; it leaves once answered."""
    waiter = waiters[work.id]
    try:
        return cast("RequestResult", await asyncio.shield(waiter.future))
    finally:
        if waiter.future.done():
            waiters.pop(work.id, None)


class WorkQueue(Protocol):
    """Service side: put, await the outcome, listen, cancel, position, depth, drain.
    Worker side: take up to N images of queued work without blocking, tell progress, finish or fail."""

    # ---- the service's side -----------------------------------------------------------------------

    async def put(self, work: Work, listener: Listener | None = None) -> None:
        """Queue work; QueueFull or ShuttingDown when it cannot be taken, TenantQueueFull when its tenant
        has its bound of work waiting. `listener` hears its events."""
        ...

    async def outcome(self, work: Work) -> RequestResult:
        """The work's result once finished; its ServiceError once failed. Does not time out by itself."""
        ...

    def cancel(self, work: Work) -> None:
        """Give work up: queued, it leaves the queue at once; running, it stops at its next tick. Not a
        coroutine (a waiter that is being cancelled calls it): a remote queue sends its notice in the
        background."""
        ...

    async def position(self, work: Work) -> int | None:
        """Its place in the queue (0: next), None once taken."""
        ...

    @property
    def depth(self) -> int: ...

    @property
    def accepting(self) -> bool: ...

    async def reachable(self) -> bool:
        """Whether the queue's store answers (readiness is false while it does not)."""
        ...

    def begin_drain(self) -> None:
        """Take no new work; what is queued still runs."""
        ...

    def close(self, error: ServiceError) -> None:
        """Fail whatever is still queued with `error` and wake the worker to stop."""
        ...

    # ---- the worker's side ------------------------------------------------------------------------

    def take(self, max_images: int, *, wait: float = 0.0) -> list[Work]:
        """Queued work of at most `max_images` images in all (one larger item alone), in fair order
        between tenants (queue/fair.py; first in, first out within one); waits up to `wait` seconds
        for some to arrive (0: never blocks). Expired and cancelled
        work is dropped on the way (expired work answered DeadlineExceeded)."""
        ...

    @property
    def closed(self) -> bool:
        """The worker should stop once `take` returns nothing."""
        ...

    def tell(self, work: Work, event: Event) -> None:
        """Pass a progress event to the work's listener."""
        ...

    def finish(self, work: Work, result: RequestResult) -> None: ...

    def fail(self, work: Work, error: ServiceError) -> None: ...


class Subscription(Protocol):
    """A job's events up to its final one; `aclose()` (or reading the final event) unsubscribes.

    What a subscriber holds unread is bounded: references to the job's shared events only, progress
    coalesced to the newest, the oldest previews dropped beyond a bound in bytes; never the final event."""

    async def next(self, timeout: float | None = None) -> JobEvent | None:
        """The next event; None when none came within `timeout` seconds (the stream's keep-alive cue).
        Waiting again after the final event waits forever: stop at the final event."""
        ...

    async def aclose(self) -> None: ...


class JobStore(Protocol):
    """Job records, their events, results and idempotency keys, bounded by the store's retention:
    finished jobs for a TTL and up to a count (cancelled and failed ones go first, so they never push
    out a result), results up to a total of bytes (the oldest result expires first; its record stays
    and says so)."""

    def add(self, record: JobRecord) -> None:
        """Keep a new job; assigns its `seq` (the order of listings)."""
        ...

    def get(self, job_id: str) -> JobRecord | None:
        """The record, or None when unknown or expired."""
        ...

    def by_key(self, key: str, tenant: str | None = None) -> JobRecord | None:
        """The job an Idempotency-Key names (per tenant), or None."""
        ...

    def recent(self, limit: int | None = None, tenant: str | None = None, before: int | None = None
               ) -> list[JobRecord]:
        """The most recent jobs, newest first; with `before`, only those older than the job of that `seq`."""
        ...

    def save(self, record: JobRecord) -> None:
        """Record a change of the job's status, progress or result; a finished job's kept result
        (`result_bytes`) counts against the byte bound from now on."""
        ...

    def publish(self, record: JobRecord, event: JobEvent) -> None:
        """Send an event to the job's current subscribers (the same object to each)."""
        ...

    def subscribe(self, record: JobRecord) -> Subscription:
        """The job's events from now on, ending after the final one; the caller sends the current status
        first. Closing the subscription unsubscribes."""
        ...

    def watched(self, job_id: str) -> bool:
        """Whether the job has an open event stream now. Called from the worker's threads too."""
        ...

    def result_bytes(self) -> int:
        """Bytes of the results kept now."""
        ...

    def expire(self) -> None:
        """Apply retention now (the TTL, the count bound and the byte bound)."""
        ...

    def counts(self) -> dict[str, int]:
        """Jobs held, by status."""
        ...
