"""The Redis queue's values as JSON: a typed request, its result or error, its progress (what one replica
writes and another reads back as the same types)."""

from __future__ import annotations

import dataclasses
import json

from app.engine.jobs import Job, Progress
from app.engine.params import GenerationParams, ImagePrompt
from app.serving.core import errors
from app.serving.core.errors import ServiceError
from app.serving.core.types import ImageRequest, InstanceResult, Progressed, RequestResult


def request_to_json(request: ImageRequest) -> str:
    instances = [{"query": job.query, "params": dataclasses.asdict(job.params)} for job in request.instances]
    return json.dumps({"instances": instances, "timeout_s": request.timeout_s, "protocol": request.protocol,
                       "tenant": request.tenant}, ensure_ascii=False)


def request_from_json(text: str) -> ImageRequest:
    raw = json.loads(text)
    jobs = []
    for inst in raw["instances"]:
        params = dict(inst["params"])
        if params.get("image_prompt") is not None:
            params["image_prompt"] = ImagePrompt(**params["image_prompt"])
        jobs.append(Job(inst["query"], GenerationParams(**params)))
    return ImageRequest(tuple(jobs), raw["timeout_s"], raw["protocol"], raw["tenant"])


def result_to_json(result: RequestResult) -> str:
    return json.dumps(dataclasses.asdict(result))


def result_from_json(text: str) -> RequestResult:
    raw = json.loads(text)
    return RequestResult([InstanceResult(**i) for i in raw["instances"]], raw["queue_seconds"])


def error_to_json(error: ServiceError) -> str:
    return json.dumps({"type": type(error).__name__, "message": error.message})


def error_from_json(text: str) -> ServiceError:
    raw = json.loads(text)
    kind = getattr(errors, raw["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, ServiceError)):
        kind = errors.GenerationFailed
    return kind(raw["message"])


def progress_to_json(event: Progressed) -> str:
    return json.dumps([None if p is None else [p.step, p.steps, p.preview] for p in event.instances])


def progress_from_json(text: str) -> Progressed:
    return Progressed(tuple(None if p is None else Progress(step=p[0], steps=p[1], preview=p[2])
                            for p in json.loads(text)))
