"""Request validation of the v1 predict API (SPEC.md section 3); the responses are in `responses.py`.

The request models are plain module-level pydantic models. Two bounds depend on the server, not the
code: the images per request (a flag) and the image vocabulary size (the loaded model). `Schema(limits)`
passes them to the models as pydantic's validation context (`model_validate(payload, context=limits)`)
and fills them into the JSON schema (`json_schema_limits`), so the model card and the OpenAPI document
show the bounds the server enforces. The "allowed: ..." text of an error message is derived from that
same JSON schema, so no bound is written twice.

Types are strict: `"8"`, `true` or `1.5` for an int are rejected, floats accept ints, NaN and infinity
are rejected. Nothing is clamped. `images_to_cherry_pick` defaults to `min(4, images_to_gen)`, so a
request that asks only for `images_to_gen: 2` is valid and keeps both images.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticKnownError

from app.engine.params import (
    DEFAULT_CHERRY_PICK,
    DEFAULT_IMAGES_TO_GEN,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    FORMATS,
    MAX_BORDER,
    MAX_IMAGE_PROMPT_PIXELS,
    MAX_PREVIEW_EVERY,
    MAX_TEMPERATURE,
    SEED_MAX,
    ImagePrompt,
)
from app.engine.params import GenerationParams as EngineParams
from app.serving.core.errors import FieldProblem, Loc, RequestInvalid
from app.serving.core.settings import ServerSettings

MAX_QUERY_CHARS = 1000
MAX_INSTANCES = 16

# The catalog's example request, used verbatim by the card and the OpenAPI docs.
CATALOG_EXAMPLE: dict[str, Any] = {
    "instances": [
        {
            "query": "Кот в шляпе",
            "params": {"images_to_gen": 4, "images_to_cherry_pick": 2, "super_res": False},
        }
    ]
}

if TYPE_CHECKING:
    ImageFormat = str
else:
    ImageFormat = Literal[tuple(FORMATS)]


@dataclass(frozen=True)
class Limits:
    """What bounds the parameters: the server's flag and the loaded model (the validation context)."""

    max_images_per_request: int = ServerSettings.max_images_per_request
    image_vocab_size: int = 8192
    image_tokens_per_dim: int = 32

    def __post_init__(self) -> None:
        if self.max_images_per_request < 1 or self.image_vocab_size < 1 or self.image_tokens_per_dim < 2:
            raise ValueError(f"limits must be positive, got {self}")

    @property
    def default_images_to_gen(self) -> int:
        return min(DEFAULT_IMAGES_TO_GEN, self.max_images_per_request)

    @property
    def default_top_k(self) -> int:
        return min(DEFAULT_TOP_K, self.image_vocab_size)


# The limits that JSON schemas are generated with (`json_schema_limits` sets them); None: the defaults.
_SCHEMA_LIMITS: ContextVar[Limits | None] = ContextVar("schema_limits", default=None)


def _schema_limits() -> Limits:
    return _SCHEMA_LIMITS.get() or Limits()


def _limits(info: ValidationInfo) -> Limits:
    return info.context if isinstance(info.context, Limits) else Limits()


def _bounded_by(
    limit: str, default: str | None = None, text: str | None = None
) -> Callable[[dict[str, Any]], None]:
    """JSON schema of a field bounded by a server limit: `maximum` from the limits in force, `default`
    from them too (or none: computed per request), and the description `text` with `{max}` filled in."""

    def fill(schema: dict[str, Any]) -> None:
        limits = _schema_limits()
        schema["maximum"] = getattr(limits, limit)
        if default is None:
            schema.pop("default", None)
        else:
            schema["default"] = getattr(limits, default)
        if text is not None:
            schema["description"] = text.format(max=schema["maximum"])

    return fill


def _at_most(value: int, limit: int) -> int:
    if value > limit:
        raise PydanticKnownError("less_than_equal", {"le": limit})
    return value


def _undocumented_default(schema: dict[str, Any]) -> None:
    # Defaults that are computed per request are documented, not given as a fixed (null) value.
    schema.pop("default", None)


