"""`/openapi.json` and `/docs`: the routes this server answers, with their real statuses and bodies.

KServe's app documents its routes as FastAPI infers them: every success schema empty, a 422 nobody sends,
`/metrics` as JSON, and routes this model does not serve. Clients are generated from this document and
the docs page is a newcomer's first look, so both are built here from the route table
(app/serving/protocols/routes.py): each route's summary, success body, and the error statuses it really
answers (SPEC.md section 3). The document is built lazily, at the first request for it, from the routes
present in `app.routes` then: KServe registers its routes after `install_openapi` runs, and a route
registered ahead of one with the same method and path shadows it. A route that answers but is missing
from the table is left out of the document and logged; `undocumented_routes()` lists them, and a unit
test keeps that list empty.

With API keys (`--api_keys`, SPEC section 12) the document declares the bearer scheme
(`components.securitySchemes`), `security` on the routes declared `auth` and their 401; with
`--tenant_queue_size` the generating routes document their 429. Without them it shows neither: the
document describes this server as it answers.

A route that answers server-sent events (`Operation.stream_events`) documents its `text/event-stream`
answer as the array of the events the stream sends, each `{"event": NAME, "data": <its JSON>}`: OpenAPI
3.1 has no keyword for a stream's items (3.2's `itemSchema`), and the array also says which event comes
first and which ends the stream. A client or test reads the stream into that array to validate it.

Swagger UI is served from the `swagger_ui_bundle` package, so `/docs` works with no internet access.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi import routing as fastapi_routing
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from app import __version__
from app.serving.core.card import CARD_PATH
from app.serving.core.errors import RETRY_AFTER_S
from app.serving.core.responses import RESPONSE_EXAMPLE, ErrorBody, MultiPrediction, Prediction
from app.serving.core.schema import CATALOG_EXAMPLE, Limits, json_schema_limits
from app.serving.protocols.routes import HTML, METRICS, PREDICT_BODY, PREDICTION, Operation, RouteTable
from app.serving.protocols.v1 import FailureBody

log = logging.getLogger(__name__)

TITLE = "Kandinsky serving"
DOCS_PATH = "/docs"
DOCS_STATIC_PATH = "/docs/static"
# FastAPI's own docs routes (CDN-backed) that ours replace.
_FASTAPI_DOCS_ROUTES = ("/docs", "/docs/oauth2-redirect", "/redoc")
# A model name: no "/" (it would not route), not "." or ".." (URL normalisation rewrites them).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
MODEL_NAME_MAX = 253
PROMETHEUS_TEXT = "text/plain"
OPENMETRICS_TEXT = "application/openmetrics-text"
EVENT_STREAM = "text/event-stream"



#: The name of the bearer scheme in `components.securitySchemes`.
BEARER_SCHEME = "bearerAuth"

_ERRORS: dict[int, str] = {
    400: "The request is invalid; `error` names the field and its allowed range.",
    401: "No valid API key: `Authorization: Bearer <key>` is missing, malformed or not accepted.",
    429: "This tenant has `--tenant_queue_size` requests waiting already; retry after `Retry-After` seconds.",
    404: "No model of this name is served.",
    408: "The request body did not arrive within the server's body timeout.",
    413: "The request body exceeds the server's size limit.",
    409: "Conflicts with the resource's state (see the route).",
    415: "The Content-Type is not JSON (`application/json` or a `+json` type).",
    500: "Internal failure (a GPU out-of-memory included); the server keeps serving, retry the request.",
    503: "Not ready, the queue is full, or the server is shutting down; retry after `Retry-After` seconds.",
    504: "The request did not finish within the server's deadline.",
}


# ---- routes ---------------------------------------------------------------------------------------


def _hidden_paths(app: FastAPI) -> set[str]:
    return {p for p in (app.openapi_url, DOCS_PATH) if p}


def served_operations(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route in `app.routes` that answers and belongs in the document, in order.

    Starlette answers with the first route that matches, so a route registered ahead of another with
    the same method and path shadows it: only the first counts, and it is left out when registered
    with `include_in_schema=False` (as the 404s for KServe routes we do not serve are). HEAD (added by
    Starlette to GET routes) and our own documentation routes are left out too. Another mounted app
    shows as ("*", "<prefix>/...").
    """
    hidden = _hidden_paths(app)
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    for route, path, methods, in_schema in _flat_routes(app.routes):
        if isinstance(route, Mount):
            if route.path != DOCS_STATIC_PATH:
                out.append(("*", route.path + "/..."))
            continue
        if path is None:
            continue
        for method in sorted(methods - {"HEAD"}):
            key = (method, path)
            if key in seen:
                continue  # shadowed by an earlier route
            seen.add(key)
            if in_schema and path not in hidden:
                out.append(key)
    return out


