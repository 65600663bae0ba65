"""Event streams cost bounded memory (SPEC section 7, issue 19 item 1).

Each event is encoded once and every subscriber sends the same bytes object; what a subscriber that does
not read holds is bounded (newest progress, a byte-bounded tail of previews, the final event); previews
are wanted only while a stream is open. Through the real server: 40 connections that open a finished
job's stream and never read add little to the server's memory (read from /proc) while health answers,
and a client that reads nothing for `--send_timeout` seconds is disconnected and counted.
"""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from app.serving.core.jobs import Jobs
from app.serving.core.types import (
    InstanceResult,
    JobEvent,
    JobEventName,
    JobRecord,
    Preview,
    RequestResult,
    StepProgress,
)
from app.serving.protocols.jobs import encode_event
from app.serving.queue.memory_jobs import SUBSCRIBER_PENDING_BYTES, MemoryJobStore
from tests.support import metric, serve

NAME = "kandinsky"
JOBS = f"/v1/models/{NAME}/jobs"
SEND_TIMEOUT_S = 15
IDLE_SUBSCRIBERS = 40
#: The issue's target: 40 idle subscribers of a 22 MB result add at most this much to the server.
MAX_GROWTH_MB = 100
#: Readiness must answer meanwhile: a liveness bound, not a latency measurement (seconds).
HEALTH_BOUND_S = 2.0
#: 16 upscaled PNGs: a result of about 22 MB on the tiny model.
BIG = {"instances": [{"query": "кот", "params": {"images_to_gen": 16, "images_to_cherry_pick": 16,
                                                 "super_res": True, "format": "png", "seed": 3}}]}


# ---- the core, in-process -------------------------------------------------------------------------------


class FakeService:
    """What `Jobs` asks of the Service: each submitted request waits for the test to finish it."""

    def __init__(self) -> None:
        self.results: dict[int, asyncio.Future[RequestResult]] = {}
        self.wants_previews: Any = None

    def parse(self, payload: Any) -> Any:
        return payload

    def request(self, instances: Any, protocol: str, tenant: str | None) -> Any:
        return SimpleNamespace(instances=[SimpleNamespace(params=SimpleNamespace(images_to_gen=1))], images=1)

    async def submit(self, request: Any, listener: Any = None, wants_previews: Any = None) -> Any:
        work = SimpleNamespace(id=len(self.results))
        self.results[work.id] = asyncio.get_running_loop().create_future()
        self.wants_previews = wants_previews
        return work

    async def result(self, work: Any) -> RequestResult:
        return await self.results[work.id]

    async def position(self, work: Any) -> int:
        return 0

    def cancel(self, work: Any) -> None:
        pass


def result_of(images: int, size: int) -> RequestResult:
    return RequestResult([InstanceResult(["A" * size] * images, "png", [0.5] * images, [1.0] * images, 7,
                                         {"queue": 0.0})], queue_seconds=0.0)


def fake_jobs() -> tuple[Jobs, FakeService]:
    service = FakeService()
    store = MemoryJobStore(ttl=60, max_finished=10)
    return Jobs(service, store, ttl=60, encode=encode_event), service  # type: ignore[arg-type]


async def read_all(jobs: Jobs, record: JobRecord) -> list[JobEvent]:
    return [e async for e in jobs.events(record) if e is not None]


async def test_every_subscriber_of_a_job_sends_the_same_bytes_object_of_its_final_event():
    jobs, service = fake_jobs()
    record, _ = await jobs.submit({"any": "body"}, None)
    live = asyncio.ensure_future(read_all(jobs, record))
    await asyncio.sleep(0.01)  # subscribed
    service.results[0].set_result(result_of(2, 1000))
    live_events = await live
    late_one, late_two = await read_all(jobs, record), await read_all(jobs, record)
    final = live_events[-1]
    assert final.name == JobEventName.SUCCEEDED
    assert late_one[-1] is final and late_two[-1] is final
    wire = final.encoded(encode_event)
    assert late_two[-1].encoded(encode_event) is wire
    assert final.data is None  # sealed: the result is held once, as the bytes the streams send
    assert wire.startswith(b"event: succeeded\r\ndata: {") and wire.endswith(b"}\r\n\r\n")
    assert record.result_bytes == len(wire) and jobs.store.result_bytes() == len(wire)
    # The status each subscriber gets first is its own (the job as it is when it connects).
    assert late_one[0].name == JobEventName.STATUS and late_one[0] is not late_two[0]


async def test_a_subscriber_that_does_not_read_holds_the_newest_progress_and_a_bounded_tail_then_the_end():
    store = MemoryJobStore(ttl=60, max_finished=10)
    record = JobRecord("j", "f", None, 0.0, [1])
    store.add(record)
    subscription = store.subscribe(record)
    for step in range(32, 1025, 32):
        store.publish(record, JobEvent(JobEventName.PROGRESS, StepProgress(step, 1024), wire=b"p" * 60))
    previews = [JobEvent(JobEventName.PREVIEW, Preview(n, 0, []), wire=b"v" * (256 << 10))
                for n in range(100)]
    for preview in previews:
        store.publish(record, preview)
    final = JobEvent(JobEventName.SUCCEEDED, None, wire=b"r" * (SUBSCRIBER_PENDING_BYTES * 2))
    store.publish(record, final)
    held = list(subscription.sub.pending)  # what the subscriber holds: references to the shared events
    assert sum(e.size for e in held if e.name == JobEventName.PREVIEW) <= SUBSCRIBER_PENDING_BYTES
    got = [await subscription.next(timeout=1) for _ in held]
    progress = [e for e in got if e is not None and e.name == JobEventName.PROGRESS]
    assert len(progress) == 1 and progress[0].data.step == 1024  # coalesced to the newest
    kept = [e for e in got if e is not None and e.name == JobEventName.PREVIEW]
    assert kept == previews[-len(kept):] and 0 < len(kept) < len(previews)  # the newest, in order
    assert got[-1] is final  # never dropped, though alone it is over the bound
    assert not store.watched("j")  # reading the final event unsubscribed it


