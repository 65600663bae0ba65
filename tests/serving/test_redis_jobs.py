"""Jobs on Redis (SPEC sections 7 and 11) through real processes on loopback: a `redis-server`, an `api`
replica (no weights) and `worker` replicas, all with `--redis_url`.

- a job submitted on one replica is polled, listed and streamed on another; the stream, left after two
  progress events, is resumed with `Last-Event-ID` on the first replica once the job ended: the events
  it missed, then the result, which is the seed's images;
- a job running on the worker is cancelled from the api replica: it stops, its queue entry goes, and
  DELETE again is a 409 on either replica;
- an `Idempotency-Key` is one job across replicas (also when two replicas get it at the same moment);
- the worker running an 8-image job with another queued behind it is killed: a survivor finishes
  both, each job ends exactly once, named after the survivor;
- a worker paused past its lease (SIGSTOP) while another takes over: one result, the new owner's;
- with `--max_deliveries 1`, a job whose worker is lost ends `failed`, saying why.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support import RedisServer, in_process, replica, replica_flags, seeded_body

body, flags = seeded_body, replica_flags

NAME = "kandinsky"
JOBS = f"/v1/models/{NAME}/jobs"


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, redis_srv: RedisServer) -> Iterator[dict[str, Any]]:
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "worker-0")) as srv:
        yield srv


def submit(base: str, payload: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(base + JOBS, json=payload, headers=headers, timeout=30)


def job(base: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}{JOBS}/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(base: str, job_id: str, check: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = job(base, job_id)
        if check(view):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.1)


def events(base: str, job_id: str, *, last_id: str | None = None, stop: Any = None
           ) -> list[tuple[str | None, str, Any]]:
    """(id, event, data) of a job's stream until its final event, or until `stop(events so far)`."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    got: list[tuple[str | None, str, Any]] = []
    with httpx.stream("GET", f"{base}{JOBS}/{job_id}/events", headers=headers, timeout=120) as r:
        assert r.status_code == 200
        fields: dict[str, str] = {}
        for line in r.iter_lines():
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                continue
            if "event" not in fields:
                continue
            got.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
            fields = {}
            if got[-1][1] in ("succeeded", "failed", "cancelled") or (stop is not None and stop(got)):
                break
    return got


def images(result: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(b) for b in result["images"]]


def finals(redis_srv: RedisServer, job_id: str) -> list[str]:
    client = redis.Redis.from_url(redis_srv.url)
    entries = client.xrange(f"kandinsky:{NAME}:jobevents:{job_id}")
    return [f[b"event"].decode() for _, f in entries
            if f[b"event"] in (b"succeeded", b"failed", b"cancelled")]


def test_a_job_is_followed_and_answered_on_any_replica_and_its_stream_resumes(api, worker, tiny_model_dir):
    created = submit(api["base"], body(41, images=2))
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    # Streamed on the worker replica until two progress events, then resumed on the api replica.
    first = events(worker["base"], job_id, stop=lambda got: sum(e == "progress" for _, e, _ in got) >= 2)
    assert first[0][1] == "status" and first[0][0] is None  # the current status: no id
    progress = [(i, d) for i, e, d in first if e == "progress"]
    assert all(i is not None for i, _ in progress)
    last_id = progress[-1][0]
    wait_for(api["base"], job_id, lambda v: v["status"] == "succeeded")  # it goes on while nobody listens
    rest = events(api["base"], job_id, last_id=last_id)
    assert rest[0][1] == "status"
    resumed = [(i, e, d) for i, e, d in rest[1:]]
    assert resumed[-1][1] == "succeeded"
    stamps = [tuple(map(int, i.split("-"))) for i, _, _ in resumed]
    assert stamps == sorted(stamps) and stamps[0] > tuple(map(int, last_id.split("-")))
    steps = [d["step"] for _, e, d in resumed if e == "progress"]
    assert steps and steps[0] > progress[-1][1]["step"]  # what it missed, nothing it had
    assert steps == sorted(steps) and steps[-1] == 1024
    result = resumed[-1][2]
    assert images(result["predictions"][0] if "predictions" in result else result) == in_process(
        tiny_model_dir, 41, images=2)
    # Polled and listed alike on both replicas, naming the worker that ran it.
    views = [job(b, job_id) for b in (api["base"], worker["base"])]
    for view in views:
        assert view["status"] == "succeeded" and view["worker"] == "worker-0"
        assert view["result"] == result and view["progress"]["fraction"] == 1.0
    listed = [httpx.get(b + JOBS, timeout=30).json()["jobs"] for b in (api["base"], worker["base"])]
    assert listed[0] == listed[1] and listed[0][0]["id"] == job_id and listed[0][0]["result"] is None


