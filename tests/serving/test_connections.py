"""Issue 19, item 4 and the bind flags, through the real server process and real sockets.

- Slow headers: 60 connections that send a request line and then one header line a second are answered
  408 and closed within `--header_timeout` (+ a margin), while health keeps answering 200; a fresh
  connection that sends nothing is closed silently after the same time; a later request on a keep-alive
  connection gets the same timeout.
- Idle keep-alive connections are closed after KServe's `--timeout-keep-alive`, not the header timeout.
- `--max_connections`: beyond it a request gets a 503 with `Retry-After` and its connection closes, while
  health and readiness answer; once the crowd leaves, requests are served again.
- `--http_host` / `--grpc_host`: the listening sockets (read from /proc/net) are on the address given.
- Bad values of these flags stop start-up with exit 2 and one line.
"""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, listening_addresses, serve

NAME = "kandinsky"
HEADER_TIMEOUT = 2.0
KEEP_ALIVE = 5.0
CAP = 20
#: What the server may take beyond a timeout to act on it on a loaded two-core machine.
MARGIN = 5.0
SLOW_SOCKETS = 60


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    yield from serve(tiny_model_dir, "--header_timeout", str(HEADER_TIMEOUT),
                     "--timeout-keep-alive", str(int(KEEP_ALIVE)))


