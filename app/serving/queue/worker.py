"""The one GPU worker thread: it takes queued work, merges it into one `Pipeline.run` call of at most
`max_batch_images` images (a single larger request still runs alone: the pipeline chunks it), tells each
request its progress at every tick, stops the requests whose requester gave up, and finishes or fails
each request from its jobs' outcomes. A failed batch fails only its own requests; the worker carries on.

Previews are drawn on the pipeline's renderer thread, only while `Work.wants_previews()` says someone
would see one, and told through the same `queue.tell` as progress. Both `tell` and `finish` hand their
message to the event loop in call order (`loop.call_soon_threadsafe`), and `Pipeline.run` returns only
once every preview of its jobs was told or dropped: no preview reaches a request after its result.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from app.engine.jobs import Job, JobFailed, Progress
from app.serving.core.errors import GenerationFailed, RequestInvalid, ShuttingDown
from app.serving.core.types import InstanceResult, Progressed, RequestResult, Started
from app.serving.queue.base import Work, WorkQueue
from app.serving.queue.observer import NULL_OBSERVER, QueueObserver

log = logging.getLogger(__name__)

#: Seconds a stopping worker waits for its thread once the queue is closed (its runs given up).
STOP_JOIN_S = 10.0

#: How long the worker waits for work before looking at its stop flag again.
IDLE_WAIT_S = 0.25


class BatchRunner(Protocol):
    """What the worker needs of `app.engine.pipeline.Pipeline`."""

    max_batch_images: int

    def run(
        self,
        jobs: Sequence[Any],
        on_step: Callable[[Sequence[Progress | None]], Collection[int] | None] | None = None,
    ) -> list[Any]:
        """One outcome per job; None for a job that `on_step` asked to stop."""
        ...


class WorkerThread:
    """The one GPU worker thread of a worker: started once, alive while it runs, stopped by draining the
    queue, waiting for what runs, then failing what is left. Subclasses give `_run` (the thread's
    body) and may release more in `_after_join`."""

    queue: WorkQueue

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _run(self) -> None:
        raise NotImplementedError

    def _after_join(self) -> None:
        pass

    def start(self) -> None:
        if self._thread is not None:
            return
        # Daemon: a batch stuck on the GPU must not keep a terminating pod alive past its grace period.
        self._thread = threading.Thread(target=self._run, name="kandinsky-gpu-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop intake, finish what is queued and running for up to `timeout` s, fail what is left."""
        self.queue.begin_drain()
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._after_join()
        self.queue.close(ShuttingDown("the server is shutting down; retry on another replica"))
        if self._thread is not None and self._thread.is_alive():
            # Out of time: closing gave up what is left (a shared queue hands it back and cancels it
            # here, so its rows leave at the next step); a thread still inside torch at interpreter exit
            # can abort the process.
            self._thread.join(STOP_JOIN_S)
        if self._thread is not None and self._thread.is_alive():
            log.warning("worker: generations were still running after %.0f s; not waiting for them", timeout)


