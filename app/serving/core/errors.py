"""The service's typed errors: each has a status (the HTTP one; gRPC and OpenAI map it) and a message
for the client that never holds a prompt. Client errors carry structured field paths (`FieldProblem`),
so that each protocol names the field in its own words (`instances[0].params.top_k`, `inputs.top_k`,
`top_k`) without rewriting text. The protocols turn these into their wire forms; nothing here knows one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Seconds a client should wait before retrying a 503 (queue full, not ready, shutting down).
RETRY_AFTER_S = 5

#: Where a problem is, as a path into the v1 request: ("instances", 0, "params", "top_k"); () = the body.
Loc = tuple[str | int, ...]


def encodable(text: str) -> str:
    """`text` with whatever UTF-8 cannot encode (lone surrogates) written as `\\udXXX` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unencodable_text(at: int) -> str:
    """What is wrong with text that UTF-8 cannot encode, in the words the v1 schema uses."""
    return f"must be text that UTF-8 can encode; a lone surrogate at character {at}"


@dataclass(frozen=True)
class Unencodable:
    """The first string of a decoded JSON document that UTF-8 cannot encode: where, and at which character.
    `in_key`: the string is a key of the object at `loc`."""

    loc: Loc
    at: int
    in_key: bool = False

    def text(self) -> str:
        if self.in_key:
            return (f"{format_loc(self.loc)}: a key is not text that UTF-8 can encode "
                    f"(a lone surrogate at character {self.at})")
        return f"{format_loc(self.loc)}: {unencodable_text(self.at)}"


def find_unencodable(doc: Any, skip: Callable[[Loc], bool] = lambda loc: False) -> Unencodable | None:
    """The first string (key or value) in `doc` (decoded JSON) that UTF-8 cannot encode, depth first; the
    places `skip` accepts are not looked into. JSON text carries a lone surrogate as `"\\ud800"`, which
    Python's parser keeps, and which would fail later wherever the text is encoded."""
    stack: list[tuple[Loc, Any]] = [((), doc)]
    while stack:
        loc, value = stack.pop()
        if skip(loc):
            continue
        if isinstance(value, str):
            at = _surrogate_at(value)
            if at is not None:
                return Unencodable(loc, at)
        elif isinstance(value, dict):
            for key in value:
                at = _surrogate_at(key) if isinstance(key, str) else None
                if at is not None:
                    return Unencodable(loc, at, in_key=True)
            stack.extend(reversed([((*loc, str(k)), v) for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([((*loc, i), v) for i, v in enumerate(value)]))
    return None


def _surrogate_at(text: str) -> int | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def format_loc(loc: Loc) -> str:
    """`instances[0].params.top_k`; "body" for the empty path."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "body"


@dataclass(frozen=True)
class FieldProblem:
    """One thing wrong with a request: where (a path into the v1 request) and what, with the bound."""

    loc: Loc
    message: str  # "must be <= 8192 (image vocabulary size)"
    allowed: str | None = None  # "integer 1..8192": what the field accepts

    def text(self, name: Callable[[Loc], str] = format_loc, *, with_allowed: bool = True) -> str:
        allowed = f"; allowed: {self.allowed}" if self.allowed and with_allowed else ""
        return f"{name(self.loc)}: {self.message}{allowed}"


class ServiceError(Exception):
    """An error with a fixed status; `message` goes to the client, so it never holds a prompt."""

    status: int = 500

    def __init__(self, message: str) -> None:
        message = encodable(message)  # a lone surrogate quoted from the input would fail the answer
        super().__init__(message)
        self.message = message

    def retry_after(self) -> int | None:
        """Seconds a client should wait before retrying, for the errors that say so."""
        return None


class RequestInvalid(ServiceError):
    """The request or one of its fields is not acceptable (400). `problems` name the fields (empty for a
    problem with the body as a whole, whose message says where)."""

    status = 400

    def __init__(self, message: str, problems: Sequence[FieldProblem] = (), more: int = 0) -> None:
        super().__init__(message)
        self.problems = tuple(problems)
        self.more = more  # problems found beyond those listed

    @classmethod
    def of(cls, problems: Sequence[FieldProblem], more: int = 0) -> RequestInvalid:
        return cls(_join(problems, more, FieldProblem.text), problems, more)

    def named(self, text: Callable[[FieldProblem], str]) -> str:
        """The message with every problem told by `text` (in a protocol's names), each problem once."""
        if not self.problems:
            return self.message
        return encodable(_join(self.problems, self.more, text))

    @property
    def first_loc(self) -> Loc | None:
        return self.problems[0].loc if self.problems else None


def _join(problems: Sequence[FieldProblem], more: int, text: Callable[[FieldProblem], str]) -> str:
    parts = list(dict.fromkeys(text(p) for p in problems))
    if more:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


class QueueFull(ServiceError):
    """The bounded request queue is full (503 with Retry-After)."""

    status = 503

    def retry_after(self) -> int | None:
        return RETRY_AFTER_S


class ShuttingDown(QueueFull):
    """The server stopped taking new work (SIGTERM received)."""


class NotReady(QueueFull):
    """The model is not loaded (yet): 503 with Retry-After."""


class DeadlineExceeded(ServiceError):
    """The request could not be answered within the server's deadline (504)."""

    status = 504


class GenerationFailed(ServiceError):
    """The batch holding this request failed (500); v1 bodies carry `ok: false`."""

    status = 500


class NotFound(ServiceError):
    """No such resource (a job id that is unknown or expired): 404."""

    status = 404


class Conflict(ServiceError):
    """The request conflicts with the resource's state (cancelling a finished job, an idempotency key
    reused with another body): 409."""

    status = 409


class Unauthenticated(ServiceError):
    """No valid API key (401 with `WWW-Authenticate: Bearer`); the message never quotes what was sent."""

    status = 401


class TenantQueueFull(ServiceError):
    """The caller's tenant has `--tenant_queue_size` requests waiting already (429 with Retry-After)."""

    status = 429

    def retry_after(self) -> int | None:
        return RETRY_AFTER_S
