"""The server's settings: what `python -m app` adds to KServe's flags, each with its default and help.

`ServerSettings` is the one place a default is written: the command line (`app.__main__.build_parser`)
makes one flag per field from it, and the request schema's default limits and the generate CLI read it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from app.serving.observability.logs import LOG_FORMATS

DTYPES = ("auto", "fp32", "fp16", "bf16")


def _flag(default: Any, help: str, **argparse: Any) -> Any:
    """A settings field: its default, and its command-line help (and argparse extras such as choices)."""
    return field(default=default, metadata={"help": help, **argparse})


@dataclass(frozen=True)
class ServerSettings:
    """Everything `python -m app` adds to KServe's flags (`--<field name>`)."""

    model_dir: str = _flag("/mnt/models", "Model directory holding model.json.")
    device: str = _flag(
        "auto", "auto (every CUDA device, else the CPU), cpu, or a list such as cuda:0,cuda:1,cuda:2."
    )
    dtype: str = _flag(
        "auto",
        "auto: fp16 on CUDA (as ruDALL-E runs the weights), fp32 on the CPU; bf16 needs Ampere+.",
        choices=list(DTYPES),
    )
    # 0: derived from free memory by the placement planner
    max_batch_images: int = _flag(0, "Images per merged batch; 0 derives it from memory.")
    max_images_per_request: int = _flag(16, "Images per request, all instances.")
    queue_size: int = _flag(32, "Requests that may wait; beyond: 503.")
    request_timeout: float = _flag(600.0, "Server deadline per request in seconds (504).")
    # An image prompt travels as base64 in the body: 8 MiB holds a 6 MB photo.
    max_body_bytes: int = _flag(8 << 20, "Request body limit (413).")
    body_timeout: float = _flag(30.0, "Seconds for a request body to arrive (408).")
    job_ttl: float = _flag(3600.0, "Seconds a finished job is kept for polling.")
    max_jobs: int = _flag(256, "Finished jobs kept at most; the oldest are dropped first.")
    max_job_bytes: int = _flag(
        1 << 30, "Bytes of finished jobs' results kept at most; the oldest result expires first."
    )
    keepalive: float = _flag(15.0, "Seconds between keep-alive comments on an event stream.")
    send_timeout: float = _flag(
        60.0, "Seconds an event-stream client may leave sent bytes unread before it is disconnected."
    )
    header_timeout: float = _flag(
        10.0, "Seconds for a request's headers to arrive once its first byte has (408, then close)."
    )
    max_connections: int = _flag(1000, "Open HTTP connections at most; beyond, new ones get 503.")
    http_host: str = _flag("0.0.0.0", "Address the HTTP server binds (0.0.0.0: every interface).")
    grpc_host: str = _flag("0.0.0.0", "Address the gRPC server binds (0.0.0.0: every interface).")
    batch_invariant: bool = _flag(
        True,
        "A seed gives the same images whatever shares its batch (fixed product shapes); "
        "--no-batch_invariant trades that for a few percent of CPU decode speed at small batches.",
        action=argparse.BooleanOptionalAction,
    )
    continuous_batching: bool = _flag(
        True,
        "Requests join the running decode between steps and are answered when their own images are "
        "done; --no-continuous_batching decodes one merged batch at a time.",
        action=argparse.BooleanOptionalAction,
    )
    redis_url: str = _flag(
        "",
        "Redis that makes replicas one service (redis://host:6379/0 or rediss://; the password from "
        "--redis_password_file, else REDIS_PASSWORD, else the URL): one queue for every replica, work "
        "leased so that a lost replica loses nothing. Empty: everything in this process.",
    )
    redis_password_file: str = _flag("", "File holding the Redis password (a mounted Secret).")
    role: str = _flag(
        "all",
        "all: serve the APIs and generate; api: serve the APIs and queue work, load no weights (needs "
        "--redis_url); worker: generate from the Redis queue.",
        choices=["all", "api", "worker"],
    )
    replica_name: str = _flag("", "This replica's name in Redis (leases, logs); empty: the host name.")
    job_lease: float = _flag(
        30.0, "Seconds a worker's hold on running work lasts unrenewed (with --redis_url); past it, "
        "another worker reruns the work from the start with its seed."
    )
    drain_timeout: float = _flag(
        0.0, "Seconds a stopping server (SIGTERM) lets running work finish; 0: the request deadline. "
        "With --redis_url, work still running then is handed back to the other workers at once; keep "
        "it below the pod's termination grace period."
    )
    max_deliveries: int = _flag(
        3, "Times work is started at most (with --redis_url) when its workers keep being lost; then it "
        "fails saying so."
    )
    api_keys: str = _flag(
        "",
        "File of API keys, one `TENANT TOKEN` (or `TENANT sha256:HEX`, optionally `weight=N`) per line, "
        "reread when it changes: every generating and job route then needs `Authorization: Bearer "
        "TOKEN`, and each tenant sees only its own jobs. Empty: no keys asked for.",
    )
    tenant_queue_size: int = _flag(
        0, "Requests one tenant may have waiting; beyond: 429 with Retry-After. 0: only --queue_size."
    )
    tenant_max_jobs: int = _flag(
        0, "Finished jobs kept per tenant at most (its oldest dropped first); 0: only --max_jobs."
    )
    tenant_max_job_bytes: int = _flag(
        0, "Bytes of results kept per tenant at most (its oldest result expires first); 0: only "
        "--max_job_bytes."
    )
    log_format: str = _flag(
        "text",
        "text: one human-readable line per record; json: one JSON object per line.",
        choices=list(LOG_FORMATS),
    )
