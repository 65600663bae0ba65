"""The GPU worker of continuous batching: one step loop that requests join and leave between steps.

Between two decode steps the worker takes, without blocking, as much queued work as the loop has room
for (first in, first admitted: a request larger than the free slots joins image by image, and nothing
behind it is admitted before it), checks which requesters gave up (cancel, hang-up, deadline: their
rows leave at once and free their slots), runs one step, and hands each job whose images are all
sampled to a finishing thread (VQ-GAN decode, ruCLIP ranking, upscaling, encoding) so that the loop
never waits for it; a request is answered when its own jobs are finished, not when a batch ends.
Progress goes out whenever one of a request's jobs completes an image row of its own (its rows joined
at their own step), the last at the job's final position; previews, for requests that asked and have
someone to see them, are drawn on the pipeline's renderer thread, and the one due at the last row is
made from the finished images. A step that fails for another reason than memory ends the loop's
current work, which is then run request by request through `Pipeline.run` (its own isolation: only a
request that fails alone fails); the worker carries on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, cast

from app.engine.continuous import ContinuousLoop, Done
from app.engine.jobs import JobFailed, JobResult, Outcome, Progress
from app.engine.previews import Deliver
from app.serving.core.errors import GenerationFailed, RequestInvalid
from app.serving.core.types import InstanceResult, Progressed, RequestResult, Started
from app.serving.queue.base import Work, WorkQueue
from app.serving.queue.observer import NULL_OBSERVER, QueueObserver
from app.serving.queue.worker import WorkerThread, preview_sink, wants_previews

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.25


@dataclass(eq=False)
class _Running:
    work: Work
    taken: float  # time.monotonic()
    outcomes: dict[int, Outcome] = field(default_factory=dict)  # instance -> outcome
    rows: dict[int, int] = field(default_factory=dict)  # instance -> image rows of its last progress
    sampled: set[int] = field(default_factory=set)  # instances whose codes are all sampled
    previewed: dict[int, int] = field(default_factory=dict)  # instance -> image rows at its last preview
    preview_step: dict[int, int] = field(default_factory=dict)  # instance -> step of its newest grid
    sinks: dict[int, Deliver] = field(default_factory=dict)  # instance -> where its previews go
    admitted: bool = False  # its first rows joined the slots
    ended: bool = False

    def sink(self, queue: WorkQueue, instance: int) -> Deliver:
        """One sink per instance, so that its previews are told in step order."""
        if instance not in self.sinks:
            self.sinks[instance] = preview_sink(queue, self.work, instance)
        return self.sinks[instance]


class LoopWorker(WorkerThread):
    """Feeds a `ContinuousLoop` from a `WorkQueue` on its own thread (see the module docstring)."""

    def __init__(self, pipeline: Any, queue: WorkQueue, *, max_batch_images: int | None = None,
                 observer: QueueObserver = NULL_OBSERVER) -> None:
        self.pipeline = pipeline
        self.queue = queue
        self.slots = max(1, int(max_batch_images or pipeline.max_batch_images))
        self.observer = observer
        super().__init__()
        self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kandinsky-finish")
        self._lock = threading.Lock()  # guards _Running.outcomes/ended between the two threads
        self.steps = pipeline.manifest.dalle.image_seq_length
        self.per_row = pipeline.manifest.dalle.image_tokens_per_dim

    def _after_join(self) -> None:
        self._finisher.shutdown(wait=True, cancel_futures=False)

    # ---- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = ContinuousLoop(self.pipeline, self.slots)
        running: dict[str, _Running] = {}
        while True:
            try:
                self._intake(loop, running)
                if not loop.keys():
                    if self._stopping or self.queue.closed:
                        return
                    continue
                self._drop_gone(loop, running)
                done, failed = loop.step()
                self.observer.loop_step(loop.live_rows, loop.capacity)
                self._admissions(loop, running)
                for key, failure in failed:
                    self._outcome(running, key, failure)
                for d in done:
                    wid, n = cast(tuple[str, int], d.key)
                    if wid in running:
                        running[wid].sampled.add(n)
                self._progress(loop, running)  # a done job's last progress (and due preview) first
                for d in done:
                    self._finisher.submit(self._finish, loop, d, running, self._previews_of(running, d.key))
            except Exception:  # the worker never dies and never leaves a request unanswered
                log.exception("worker: the decode loop failed; running its requests one by one")
                self._isolate(loop, running)
                loop = ContinuousLoop(self.pipeline, self.slots)

    def _intake(self, loop: ContinuousLoop, running: dict[str, _Running]) -> None:
        room = loop.room
        if room <= 0:
            return
        busy = bool(loop.keys())
        taken = self.queue.take(room, wait=0.0 if busy else IDLE_WAIT_S)
        if taken:
            log.info("loop: %d request(s), %d image(s) join; %d of %d slots live", len(taken),
                     sum(w.images for w in taken), loop.live_rows, loop.capacity)
        for work in taken:
            now = time.monotonic()
            running[work.id] = _Running(work, taken=now)
            self.queue.tell(work, Started())
            self.observer.taken(now - work.enqueued)
            try:
                for n, job in enumerate(work.request.instances):
                    loop.add((work.id, n), job)
            except Exception as exc:  # the request's own input: it fails alone, as a client error
                log.warning("request of %d image(s): its input could not be prepared (%s)", work.images,
                            type(exc).__name__)
                self._end(loop, running, work.id)
                self.queue.fail(work, RequestInvalid(
                    f"the request's input could not be used ({type(exc).__name__})"))

    def _admissions(self, loop: ContinuousLoop, running: dict[str, _Running]) -> None:
        """A request is admitted when the first rows of its first job join the slots."""
        now = time.monotonic()
        for key in loop.take_admitted():
            r = running.get(cast(tuple[str, int], key)[0])
            if r is not None and not r.admitted:
                r.admitted = True
                self.observer.admitted(now - r.work.enqueued)

    def _drop_gone(self, loop: ContinuousLoop, running: dict[str, _Running]) -> None:
        """Requests answered (by the finishing thread) or given up leave the loop (this thread only)."""
        for wid, r in list(running.items()):
            if r.ended:
                self._end(loop, running, wid)
            elif r.work.cancelled:
                log.info("request of %d image(s) stopped: its requester gave up", r.work.images)
                self._end(loop, running, wid)

    def _end(self, loop: ContinuousLoop, running: dict[str, _Running], wid: str) -> None:
        r = running.pop(wid, None)
        if r is None:
            return
        with self._lock:
            r.ended = True
        for n in range(len(r.work.request.instances)):
            loop.cancel((wid, n))
            self.pipeline.previews.close((wid, n))

    # ---- results (the finishing thread) -----------------------------------------------------------

    def _previews_of(self, running: dict[str, _Running], key: Hashable
                     ) -> tuple[Hashable, int, Deliver] | None:
        """For `Pipeline.finish_job`: the job's newest preview step and sink, None when it has none."""
        wid, n = cast(tuple[str, int], key)
        r = running.get(wid)
        step = 0 if r is None else r.preview_step.get(n, 0)
        return None if r is None or not step else (key, step, r.sink(self.queue, n))

    def _finish(self, loop: ContinuousLoop, done: Done, running: dict[str, _Running],
                previews: tuple[Hashable, int, Deliver] | None) -> None:
        """On the finishing thread: the job's remaining stages; its last preview is delivered (or
        dropped) before its result."""
        try:
            outcome = loop.finish(done, previews)
        except Exception:
            log.exception("worker: finishing a job failed")
            outcome = JobFailed("internal error while finishing the images; retry the request")
        finally:
            self.pipeline.previews.close(done.key)
        self._outcome(running, done.key, outcome)

    def _outcome(self, running: dict[str, _Running], key: Hashable, outcome: Outcome) -> None:
        wid, n = cast(tuple[str, int], key)
        r = running.get(wid)
        if r is None:
            return
        with self._lock:
            if r.ended:
                return
            r.outcomes[n] = outcome
            instances = r.work.request.instances
            if len(r.outcomes) < len(instances) and not isinstance(outcome, JobFailed):
                return
            r.ended = True  # the loop thread removes it from the loop and from `running`
        try:
            self.observer.batch_done(list(instances), [r.outcomes.get(i) for i in range(len(instances))])
        except Exception:  # metrics never cost a request its answer
            log.exception("worker: could not record metrics")
        failed = next((o for o in r.outcomes.values() if isinstance(o, JobFailed)), None)
        if failed is not None:
            error = RequestInvalid if failed.invalid else GenerationFailed
            self.queue.fail(r.work, error(failed.message))
            return
        wait = r.taken - r.work.enqueued
        results = []
        for i, job in enumerate(instances):
            o = r.outcomes[i]
            assert isinstance(o, JobResult)
            results.append(InstanceResult.of(o, job.params.format, wait))
        self.queue.finish(r.work, RequestResult(results, queue_seconds=wait))

    # ---- progress and previews --------------------------------------------------------------------

    def _progress(self, loop: ContinuousLoop, running: dict[str, _Running]) -> None:
        """After each step: a request hears its progress when one of its jobs completed an image row
        (a job that just finished sampling reports its last position), with previews as they fall due."""
        for wid, r in list(running.items()):
            if r.ended or r.work.cancelled:
                continue
            progress: list[Progress | None] = []
            moved = False
            for n in range(len(r.work.request.instances)):
                key = (wid, n)
                if n in r.sampled:
                    p = Progress(step=self.steps, steps=self.steps)
                elif key in loop:
                    p = loop.progress(key)
                else:  # not in the loop and not sampled: it left with its request
                    progress.append(None)
                    continue
                rows = p.step // self.per_row
                if rows > r.rows.get(n, 0):
                    r.rows[n] = rows
                    moved = True
                    self._preview_due(loop, r, n, key, p.step, rows)
                progress.append(p)
            if moved:
                r.work.last_progress = tuple(progress)
                self.queue.tell(r.work, Progressed(tuple(progress)))

    def _preview_due(self, loop: ContinuousLoop, r: _Running, n: int, key: Hashable, step: int,
                     rows: int) -> None:
        """Hand the job's grid to the renderer when a preview is due and someone would see it; one due at
        the last row is made from the decoded images when the job finishes (`Pipeline.finish_job`)."""
        every = r.work.request.instances[n].params.preview_every
        if not every or rows < r.previewed.get(n, 0) + every:
            return
        r.previewed[n] = rows - rows % every
        if not wants_previews(r.work):
            return
        r.preview_step[n] = step
        if n not in r.sampled:  # drawn on the renderer's thread, coalesced to the newest grid
            self.pipeline.previews.submit(key, step, loop.partial(key), r.sink(self.queue, n))

    # ---- a loop that failed -----------------------------------------------------------------------

    def _isolate(self, loop: ContinuousLoop, running: dict[str, _Running]) -> None:
        """Answer every request of a failed loop by running it alone through `Pipeline.run`."""
        for wid, r in list(running.items()):
            self._end(loop, running, wid)
            if r.work.cancelled or r.outcomes:
                if not r.work.cancelled:  # partly finished already: its other jobs are lost with the loop
                    self.queue.fail(r.work, GenerationFailed("internal error while generating; retry"))
                continue
            try:
                outcomes = list(self.pipeline.run(list(r.work.request.instances)))
            except Exception:
                log.exception("worker: a request failed alone too")
                outcomes = [JobFailed("internal error while generating; retry the request")]
            fresh = _Running(r.work, r.taken)
            running[wid] = fresh
            for n, o in enumerate(outcomes):
                self._outcome(running, (wid, n), o)
            running.pop(wid, None)