def undocumented_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Routes the server answers that the route table does not document (a unit test keeps this empty)."""
    table: RouteTable = app.state.kandinsky_routes
    documented = table.operations()
    return [op for op in served_operations(app) if op not in documented]


def _flat_routes(routes: Iterable[BaseRoute]) -> Iterator[tuple[BaseRoute, str | None, set[str], bool]]:
    """(route, path, methods, include_in_schema) of every route, inside included routers too.

    FastAPI 0.16x keeps `include_router()` routers as one entry of `app.routes`; its own OpenAPI
    generator walks them with `iter_route_contexts`, which older versions lack (they copy the routes).
    """
    walk = getattr(fastapi_routing, "iter_route_contexts", None)
    contexts: Iterable[Any] = walk(list(routes)) if walk is not None else routes
    for ctx in contexts:
        route = getattr(ctx, "original_route", ctx)
        path = getattr(ctx, "path_format", None) or getattr(ctx, "path", None)
        in_schema = bool(getattr(ctx, "include_in_schema", True))
        yield route, path, set(getattr(ctx, "methods", None) or ()), in_schema


# ---- the document ---------------------------------------------------------------------------------


class _ResponsesRequireDefaults(GenerateJsonSchema):
    """Response fields with a default (`ok`, the timings) are always sent: mark them required."""

    def field_is_required(self, field: Any, total: bool) -> bool:
        if self.mode == "serialization" and field.get("type") != "typed-dict-field":
            return field.get("serialization_exclude_if") is None
        return super().field_is_required(field, total)


_REF_PREFIX = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF_PREFIX + name}


def build_openapi(app: FastAPI, table: RouteTable, model: Any, *, api_keys: bool = False,
                  tenant_queue: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes in `app.routes` now, as the route table documents them.
    `api_keys`: the server asks for keys (the `auth` routes are secured, 401); `tenant_queue`: a tenant's
    queue is bounded (the generating routes answer 429)."""
    OPERATIONS = table.operations()  # noqa: N806 - the table, read once
    secured = {(r.method, r.path) for r in table if r.auth and api_keys}
    limited = {(r.method, r.path) for r in table if r.protocol is not None and tenant_queue}
    served = set(served_operations(app))
    ops = [op for op in OPERATIONS if op in served]  # the table's order: predict first
    missing = undocumented_routes(app)
    if missing:
        log.warning("routes served but not documented in app/serving/openapi.py: %s", missing)

    schema = getattr(model, "schema", None)
    request_model = schema.request.model if schema is not None else None
    models: list[type[BaseModel]] = [ErrorBody]
    request_models: list[type[BaseModel]] = []
    for key in ops:
        op = OPERATIONS[key]
        bodies = (op.ok, *(body for _, body in op.other_ok.values()), *op.stream_events.values())
        for ok in bodies:
            if ok == PREDICTION:
                models += [Prediction, MultiPrediction]
            elif isinstance(ok, type) and issubclass(ok, BaseModel):
                models.append(ok)
        if 500 in op.errors:
            models.append(FailureBody)
        if op.error_body is not None:
            models.append(op.error_body)
        if isinstance(op.request, type) and issubclass(op.request, BaseModel):
            request_models.append(op.request)
    inputs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (m, "serialization") for m in dict.fromkeys(models)
    ]
    if request_model is not None:
        inputs.append((request_model, "validation"))
    inputs += [(m, "validation") for m in dict.fromkeys(request_models)]
    with json_schema_limits(schema.limits if schema is not None else Limits()):
        refs, defs = models_json_schema(
            inputs, ref_template=_REF_PREFIX + "{model}", schema_generator=_ResponsesRequireDefaults
        )
    names = {m: ref["$ref"].rsplit("/", 1)[-1] for (m, _), ref in refs.items() if "$ref" in ref}
    components = defs.get("$defs", {})
    renamed = _names_from_titles(components)
    components = _rename_refs({renamed.get(k, k): v for k, v in components.items()}, renamed)
    names = {m: renamed.get(n, n) for m, n in names.items()}

    paths: dict[str, dict[str, Any]] = {}
    for method, path in ops:
        op = OPERATIONS[(method, path)]
        extra = {401} if (method, path) in secured else set()
        extra |= {429} if (method, path) in limited else set()
        operation = _operation(op, method, path, names, model, extra)
        if (method, path) in secured:
            operation["security"] = [{BEARER_SCHEME: []}]
        if op.request == PREDICT_BODY and request_model is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref(names[request_model]), "example": CATALOG_EXAMPLE}
                },
            }
        elif isinstance(op.request, type):
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(names[op.request])}},
            }
        paths.setdefault(path, {})[method.lower()] = operation

    name = getattr(model, "name", "")
    limits = f" Limits: {schema.limits.max_images_per_request} images per request." if schema else ""
    keys = (" Generating and job routes need an API key: `Authorization: Bearer <key>`; each tenant sees "
            "only its own jobs." if secured else "")
    security = {"securitySchemes": {BEARER_SCHEME: {
        "type": "http", "scheme": "bearer",
        "description": "A key of the server's `--api_keys` file, sent as `Authorization: Bearer <key>` "
                       "(gRPC: the `authorization` metadata).",
    }}} if secured else {}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": __version__,
            "description": (
                f"ruDALL-E Kandinsky behind the KServe v1 predict protocol; this server serves the model "
                f"`{name}`.{limits} The model card at `{CARD_PATH}` lists every parameter with its "
                f"default and bounds.{keys}"
            ),
        },
        **({"servers": list(app.servers)} if app.servers else {}),  # FastAPI adds the root_path here
        "paths": paths,
        "components": {"schemas": components, **security},
    }


