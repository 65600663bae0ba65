"""The one path every protocol takes: `Service` validates parameters, submits typed requests to the
`WorkQueue`, awaits their results within the server's deadline, cancels them, says where they stand.

It knows no protocol and no transport: protocols build an `ImageRequest` (through `request()`) and turn
the `RequestResult` or the `ServiceError` into their wire form.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from app.engine.jobs import Job
from app.serving.core.errors import DeadlineExceeded, GenerationFailed, NotReady, ServiceError, ShuttingDown
from app.serving.core.schema import Instance, Schema, generation_params
from app.serving.core.types import ImageRequest, Listener, RequestResult
from app.serving.queue.base import Work, WorkQueue

log = logging.getLogger(__name__)


class Service:
    """Submit, await, cancel, subscribe, position: for one served model. Open once the model is loaded."""

    def __init__(self, name: str, *, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.queue: WorkQueue | None = None
        self.schema: Schema | None = None
        self._worker_alive: Callable[[], bool] = lambda: False
        self.draining = False

    def open(self, queue: WorkQueue, schema: Schema, worker_alive: Callable[[], bool]) -> None:
        """Start serving: requests go to `queue`, validated by `schema`."""
        self.queue, self.schema, self._worker_alive = queue, schema, worker_alive

    # ---- state ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.queue is not None and not self.draining

    async def reachable(self) -> bool:
        """Ready and able to queue work: the queue's store answers (Redis, when replicas share one)."""
        return self.ready and self.queue is not None and await self.queue.reachable()

    @property
    def alive(self) -> bool:
        """Loaded, with its worker running: what liveness reports (a broken pod gets restarted)."""
        return self.queue is not None and self._worker_alive()

    def begin_drain(self) -> None:
        """Stop intake (readiness and new requests answer 503); queued and running work goes on."""
        if not self.draining:
            log.info("model %s: draining, no new requests accepted", self.name)
        self.draining = True
        if self.queue is not None:
            self.queue.begin_drain()

    def _serving(self) -> tuple[WorkQueue, Schema]:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.queue is None or self.schema is None:
            raise NotReady(f"model {self.name} is not ready")
        return self.queue, self.schema

    # ---- requests ---------------------------------------------------------------------------------

    def parse(self, payload: Any) -> list[Instance]:
        """A v1 request body -> validated instances; RequestInvalid naming the fields, or 503."""
        _, schema = self._serving()
        return schema.parse(payload)

    def request(self, instances: list[Instance], protocol: str, tenant: str | None = None) -> ImageRequest:
        """Validated instances -> the typed request every protocol submits."""
        jobs = tuple(Job(inst.query, generation_params(inst)) for inst in instances)
        return ImageRequest(jobs, timeout_s=self.timeout_s, protocol=protocol, tenant=tenant)

    async def submit(
        self,
        request: ImageRequest,
        listener: Listener | None = None,
        wants_previews: Callable[[], bool] | None = None,
    ) -> Work:
        """Queue a request without waiting; QueueFull or ShuttingDown (503) when it cannot be taken.
        `listener` hears its events (started, progress) on this event loop; `wants_previews` says whether
        a preview would be seen now (default: always)."""
        queue, _ = self._serving()
        if not request.instances:
            raise ValueError("a request needs at least one instance")
        now = time.monotonic()
        work = Work(request, enqueued=now, deadline=now + request.timeout_s)
        if wants_previews is not None:
            work.wants_previews = wants_previews
        await queue.put(work, listener)
        return work

    async def result(self, work: Work) -> RequestResult:
        """The work's result; DeadlineExceeded at its deadline. A waiter that is cancelled (its client
        went away) gives the work up: queued, it never runs; running, it stops at its next tick."""
        assert self.queue is not None  # submitted, so open
        try:
            return await asyncio.wait_for(
                self.queue.outcome(work), timeout=max(0.0, work.deadline - time.monotonic())
            )
        except TimeoutError:
            self.cancel(work)
            limit = work.deadline - work.enqueued
            raise DeadlineExceeded(
                f"the request did not finish within the server deadline of {limit:g} s"
            ) from None
        except asyncio.CancelledError:
            self.cancel(work)  # the client went away: do not spend GPU time on it
            raise
        except ServiceError:
            raise
        except Exception as exc:
            # A protocol's catch-all could put the exception text (which may quote the input) in a body.
            log.exception("request failed outside the pipeline")
            raise GenerationFailed(f"internal error ({type(exc).__name__}); retry the request") from None

    async def generate(self, request: ImageRequest, listener: Listener | None = None) -> RequestResult:
        """Submit and await: what synchronous protocols do."""
        return await self.result(await self.submit(request, listener))

    def cancel(self, work: Work) -> None:
        if self.queue is not None:
            self.queue.cancel(work)

    async def position(self, work: Work) -> int | None:
        return await self.queue.position(work) if self.queue is not None else None
