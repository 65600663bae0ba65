"""Issue 8 through the real server process and real sockets: what an attacker or a careless client meets.

One server (tiny model, JSON logs, a 1 s body timeout, a 64 KiB body limit) serves the whole module; its
output is collected line by line so the log checks read exactly what an operator's log shipper would.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from typing import Any

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from tests.support import serve

NAME = "kandinsky"
BODY_LIMIT = 64 * 1024

#: kandinsky_requests_total of v1 requests whose client hung up (no API keys: tenant "").
CLOSED_V1 = '{code="499",protocol="v1",tenant=""}'


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    yield from serve(tiny_model_dir, "--log_format", "json", "--body_timeout", "1",
                     "--max_body_bytes", str(BODY_LIMIT))


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def predict_body(images: int, seed: int, query: str = "кот") -> bytes:
    params = {"images_to_gen": images, "images_to_cherry_pick": 1, "super_res": False, "seed": seed,
              "format": "png"}
    return json.dumps({"instances": [{"query": query, "params": params}]}).encode()


def raw_request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                send_body: bool = True) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = {"Host": "test", "Content-Type": "application/json", "Content-Length": str(len(body)),
            **(headers or {})}
    text = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    sock.sendall(text.encode() + (body if send_body else b""))
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data


def logged(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in list(lines) if line.startswith("{")]


# ---- 1. the model repository cannot change what is served ---------------------------------------


def test_repository_unload_and_load_are_refused_and_the_model_stays_served(srv):
    base = srv["base"]
    for action in ("unload", "load"):
        r = httpx.post(f"{base}/v2/repository/models/{NAME}/{action}", timeout=10)
        assert r.status_code == 404, r.text
    assert httpx.get(f"{base}/v1/models/{NAME}", timeout=5).json()["ready"] is True
    assert httpx.get(f"{base}/v2/health/live", timeout=5).status_code == 200
    with grpc.insecure_channel(srv["grpc"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=NAME), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stub.ModelReady(pb.ModelReadyRequest(name=NAME), timeout=10).ready is True
    r = httpx.post(f"{base}/v1/models/{NAME}:predict", content=predict_body(1, 1), timeout=120,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200


def test_model_version_query_is_a_400_naming_it(srv):
    r = httpx.get(f"{srv['base']}/v2/models/{NAME}", params={"model_version": "1"}, timeout=5)
    assert r.status_code == 400 and "model_version" in r.json()["error"]


# ---- 2. a client that hangs up stops its work -----------------------------------------------------


def joined(lines: list[str], requests: int = 1) -> int:
    """Log lines of the decode loop taking `requests` request(s) from the queue."""
    return sum(e["message"].startswith(f"loop: {requests} request(s)") for e in logged(lines))


def test_client_that_hangs_up_stops_its_rows_and_is_counted_499(srv):
    base, lines = srv["base"], srv["lines"]
    closed = metric(base, "kandinsky_requests_total", CLOSED_V1)
    images = metric(base, "kandinsky_images_total")
    before = joined(lines)
    sock = raw_request(srv["port"], "POST", f"/v1/models/{NAME}:predict", predict_body(8, 3))
    wait_for(lambda: joined(lines) > before)
    sock.close()  # the client hangs up while its 8 images are being sampled
    wait_for(lambda: metric(base, "kandinsky_requests_total", CLOSED_V1) == closed + 1)
    # The next request is served, and the abandoned one never completed its images.
    r = httpx.post(f"{base}/v1/models/{NAME}:predict", content=predict_body(1, 4), timeout=120,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert metric(base, "kandinsky_images_total") == images + 1
    assert any("stopped: its requester gave up" in e["message"] for e in logged(lines))


def test_hang_up_beside_a_partner_in_the_decode_leaves_the_partner_its_own_images(srv):
    base, port, lines = srv["base"], srv["port"], srv["lines"]
    closed = metric(base, "kandinsky_requests_total", CLOSED_V1)
    images = metric(base, "kandinsky_images_total")
    results: dict[str, httpx.Response] = {}

    def post(key: str, body: bytes) -> None:
        results[key] = httpx.post(f"{base}/v1/models/{NAME}:predict", content=body, timeout=300,
                                  headers={"content-type": "application/json"})

    before = joined(lines)
    hasty = raw_request(port, "POST", f"/v1/models/{NAME}:predict", predict_body(2, 11))
    wait_for(lambda: joined(lines) > before)
    partner = threading.Thread(target=post, args=("partner", predict_body(1, 12, "собака")))
    partner.start()
    wait_for(lambda: joined(lines) > before + 1)  # both decode side by side now
    hasty.close()
    partner.join(300)
    assert results["partner"].status_code == 200
    wait_for(lambda: metric(base, "kandinsky_requests_total", CLOSED_V1) == closed + 1)
    post("alone", predict_body(1, 12, "собака"))
    assert results["alone"].status_code == 200
    # The partner's image is the one it gets alone: the hang-up did not disturb its rows.
    assert base64.b64decode(results["partner"].json()["images"][0]) == base64.b64decode(
        results["alone"].json()["images"][0]
    )
    # partner 1 + alone 1: the hasty request's two images were never finished.
    assert metric(base, "kandinsky_images_total") == images + 2


# ---- 3. client errors: one log line, escaped, in JSON ---------------------------------------------


def test_client_errors_log_one_line_each_no_traceback_and_no_forged_line(srv):
    base, lines = srv["base"], srv["lines"]
    start = len(lines)
    forged = "2026-11-30 12:00:00 app INFO FORGED admin logged in"
    cases = [
        (f"/v1/models/{NAME}:predict", b"", 400),
        (f"/v1/models/{NAME}:predict", b"{not json", 400),
        ("/v1/models/nope:predict", predict_body(1, 1), 404),
        ("/v1/models/x%0A" + forged.replace(" ", "%20") + ":predict", predict_body(1, 1), 404),
    ]
    for path, body, status in cases:
        r = httpx.post(base + path, content=body, headers={"content-type": "application/json",
                                                           "x-request-id": "req-42"}, timeout=10)
        assert r.status_code == status, (path, r.text)
        assert r.headers["x-request-id"] == "req-42"
    def ours(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in entries if e.get("logger") == "app.access" and e.get("request_id") == "req-42"]

    wait_for(lambda: len(ours(logged(lines[start:]))) >= len(cases))
    new = list(lines[start:])
    assert not any("Traceback" in line for line in new), "".join(new)
    for line in new:
        assert not line.startswith("2026-11-30 12:00:00"), line  # the forged text stayed inside a record
        if "FORGED" in line:
            assert isinstance(json.loads(line), dict)  # one record, the line break escaped inside it
    access = ours(logged(new))
    assert [e["status"] for e in access] == [400, 400, 404, 404]
    assert access[-1]["path"].startswith("/v1/models/x\n2026-11-30")
    for entry in access:
        assert entry["method"] == "POST" and entry["protocol"] == "v1"
        assert entry["duration_ms"] >= 0 and entry["route"]
    errors = [e for e in logged(new) if e["level"] == "ERROR"]
    assert errors == []


def test_prompts_stay_out_of_info_logs(srv):
    base, lines = srv["base"], srv["lines"]
    start = len(lines)
    secret = "секретный-запрос-42"
    r = httpx.post(f"{base}/v1/models/{NAME}:predict", content=predict_body(1, 2, secret), timeout=120,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert not any(secret in line for line in lines[start:])


# ---- 4. lax input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status", "needle"),
    [
        (b'{"instances": 5, "instances": [{"query": "a"}]}', "application/json", 400, "duplicate key"),
        (b'{"instances": [{"query": "a"}]}', "text/plain", 415, "text/plain"),
        (b'{"instances": [{"query": "\xc3"}]}', "application/json", 400, "not valid UTF-8 at byte 26"),
    ],
)
def test_lax_input_is_refused_naming_the_problem(srv, body, content_type, status, needle):
    r = httpx.post(f"{srv['base']}/v1/models/{NAME}:predict", content=body,
                   headers={"content-type": content_type}, timeout=10)
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_a_body_that_does_not_arrive_gets_408_and_the_connection_closes(srv):
    sock = raw_request(srv["port"], "POST", f"/v1/models/{NAME}:predict", predict_body(1, 1),
                       send_body=False)
    sock.sendall(b'{"instances"')  # ... and nothing more
    status, data = read_response(sock)  # returns only once the server closes the connection
    sock.close()
    assert status == 408 and b"did not arrive within 1 s" in data


def test_an_oversized_body_gets_the_413_rather_than_a_reset(srv):
    body = b'{"instances": [{"query": "' + b"a" * (4 * BODY_LIMIT) + b'"}]}'
    sock = raw_request(srv["port"], "POST", f"/v1/models/{NAME}:predict", body)  # sendall of it all
    status, data = read_response(sock)
    sock.close()
    assert status == 413 and f"limit of {BODY_LIMIT} bytes".encode() in data
