"""Request validation and response shapes of the v1 predict API (SPEC.md section 3).

The bounds depend on the server (image limit per request) and on the model (image vocabulary size), so
the pydantic models are built per server by `build_schema(limits)`. The same models validate requests and
produce the parameter table of the model card (`model_json_schema()`), so the two cannot drift apart.

Types are strict: `"8"`, `true` or `1.5` for an int are rejected, floats accept ints, NaN and infinity
are rejected. Nothing is clamped. `images_to_cherry_pick` defaults to `min(4, images_to_gen)`, so a
request that asks only for `images_to_gen: 2` is valid and keeps both images.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from app.engine.params import (
    DEFAULT_CHERRY_PICK,
    DEFAULT_IMAGES_TO_GEN,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    FORMATS,
    MAX_TEMPERATURE,
    SEED_MAX,
    STAGES,
)
from app.serving.errors import RequestInvalid

MAX_QUERY_CHARS = 1000
MAX_INSTANCES = 16
TIMING_KEYS = ("queue", *STAGES)

# The catalog's example request, used verbatim by the card and the OpenAPI docs.
CATALOG_EXAMPLE: dict[str, Any] = {
    "instances": [
        {
            "query": "Кот в шляпе",
            "params": {"images_to_gen": 4, "images_to_cherry_pick": 2, "super_res": False},
        }
    ]
}


@dataclass(frozen=True)
class Limits:
    """What bounds the parameters: the server's flag and the loaded model."""

    max_images_per_request: int = 16
    image_vocab_size: int = 8192

    @property
    def default_images_to_gen(self) -> int:
        return min(DEFAULT_IMAGES_TO_GEN, self.max_images_per_request)

    @property
    def default_top_k(self) -> int:
        return min(DEFAULT_TOP_K, self.image_vocab_size)


_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _random_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


@dataclass(frozen=True)
class Schema:
    """The pydantic models of one server configuration, and the allowed range of each field for messages."""

    limits: Limits
    params: type[BaseModel]
    instance: type[BaseModel]
    request: type[BaseModel]
    allowed: dict[str, str]
    bound_reason: dict[str, str]

    def parse(self, payload: Any) -> list[Any]:
        """Validate a decoded (or raw JSON) request body; returns the instances, defaults filled.

        Raises RequestInvalid whose message names every bad field and its allowed range.
        """
        if isinstance(payload, bytes | bytearray | str):
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                raise RequestInvalid(f"body: not valid JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise RequestInvalid('body: must be a JSON object such as {"instances": [{"query": "..."}]}')
        try:
            request = self.request.model_validate(payload)
        except ValidationError as exc:
            raise RequestInvalid(self.describe_errors(exc.errors(include_url=False))) from None
        return list(request.instances)  # type: ignore[attr-defined]

    def describe_errors(self, errors: list[ErrorDetails], limit: int = 5) -> str:
        parts = [self._describe(e) for e in errors[:limit]]
        if len(errors) > limit:
            parts.append(f"... and {len(errors) - limit} more")
        return "; ".join(parts)

    def _describe(self, err: ErrorDetails) -> str:
        ctx = err.get("ctx") or {}
        loc = list(err["loc"])
        if "field" in ctx:
            loc.append(ctx["field"])
        field = str(loc[-1]) if loc and isinstance(loc[-1], str) else ""
        where = _format_loc(loc)
        problem = _problem(err, ctx)
        kind = err["type"]
        if kind in ("less_than_equal", "less_than") and field in self.bound_reason:
            problem += f" ({self.bound_reason[field]})"
        if kind == "extra_forbidden":
            return f"{where}: {problem}"
        if field in self.allowed:
            return f"{where}: {problem}; allowed: {self.allowed[field]}"
        return f"{where}: {problem}"


def _format_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# JSON's names for Python's types; bool before int, since a bool is an int in Python.
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (type(None), "null"), (bool, "boolean"), (str, "string"), (int, "integer"), (float, "number"),
    (list, "array"), (dict, "object"),
)


def _type_name(value: Any) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)


_TYPE_PROBLEMS = {
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "dict_type": "must be an object",
    "model_attributes_type": "must be an object",
}


def _problem(err: ErrorDetails, ctx: dict[str, Any]) -> str:
    kind = err["type"]
    if kind in _TYPE_PROBLEMS:
        return f"{_TYPE_PROBLEMS[kind]}, got {_type_name(err.get('input'))}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in ("finite_number", "float_parsing"):
        return "must be a finite number (NaN and infinity are not allowed)"
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        bound = next(iter(ctx.values())) if ctx else "?"
        return f"must be {bounds[kind]} {bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    return err["msg"]


