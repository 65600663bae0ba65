"""Fair sharing between tenants (SPEC section 12) in both queues: the in-process `LocalQueue` and the Redis
queue against a real `redis-server` (two `RedisQueue`s with their own clients, as two replicas have).
The same scenarios run on each: the order work is taken in, weights, the per-tenant bound (429), a
cancelled request's tag given back, and positions in the fair order. The worker side is driven by hand
(take, finish) as the loop worker drives it; the server processes come in test_tenants.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from app.engine.jobs import Job
from app.engine.params import GenerationParams
from app.serving.core.errors import QueueFull, TenantQueueFull
from app.serving.core.types import ImageRequest, InstanceResult, RequestResult
from app.serving.queue.base import Work
from app.serving.queue.fair import FairClock
from app.serving.queue.local import LocalQueue
from app.serving.queue.redis_conn import resolve
from app.serving.queue.redis_queue import RedisQueue
from tests.support import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


class Pair:
    """Where work is put (`api`) and where it is taken (`worker`): one LocalQueue, or two RedisQueues."""

    def __init__(self, api: Any, worker: Any) -> None:
        self.api, self.worker = api, worker

    def take(self, images: int) -> list[Work]:
        taken = self.worker.take(images, wait=0.5)
        for w in taken:
            self.worker.finish(w, RequestResult([InstanceResult([], "jpeg", [], [], 0, {})], 0.0))
        return taken

    def drain(self, images: int) -> list[str | None]:
        """Take everything, `images` at a time: the tenants in the order their work was taken."""
        order: list[str | None] = []
        while taken := self.take(images):
            order += [w.request.tenant for w in taken]
        return order


@pytest.fixture(params=["local", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Pair]]:
    made: list[Any] = []

    def build(*, queue_size: int = 64, tenant_queue_size: int = 0,
              weights: dict[str, float] | None = None) -> Pair:
        def weight(t: str | None) -> float:
            return (weights or {}).get(t or "", 1.0)

        if request.param == "local":
            q = LocalQueue(queue_size, tenant_queue_size=tenant_queue_size, weights=weight)
            return Pair(q, q)
        srv: RedisServer = request.getfixturevalue("redis_server")
        target = resolve(srv.url, environ={})
        target.client().flushdb()
        api, worker = (RedisQueue(target, "kandinsky", consumer=name, queue_size=queue_size,
                                  tenant_queue_size=tenant_queue_size, weights=weight)
                       for name in ("api-0", "w-0"))
        made.extend((api, worker))
        return Pair(api, worker)

    yield build
    for q in made:
        q.close(QueueFull("closed"))
        await q.aclose()


def work(tenant: str | None, images: int = 4, seed: int = 1) -> Work:
    params = GenerationParams(seed=seed, images_to_gen=images, images_to_cherry_pick=1, super_res=False)
    now = time.monotonic()
    return Work(ImageRequest((Job("кот", params),), 60.0, "jobs", tenant), enqueued=now, deadline=now + 60.0)


async def test_a_tenant_with_one_job_waits_behind_at_most_one_of_another_s_six(make) -> None:
    q = make()
    running = work("A")
    await q.api.put(running)
    assert [w.id for w in await asyncio.to_thread(q.take, 4)] == [running.id]  # it runs now
    for n in range(6):
        await q.api.put(work("A", seed=n))
    b = work("B")
    await q.api.put(b)
    assert await q.api.position(b) <= 1  # the fair order, as positions tell it
    order = await asyncio.to_thread(q.drain, 4)
    assert order.index("B") <= 1, order
    assert order.count("A") == 6


async def test_without_tenants_the_order_is_first_in_first_out(make) -> None:
    q = make()
    sizes = [3, 1, 4, 1, 2, 4]
    works = [work(None, images=n, seed=i) for i, n in enumerate(sizes)]
    for w in works:
        await q.api.put(w)
    assert [await q.api.position(w) for w in works] == list(range(len(works)))
    taken = []
    while got := await asyncio.to_thread(q.take, 4):
        taken += [w.id for w in got]
    assert taken == [w.id for w in works]


async def test_backlogged_tenants_get_images_in_proportion_to_their_weights(make) -> None:
    q = make(weights={"B": 3.0})
    for n in range(12):
        await q.api.put(work("A", images=2, seed=n))
        await q.api.put(work("B", images=2, seed=n))
    first = (await asyncio.to_thread(q.drain, 2))[:12]  # while both still have work waiting
    assert first.count("B") == 9 and first.count("A") == 3, first


async def test_a_small_request_goes_before_a_larger_one_of_the_same_arrival(make) -> None:
    q = make()
    for n in range(3):
        await q.api.put(work("A", images=4, seed=n))
    await q.api.put(work("B", images=1))
    order = await asyncio.to_thread(q.drain, 4)
    assert order[0] == "B", order  # one image's tag comes before four images' tag


async def test_the_tenant_bound_answers_429_and_leaves_other_tenants_alone(make) -> None:
    q = make(queue_size=10, tenant_queue_size=2)
    await q.api.put(work("A"))
    await q.api.put(work("A"))
    with pytest.raises(TenantQueueFull) as refused:
        await q.api.put(work("A"))
    assert refused.value.status == 429 and refused.value.retry_after() and "tenant" in refused.value.message
    for _ in range(2):
        await q.api.put(work("B"))  # B has its own bound
    taken = await asyncio.to_thread(q.take, 4)
    assert len(taken) == 1
    await q.api.put(work(taken[0].request.tenant))  # its place is free again once taken


async def test_the_service_wide_bound_still_answers_503(make) -> None:
    q = make(queue_size=3, tenant_queue_size=2)
    for tenant in ("A", "B", "C"):
        await q.api.put(work(tenant))
    with pytest.raises(QueueFull) as refused:
        await q.api.put(work("D"))
    assert refused.value.status == 503


async def test_cancelled_requests_do_not_push_their_tenant_s_next_one_back(make) -> None:
    q = make()
    for n in range(6):
        await q.api.put(work("B", seed=n))
    first = work("A")
    await q.api.put(first)  # A has work waiting all along: its tags run on from its last one
    for n in range(30):  # a flood of submit-and-cancel
        w = work("A", seed=n)
        await q.api.put(w)
        q.api.cancel(w)
    await asyncio.sleep(0.2)  # the Redis queue sends its cancels in the background
    second = work("A", seed=99)
    await q.api.put(second)
    assert await q.api.position(second) <= 3
    taken = []
    while got := await asyncio.to_thread(q.take, 4):
        taken += [w.id for w in got]
    assert taken.index(second.id) <= 3, taken
    assert len(taken) == 8  # the cancelled ones never ran


async def test_cancelling_a_request_whose_ticket_passed_on_leaves_every_other_one_runnable(make) -> None:
    q = make()
    # A's three go in first; B's, last in, goes first in the fair order: the first ticket read (A's)
    # takes B's request, and B's ticket passes to A's first request.
    a = [work("A", images=4, seed=n) for n in range(3)]
    for w in a:
        await q.api.put(w)
    b = work("B", images=1)
    await q.api.put(b)
    (first,) = await asyncio.to_thread(q.take, 1)
    assert first.id == b.id
    q.api.cancel(a[0])
    await asyncio.sleep(0.2)
    rest = []
    while got := await asyncio.to_thread(q.take, 4):
        rest += [w.id for w in got]
    assert rest == [a[1].id, a[2].id]


def test_the_clock_gives_an_idle_tenant_no_credit_and_no_debt() -> None:
    clock = FairClock()
    assert clock.stamp(4.0, None) == 4.0
    assert clock.stamp(4.0, 4.0) == 8.0  # behind its own waiting work
    clock.taken(4.0)
    assert clock.stamp(4.0, None) == 8.0  # an idle tenant starts at the clock, not at zero
    clock.taken(2.0)
    assert clock.now == 4.0  # the clock never goes back


async def test_a_rolling_upgrade_s_old_entries_are_taken_and_old_claims_are_passed_over(
        redis_server: RedisServer) -> None:
    target = resolve(redis_server.url, environ={})
    client = target.client()
    client.flushdb()
    api, worker = (RedisQueue(target, "kandinsky", consumer=name) for name in ("api-0", "w-0"))
    try:
        from app.serving.queue.redis_wire import request_to_json

        new = [work("B", seed=n) for n in range(2)]
        for w in new:
            await api.put(w)
        # A worker of the previous version reads the first ticket and claims the request it names.
        worker._worker_client()  # the consumer group exists
        ((_, ((ticket, fields),)),) = client.xreadgroup("workers", "old", {api.stream: ">"}, count=1)
        assert fields[b"id"].decode() == new[0].id
        client.hset(api.work_key(new[0].id), "state", "running")
        client.decr(api.waiting_key)
        # What a replica of the previous version queues: its own entry naming it, no fair order.
        old = work("A", seed=1)
        entry = client.xadd(api.stream, {"id": old.id})
        client.hset(api.work_key(old.id), mapping={
            "state": "queued", "entry": entry, "request": request_to_json(old.request), "images": 4,
            "enqueued": time.time(), "deadline": time.time() + 60, "token": 0, "deliveries": 0})
        client.incr(api.waiting_key)
        taken: list[str] = []
        while got := await asyncio.to_thread(worker.take, 4, wait=0.5):
            taken += [w.id for w in got]
            for w in got:
                worker.finish(w, RequestResult([InstanceResult([], "jpeg", [], [], 0, {})], 0.0))
        assert taken == [new[1].id, old.id]  # the old worker's claim passed over, the old entry taken
        assert int(client.get(api.waiting_key) or 0) == 0 and client.zcard(api.fair_key) == 0
    finally:
        for q in (api, worker):
            q.close(QueueFull("closed"))
            await q.aclose()
