"""The in-process `JobStore`: records in this process's memory, each subscriber with its own bounded list
of pending events.

Retention (swept on a timer too, so that memory and the gauges follow it without traffic):
- finished jobs are kept `ttl` seconds;
- at most `tenant_max_finished` of one tenant's (0: no bound of its own) and `max_finished` in all:
  beyond, the tenant holding the most loses its own first, cancelled jobs first, then failed ones and
  those whose result expired, and only then kept results (oldest first in each), so a flood of
  submit-and-cancel only ever pushes out the flooder's own jobs;
- their results (counted as the bytes of their final event on the wire) up to `tenant_max_result_bytes`
  per tenant and `max_result_bytes` in all: beyond, the oldest result of the tenant holding the most
  bytes expires; its record stays and says so (`JobRecord.result_expired`). A tenant's results are thus
  expired by another's only while it holds at least as much as that other one.
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
                 tenant_max_finished: int = 0, tenant_max_result_bytes: int = 0,
                 observer: JobObserver = NULL_JOB_OBSERVER) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self.max_result_bytes = max_result_bytes
        self.tenant_max_finished = tenant_max_finished or max_finished
        self.tenant_max_result_bytes = min(tenant_max_result_bytes or max_result_bytes, max_result_bytes)
        self.observer = observer
        self.jobs: collections.OrderedDict[str, JobRecord] = collections.OrderedDict()  # oldest first
        self.keys: dict[tuple[str | None, str], str] = {}  # (tenant, Idempotency-Key) -> job id
        #: Succeeded jobs whose result is kept, oldest finished first, and their bytes in all.
        self._results: collections.OrderedDict[str, JobRecord] = collections.OrderedDict()
        self._result_bytes = 0
        self._tenant_bytes: collections.Counter[str | None] = collections.Counter()
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
            if record.result_bytes > self.tenant_max_result_bytes:  # kept, it would push out all others
                log.warning("job %s: its result of %d bytes alone exceeds the bound of results kept (%d); "
                            "not kept", record.id, record.result_bytes, self.tenant_max_result_bytes)
                record.expire_result()
            else:
                self._results[record.id] = record
                self._result_bytes += record.result_bytes
                self._tenant_bytes[record.tenant] += record.result_bytes
                self._fit_results(record.tenant)
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
        """Drop finished jobs past the TTL, then beyond a tenant's bound and beyond `max_finished` (the
        tenant holding the most first; its cancelled first, then failed or without their result, then
        its oldest results)."""
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        dropped = 0
        for job in finished:
            if now - (job.finished_at or now) > self.ttl:
                self._drop(job)
                dropped += 1
        by_tenant: dict[str | None, list[JobRecord]] = collections.defaultdict(list)
        for job in finished:
            if job.id in self.jobs:
                by_tenant[job.tenant].append(job)
        for jobs in by_tenant.values():  # each tenant's in the order it loses them
            jobs.sort(key=lambda j: (_eviction_class(j), j.finished_at or 0.0), reverse=True)
        total = sum(len(jobs) for jobs in by_tenant.values())
        while by_tenant:
            tenant, jobs = max(by_tenant.items(), key=lambda item: len(item[1]))
            if len(jobs) <= self.tenant_max_finished and total <= self.max_finished:
                break
            self._drop(jobs.pop())
            total -= 1
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

    def _fit_results(self, tenant: str | None) -> None:
        """Within `tenant`'s byte bound, then within the total: the oldest result of the tenant holding
        the most bytes expires first."""
        while self._results:
            if self._tenant_bytes[tenant] > self.tenant_max_result_bytes:
                holder = tenant
            elif self._result_bytes > self.max_result_bytes:
                # the newcomer loses a tie: a tenant at its fair share keeps its results
                holder = max(self._tenant_bytes, key=lambda t: (self._tenant_bytes[t], t == tenant))
            else:
                return
            oldest = next(r for r in self._results.values() if r.tenant == holder)
            self._forget_result(oldest)
            log.info("job %s: result expired to keep results within their bounds (%d bytes in all, %d per "
                     "tenant)", oldest.id, self.max_result_bytes, self.tenant_max_result_bytes)
            oldest.expire_result()

    def _forget_result(self, job: JobRecord) -> bool:
        if self._results.pop(job.id, None) is None:
            return False
        self._result_bytes -= job.result_bytes
        self._tenant_bytes[job.tenant] -= job.result_bytes
        if self._tenant_bytes[job.tenant] <= 0:
            del self._tenant_bytes[job.tenant]
        return True

    def _drop(self, job: JobRecord) -> None:
        self.jobs.pop(job.id, None)
        self._forget_result(job)
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