def build_schema(limits: Limits) -> Schema:
    """Build the request models for one server: bounds from `limits`, defaults from SPEC.md."""
    max_images = limits.max_images_per_request
    vocab = limits.image_vocab_size
    if max_images < 1 or vocab < 1:
        raise ValueError(f"limits must be positive, got {limits}")
    default_top_k = limits.default_top_k

    class GenerationParamsIn(BaseModel):
        model_config = ConfigDict(
            strict=True,
            extra="forbid",
            allow_inf_nan=False,
            title="GenerationParams",
            json_schema_extra=_params_schema_extra,
        )

        images_to_gen: int = Field(
            default=limits.default_images_to_gen,
            ge=1,
            le=max_images,
            description=f"How many images to sample (1..{max_images}, the server limit).",
        )
        # None (never valid input) marks "not given": the default depends on images_to_gen.
        images_to_cherry_pick: int = Field(  # type: ignore[assignment]
            default=None,
            ge=1,
            le=max_images,
            description=(
                f"How many of the best images (by ruCLIP score) to return, 1..images_to_gen. "
                f"Default: min({DEFAULT_CHERRY_PICK}, images_to_gen)."
            ),
        )
        top_k: int = Field(
            default=default_top_k,
            ge=1,
            le=vocab,
            description=f"Top-k filtering of image tokens (1..{vocab}, the image vocabulary size).",
        )
        top_p: float = Field(
            default=DEFAULT_TOP_P, gt=0.0, le=1.0, description="Nucleus (top-p) filtering, 0 < p <= 1."
        )
        super_res: bool = Field(default=True, description="Upscale the kept images x4 with RealESRGAN.")
        temperature: float = Field(
            default=DEFAULT_TEMPERATURE,
            gt=0.0,
            le=MAX_TEMPERATURE,
            description=f"Sampling temperature, 0 < t <= {MAX_TEMPERATURE:g}.",
        )
        seed: int = Field(
            default_factory=_random_seed,
            ge=0,
            le=SEED_MAX,
            description="Random seed, 0..2**63-1; the same seed gives the same images. Default: random.",
        )
        format: Literal["jpeg", "png", "webp"] = Field(default="jpeg", description="Image file format.")

        @model_validator(mode="after")
        def _fill_and_cross_check(self) -> GenerationParamsIn:
            if self.images_to_cherry_pick is None:
                self.images_to_cherry_pick = min(DEFAULT_CHERRY_PICK, self.images_to_gen)
            elif self.images_to_cherry_pick > self.images_to_gen:
                raise PydanticCustomError(
                    "cherry_pick_over_gen",
                    "must be <= images_to_gen ({images_to_gen})",
                    {"field": "images_to_cherry_pick", "images_to_gen": self.images_to_gen},
                )
            return self

    class Instance(BaseModel):
        model_config = _STRICT
        query: str = Field(
            description=f"What to draw: non-empty after stripping, at most {MAX_QUERY_CHARS} characters.",
            examples=["Кот в шляпе"],
        )
        params: GenerationParamsIn = Field(default_factory=GenerationParamsIn)

        @field_validator("query")
        @classmethod
        def _query_text(cls, value: str) -> str:
            text = value.strip()
            if not text:
                raise PydanticCustomError("empty_query", "must not be empty or only whitespace")
            if len(text) > MAX_QUERY_CHARS:
                raise PydanticCustomError(
                    "query_too_long",
                    "must be at most {max} characters, got {got}",
                    {"max": MAX_QUERY_CHARS, "got": len(text)},
                )
            return text

    class PredictRequest(BaseModel):
        model_config = ConfigDict(
            strict=True, extra="forbid", json_schema_extra={"examples": [CATALOG_EXAMPLE]}
        )
        instances: list[Instance] = Field(
            min_length=1,
            max_length=MAX_INSTANCES,
            description=f"1..{MAX_INSTANCES} instances asking for at most {max_images} images in all.",
        )

        @model_validator(mode="after")
        def _images_in_all(self) -> PredictRequest:
            # The server limit bounds a request, not an instance: sixteen instances of sixteen images
            # would hold the one GPU worker for sixteen batches.
            total = sum(inst.params.images_to_gen for inst in self.instances)
            if total > max_images:
                raise PydanticCustomError(
                    "too_many_images",
                    "asks for {total} images in all (sum of images_to_gen); must be <= {max} (server limit)",
                    {"field": "instances", "total": total, "max": max_images},
                )
            return self

    allowed = {
        "images_to_gen": f"integer 1..{max_images}",
        "images_to_cherry_pick": "integer 1..images_to_gen",
        "top_k": f"integer 1..{vocab}",
        "top_p": "number 0 < p <= 1",
        "super_res": "true or false",
        "temperature": f"number 0 < t <= {MAX_TEMPERATURE:g}",
        "seed": f"integer 0..{SEED_MAX}",
        "format": ", ".join(FORMATS),
        "query": f"string, non-empty after stripping, at most {MAX_QUERY_CHARS} characters",
        "instances": (
            f"a list of 1..{MAX_INSTANCES} objects with `query` and optional `params`, "
            f"asking for at most {max_images} images in all"
        ),
        "params": "an object",
    }
    reasons = {"images_to_gen": "server limit", "top_k": "image vocabulary size"}
    return Schema(limits, GenerationParamsIn, Instance, PredictRequest, allowed, reasons)


def _params_schema_extra(schema: dict[str, Any]) -> None:
    # Defaults that are computed per request are documented, not given as a fixed (null) value.
    props = schema.get("properties", {})
    props.get("images_to_cherry_pick", {}).pop("default", None)
    props.get("seed", {}).pop("default", None)


# ---- responses ------------------------------------------------------------------------------------


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
