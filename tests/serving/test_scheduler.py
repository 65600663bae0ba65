"""The queue, the worker and the Service as the server wires them: batching, limits, deadlines, failures
and shutdown, against a fake pipeline.

The fake has the interface of app.engine.pipeline.Pipeline (`max_batch_images`, `run(jobs) -> list[result]`)
and a gate that holds a batch on the "GPU", so which jobs share a `run()` call is deterministic.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from app.engine.jobs import JobFailed, Progress
from app.serving.core.errors import DeadlineExceeded, GenerationFailed, QueueFull, ShuttingDown
from app.serving.core.schema import Schema
from app.serving.core.service import Service
from app.serving.core.types import ImageRequest, Listener, RequestResult
from app.serving.observability.metrics import PrometheusObserver
from app.serving.queue.base import Work
from app.serving.queue.local import LocalQueue
from app.serving.queue.worker import BatchWorker


@dataclass(frozen=True)
class FakeParams:
    images_to_gen: int
    seed: int = 0
    format: str = "png"
    preview_every: int = 0


@dataclass
class FakeJob:
    query: str
    params: FakeParams


@dataclass
class FakeResult:
    images: list[str]
    clip_scores: list[float]
    ppl: list[float]
    seed: int
    timings: dict[str, float]
    codes: list[list[int]] = field(default_factory=list)


class FakePipeline:
    def __init__(self, max_batch_images: int = 8) -> None:
        self.max_batch_images = max_batch_images
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_next: BaseException | None = None
        self.steps = 0
        self.steps_done: list[tuple[str, int]] = []
        self.on_each_step = None
        self.stopped_at: dict[str, int] = {}  # query -> the step at which the scheduler stopped it

    def run(self, jobs: list[FakeJob], on_step=None) -> list[FakeResult | None]:  # type: ignore[no-untyped-def]
        self.calls.append([j.query for j in jobs])
        self.started.set()
        assert self.gate.wait(10), "test left the gate closed"
        stopped: set[int] = set()  # jobs the scheduler asked to stop, as the decoder honours them
        for step in range(self.steps):  # the decode loop's progress calls
            if self.on_each_step is not None:
                self.on_each_step(jobs, step)
            if on_step is not None:
                for n in on_step([Progress(step, self.steps) for _ in jobs]) or ():
                    self.stopped_at.setdefault(jobs[n].query, step)
                    stopped.add(n)
            if len(stopped) == len(jobs):
                break
            self.steps_done.append((jobs[0].query, step))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return [
            None
            if n in stopped
            else FakeResult(
                images=[f"{j.query}#{i}" for i in range(j.params.images_to_gen)],
                clip_scores=[1.0] * j.params.images_to_gen,
                ppl=[2.0] * j.params.images_to_gen,
                seed=j.params.seed,
                timings={"generate": 0.01, "decode": 0.001},
                codes=[[i] * 16 for i in range(j.params.images_to_gen)],  # 16 tokens per fake image
            )
            for n, j in enumerate(jobs)
        ]


class Stack:
    """`LocalQueue` -> `BatchWorker` -> fake pipeline, with the `Service` in front, as model.py wires them."""

    def __init__(self, pipeline: FakePipeline, *, queue_size: int = 32, max_batch_images: int | None = None):
        observer = PrometheusObserver()
        self.queue = LocalQueue(queue_size, observer)
        self.worker = BatchWorker(pipeline, self.queue, max_batch_images=max_batch_images, observer=observer)
        self.service = Service("fake", timeout_s=600)
        self.service.open(self.queue, Schema(), lambda: self.worker.alive)

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float) -> None:
        self.worker.stop(timeout)

    @property
    def alive(self) -> bool:
        return self.service.alive

    @property
    def depth(self) -> int:
        return self.queue.depth

    @property
    def accepting(self) -> bool:
        return self.queue.accepting

    async def enqueue(self, jobs: list[FakeJob], *, timeout: float, listener: Listener | None = None
                      ) -> Work:
        return await self.service.submit(ImageRequest(tuple(jobs), timeout, "v1"), listener)  # type: ignore[arg-type]

    async def wait(self, work: Work) -> RequestResult:
        return await self.service.result(work)

    async def submit(self, jobs: list[FakeJob], *, timeout: float, listener: Listener | None = None
                     ) -> RequestResult:
        return await self.wait(await self.enqueue(jobs, timeout=timeout, listener=listener))

    def cancel(self, work: Work) -> None:
        self.service.cancel(work)

    async def position(self, work: Work) -> int | None:
        return await self.service.position(work)


def job(query: str, images: int = 1) -> FakeJob:
    return FakeJob(query, FakeParams(images))


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def make_scheduler(fake: FakePipeline):
    made: list[Stack] = []

    def make(**kwargs) -> Stack:
        s = Stack(fake, **kwargs)
        s.start()
        made.append(s)
        return s

    yield make
    fake.gate.set()
    for s in made:
        s.stop(timeout=5)


async def hold_first_batch(fake: FakePipeline, sched: Stack, query: str = "first") -> asyncio.Task:
    """Start a batch and keep it running on the fake GPU until the test opens the gate."""
    fake.gate.clear()
    task = asyncio.create_task(sched.submit([job(query)], timeout=10))
    await asyncio.to_thread(fake.started.wait, 5)
    return task


async def test_jobs_waiting_when_a_batch_starts_share_one_run_call(fake, make_scheduler):
    sched = make_scheduler()
    first = await hold_first_batch(fake, sched)
    b = asyncio.create_task(sched.submit([job("b", 2)], timeout=10))
    c = asyncio.create_task(sched.submit([job("c", 1)], timeout=10))
    await wait_until(lambda: sched.depth == 2)
    fake.gate.set()
    rb, rc = await asyncio.gather(b, c)
    await first
    assert fake.calls == [["first"], ["b", "c"]]
    # each request gets its own results back, never another's
    assert rb.instances[0].images == ["b#0", "b#1"]
    assert rc.instances[0].images == ["c#0"]


async def test_merged_batch_stays_within_max_batch_images(fake, make_scheduler):
    sched = make_scheduler(max_batch_images=4)
    first = await hold_first_batch(fake, sched)
    sizes = (("b", 3), ("c", 2), ("d", 1))
    tasks = [asyncio.create_task(sched.submit([job(q, n)], timeout=10)) for q, n in sizes]
    await wait_until(lambda: sched.depth == 3)
    fake.gate.set()
    await asyncio.gather(first, *tasks)
    assert fake.calls == [["first"], ["b"], ["c", "d"]]


async def test_single_request_larger_than_the_limit_still_runs(fake, make_scheduler):
    sched = make_scheduler(max_batch_images=2)
    out = await sched.submit([job("big", 5)], timeout=10)
    assert fake.calls == [["big"]]
    assert len(out.instances[0].images) == 5


async def test_instances_of_one_request_stay_in_order_in_one_batch(fake, make_scheduler):
    sched = make_scheduler()
    out = await sched.submit([job("x", 1), job("y", 2)], timeout=10)
    assert fake.calls == [["x", "y"]]
    assert [r.images for r in out.instances] == [["x#0"], ["y#0", "y#1"]]


async def test_full_queue_raises_queue_full(fake, make_scheduler):
    sched = make_scheduler(queue_size=1)
    first = await hold_first_batch(fake, sched)
    waiting = asyncio.create_task(sched.submit([job("b")], timeout=10))
    await wait_until(lambda: sched.depth == 1)
    with pytest.raises(QueueFull) as err:
        await sched.submit([job("c")], timeout=10)
    assert err.value.status == 503
    assert (err.value.retry_after() or 0) > 0
    fake.gate.set()
    await asyncio.gather(first, waiting)
    assert ["c"] not in fake.calls


async def test_expired_request_is_answered_504_and_dropped_before_run(fake, make_scheduler):
    sched = make_scheduler()
    first = await hold_first_batch(fake, sched)
    with pytest.raises(DeadlineExceeded):
        await sched.submit([job("late")], timeout=0.05)
    fake.gate.set()
    await first
    await sched.submit([job("next")], timeout=10)
    assert fake.calls == [["first"], ["next"]]


async def test_expired_ticket_is_dropped_by_the_worker_even_if_nobody_gave_up(fake, make_scheduler):
    sched = make_scheduler()
    first = await hold_first_batch(fake, sched)
    # enqueue without a waiting coroutine: only the worker's own deadline check can answer it
    ticket = await sched.enqueue([job("stale")], timeout=0.01)
    await asyncio.sleep(0.05)
    fake.gate.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(sched.queue.outcome(ticket), 5)
    assert ["stale"] not in fake.calls


async def test_failed_batch_answers_its_requests_500_and_next_request_succeeds(fake, make_scheduler):
    sched = make_scheduler()
    failing = await hold_first_batch(fake, sched, query="secret prompt")
    fake.fail_next = RuntimeError("boom: secret prompt")  # raised by the held batch once released
    queued = asyncio.create_task(sched.submit([job("after")], timeout=10))
    await wait_until(lambda: sched.depth == 1)
    fake.gate.set()
    with pytest.raises(GenerationFailed) as err:
        await failing
    assert err.value.status == 500
    assert "secret" not in err.value.message and "boom" not in err.value.message
    ok = await queued
    assert ok.instances[0].images == ["after#0"]
    assert fake.calls == [["secret prompt"], ["after"]]
    assert sched.alive


async def test_a_failed_job_fails_only_its_own_request_in_a_shared_batch(fake, make_scheduler):
    sched = make_scheduler()
    first = await hold_first_batch(fake, sched)
    real_run = fake.run

    def run_failing_on_poison(jobs, on_step=None):  # type: ignore[no-untyped-def]
        # The engine retries a failed batch job by job; what reaches the scheduler is per-job outcomes.
        outcomes = real_run(jobs)
        return [JobFailed("generation failed (RuntimeError)") if j.query == "poison" else o
                for j, o in zip(jobs, outcomes)]

    fake.run = run_failing_on_poison  # type: ignore[method-assign]
    good = asyncio.create_task(sched.submit([job("good", 2)], timeout=10))
    bad = asyncio.create_task(sched.submit([job("poison")], timeout=10))
    await wait_until(lambda: sched.depth == 2)
    fake.gate.set()
    await first
    assert (await good).instances[0].images == ["good#0", "good#1"]
    with pytest.raises(GenerationFailed) as err:
        await bad
    assert err.value.message == "generation failed (RuntimeError)"
    assert fake.calls[1:] == [["good", "poison"]]  # one batch: the scheduler reruns nothing itself
    assert sched.alive


def disconnect_at_step(fake: FakePipeline, task: asyncio.Task, query: str, at: int = 0) -> None:
    """While the batch holding `query` runs, the client of `task` goes away before step `at` finishes."""
    loop = asyncio.get_running_loop()
    gone = threading.Event()
    task.add_done_callback(lambda _: gone.set())

    def hook(jobs, step):  # type: ignore[no-untyped-def]  # runs on the worker thread
        if step == at and any(j.query == query for j in jobs):
            loop.call_soon_threadsafe(task.cancel)
            assert gone.wait(5)

    fake.on_each_step = hook


async def test_batch_stops_at_the_next_step_once_every_requester_gave_up(fake, make_scheduler):
    sched = make_scheduler()
    fake.steps = 3
    first = await hold_first_batch(fake, sched)
    slow = asyncio.create_task(sched.submit([job("slow")], timeout=10))
    await wait_until(lambda: sched.depth == 1)
    disconnect_at_step(fake, slow, "slow")
    fake.gate.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await slow
    ok = await sched.submit([job("next")], timeout=10)  # the worker is free and serves the next one
    assert ok.instances[0].images == ["next#0"]
    # "slow" stopped at its first progress call after the client left; "next" ran every step.
    assert [q for q, _ in fake.steps_done].count("slow") == 0
    assert [s for q, s in fake.steps_done if q == "next"] == [0, 1, 2]
    assert sched.alive


async def test_batch_with_one_requester_still_waiting_is_not_cancelled(fake, make_scheduler):
    sched = make_scheduler()
    fake.steps = 3
    first = await hold_first_batch(fake, sched)
    patient = asyncio.create_task(sched.submit([job("patient")], timeout=10))
    hasty = asyncio.create_task(sched.submit([job("hasty")], timeout=10))
    await wait_until(lambda: sched.depth == 2)
    disconnect_at_step(fake, hasty, "hasty")
    fake.gate.set()
    await first
    assert (await patient).instances[0].images == ["patient#0"]
    with pytest.raises(asyncio.CancelledError):
        await hasty
    assert [s for q, s in fake.steps_done if q == "patient"] == [0, 1, 2]


async def test_a_hung_up_request_leaves_its_batch_at_the_next_tick_while_its_partner_goes_on(
    fake, make_scheduler
):
    sched = make_scheduler()
    fake.steps = 4
    first = await hold_first_batch(fake, sched)
    patient = asyncio.create_task(sched.submit([job("patient", 2)], timeout=10))
    hasty = asyncio.create_task(sched.submit([job("hasty", 3)], timeout=10))
    await wait_until(lambda: sched.depth == 2)
    disconnect_at_step(fake, hasty, "hasty", at=1)
    fake.gate.set()
    await first
    assert (await patient).instances[0].images == ["patient#0", "patient#1"]
    with pytest.raises(asyncio.CancelledError):
        await hasty
    # Both ran in one batch; the scheduler named only the hasty job, at the first tick after it left.
    assert fake.calls[-1] == ["patient", "hasty"]
    assert fake.stopped_at == {"hasty": 1}
    assert sched.alive


async def test_a_failed_job_answers_its_request_500_with_the_engines_message(fake, make_scheduler):
    sched = make_scheduler()
    message = "out of GPU memory while generating a batch of 3 image(s); retry with fewer images_to_gen"
    fake.run = lambda jobs, on_step=None: [JobFailed(message) for _ in jobs]  # type: ignore[method-assign]
    with pytest.raises(GenerationFailed) as err:
        await sched.submit([job("a", 3)], timeout=10)
    assert err.value.message == message and err.value.status == 500
    assert sched.alive


async def test_pipeline_returning_too_few_results_fails_the_batch_not_the_worker(fake, make_scheduler):
    sched = make_scheduler()
    real_run = fake.run
    fake.run = lambda jobs, on_step=None: real_run(jobs)[:-1]  # type: ignore[method-assign]
    with pytest.raises(GenerationFailed):
        await sched.submit([job("a"), job("b")], timeout=10)
    fake.run = real_run  # type: ignore[method-assign]
    assert (await sched.submit([job("c")], timeout=10)).instances[0].images == ["c#0"]
    assert sched.alive


async def test_stop_finishes_queued_work_then_refuses_new_requests(fake, make_scheduler):
    sched = make_scheduler()
    first = await hold_first_batch(fake, sched)
    queued = asyncio.create_task(sched.submit([job("queued")], timeout=10))
    await wait_until(lambda: sched.depth == 1)
    stopper = asyncio.create_task(asyncio.to_thread(sched.stop, 5))
    await wait_until(lambda: not sched.accepting)
    with pytest.raises(ShuttingDown):
        await sched.submit([job("too late")], timeout=10)
    fake.gate.set()
    r_first, r_queued = await asyncio.gather(first, queued)
    await stopper
    assert r_queued.instances[0].images == ["queued#0"]
    assert fake.calls == [["first"], ["queued"]]
    assert not sched.alive


async def test_stop_answers_what_it_could_not_finish_in_time(fake, make_scheduler, monkeypatch):
    import app.serving.queue.worker as worker_module

    monkeypatch.setattr(worker_module, "STOP_JOIN_S", 0.1)  # the fake batch is held past stop()
    sched = make_scheduler()
    first = await hold_first_batch(fake, sched)
    queued = asyncio.create_task(sched.submit([job("queued")], timeout=10))
    await wait_until(lambda: sched.depth == 1)
    await asyncio.to_thread(sched.stop, 0.1)  # the held batch outlives the grace period
    with pytest.raises(ShuttingDown):
        await queued
    fake.gate.set()
    await first


async def test_queue_depth_and_batch_metrics_follow_the_queue(fake, make_scheduler):
    sched = make_scheduler()
    batches_before = REGISTRY.get_sample_value("kandinsky_batch_images_count") or 0.0
    images_before = REGISTRY.get_sample_value("kandinsky_images_total") or 0.0
    tokens_before = REGISTRY.get_sample_value("kandinsky_image_tokens_total") or 0.0
    first = await hold_first_batch(fake, sched)
    b = asyncio.create_task(sched.submit([job("b", 2)], timeout=10))
    await wait_until(lambda: sched.depth == 1)
    assert REGISTRY.get_sample_value("kandinsky_queue_depth") == 1.0
    fake.gate.set()
    await asyncio.gather(first, b)
    assert REGISTRY.get_sample_value("kandinsky_queue_depth") == 0.0
    assert REGISTRY.get_sample_value("kandinsky_batch_images_count") == batches_before + 2
    assert (REGISTRY.get_sample_value("kandinsky_stage_seconds_count", {"stage": "generate"}) or 0) > 0
    assert REGISTRY.get_sample_value("kandinsky_images_total") == images_before + 3
    assert REGISTRY.get_sample_value("kandinsky_image_tokens_total") == tokens_before + 3 * 16


def test_queue_size_must_be_positive(fake):
    with pytest.raises(ValueError, match="queue_size"):
        Stack(fake, queue_size=0)


async def test_bug_in_the_worker_answers_the_batch_and_keeps_serving(fake, make_scheduler):
    sched = make_scheduler()
    real_run_batch = sched.worker._run_batch
    calls = []

    def broken_once(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise KeyError("scheduler bug")
        real_run_batch(batch)

    sched.worker._run_batch = broken_once  # type: ignore[method-assign]
    with pytest.raises(GenerationFailed):
        await sched.submit([job("a")], timeout=10)
    assert (await sched.submit([job("b")], timeout=10)).instances[0].images == ["b#0"]
    assert sched.alive


async def test_a_failure_to_record_metrics_still_delivers_the_answer(fake, make_scheduler):
    sched = make_scheduler()

    def broken(jobs, outcomes):
        raise KeyError("metrics bug")

    sched.worker.observer.batch_done = broken  # type: ignore[method-assign]
    out = await sched.submit([job("a")], timeout=10)
    assert out.instances[0].images == ["a#0"]
    assert sched.alive
