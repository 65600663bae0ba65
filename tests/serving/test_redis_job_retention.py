"""Retention of jobs kept in Redis (SPEC section 7 with `--redis_url`): the service side (`RedisJobs`) and
the worker side (`RedisJobWriter` through `RedisQueue`) against a real `redis-server`, without a model.

- the count bound drops cancelled jobs first, then failed ones, never a kept result while those remain;
- the byte bound expires the oldest result first: its record stays, says `result_expired`, and a late
  stream ends with that record; a result larger than the whole bound is not kept at all;
- past the TTL a job is gone from get and the listing, and its Idempotency-Key names nothing;
- with tenants (SPEC section 12), one tenant's flood drops its own jobs, never another's results, and a
  tenant's own bounds hold even while the totals are not reached.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from app.serving.core.errors import NotFound
from app.serving.core.schema import Limits, Schema
from app.serving.core.service import Service
from app.serving.core.types import InstanceResult, RequestResult
from app.serving.protocols.jobs import encode_data
from app.serving.queue.redis_conn import resolve
from app.serving.queue.redis_jobs import JobKeys, RedisJobs, RedisJobWriter, Retention
from app.serving.queue.redis_queue import RedisQueue

RESULT_CHARS = 20_000
_names = itertools.count()


class Store:
    """One model's jobs on Redis, both sides in this process."""

    def __init__(self, url: str, *, ttl: float = 3600, max_finished: int = 100, max_bytes: int = 1 << 30,
                 tenant_max_finished: int = 0, tenant_max_bytes: int = 0):
        model = f"m{next(_names)}"
        self.queue = RedisQueue(resolve(url, None), model, lease_s=30, keep_s=ttl)
        self.service = Service(model, timeout_s=600)
        self.service.open(self.queue, Schema(Limits(16, 64)), lambda: True)
        retention = Retention(ttl, max_finished, max_bytes, tenant_max_finished, tenant_max_bytes)
        self.jobs = RedisJobs(self.service, retention=retention, encode_data=encode_data)
        self.queue.job_writer = RedisJobWriter(self.queue, encode_data, retention=retention, worker="w-0")
        self.keys = JobKeys(self.queue.prefix)

    async def submit(self, seed: int, key: str | None = None, tenant: str | None = None) -> str:
        payload = {"instances": [{"query": "кот", "params": {"seed": seed, "images_to_gen": 1}}]}
        record, _ = await self.jobs.submit(payload, key, tenant)
        return record.id

    def run(self, *, fail: bool = False, chars: int = RESULT_CHARS) -> str:
        """The worker takes the oldest queued job and ends it: a result of `chars` base64 characters, or
        a failure."""
        (work,) = self.queue.take(1, wait=2.0)
        if fail:
            from app.serving.core.errors import GenerationFailed

            self.queue.fail(work, GenerationFailed("the GPU is on fire"))
        else:
            image = InstanceResult(images=["A" * chars], format="png", clip_scores=[0.5], ppl=[1.0], seed=1,
                                   timings={})
            self.queue.finish(work, RequestResult([image], queue_seconds=0.0))
        return work.id

    async def status(self, job_id: str, tenant: str | None = None) -> str | None:
        try:
            return (await self.jobs.get(job_id, tenant)).status.value
        except NotFound:
            return None

    async def close(self) -> None:
        await self.jobs.aclose()
        await self.queue.aclose()


def result_size() -> int:
    from app.serving.core.types import JobEvent, JobEventName

    image = InstanceResult(images=["A" * RESULT_CHARS], format="png", clip_scores=[0.5], ppl=[1.0], seed=1,
                           timings={})
    return len(encode_data(JobEvent(JobEventName.SUCCEEDED, RequestResult([image], 0.0))))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_the_count_bound_drops_cancelled_then_failed_jobs_before_any_result(redis_srv):
    async def scenario() -> None:
        store = Store(redis_srv.url, max_finished=3)
        kept = [await store.submit(1), await store.submit(2)]
        assert [store.run(), store.run()] == kept
        cancelled = [await store.submit(n) for n in (3, 4, 5)]
        for job_id in cancelled:
            await store.jobs.cancel(await store.jobs.get(job_id))
        assert [await store.status(j) for j in cancelled] == [None, None, "cancelled"]
        assert [r.id for r in await store.jobs.recent()] == [cancelled[2], *reversed(kept)]
        failed = [await store.submit(6), await store.submit(7)]
        store.run(fail=True)
        assert await store.status(cancelled[2]) is None  # the last cancelled one goes before a failure
        store.run(fail=True)
        assert [await store.status(j) for j in failed] == [None, "failed"]
        for job_id in kept:
            record = await store.jobs.get(job_id)
            assert record.status.value == "succeeded" and record.holds_result and record.final is not None
        counts = await store.queue.aio_client().hgetall(store.keys.counts)
        assert {k.decode(): int(v) for k, v in counts.items() if int(v)} == {"succeeded": 2, "failed": 1}
        await store.close()

    run(scenario())


