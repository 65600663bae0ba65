"""The in-process `JobStore`: records in this process's memory, each subscriber with its own bounded list
of pending events.

Retention (swept on a timer too, so that memory and the gauges follow it without traffic):
- finished jobs are kept `ttl` seconds;
- at most `max_finished` of them: beyond, cancelled jobs go first, then failed ones and those whose
  result expired, and only then kept results (oldest first in each), so a flood of submit-and-cancel
  only ever pushes out other cancelled jobs;
- their results (counted as the bytes of their final event on the wire) up to `max_result_bytes` in all:
  beyond, the oldest result expires; its record stays and says so (`JobRecord.result_expired`).
Unfinished jobs are bounded by the work queue.

A subscriber holds references to the job's shared events only: progress coalesced to the newest, its
oldest previews dropped once the previews it holds unread pass `SUBSCRIBER_PENDING_BYTES`, never its
status or final events.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.serving.core.types import JobEvent, JobEventName, JobRecord, JobStatus
from app.serving.queue.observer import NULL_JOB_OBSERVER, JobObserver

log = logging.getLogger(__name__)

#: Bytes of previews one subscriber may hold unread (references to shared events); beyond, its oldest
#: previews are dropped for it (a slow reader sees the newest).
SUBSCRIBER_PENDING_BYTES = 4 << 20


@dataclass(eq=False)
class Subscriber:
    pending: collections.deque[JobEvent] = field(default_factory=collections.deque)
    preview_bytes: int = 0  # of the previews pending
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, event: JobEvent) -> None:
        if event.name == JobEventName.PROGRESS:  # only the newest progress matters: one is held at most
            for old in [e for e in self.pending if e.name == JobEventName.PROGRESS]:
                self.pending.remove(old)
        self.pending.append(event)
        if event.name == JobEventName.PREVIEW:
            self.preview_bytes += event.size
            while self.preview_bytes > SUBSCRIBER_PENDING_BYTES:
                oldest = next(e for e in self.pending if e.name == JobEventName.PREVIEW)
                if oldest is event:
                    break  # one preview alone over the bound: it is still the newest
                self.pending.remove(oldest)
                self.preview_bytes -= oldest.size
        self.ready.set()

    def take(self) -> JobEvent | None:
        if not self.pending:
            self.ready.clear()
            return None
        event = self.pending.popleft()
        if event.name == JobEventName.PREVIEW:
            self.preview_bytes -= event.size
        return event


class Subscription:
    """A subscriber's events up to the final one; closing it (or reading the final event) unsubscribes
    (`leave` is called once)."""

    def __init__(self, sub: Subscriber, leave: Callable[[], None]) -> None:
        self.sub, self.leave = sub, leave

    async def next(self, timeout: float | None = None) -> JobEvent | None:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            event = self.sub.take()
            if event is not None:
                if event.name.final:
                    await self.aclose()
                return event
            try:
                # Waiting on a flag, not on a queue, so a timeout loses nothing.
                async with asyncio.timeout_at(deadline):
                    await self.sub.ready.wait()
            except TimeoutError:
                return None

    async def aclose(self) -> None:
        leave, self.leave = self.leave, lambda: None
        leave()
        self.sub.pending.clear()


class MemoryJobStore:
    """Every job of this process (see `app.serving.queue.base.JobStore`)."""

    def __init__(self, *, ttl: float, max_finished: int, max_result_bytes: int = 1 << 30,
                 observer: JobObserver = NULL_JOB_OBSERVER) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self.max_result_bytes = max_result_bytes
        self.observer = observer
        self.jobs: collections.OrderedDict[str, JobRecord] = collections.OrderedDict()  # oldest first
        self.keys: dict[tuple[str | None, str], str] = {}  # (tenant, Idempotency-Key) -> job id
        #: Succeeded jobs whose result is kept, oldest finished first, and their bytes in all.
        self._results: collections.OrderedDict[str, JobRecord] = collections.OrderedDict()
        self._result_bytes = 0
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._seq = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None

    def add(self, record: JobRecord) -> None:
        record.seq = next(self._seq)
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

    def recent(self, limit: int | None = None, tenant: str | None = None, before: int | None = None
               ) -> list[JobRecord]:
        self.expire()
        mine = (r for r in reversed(self.jobs.values())
                if r.tenant == tenant and (before is None or r.seq < before))
        return list(mine if limit is None else itertools.islice(mine, limit))

    def save(self, record: JobRecord) -> None:
        if record.holds_result and record.id in self.jobs and record.id not in self._results:
            if record.result_bytes > self.max_result_bytes:  # kept, it would push out every other one
                log.warning("job %s: its result of %d bytes alone exceeds --max_job_bytes (%d); not kept",
                            record.id, record.result_bytes, self.max_result_bytes)
                record.expire_result()
            else:
                self._results[record.id] = record
                self._result_bytes += record.result_bytes
                self._fit_results()
        self._count()

    def publish(self, record: JobRecord, event: JobEvent) -> None:
        self.observer.job_event(event.name.value)
        for sub in list(self._subscribers.get(record.id, ())):
            sub.put(event)

    def subscribe(self, record: JobRecord) -> Subscription:
        # Subscribed now, not at the first read: nothing published in between is missed.
        sub = Subscriber()
        self._subscribers.setdefault(record.id, set()).add(sub)

        def leave() -> None:
            subs = self._subscribers.get(record.id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[record.id]

        return Subscription(sub, leave)

    def watched(self, job_id: str) -> bool:
        return bool(self._subscribers.get(job_id))  # one dict read: safe from the worker's threads

    def result_bytes(self) -> int:
        return self._result_bytes

    def expire(self) -> None:
        """Drop finished jobs past the TTL, then beyond `max_finished` (cancelled first, then failed or
        without their result, then the oldest results); then expire results beyond the byte bound."""
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        dropped = 0
        for job in finished:
            if now - (job.finished_at or now) > self.ttl:
                self._drop(job)
                dropped += 1
        kept = [j for j in finished if j.id in self.jobs]
        excess = len(kept) - self.max_finished
        if excess > 0:
            kept.sort(key=lambda j: (_eviction_class(j), j.finished_at or 0.0))
            for job in kept[:excess]:
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

    def _fit_results(self) -> None:
        while self._result_bytes > self.max_result_bytes and self._results:
            _, oldest = self._results.popitem(last=False)
            self._result_bytes -= oldest.result_bytes
            log.info("job %s: result expired to keep results within %d bytes", oldest.id,
                     self.max_result_bytes)
            oldest.expire_result()

    def _drop(self, job: JobRecord) -> None:
        self.jobs.pop(job.id, None)
        if self._results.pop(job.id, None) is not None:
            self._result_bytes -= job.result_bytes
        key = (job.tenant, job.idempotency_key or "")
        if job.idempotency_key is not None and self.keys.get(key) == job.id:
            del self.keys[key]

    def _count(self) -> None:
        self.observer.job_counts(self.counts())


def _eviction_class(job: JobRecord) -> int:
    """Which finished jobs the count bound drops first: cancelled (0), failed or without their result
    (1), then kept results (2)."""
    if job.status == JobStatus.CANCELLED:
        return 0
    return 2 if job.holds_result else 1
