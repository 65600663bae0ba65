"""KServe's v1 protocol (SPEC section 3): `POST /v1/models/{name}:predict` and the model routes.

KServe's own app serves predict and calls `KandinskyModel.predict` with the decoded body, which calls
`predict()` here: the body becomes validated instances and a typed request on the shared Service, and the
result becomes the v1 answer. The model card route is ours.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import orjson
from kserve.protocol.rest.v2_datamodels import ListModelsResponse, ModelReadyResponse
from pydantic import BaseModel, Field

from app.serving.core.card import CARD_PATH
from app.serving.core.errors import RequestInvalid
from app.serving.core.service import Service
from app.serving.core.types import InstanceResult, RequestResult
from app.serving.protocols.routes import (
    PREDICT_BODY,
    PREDICTION,
    BodyCheck,
    Operation,
    ProtocolContext,
    Route,
)

PREDICT_PATH = "/v1/models/{model_name}:predict"
PROTOCOL = "v1"


class FailureBody(BaseModel):
    """An internal failure (500): the server keeps serving; the message never quotes the prompt."""

    ok: Literal[False] = False
    error: str


class ModelCard(BaseModel):
    """The model card for catalogs (app/serving/core/card.py): metadata, architecture, limits, schemas."""

    name: str
    model: str
    version: str
    license: str
    description: str
    architecture: dict[str, Any]
    hardware: dict[str, Any]
    limits: dict[str, int]
    endpoints: dict[str, str]
    parameters: dict[str, Any] = Field(description="JSON schema of `params`: defaults and bounds.")
    request_schema: dict[str, Any]
    response_schema: dict[str, Any]
    example_request: dict[str, Any]
    example_response: dict[str, Any]


def prediction(result: InstanceResult) -> dict[str, Any]:
    """One instance's answer in v1's shape (SPEC section 3)."""
    return {
        "ok": True,
        "images": result.images,
        "clip_scores": result.clip_scores,
        "seed": result.seed,
        "ppl": result.ppl,
        "timings": result.timings,
    }


def response(result: RequestResult) -> dict[str, Any]:
    """v1's answer: one instance's fields, or `{"ok": true, "predictions": [...]}` for several."""
    predictions = [prediction(r) for r in result.instances]
    return predictions[0] if len(predictions) == 1 else {"ok": True, "predictions": predictions}


async def predict(service: Service, payload: Any, tenant: str | None = None) -> dict[str, Any]:
    """A decoded v1 body -> its answer, through the shared Service, as `tenant`'s request."""
    request = service.request(service.parse(payload), PROTOCOL, tenant)
    return response(await service.generate(request))


def schema_check(service: Service) -> BodyCheck:
    """KServe's strict JSON parser refuses NaN, Infinity, 1e999 and integers beyond 64 bits saying only
    where in the text; the schema names the field and its range instead."""

    def check(body: bytes, headers: dict[str, str]) -> str | None:
        if service.schema is None:
            return None
        try:
            orjson.loads(body)
            return None
        except orjson.JSONDecodeError:
            pass
        try:
            service.schema.parse(json.loads(body))
        except RequestInvalid as exc:
            return exc.message
        except ValueError:
            return None  # not JSON at all: the middleware's JSON check said so already
        return None

    return check


def routes(ctx: ProtocolContext) -> list[Route]:
    async def model_card(model_name: str) -> dict[str, Any]:
        ctx.check_model(model_name)
        return ctx.card()

    return [
        Route(
            "POST", PREDICT_PATH, protocol=PROTOCOL, auth=True, json_body=True,
            body_check=schema_check(ctx.service), model_scoped=False,
            doc=Operation(
                "Generate images",
                "Predict",
                PREDICTION,
                (400, 404, 408, 413, 415, 500, 503, 504),
                request=PREDICT_BODY,
                description=(
                    "Every instance is answered. One instance: the `Prediction` fields; several: "
                    "`{\"ok\": true, \"predictions\": [...]}` in instance order. `images` are base64 files "
                    "ordered by `clip_scores`, highest first."
                ),
                ok_description="The generated images of every instance.",
            ),
        ),
        Route("GET", "/v1/models", Operation("List the served models", "Models", ListModelsResponse)),
        Route("GET", "/v1/models/{model_name}", Operation(
            "Model readiness",
            "Health",
            ModelReadyResponse,
            (404, 503),
            description="200 only once every component is loaded and the server takes requests.",
            error_descriptions={503: "The model is loading or the server is shutting down."},
        )),
        Route("GET", CARD_PATH, handler=model_card, doc=Operation(
            "Model card",
            "Catalog",
            ModelCard,
            (404, 503),
            error_descriptions={503: "The model is not loaded yet."},
        )),
    ]
