"""Every Prometheus metric of the service (SPEC.md section 5), on the default registry.

KServe's `/metrics` route exports the default registry, so registering here is enough to serve them.
Metrics are created once, at import; tests read deltas, never absolute values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from app.engine.jobs import JobFailed
from app.engine.params import STAGES, Stage

log = logging.getLogger(__name__)

# Generation of a full batch on 3 V100 takes minutes, hence buckets up to the 600 s deadline.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)

STAGE_SECONDS = Histogram(
    "kandinsky_stage_seconds",
    "Wall time of one pipeline stage for one batch.",
    ["stage"],
    buckets=SECONDS_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "kandinsky_request_seconds",
    "Wall time of a predict request, from arrival to response.",
    buckets=SECONDS_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "kandinsky_queue_wait_seconds",
    "Time a request waited in the queue before its batch started (continuous batching: before the "
    "decode loop took it).",
    buckets=SECONDS_BUCKETS,
)
ADMISSION_WAIT_SECONDS = Histogram(
    "kandinsky_admission_wait_seconds",
    "Continuous batching: time from a request's arrival in the queue until its first rows joined the "
    "decode loop's slots.",
    buckets=SECONDS_BUCKETS,
)
QUEUE_DEPTH = Gauge("kandinsky_queue_depth", "Requests waiting in the queue (not yet in a batch).")
BATCH_IMAGES = Histogram(
    "kandinsky_batch_images", "Images sampled by one merged generation batch.", buckets=BATCH_BUCKETS
)
IMAGES_TOTAL = Counter("kandinsky_images_total", "Images sampled.")
HTTP_CONNECTIONS = Gauge(
    "kandinsky_http_connections", "Open HTTP connections (the --max_connections cap counts these)."
)
LOOP_LIVE_ROWS = Gauge("kandinsky_loop_live_rows", "Continuous batching: rows live in the last decode step.")
LOOP_SLOTS = Gauge("kandinsky_loop_slots", "Continuous batching: row slots of the decode loop.")
IMAGE_TOKENS_TOTAL = Counter("kandinsky_image_tokens_total", "Image tokens sampled.")
#: Protocols of kandinsky_requests_total; gRPC's codes are its status names (OK, INVALID_ARGUMENT, ...).
PROTOCOLS = ("v1", "v2", "grpc", "openai", "jobs")
#: `tenant` is a name from --api_keys (never a key), so its values are bounded by the keys file; "" without
#: keys and for a request refused before it was authenticated.
REQUESTS_TOTAL = Counter(
    "kandinsky_requests_total",
    "Generation requests answered, by status code, protocol (v1, v2, grpc, openai, jobs) and tenant "
    "(empty without API keys or when not authenticated).",
    ["code", "protocol", "tenant"],
)
JOBS_SUBMITTED_TOTAL = Counter(
    "kandinsky_jobs_submitted_total",
    "Jobs created, by tenant (empty without API keys); an Idempotency-Key that names an existing job "
    "creates none.",
    ["tenant"],
)
JOBS = Gauge("kandinsky_jobs", "Jobs held in memory, by status.", ["status"])
JOB_EVENTS_TOTAL = Counter("kandinsky_job_events_total", "Job events published, by event name.", ["event"])
JOB_RESULT_BYTES = Gauge(
    "kandinsky_job_result_bytes", "Bytes of finished jobs' results kept (bounded by --max_job_bytes)."
)
EVENT_SUBSCRIBERS_DROPPED = Counter(
    "kandinsky_event_subscribers_dropped",
    "Event-stream clients disconnected because a send made no progress for --send_timeout seconds.",
)
REDIS_SECONDS = Histogram(
    "kandinsky_redis_seconds",
    "Service-side Redis round trips (queueing a request, readiness): their latency, answered or not.",
    ["outcome"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
)
DELIVERIES_TOTAL = Counter(
    "kandinsky_deliveries",
    "Work claimed by this worker from the Redis queue: first, a takeover after another worker's lease "
    "lapsed, or exhausted (failed for having been delivered more than --max_deliveries times).",
    ["kind"],
)
API_KEYS_FILE_OK = Gauge(
    "kandinsky_api_keys_file_ok",
    "1 while the --api_keys file as it is now is the one in force; 0 after an edit the server refused "
    "(the previous keys are kept; the log names the line). Absent without --api_keys.",
)
GPU_MEMORY_BYTES = Gauge(
    "kandinsky_gpu_memory_bytes", "CUDA memory allocated by this process, per device.", ["device"]
)


def record_stage_timings(timings: dict[str, float]) -> None:
    for stage in STAGES:
        if stage in timings:
            STAGE_SECONDS.labels(stage=stage).observe(timings[stage])


def update_gpu_memory() -> None:
    """Refresh the per-device memory gauge; a no-op without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return
        for i in range(torch.cuda.device_count()):
            GPU_MEMORY_BYTES.labels(device=f"cuda:{i}").set(torch.cuda.memory_allocated(i))
    except Exception:  # a metrics refresh must never fail a request
        log.warning("could not read CUDA memory statistics", exc_info=True)