def _random_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def encodable_text(value: str) -> str:
    """A string that UTF-8 can encode; a lone surrogate ("\\ud800", which JSON can carry) is refused at
    parse time, naming the field, instead of failing the tokenizer inside a batch."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "not_utf8", "must be text that UTF-8 can encode; a lone surrogate at character {at}",
            {"at": exc.start},
        ) from None
    return value


class Borders(BaseModel):
    """Bands of the image prompt to keep, in image tokens of 8 pixels."""

    model_config = ConfigDict(strict=True, extra="forbid")

    up: int = Field(default=0, ge=0, le=MAX_BORDER, description="Token rows kept at the top.")
    down: int = Field(default=0, ge=0, le=MAX_BORDER, description="Token rows kept at the bottom.")
    left: int = Field(default=0, ge=0, le=MAX_BORDER, description="Token columns kept on the left.")
    right: int = Field(default=0, ge=0, le=MAX_BORDER, description="Token columns kept on the right.")


class ImagePromptIn(BaseModel):
    """Keep bands of a given image and generate the rest (ruDALL-E's image completion)."""

    model_config = ConfigDict(strict=True, extra="forbid", title="ImagePrompt")

    image: str = Field(
        description=(
            "A base64 PNG, JPEG or WebP (a data: URL prefix is accepted), at most "
            f"{MAX_IMAGE_PROMPT_PIXELS} pixels; converted to RGB and resized to 256x256 (bicubic)."
        ),
    )
    borders: Borders = Field(
        description="At least one side above 0, together leaving at least one position to generate."
    )
    crop_first: bool = Field(
        default=False, description="Encode each band from its own crop of the image, as upstream does."
    )

    @field_validator("image")
    @classmethod
    def _image_text(cls, value: str) -> str:
        return encodable_text(value)

    @model_validator(mode="after")
    def _usable(self, info: ValidationInfo) -> ImagePromptIn:
        # Imported here: it brings torch, which the server loads only after its flags are checked.
        from app.engine.image_prompt import ImagePromptError, check_borders, decode_image

        try:
            check_borders(self.borders.model_dump(), _limits(info).image_tokens_per_dim)
            decode_image(self.image, MAX_IMAGE_PROMPT_PIXELS)
        except ImagePromptError as exc:
            # `field` is relative to params ("image_prompt.borders.left"); the location has image_prompt.
            field = exc.field.removeprefix("image_prompt.")
            ctx = {"field": field, "reason": exc.reason}
            raise PydanticCustomError("image_prompt", "{reason}", ctx) from None
        return self


class GenerationParams(BaseModel):
    # No docstring: it would become the JSON schema's description, which the model card shows.
    # The bounds set by the server come from the validation context (`Limits`).

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, title="GenerationParams")

    # Not given: the context's default, at most the server limit (`_server_defaults` fills it in).
    images_to_gen: int = Field(
        default=DEFAULT_IMAGES_TO_GEN,
        ge=1,
        json_schema_extra=_bounded_by(
            "max_images_per_request",
            "default_images_to_gen",
            "How many images to sample (1..{max}, the server limit).",
        ),
    )
    # None (never valid input) marks "not given": the default depends on images_to_gen.
    images_to_cherry_pick: int = Field(  # type: ignore[assignment]
        default=None,
        ge=1,
        description=(
            f"How many of the best images (by ruCLIP score) to return, 1..images_to_gen. "
            f"Default: min({DEFAULT_CHERRY_PICK}, images_to_gen)."
        ),
        json_schema_extra=_bounded_by("max_images_per_request"),
    )
    # Not given: the context's default, at most the image vocabulary (`_server_defaults` fills it in).
    top_k: int = Field(
        default=DEFAULT_TOP_K,
        ge=1,
        json_schema_extra=_bounded_by(
            "image_vocab_size",
            "default_top_k",
            "Top-k filtering of image tokens (1..{max}, the image vocabulary size).",
        ),
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
        json_schema_extra=_undocumented_default,
    )
    format: ImageFormat = Field(default=next(iter(FORMATS)), description="Image file format.")
    preview_every: int = Field(
        default=0,
        ge=0,
        le=MAX_PREVIEW_EVERY,
        description=(
            f"A partial preview after every that many completed image rows "
            f"(0: none, 1..{MAX_PREVIEW_EVERY}); "
            "sent as `preview` events by jobs and streams, ignored by predict."
        ),
    )
    image_prompt: ImagePromptIn | None = Field(
        default=None, description="Complete a given image: keep its borders, generate the rest (section 9)."
    )

    @model_validator(mode="before")
    @classmethod
    def _server_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        limits = _limits(info)
        defaults = {"images_to_gen": limits.default_images_to_gen, "top_k": limits.default_top_k}
        return {**{k: v for k, v in defaults.items() if k not in data}, **data}

    @field_validator("images_to_gen", "images_to_cherry_pick")
    @classmethod
    def _server_limit(cls, value: int, info: ValidationInfo) -> int:
        return _at_most(value, _limits(info).max_images_per_request)

    @field_validator("top_k")
    @classmethod
    def _vocabulary(cls, value: int, info: ValidationInfo) -> int:
        return _at_most(value, _limits(info).image_vocab_size)

    @model_validator(mode="after")
    def _fill_and_cross_check(self) -> GenerationParams:
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
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    query: str = Field(
        description=f"What to draw: non-empty after stripping, at most {MAX_QUERY_CHARS} characters.",
        examples=["Кот в шляпе"],
    )
    # Always validated from input (`_params_in_context`), so the context's defaults and bounds apply.
    params: GenerationParams = Field(default_factory=GenerationParams)

    @model_validator(mode="before")
    @classmethod
    def _params_in_context(cls, data: Any) -> Any:
        return {**data, "params": {}} if isinstance(data, dict) and "params" not in data else data

    @field_validator("query")
    @classmethod
    def _query_text(cls, value: str) -> str:
        text = encodable_text(value).strip()
        if not text:
            raise PydanticCustomError("empty_query", "must not be empty or only whitespace")
        if len(text) > MAX_QUERY_CHARS:
            raise PydanticCustomError(
                "query_too_long",
                "must be at most {max} characters, got {got}",
                {"max": MAX_QUERY_CHARS, "got": len(text)},
            )
        return text