def _names_from_titles(components: dict[str, Any]) -> dict[str, str]:
    """Component names from the models' titles where they differ (`GenerationParamsIn` is titled
    `GenerationParams`): the name a generated client gives the class."""
    renamed: dict[str, str] = {}
    taken = set(components)
    for key, schema in components.items():
        title = schema.get("title") if isinstance(schema, dict) else None
        if isinstance(title, str) and title != key and re.fullmatch(r"[A-Za-z_][\w.-]*", title):
            if title not in taken:
                renamed[key] = title
                taken.add(title)
    return renamed


def _rename_refs(value: Any, renamed: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rename_refs(v, renamed) for k, v in value.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(_REF_PREFIX) and ref[len(_REF_PREFIX):] in renamed:
            out["$ref"] = _REF_PREFIX + renamed[ref[len(_REF_PREFIX):]]
        return out
    if isinstance(value, list):
        return [_rename_refs(v, renamed) for v in value]
    return value


def _operation(
    op: Operation, method: str, path: str, names: dict[Any, str], model: Any, extra: set[int]
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(op.ok_status): _ok_response(op, names)}
    if op.ok_headers:
        responses[str(op.ok_status)]["headers"] = {
            name: {"description": text, "schema": {"type": "string"}} for name, text in op.ok_headers.items()
        }
    for status, (text, body) in op.other_ok.items():
        responses[str(status)] = {"description": text}
        if body is not None:
            responses[str(status)]["content"] = {"application/json": {"schema": _ref(names[body])}}
    if op.stream_events:
        stream = responses[str(op.stream_status or op.ok_status)]
        stream["description"] = f"{stream['description'].rstrip('.')}. {_stream_text(op)}"
        stream.setdefault("content", {})[EVENT_STREAM] = {"schema": _stream_schema(op, names)}
    for status in sorted({*op.errors, *extra}):
        body = op.error_body or (FailureBody if status == 500 else ErrorBody)
        response: dict[str, Any] = {
            "description": op.error_descriptions.get(status, _ERRORS[status]),
            "content": {"application/json": {"schema": _ref(names[body])}},
        }
        if status in (429, 503):
            response["headers"] = {
                "Retry-After": {
                    "description": f"Seconds to wait before retrying ({RETRY_AFTER_S}).",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {
                    "description": '`Bearer` (RFC 6750), with `error="invalid_token"` when the key sent is '
                                   "not accepted.",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^Bearer"},
                }
            }
        responses[str(status)] = response
    operation: dict[str, Any] = {
        "tags": [op.tag],
        "summary": op.summary,
        "operationId": _operation_id(method, path),
        "responses": responses,
    }
    if op.description:
        operation["description"] = op.description
    params = _path_params(path, getattr(model, "name", ""))
    params += [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
        for name, (schema, text) in op.query.items()
    ]
    if params:
        operation["parameters"] = params
    return operation


def _ok_response(op: Operation, names: dict[Any, str]) -> dict[str, Any]:
    if op.ok == METRICS:
        text = {"schema": {"type": "string"}}
        return {"description": op.ok_description, "content": {PROMETHEUS_TEXT: text, OPENMETRICS_TEXT: text}}
    if op.ok == HTML:
        return {"description": op.ok_description, "content": {"text/html": {"schema": {"type": "string"}}}}
    extra = {media: {"schema": {"type": "string"}} for media in op.ok_media}
    if op.ok == PREDICTION:
        schema: dict[str, Any] = {"oneOf": [_ref(names[Prediction]), _ref(names[MultiPrediction])]}
        content = {"schema": schema, "example": RESPONSE_EXAMPLE}
        return {"description": op.ok_description, "content": {"application/json": content, **extra}}
    if op.ok is None:
        plain: dict[str, Any] = {"description": op.ok_description}
        return {**plain, "content": extra} if extra else plain
    body = {"application/json": {"schema": _ref(names[op.ok])}}
    return {"description": op.ok_description, "content": {**body, **extra}}


def _body_schema(body: Any, names: dict[Any, str]) -> dict[str, Any]:
    """The schema of a body: `PREDICTION`, a pydantic model (a component), or a JSON schema as given."""
    if body == PREDICTION:
        return {"oneOf": [_ref(names[Prediction]), _ref(names[MultiPrediction])]}
    if isinstance(body, type) and issubclass(body, BaseModel):
        return _ref(names[body])
    if isinstance(body, dict):
        return body
    raise TypeError(f"not a body schema: {body!r}")


def _stream_schema(op: Operation, names: dict[Any, str]) -> dict[str, Any]:
    """The stream as the array of its events, each `{event: NAME, data: <its schema>}`, holding exactly one
    of the final events (the stream ends with it; JSON Schema has no keyword for "the last item").

    No `prefixItems` for the first event: schemathesis 4.32 rewrites it to a Draft 4 `items` array in
    response schemas and then rejects the schema as invalid Draft 2020-12.
    """
    events = {
        name: {
            "title": f"{name} event",
            "type": "object",
            "properties": {"event": {"const": name}, "data": _body_schema(data, names)},
            "required": ["event", "data"],
            "additionalProperties": False,
        }
        for name, data in op.stream_events.items()
    }
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"oneOf": list(events.values())}}
    if op.stream_final:
        schema["contains"] = {
            "type": "object", "properties": {"event": {"enum": list(op.stream_final)}}, "required": ["event"]
        }
        schema["minContains"] = schema["maxContains"] = 1
    return schema