class PrometheusObserver:
    """The queue's and the worker's reports (`app.serving.queue.observer.QueueObserver`) as metrics."""

    def queue_depth(self, depth: int) -> None:
        QUEUE_DEPTH.set(depth)

    def batch_started(self, waits: Sequence[float], images: int) -> None:
        for wait in waits:
            QUEUE_WAIT_SECONDS.observe(wait)
        BATCH_IMAGES.observe(images)

    def batch_done(self, jobs: Sequence[Any], outcomes: Sequence[Any]) -> None:
        update_gpu_memory()
        # Counted here, not per answered request: a request that gave up late still cost its images;
        # one stopped at a progress tick (None) or failed produced none.
        done = [(j, o) for j, o in zip(jobs, outcomes) if o is not None and not isinstance(o, JobFailed)]
        results = [o for _, o in done]
        images = sum(int(j.params.images_to_gen) for j, _ in done)
        # Every sampled image has the same token count; the returned codes tell how many.
        per_image_tokens = next((len(r.codes[0]) for r in results if r.codes), 0)
        IMAGES_TOTAL.inc(images)
        IMAGE_TOKENS_TOTAL.inc(images * per_image_tokens)
        # The token loop serves the whole batch at once (its time is the batch's); later stages run per job.
        generate = max((r.timings.get(Stage.GENERATE.value, 0.0) for r in results), default=0.0)
        batch_timings = {Stage.GENERATE.value: generate}
        for stage in STAGES[1:]:
            batch_timings[stage] = sum(r.timings.get(stage, 0.0) for r in results)
        record_stage_timings(batch_timings)

    def loop_step(self, live_rows: int, slots: int) -> None:
        LOOP_LIVE_ROWS.set(live_rows)
        LOOP_SLOTS.set(slots)

    def taken(self, wait: float) -> None:
        QUEUE_WAIT_SECONDS.observe(wait)

    def admitted(self, wait: float) -> None:
        ADMISSION_WAIT_SECONDS.observe(wait)

    def redis_call(self, seconds: float, ok: bool) -> None:
        REDIS_SECONDS.labels(outcome="ok" if ok else "error").observe(seconds)

    def delivery(self, takeover: bool, exhausted: bool) -> None:
        DELIVERIES_TOTAL.labels(kind="exhausted" if exhausted else "takeover" if takeover else "first").inc()


class PrometheusJobObserver:
    """The job store's reports (`app.serving.queue.observer.JobObserver`) as metrics."""

    def job_counts(self, counts: dict[str, int]) -> None:
        for status, count in counts.items():
            JOBS.labels(status=status).set(count)

    def job_event(self, name: str) -> None:
        JOB_EVENTS_TOTAL.labels(event=name).inc()
