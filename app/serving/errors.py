"""Typed service errors and the one place that maps them to HTTP statuses and bodies.

KServe registers its own handlers (InvalidInput -> 400, ModelNotReady -> 503, ...) when its REST server
builds the app, after ours, so we never reuse its classes for our statuses: each error here is its own
class and its handler is looked up by type before KServe's catch-all `Exception` handler.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

# Seconds a client should wait before retrying a 503 (queue full, not ready, shutting down).
RETRY_AFTER_S = 5


class ServiceError(Exception):
    """An error with a fixed HTTP status; `message` goes to the client, so it never holds a prompt."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message}

    def headers(self) -> dict[str, str]:
        return {}


class RequestInvalid(ServiceError):
    """The request body or one of its fields is not acceptable (400)."""

    status = 400


class QueueFull(ServiceError):
    """The bounded request queue is full (503 with Retry-After)."""

    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class ShuttingDown(QueueFull):
    """The server stopped taking new work (SIGTERM received)."""


class DeadlineExceeded(ServiceError):
    """The request could not be answered within the server's deadline (504)."""

    status = 504


class GenerationFailed(ServiceError):
    """The batch holding this request failed (500); the body carries `ok: false`."""

    status = 500

    def body(self) -> dict[str, Any]:
        return {"ok": False, "error": self.message}


class NotFound(ServiceError):
    """No such resource (a job id that is unknown or expired): 404."""

    status = 404


class Conflict(ServiceError):
    """The request conflicts with the resource's state (cancelling a finished job, an idempotency key
    reused with another body): 409."""

    status = 409


async def service_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)  # registered for ServiceError only
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers())


def install_exception_handlers(app: FastAPI) -> None:
    """Register our handlers; they take precedence over KServe's generic `Exception` handler."""
    app.add_exception_handler(ServiceError, service_error_handler)
