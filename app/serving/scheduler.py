"""The request queue, cross-request batching, deadlines and the one GPU worker thread.

The event loop only enqueues a ticket (a request's jobs) and awaits its future. One worker thread takes
every ticket waiting when it becomes free, merges them into one `Pipeline.run` call of at most
`max_batch_images` images (a single larger ticket still runs alone: the pipeline chunks it), and hands
the results back to the loop with `call_soon_threadsafe`. A failed batch answers its own tickets with
`GenerationFailed` and the worker carries on with the next one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.engine.jobs import JobFailed, Progress
from app.engine.params import STAGES, Stage
from app.serving import metrics
from app.serving.errors import DeadlineExceeded, GenerationFailed, QueueFull, ServiceError, ShuttingDown

log = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """What the scheduler needs of `app.engine.pipeline.Pipeline`."""

    max_batch_images: int

    def run(
        self,
        jobs: Sequence[Any],
        on_step: Callable[[Sequence[Progress | None]], Collection[int] | None] | None = None,
    ) -> list[Any]:
        """One result per job; None for a job that `on_step` asked to stop."""
        ...


#: Told about a ticket's life on the event loop: ("started", None) when its batch starts, then
#: ("progress", [Progress | None per job of the ticket]) at every decode tick.
Listener = Callable[[str, Any], None]


@dataclass
class TicketResult:
    results: list[Any]  # one JobResult per job of the ticket, in order
    queue_seconds: float


@dataclass(eq=False)
class Ticket:
    """One request's jobs in the queue; `Scheduler.enqueue` makes it, `Scheduler.wait` awaits it."""

    jobs: list[Any]
    images: int
    enqueued: float  # time.monotonic()
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[TicketResult]
    listener: Listener | None = None
    abandoned: bool = False  # the requester stopped waiting (deadline, disconnect or cancel)


def _job_images(job: Any) -> int:
    return int(job.params.images_to_gen)


