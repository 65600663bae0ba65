"""Jobs on Redis (SPEC sections 7 and 11): every replica submits, answers, streams, cancels and
deduplicates any job. docs/ARCHITECTURE.md ("Many replicas as one service") has the design.

- A job is its queue work (the same id) plus `<prefix>job:<id>`: its record as JSON and its status,
  order (`seq`) and tenant; the listing `<prefix>jobs[@tenant]` (a sorted set by `seq`), and its
  Idempotency-Key `<prefix>idem:<sha256>`, all written with the queue entry in one script.
- The worker that runs the job writes its transitions (`RedisJobWriter`, the same transitions as
  in-process: `core.jobs.on_started/on_progress/on_final`) fenced by the run's token: the record and
  the job's events, each encoded once into `<prefix>jobevents:<id>` (a Stream: its entry ids are the
  events' SSE ids, so `Last-Event-ID` resumes). A kept result is `<prefix>result:<id>` (the `succeeded`
  entry points at it), so that a result expires without touching the stream.
- Each replica reads the streams its clients follow with one `XREAD` and hands each event, one shared
  object, to its local subscribers (bounded as in-process). A followed job has a `<prefix>watch:<id>`
  key with a short TTL, refreshed while a stream is open: the worker renders previews only then.
- Retention (TTL, the count bound with cancelled and failed jobs first, the byte bound on results, each
  in total and per tenant: `Retention`) is one script (`redis_scripts.RETAIN`), run after every final
  write and on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from app.serving.core.errors import Conflict, NotFound, ServiceError
from app.serving.core.jobs import fingerprint, not_found, on_final, on_progress, on_started
from app.serving.core.service import Service
from app.serving.core.types import (
    Event,
    JobEvent,
    JobEventName,
    JobRecord,
    JobStatus,
    RequestResult,
    Started,
)
from app.serving.queue import redis_scripts as scripts
from app.serving.queue.base import Work
from app.serving.queue.memory_jobs import Subscriber, Subscription
from app.serving.queue.observer import NULL_JOB_OBSERVER, JobObserver
from app.serving.queue.redis_queue import GROUP, READ_BLOCK_MS, Held, RedisQueue, unavailable

log = logging.getLogger(__name__)

EVENTS_KEPT = 64  # entries per job's event stream (progress and previews; the final one is the newest)
WATCH_S = 15  # a followed job's watch key lives this long unless refreshed
WATCH_REFRESH_S = 5.0
WATCHED_CACHE_S = 1.0  # the worker asks whether a job is followed at most this often
SWEEP_S = 5.0  # retention and the gauges, at most this often on each replica
_RECORD_FIELDS = ("id", "fingerprint", "idempotency_key", "created", "images", "tenant", "status", "started",
                  "finished", "step", "steps", "error", "result_expired", "worker")
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")

DataEncoder = Callable[[JobEvent], bytes]  # an event -> its data, one line of JSON (the protocol's)
T = TypeVar("T")


class JobKeys:
    """The keys of one model's jobs."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seq, self.counts, self.meta = prefix + "jobseq", prefix + "jobcounts", prefix + "jobmeta"
        self.result_bytes = prefix + "resultbytes"
        #: Finished jobs in the order retention drops them: cancelled; failed or without a result; results.
        self.sets = [prefix + "finished:cancelled", prefix + "finished:noresult", prefix + "finished:results"]

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}jobevents:{job_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}result:{job_id}"

    def watch(self, job_id: str) -> str:
        return f"{self.prefix}watch:{job_id}"

    def listing(self, tenant: str | None) -> str:
        return self.prefix + ("jobs" if tenant is None else f"jobs@{tenant}")

    def idempotency(self, tenant: str | None, key: str) -> str:
        digest = hashlib.sha256(f"{tenant or ''}\0{key}".encode()).hexdigest()
        return f"{self.prefix}idem:{digest}"

    def retain_keys(self) -> list[str]:
        return [*self.sets, self.meta, self.result_bytes, self.counts]


