"""Two fixed defects, through the real `python -m app` process and real loopback sockets.

1. KServe's own v1 client (`kserve.InferenceRESTClient`, protocol "v1") checks liveness with `GET /` and
   reads `{"status": "alive"}`; a browser (a request that prefers text/html) gets the page instead.
2. A body over the limit (40 MB, 200 MB), written entirely before the client reads anything, gets the
   413 JSON answer instead of a connection reset, with a declared Content-Length and with chunked
   transfer encoding, and the server's memory does not grow with the body.

One server with the default `--max_body_bytes` (8 MiB) and `--body_timeout` (30 s) serves the module; a
second one with a 1 s `--body_timeout` checks that a client slower than that still reads the 413 (the
refusal lingers for its own bounded time, not the body timeout) instead of a 408 and a broken pipe.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support import serve

NAME = "kandinsky"
DEFAULT_BODY_LIMIT = 8 << 20  # the server's default --max_body_bytes
MB = 1_000_000
CHUNK = 1 << 20
V1_REQUEST = {"instances": [{"query": "кот", "params": {"images_to_gen": 1, "images_to_cherry_pick": 1,
                                                        "super_res": False, "seed": 1}}]}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,*/*;q=0.8"


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    yield from serve(tiny_model_dir)


@pytest.fixture(scope="module")
def short_timeout_srv(tiny_model_dir):
    yield from serve(tiny_model_dir, "--body_timeout", "1")


# ---- 1. KServe's v1 client, and GET / for a browser -------------------------------------------------


def test_kserve_v1_client_checks_liveness_and_readiness_and_infers(srv):
    from kserve import InferenceRESTClient, RESTConfig

    async def run() -> tuple[bool, bool, dict[str, Any]]:
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=120, retries=0))
        try:
            live = await client.is_server_live(srv["base"])
            ready = await client.is_model_ready(srv["base"], NAME)
            answer = await client.infer(srv["base"], V1_REQUEST, model_name=NAME)
        finally:
            await client.close()
        return live, ready, answer

    live, ready, answer = asyncio.run(run())
    assert live is True
    assert ready is True
    assert answer["ok"] is True
    assert len(answer["images"]) == 1 and len(answer["clip_scores"]) == 1
    assert answer["seed"] == 1
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    image.verify()


def test_kserve_v1_client_base_url_with_trailing_slash(srv):
    from kserve import InferenceRESTClient, RESTConfig

    async def run() -> bool:
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=30, retries=0))
        try:
            return await client.is_server_live(srv["base"] + "/")
        finally:
            await client.close()

    assert asyncio.run(run()) is True


@pytest.mark.parametrize("accept", [BROWSER_ACCEPT, "text/html", "application/xhtml+xml;q=0.9, */*;q=0.1"])
def test_root_gives_a_browser_the_page(srv, accept):
    r = httpx.get(srv["base"] + "/", headers={"accept": accept}, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()


@pytest.mark.parametrize("accept", ["*/*", "application/json", "text/html;q=0.5, application/json",
                                    "text/html;q=0.8, */*"])
def test_root_gives_other_clients_the_v1_liveness(srv, accept):
    r = httpx.get(srv["base"] + "/", headers={"accept": accept}, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"status": "alive"}


def test_root_without_an_accept_header_gives_the_v1_liveness(srv):
    # httpx always sends `Accept: */*`: write the request by hand so that no Accept header goes out.
    with socket.create_connection(("127.0.0.1", srv["port"]), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"status": "alive"}


# ---- 2. an over-limit body written in full before reading: 413, not a reset -------------------------


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of one response, read until the server closes."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakRss:
    """The largest VmRSS of a process seen while the block runs (sampled every few milliseconds)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.002)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_kib(self.pid))


def post_oversized(port: int, size: int, chunked: bool,
                   pause: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    """POST `size` bytes to the predict route, every byte written before anything is read (`pause`
    seconds between 1 MiB pieces: a slower client)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = (f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n").encode()
    block = b" " * CHUNK  # whitespace: a body that would be valid JSON padding, so only its size is wrong
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            piece = block[:n]
            # A reset or broken pipe here is the defect: the server closed on a client still writing.
            sock.sendall(f"{n:x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            sent += n
            if pause:
                time.sleep(pause)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        return read_response(sock)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [40 * MB, 200 * MB], ids=["40MB", "200MB"])
def test_oversized_body_written_in_full_gets_the_413_and_memory_stays_flat(srv, size, chunked):
    pid = srv["proc"].pid
    before = rss_kib(pid)
    started = time.monotonic()
    with PeakRss(pid) as peak:
        status, headers, body = post_oversized(srv["port"], size, chunked)
    elapsed = time.monotonic() - started
    after = rss_kib(pid)
    print(f"\n{size // MB} MB {'chunked' if chunked else 'content-length'}: {elapsed:.2f} s, "
          f"VmRSS {before // 1024} -> peak {peak.peak // 1024} -> {after // 1024} MiB "
          f"(peak growth {(peak.peak - before) / 1024:.1f} MiB)")

    assert status == 413, body[:500]
    assert headers["content-type"].startswith("application/json")
    assert headers.get("connection", "").lower() == "close"
    error = json.loads(body)["error"]
    assert str(DEFAULT_BODY_LIMIT) in error and "limit" in error
    # The body is dropped as it arrives: neither the peak nor what stays grows with it.
    assert (peak.peak - before) < 64 * 1024, f"VmRSS grew {(peak.peak - before) // 1024} MiB during the body"
    assert (after - before) < 64 * 1024
    assert elapsed < 30  # drained at loopback speed, well inside the linger bound (LINGER_S)
    # The server goes on serving.
    r = httpx.get(f"{srv['base']}/v1/models/{NAME}", timeout=10)
    assert r.status_code == 200 and r.json()["ready"] is True


def test_body_just_over_the_limit_is_refused_and_one_at_the_limit_is_read(srv):
    # At the limit exactly: read and parsed (a 400 for the padding's JSON, not a 413).
    with socket.create_connection(("127.0.0.1", srv["port"]), timeout=60) as sock:
        body = b" " * (DEFAULT_BODY_LIMIT - 2) + b"{}"
        head = (f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        sock.sendall(head.encode() + body)
        status, _, answer = read_response(sock)
    assert status == 400, answer[:300]
    # One byte more, chunked (no declared length): counted, drained, refused.
    status, _, answer = post_oversized(srv["port"], DEFAULT_BODY_LIMIT + 1, chunked=True)
    assert status == 413 and str(DEFAULT_BODY_LIMIT) in json.loads(answer)["error"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_client_slower_than_the_body_timeout_still_reads_the_413(short_timeout_srv, chunked):
    # 40 pieces 40 ms apart: about 1.6 s in all, past the 1 s body timeout, never idle for LINGER_IDLE_S.
    # The body is known to be over the limit (at once from its Content-Length, or after 8 MiB counted,
    # well inside the second): that is the answer, whatever time the drain then takes.
    started = time.monotonic()
    status, headers, body = post_oversized(short_timeout_srv["port"], 40 * CHUNK, chunked, pause=0.04)
    elapsed = time.monotonic() - started
    assert elapsed > 1.2  # the drain did outlast the body timeout
    assert status == 413, body[:500]
    assert headers.get("connection", "").lower() == "close"
    assert str(DEFAULT_BODY_LIMIT) in json.loads(body)["error"]