def test_a_running_job_is_cancelled_from_another_replica(api, worker, redis_srv):
    job_id = submit(api["base"], body(42, images=8)).json()["id"]
    view = wait_for(worker["base"], job_id, lambda v: v["progress"]["step"] > 0)
    assert view["status"] == "running"
    r = httpx.delete(f"{api['base']}{JOBS}/{job_id}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    for base in (api["base"], worker["base"]):
        assert httpx.delete(f"{base}{JOBS}/{job_id}", timeout=30).status_code == 409
        assert job(base, job_id)["status"] == "cancelled"
    assert finals(redis_srv, job_id) == ["cancelled"]
    # The worker stopped it (its loop is free: a new job runs at once) and its queue entry is gone.
    deadline = time.monotonic() + 30
    while not any("request of 8 image(s) stopped" in line for line in worker["lines"]):
        assert time.monotonic() < deadline, "the worker never stopped the cancelled job"
        time.sleep(0.1)
    client = redis.Redis.from_url(redis_srv.url)
    while client.xpending(f"kandinsky:{NAME}:queue", "workers")["pending"]:
        assert time.monotonic() < deadline, "the cancelled job's entry was never acknowledged"
        time.sleep(0.2)
    after = submit(api["base"], body(43)).json()["id"]
    assert wait_for(api["base"], after, lambda v: v["status"] != "queued" and v["status"] != "running",
                    timeout=120)["status"] == "succeeded"


def test_an_idempotency_key_is_one_job_across_replicas(api, worker):
    a = submit(api["base"], body(44), key="order-17")
    assert a.status_code == 202
    b = submit(worker["base"], body(44), key="order-17")
    assert b.status_code == 200 and b.json()["id"] == a.json()["id"]
    other = submit(worker["base"], body(45), key="order-17")
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]
    # The same new key on both replicas at the same moment: one job.
    answers: list[httpx.Response] = []
    start = threading.Barrier(2)

    def race(base: str) -> None:
        start.wait()
        answers.append(submit(base, body(46), key="order-18"))

    threads = [threading.Thread(target=race, args=(base,)) for base in (api["base"], worker["base"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in answers) == [200, 202]
    assert answers[0].json()["id"] == answers[1].json()["id"]


@pytest.fixture
def no_worker(worker: dict[str, Any]) -> Iterator[None]:
    """The module's worker paused for the test (it would take the work the test means for others)."""
    worker["proc"].send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        worker["proc"].send_signal(signal.SIGCONT)


def wait_line(srv: dict[str, Any], text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in srv["lines"]):
        assert time.monotonic() < deadline, f"never logged: {text}"
        time.sleep(0.05)


@pytest.mark.long
def test_a_killed_worker_s_running_and_queued_jobs_finish_on_a_survivor(api, tiny_model_dir, redis_srv,
                                                                       no_worker):
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "doomed"), "--max_batch_images", "8") as doomed:
        big = submit(api["base"], body(47, images=8)).json()["id"]
        wait_line(doomed, "8 image(s) join")
        small = submit(api["base"], body(48, images=2)).json()["id"]
        time.sleep(1.0)  # in the middle of the decode; the small job waits for free slots
        assert job(api["base"], small)["status"] == "queued"
        doomed["proc"].send_signal(signal.SIGKILL)
        doomed["proc"].wait(10)
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "survivor")) as survivor:
        done = [wait_for(api["base"], j, lambda v: v["status"] == "succeeded", timeout=300)
                for j in (big, small)]
        assert [v["worker"] for v in done] == ["survivor", "survivor"]
        assert images(done[1]["result"]) == in_process(tiny_model_dir, 48, images=2)
        assert len(images(done[0]["result"])) == 8
        assert finals(redis_srv, big) == ["succeeded"] and finals(redis_srv, small) == ["succeeded"]
        assert any("taken over after its worker's lease lapsed" in line for line in survivor["lines"])


@pytest.mark.long
def test_a_worker_paused_past_its_lease_leaves_one_result_the_new_owner_s(api, tiny_model_dir, redis_srv,
                                                                        no_worker):
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "sleeper")) as sleeper:
        job_id = submit(api["base"], body(49, images=4)).json()["id"]
        wait_for(api["base"], job_id, lambda v: v["progress"]["step"] > 0)
        sleeper["proc"].send_signal(signal.SIGSTOP)
        try:
            with replica(tiny_model_dir, *flags(redis_srv, "worker", "new-owner")):
                view = wait_for(api["base"], job_id, lambda v: v["status"] == "succeeded", timeout=300)
        finally:
            sleeper["proc"].send_signal(signal.SIGCONT)
        wait_line(sleeper, "its lease was taken over", timeout=30)
        time.sleep(1.0)
        assert view["worker"] == "new-owner" and job(api["base"], job_id)["worker"] == "new-owner"
        assert finals(redis_srv, job_id) == ["succeeded"]
        assert images(view["result"]) == in_process(tiny_model_dir, 49, images=4)