def record_to_json(record: JobRecord) -> str:
    raw = {name: getattr(record, name) for name in _RECORD_FIELDS}
    raw["status"] = record.status.value
    return json.dumps(raw, ensure_ascii=False)


def record_from_hash(fields: dict[bytes, bytes]) -> JobRecord:
    raw = json.loads(fields[b"record"])
    raw["status"] = JobStatus(fields.get(b"status", raw["status"].encode()).decode())
    record = JobRecord(**raw)
    record.seq = int(fields.get(b"seq", b"0"))
    record.result_expired = record.result_expired or fields.get(b"expired") == b"1"
    return record


def _idem_key(keys: JobKeys, record: JobRecord) -> str | None:
    return keys.idempotency(record.tenant, record.idempotency_key) if record.idempotency_key else None


def _meta(keys: JobKeys, record: JobRecord, result_bytes: int) -> tuple[int, str]:
    """A finished job's retention set and what the retention script needs to drop it."""
    idem = _idem_key(keys, record) or ""
    kept = 2 if result_bytes else 0 if record.status == JobStatus.CANCELLED else 1
    return kept, json.dumps({"status": record.status.value, "bytes": result_bytes,
                             "listing": keys.listing(record.tenant), "idem": idem,
                             "tenant": record.tenant or ""})


@dataclass(frozen=True)
class Retention:
    """How long and how many finished jobs are kept (SPEC sections 7 and 12): `ttl` seconds; at most
    `max_finished` jobs and `max_result_bytes` of results in all, and per tenant at most
    `tenant_max_finished` and `tenant_max_result_bytes` (0: no bound of its own)."""

    ttl: float
    max_finished: int
    max_result_bytes: int
    tenant_max_finished: int = 0
    tenant_max_result_bytes: int = 0

    @property
    def result_limit(self) -> int:
        """The largest result that can be kept at all."""
        return min(self.tenant_max_result_bytes or self.max_result_bytes, self.max_result_bytes)

    def args(self, keys: JobKeys, tenant: str | None = None) -> list[Any]:
        """RETAIN's arguments; `tenant`: whose job just finished (it loses a tie of holdings)."""
        return [keys.prefix, time.time(), self.ttl, self.max_finished, self.max_result_bytes,
                self.tenant_max_finished, self.tenant_max_result_bytes, tenant or ""]

    def log(self, reply: list[Any]) -> None:
        for job_id in reply[1:]:
            log.info("job %s: result expired to keep results within their bounds (%d bytes in all, %d per "
                     "tenant)", job_id.decode(), self.max_result_bytes, self.result_limit)


