"""Response shapes of the v1 predict API (SPEC.md section 3), documented in the model card and OpenAPI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Timings(BaseModel):
    queue: float = Field(description="Seconds waiting in the queue.")
    generate: float = 0.0
    decode: float = 0.0
    rank: float = 0.0
    upscale: float = 0.0
    encode: float = 0.0


class Prediction(BaseModel):
    """The answer to one instance; `images` are ordered by `clip_scores`, highest first."""

    ok: bool = True
    images: list[str] = Field(description="Base64-encoded image files in the requested format.")
    clip_scores: list[float]
    seed: int
    ppl: list[float] = Field(description="Perplexity of each returned image's tokens.")
    timings: Timings


class MultiPrediction(BaseModel):
    ok: bool = True
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    error: str


RESPONSE_EXAMPLE: dict[str, Any] = {
    "ok": True,
    "images": ["<base64 JPEG>", "<base64 JPEG>"],
    "clip_scores": [0.63, 0.46],
    "seed": 123,
    "ppl": [21.4, 25.0],
    "timings": {"queue": 0.1, "generate": 12.3, "decode": 0.2, "rank": 0.3, "upscale": 0.0, "encode": 0.1},
}
