"""The in-process `JobStore`: records in this process's memory, each subscriber with its own bounded
queue of events. Finished jobs are kept `ttl` seconds and at most `max_finished` of them (oldest dropped
first), swept on a timer too so that memory and the gauge follow the TTL without traffic; unfinished ones
are bounded by the work queue.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

from app.serving.core.types import JobEvent, JobRecord, JobStatus
from app.serving.queue.observer import NULL_JOB_OBSERVER, JobObserver

#: Events a subscriber may fall behind by; beyond, progress and previews are dropped for it (never the
#: final event), so one slow reader costs bounded memory.
SUBSCRIBER_BACKLOG = 64


@dataclass(eq=False)
class _Subscriber:
    queue: asyncio.Queue[JobEvent] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_BACKLOG))

    def put(self, event: JobEvent) -> None:
        if event.name.final:
            while self.queue.full():  # the final event always gets through
                self.queue.get_nowait()
        elif self.queue.full():
            return
        self.queue.put_nowait(event)


class _Subscription:
    """A subscriber's events up to the final one; closing it (or reaching the end) unsubscribes."""

    def __init__(self, registry: dict[str, set[_Subscriber]], job_id: str, sub: _Subscriber) -> None:
        self.registry, self.job_id, self.sub = registry, job_id, sub
        self.ended = False

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        if self.ended:
            raise StopAsyncIteration
        event = await self.sub.queue.get()
        if event.name.final:
            await self.aclose()
        return event

    async def aclose(self) -> None:
        self.ended = True
        subs = self.registry.get(self.job_id)
        if subs is not None:
            subs.discard(self.sub)
            if not subs:
                del self.registry[self.job_id]


class MemoryJobStore:
    """Every job of this process (see `app.serving.queue.base.JobStore`)."""

    def __init__(self, *, ttl: float, max_finished: int, observer: JobObserver = NULL_JOB_OBSERVER) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self.observer = observer
        self.jobs: collections.OrderedDict[str, JobRecord] = collections.OrderedDict()  # oldest first
        self.keys: dict[tuple[str | None, str], str] = {}  # (tenant, Idempotency-Key) -> job id
        self._subscribers: dict[str, set[_Subscriber]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def add(self, record: JobRecord) -> None:
        self.jobs[record.id] = record
        if record.idempotency_key is not None:
            self.keys[(record.tenant, record.idempotency_key)] = record.id
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())
        self._count()

    def get(self, job_id: str) -> JobRecord | None:
        self.expire()
        return self.jobs.get(job_id)

    def by_key(self, key: str, tenant: str | None = None) -> JobRecord | None:
        return self.jobs.get(self.keys.get((tenant, key), ""))

    def recent(self, limit: int | None = None, tenant: str | None = None) -> list[JobRecord]:
        self.expire()
        mine = [r for r in reversed(self.jobs.values()) if r.tenant == tenant]
        return mine if limit is None else mine[:limit]

    def save(self, record: JobRecord) -> None:
        self._count()

    def publish(self, record: JobRecord, event: JobEvent) -> None:
        self.observer.job_event(event.name.value)
        for sub in list(self._subscribers.get(record.id, ())):
            sub.put(event)

    def subscribe(self, record: JobRecord) -> _Subscription:
        # Subscribed now, not at the first read: nothing published in between is missed.
        sub = _Subscriber()
        self._subscribers.setdefault(record.id, set()).add(sub)
        return _Subscription(self._subscribers, record.id, sub)

    def expire(self) -> None:
        """Drop finished jobs past the TTL, then the oldest finished ones beyond `max_finished`."""
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

    def counts(self) -> dict[str, int]:
        counts = collections.Counter(job.status for job in self.jobs.values())
        return {status.value: counts.get(status, 0) for status in JobStatus}

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.ttl, 60.0) / 2)
            self.expire()

    def _drop(self, job: JobRecord) -> None:
        self.jobs.pop(job.id, None)
        key = (job.tenant, job.idempotency_key or "")
        if job.idempotency_key is not None and self.keys.get(key) == job.id:
            del self.keys[key]

    def _count(self) -> None:
        self.observer.job_counts(self.counts())