class RedisJobWriter:
    """The worker's side (`redis_queue.JobWriter`): a job's transitions, written with its run's token."""

    def __init__(self, queue: RedisQueue, encode_data: DataEncoder, *, retention: Retention, worker: str,
                 observer: JobObserver = NULL_JOB_OBSERVER) -> None:
        self.queue, self.encode_data, self.retention = queue, encode_data, retention
        self.ttl, self.worker = retention.ttl, worker
        self.observer = observer
        self.keys = JobKeys(queue.prefix)
        self._watched: dict[str, tuple[float, bool]] = {}

    def load(self, client: Any, job_id: str) -> JobRecord | None:
        fields = client.hgetall(self.keys.job(job_id))
        return record_from_hash(fields) if fields else None

    def tell(self, client: Any, held: Held, event: Event) -> int:
        assert held.job is not None
        if isinstance(event, Started):
            events = on_started(held.job, self.worker)
        else:
            events = on_progress(held.job, event)  # type: ignore[arg-type]
        return self._write(client, held, events) if events else 1

    def end(self, client: Any, held: Held, result: RequestResult | None, error: ServiceError | None) -> int:
        record = held.job
        assert record is not None
        if error is None:
            final = on_final(record, JobStatus.SUCCEEDED, result=result)
        else:
            final = on_final(record, JobStatus.FAILED, error=error.message)
        data = self.encode_data(final)
        kept = b""
        if final.name == JobEventName.SUCCEEDED:
            if len(data) > self.retention.result_limit:  # kept, it would push out every other one
                log.warning("job %s: its result of %d bytes alone exceeds the bound of results kept (%d); "
                            "not kept", record.id, len(data), self.retention.result_limit)
                record.result_expired = True
            else:
                kept = data
            data = b""  # the stream's entry points at the result's own key
        written = self._write(client, held, [final], data=[data], result=kept)
        self._watched.pop(record.id, None)
        if written == 1:
            reply = client.eval(scripts.RETAIN, 6, *self.keys.retain_keys(),
                                *self.retention.args(self.keys, record.tenant))
            self.retention.log(reply)
        return int(written)

    def _write(self, client: Any, held: Held, events: list[JobEvent], *, data: list[bytes] | None = None,
               result: bytes | None = None) -> int:
        record = held.job
        assert record is not None
        final = result is not None
        retention, meta = _meta(self.keys, record, len(result or b"")) if final else (0, "")
        idem = _idem_key(self.keys, record)
        keys = [self.queue.work_key(record.id), self.keys.job(record.id), self.keys.events(record.id),
                self.queue.stream, self.keys.counts, self.keys.result(record.id), self.keys.sets[retention],
                self.keys.meta, self.keys.result_bytes, idem or self.keys.job(record.id),
                self.queue.entries_key]
        args: list[Any] = [held.token, record_to_json(record), record.status.value, EVENTS_KEPT,
                           "1" if final else "0", GROUP, int(self.ttl), time.time(), result or b"", record.id,
                           meta]
        for n, event in enumerate(events):
            args += [event.name.value, data[n] if data is not None else self.encode_data(event)]
        written = int(client.eval(scripts.WRITE_JOB, len(keys), *keys, *args))
        if written == 1:
            for event in events:
                self.observer.job_event(event.name.value)
        return written

    def watched(self, client: Any, job_id: str) -> bool:
        """Whether some replica streams the job now (asked at most once a second per job)."""
        asked, answer = self._watched.get(job_id, (0.0, False))
        if time.monotonic() - asked >= WATCHED_CACHE_S:
            try:
                answer = bool(client.exists(self.keys.watch(job_id)))
            except redis.RedisError:
                answer = False
            self._watched[job_id] = (time.monotonic(), answer)
        return answer


@dataclass(eq=False)
class _Follower:
    """A local subscriber of a job's stream and the last entry it has been given."""

    sub: Subscriber
    after: tuple[int, int]


def _event_id(text: str) -> tuple[int, int]:
    ms, seq = text.split("-")
    return int(ms), int(seq)