class Scheduler:
    """Owns the queue and the worker thread; `submit` is the only call made from the event loop."""

    def __init__(self, pipeline: BatchRunner, *, queue_size: int = 32, max_batch_images: int | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.pipeline = pipeline
        self.queue_size = queue_size
        self.max_batch_images = max(1, int(max_batch_images or pipeline.max_batch_images))
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        # Daemon: a batch stuck on the GPU must not keep a terminating pod alive past its grace period.
        self._thread = threading.Thread(target=self._worker, name="kandinsky-gpu-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def begin_drain(self) -> None:
        """Stop taking new requests; queued and running work goes on."""
        with self._cond:
            if self._accepting:
                log.info("scheduler: intake stopped, %d queued request(s) to finish", len(self._queue))
            self._accepting = False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop intake, let the worker finish the queue for up to `timeout` s, answer what is left, join."""
        self.begin_drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
            metrics.QUEUE_DEPTH.set(0)
        for ticket in leftover:
            self._answer(ticket, error=ShuttingDown("the server is shutting down; retry on another replica"))
        if self._thread is not None and self._thread.is_alive():
            log.warning("scheduler: a batch was still running after %.0f s; not waiting for it", timeout)

    # ---- intake (event loop) ----------------------------------------------------------------------

    async def submit(self, jobs: Sequence[Any], *, timeout: float, listener: Listener | None = None
                     ) -> TicketResult:
        """Queue one request's jobs and wait for their results.

        Raises QueueFull or ShuttingDown (503), DeadlineExceeded (504) after `timeout` seconds,
        GenerationFailed (500) when the batch holding the request failed.
        """
        return await self.wait(self.enqueue(jobs, timeout=timeout, listener=listener))

    def enqueue(self, jobs: Sequence[Any], *, timeout: float, listener: Listener | None = None) -> Ticket:
        """Queue one request's jobs without waiting (jobs API); raises QueueFull or ShuttingDown.

        `timeout` counts from now; `listener` hears the ticket's start and progress on this loop.
        """
        if not jobs:
            raise ValueError("a ticket needs at least one job")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        ticket = Ticket(
            jobs=list(jobs),
            images=sum(_job_images(j) for j in jobs),
            enqueued=now,
            deadline=now + timeout,
            loop=loop,
            future=loop.create_future(),
            listener=listener,
        )
        self._enqueue(ticket)
        return ticket

    async def wait(self, ticket: Ticket) -> TicketResult:
        """The ticket's results; DeadlineExceeded at its deadline. A waiter that is cancelled (the
        client went away) abandons the ticket: queued, it never runs; running, it stops at the next tick.
        """
        try:
            return await asyncio.wait_for(
                asyncio.shield(ticket.future), timeout=max(0.0, ticket.deadline - time.monotonic())
            )
        except TimeoutError:
            self.cancel(ticket)
            limit = ticket.deadline - ticket.enqueued
            raise DeadlineExceeded(
                f"the request did not finish within the server deadline of {limit:g} s"
            ) from None
        except asyncio.CancelledError:
            self.cancel(ticket)  # the client went away: do not spend GPU time on it
            raise

    def cancel(self, ticket: Ticket) -> None:
        """Give up a ticket: a queued one leaves the queue at once, a running one stops at the next tick."""
        ticket.abandoned = True
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                metrics.QUEUE_DEPTH.set(len(self._queue))

    def position(self, ticket: Ticket) -> int | None:
        """The ticket's place in the queue (0: next), or None once it left the queue."""
        with self._cond:
            try:
                return self._queue.index(ticket)
            except ValueError:
                return None

    def _enqueue(self, ticket: Ticket) -> None:
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later")
            self._queue.append(ticket)
            metrics.QUEUE_DEPTH.set(len(self._queue))
            self._cond.notify()

    # ---- the worker thread ------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            batch: list[Ticket] = []
            try:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue and self._stopping:
                        return
                    batch = self._take_batch_locked()
                    metrics.QUEUE_DEPTH.set(len(self._queue))
                if batch:
                    self._run_batch(batch)
            except Exception:  # the worker must never die, and never leave a request unanswered
                log.exception("scheduler: unexpected error in the worker loop")
                for ticket in batch:
                    self._answer(ticket, error=GenerationFailed("internal error in the scheduler; retry"))

    def _take_batch_locked(self) -> list[Ticket]:
        now = time.monotonic()
        batch: list[Ticket] = []
        images = 0
        while self._queue:
            ticket = self._queue[0]
            if ticket.abandoned:
                self._queue.popleft()
                continue
            if ticket.deadline <= now:
                self._queue.popleft()
                # Dropped before it costs GPU time; the requester's own timer usually answers first.
                self._answer(ticket, error=DeadlineExceeded("the request expired in the queue"))
                continue
            if batch and images + ticket.images > self.max_batch_images:
                break
            self._queue.popleft()
            batch.append(ticket)
            images += ticket.images
        return batch

    def _run_batch(self, batch: list[Ticket]) -> None:
        started = time.monotonic()
        jobs = [job for ticket in batch for job in ticket.jobs]
        images = sum(ticket.images for ticket in batch)
        for ticket in batch:
            metrics.QUEUE_WAIT_SECONDS.observe(started - ticket.enqueued)
            self._tell(ticket, "started", None)
        metrics.BATCH_IMAGES.observe(images)
        log.info("batch: %d request(s), %d job(s), %d image(s)", len(batch), len(jobs), images)
        outcomes = self._run_pipeline(batch, jobs, images)
        metrics.update_gpu_memory()
        try:
            self._record(jobs, outcomes)
        except Exception:  # metrics must never cost a request its answer
            log.exception("scheduler: could not record batch metrics")
        offset = 0
        for ticket in batch:
            mine = outcomes[offset : offset + len(ticket.jobs)]
            offset += len(ticket.jobs)
            failed = next((o for o in mine if isinstance(o, JobFailed)), None)
            if failed is not None:
                self._answer(ticket, error=GenerationFailed(failed.message))
            elif any(o is None for o in mine):
                # Stopped at a progress tick: its requester had gone and was answered already.
                log.info("request of %d image(s) stopped: its requester gave up", ticket.images)
            else:
                self._answer(ticket, result=TicketResult(mine, queue_seconds=started - ticket.enqueued))

    def _run_pipeline(self, batch: list[Ticket], jobs: list[Any], images: int) -> list[Any]:
        """One outcome per job (see `app.engine.pipeline.Outcome`); the engine owns retries and memory.

        Anything the pipeline raises anyway is a bug: every job of the batch fails, the worker goes on.
        """
        owner = [ticket for ticket in batch for _ in ticket.jobs]  # job index -> its ticket

        def stop_abandoned(progress: Sequence[Progress | None]) -> list[int]:
            # At each progress tick: listeners hear their jobs' progress, and the jobs whose requester
            # gave up (deadline, hang-up, cancel) leave the batch; their partners go on.
            offset = 0
            for ticket in batch:
                mine = list(progress[offset : offset + len(ticket.jobs)])
                offset += len(ticket.jobs)
                if ticket.listener is not None and not ticket.abandoned and any(p is not None for p in mine):
                    self._tell(ticket, "progress", mine)
            return [n for n, ticket in enumerate(owner) if ticket.abandoned]

        try:
            outcomes = list(self.pipeline.run(jobs, on_step=stop_abandoned))
            if len(outcomes) != len(jobs):
                raise RuntimeError(f"pipeline returned {len(outcomes)} outcomes for {len(jobs)} jobs")
            for n, outcome in enumerate(outcomes):
                if outcome is None and not owner[n].abandoned:
                    raise RuntimeError(f"pipeline stopped job {n}, whose requester still waits")
        except Exception:
            log.exception("batch of %d request(s), %d image(s): the pipeline failed", len(batch), images)
            failed = JobFailed("internal error while generating; the server keeps serving, retry the request")
            return [failed] * len(jobs)
        return outcomes

    @staticmethod
    def _record(jobs: list[Any], outcomes: list[Any]) -> None:
        # Counted here, not per answered request: a request that gave up late still cost its images;
        # one stopped at a progress tick (None) or failed produced none.
        done = [(j, o) for j, o in zip(jobs, outcomes) if o is not None and not isinstance(o, JobFailed)]
        results = [o for _, o in done]
        images = sum(_job_images(j) for j, _ in done)
        # Every sampled image has the same token count; the returned codes tell how many.
        per_image_tokens = next((len(r.codes[0]) for r in results if r.codes), 0)
        metrics.IMAGES_TOTAL.inc(images)
        metrics.IMAGE_TOKENS_TOTAL.inc(images * per_image_tokens)
        # The token loop serves the whole batch at once (its time is the batch's); later stages run per job.
        generate = max((r.timings.get(Stage.GENERATE.value, 0.0) for r in results), default=0.0)
        batch_timings = {Stage.GENERATE.value: generate}
        for stage in STAGES[1:]:
            batch_timings[stage] = sum(r.timings.get(stage, 0.0) for r in results)
        metrics.record_stage_timings(batch_timings)

    @staticmethod
    def _tell(ticket: Ticket, kind: str, payload: Any) -> None:
        listener = ticket.listener
        if listener is None:
            return

        def deliver() -> None:
            try:
                listener(kind, payload)
            except Exception:  # a listener's bug must not cost the batch its progress
                log.exception("scheduler: a progress listener failed")

        try:
            ticket.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed
            pass

    def _answer(
        self, ticket: Ticket, *, result: TicketResult | None = None, error: ServiceError | None = None
    ) -> None:
        def deliver() -> None:
            if ticket.future.done():
                return
            if error is not None:
                ticket.future.set_exception(error)
            else:
                ticket.future.set_result(result)  # type: ignore[arg-type]

        try:
            ticket.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("scheduler: event loop closed, dropping an answer")