@pytest.fixture(scope="module")
def capped(tiny_model_dir):
    yield from serve(tiny_model_dir, "--max_connections", str(CAP))


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def exchange(sock: socket.socket, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a kept-alive connection: status, headers (lower-case names) and the body."""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def until_closed(sock: socket.socket, bound: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    start = time.monotonic()
    sock.settimeout(bound)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {bound} s; got {data[:200]!r}") from None
    return data, time.monotonic() - start


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- slow headers ------------------------------------------------------------------------------


class SlowClients:
    """`count` connections that each send a request line, then one header line a second, forever; a
    thread drives them and records what each got back and when the server closed it."""

    def __init__(self, port: int, count: int) -> None:
        self.socks = [connect(port) for _ in range(count)]
        self.received = {s.fileno(): b"" for s in self.socks}
        self.closed_after: dict[int, float] = {}
        self.start = time.monotonic()
        for sock in self.socks:
            sock.setblocking(False)
            sock.sendall(f"GET /v1/models/{NAME} HTTP/1.1\r\n".encode())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive, daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        selector = selectors.DefaultSelector()
        for sock in self.socks:
            selector.register(sock, selectors.EVENT_READ)
        next_header = time.monotonic() + 1.0
        line = 0
        while not self._stop.is_set() and len(self.closed_after) < len(self.socks):
            for key, _ in selector.select(timeout=max(0.0, next_header - time.monotonic())):
                self._read(selector, key.fileobj)  # type: ignore[arg-type]
            if time.monotonic() >= next_header:
                line += 1
                for sock in self.socks:
                    if sock.fileno() in self.closed_after:
                        continue
                    try:
                        sock.send(f"X-Slow-{line}: {line}\r\n".encode())
                    except OSError:
                        self._read(selector, sock)
                next_header += 1.0
        selector.close()

    def _read(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd in self.closed_after:
            return
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            chunk = b""
        self.received[fd] += chunk
        if not chunk:
            self.closed_after[fd] = time.monotonic() - self.start
            selector.unregister(sock)

    def wait(self, bound: float) -> None:
        self._thread.join(bound)
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


def test_slow_headers_are_answered_408_and_closed_while_health_answers(srv):
    rss_before = rss_bytes(srv["proc"].pid)
    clients = SlowClients(srv["port"], SLOW_SOCKETS)
    try:
        # While all 60 are open and trickling headers, probes on fresh connections answer at once.
        while len(clients.closed_after) == 0 and time.monotonic() - clients.start < HEADER_TIMEOUT:
            r = httpx.get(f"{srv['base']}/v2/health/ready", timeout=2)
            assert r.status_code == 200
            time.sleep(0.2)
        rss_during = rss_bytes(srv["proc"].pid)
        clients.wait(HEADER_TIMEOUT + MARGIN)
        assert len(clients.closed_after) == SLOW_SOCKETS, "some slow-header connections stayed open"
        assert max(clients.closed_after.values()) < HEADER_TIMEOUT + MARGIN
        # not closed by something else early: the header time was given
        assert min(clients.closed_after.values()) >= HEADER_TIMEOUT - 0.5
        for data in clients.received.values():
            assert data.startswith(b"HTTP/1.1 408 "), data[:200]
            assert b"did not arrive within 2 s" in data and b"connection: close" in data.lower()
    finally:
        clients.close()
    assert httpx.get(f"{srv['base']}/v2/health/live", timeout=2).status_code == 200
    # 60 parked connections cost the server little memory
    assert rss_during - rss_before < 32 * 1024 * 1024
    # an attack is a line or two in the log, not one per connection
    logged = [line for line in list(srv["lines"]) if "did not arrive within" in line]
    assert 1 <= len(logged) <= 3, logged


def test_a_connection_that_sends_nothing_is_closed_silently_after_the_header_timeout(srv):
    sock = connect(srv["port"])
    data, took = until_closed(sock, HEADER_TIMEOUT + MARGIN)
    sock.close()
    assert data == b"" and took >= HEADER_TIMEOUT - 0.5


def test_slow_headers_of_a_later_request_on_a_kept_alive_connection_get_408(srv):
    sock = connect(srv["port"])
    assert exchange(sock, "GET", "/v2/health/live")[0] == 200
    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: test\r\n")  # ... and the blank line never comes
    data, took = until_closed(sock, HEADER_TIMEOUT + MARGIN)
    sock.close()
    assert data.startswith(b"HTTP/1.1 408 ") and took >= HEADER_TIMEOUT - 0.5, data[:200]


def test_a_blank_line_does_not_hold_a_connection_open(srv):
    sock = connect(srv["port"])
    sock.sendall(b"\r\n")
    data, _ = until_closed(sock, HEADER_TIMEOUT + MARGIN)
    sock.close()
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:200]


def test_an_oversized_head_gets_431(srv):
    sock = connect(srv["port"])
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n")
    try:
        for i in range(40):  # 40 x 4 KiB headers, over the 64 KiB head limit, never finished
            sock.sendall(f"X-Big-{i}: ".encode() + b"a" * 4096 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    data, _ = until_closed(sock, HEADER_TIMEOUT + MARGIN)
    sock.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]


def test_headers_that_complete_in_time_are_served_on_a_slow_trickle(srv):
    """A client slower than a packet per header but within the timeout is served as usual."""
    sock = connect(srv["port"])
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    time.sleep(HEADER_TIMEOUT / 4)
    sock.sendall(b"Host: test\r\n")
    time.sleep(HEADER_TIMEOUT / 4)
    sock.sendall(b"\r\n")
    sock.settimeout(10)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    sock.close()


# ---- idle keep-alive -------------------------------------------------------------------------------


def test_an_idle_kept_alive_connection_is_closed_after_timeout_keep_alive(srv):
    sock = connect(srv["port"])
    assert exchange(sock, "GET", "/v2/health/live")[0] == 200
    data, took = until_closed(sock, KEEP_ALIVE + MARGIN)
    sock.close()
    # the keep-alive time, not the (shorter) header timeout, applies between requests
    assert data == b"" and took >= KEEP_ALIVE - 0.5


# ---- the connection cap -------------------------------------------------------------------------------


def test_beyond_max_connections_a_request_gets_503_and_health_still_answers(capped):
    port = capped["port"]
    crowd = [connect(port) for _ in range(CAP)]
    try:
        for sock in crowd:  # valid, then idle (kept alive)
            assert exchange(sock, "GET", "/v2/health/live")[0] == 200

        extra = connect(port)
        status, headers, body = exchange(extra, "GET", f"/v2/models/{NAME}")
        assert status == 503 and int(headers["retry-after"]) > 0, (status, headers)
        assert b"too many open connections" in body
        assert headers.get("connection") == "close"
        assert until_closed(extra, 5)[0] == b""
        extra.close()

        for path in ("/v2/health/ready", "/v2/health/live", "/", f"/v1/models/{NAME}"):
            assert httpx.get(f"{capped['base']}{path}", timeout=2).status_code == 200, path
        r = httpx.post(f"{capped['base']}/v1/models/{NAME}:predict", json={"instances": []}, timeout=5)
        assert r.status_code == 503 and "retry-after" in r.headers
    finally:
        for sock in crowd:
            sock.close()

    deadline = time.monotonic() + MARGIN
    while (status := httpx.get(f"{capped['base']}/v2/models/{NAME}", timeout=2).status_code) != 200:
        assert time.monotonic() < deadline, f"still {status} after the crowd left"
        time.sleep(0.1)
    # and the crowd's slots are all free again: CAP new connections are served
    again = [connect(port) for _ in range(CAP)]
    try:
        assert all(exchange(sock, "GET", f"/v2/models/{NAME}")[0] == 200 for sock in again)
    finally:
        for sock in again:
            sock.close()


# ---- bind addresses ------------------------------------------------------------------------------------


def test_http_and_grpc_listen_on_loopback_only(srv):
    # tests.support starts every server with --http_host 127.0.0.1 --grpc_host 127.0.0.1
    assert listening_addresses(srv["port"]) == {"127.0.0.1"}
    assert listening_addresses(int(srv["grpc"].rsplit(":", 1)[1])) == {"127.0.0.1"}


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--http_host", "", "--http_host: must not be empty"),
    ("--grpc_host", "192.0.2.1", "--grpc_host: '192.0.2.1' is not an address this host can bind"),
    ("--header_timeout", "0", "--header_timeout: must be > 0"),
    ("--max_connections", "0", "--max_connections: must be > 0"),
])
def test_bad_connection_flags_exit_2_with_one_line(tiny_model_dir, flag, value, needle):
    proc = subprocess.run([sys.executable, "-m", "app", "--model_dir", str(tiny_model_dir), "--device", "cpu",
                           flag, value], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
