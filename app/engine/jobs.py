"""What goes into the engine and what comes out, as plain data (no torch): jobs, results, failures.

The scheduler sees only these: it hands `Pipeline.run` a list of `Job`s and gets one `Outcome` per job.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from app.engine.params import GenerationParams


@dataclass
class Job:
    query: str
    params: GenerationParams
    #: Where this job's previews go (`params.preview_every` > 0): (step, one base64 JPEG per image),
    #: called from the preview renderer's thread. None: no previews are rendered for it.
    on_preview: Callable[[int, list[str]], None] | None = field(default=None, repr=False, compare=False)
    #: Asked before a preview is rendered: whether anyone would see it now (default: yes).
    wants_preview: Callable[[], bool] | None = field(default=None, repr=False, compare=False)


@dataclass
class JobResult:
    images: list[str]  # base64, best CLIP score first
    clip_scores: list[float]
    ppl: list[float]
    seed: int
    timings: dict[str, float]
    codes: list[list[int]]  # image token codes of the kept images, same order


@dataclass(frozen=True)
class JobFailed:
    """A job that failed even when run alone; `message` is for the client (it never holds a prompt).
    `invalid`: its own input could not be used (a client error), found before its batch decoded."""

    message: str
    invalid: bool = False


#: What `Pipeline.run` gives for each job: its result, its failure, or None when `on_progress` stopped it.
Outcome = JobResult | JobFailed | None


@dataclass(frozen=True)
class Progress:
    """One job's progress at a decode tick: ``step`` of ``steps`` image positions (averaged over its
    images; ``steps`` is ``image_seq_length``, 1024 for Kandinsky). ``preview`` is never set by the
    pipeline's ticks (previews go to `Job.on_preview`); the scheduler sets it when it passes a preview
    on: one base64 JPEG per image of the job, of the grid at ``step``, rows not yet sampled grey.
    """

    step: int
    steps: int
    preview: list[str] | None = None


#: The pipeline's progress callback: at every tick, one entry per job of the batch (in order): its
#: `Progress`, or None for a job with no news (one waiting for its own rerun after a failed batch).
#: Returns the indices of the jobs to stop there (their outcome is None), or None.
OnProgress = Callable[[Sequence[Progress | None]], Collection[int] | None]