def _stream_text(op: Operation) -> str:
    names = [f"`{name}`" for name in op.stream_events]
    final = ", ".join(f"`{name}`" for name in op.stream_final)
    return (
        f"As `{EVENT_STREAM}` (server-sent events): each event an `event:` line with its name and a "
        f"`data:` line of JSON; `: keep-alive` comment lines carry nothing. Its schema is the array of the "
        f"stream's events `{{event, data}}` in the order they come"
        + (f", ending with exactly one of {final}" if final else "")
        + f". Events: {', '.join(names)}."
    )


def _path_params(path: str, model_name: str) -> list[dict[str, Any]]:
    params = []
    for name in re.findall(r"{(\w+)(?::\w+)?}", path):
        schema: dict[str, Any] = {"type": "string", "minLength": 1}
        if name == "model_name":
            if re.fullmatch(MODEL_NAME_PATTERN, model_name) and len(model_name) <= MODEL_NAME_MAX:
                schema.update(pattern=MODEL_NAME_PATTERN, maxLength=MODEL_NAME_MAX)
            else:
                schema["pattern"] = r"^[^/]+$"
        param: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": schema}
        if name == "model_name":
            param["description"] = "The served model's name (see GET /v1/models)."
            if model_name:
                param["example"] = model_name
        params.append(param)
    return params


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path.replace("{", "by_").replace("}", "")).strip("_")
    return f"{method.lower()}_{words or 'root'}"