def generation_params(instance: Instance) -> EngineParams:
    """A validated instance's params as the engine's plain `GenerationParams`."""
    params = instance.params.model_dump()
    if params.get("image_prompt") is not None:
        params["image_prompt"] = ImagePrompt(**params["image_prompt"])
    return EngineParams(**params)


def _instances_schema(schema: dict[str, Any]) -> None:
    schema["description"] = (
        f"1..{schema['maxItems']} instances asking for at most "
        f"{_schema_limits().max_images_per_request} images in all."
    )


class PredictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [CATALOG_EXAMPLE]})

    instances: list[Instance] = Field(
        min_length=1, max_length=MAX_INSTANCES, json_schema_extra=_instances_schema
    )

    @model_validator(mode="after")
    def _images_in_all(self, info: ValidationInfo) -> PredictRequest:
        # The server limit bounds a request, not an instance: sixteen instances of sixteen images
        # would hold the one GPU worker for sixteen batches.
        total = sum(inst.params.images_to_gen for inst in self.instances)
        limit = _limits(info).max_images_per_request
        if total > limit:
            raise PydanticCustomError(
                "too_many_images",
                "asks for {total} images in all (sum of images_to_gen); must be <= {max} (server limit)",
                {"field": "instances", "total": total, "max": limit},
            )
        return self


# ---- one server's view: the limits as context, the JSON schema, the error messages -----------------

# Why a field's upper bound is what it is, for "must be <= N (...)".
_BOUND_REASONS = {"images_to_gen": "server limit", "top_k": "image vocabulary size"}


def _rules_beyond_json_schema(limits: Limits) -> dict[str, dict[str, Any]]:
    """What the JSON schema of a field cannot say (the validators above check it): a bound that is
    another field, the noun of a list's items, and a rule appended to the text derived from the schema."""
    return {
        "images_to_cherry_pick": {"maximum": "images_to_gen"},
        "query": {"rule": f"non-empty after stripping, at most {MAX_QUERY_CHARS} characters"},
        "instances": {
            "items": "objects with `query` and optional `params`",
            "rule": f"asking for at most {limits.max_images_per_request} images in all",
        },
    }


