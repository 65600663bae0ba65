"""The `WorkQueue` on Redis (SPEC section 11): one queue for every replica, work leased so that a killed
replica loses nothing. docs/ARCHITECTURE.md ("Many replicas as one service") has the design.

- The queue is a Stream (`<prefix>queue`) with the consumer group `workers`; `<prefix>waiting` counts the
  entries not yet taken, so `--queue_size` bounds the whole service (one Lua script checks and adds), and
  `<prefix>fair@<tenant>` holds each tenant's (`--tenant_queue_size`, 429).
- The entries are tickets: a worker that reads one claims with it the request first in the fair order
  between tenants (`<prefix>fair`, a sorted set by virtual-time tag, queue/fair.py), so tenants are
  served in turn weighted by images across every replica (redis_scripts.py explains the ticket swap).
- Each request has a hash `<prefix>work:<id>`: the typed request as JSON, its absolute deadline, its
  state (queued, running, cancelled, done), owner and fencing token, and a Stream of its events
  `<prefix>events:<id>` (started, progress, result, error). The replica that holds the client's
  connection reads that stream (one `XREAD` for all the requests it waits on) and answers from it.
- A worker takes one entry at a time (`XREADGROUP`) and claims with it a script that moves a request
  from queued to running and increments its token; every later write of that run (progress, result,
  error) goes through a script that checks the token, so a worker that lost its lease cannot write
  over the new owner's result. Leases are the group's pending entries: the worker renews its own
  (`XCLAIM ... JUSTID`) while it runs them; a sweep on every worker takes over entries idle past the
  lease (`XAUTOCLAIM`) and reruns them from the start with their seed, failing one delivered more than
  `max_deliveries` times.
- Cancel marks the hash and publishes the id on `<prefix>cancel`; a queued entry is removed at once, a
  running one is stopped by the worker that holds it at its next step (its subscriber thread sets
  `Work.cancelled`), with no Redis read per step.

Service side: coroutines on the event loop with an asyncio client. Worker side: a blocking client on the
worker's thread, plus two threads (lease keeper, cancel subscriber). Redis errors on the service side are
`Unavailable` (503 with Retry-After), never a hang: every command has a 1 s socket timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from app.serving.core import errors
from app.serving.core.errors import QueueFull, ServiceError, ShuttingDown, TenantQueueFull
from app.serving.core.types import (
    Event,
    JobRecord,
    Listener,
    RequestResult,
    Started,
)
from app.serving.queue import redis_scripts as scripts
from app.serving.queue.base import Work, await_answer
from app.serving.queue.fair import Weights, equal_weights
from app.serving.queue.observer import NULL_OBSERVER, QueueObserver
from app.serving.queue.redis_conn import RedisTarget
from app.serving.queue.redis_wire import (
    error_from_json,
    error_to_json,
    progress_from_json,
    progress_to_json,
    request_from_json,
    request_to_json,
    result_from_json,
    result_to_json,
)

log = logging.getLogger(__name__)

GROUP = "workers"
EVENTS_MAXLEN = 512  # progress entries kept per request (the final event is always the newest)
READ_BLOCK_MS = 250  # how long one XREAD of the waiters' streams blocks before it re-reads its set
POLL_S = 0.05  # a busy worker with free slots looks at the queue at most this often (no read per step)
PING_S = 1.0  # readiness asks Redis at most this often
TAKE_BACKOFF_S = 1.0  # after a failed take, the worker asks Redis again this much later


class Unavailable(QueueFull):
    """Redis cannot be reached: 503 with Retry-After, like a full queue."""


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[RequestResult]
    listener: Listener | None
    last_id: str = "0-0"


@dataclass(eq=False)
class Held:
    """Work this worker runs: its stream entry and the token that fences its writes; a job's record."""

    work: Work
    entry: str
    token: int
    job: JobRecord | None = None


class JobWriter(Protocol):
    """The worker's side of jobs kept in Redis (`redis_jobs.RedisJobWriter`): a job's record read at
    claim, and its transitions written with the run's token. Writes answer 1, 0 (the lease was taken
    over: stop) or -1 (the job had ended, cancelled: stop)."""

    def load(self, client: Any, job_id: str) -> JobRecord | None: ...

    def tell(self, client: Any, held: Held, event: Event) -> int: ...

    def end(self, client: Any, held: Held, result: RequestResult | None, error: ServiceError | None
            ) -> int: ...

    def watched(self, client: Any, job_id: str) -> bool: ...