class RedisJobs:
    """Submit, get, list, cancel and follow jobs kept in Redis (the interface of `core.jobs.Jobs`)."""

    def __init__(self, service: Service, *, retention: Retention, encode_data: DataEncoder,
                 observer: JobObserver = NULL_JOB_OBSERVER) -> None:
        self.service, self.retention, self.ttl = service, retention, retention.ttl
        self.encode_data = encode_data
        self.observer = observer
        self._followers: dict[str, set[_Follower]] = {}
        self._pump: asyncio.Task[None] | None = None
        self._reader: Any = None
        self._swept = 0.0
        self._result_bytes = 0
        #: Final events being sent now, one object per job on this replica (its bytes encoded once).
        self._finals: weakref.WeakValueDictionary[str, JobEvent] = weakref.WeakValueDictionary()

    @property
    def queue(self) -> RedisQueue:
        queue = self.service.queue
        if not isinstance(queue, RedisQueue):
            raise RuntimeError("jobs on Redis need the Redis queue")
        return queue

    @property
    def keys(self) -> JobKeys:
        return JobKeys(self.queue.prefix)

    async def _call(self, call: Awaitable[T]) -> T:
        """A Redis round trip, timed; Redis unreachable is `Unavailable` (503 with Retry-After)."""
        t0 = time.perf_counter()
        try:
            value = await call
        except redis.RedisError as exc:
            self.queue.observer.redis_call(time.perf_counter() - t0, ok=False)
            raise unavailable(exc) from None
        self.queue.observer.redis_call(time.perf_counter() - t0, ok=True)
        return value

    # ---- submit -----------------------------------------------------------------------------------

    async def submit(self, payload: Any, idempotency_key: str | None, tenant: str | None = None
                     ) -> tuple[JobRecord, bool]:
        """Validate and queue a predict body as a job; (the job, whether it is new). The Idempotency-Key
        is claimed together with the queue entry, so two replicas given one key make one job."""
        fprint = fingerprint(payload)
        keys = self.keys
        if idempotency_key is not None:
            known = await self._call(self.queue.aio_client().get(keys.idempotency(tenant, idempotency_key)))
            if known is not None:
                return await self._known(known.decode(), idempotency_key, fprint), False
        request = self.service.request(self.service.parse(payload), "jobs", tenant)
        record = JobRecord(id=uuid.uuid4().hex, fingerprint=fprint, idempotency_key=idempotency_key,
                           created=round(time.time(), 3),
                           images=[int(job.params.images_to_gen) for job in request.instances], tenant=tenant)
        now = time.monotonic()
        work = Work(request, enqueued=now, deadline=now + request.timeout_s, id=record.id)
        idem = keys.idempotency(tenant, idempotency_key) if idempotency_key is not None else None
        job_keys = [keys.job(record.id), keys.listing(tenant), keys.seq, idem or keys.job(record.id),
                    keys.counts]
        args = [record_to_json(record), "1" if idem else "0", int(request.timeout_s + self.ttl)]
        known_id = await self.queue.put_job(work, job_keys, args)
        if known_id is not None:
            assert idempotency_key is not None
            return await self._known(known_id, idempotency_key, fprint), False
        log.info("job %s queued: %d instance(s), %d image(s)", record.id, len(record.images), request.images)
        await self._sweep()
        return record, True

    async def _known(self, job_id: str, key: str, fprint: str) -> JobRecord:
        record = await self._load(job_id)
        if record is None:
            raise Conflict(f"Idempotency-Key {key!r} names a job that just expired; retry")
        if record.fingerprint != fprint:
            raise Conflict(f"Idempotency-Key {key!r} was used with another body")
        return record

    # ---- queries and cancel -----------------------------------------------------------------------

    async def _load(self, job_id: str) -> JobRecord | None:
        fields = await self._call(self.queue.aio_client().hgetall(self.keys.job(job_id)))
        return record_from_hash(fields) if fields else None

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The record as Redis has it, if it is `tenant`'s (another's is a 404 like a missing one); a
        succeeded job's kept result as its final event (`raw`)."""
        await self._sweep()
        record = await self._load(job_id)
        if record is None or record.tenant != tenant:
            raise not_found(job_id, self.ttl)
        if record.status == JobStatus.SUCCEEDED and not record.result_expired:
            record.final = await self.final_event(record)
            record.result_bytes = len(record.final.raw or b"") if not record.result_expired else 0
        return record

    async def recent(self, limit: int | None = None, tenant: str | None = None, before: int | None = None
                     ) -> list[JobRecord]:
        """The most recent jobs of `tenant`, newest first (without results)."""
        await self._sweep()
        client, listing = self.queue.aio_client(), self.keys.listing(tenant)
        top = f"({before}" if before is not None else "+inf"
        ids = await self._call(client.zrevrangebyscore(listing, top, "-inf", start=0, num=limit or 1 << 30))
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id.decode()))
        found = await self._call(pipe.execute())
        gone = [job_id for job_id, fields in zip(ids, found, strict=True) if not fields]
        if gone:  # expired with their TTL: the listing follows
            await self._call(client.zrem(listing, *gone))
        return [record_from_hash(fields) for fields in found if fields]

    async def position(self, record: JobRecord) -> int | None:
        if record.status != JobStatus.QUEUED:
            return None
        return await self.queue.position_of(record.id)

    async def snapshot(self, record: JobRecord) -> JobRecord:
        return dataclasses.replace(record, queue_position=await self.position(record))

    async def cancel(self, record: JobRecord) -> None:
        """Cancel from any replica: queued, it leaves the queue; running, its worker hears it by pub/sub
        and stops at the next tick; 409 once it ended (whoever ended it first wins, atomically)."""
        ended = dataclasses.replace(record)
        final = on_final(ended, JobStatus.CANCELLED)
        keys, queue = self.keys, self.queue
        _, meta = _meta(keys, ended, 0)
        idem = _idem_key(keys, record)
        script_keys = [keys.job(record.id), keys.events(record.id), keys.counts, keys.sets[0], keys.meta,
                       idem or keys.job(record.id), queue.work_key(record.id),
                       *queue.queue_keys(record.tenant)]
        args = [record_to_json(ended), self.encode_data(final), EVENTS_KEPT, int(self.ttl), time.time(),
                record.id, meta, queue.cancel_channel]
        reply = await self._call(queue.aio_client().eval(scripts.CANCEL_JOB, len(script_keys), *script_keys,
                                                         *args))
        if reply is None:
            raise NotFound(f"job {record.id!r} is unknown or expired")
        if reply != b"ok":
            raise Conflict(f"job {record.id} already {reply.decode()}")
        record.status, record.finished, record.error = ended.status, ended.finished, None
        log.info("job %s cancelled", record.id)
        self.observer.job_event(JobEventName.CANCELLED.value)
        await self._sweep(force=True, tenant=record.tenant)

    # ---- events -----------------------------------------------------------------------------------

    async def events(self, record: JobRecord, *, owner: bool = False, idle: float | None = None,
                     after: str | None = None) -> AsyncGenerator[JobEvent | None, None]:
        """As `Jobs.events`, from any replica; `after` (a `Last-Event-ID` this stream gave) resumes: the
        events after it that the stream still holds (the newest EVENTS_KEPT), up to the final one, also
        once the job ended."""
        keys, client = self.keys, self.queue.aio_client()
        resume = after is not None and _EVENT_ID.fullmatch(after) is not None
        if resume:  # what came after it is still in the stream (a finished job's final event at least)
            resume = bool(await self._call(client.xrange(keys.events(record.id), f"({after}", "+", count=1)))
        if not resume:
            newest = await self._call(client.xrevrange(keys.events(record.id), count=1))
            after = newest[0][0].decode() if newest else "0-0"
        assert after is not None
        await self._call(client.set(keys.watch(record.id), 1, ex=WATCH_S))
        now = await self._load(record.id) or record
        follower = _Follower(Subscriber(), _event_id(after))
        subscription = Subscription(follower.sub, lambda: self._unfollow(record.id, follower))
        clock = asyncio.get_running_loop().time
        due = None if idle is None else clock() + idle
        ended = now.done
        try:
            yield JobEvent(JobEventName.STATUS, await self.snapshot(now))
            if ended and not resume:
                yield await self.final_event(now)
                return
            self._followers.setdefault(record.id, set()).add(follower)
            if self._pump is None or self._pump.done():
                self._pump = asyncio.ensure_future(self._read())
            while True:
                event = await subscription.next(None if due is None else max(0.0, due - clock()))
                if event is not None:
                    yield event
                    if event.name.final:
                        ended = True
                        return
                if idle is not None and due is not None and clock() >= due:
                    yield None
                    due = clock() + idle
        finally:
            await subscription.aclose()
            if owner and not ended:
                log.info("job %s: its stream's client went away, cancelling it", record.id)
                with contextlib.suppress(ServiceError):
                    await self.cancel(record)

    def _unfollow(self, job_id: str, follower: _Follower) -> None:
        followers = self._followers.get(job_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._followers[job_id]

    async def final_event(self, record: JobRecord) -> JobEvent:
        """A finished job's final event, one object per job on this replica while it is being sent."""
        shared = self._finals.get(record.id)
        if shared is not None:
            return shared
        keys, client = self.keys, self.queue.aio_client()
        name = JobEventName(record.status.value)
        newest = await self._call(client.xrevrange(keys.events(record.id), count=1))
        entry_id = newest[0][0].decode() if newest else None
        is_final = bool(newest) and newest[0][1].get(b"event") == name.value.encode()
        data = newest[0][1].get(b"data", b"") if is_final else b""
        event = await self._final(record, name, entry_id, data)
        self._finals[record.id] = event
        return event

    async def _final(self, record: JobRecord, name: JobEventName, entry_id: str | None, data: bytes
                     ) -> JobEvent:
        if name == JobEventName.SUCCEEDED:
            result = await self._call(self.queue.aio_client().get(self.keys.result(record.id)))
            if result is not None:
                return JobEvent(name, None, raw=result, event_id=entry_id)
            record.result_expired, record.result_bytes = True, 0
            data = self.encode_data(JobEvent(name, dataclasses.replace(record, queue_position=None)))
        if not data:  # written without data (not expected): the record says what happened
            data = self.encode_data(JobEvent(name, dataclasses.replace(record, queue_position=None)))
        return JobEvent(name, None, raw=data, event_id=entry_id)

    async def _read(self) -> None:
        """One reader for every job this replica's clients follow: each event read once, one object
        handed to each local subscriber that has not had it (a subscriber resuming from an older id is
        served from the next read, which starts at the oldest position any follower needs)."""
        if self._reader is None:
            self._reader = self.queue.target.async_client(timeout=READ_BLOCK_MS / 1000 + 1.0)
        watched_at = 0.0
        while self._followers:
            cursors = {job_id: min(f.after for f in followers)
                       for job_id, followers in self._followers.items()}
            try:
                if time.monotonic() - watched_at >= WATCH_REFRESH_S:
                    watched_at = time.monotonic()
                    pipe = self._reader.pipeline(transaction=False)
                    for job_id in cursors:
                        pipe.set(self.keys.watch(job_id), 1, ex=WATCH_S)
                    await pipe.execute()
                streams = {self.keys.events(j): f"{c[0]}-{c[1]}" for j, c in cursors.items()}
                got = await self._reader.xread(streams, block=READ_BLOCK_MS)
                for key, entries in got or ():
                    job_id = key.decode().rsplit(":", 1)[1]
                    for entry_id, fields in entries:
                        await self._hand_out(job_id, cursors[job_id], entry_id.decode(), fields)
            except redis.RedisError:
                log.warning("reading job events from Redis failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)

    async def _hand_out(self, job_id: str, read_from: tuple[int, int], entry_id: str,
                        fields: dict[bytes, bytes]) -> None:
        at = _event_id(entry_id)
        takers = [f for f in self._followers.get(job_id, ()) if read_from <= f.after < at]
        if not takers:
            return
        name = JobEventName(fields[b"event"].decode())
        if name.final:
            record = await self._load(job_id)
            event = self._finals.get(job_id) if record is not None else None
            if record is None:
                event = JobEvent(name, None, raw=fields.get(b"data") or b"{}", event_id=entry_id)
            elif event is None:
                event = await self._final(record, name, entry_id, fields.get(b"data", b""))
                self._finals[job_id] = event
        else:
            event = JobEvent(name, None, raw=fields[b"data"], event_id=entry_id)
        for follower in takers:
            follower.after = at
            follower.sub.put(event)

    # ---- retention and gauges ---------------------------------------------------------------------

    async def _sweep(self, *, force: bool = False, tenant: str | None = None) -> None:
        """Retention (TTL, count and byte bounds) and the job gauges, at most every SWEEP_S seconds."""
        if not force and time.monotonic() - self._swept < SWEEP_S:
            return
        self._swept = time.monotonic()
        keys, client = self.keys, self.queue.aio_client()
        try:
            reply = await client.eval(scripts.RETAIN, 6, *keys.retain_keys(),
                                      *self.retention.args(keys, tenant))
            self.retention.log(reply)
            counts = await client.hgetall(keys.counts)
            self._result_bytes = int(await client.get(keys.result_bytes) or 0)
        except redis.RedisError:
            log.warning("job retention in Redis failed; retried at the next sweep")
            return
        self.observer.job_counts({s.value: max(0, int(counts.get(s.value.encode(), 0))) for s in JobStatus})

    def result_bytes(self) -> int:
        """Bytes of the results kept in Redis (as of the last sweep)."""
        return self._result_bytes

    async def aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self._reader is not None:
            await self._reader.aclose()