@dataclass(frozen=True)
class ModelView:
    """A request model as one server sees it: validated with its limits, documented with its bounds."""

    model: type[BaseModel]
    limits: Limits

    def model_validate(self, obj: Any) -> Any:
        return self.model.model_validate(obj, context=self.limits)

    def model_json_schema(self, **kwargs: Any) -> dict[str, Any]:
        with json_schema_limits(self.limits):
            return self.model.model_json_schema(**kwargs)


@contextmanager
def json_schema_limits(limits: Limits) -> Iterator[None]:
    """Generate the request models' JSON schemas (`model_json_schema`, `models_json_schema`) with
    these limits as the bounds and defaults that depend on the server."""
    token = _SCHEMA_LIMITS.set(limits)
    try:
        yield
    finally:
        _SCHEMA_LIMITS.reset(token)


@dataclass(frozen=True)
class Schema:
    """The request models with one server's limits, and the allowed range of each field for messages."""

    limits: Limits = Limits()

    @property
    def params(self) -> ModelView:
        return ModelView(GenerationParams, self.limits)

    @property
    def instance(self) -> ModelView:
        return ModelView(Instance, self.limits)

    @property
    def request(self) -> ModelView:
        return ModelView(PredictRequest, self.limits)

    @cached_property
    def allowed(self) -> dict[str, str]:
        """field name -> what it accepts, from the JSON schema of the request (its bounds)."""
        schema = self.request.model_json_schema()
        rules = _rules_beyond_json_schema(self.limits)
        out: dict[str, str] = {}
        for model in (schema, *schema.get("$defs", {}).values()):
            for name, prop in model.get("properties", {}).items():
                out[name] = _allowed(name, {**prop, **rules.get(name, {})})
        return out

    def parse(self, payload: Any) -> list[Instance]:
        """Validate a decoded (or raw JSON) request body; returns the instances, defaults filled.

        Raises RequestInvalid whose problems name every bad field and its allowed range.
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
            raise self.invalid(exc.errors(include_url=False)) from None
        return list(request.instances)

    def invalid(self, errors: list[ErrorDetails], limit: int = 5) -> RequestInvalid:
        """pydantic's errors as a RequestInvalid: the first `limit` problems, and how many more."""
        return RequestInvalid.of([self._describe(e) for e in errors[:limit]], max(0, len(errors) - limit))

    def _describe(self, err: ErrorDetails) -> FieldProblem:
        ctx = err.get("ctx") or {}
        loc: Loc = tuple(err["loc"])
        if "field" in ctx:
            loc = (*loc, ctx["field"])
        field = str(loc[-1]) if loc and isinstance(loc[-1], str) else ""
        problem = _problem(err, ctx)
        kind = err["type"]
        if kind in ("less_than_equal", "less_than") and field in _BOUND_REASONS:
            problem += f" ({_BOUND_REASONS[field]})"
        allowed = None
        if kind != "extra_forbidden" and field in self.allowed and kind != "image_prompt":
            allowed = self.allowed[field]  # image-prompt reasons say what is allowed
        return FieldProblem(loc, problem, allowed)


def build_schema(limits: Limits) -> Schema:
    """`Schema(limits)`, under its old name (tests/test_readme.py calls it)."""
    return Schema(limits)


def _allowed(name: str, prop: dict[str, Any]) -> str:
    """What a field accepts, in words, from its JSON schema (`prop`)."""
    kind = prop.get("type")
    rule = f", {prop['rule']}" if "rule" in prop else ""
    if "enum" in prop:
        return ", ".join(str(v) for v in prop["enum"])
    if kind == "boolean":
        return "true or false"
    if kind == "integer":
        return f"integer {prop['minimum']}..{prop['maximum']}{rule}"
    if kind == "number":
        var = name.rsplit("_", 1)[-1][0]  # top_p: p, temperature: t
        low = f"{prop['exclusiveMinimum']:g} < " if "exclusiveMinimum" in prop else f"{prop['minimum']:g} <= "
        high = f" <= {prop['maximum']:g}" if "maximum" in prop else f" < {prop['exclusiveMaximum']:g}"
        return f"number {low}{var}{high}{rule}"
    if kind == "string":
        return f"string{rule}"
    if kind == "array":
        return f"a list of {prop['minItems']}..{prop['maxItems']} {prop['items']}{rule}"
    return "an object"


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