# ---- installation ---------------------------------------------------------------------------------


def install_openapi(app: FastAPI, table: RouteTable, model: Any, *, api_keys: bool = False,
                    tenant_queue: bool = False) -> None:
    """Serve our `/openapi.json` (built at its first request) and an offline Swagger UI at `/docs`.

    Call it before KServe registers its routes; the document describes the routes present when it is
    first requested. It is cached once the model's request schema exists (it holds the model's bounds).
    `api_keys` and `tenant_queue` as `build_openapi` takes them.
    """
    if getattr(app.state, "kandinsky_openapi", False):
        return  # installed already (configure_app and a test may both call it)
    app.state.kandinsky_openapi = True
    app.state.kandinsky_routes = table
    app.title, app.version = TITLE, __version__

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = build_openapi(app, table, model, api_keys=api_keys, tenant_queue=tenant_queue)
        if getattr(model, "schema", None) is not None:
            app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    app.openapi_schema = None
    _remove_routes(app, _FASTAPI_DOCS_ROUTES)
    if not app.openapi_url:
        app.openapi_url = "/openapi.json"
    if not any(path == app.openapi_url for _, path, _, _ in _flat_routes(app.routes)):

        async def openapi_json() -> JSONResponse:
            return JSONResponse(app.openapi())

        app.add_api_route(app.openapi_url, openapi_json, methods=["GET"], include_in_schema=False)
    _install_swagger_ui(app, model)


def swagger_ui_dir() -> str:
    """The folder of the Swagger UI files shipped by the `swagger-ui-bundle-v2` package."""
    from swagger_ui_bundle import swagger_ui_path

    return str(swagger_ui_path)


def _install_swagger_ui(app: FastAPI, model: Any) -> None:
    openapi_url = app.openapi_url or "/openapi.json"

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        static = f"{root}{DOCS_STATIC_PATH}"
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{TITLE}: {getattr(model, 'name', '')}",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon-32x32.png",
            # The online validator badge would fetch an image from the internet.
            swagger_ui_parameters={"validatorUrl": None},
        )

    app.add_api_route(DOCS_PATH, swagger_ui, methods=["GET"], include_in_schema=False)
    app.mount(DOCS_STATIC_PATH, StaticFiles(directory=swagger_ui_dir()), name="swagger-ui")


def _remove_routes(app: FastAPI, paths: Iterable[str]) -> None:
    drop = set(paths)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in drop]
    changed = getattr(app.router, "_mark_routes_changed", None)
    if changed is not None:
        changed()
