"""The OpenAI images API (SPEC section 8): `POST /openai/v1/images/generations`, `GET /openai/v1/models`.

So that the official `openai` client works with `base_url=http://HOST/openai/v1`. KServe 0.21's OpenAI
layer has no image generation (and needs vllm), so these are our own routes on the app. A request becomes
one instance of a typed request on the shared Service: the same queue, batching, seeds and validation as
predict. Errors come in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, naming OpenAI's parameter where there is one. With API
keys (SPEC section 12) the client's `api_key` is the key: a missing or unknown one is OpenAI's 401
(`code: invalid_api_key`, which the `openai` client raises as `AuthenticationError`), a tenant's full
queue its 429 (`code: rate_limit_exceeded`, `RateLimitError`, with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import ServerSentEvent

from app.engine.params import MAX_TEMPERATURE, SEED_MAX
from app.serving.core.errors import FieldProblem, RequestInvalid, ServiceError, find_unencodable, format_loc
from app.serving.core.service import Service
from app.serving.core.types import Event, Progressed
from app.serving.protocols.jobs import event_stream
from app.serving.protocols.routes import Operation, ProtocolContext, Route, refusal
from app.serving.queue.base import Work

log = logging.getLogger(__name__)

PREFIX = "/openai/v1"
GENERATIONS_PATH = PREFIX + "/images/generations"
MODELS_PATH = PREFIX + "/models"
#: OpenAI's sizes -> whether the kept images are upscaled x4 by RealESRGAN.
SIZES = {"256x256": False, "1024x1024": True}
DEFAULT_SIZE: Literal["1024x1024"] = "1024x1024"
MAX_PARTIAL_IMAGES = 3
PROTOCOL = "openai"
#: Image rows in Kandinsky's grid; partial images come at evenly spaced rows before the last.
GRID_ROWS = 32


class ImageGenerationRequest(BaseModel):
    """OpenAI's `images.generate` body; the extra fields carry ruDALL-E's own parameters."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str = Field(description="The served model's name.")
    prompt: str = Field(description="The query (Russian), as v1 `query`.")
    n: int = Field(default=1, ge=1, le=16, description="Images returned: the best `n` by ruCLIP.")
    size: Literal["256x256", "1024x1024"] = Field(
        default=DEFAULT_SIZE, description='"1024x1024" is the x4 RealESRGAN upscale of the 256x256 image.'
    )
    response_format: Literal["b64_json"] = Field(default="b64_json", description='Only "b64_json".')
    output_format: Literal["png", "jpeg", "webp"] = Field(default="png")
    stream: bool = Field(default=False, description="Server-sent events, OpenAI's image_generation.* events.")
    partial_images: int = Field(default=0, ge=0, le=MAX_PARTIAL_IMAGES,
                                description="Partial images sent before the final ones when streaming.")
    user: str | None = Field(default=None, description="Accepted for compatibility; not used.")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, description="As v1 `seed`.")
    top_k: int | None = Field(default=None, ge=1, description="As v1 `top_k`.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="As v1 `top_p`.")
    temperature: float | None = Field(default=None, gt=0.0, le=MAX_TEMPERATURE, description="As v1.")
    images_to_gen: int | None = Field(
        default=None, ge=1, description="Generate this many and keep the best `n` by ruCLIP (default: n)."
    )
    image_prompt: dict[str, Any] | None = Field(default=None, description="As v1 `image_prompt` (section 9).")


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: str


class ImageGenPartialImageEvent(BaseModel):
    """The data of an `image_generation.partial_image` event (OpenAI's `ImageGenPartialImageEvent`)."""

    type: Literal["image_generation.partial_image"]
    b64_json: str = Field(description="A base64 JPEG preview, the rows not yet sampled grey.")
    created_at: int
    partial_image_index: int = Field(description="0, 1, ... up to `partial_images` - 1.")
    background: Literal["opaque"]
    quality: Literal["auto"]
    size: Literal["256x256", "1024x1024"]
    output_format: Literal["jpeg"]


class ImageGenCompletedEvent(BaseModel):
    """The data of an `image_generation.completed` event (OpenAI's `ImageGenCompletedEvent`): per image."""

    type: Literal["image_generation.completed"]
    b64_json: str
    created_at: int
    background: Literal["opaque"]
    quality: Literal["auto"]
    size: Literal["256x256", "1024x1024"]
    output_format: Literal["png", "jpeg", "webp"]


#: The streamed answer's events, as `_stream` sends them; `error` (OpenAI's error body) ends a stream whose
#: generation failed.
STREAM_EVENTS: dict[str, Any] = {
    "image_generation.partial_image": ImageGenPartialImageEvent,
    "image_generation.completed": ImageGenCompletedEvent,
    "error": OpenAIErrorBody,
}


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class _Problem(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          409: "invalid_request_error", 429: "requests", 503: "server_error", 504: "server_error"}
#: OpenAI's codes of the statuses that always carry one (its API answers these for a bad key and a
#: rate limit).
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None
               ) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = code if code is not None else _CODES.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(problem: _Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(problem.status, problem.message, problem.param, problem.code)
    return JSONResponse(body, status_code=problem.status, headers=headers)


# Where the v1 schema names a field, the OpenAI parameter that set it.
_V1_TO_OPENAI = {"query": "prompt", "images_to_cherry_pick": "n", "format": "output_format",
                 "super_res": "size"}


def _param(problem: FieldProblem) -> str | None:
    """The OpenAI parameter of a problem (`instances[0].params.top_k` -> `top_k`), with its sub-path."""
    loc = list(problem.loc)
    if loc[:2] != ["instances", 0] or len(loc) < 3:
        return None
    rest = loc[3:] if loc[2] == "params" else loc[2:]
    if not rest:
        return None
    head = _V1_TO_OPENAI.get(str(rest[0]), str(rest[0]))
    return ".".join([head, *(str(p) for p in rest[1:])])


def _text(problem: FieldProblem) -> str:
    param = _param(problem)
    return problem.text() if param is None else problem.text(lambda _: param)


def parse_request(raw: bytes, service: Service) -> tuple[ImageGenerationRequest, list[Any]]:
    """The body -> (the OpenAI request, the validated v1 instance); _Problem naming the parameter."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Problem(400, "body: not valid JSON") from None
    if not isinstance(payload, dict):
        raise _Problem(400, "body: must be a JSON object")
    unencodable = find_unencodable(payload)  # in any field: a `user` or `model` too, not only the prompt
    if unencodable is not None:
        param = format_loc(unencodable.loc) if unencodable.loc else None
        raise _Problem(400, unencodable.text(), param)
    try:
        req = ImageGenerationRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = f"{param}: {err['msg']}" if param else err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"{param}: unknown parameter"
        elif param == "response_format":
            message = 'response_format: only "b64_json" is served (this server keeps no image URLs)'
        elif param == "size":
            message = f"size: must be one of {', '.join(SIZES)}"
        raise _Problem(400, message, param) from None
    if req.model != service.name:
        raise _Problem(404, f"model: {req.model!r} is not served here (this server serves {service.name!r})",
                       "model", "model_not_found")
    images_to_gen = req.images_to_gen if req.images_to_gen is not None else req.n
    if images_to_gen < req.n:
        raise _Problem(400, f"images_to_gen: must be >= n ({req.n})", "images_to_gen")
    params: dict[str, Any] = {
        "images_to_gen": images_to_gen,
        "images_to_cherry_pick": req.n,
        "super_res": SIZES[req.size],
        "format": req.output_format,
    }
    for name in ("seed", "top_k", "top_p", "temperature", "image_prompt"):
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if req.stream and req.partial_images:
        params["preview_every"] = GRID_ROWS // (req.partial_images + 1)
    try:
        instances = service.parse({"instances": [{"query": req.prompt, "params": params}]})
    except RequestInvalid as exc:
        first = _param(exc.problems[0]) if exc.problems else None
        raise _Problem(400, exc.named(_text), first) from None
    return req, instances


async def _stream(service: Service, req: ImageGenerationRequest, work: Work,
                  events: asyncio.Queue[Event]) -> AsyncIterator[ServerSentEvent]:
    """OpenAI's streaming events: `image_generation.partial_image` up to `partial_images` times, then
    one `image_generation.completed` per image. The generation is cancelled if the client leaves."""
    results = asyncio.ensure_future(service.result(work))
    common = {"background": "opaque", "quality": "auto", "size": req.size, "output_format": req.output_format}
    sent = 0
    try:
        while not results.done() or not events.empty():
            if events.empty():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({waiter, results}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    continue
                event = waiter.result()
            else:
                event = events.get_nowait()
            if not isinstance(event, Progressed):
                continue
            progress = event.instances[0]
            if progress is None or progress.preview is None or progress.step >= progress.steps:
                continue
            if sent >= req.partial_images:
                continue
            for b64 in progress.preview[: req.n]:
                yield _sse("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": b64, "created_at": int(time.time()),
                    "partial_image_index": sent, **common, "output_format": "jpeg"})
            sent += 1
        try:
            result = results.result()
        except ServiceError as exc:
            yield _sse("error", error_body(exc.status, exc.message))
            return
        for b64 in result.instances[0].images:
            yield _sse("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": b64, "created_at": int(time.time()),
                **common})
    finally:
        if not results.done():
            results.cancel()  # the client went away: its work leaves its batch at the next tick


def _sse(event: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, separators=(",", ":")), event=event)


def routes(ctx: ProtocolContext) -> list[Route]:
    """The OpenAI-compatible routes under /openai/v1."""
    service = ctx.service
    started = int(time.time())

    async def generations(request: Request) -> Response:
        try:
            tenant = ctx.tenant(request)
            req, instances = parse_request(await request.body(), service)
            typed = service.request(instances, PROTOCOL, tenant)
            if req.stream:
                # Queued here, so that a full queue is still a 503 rather than an event.
                events: asyncio.Queue[Event] = asyncio.Queue()
                work = await service.submit(typed, listener=events.put_nowait)
                return event_stream(_stream(service, req, work, events), ctx.settings.keepalive)
            result = await service.generate(typed)
        except _Problem as problem:
            return _error_response(problem)
        except ServiceError as exc:
            retry = exc.retry_after()
            headers = {"Retry-After": str(retry)} if retry is not None else {}
            if exc.status == 401:
                headers["WWW-Authenticate"] = refusal(request.headers.get("authorization"))[1]
            return _error_response(_Problem(exc.status, exc.message), headers or None)
        body = ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=b64) for b64 in result.instances[0].images],
            size=req.size,
            output_format=req.output_format,
        )
        return JSONResponse(body.model_dump())

    async def models() -> dict[str, Any]:
        served = ModelObject(id=ctx.name, created=started, owned_by="ai-forever")
        return ModelList(data=[served]).model_dump()

    return [
        Route("POST", GENERATIONS_PATH, handler=generations, protocol=PROTOCOL, auth=True,
              error_shape=error_body,
              doc=Operation(
                  "Generate images (OpenAI images API)",
                  "OpenAI",
                  ImagesResponse,
                  (400, 404, 408, 413, 500, 503, 504),
                  request=ImageGenerationRequest,
                  error_body=OpenAIErrorBody,
                  description=(
                      "For the official `openai` client with `base_url=http://HOST/openai/v1`. `stream:"
                      " true` answers server-sent events: `image_generation.partial_image` (up to "
                      "`partial_images`, JPEG previews with rows not yet sampled grey), then one "
                      "`image_generation.completed` per image, or an `error` event if the generation fails. "
                      "Errors: `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."
                  ),
                  stream_events=STREAM_EVENTS,
              )),
        Route("GET", MODELS_PATH, handler=models, error_shape=error_body,
              doc=Operation("List models (OpenAI)", "OpenAI", ModelList)),
    ]
