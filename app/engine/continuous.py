"""The engine side of continuous batching: jobs join a running step loop and leave it when done.

`ContinuousLoop` wraps the pipeline's networks around a `SlotDecoder`: `add(key, job)` prepares a job
(tokenizes it, encodes its image prompt) and puts its images in line; `step()` admits, first come first
admitted, as many waiting images as there are free slots (a job larger than the free slots joins image
by image, so nothing behind it overtakes it and no slot idles while it waits), runs one decode step, and
returns the jobs whose images are all sampled. `finish(done)` turns one of those into its `JobResult`
(VQ-GAN decode, ruCLIP ranking, upscaling, encoding) and is meant to run on another thread than the
loop, so that finishing a job never stops the others' decoding.

An out-of-memory in a step halves the slots and puts the live jobs back at the front of the line, to
rerun from their first position with their seeds (the same codes: every row is batch invariant); at one
slot it fails them. Not thread-safe, except `finish`: one thread calls the rest.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from app.engine.jobs import Job, JobFailed, Outcome, Progress
from app.engine.nets.decoding import GenerationOutput, GenerationRequest
from app.engine.nets.slots import SlotDecoder
from app.engine.previews import Deliver

if TYPE_CHECKING:
    from app.engine.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class _LiveJob:
    job: Job
    request: GenerationRequest
    added: float  # time.perf_counter() when it joined the line
    next_image: int = 0  # images before it have been admitted
    pieces: dict[int, GenerationOutput] = field(default_factory=dict)  # first image -> its rows' output
    admitted_at: float | None = None

    @property
    def images(self) -> int:
        return self.request.num_images


@dataclass
class Done:
    """A job whose images are all sampled: its codes and ppl in image order, and its generate time."""

    key: Hashable
    job: Job
    output: GenerationOutput
    generate_s: float


class ContinuousLoop:
    def __init__(self, pipeline: Pipeline, slots: int | None = None) -> None:
        self.pipeline = pipeline
        self.slots = SlotDecoder(pipeline.decoder, slots)
        self.steps = pipeline.manifest.dalle.image_seq_length
        self._jobs: dict[Hashable, _LiveJob] = {}
        self._line: collections.deque[Hashable] = collections.deque()  # jobs with images to admit
        self._admitted: list[Hashable] = []  # jobs whose first rows joined since `take_admitted`

    # ---- membership ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.slots.slots

    @property
    def live_rows(self) -> int:
        return self.slots.live_rows

    @property
    def waiting_images(self) -> int:
        """Images of added jobs not admitted yet."""
        return sum(self._jobs[k].images - self._jobs[k].next_image for k in self._line)

    @property
    def room(self) -> int:
        """Images the loop can take beyond what already waits for a slot."""
        return max(0, self.slots.free_slots - self.waiting_images)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._jobs

    def keys(self) -> list[Hashable]:
        return list(self._jobs)

    def add(self, key: Hashable, job: Job) -> None:
        """Prepare a job and put its images in line. Raises what its input raises (a client error)."""
        request = self.pipeline._request(job)
        self._jobs[key] = _LiveJob(job, request, added=time.perf_counter())
        self._line.append(key)

    def cancel(self, key: Hashable) -> None:
        """The job leaves now: its rows free their slots, its waiting images leave the line."""
        live = self._jobs.pop(key, None)
        if live is None:
            return
        for first in range(live.images):
            self.slots.cancel((key, first))
        if key in self._line:
            self._line.remove(key)

    # ---- the loop --------------------------------------------------------------------------------

    def step(self) -> tuple[list[Done], list[tuple[Hashable, JobFailed]]]:
        """Admit what fits, run one decode step: (jobs done, jobs failed)."""
        failed: list[tuple[Hashable, JobFailed]] = []
        try:
            self._admit()
            finished = self.slots.step()
        except torch.cuda.OutOfMemoryError:
            return [], self._out_of_memory()
        done = []
        for piece, output in finished:
            key, first = cast(tuple[Hashable, int], piece)  # pieces are keyed (job key, first image)
            live = self._jobs.get(key)
            if live is None:
                continue
            live.pieces[first] = output
            sampled = sum(len(o.codes) for o in live.pieces.values())
            if live.next_image == live.images and sampled == live.images:
                del self._jobs[key]
                parts = [live.pieces[f] for f in sorted(live.pieces)]
                codes, ppl = torch.cat([p.codes for p in parts]), torch.cat([p.ppl for p in parts])
                whole = GenerationOutput(codes, ppl)
                start = live.admitted_at or live.added
                done.append(Done(key, live.job, whole, time.perf_counter() - start))
        return done, failed

    def _admit(self) -> None:
        while self._line and self.slots.free_slots:
            key = self._line[0]
            live = self._jobs[key]
            n = min(live.images - live.next_image, self.slots.free_slots)
            images = range(live.next_image, live.next_image + n)
            self.slots.admit((key, images.start), live.request, images)
            if live.admitted_at is None:
                live.admitted_at = time.perf_counter()
                self._admitted.append(key)
            live.next_image += n
            if live.next_image == live.images:
                self._line.popleft()

    def _out_of_memory(self) -> list[tuple[Hashable, JobFailed]]:
        from app.engine.pipeline import failure_message, release_memory

        live = [k for k in self._jobs if k not in self._line or self._jobs[k].next_image]
        old = self.slots.slots
        for key in list(self._jobs):
            for first in range(self._jobs[key].images):
                self.slots.cancel((key, first))
        self.pipeline.decoder.release_caches()
        release_memory()
        if old == 1:
            log.error("decode loop: out of memory at one slot; failing %d job(s)", len(self._jobs))
            failed = [(k, JobFailed(failure_message(torch.cuda.OutOfMemoryError(), self._jobs[k].images)))
                      for k in self._jobs]
            self._jobs.clear()
            self._line.clear()
            return failed
        log.warning("decode loop: out of memory at %d slots; %d slots now, %d job(s) rerun from the start",
                    old, old // 2, len(live))
        self.slots = SlotDecoder(self.pipeline.decoder, old // 2)
        # Back to the front of the line in the order they joined, each from its first image.
        for key in reversed(live):
            job = self._jobs[key]
            job.next_image, job.pieces, job.admitted_at = 0, {}, None
            if key in self._line:
                self._line.remove(key)
            self._line.appendleft(key)
        return []

    def take_admitted(self) -> list[Hashable]:
        """The jobs whose first rows joined the slots since the last call (for the admission wait)."""
        admitted, self._admitted = self._admitted, []
        return admitted

    # ---- what a job shows while it runs ----------------------------------------------------------

    def progress(self, key: Hashable) -> Progress:
        """The job's image positions sampled, averaged over its images."""
        live = self._jobs[key]
        total = sum(len(o.codes) * self.steps for o in live.pieces.values())
        for first in range(live.images):
            piece = (key, first)
            if piece in self.slots:
                total += self.slots.progress(piece) * self.slots.rows(piece)
        return Progress(step=total // live.images, steps=self.steps)

    def partial(self, key: Hashable) -> torch.Tensor:
        """The job's codes so far, [images, image_seq_length] long on the CPU, -1 not yet sampled."""
        live = self._jobs[key]
        out = torch.full((live.images, self.steps), -1, dtype=torch.long)
        for first, o in live.pieces.items():
            out[first : first + len(o.codes)] = o.codes
        for first in range(live.images):
            piece = (key, first)
            if piece in self.slots:
                codes = self.slots.partial(piece)
                out[first : first + len(codes)] = codes
        return out

    # ---- finishing (any thread) ------------------------------------------------------------------

    def finish(self, done: Done, previews: tuple[Hashable, int, Deliver] | None = None) -> Outcome:
        """VQ-GAN decode, rank, upscale and encode a done job; a failure fails this job only.
        `previews`: see `Pipeline.finish_job` (the job's key in the preview renderer, the step of its
        newest grid handed over, where its previews go)."""
        return self.pipeline.finish_job(done.job, done.output, done.generate_s, previews=previews)