@pytest.mark.long
def test_a_job_whose_worker_is_lost_on_every_delivery_fails_saying_why(api, tiny_model_dir, redis_srv,
                                                                      no_worker):
    once = ("--max_deliveries", "1")
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "lost"), *once) as lost:
        job_id = submit(api["base"], body(50, images=4)).json()["id"]
        wait_line(lost, "4 image(s) join")
        lost["proc"].send_signal(signal.SIGKILL)
        lost["proc"].wait(10)
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "judge"), *once):
        view = wait_for(api["base"], job_id, lambda v: v["status"] == "failed", timeout=120)
    assert "--max_deliveries 1" in view["error"] and "worker was lost" in view["error"]
    assert finals(redis_srv, job_id) == ["failed"]



@pytest.mark.long
def test_a_stopping_worker_hands_its_running_job_back_at_once(api, tiny_model_dir, redis_srv, no_worker):
    """SIGTERM with --drain_timeout 1: the job cannot finish in time, so it goes back to the queue at
    once; a worker with a 30 s lease takes it over well before that lease would have lapsed."""
    lease = ("--job_lease", "30")
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "heir"), *lease) as heir:
        heir["proc"].send_signal(signal.SIGSTOP)  # so that the leaver takes the job
        try:
            with replica(tiny_model_dir, *flags(redis_srv, "worker", "leaver"), *lease,
                         "--drain_timeout", "1") as leaver:
                job_id = submit(api["base"], body(51, images=4)).json()["id"]
                wait_for(api["base"], job_id, lambda v: v["progress"]["step"] > 0)
                leaver["proc"].send_signal(signal.SIGTERM)
                assert leaver["proc"].wait(30) == 0
                left = time.monotonic()
                assert any("handing 1 request(s) back" in line for line in leaver["lines"])
        finally:
            heir["proc"].send_signal(signal.SIGCONT)
        view = wait_for(api["base"], job_id, lambda v: v["worker"] == "heir", timeout=60)
        assert time.monotonic() - left < 20  # the lease (30 s) never had to lapse
        view = wait_for(api["base"], job_id, lambda v: v["status"] == "succeeded", timeout=120)
        assert images(view["result"]) == in_process(tiny_model_dir, 51, images=4)
        assert finals(redis_srv, job_id) == ["succeeded"]


@pytest.mark.long
def test_a_worker_renders_previews_only_while_some_replica_streams_the_job(api, worker, redis_srv):
    payload = body(52, images=2)
    payload["instances"][0]["params"]["preview_every"] = 1
    unwatched = submit(api["base"], payload).json()["id"]
    wait_for(api["base"], unwatched, lambda v: v["status"] == "succeeded")
    streamed = events(api["base"], submit(api["base"], payload).json()["id"])
    client = redis.Redis.from_url(redis_srv.url)
    entries = client.xrange(f"kandinsky:{NAME}:jobevents:{unwatched}")
    assert [f[b"event"] for _, f in entries].count(b"preview") == 0
    assert sum(e == "preview" for _, e, _ in streamed) >= 2
    assert streamed[-1][1] == "succeeded"


@pytest.mark.long
def test_a_redis_outage_shorter_than_the_lease_costs_a_running_job_nothing(api, tiny_model_dir, redis_srv,
                                                                         no_worker):
    """The worker keeps decoding while Redis is gone (taking new work backs off; it is never a broken
    loop), and records the result once Redis is back: the same run, no takeover, one final event."""
    with replica(tiny_model_dir, *flags(redis_srv, "worker", "steady"), "--job_lease", "30") as steady:
        job_id = submit(api["base"], body(53, images=8)).json()["id"]
        wait_for(api["base"], job_id, lambda v: v["progress"]["step"] > 0)
        redis_srv.stop()
        try:
            wait_line(steady, "taking work from Redis failed", timeout=10)
            time.sleep(1.0)
        finally:
            redis_srv.start()
        view = wait_for(api["base"], job_id, lambda v: v["status"] == "succeeded", timeout=180)
        assert view["worker"] == "steady" and len(images(view["result"])) == 8
        assert finals(redis_srv, job_id) == ["succeeded"]
        assert not any("taken over" in line or "decode loop failed" in line for line in steady["lines"])
        client = redis.Redis.from_url(redis_srv.url)
        assert client.hget(f"kandinsky:{NAME}:work:{job_id}", "deliveries") == b"1"
