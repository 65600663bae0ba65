"""What the queue and the worker report as they go, for metrics; observability/metrics.py implements it
on Prometheus, so neither the queue nor the engine knows Prometheus."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class QueueObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...

    def batch_started(self, waits: Sequence[float], images: int) -> None:
        """A batch of `images` images starts; `waits`: each request's seconds in the queue."""
        ...

    def batch_done(self, jobs: Sequence[Any], outcomes: Sequence[Any]) -> None:
        """The engine's jobs of a finished batch and their outcomes (results, failures, or None)."""
        ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_started(self, waits: Sequence[float], images: int) -> None:
        pass

    def batch_done(self, jobs: Sequence[Any], outcomes: Sequence[Any]) -> None:
        pass


NULL_OBSERVER: QueueObserver = _NullObserver()


class JobObserver(Protocol):
    def job_counts(self, counts: dict[str, int]) -> None:
        """Jobs held now, by status (every status present)."""
        ...

    def job_event(self, name: str) -> None:
        """An event was published."""
        ...


class _NullJobObserver:
    def job_counts(self, counts: dict[str, int]) -> None:
        pass

    def job_event(self, name: str) -> None:
        pass


NULL_JOB_OBSERVER: JobObserver = _NullJobObserver()
