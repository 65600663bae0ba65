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

    def loop_step(self, live_rows: int, slots: int) -> None:
        """Continuous batching: a decode step ran with `live_rows` of its `slots` rows live."""
        ...

    def taken(self, wait: float) -> None:
        """Continuous batching: a request left the queue for the loop after `wait` s in the queue."""
        ...

    def admitted(self, wait: float) -> None:
        """Continuous batching: a request's first rows joined the slots `wait` s after it was queued."""
        ...

    def redis_call(self, seconds: float, ok: bool) -> None:
        """A service-side Redis round trip took `seconds` (ok: it answered)."""
        ...

    def delivery(self, takeover: bool, exhausted: bool) -> None:
        """A worker claimed work: `takeover` after another worker's lease lapsed, `exhausted` when it
        was failed instead for having been delivered more than --max_deliveries times."""
        ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_started(self, waits: Sequence[float], images: int) -> None:
        pass

    def batch_done(self, jobs: Sequence[Any], outcomes: Sequence[Any]) -> None:
        pass

    def loop_step(self, live_rows: int, slots: int) -> None:
        pass

    def taken(self, wait: float) -> None:
        pass

    def admitted(self, wait: float) -> None:
        pass

    def redis_call(self, seconds: float, ok: bool) -> None:
        pass

    def delivery(self, takeover: bool, exhausted: bool) -> None:
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
