"""What goes into the engine and what comes out, as plain data (no torch): jobs, results, failures.

The scheduler sees only these: it hands `Pipeline.run` a list of `Job`s and gets one `Outcome` per job.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.engine.params import GenerationParams


@dataclass
class Job:
    query: str
    params: GenerationParams


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
    """A job that failed even when run alone; `message` is for the client (it never holds a prompt)."""

    message: str


#: What `Pipeline.run` gives for each job: its result, its failure, or None when `on_step` stopped it.
Outcome = JobResult | JobFailed | None
