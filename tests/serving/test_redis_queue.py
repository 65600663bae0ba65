"""The Redis `WorkQueue` against a real `redis-server`: one queue for several replicas (each a
`RedisQueue` with its own clients, as separate processes have), a global bound, cancel, positions,
leases that a survivor takes over, fenced writes, `max_deliveries`, and a Redis that is gone.

The worker side is driven by hand here (take, tell, finish) as the loop worker drives it; the server
processes come in the many-replicas tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.engine.jobs import Job, Progress
from app.engine.params import GenerationParams, ImagePrompt
from app.serving.core.errors import DeadlineExceeded, GenerationFailed, QueueFull
from app.serving.core.types import ImageRequest, InstanceResult, Progressed, RequestResult, Started
from app.serving.queue.base import Work
from app.serving.queue.redis_conn import resolve
from app.serving.queue.redis_queue import RedisQueue, Unavailable, request_from_json, request_to_json
from tests.support import RedisServer

MODEL = "kandinsky"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh(server: RedisServer) -> RedisServer:
    resolve(server.url, environ={}).client().flushdb()
    return server


def queue(server: RedisServer, name: str, **kw) -> RedisQueue:  # type: ignore[no-untyped-def]
    return RedisQueue(resolve(server.url, environ={}), MODEL, consumer=name, **kw)


def work(seed: int, images: int = 1, timeout: float = 60.0, query: str = "кот") -> Work:
    params = GenerationParams(seed=seed, images_to_gen=images, images_to_cherry_pick=1, super_res=False)
    now = time.monotonic()
    return Work(ImageRequest((Job(query, params),), timeout, "v1"), enqueued=now, deadline=now + timeout)


def result(seed: int) -> RequestResult:
    inst = InstanceResult(images=[f"img-{seed}"], format="jpeg", clip_scores=[0.5], ppl=[3.0], seed=seed,
                          timings={"generate": 1.0})
    return RequestResult([inst], queue_seconds=0.1)


def test_a_request_survives_its_json_form_whole() -> None:
    prompt = ImagePrompt(image="aGVsbG8=", borders={"up": 3, "left": 0}, crop_first=True)
    params = GenerationParams(seed=2**62, images_to_gen=3, top_p=0.9, image_prompt=prompt, format="png")
    request = ImageRequest((Job("Кот \"в\" шляпе", params), Job("дом", GenerationParams(seed=1))), 30.0,
                           "grpc", "team-a")
    back = request_from_json(request_to_json(request))
    assert back.instances[0].params == params and back.instances[0].query == "Кот \"в\" шляпе"
    assert (back.timeout_s, back.protocol, back.tenant) == (30.0, "grpc", "team-a")


async def test_work_put_on_one_replica_runs_on_another_and_is_answered_with_its_events(fresh) -> None:
    api, worker = queue(fresh, "api"), queue(fresh, "w1")
    heard: list[object] = []
    w = work(7)
    await api.put(w, heard.append)
    assert await api.position(w) == 0
    (taken,) = await asyncio.to_thread(worker.take, 4, wait=1.0)
    assert taken.id == w.id and taken.request == w.request  # the typed request, across the wire
    assert await api.position(w) is None  # running
    worker.tell(taken, Started())
    worker.tell(taken, Progressed((Progress(step=512, steps=1024),)))
    worker.finish(taken, result(7))
    got = await asyncio.wait_for(api.outcome(w), 10)
    assert got == result(7)
    assert heard == [Started(), Progressed((Progress(step=512, steps=1024),))]
    await api.aclose()


async def test_the_bound_is_global_across_replicas_and_a_cancel_frees_its_place(fresh) -> None:
    a, b = queue(fresh, "a", queue_size=2), queue(fresh, "b", queue_size=2)
    first, second = work(1), work(2)
    await a.put(first)
    await b.put(second)
    assert [await a.position(first), await b.position(second)] == [0, 1]
    with pytest.raises(QueueFull, match="queue is full"):
        await a.put(work(3))
    a.cancel(first)
    await asyncio.sleep(0.1)
    assert await b.position(second) == 0
    third = work(3)
    await a.put(third)  # the cancelled one's place
    worker = queue(fresh, "w")
    taken = await asyncio.to_thread(worker.take, 8, wait=1.0)
    assert [t.id for t in taken] == [second.id, third.id]  # the cancelled one never runs
    for t in (a, b):
        await t.aclose()


async def test_a_cancel_reaches_the_worker_running_it(fresh) -> None:
    api, worker = queue(fresh, "api"), queue(fresh, "w1", lease_s=3.0)
    worker.start_worker_threads()
    w = work(5)
    await api.put(w)
    (taken,) = await asyncio.to_thread(worker.take, 1, wait=1.0)
    await asyncio.sleep(0.3)  # the cancel subscriber is listening
    api.cancel(w)
    deadline = time.monotonic() + 5
    while not taken.cancelled and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert taken.cancelled
    worker.close(GenerationFailed("stop"))
    await api.aclose()


async def test_a_lapsed_lease_is_taken_over_and_the_old_owner_cannot_write_over_it(fresh) -> None:
    api = queue(fresh, "api")
    dead, survivor = queue(fresh, "dead", lease_s=1.5), queue(fresh, "survivor", lease_s=1.5)
    w = work(9)
    await api.put(w)
    (lost,) = await asyncio.to_thread(dead.take, 1, wait=1.0)  # then it pauses: no lease renewal
    survivor.start_worker_threads()
    again: list[Work] = []
    deadline = time.monotonic() + 10
    while not again and time.monotonic() < deadline:
        again = await asyncio.to_thread(survivor.take, 1, wait=0.5)
    assert [x.id for x in again] == [w.id] and again[0].request == w.request  # rerun, same seed
    # The paused worker wakes up: its lease keeper finds the work owned by another token and stops it
    # there, without claiming the entry back from the survivor.
    dead.start_worker_threads()
    deadline = time.monotonic() + 5
    while not lost.cancelled and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert lost.cancelled
    client = resolve(fresh.url, environ={}).client()
    (pending,) = client.xpending_range(dead.stream, "workers", "-", "+", 10)
    assert pending["consumer"] == b"survivor"
    dead.finish(lost, result(666))  # and its late result is fenced out
    survivor.finish(again[0], result(9))
    assert await asyncio.wait_for(api.outcome(w), 10) == result(9)
    survivor.close(GenerationFailed("stop"))
    dead._closed = True
    await api.aclose()


async def test_work_delivered_more_than_max_deliveries_fails_saying_why(fresh) -> None:
    api = queue(fresh, "api")
    w = work(11)
    await api.put(w)
    workers = [queue(fresh, f"lost{n}", lease_s=1.0, max_deliveries=2) for n in range(3)]
    (first,) = await asyncio.to_thread(workers[0].take, 1, wait=1.0)  # delivery 1; then it is lost
    workers[1].start_worker_threads()
    second: list[Work] = []
    deadline = time.monotonic() + 10
    while not second and time.monotonic() < deadline:
        second = await asyncio.to_thread(workers[1].take, 1, wait=0.5)
    assert [x.id for x in second] == [w.id]  # delivery 2, after the first lease lapsed
    workers[1]._closed = True  # lost too: its lease keeper stops renewing
    workers[2].start_worker_threads()  # its sweep finds delivery 3 due and fails the request
    with pytest.raises(GenerationFailed, match="max_deliveries 2"):
        await asyncio.wait_for(api.outcome(w), 15)
    assert await asyncio.to_thread(workers[2].take, 1, wait=0.3) == []
    workers[2]._closed = True
    await api.aclose()


async def test_work_that_expired_in_the_queue_is_not_run(fresh) -> None:
    api, worker = queue(fresh, "api"), queue(fresh, "w")
    w = work(13, timeout=0.2)
    await api.put(w)
    await asyncio.sleep(0.4)
    assert await asyncio.to_thread(worker.take, 1, wait=0.5) == []
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(api.outcome(w), 5)
    await api.aclose()


async def test_an_unreachable_redis_is_a_503_within_two_seconds(tmp_path: Path) -> None:
    gone = RedisServer(tmp_path / "gone").start()
    api = queue(gone, "api")
    await api.put(work(1))
    gone.kill()
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as err:
        await api.put(work(2))
    assert time.monotonic() - t0 < 2.0 and err.value.status == 503 and err.value.retry_after()
    await api.aclose()
