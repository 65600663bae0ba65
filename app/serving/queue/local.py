"""The in-process `WorkQueue`: a bounded queue shared by the event loop and the worker thread, taken in
fair order between tenants (`fair.FairClock`: weighted by images; first in, first out within a tenant
and without API keys). The loop puts work and awaits a future; the worker thread takes work and answers
through `loop.call_soon_threadsafe`, so no answer or progress event ever runs on the worker's thread.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from app.serving.core.errors import DeadlineExceeded, QueueFull, ServiceError, ShuttingDown, TenantQueueFull
from app.serving.core.types import Event, Listener, RequestResult
from app.serving.queue.base import Work, await_answer
from app.serving.queue.fair import FairClock, Weights, equal_weights
from app.serving.queue.observer import NULL_OBSERVER, QueueObserver

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Queued:
    """Queued work with its place in the fair order: (tag, arrival)."""

    tag: float
    seq: int
    work: Work


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[RequestResult]
    listener: Listener | None


class LocalQueue:
    """A `WorkQueue` in this process's memory, bounded by `queue_size` requests in all and by
    `tenant_queue_size` per tenant (0: no bound of its own), taken in fair order by `weights`."""

    def __init__(self, queue_size: int = 32, observer: QueueObserver = NULL_OBSERVER, *,
                 tenant_queue_size: int = 0, weights: Weights = equal_weights) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.queue_size = queue_size
        self.tenant_queue_size = tenant_queue_size
        self.weights = weights
        self.observer = observer
        self._queue: list[_Queued] = []  # in fair order
        self._clock = FairClock()
        self._arrivals = itertools.count()
        self._per_tenant: collections.Counter[str | None] = collections.Counter()
        self._waiters: dict[str, _Waiter] = {}
        self._cond = threading.Condition()
        self._accepting = True
        self._closed = False

    # ---- the service's side -----------------------------------------------------------------------

    async def put(self, work: Work, listener: Listener | None = None) -> None:
        loop = asyncio.get_running_loop()
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            tenant = work.request.tenant
            waiting = self._per_tenant[tenant]
            if 0 < self.tenant_queue_size <= waiting:
                raise TenantQueueFull(f"this tenant has {waiting} requests waiting (the most one tenant may "
                                      f"queue, --tenant_queue_size); retry later")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later")
            self._waiters[work.id] = _Waiter(loop, loop.create_future(), listener)
            cost = work.images / self.weights(tenant)
            last = max((q.tag for q in self._queue if q.work.request.tenant == tenant), default=None)
            tag = self._clock.stamp(cost, last)
            bisect.insort(self._queue, _Queued(tag, next(self._arrivals), work),
                          key=lambda q: (q.tag, q.seq))
            self._per_tenant[tenant] += 1
            self.observer.queue_depth(len(self._queue))
            self._cond.notify()

    async def outcome(self, work: Work) -> RequestResult:
        return await await_answer(self._waiters, work)

    def cancel(self, work: Work) -> None:
        work.cancelled = True
        with self._cond:
            at = self._index(work)
            if at is not None:
                self._remove(at)
                self.observer.queue_depth(len(self._queue))

    async def position(self, work: Work) -> int | None:
        with self._cond:
            return self._index(work)

    def _index(self, work: Work) -> int | None:
        return next((n for n, q in enumerate(self._queue) if q.work is work), None)

    def _remove(self, at: int) -> _Queued:
        queued = self._queue.pop(at)
        tenant = queued.work.request.tenant
        self._per_tenant[tenant] -= 1
        if not self._per_tenant[tenant]:
            del self._per_tenant[tenant]
        return queued

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def reachable(self) -> bool:
        return True  # in this process

    @property
    def accepting(self) -> bool:
        return self._accepting

    def begin_drain(self) -> None:
        with self._cond:
            if self._accepting:
                log.info("queue: intake stopped, %d queued request(s) to finish", len(self._queue))
            self._accepting = False

    def close(self, error: ServiceError) -> None:
        self.begin_drain()
        with self._cond:
            self._closed = True
            leftover = [q.work for q in self._queue]
            self._queue.clear()
            self._per_tenant.clear()
            self.observer.queue_depth(0)
            self._cond.notify_all()
        for work in leftover:
            self.fail(work, error)

    # ---- the worker's side ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self, max_images: int, *, wait: float = 0.0) -> list[Work]:
        until = time.monotonic() + wait
        with self._cond:
            while not self._queue and not self._closed:
                left = until - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            taken = self._take_locked(max_images)
            self.observer.queue_depth(len(self._queue))
        return taken

    def _take_locked(self, max_images: int) -> list[Work]:
        now = time.monotonic()
        taken: list[Work] = []
        images = 0
        while self._queue:
            work = self._queue[0].work
            if work.cancelled:
                self._remove(0)
                continue
            if work.deadline <= now:
                self._remove(0)
                # Dropped before it costs GPU time; the requester's own timer usually answers first.
                self.fail(work, DeadlineExceeded("the request expired in the queue"))
                continue
            if taken and images + work.images > max_images:
                break
            self._clock.taken(self._remove(0).tag)
            taken.append(work)
            images += work.images
        return taken

    def tell(self, work: Work, event: Event) -> None:
        waiter = self._waiters.get(work.id)
        if waiter is None or waiter.listener is None:
            return
        listener = waiter.listener

        def deliver() -> None:
            try:
                listener(event)
            except Exception:  # a listener's bug must not cost the batch its progress
                log.exception("queue: a progress listener failed")

        self._call(waiter, deliver)

    def finish(self, work: Work, result: RequestResult) -> None:
        self._answer(work, result, None)

    def fail(self, work: Work, error: ServiceError) -> None:
        self._answer(work, None, error)

    def _answer(self, work: Work, result: RequestResult | None, error: ServiceError | None) -> None:
        waiter = self._waiters.get(work.id)
        if waiter is None:
            return

        def deliver() -> None:
            if waiter.future.done():
                return
            if error is not None:
                waiter.future.set_exception(error)
                waiter.future.exception()  # retrieved: nobody may be waiting any more (a cancelled job)
            else:
                waiter.future.set_result(result)  # type: ignore[arg-type]

        self._call(waiter, deliver)

    @staticmethod
    def _call(waiter: _Waiter, fn: object) -> None:
        try:
            waiter.loop.call_soon_threadsafe(fn)  # type: ignore[arg-type]
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("queue: event loop closed, dropping a message")
