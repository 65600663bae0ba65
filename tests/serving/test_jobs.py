"""Jobs (SPEC section 7) through the real server process: streams, polling, cancel, expiry, idempotency.

One server (tiny model, JSON logs, a 2-request queue, 1 s keep-alives) serves the module; a second one,
keeping at most 2 finished jobs for 5 s, checks the bounds. Streams are read with httpx-sse, the way the
command-line client reads them.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.support import serve

NAME = "kandinsky"
TTL_S = 5
MAX_JOBS = 2
JOBS = f"/v1/models/{NAME}/jobs"


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    # Eight row slots: an 8-image job (occupy_worker) fills the decode, so what comes next waits queued.
    yield from serve(tiny_model_dir, "--log_format", "json", "--queue_size", "2", "--keepalive", "1",
                     "--max_batch_images", "8")


@pytest.fixture
def bounded(tiny_model_dir):
    yield from serve(tiny_model_dir, "--log_format", "json", "--job_ttl", str(TTL_S),
                     "--max_jobs", str(MAX_JOBS))


def body(images: int, seed: int, query: str = "кот", **params: Any) -> dict[str, Any]:
    p = {"images_to_gen": images, "images_to_cherry_pick": min(images, 2), "super_res": False,
         "seed": seed, **params}
    return {"instances": [{"query": query, "params": p}]}


def submit(base: str, payload: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(base + JOBS, json=payload, headers=headers, timeout=30)


def get(base: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}{JOBS}/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def wait_status(base: str, job_id: str, *statuses: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(get(base, job_id))
        return seen["status"] in statuses

    wait_for(reached)
    return seen


def metric(base: str, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def predict(base: str, payload: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/models/{NAME}:predict", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def same_result(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("images", "clip_scores", "seed"):
        assert got[key] == want[key], key
    # Same codes; ppl sums logits computed in a batch of another size, so its last digits may differ.
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


def stream_events(base: str, payload: dict[str, Any]) -> list[tuple[str, Any]]:
    events = []
    with httpx.Client(timeout=300) as client, connect_sse(
        client, "POST", base + JOBS, json=payload, headers={"accept": "text/event-stream"}
    ) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            events.append((sse.event, json.loads(sse.data)))
    return events


def occupy_worker(base: str, seed: int = 900) -> str:
    """A running job that fills the eight slots of the decode for several seconds; returns its id."""
    job_id = submit(base, body(8, seed)).json()["id"]
    wait_status(base, job_id, "running")
    return job_id


# ---- the stream -----------------------------------------------------------------------------------


def test_streamed_job_sends_status_rising_progress_previews_then_one_final_equal_to_predict(srv):
    base = srv["base"]
    payload = body(2, 31, preview_every=8)
    events = stream_events(base, payload)
    names = [name for name, _ in events]
    assert names[0] == "status" and events[0][1]["status"] in ("queued", "running")
    assert events[0][1]["result"] is None
    assert names[-1] == "succeeded" and names.count("succeeded") == 1
    assert not {"failed", "cancelled"} & set(names)
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(set(steps)) and len(steps) >= 8 and steps[-1] == 1024
    assert all(data["steps"] == 1024 for name, data in events if name == "progress")
    # A preview after every 8 image rows of 32 tokens is due at steps 256, 512, 768 and 1024; a renderer
    # that falls behind skips to the newest grid (coalescing), but the finished grid always comes.
    previews = [data for name, data in events if name == "preview"]
    shown = [p["step"] for p in previews]
    assert shown == sorted(set(shown)) and set(shown) <= {256, 512, 768, 1024} and shown[-1] == 1024
    for p in previews:
        assert p["instance"] == 0 and len(p["images"]) == 2
        assert base64.b64decode(p["images"][0])[:3] == b"\xff\xd8\xff"  # JPEG
    same_result(events[-1][1], predict(base, payload))


def test_preview_rows_not_sampled_yet_are_grey(srv):
    import io

    import numpy as np
    from PIL import Image

    events = stream_events(srv["base"], body(1, 32, preview_every=4))
    # The first partial preview (due every 4 rows; a busy renderer may skip some, never all).
    first = next(data for name, data in events if name == "preview" and data["step"] < 1024)
    rows = first["step"] // 32
    assert first["step"] % (4 * 32) == 0 and 4 <= rows < 32
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["images"][0]))).convert("RGB"))
    assert pixels.shape == (256, 256, 3)
    below = pixels[rows * 8 + 4 :].astype(int)  # rows of 8 px each are drawn; JPEG blurs the edge
    assert np.abs(below - 128).max() <= 6
    assert pixels[: rows * 8 - 4].std() > 20  # the sampled rows are an image, not grey


def test_polled_job_answers_202_with_location_then_its_result_equals_predict(srv):
    base = srv["base"]
    payload = body(1, 33)
    r = submit(base, payload)
    assert r.status_code == 202
    created = r.json()
    assert created["status"] == "queued" and set(created) == {"id", "status", "created"}
    assert r.headers["location"] == f"{JOBS}/{created['id']}"
    done = wait_status(base, created["id"], "succeeded")
    assert done["progress"] == {"step": 1024, "steps": 1024, "fraction": 1.0}
    assert done["started"] >= done["created"] and done["finished"] >= done["started"]
    assert done["queue_position"] is None and done["error"] is None
    same_result(done["result"], predict(base, payload))
    listed = httpx.get(base + JOBS, timeout=10).json()["jobs"]
    assert listed[0]["id"] == created["id"] and listed[0]["result"] is None


def test_late_subscriber_gets_the_current_status_first_and_a_finished_job_closes(srv):
    base = srv["base"]
    job_id = submit(base, body(4, 34)).json()["id"]
    wait_for(lambda: get(base, job_id)["progress"]["step"] > 0)
    url = f"{base}{JOBS}/{job_id}/events"
    with httpx.Client(timeout=300) as client, connect_sse(client, "GET", url) as s:
        events = [(e.event, json.loads(e.data)) for e in s.iter_sse()]
    assert events[0][0] == "status" and events[0][1]["status"] == "running"
    assert events[0][1]["progress"]["step"] > 0
    assert events[-1][0] == "succeeded"
    # Once finished: the status, the final event, and the stream closes.
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", url) as s:
        again = [(e.event, json.loads(e.data)) for e in s.iter_sse()]
    assert [name for name, _ in again] == ["status", "succeeded"]
    assert again[1][1] == events[-1][1]


def test_stream_sends_keep_alive_comments(srv):
    base = srv["base"]
    blocker = occupy_worker(base, 901)
    with socket.create_connection(("127.0.0.1", srv["port"]), timeout=30) as sock:
        payload = json.dumps(body(1, 35)).encode()
        sock.sendall(
            f"POST {JOBS} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        received = b""
        deadline = time.monotonic() + 20
        while b": keep-alive" not in received and time.monotonic() < deadline:
            received += sock.recv(65536)
    assert b": keep-alive" in received
    httpx.delete(f"{base}{JOBS}/{blocker}", timeout=10)


# ---- cancel ---------------------------------------------------------------------------------------


def test_cancelled_queued_job_never_runs(srv):
    base = srv["base"]
    blocker = occupy_worker(base, 902)
    images = metric(base, "kandinsky_images_total")
    queued = submit(base, body(2, 36)).json()["id"]
    assert get(base, queued)["queue_position"] == 0
    r = httpx.delete(f"{base}{JOBS}/{queued}", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert metric(base, "kandinsky_queue_depth") == 0  # it left the queue at once
    assert wait_status(base, blocker, "succeeded")["status"] == "succeeded"
    assert metric(base, "kandinsky_images_total") == images + 8  # the blocker's only
    assert get(base, queued)["status"] == "cancelled" and get(base, queued)["started"] is None
    assert httpx.delete(f"{base}{JOBS}/{queued}", timeout=10).status_code == 409


def test_cancelled_running_job_stops_within_a_tick_and_its_partner_gets_its_own_images(srv):
    base = srv["base"]
    blocker = occupy_worker(base, 903)
    images = metric(base, "kandinsky_images_total")
    doomed = submit(base, body(4, 37)).json()["id"]
    partner_body = body(1, 38, "собака")
    partner = submit(base, partner_body).json()["id"]
    wait_status(base, doomed, "running")
    wait_status(base, partner, "running")  # both decode side by side once the blocker's slots free
    wait_for(lambda: get(base, doomed)["progress"]["step"] >= 64)
    step_at_cancel = get(base, doomed)["progress"]["step"]
    r = httpx.delete(f"{base}{JOBS}/{doomed}", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    done = wait_status(base, partner, "succeeded")
    same_result(done["result"], predict(base, partner_body))
    wait_status(base, blocker, "succeeded")
    # blocker 8 + partner 1 + the predict 1: the cancelled job's 4 images were never finished.
    assert metric(base, "kandinsky_images_total") == images + 10
    assert get(base, doomed)["progress"]["step"] <= step_at_cancel + 32  # no progress past the next tick


def test_a_stream_whose_client_leaves_cancels_its_job_but_a_polled_job_survives_its_subscriber(srv):
    base, port = srv["base"], srv["port"]
    blocker = occupy_worker(base, 904)
    payload = json.dumps(body(2, 39)).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {JOBS} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    received = b""
    while b"event: status" not in received:
        received += sock.recv(65536)
    streamed_id = json.loads(received.split(b"data: ", 1)[1].split(b"\r\n", 1)[0])["id"]
    polled = submit(base, body(1, 40)).json()["id"]
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{base}{JOBS}/{polled}/events") as s:
        first = next(s.iter_sse())
        assert first.event == "status"
    sock.close()  # the streaming client goes away
    assert wait_status(base, streamed_id, "cancelled")["started"] is None
    assert wait_status(base, polled, "succeeded")["status"] == "succeeded"
    wait_status(base, blocker, "succeeded")


# ---- bounds ---------------------------------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after_and_creates_no_job(srv):
    base = srv["base"]
    blocker = occupy_worker(base, 905)
    queued = [submit(base, body(1, 41 + n)).json()["id"] for n in range(2)]
    r = submit(base, body(1, 50))
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "queue is full" in r.json()["error"]
    ids = {job["id"] for job in httpx.get(base + JOBS, timeout=10).json()["jobs"]}
    assert set(queued) <= ids
    for job_id in (*queued, blocker):
        httpx.delete(f"{base}{JOBS}/{job_id}", timeout=10)


@pytest.mark.long
def test_finished_jobs_beyond_max_jobs_and_past_the_ttl_are_dropped(bounded):
    base = bounded["base"]
    # Submitted together, they finish within moments of each other, in submission order.
    ids = [submit(base, body(1, 60 + n)).json()["id"] for n in range(MAX_JOBS + 2)]
    wait_status(base, ids[-1], "succeeded")
    kept = [job["id"] for job in httpx.get(base + JOBS, timeout=10).json()["jobs"]]
    assert kept == ids[::-1][:MAX_JOBS]  # the newest, newest first; the oldest finished were dropped
    assert httpx.get(f"{base}{JOBS}/{ids[0]}", timeout=10).status_code == 404
    assert metric(base, "kandinsky_jobs", '{status="succeeded"}') == MAX_JOBS
    # The timer expires them after the TTL without a request touching the jobs.
    wait_for(lambda: metric(base, "kandinsky_jobs", '{status="succeeded"}') == 0, timeout=TTL_S * 3)
    assert httpx.get(f"{base}{JOBS}/{ids[-1]}", timeout=10).status_code == 404
    assert httpx.get(base + JOBS, timeout=10).json()["jobs"] == []


def test_idempotency_key_returns_the_same_job_and_refuses_another_body(srv):
    base = srv["base"]
    first = submit(base, body(1, 70), **{"Idempotency-Key": "order-70"})
    assert first.status_code == 202
    again = submit(base, body(1, 70), **{"Idempotency-Key": "order-70"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = submit(base, body(1, 71), **{"Idempotency-Key": "order-70"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]
    wait_status(base, first.json()["id"], "succeeded")


# ---- errors and metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "status", "needle"),
    [
        (f"{JOBS}/nope", "GET", 404, "unknown or expired"),
        (f"{JOBS}/nope", "DELETE", 404, "unknown or expired"),
        (f"{JOBS}/nope/events", "GET", 404, "unknown or expired"),
        ("/v1/models/other/jobs", "GET", 404, "other"),
    ],
)
def test_unknown_job_or_model_is_404(srv, path, method, status, needle):
    r = httpx.request(method, srv["base"] + path, timeout=10)
    assert r.status_code == status and needle in r.json()["error"]


def test_bad_job_body_is_400_naming_the_field_like_predict(srv):
    r = submit(srv["base"], body(1, 1, preview_every=33))
    assert r.status_code == 400
    assert r.json()["error"].startswith("instances[0].params.preview_every: must be <= 32")


def test_job_metrics_count_statuses_and_events(srv):
    base = srv["base"]
    before = metric(base, "kandinsky_job_events_total", '{event="succeeded"}')
    submitted = metric(base, "kandinsky_requests_total", '{code="202",protocol="jobs",tenant=""}')
    job_id = submit(base, body(1, 80)).json()["id"]
    wait_status(base, job_id, "succeeded")
    assert metric(base, "kandinsky_job_events_total", '{event="succeeded"}') == before + 1
    assert metric(base, "kandinsky_requests_total", '{code="202",protocol="jobs",tenant=""}') == submitted + 1
    assert metric(base, "kandinsky_jobs", '{status="succeeded"}') >= 1