class RedisQueue:
    """A `WorkQueue` shared by every replica through Redis (see the module docstring)."""

    def __init__(self, target: RedisTarget, model: str, *, queue_size: int = 32, lease_s: float = 30.0,
                 max_deliveries: int = 3, keep_s: float = 3600.0, consumer: str = "worker",
                 observer: QueueObserver = NULL_OBSERVER, tenant_queue_size: int = 0,
                 weights: Weights = equal_weights) -> None:
        self.target, self.queue_size, self.lease_s = target, queue_size, lease_s
        self.tenant_queue_size, self.weights = tenant_queue_size, weights
        self.max_deliveries, self.keep_s, self.consumer = max_deliveries, keep_s, consumer
        self.observer = observer
        self.prefix = f"kandinsky:{model}:"
        self.stream = self.prefix + "queue"
        self.waiting_key = self.prefix + "waiting"
        self.fair_key, self.entries_key = self.prefix + "fair", self.prefix + "entries"
        self.cancel_channel = self.prefix + "cancel"
        # Any: redis-py's reply types are unions of every reply shape; the replies are read as documented.
        self._aio: Any = None
        self._reader: Any = None
        self._waiters: dict[str, _Waiter] = {}
        self._pump: asyncio.Task[None] | None = None
        self._accepting = True
        self._closed = False
        self._depth = 0
        self._reachable = (0.0, True)  # (when asked, answer)
        self._next_poll = 0.0
        self._backoff_until = 0.0  # the worker takes nothing before this (Redis failed)
        self._take_logged = float("-inf")
        # worker side
        self._sync: Any = None
        self._held: dict[str, Held] = {}
        self.job_writer: JobWriter | None = None  # jobs kept in Redis (set when they are)
        self._reclaimed: list[str] = []  # tickets taken over from a lapsed lease
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def queue_keys(self, tenant: str | None = None) -> list[str]:
        """The keys every queue script takes first, in redis_scripts' order, with `tenant`'s sorted set."""
        return [self.waiting_key, self.stream, self.fair_key, self.prefix + "clock",
                f"{self.prefix}fair@{tenant or ''}", self.entries_key]

    def work_key(self, work_id: str) -> str:
        return f"{self.prefix}work:{work_id}"

    def events_key(self, work_id: str) -> str:
        return f"{self.prefix}events:{work_id}"

    # ---- the service's side -----------------------------------------------------------------------

    def aio_client(self) -> Any:
        if self._aio is None:
            self._aio = self.target.async_client()
        return self._aio

    async def put(self, work: Work, listener: Listener | None = None) -> None:
        await self._put(work, scripts.PUT, [], [])
        loop = asyncio.get_running_loop()
        self._waiters[work.id] = _Waiter(loop.create_future(), listener)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.ensure_future(self._read_events())

    async def put_job(self, work: Work, keys: list[str], args: list[Any]) -> str | None:
        """Queue a job's work together with its record (`redis_jobs` gives their keys and values after
        the queue's: see `redis_scripts.PUT_JOB`); the job an Idempotency-Key already names, if one
        does (nothing is queued then). Nobody waits here: the job's events live in its own stream."""
        reply = await self._put(work, scripts.PUT_JOB, keys, args)
        return reply[len(b"known:"):].decode() if reply.startswith(b"known:") else None

    async def _put(self, work: Work, script: str, more_keys: list[str], more_args: list[Any]) -> bytes:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        now_unix, now = time.time(), time.monotonic()
        tenant = work.request.tenant
        keys = [*self.queue_keys(tenant), self.work_key(work.id), *more_keys]
        args = [self.queue_size, work.id, request_to_json(work.request), work.images, now_unix,
                now_unix + (work.deadline - now), int(self.keep_s + work.deadline - now), tenant or "",
                repr(work.images / self.weights(tenant)), self.tenant_queue_size, *more_args]
        t0 = time.perf_counter()
        try:
            reply = await self.aio_client().eval(script, len(keys), *keys, *args)
        except redis.RedisError as exc:
            self.observer.redis_call(time.perf_counter() - t0, ok=False)
            raise unavailable(exc) from None
        self.observer.redis_call(time.perf_counter() - t0, ok=True)
        if reply is None:
            raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later")
        if bytes(reply).startswith(b"tenant:"):
            raise TenantQueueFull(f"this tenant has {int(reply[7:])} requests waiting (the most one tenant "
                                  "may queue, --tenant_queue_size); retry later")
        return bytes(reply)

    async def outcome(self, work: Work) -> RequestResult:
        return await await_answer(self._waiters, work)

    def cancel(self, work: Work) -> None:
        work.cancelled = True
        waiter = self._waiters.get(work.id)
        if waiter is not None and not waiter.future.done():
            waiter.future.cancel()
        self._waiters.pop(work.id, None)
        asyncio.ensure_future(self._cancel(work.id, work.request.tenant))

    async def _cancel(self, work_id: str, tenant: str | None) -> None:
        keys = [self.work_key(work_id), *self.queue_keys(tenant)]
        try:
            await self.aio_client().eval(scripts.CANCEL, len(keys), *keys, work_id, self.cancel_channel)
        except redis.RedisError:
            log.warning("could not send a cancel to Redis; the work runs on until its deadline")

    async def position(self, work: Work) -> int | None:
        return await self.position_of(work.id)

    async def position_of(self, work_id: str) -> int | None:
        try:  # its place in the fair order
            rank = await self.aio_client().zrank(self.fair_key, work_id)
            return None if rank is None else int(rank)
        except redis.RedisError as exc:
            raise unavailable(exc) from None

    @property
    def depth(self) -> int:
        return self._depth

    async def reachable(self) -> bool:
        """Whether Redis answers (asked at most once a second): readiness is false while it does not."""
        asked, answer = self._reachable
        if time.monotonic() - asked < PING_S:
            return answer
        t0 = time.perf_counter()
        try:
            answer = bool(await self.aio_client().ping())
            self.observer.redis_call(time.perf_counter() - t0, ok=True)
            await self.refresh_depth()
        except redis.RedisError:
            self.observer.redis_call(time.perf_counter() - t0, ok=False)
            answer = False
        self._reachable = (time.monotonic(), answer)
        return answer

    async def refresh_depth(self) -> int:
        value = await self.aio_client().get(self.waiting_key)
        self._depth = int(value or 0)
        self.observer.queue_depth(self._depth)
        return self._depth

    @property
    def accepting(self) -> bool:
        return self._accepting

    def begin_drain(self) -> None:
        self._accepting = False

    def close(self, error: ServiceError) -> None:
        self.begin_drain()
        self._closed = True
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self._waiters.clear()
        self._hand_back_all()

    async def aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        for client in (self._aio, self._reader):
            if client is not None:
                await client.aclose()

    async def _read_events(self) -> None:
        """One reader for every request this replica waits on: their event streams, each from where it
        left off, answered and told to their listeners."""
        if self._reader is None:
            self._reader = self.target.async_client(timeout=READ_BLOCK_MS / 1000 + 1.0)
        while True:
            streams = {self.events_key(wid): w.last_id for wid, w in list(self._waiters.items())
                       if not w.future.done()}
            if not streams:
                return
            try:
                got = await self._reader.xread(streams, block=READ_BLOCK_MS)
            except redis.RedisError:
                log.warning("reading request events from Redis failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            for key, entries in got or ():
                wid = key.decode().rsplit(":", 1)[1]
                waiter = self._waiters.get(wid)
                if waiter is None or waiter.future.done():
                    continue
                for entry_id, fields in entries:
                    waiter.last_id = entry_id.decode()
                    self._deliver(wid, waiter, fields[b"kind"].decode(), fields[b"data"].decode())

    def _deliver(self, wid: str, waiter: _Waiter, kind: str, data: str) -> None:
        if kind in ("result", "error"):  # the waiter leaves once `outcome` has read it
            if waiter.future.done():
                return
            if kind == "result":
                waiter.future.set_result(result_from_json(data))
            else:
                waiter.future.set_exception(error_from_json(data))
            return
        if waiter.listener is None:
            return
        event: Event = Started() if kind == "started" else progress_from_json(data)
        try:
            waiter.listener(event)
        except Exception:  # a listener's fault never stops the reader
            log.exception("a request's listener failed")

    # ---- the worker's side ------------------------------------------------------------------------

    def _worker_client(self) -> Any:
        if self._sync is None:
            self._sync = self.target.client(timeout=max(1.0, self.lease_s / 3))
            try:
                self._sync.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return self._sync

    def start_worker_threads(self) -> None:
        """The lease keeper (renews held entries, takes over lapsed ones) and the cancel subscriber."""
        for target, name in ((self._keep_leases, "kandinsky-leases"),
                             (self._listen_cancels, "kandinsky-cancels")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self, max_images: int, *, wait: float = 0.0) -> list[Work]:
        """Queued work up to `max_images` images (the first request whatever its size), reclaimed work
        first; blocks up to `wait` seconds for the first."""
        if not self._accepting or max_images <= 0:  # draining: other replicas take what is queued
            time.sleep(wait)
            return []
        now = time.monotonic()
        if now < self._backoff_until:  # Redis failed lately: the running work goes on meanwhile
            time.sleep(min(wait, self._backoff_until - now))
            return []
        if not wait and now < self._next_poll and not self._reclaimed:
            return []
        taken: list[Work] = []
        images = 0
        block: int | None = int(wait * 1000) or None
        try:
            client = self._worker_client()
            while images < max_images and not self._closed:
                with self._lock:
                    entry = self._reclaimed.pop(0) if self._reclaimed else None
                if entry is None:
                    got = client.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=1, block=block)
                    if not got:
                        self._next_poll = time.monotonic() + POLL_S
                        break
                    entry = got[0][1][0][0].decode()
                block = None
                work = self._claim(client, entry)
                if work is not None:
                    taken.append(work)
                    images += work.images
        except redis.RedisError as exc:
            # Nothing more is taken for a while (what was claimed runs; an entry read but not claimed is
            # taken over by a sweep once Redis answers); a worker never treats this as a broken loop.
            self._backoff_until = time.monotonic() + TAKE_BACKOFF_S
            if time.monotonic() - self._take_logged >= 10.0:
                self._take_logged = time.monotonic()
                log.warning("taking work from Redis failed (%s); retrying every %g s", type(exc).__name__,
                            TAKE_BACKOFF_S)
            if not taken:
                time.sleep(min(wait, TAKE_BACKOFF_S))
        return taken

    def _claim(self, client: Any, entry: str) -> Work | None:
        """Claim with a ticket (read or taken over) the request first in the fair order, or the running
        request the ticket already held; None when the ticket was void (its request cancelled)."""
        keys = self.queue_keys()
        claimed = client.eval(scripts.CLAIM, len(keys), *keys, entry, self.consumer, GROUP, self.prefix)
        if claimed is None:
            return None
        wid, token = claimed[0].decode(), claimed[1]
        raw = client.hgetall(self.work_key(wid))
        deliveries = int(raw.get(b"deliveries", b"1"))
        self.observer.delivery(takeover=deliveries > 1, exhausted=deliveries > self.max_deliveries)
        now_unix, now = time.time(), time.monotonic()
        request = request_from_json(raw[b"request"].decode())
        work = Work(request, enqueued=now - (now_unix - float(raw[b"enqueued"])),
                    deadline=now + (float(raw[b"deadline"]) - now_unix), id=wid)
        held = Held(work, entry, int(token))
        writer = self.job_writer
        if raw.get(b"job") and writer is not None:
            held.job = writer.load(client, wid)
            if held.job is None or held.job.done:  # expired, or ended (cancelled) meanwhile
                client.eval(scripts.RELEASE, 3, self.work_key(wid), self.stream, self.entries_key,
                            held.token, GROUP)
                return None
            work.wants_previews = lambda: writer.watched(self._worker_client(), wid)
        with self._lock:
            self._held[wid] = held
        if deliveries > self.max_deliveries:
            self.fail(work, errors.GenerationFailed(
                f"the request was started {deliveries - 1} times and its worker was lost each time "
                f"(--max_deliveries {self.max_deliveries}); not retried again"))
            return None
        if work.deadline <= now:  # dropped before it costs GPU time, as in-process
            self.fail(work, errors.DeadlineExceeded("the request expired in the queue"))
            return None
        if deliveries > 1:
            log.warning("request %s: taken over after its worker's lease lapsed (delivery %d of at most "
                        "%d)", wid, deliveries, self.max_deliveries)
        return work

    def _write(self, client: Any, held: Held, kind: str, data: str, *, final: bool) -> bool:
        keys = [self.work_key(held.work.id), self.events_key(held.work.id), self.stream, self.entries_key]
        args = [held.token, kind, data, "1" if final else "0", EVENTS_MAXLEN, GROUP, int(self.keep_s)]
        return bool(client.eval(scripts.WRITE, len(keys), *keys, *args))

    def tell(self, work: Work, event: Event) -> None:
        held = self._held.get(work.id)
        if held is None or work.cancelled:
            return
        kind, data = ("started", "") if isinstance(event, Started) else ("progress", progress_to_json(event))
        try:
            client = self._worker_client()
            if self.job_writer is not None and held.job is not None:
                if self.job_writer.tell(client, held, event) != 1:
                    self._lost(work)
            elif not self._write(client, held, kind, data, final=False):
                self._lost(work)
        except redis.RedisError:
            log.warning("request %s: could not record its progress in Redis", work.id)

    def finish(self, work: Work, result: RequestResult) -> None:
        self._final(work, result, None)

    def fail(self, work: Work, error: ServiceError) -> None:
        self._final(work, None, error)

    def _final(self, work: Work, result: RequestResult | None, error: ServiceError | None) -> None:
        with self._lock:
            held = self._held.pop(work.id, None)
        if held is None:
            return
        kind = "result" if error is None else "error"
        try:
            client = self._worker_client()
            if self.job_writer is not None and held.job is not None:
                written = self.job_writer.end(client, held, result, error)
            else:
                data = result_to_json(result) if result is not None else error_to_json(error)  # type: ignore[arg-type]
                written = int(self._write(client, held, kind, data, final=True))
            if written == 0:
                log.warning("request %s: its lease was taken over; this worker's late %s is dropped",
                            work.id, kind)
        except redis.RedisError:
            # The lease lapses and another worker reruns it: nothing is lost, the time is.
            log.warning("request %s: could not record its %s in Redis; it will be rerun", work.id, kind)

    def _lost(self, work: Work) -> None:
        """Another worker owns this work now: stop running it here."""
        log.warning("request %s: its lease was taken over by another worker; stopping it here", work.id)
        work.cancelled = True
        with self._lock:
            self._held.pop(work.id, None)

    def _keep_leases(self) -> None:
        client: Any = self.target.client(timeout=max(1.0, self.lease_s / 3))
        while not self._closed:
            time.sleep(self.lease_s / 3)
            try:
                held = self._settle_held(client)
                if held:
                    keys = [self.stream, *(self.work_key(h.work.id) for h in held)]
                    args: list[Any] = [GROUP, self.consumer]
                    for h in held:
                        args += [h.token, h.entry]
                    kept = client.eval(scripts.RENEW, len(keys), *keys, *args)
                    for h, ok in zip(held, kept, strict=True):
                        if not ok:
                            self._lost(h.work)
                _, lapsed, _ = client.xautoclaim(self.stream, GROUP, self.consumer,
                                                 int(self.lease_s * 1000), "0-0", count=16, justid=False)
                for entry_b, fields in lapsed:
                    if not fields:
                        continue  # removed from the stream (finished or cancelled) meanwhile
                    entry = entry_b.decode()
                    wid = client.hget(self.entries_key, entry)
                    delivered = int(client.hget(self.work_key(wid.decode()), "deliveries") or 0) if wid else 0
                    if delivered >= self.max_deliveries:
                        self._claim(client, entry)  # fails it, saying why, without running it
                        continue
                    with self._lock:
                        self._reclaimed.append(entry)
            except redis.RedisError:
                log.warning("renewing leases in Redis failed; retrying", exc_info=True)

    def _settle_held(self, client: Any) -> list[Held]:
        """Held work that was cancelled leaves the queue (the worker dropped it without an answer); work
        past its deadline fails (a job has no waiter whose timeout would); the rest is returned."""
        now = time.monotonic()
        with self._lock:
            held = list(self._held.values())
        for h in held:
            if h.work.deadline <= now and not h.work.cancelled:
                h.work.cancelled = True  # the worker stops it at its next step
                limit = h.work.deadline - h.work.enqueued
                self.fail(h.work, errors.DeadlineExceeded(
                    f"the request did not finish within the server deadline of {limit:g} s"))
            elif h.work.cancelled:
                with self._lock:
                    self._held.pop(h.work.id, None)
                client.eval(scripts.RELEASE, 3, self.work_key(h.work.id), self.stream, self.entries_key,
                            h.token, GROUP)
        with self._lock:
            return list(self._held.values())

    def _listen_cancels(self) -> None:
        while not self._closed:
            try:
                listener: Any = self.target.client(timeout=None)
                pubsub = listener.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.cancel_channel)
                for message in pubsub.listen():
                    if self._closed:
                        return
                    held = self._held.get(message["data"].decode())
                    if held is not None:
                        held.work.cancelled = True
            except redis.RedisError:
                log.warning("the cancel subscription to Redis failed; resubscribing", exc_info=True)
                time.sleep(1.0)

    def _hand_back_all(self) -> None:
        """Draining: the entries still held go back at once (idle past the lease) for another worker."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.work.cancelled = True  # this worker stops it; another reruns it with its seed
        if not held or self._sync is None:
            return
        log.info("handing %d request(s) back to the other workers", len(held))
        try:
            idle = int(self.lease_s * 1000) + 1
            self._sync.xclaim(self.stream, GROUP, self.consumer, 0, [h.entry for h in held], idle=idle,
                              justid=True)
        except redis.RedisError:
            log.warning("could not hand work back to Redis; it is rerun once its lease lapses")


def unavailable(exc: Exception) -> Unavailable:
    log.warning("Redis is unreachable (%s)", type(exc).__name__)
    return Unavailable("the queue's store is unreachable; retry later")