def test_the_byte_bound_expires_the_oldest_result_and_keeps_its_record(redis_srv):
    size = result_size()

    async def scenario() -> None:
        store = Store(redis_srv.url, max_bytes=int(size * 2.5))
        ids = [await store.submit(n) for n in range(3)]
        for _ in ids:
            store.run()
        oldest = await store.jobs.get(ids[0])
        assert oldest.status.value == "succeeded" and oldest.result_expired and not oldest.holds_result
        for job_id in ids[1:]:
            assert (await store.jobs.get(job_id)).holds_result
        assert int(await store.queue.aio_client().get(store.keys.result_bytes)) == 2 * size
        # A late stream of the expired one ends with its record, which says so.
        events = [e async for e in store.jobs.events(oldest)]
        assert [e.name.value for e in events if e is not None] == ["status", "succeeded"]
        assert b'"result_expired":true' in events[-1].raw
        # A result larger than the whole bound is not kept, and pushes out nothing.
        huge = await store.submit(9)
        store.run(chars=RESULT_CHARS * 3)
        assert (await store.jobs.get(huge)).result_expired
        for job_id in ids[1:]:
            assert (await store.jobs.get(job_id)).holds_result
        await store.close()

    run(scenario())


def test_past_the_ttl_a_job_and_its_idempotency_key_are_gone(redis_srv):
    async def scenario() -> None:
        store = Store(redis_srv.url, ttl=1)
        first = await store.submit(1, key="nightly")
        store.run()
        assert await store.status(first) == "succeeded"
        await asyncio.sleep(2.2)
        await store.jobs._sweep(force=True)
        assert await store.status(first) is None
        assert await store.jobs.recent() == []
        again = await store.submit(1, key="nightly")
        assert again != first
        await store.close()

    run(scenario())



def test_one_tenant_s_flood_drops_its_own_jobs_and_never_another_s_results(redis_srv):
    size = result_size()

    async def scenario() -> None:
        store = Store(redis_srv.url, max_finished=6, max_bytes=int(size * 4.5))
        theirs = [await store.submit(n, tenant="B") for n in range(2)]
        for _ in theirs:
            store.run()
        mine = [await store.submit(10 + n, tenant="A") for n in range(5)]
        for _ in mine:
            store.run()  # A's results push the bytes over: A, holding the most, loses its oldest
        for n in range(20):  # then a flood of submit-and-cancel
            job_id = await store.submit(100 + n, tenant="A")
            await store.jobs.cancel(await store.jobs.get(job_id, "A"))
        for job_id in theirs:
            record = await store.jobs.get(job_id, "B")
            assert record.holds_result and not record.result_expired
        assert await store.status(theirs[0]) is None  # another tenant's job is a 404 (isolation)
        assert len(await store.jobs.recent(tenant="A")) == 4 and len(await store.jobs.recent(tenant="B")) == 2
        # A keeps its newest two results and, of its expired ones, the newest two records, beside one
        # cancelled job: its first expired record went with its 19 oldest cancelled ones
        assert [await store.status(job_id, "A") for job_id in mine] == [None] + ["succeeded"] * 4
        kept = [job_id for job_id in mine[1:] if (await store.jobs.get(job_id, "A")).holds_result]
        assert kept == mine[3:]
        assert int(await store.queue.aio_client().get(store.keys.result_bytes)) == 4 * size
        await store.close()

    run(scenario())


def test_a_tenant_s_own_bounds_hold_while_the_totals_are_not_reached(redis_srv):
    size = result_size()

    async def scenario() -> None:
        store = Store(redis_srv.url, tenant_max_finished=3, tenant_max_bytes=int(size * 1.5))
        other = await store.submit(0, tenant="B")
        store.run()
        mine = [await store.submit(n, tenant="A") for n in range(1, 5)]
        for _ in mine:
            store.run()
        assert (await store.jobs.get(other, "B")).holds_result
        assert await store.status(mine[0], "A") is None  # beyond A's 3 finished jobs
        left = [await store.jobs.get(job_id, "A") for job_id in mine[1:]]
        assert [r.holds_result for r in left] == [False, False, True]  # within 1.5 results of A's
        assert all(r.result_expired for r in left[:2])
        await store.close()

    run(scenario())
