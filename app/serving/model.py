"""The KServe model: `load()` brings up the pipeline and the scheduler, `predict()` validates and awaits.

What the HTTP app adds around it (middleware, routes, the API document) is in app/serving/http.py.
"""

from __future__ import annotations

import logging
from typing import Any

import kserve
from kserve.errors import ModelNotReady
from kserve.protocol.infer_type import InferRequest, InferResponse

from app.serving import v2
from app.serving.card import build_card
from app.serving.errors import (
    GenerationFailed,
    ServiceError,
    ShuttingDown,
)
from app.serving.scheduler import Listener, Scheduler, Ticket
from app.serving.schema import TIMING_KEYS, Limits, Prediction, Schema, Timings, generation_params
from app.serving.settings import ServerSettings

log = logging.getLogger(__name__)


class KandinskyModel(kserve.Model):
    """ruDALL-E Kandinsky behind KServe's v1 predict and v2 (Open Inference Protocol) infer, REST and gRPC."""

    def __init__(self, name: str, settings: ServerSettings | None = None) -> None:
        super().__init__(name)
        self.settings = settings or ServerSettings()
        self.pipeline: Any = None
        self.scheduler: Scheduler | None = None
        self.schema: Schema | None = None
        self.draining = False

    def load(self) -> bool:
        """Load every component, start the GPU worker, and only then report ready."""
        from app.engine.pipeline import Pipeline  # torch and the networks load here, not at import

        if self.pipeline is not None:
            # Loaded already: KServe calls load() again on a model that is not ready (while draining);
            # a second copy of the weights would not fit beside the first.
            return self.ready
        s = self.settings
        self.pipeline = Pipeline.load(
            s.model_dir, device=s.device, dtype=s.dtype, max_batch_images=s.max_batch_images or None
        )
        self.attach(self.pipeline)
        return self.ready

    def attach(self, pipeline: Any) -> None:
        """Serve an already loaded pipeline (load() calls this; tests reuse one pipeline across apps)."""
        s = self.settings
        self.pipeline = pipeline
        self.schema = Schema(Limits(s.max_images_per_request, int(pipeline.image_vocab_size),
                                    int(pipeline.manifest.dalle.image_tokens_per_dim)))
        self.scheduler = Scheduler(
            pipeline, queue_size=s.queue_size, max_batch_images=pipeline.max_batch_images
        )
        self.scheduler.start()
        self.ready = True
        log.info(
            "model %s ready: batch limit %d images, queue %d requests, deadline %.0f s",
            self.name,
            self.scheduler.max_batch_images,
            s.queue_size,
            s.request_timeout,
        )

    @property
    def alive(self) -> bool:
        """Loaded, with its GPU worker running: what liveness reports (a broken pod gets restarted)."""
        return self.pipeline is not None and self.scheduler is not None and self.scheduler.alive

    def start(self) -> None:
        # KServe's default start() marks every model ready; ours is ready only once load() succeeded.
        self.ready = self.scheduler is not None and not self.draining

    def begin_drain(self) -> None:
        """Stop intake (readiness and new predicts answer 503); queued and running work goes on."""
        if not self.draining:
            log.info("model %s: draining, no new requests accepted", self.name)
        self.draining = True
        self.ready = False
        if self.scheduler is not None:
            self.scheduler.begin_drain()

    def stop(self) -> None:
        """KServe calls this on shutdown: finish or answer what is queued, then stop the worker."""
        self.begin_drain()
        if self.scheduler is not None:
            # A running batch legitimately takes up to the request deadline; a thread left inside torch
            # at interpreter exit can abort the process instead of exiting 0.
            self.scheduler.stop(timeout=self.settings.request_timeout)
        super().stop()

    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        """Validate the instances, queue them as one ticket, and answer every instance in order.

        A v1 body gets the v1 answer; a v2 `InferRequest` (REST infer or gRPC ModelInfer) the v2 one.
        """
        if isinstance(payload, InferRequest):
            return await v2.infer(self, payload)
        instances = self.parse(payload)
        predictions = await self.generate(instances)
        if len(predictions) == 1:
            return predictions[0]
        return {"ok": True, "predictions": predictions}

    # ---- the one path every protocol takes (v1, v2, gRPC, jobs, OpenAI) ---------------------------

    def parse(self, payload: Any) -> list[Any]:
        """A v1 predict body -> validated `Instance`s; RequestInvalid (400) naming the field, or 503."""
        self._check_serving()
        assert self.schema is not None
        return self.schema.parse(payload)

    def enqueue(self, instances: list[Any], listener: Listener | None = None) -> Ticket:
        """Queue validated instances as one ticket without waiting (the jobs API); QueueFull is a 503."""
        self._check_serving()
        assert self.scheduler is not None
        return self.scheduler.enqueue(
            _jobs(instances), timeout=self.settings.request_timeout, listener=listener
        )

    async def generate(self, instances: list[Any], listener: Listener | None = None) -> list[dict[str, Any]]:
        """Queue validated instances as one ticket and wait: one v1 prediction dict per instance."""
        try:
            return await self.results(self.enqueue(instances, listener))
        except ServiceError:
            raise
        except Exception as exc:
            # KServe's catch-all would put the exception text (which may quote the input) in the body.
            log.exception("predict failed outside the pipeline")
            raise GenerationFailed(f"internal error ({type(exc).__name__}); retry the request") from None

    async def results(self, ticket: Ticket) -> list[dict[str, Any]]:
        """Wait for a ticket: one v1 prediction dict per instance (the response fields of SPEC section 3)."""
        assert self.scheduler is not None
        try:
            outcome = await self.scheduler.wait(ticket)
            return [_prediction(result, outcome.queue_seconds) for result in outcome.results]
        except ServiceError:
            raise
        except Exception as exc:
            # KServe's catch-all would put the exception text (which may quote the input) in the body.
            log.exception("predict failed outside the pipeline")
            raise GenerationFailed(f"internal error ({type(exc).__name__}); retry the request") from None

    def _check_serving(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.scheduler is None or self.schema is None:
            raise ModelNotReady(self.name)

    def get_input_types(self) -> list[dict[str, Any]]:
        """The v2 inputs (name, datatype, shape) for KServe's model metadata, REST and gRPC."""
        return v2.input_metadata()

    def get_output_types(self) -> list[dict[str, Any]]:
        """The v2 outputs (name, datatype, shape) for KServe's model metadata, REST and gRPC."""
        return v2.output_metadata()

    def card(self) -> dict[str, Any]:
        if self.pipeline is None or self.schema is None:
            raise ModelNotReady(self.name)
        manifest = self.pipeline.manifest
        return build_card(self.name, dict(manifest.extra), self.pipeline.describe(), self.schema)


def _jobs(instances: list[Any]) -> list[Any]:
    from app.engine.jobs import Job

    return [Job(inst.query, generation_params(inst)) for inst in instances]


def _prediction(result: Any, queue_seconds: float) -> dict[str, Any]:
    timings = {key: float(result.timings.get(key, 0.0)) for key in TIMING_KEYS if key != "queue"}
    return Prediction(
        images=result.images,
        clip_scores=[float(s) for s in result.clip_scores],
        seed=result.seed,
        ppl=[float(p) for p in result.ppl],
        timings=Timings(queue=round(queue_seconds, 4), **timings),
    ).model_dump()


# The catalog's first client code imports the model under its KFServing-era name.
KFServingKandinskyModel = KandinskyModel
