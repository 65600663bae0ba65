"""The KServe Model that assembles the service: `load()` brings up the pipeline, the queue, the worker and
the Service; `predict()` hands a v1 body to the v1 protocol and a v2 `InferRequest` (REST infer or gRPC
ModelInfer, both through KServe's data plane) to the v2 protocol. Every protocol then takes the one path
of `Service`; the HTTP app around them is app/serving/web/app.py.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import kserve
from kserve.protocol.infer_type import InferRequest, InferResponse

from app.serving.core.card import build_card
from app.serving.core.errors import NotReady, ShuttingDown, Unauthenticated
from app.serving.core.jobs import Jobs
from app.serving.core.schema import Limits, Schema
from app.serving.core.service import Service
from app.serving.core.settings import ServerSettings
from app.serving.core.tenants import ApiKeys
from app.serving.observability import metrics
from app.serving.observability.metrics import PrometheusJobObserver, PrometheusObserver
from app.serving.protocols import jobs as jobs_protocol
from app.serving.protocols import v1, v2
from app.serving.protocols.routes import ProtocolContext
from app.serving.queue.local import LocalQueue
from app.serving.queue.loop_worker import LoopWorker
from app.serving.queue.memory_jobs import MemoryJobStore
from app.serving.queue.redis_conn import resolve
from app.serving.queue.redis_jobs import RedisJobs, RedisJobWriter, Retention
from app.serving.queue.redis_queue import RedisQueue
from app.serving.queue.worker import BatchWorker

log = logging.getLogger(__name__)


class KandinskyModel(kserve.Model):
    """ruDALL-E Kandinsky behind KServe's v1 predict and v2 (Open Inference Protocol) infer, REST and gRPC."""

    def __init__(self, name: str, settings: ServerSettings | None = None) -> None:
        super().__init__(name)
        self.settings = settings or ServerSettings()
        s = self.settings
        self.pipeline: Any = None
        self.worker: BatchWorker | LoopWorker | None = None
        self.service = Service(name, timeout_s=s.request_timeout)
        self.replica = s.replica_name or socket.gethostname()
        # API keys (SPEC section 12): read now, so that a bad file stops start-up naming the line
        self.keys = ApiKeys.load(s.api_keys) if s.api_keys else None
        if self.keys is not None:
            self.keys.start()  # rereads the file when it changes (a mounted Secret updates in place)
            keys = self.keys
            metrics.API_KEYS_FILE_OK.set_function(lambda: float(keys.file_ok))
        self.jobs: Jobs | RedisJobs
        if s.redis_url:  # jobs live in Redis with the queue (attach() gives the workers their writer)
            self.jobs = RedisJobs(self.service, retention=self.retention(),
                                  encode_data=jobs_protocol.encode_data, observer=PrometheusJobObserver())
        else:
            store = MemoryJobStore(ttl=s.job_ttl, max_finished=s.max_jobs, max_result_bytes=s.max_job_bytes,
                                   tenant_max_finished=s.tenant_max_jobs,
                                   tenant_max_result_bytes=s.tenant_max_job_bytes,
                                   observer=PrometheusJobObserver())
            self.jobs = Jobs(self.service, store, ttl=s.job_ttl, encode=jobs_protocol.encode_event,
                             worker=self.replica)
        metrics.JOB_RESULT_BYTES.set_function(self.jobs.result_bytes if isinstance(self.jobs, RedisJobs)
                                              else store.result_bytes)
        self.context = ProtocolContext(name, self.service, self.jobs, s, self.card, self.keys)

    def load(self) -> bool:
        """Load every component, start the GPU worker, and only then report ready."""
        from app.engine.pipeline import Pipeline  # torch and the networks load here, not at import

        if self.pipeline is not None:
            # Loaded already: KServe calls load() again on a model that is not ready (while draining);
            # a second copy of the weights would not fit beside the first.
            return self.ready
        s = self.settings
        if s.role == "api":  # no weights: the manifest gives the limits and the card
            self.attach(ManifestOnly(s.model_dir))
            return self.ready
        self.pipeline = Pipeline.load(
            s.model_dir, device=s.device, dtype=s.dtype, max_batch_images=s.max_batch_images or None,
            batch_invariant=s.batch_invariant,
        )
        self.attach(self.pipeline)
        return self.ready

    def attach(self, pipeline: Any) -> None:
        """Serve an already loaded pipeline (load() calls this; tests reuse one pipeline across apps)."""
        s = self.settings
        self.pipeline = pipeline
        schema = Schema(Limits(s.max_images_per_request, int(pipeline.image_vocab_size),
                               int(pipeline.manifest.dalle.image_tokens_per_dim)))
        observer = PrometheusObserver()
        queue: LocalQueue | RedisQueue
        if s.redis_url:
            target = resolve(s.redis_url, s.redis_password_file or None)
            queue = RedisQueue(target, self.name, queue_size=s.queue_size, lease_s=s.job_lease,
                               max_deliveries=s.max_deliveries, keep_s=s.job_ttl,
                               consumer=self.replica, observer=observer,
                               tenant_queue_size=s.tenant_queue_size, weights=self.weight)
            queue.job_writer = RedisJobWriter(queue, jobs_protocol.encode_data, retention=self.retention(),
                                              worker=self.replica, observer=PrometheusJobObserver())
            log.info("queue on Redis %s (password from %s), role %s", target.redacted, target.password_from,
                     s.role)
        else:
            queue = LocalQueue(s.queue_size, observer, tenant_queue_size=s.tenant_queue_size,
                               weights=self.weight)
        if s.role == "api":
            self.worker = None
            self.service.open(queue, schema, lambda: True)  # alive: nothing here can break but the loop
            self.ready = True
            log.info("model %s ready (api: queueing for the workers), queue %d requests, deadline %.0f s",
                     self.name, s.queue_size, s.request_timeout)
            return
        worker_class = LoopWorker if s.continuous_batching else BatchWorker
        self.worker = worker_class(
            pipeline, queue, max_batch_images=pipeline.max_batch_images, observer=observer
        )
        if isinstance(queue, RedisQueue):
            queue.start_worker_threads()
        self.worker.start()
        worker = self.worker
        self.service.open(queue, schema, lambda: worker.alive)
        self.ready = True
        log.info(
            "model %s ready: %s, %d images at once, queue %d requests, deadline %.0f s", self.name,
            "continuous batching" if s.continuous_batching else "batch at a time",
            pipeline.max_batch_images, s.queue_size, s.request_timeout,
        )

    @property
    def alive(self) -> bool:
        """Loaded, with its GPU worker running: what liveness reports (a broken pod gets restarted)."""
        return self.service.alive

    @property
    def draining(self) -> bool:
        return self.service.draining

    def start(self) -> None:
        # KServe's default start() marks every model ready; ours is ready only once load() succeeded.
        self.ready = self.service.ready

    def begin_drain(self) -> None:
        """Stop intake (readiness and new predicts answer 503); queued and running work goes on."""
        self.service.begin_drain()
        self.ready = False

    def stop(self) -> None:
        """KServe calls this on shutdown: finish or answer what is queued, then stop the worker."""
        self.begin_drain()
        if self.worker is not None:
            # A running batch legitimately takes up to the request deadline; a thread left inside torch
            # at interpreter exit can abort the process instead of exiting 0.
            s = self.settings
            self.worker.stop(timeout=s.drain_timeout or s.request_timeout)
        super().stop()

    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        """A v1 body gets the v1 answer; a v2 `InferRequest` (REST infer or gRPC ModelInfer) the v2 one.
        With API keys, the caller's tenant comes from the `authorization` header (REST) or metadata
        (gRPC), which KServe passes here; the HTTP middleware and the gRPC interceptor refused a missing
        or unknown key already, and this refuses one that a reload removed meanwhile."""
        tenant = self.tenant_of(headers)
        if isinstance(payload, InferRequest):
            return await v2.infer(self.service, self.name, payload, tenant)
        return await v1.predict(self.service, payload, tenant)

    def retention(self) -> Retention:
        s = self.settings
        return Retention(s.job_ttl, s.max_jobs, s.max_job_bytes, s.tenant_max_jobs, s.tenant_max_job_bytes)

    def weight(self, tenant: str | None) -> float:
        """A tenant's weight in the fair queue (the keys file's `weight=N`; 1 without one)."""
        return self.keys.weight(tenant) if self.keys is not None else 1.0

    def tenant_of(self, headers: dict[str, str] | None) -> str | None:
        """The tenant a request's headers authenticate; None without API keys; Unauthenticated (401)
        when keys are asked for and none matches."""
        if self.keys is None:
            return None
        value = next((v for k, v in (headers or {}).items() if k.lower() == "authorization"), None)
        tenant = self.keys.authenticate(value)
        if tenant is None:
            raise Unauthenticated("a valid API key is required: send Authorization: Bearer <key>")
        return tenant.name

    def get_input_types(self) -> list[dict[str, Any]]:
        """The v2 inputs (name, datatype, shape) for KServe's model metadata, REST and gRPC."""
        return v2.input_metadata()

    def get_output_types(self) -> list[dict[str, Any]]:
        """The v2 outputs (name, datatype, shape) for KServe's model metadata, REST and gRPC."""
        return v2.output_metadata()

    def card(self) -> dict[str, Any]:
        schema = self.service.schema
        if self.pipeline is None or schema is None:
            raise NotReady(f"model {self.name} is not ready")
        manifest = self.pipeline.manifest
        return build_card(self.name, dict(manifest.extra), self.pipeline.describe(), schema)

    @property
    def schema(self) -> Schema | None:
        return self.service.schema


__all__ = ["KFServingKandinskyModel", "KandinskyModel", "ServerSettings", "ShuttingDown"]

# The catalog's first client code imports the model under its KFServing-era name.
KFServingKandinskyModel = KandinskyModel


class ManifestOnly:
    """What an `api` replica knows of the model: its manifest (limits, card), no weights."""

    def __init__(self, model_dir: str) -> None:
        from app.engine.store import load_manifest

        self.manifest = load_manifest(model_dir)
        self.image_vocab_size = self.manifest.dalle.image_vocab_size
        self.max_batch_images = 0  # this replica generates nothing

    def describe(self) -> dict[str, Any]:
        cfg = self.manifest.dalle
        return {"name": self.manifest.name, "role": "api",
                "transformer": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                                "num_attention_heads": cfg.num_attention_heads,
                                "text_seq_length": cfg.text_seq_length,
                                "image_tokens_per_dim": cfg.image_tokens_per_dim,
                                "vocab_size": cfg.vocab_size, "image_vocab_size": cfg.image_vocab_size,
                                "hf_version": cfg.hf_version}}