async def test_a_stream_waiting_for_events_gets_a_keep_alive_cue_and_loses_nothing():
    jobs, service = fake_jobs()
    record, _ = await jobs.submit({"any": "body"}, None)
    stream = jobs.events(record, idle=0.05)
    assert (await anext(stream)).name == JobEventName.STATUS
    assert await anext(stream) is None  # nothing for `idle` seconds
    service.results[0].set_result(result_of(1, 10))
    await asyncio.sleep(0.01)
    assert (await anext(stream)).name == JobEventName.SUCCEEDED
    await stream.aclose()


async def test_previews_are_wanted_only_while_the_job_has_an_open_stream():
    jobs, service = fake_jobs()
    record, _ = await jobs.submit({"any": "body"}, None)
    wants = service.wants_previews
    assert wants() is False  # polled only: nobody would see a preview
    stream = jobs.events(record)
    await anext(stream)
    assert wants() is True
    await stream.aclose()
    assert wants() is False


# ---- the real server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    yield from serve(tiny_model_dir, "--send_timeout", str(SEND_TIMEOUT_S))


@pytest.fixture(scope="module")
def big_job(srv) -> dict[str, Any]:
    """A finished job of 16 upscaled PNGs: its id and the size of its GET body."""
    base = srv["base"]
    r = httpx.post(base + JOBS, json=BIG, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 600
    while (got := httpx.get(f"{base}{JOBS}/{job_id}", timeout=60)).json()["status"] != "succeeded":
        assert got.json()["status"] in ("queued", "running") and time.monotonic() < deadline, got.text
        time.sleep(1)
    assert len(got.json()["result"]["images"]) == 16
    return {"id": job_id, "bytes": len(got.content)}


def status_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def open_idle_stream(port: int, job_id: str) -> socket.socket:
    """A client that opens the job's stream and never reads it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {JOBS}/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def wait_rss_settles(pid: int, limit_s: float = 15.0) -> float:
    """The highest RSS seen until the server has written what the sockets take (three samples within
    1 MB)."""
    samples = [status_mb(pid, "VmRSS")]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        samples.append(status_mb(pid, "VmRSS"))
        if max(samples[-3:]) - min(samples[-3:]) < 1 and len(samples) >= 3:
            break
    return max(samples)  # the peak, not only where it settled


def health_answers(base: str) -> None:
    """Readiness answers 200, each probe within a liveness bound (a bound, not a latency measurement)."""
    for _ in range(5):
        assert httpx.get(base + "/v2/health/ready", timeout=HEALTH_BOUND_S).status_code == 200


def test_forty_idle_subscribers_of_a_22_mb_result_add_little_memory_and_health_answers(srv, big_job):
    pid, base = srv["proc"].pid, srv["base"]
    assert big_job["bytes"] > 15_000_000  # the attack needs a large result (about 22 MB)
    before = status_mb(pid, "VmRSS")
    socks = [open_idle_stream(srv["port"], big_job["id"]) for _ in range(IDLE_SUBSCRIBERS)]
    try:
        during = wait_rss_settles(pid)
        health_answers(base)
        # Before: each idle subscriber held its own encoding and a copy in its socket's buffer (61 MB each).
        assert during - before <= MAX_GROWTH_MB, (before, during)
    finally:
        for sock in socks:
            sock.close()
    assert httpx.get(base + "/v2/health/ready", timeout=30).status_code == 200
    assert status_mb(pid, "VmRSS") - before <= MAX_GROWTH_MB


def server_has_connection(pid: int, client_port: int) -> bool:
    import psutil

    return any(c.raddr and c.raddr.port == client_port for c in psutil.Process(pid).connections("tcp"))


@pytest.mark.long
def test_a_client_that_reads_nothing_is_disconnected_after_send_timeout_and_counted(srv, big_job):
    base, pid = srv["base"], srv["proc"].pid
    dropped = metric(base, "kandinsky_event_subscribers_dropped_total", "")
    sock = open_idle_stream(srv["port"], big_job["id"])
    client_port = sock.getsockname()[1]
    try:
        deadline = time.monotonic() + SEND_TIMEOUT_S + 30
        while metric(base, "kandinsky_event_subscribers_dropped_total", "") < dropped + 1:
            assert time.monotonic() < deadline, "not disconnected within --send_timeout + 30 s"
            assert server_has_connection(pid, client_port)  # held until then
            time.sleep(0.5)
        # The server let go of the socket though the client still reads nothing (closing alone would
        # wait for a peer that never reads).
        deadline = time.monotonic() + 10
        while server_has_connection(pid, client_port):
            assert time.monotonic() < deadline, "the server still holds the connection"
            time.sleep(0.2)
        # Reading now ends early (what the kernels had buffered, then EOF or a reset): not the event.
        sock.settimeout(30)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert 0 < received < big_job["bytes"]
    assert metric(base, "kandinsky_event_subscribers_dropped_total", "") == dropped + 1
    log = "".join(srv["lines"])  # aborted, not left to a close that waits for the peer
    assert "could not reach the connection" not in log and "without completing response" not in log
    assert httpx.get(base + "/v2/health/ready", timeout=30).status_code == 200
