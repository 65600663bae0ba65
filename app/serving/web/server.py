"""The HTTP server under KServe's app: bind address, slow and idle connections, the connection cap.

uvicorn bounds neither how long a request's headers may take nor how many connections are open, and
KServe's `RESTServer` binds every interface (`host="0.0.0.0"` is written into its uvicorn config). Here:

- `GuardedProtocol` (uvicorn's httptools protocol) closes a connection whose request headers have not
  completed `--header_timeout` seconds after that request's first byte, with a 408 when nothing of a
  response is under way; a fresh connection that sends nothing is closed (silently: nothing was asked)
  after the same time; a head over `MAX_HEAD_BYTES` gets 431. Between requests an idle keep-alive
  connection is closed by uvicorn after KServe's `--timeout-keep-alive` (65 s by default), as before.
- Beyond `--max_connections` open connections, a new connection's request gets a 503 with `Retry-After`
  and the connection closes, unless it asks a probe or `/metrics` (`probe_paths`): an orchestrator
  must still see the server live while clients crowd it.
- `install_rest_server` makes KServe build its REST server with our host and protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from kserve import model_server
from kserve.protocol.rest.server import RESTServer
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.serving.core.settings import ServerSettings
from app.serving.web.health import LIVENESS_PATH, READINESS_PATH

log = logging.getLogger(__name__)

#: A request line and headers larger than this get 431: the parser keeps whatever it is fed, so a fast
#: client could otherwise fill memory for the whole header timeout.
MAX_HEAD_BYTES = 64 * 1024
#: What a refused client is told to wait before it tries again (seconds).
RETRY_AFTER_S = 2
#: Refusals and timeouts are logged at most this often (seconds), with a count: an attack is one line.
LOG_EVERY_S = 10.0


def probe_paths(model_name: str) -> frozenset[str]:
    """Paths answered even beyond the connection cap: liveness, readiness (KServe's and ours), metrics."""
    return frozenset({"/", LIVENESS_PATH, READINESS_PATH, f"/v1/models/{model_name}",
                      f"/v2/models/{model_name}/ready", "/metrics"})


class ConnectionGuard:
    """What every connection of one HTTP server shares: the limits, the counts, the throttled log.

    `open` counts every open connection, `admitted` those within `max_connections`; `refused` (503s),
    `header_timeouts` (closed for slow or missing headers) and `oversized` (431s) only grow; metrics
    read them.
    """

    def __init__(self, header_timeout: float, max_connections: int, probes: frozenset[str]) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.probes = probes
        self.open = 0
        self.admitted = 0
        self.refused = 0
        self.header_timeouts = 0
        self.oversized = 0
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def opened(self) -> bool:
        """A connection opened: whether it is admitted (within the cap)."""
        self.open += 1
        return self.admit()

    def admit(self) -> bool:
        if self.admitted >= self.max_connections:
            return False
        self.admitted += 1
        return True

    def closed(self, admitted: bool) -> None:
        self.open -= 1
        if admitted:
            self.admitted -= 1

    def report(self, what: str) -> None:
        """Count one refusal or timeout in the log, one line per `LOG_EVERY_S` at most."""
        self._unlogged[what] = self._unlogged.get(what, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(what, -LOG_EVERY_S) >= LOG_EVERY_S:
            log.warning("%d connection(s) %s (open: %d of %d)", self._unlogged.pop(what), what,
                        self.open, self.max_connections)
            self._logged_at[what] = now


def _raw_response(status: int, message: str, *headers: tuple[bytes, bytes]) -> bytes:
    body = json.dumps({"error": message}).encode()
    lines = [STATUS_LINE[status], b"content-type: application/json\r\n",
             b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join([*lines, b"\r\n", body])


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a head size limit and the connection cap.

    Subclassed per server by `guarded_protocol`, which sets `guard`. State per connection: `_awaiting_head`
    is true from the end of one request (or the connection's start) to the next request's headers;
    `_head_bytes` is what arrived in that time; `_timer` closes the connection when it runs out.
    """

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served_app = self.app
        self._admitted = False
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_started = False
        self._timer: asyncio.TimerHandle | None = None

    # ---- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._admitted = self.guard.opened()
        # Nothing arrives on a fresh connection: the cheapest way to hold one; it gets the header time.
        self._arm(self._idle_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.closed(self._admitted)
        self._admitted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and not self._head_started:
            # The first byte of a request (or of bytes that should start one: a blank line is no
            # message to the parser, yet it must not hold the connection open either).
            self._disarm()
            self._head_started = True
        super().data_received(data)
        if not self._awaiting_head or self.transport.is_closing():
            return
        if self._head_started:
            # Still inside a request's head after this chunk (a whole chunk of it: a head that completed
            # in this chunk reset the count in on_headers_complete).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.guard.oversized += 1
                self._refuse_head(431, f"request line and headers over {MAX_HEAD_BYTES} bytes")
            elif self._timer is None:
                self._arm(self._head_expired)

    # ---- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True
        self._head_started = True

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_started = False
        self._head_bytes = 0
        self._disarm()
        if not self._admitted:
            self._admitted = self.guard.admit()  # others may have left since this one connected
        self.app = self._served_app if self._admitted else self._beyond_cap
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True  # what follows is the next request (pipelined) or nothing

    # ---- timers ---------------------------------------------------------------------------------

    def _arm(self, expired: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.guard.header_timeout, expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.guard.report("closed: no request within --header_timeout of connecting")
            self.guard.header_timeouts += 1
            self.transport.close()

    def _head_expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.guard.header_timeouts += 1
        self._refuse_head(408, f"request headers did not arrive within {self.guard.header_timeout:g} s")

    def _refuse_head(self, status: int, message: str) -> None:
        """Answer `status` where no response is under way (else close after it), and close."""
        self._disarm()
        self.guard.report(f"answered {status}: {message}")
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is late while the previous response is still being written: a 408 now
            # would land inside that response. Let it finish, read nothing more, then close.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.transport.write(_raw_response(status, message))
        self.transport.close()

    # ---- beyond the connection cap ------------------------------------------------------------------

    async def _beyond_cap(self, scope: Any, receive: Any, send: Any) -> None:
        """The app for a connection beyond the cap: probes are served, anything else gets a 503."""

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                # This connection holds a slot beyond the cap: it ends with this response.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if scope.get("method") in ("GET", "HEAD") and scope.get("path") in self.guard.probes:
            await self._served_app(scope, receive, send_closing)
            return
        self.guard.refused += 1
        self.guard.report(f"answered 503: over --max_connections {self.guard.max_connections}")
        message = f"too many open connections (at most {self.guard.max_connections}); retry later"
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
            (b"retry-after", b"%d" % RETRY_AFTER_S), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A protocol class for one server (uvicorn builds protocols from a class, so the guard is bound here)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


def install_rest_server(settings: ServerSettings, model_name: str) -> ConnectionGuard:
    """Make `kserve.ModelServer.start()` serve HTTP on `--http_host` with `GuardedProtocol`.

    `ModelServer.start()` builds its `RESTServer` from the name in `kserve.model_server` and runs it at
    once, and `RESTServer` writes `host="0.0.0.0"` into its uvicorn config: the subclass put under that
    name is the one place both can be chosen (the config is read by uvicorn only when serving starts).
    Returns the guard, whose counts a metric may read.
    """
    guard = ConnectionGuard(settings.header_timeout, settings.max_connections, probe_paths(model_name))
    protocol = guarded_protocol(guard)

    class GuardedRESTServer(RESTServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = settings.http_host
            self.config.http = protocol

    model_server.RESTServer = GuardedRESTServer  # type: ignore[misc]
    return guard
