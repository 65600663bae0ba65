"""The route table: every route this server answers, declared once by the protocol that owns it.

A `Route` says its method and path, its handler (None: KServe's own app serves it, and we only document
and count it), the protocol label of `kandinsky_requests_total` (generating routes only), whether it needs
an API key (`auth`, SPEC section 12: with `--api_keys` the middleware refuses it without a valid one before
it reads the body), the shape of errors the middleware answers on it, the checks the middleware makes of
its body before the handler runs, and its documentation (`Operation`). The middleware, the metrics labels
and the OpenAPI document (app/serving/web/openapi.py) all read the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.routing import compile_path
from starlette.types import Scope

from app.serving.core.errors import NotFound, Unauthenticated
from app.serving.core.jobs import JobService
from app.serving.core.service import Service
from app.serving.core.settings import ServerSettings
from app.serving.core.tenants import ApiKeys

#: A protocol's error body for a status and a message (the middleware's own 400/408/413/415 answers).
ErrorShape = Callable[[int, str], dict[str, Any]]
#: A check of a raw request body and its (lower-cased) headers before the handler: a message, or None.
BodyCheck = Callable[[bytes, dict[str, str]], str | None]


def plain_error(status: int, message: str) -> dict[str, Any]:
    """`{"error": message}`: the v1, jobs and v2 REST error body."""
    return {"error": message}


# ---- API keys (SPEC section 12) ---------------------------------------------------------------------

#: The key of the ASGI scope's `state` (what Starlette's `request.state` reads) that holds the tenant the
#: middleware authenticated; only the middleware writes it.
TENANT_STATE = "tenant"
#: RFC 6750's challenges: no credentials (or another scheme), and a bearer token that is not accepted.
CHALLENGE = "Bearer"
CHALLENGE_INVALID = 'Bearer error="invalid_token"'


def refusal(authorization: str | None, where: str = "the header Authorization") -> tuple[str, str]:
    """Why an `Authorization` value authenticates no tenant, and the `WWW-Authenticate` challenge to
    answer with (`error="invalid_token"` only when a bearer token was presented). `where` says how to
    send a key (a header, gRPC metadata). The message never quotes what was sent."""
    how = f"send {where}: Bearer <key>"
    value = (authorization or "").strip()
    if not value:
        return f"an API key is required: {how}", CHALLENGE
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return f"only the Bearer scheme is accepted: {how}", CHALLENGE
    if not token.strip():
        return f"Bearer without a key: {how}", CHALLENGE
    return "the API key is not valid (unknown, or no longer accepted)", CHALLENGE_INVALID


def scope_tenant(scope: Scope) -> str | None:
    """The tenant the middleware authenticated for this request, or None."""
    state = scope.get("state")
    value = state.get(TENANT_STATE) if isinstance(state, dict) else None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Operation:
    """One documented route: the success body (a model, `PREDICTION`, or `METRICS`) and error statuses.

    A route that answers server-sent events declares them in `stream_events`; the document describes its
    `text/event-stream` answer as the array of the events the stream sends, `{event, data}`, with each
    event's data schema (app/serving/web/openapi.py).
    """

    summary: str
    tag: str
    ok: Any
    errors: tuple[int, ...] = ()
    description: str = ""
    ok_description: str = "OK"
    error_descriptions: dict[int, str] = field(default_factory=dict)
    #: The success status (202 for a submitted job).
    ok_status: int = 200
    #: The request body: a pydantic model, or `PREDICT_BODY` (the predict request with the server's bounds).
    request: Any = None
    #: Further media types of the success response, each a string (e.g. "text/html"); a server-sent event
    #: stream is declared with `stream_events` instead.
    ok_media: tuple[str, ...] = ()
    #: Further success statuses: status -> (description, body model or None).
    other_ok: dict[int, tuple[str, Any]] = field(default_factory=dict)
    #: Query parameters: name -> (JSON schema, description).
    query: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    #: Response headers of the success status: name -> description.
    ok_headers: dict[str, str] = field(default_factory=dict)
    #: The body of every error status, when not ours (`ErrorBody`, `FailureBody` for 500).
    error_body: Any = None
    #: The events of the `text/event-stream` answer: event name -> its data (a pydantic model, `PREDICTION`,
    #: or a JSON schema), each event an `event:` line and a `data:` line of JSON. Empty: no stream.
    stream_events: dict[str, Any] = field(default_factory=dict)
    #: The status that answers the stream: `ok_status` (None) or one of `other_ok`.
    stream_status: int | None = None
    #: The events of which exactly one ends the stream, if the stream has such an end.
    stream_final: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.stream_events:
            if self.stream_status is not None or self.stream_final:
                raise ValueError(f"{self.summary}: stream_* fields without stream_events")
            return
        if self.stream_status not in (None, self.ok_status, *self.other_ok):
            raise ValueError(f"{self.summary}: stream_status {self.stream_status} is not a success status")
        undeclared = set(self.stream_final) - set(self.stream_events)
        if undeclared:
            raise ValueError(f"{self.summary}: undeclared stream events {sorted(undeclared)}")


PREDICTION = "prediction"  # oneOf Prediction / MultiPrediction
METRICS = "metrics"  # Prometheus text exposition
HTML = "html"  # a page
PREDICT_BODY = "predict-body"  # the v1 predict request, validated with this server's limits

@dataclass(frozen=True)
class Route:
    """One route, declared once."""

    method: str
    path: str
    doc: Operation | None  # None: answered but left out of the API document
    handler: Callable[..., Any] | None = None  # None: served by KServe's own app
    protocol: str | None = None  # kandinsky_requests_total{protocol}: generating routes only
    #: Needs `Authorization: Bearer <key>` when the server has API keys (generating and job routes).
    auth: bool = False
    error_shape: ErrorShape = plain_error
    json_body: bool = False  # the body must be JSON (415 otherwise) with no duplicate keys (400)
    body_check: BodyCheck | None = None  # further checks of the raw body (400 naming the place)
    #: Only for this server's model: a route under /{model_name}/ for another model is KServe's 404.
    model_scoped: bool = True
    _pattern: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex, _, _ = compile_path(self.path)  # Starlette's own reading of the path template
        object.__setattr__(self, "_pattern", regex)

    def matches(self, method: str, path: str) -> dict[str, str] | None:
        """The path parameters when this route answers (method, path), else None."""
        if method != self.method:
            return None
        m = self._pattern.match(path)
        return m.groupdict() if m else None


class RouteTable:
    """The routes of every protocol, in the order they are installed (the first match answers)."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.routes: list[Route] = list(routes)

    def extend(self, routes: Iterable[Route]) -> None:
        self.routes.extend(routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            params = route.matches(method, path)
            if params is not None:
                return route, params
        return None

    def operations(self) -> dict[tuple[str, str], Operation]:
        """(method, path) -> documentation, for the API document."""
        return {(r.method, r.path): r.doc for r in self.routes if r.doc is not None}


@dataclass(frozen=True)
class ProtocolContext:
    """What a protocol's routes are built with: the served model's name, the one Service, the jobs, the
    settings, the model card (available once loaded), and the API keys (None: none asked for)."""

    name: str
    service: Service
    jobs: JobService
    settings: ServerSettings
    card: Callable[[], dict[str, Any]]
    keys: ApiKeys | None = None

    def tenant(self, request: Request) -> str | None:
        """The tenant of a request to a route with `auth` (None without API keys). The middleware has
        authenticated it; one it did not match to the route (a HEAD of a GET route) is authenticated here,
        so that a handler never runs as nobody's."""
        if self.keys is None:
            return None
        name = scope_tenant(request.scope)
        if name is not None:
            return name
        authorization = request.headers.get("authorization")
        found = self.keys.authenticate(authorization)
        if found is None:
            raise Unauthenticated(refusal(authorization)[0])
        return found.name

    def check_model(self, model_name: str) -> None:
        """A route under /{model_name}/ for another model: 404 as KServe answers it."""
        if model_name != self.name:
            raise NotFound(f"Model with name {model_name} does not exist.")