class BatchWorker(WorkerThread):
    """Feeds the pipeline from a `WorkQueue` on its own thread, one merged batch at a time."""

    def __init__(self, pipeline: BatchRunner, queue: WorkQueue, *, max_batch_images: int | None = None,
                 observer: QueueObserver = NULL_OBSERVER) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.queue = queue
        self.max_batch_images = max(1, int(max_batch_images or pipeline.max_batch_images))
        self.observer = observer

    # ---- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch: list[Work] = []
            try:
                batch = self.queue.take(self.max_batch_images, wait=IDLE_WAIT_S)
                if not batch:
                    if self._stopping or self.queue.closed:
                        return
                    continue
                self._run_batch(batch)
            except Exception:  # the worker must never die, and never leave a request unanswered
                log.exception("worker: unexpected error in the worker loop")
                for work in batch:
                    self.queue.fail(work, GenerationFailed("internal error in the scheduler; retry"))

    def _run_batch(self, batch: list[Work]) -> None:
        started = time.monotonic()
        jobs = [with_previews(self.queue, work, n, job)
                for work in batch for n, job in enumerate(work.request.instances)]
        images = sum(work.images for work in batch)
        for work in batch:
            self.queue.tell(work, Started())
        self.observer.batch_started([started - work.enqueued for work in batch], images)
        log.info("batch: %d request(s), %d job(s), %d image(s)", len(batch), len(jobs), images)
        outcomes = self._run_pipeline(batch, jobs, images)
        try:
            self.observer.batch_done(jobs, outcomes)
        except Exception:  # metrics must never cost a request its answer
            log.exception("worker: could not record batch metrics")
        offset = 0
        for work in batch:
            mine = outcomes[offset : offset + len(work.request.instances)]
            offset += len(work.request.instances)
            failed = next((o for o in mine if isinstance(o, JobFailed)), None)
            if failed is not None:
                error = RequestInvalid if failed.invalid else GenerationFailed
                self.queue.fail(work, error(failed.message))
            elif any(o is None for o in mine):
                # Stopped at a progress tick: its requester had gone and was answered already.
                log.info("request of %d image(s) stopped: its requester gave up", work.images)
            else:
                wait = started - work.enqueued
                results = [InstanceResult.of(o, job.params.format, wait)
                           for o, job in zip(mine, work.request.instances, strict=True)]
                self.queue.finish(work, RequestResult(results, queue_seconds=wait))

    def _run_pipeline(self, batch: list[Work], jobs: list[Any], images: int) -> list[Any]:
        """One outcome per job (see `app.engine.jobs.Outcome`); the engine owns retries and memory.

        Anything the pipeline raises anyway is a bug: every job of the batch fails, the worker goes on.
        """
        owner = [work for work in batch for _ in work.request.instances]  # job index -> its work

        def on_step(progress: Sequence[Progress | None]) -> list[int]:
            # At each tick: every request hears its jobs' progress, and the jobs whose requester gave up
            # (deadline, hang-up, cancel) leave the batch; their partners go on.
            offset = 0
            for work in batch:
                mine = tuple(progress[offset : offset + len(work.request.instances)])
                offset += len(work.request.instances)
                if not work.cancelled and any(p is not None for p in mine):
                    work.last_progress = mine
                    self.queue.tell(work, Progressed(mine))
            return [n for n, work in enumerate(owner) if work.cancelled]

        try:
            outcomes = list(self.pipeline.run(jobs, on_step=on_step))
            if len(outcomes) != len(jobs):
                raise RuntimeError(f"pipeline returned {len(outcomes)} outcomes for {len(jobs)} jobs")
            for n, outcome in enumerate(outcomes):
                if outcome is None and not owner[n].cancelled:
                    raise RuntimeError(f"pipeline stopped job {n}, whose requester still waits")
        except Exception:
            log.exception("batch of %d request(s), %d image(s): the pipeline failed", len(batch), images)
            failed = JobFailed("internal error while generating; the server keeps serving, retry the request")
            return [failed] * len(jobs)
        return outcomes


def with_previews(queue: WorkQueue, work: Work, instance: int, job: Job) -> Job:
    """The job, with its previews (drawn on the pipeline's renderer thread) told to the work's listener,
    and drawn only while someone would see one (`Work.wants_previews`, asked at each due preview)."""
    if not job.params.preview_every:
        return job
    return dataclasses.replace(job, on_preview=preview_sink(queue, work, instance),
                               wants_preview=lambda: wants_previews(work))


def wants_previews(work: Work) -> bool:
    """Whether a preview of `work` would be seen now; a failing predicate means no (never a failed batch)."""
    if work.cancelled:
        return False
    try:
        return bool(work.wants_previews())
    except Exception:
        log.exception("worker: wants_previews failed; no preview this time")
        return False


def preview_sink(queue: WorkQueue, work: Work, instance: int) -> Callable[[int, list[str]], None]:
    """Where instance `instance`'s previews go: a `Progressed` whose other instances keep their last
    progress (so a preview never moves the request's progress bar). Called on the renderer's thread;
    a preview older than one already told (a job rerun alone after its batch failed) is not told."""
    told = [-1]  # the step of the last preview told

    def deliver(step: int, images: list[str]) -> None:
        if work.cancelled or step <= told[0]:
            return
        told[0] = step
        last = work.last_progress  # one read: the decode thread replaces it at every tick
        steps = next((p.steps for p in last if p is not None), step)
        known = list(last) or [None] * len(work.request.instances)
        known[instance] = Progress(step=step, steps=steps, preview=images)
        queue.tell(work, Progressed(tuple(known)))

    return deliver
