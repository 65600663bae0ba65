"""The typed currency of the service: what every protocol produces (`ImageRequest`), what it gets back
(`RequestResult`), and what it hears while the work runs (`Event`). Plain data, no protocol in sight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from app.engine.jobs import Job, JobResult, Progress
from app.engine.params import STAGES


@dataclass(frozen=True)
class ImageRequest:
    """One request of any protocol: its validated instances (query + engine parameters, each with its
    seed, image prompt and preview cadence), its deadline, and who asks."""

    instances: tuple[Job, ...]
    timeout_s: float  # the server's deadline, counted from submission
    protocol: str  # v1, jobs, v2, grpc, openai: for logs and metrics
    tenant: str | None = None  # the caller's identity, once requests carry one

    @property
    def images(self) -> int:
        return sum(int(job.params.images_to_gen) for job in self.instances)


@dataclass(frozen=True)
class InstanceResult:
    """One instance's answer: encoded image files (base64, best CLIP score first) and their scores."""

    images: list[str]
    format: str  # jpeg, png or webp
    clip_scores: list[float]
    ppl: list[float]
    seed: int
    timings: dict[str, float]  # queue and every stage, in seconds

    @classmethod
    def of(cls, result: JobResult, fmt: str, queue_seconds: float) -> InstanceResult:
        timings = {"queue": round(queue_seconds, 4)}
        timings.update({stage: float(result.timings.get(stage, 0.0)) for stage in STAGES})
        return cls(
            images=list(result.images),
            format=fmt,
            clip_scores=[float(s) for s in result.clip_scores],
            ppl=[float(p) for p in result.ppl],
            seed=int(result.seed),
            timings=timings,
        )


@dataclass(frozen=True)
class RequestResult:
    """Every instance's answer, in instance order."""

    instances: list[InstanceResult]
    queue_seconds: float


@dataclass(frozen=True)
class Started:
    """The request's batch started."""


@dataclass(frozen=True)
class Progressed:
    """A decode tick: per instance its progress (None where it has no news), with previews when due."""

    instances: tuple[Progress | None, ...] = field(default_factory=tuple)


Event = Started | Progressed
Listener = Callable[[Event], None]


def progress_step(progress: Sequence[Progress | None], weights: Sequence[int]) -> tuple[int, int] | None:
    """One bar for a request: (step, steps) with the instances' steps weighed by their images."""
    known = [(p, n) for p, n in zip(progress, weights, strict=True) if p is not None]
    if not known:
        return None
    steps = known[0][0].steps
    return sum(p.step * n for p, n in known) // sum(n for _, n in known), steps


# ---- jobs -----------------------------------------------------------------------------------------


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobEventName(StrEnum):
    """The events of a job's stream (SPEC section 7): `status` first, `progress` and `preview` while it
    runs, then exactly one final event named after its final status."""

    STATUS = "status"
    PROGRESS = "progress"
    PREVIEW = "preview"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self.value in FINAL


@dataclass(frozen=True)
class StepProgress:
    """The data of a `progress` event: image positions sampled so far of `steps` per image."""

    step: int
    steps: int


@dataclass(frozen=True)
class Preview:
    """The data of a `preview` event: one instance's partial images (base64 JPEG, unsampled rows grey)."""

    step: int
    instance: int
    images: list[str]


@dataclass(eq=False)
class JobEvent:
    """One event of a job's stream: its name and its data (what the stream sends as one JSON line).

    One object per event, shared by every subscriber: its bytes on the wire are encoded once (`encoded`,
    by the encoder the protocol layer gives `Jobs`) and every stream sends that same bytes object.
    """

    name: JobEventName
    data: Any  # status, cancelled: JobRecord; progress: StepProgress; preview: Preview;
    # succeeded: RequestResult (a JobRecord once the result expired); failed: the error text.
    # None once sealed: the wire bytes hold it.
    wire: bytes | None = field(default=None, repr=False)
    #: The data already as its one line of JSON (an event read back from a shared store), else None.
    raw: bytes | None = field(default=None, repr=False)
    #: The event's id in a shared store (the stream's `id:`, what `Last-Event-ID` resumes from).
    event_id: str | None = None

    def encoded(self, encode: EventEncoder) -> bytes:
        """The event's bytes on the wire, encoded at the first call and shared from then on."""
        if self.wire is None:
            self.wire = encode(self)
        return self.wire

    def seal(self, encode: EventEncoder) -> bytes:
        """Encode now and keep only the bytes: a result is held once, as what the streams send."""
        wire = self.encoded(encode)
        self.data = None
        return wire

    @property
    def size(self) -> int:
        """Bytes on the wire once encoded (0 before)."""
        return len(self.wire) if self.wire is not None else 0


#: A job event -> its bytes on the wire (the protocol layer's; the core never looks inside).
EventEncoder = Callable[[JobEvent], bytes]


@dataclass(eq=False)
class JobRecord:
    """A job as the job store keeps it: the request's bookkeeping, never the request's text."""

    id: str
    fingerprint: str  # of the submitted body, for Idempotency-Key
    idempotency_key: str | None
    created: float  # unix time
    images: list[int]  # images_to_gen per instance, to weigh progress
    tenant: str | None = None
    status: JobStatus = JobStatus.QUEUED
    started: float | None = None
    finished: float | None = None
    finished_at: float | None = None  # time.monotonic(), for the TTL
    step: int = 0
    steps: int = 0
    error: str | None = None
    #: The final event, sealed (its bytes only). A succeeded job's holds the result while it is kept.
    final: JobEvent | None = None
    #: Bytes of the kept result (its final event on the wire); 0 when none is kept.
    result_bytes: int = 0
    #: The result was dropped to keep the retained results within the store's byte bound.
    result_expired: bool = False
    #: Order of submission in its store (assigned by `JobStore.add`), for pages of listings.
    seq: int = 0
    #: The replica whose worker runs or ran it (`--replica_name`); None while queued.
    worker: str | None = None
    #: Requests ahead of it in the queue: set on snapshots (`Jobs.snapshot`), None on the stored record.
    queue_position: int | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL

    @property
    def holds_result(self) -> bool:
        """A succeeded job whose result is still kept."""
        return self.result_bytes > 0

    def expire_result(self) -> None:
        """Drop the kept result; the record stays and says so (`result_expired`)."""
        if self.status == JobStatus.SUCCEEDED:
            self.final, self.result_bytes, self.result_expired = None, 0, True
