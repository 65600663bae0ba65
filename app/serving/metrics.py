"""Every Prometheus metric of the service (SPEC.md section 5), on the default registry.

KServe's `/metrics` route exports the default registry, so registering here is enough to serve them.
Metrics are created once, at import; tests read deltas, never absolute values.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from app.engine.params import STAGES

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
    "Time a request waited in the queue before its batch started.",
    buckets=SECONDS_BUCKETS,
)
QUEUE_DEPTH = Gauge("kandinsky_queue_depth", "Requests waiting in the queue (not yet in a batch).")
BATCH_IMAGES = Histogram(
    "kandinsky_batch_images", "Images sampled by one merged generation batch.", buckets=BATCH_BUCKETS
)
IMAGES_TOTAL = Counter("kandinsky_images_total", "Images sampled.")
IMAGE_TOKENS_TOTAL = Counter("kandinsky_image_tokens_total", "Image tokens sampled.")
#: Protocols of kandinsky_requests_total; gRPC's codes are its status names (OK, INVALID_ARGUMENT, ...).
PROTOCOLS = ("v1", "v2", "grpc", "openai", "jobs")
REQUESTS_TOTAL = Counter(
    "kandinsky_requests_total",
    "Generation requests answered, by status code and protocol (v1, v2, grpc, openai, jobs).",
    ["code", "protocol"],
)
JOBS = Gauge("kandinsky_jobs", "Jobs held in memory, by status.", ["status"])
JOB_EVENTS_TOTAL = Counter("kandinsky_job_events_total", "Job events published, by event name.", ["event"])
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
