"""Retention of finished jobs by bytes and by count, and listing pages (SPEC section 7, issue 19 items 2, 6).

One real server keeps results up to `MAX_JOB_BYTES` (room for two of this module's results, not three)
and at most `MAX_JOBS` finished records. Three results finish in turn, then a flood of 300 jobs is
submitted and cancelled at once: the oldest result expires (its record stays and says so), the other
two and their bytes survive the flood, and the kept bytes stay within the bound. The listing then pages
through the kept records with `limit` and `cursor`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from app.serving.core.types import JobEvent, JobEventName, JobRecord, JobStatus
from app.serving.queue.memory_jobs import MemoryJobStore
from tests.support import metric, serve

NAME = "kandinsky"
JOBS = f"/v1/models/{NAME}/jobs"
#: One upscaled PNG: its job's result is about 1.4 MB on the wire on the tiny model.
LARGE = {"images_to_gen": 1, "images_to_cherry_pick": 1, "super_res": True, "format": "png"}
#: Room for two of those results, not three.
MAX_JOB_BYTES = 3_000_000
MAX_JOBS = 100
FLOOD = 300


# ---- the store, in-process ------------------------------------------------------------------------------


def finished(store: MemoryJobStore, job_id: str, status: JobStatus, result_bytes: int = 0,
             tenant: str | None = None) -> JobRecord:
    record = JobRecord(job_id, "f", None, 0.0, [1], tenant=tenant)
    store.add(record)
    record.status, record.finished_at = status, time.monotonic()
    if result_bytes:
        record.final = JobEvent(JobEventName.SUCCEEDED, None, wire=b"r" * result_bytes)
        record.result_bytes = result_bytes
    store.save(record)
    return record


async def test_the_oldest_result_expires_beyond_the_byte_bound_and_its_record_stays():
    store = MemoryJobStore(ttl=60, max_finished=10, max_result_bytes=1000)
    first = finished(store, "a", JobStatus.SUCCEEDED, 400)
    second = finished(store, "b", JobStatus.SUCCEEDED, 400)
    assert store.result_bytes() == 800 and not first.result_expired
    third = finished(store, "c", JobStatus.SUCCEEDED, 400)
    assert first.result_expired and first.final is None and first.result_bytes == 0
    assert store.get("a") is first  # the record stays
    assert second.holds_result and third.holds_result and store.result_bytes() == 800
    # Over the bound alone: not kept, and it pushes out no other.
    alone = finished(store, "d", JobStatus.SUCCEEDED, 2000)
    assert alone.result_expired and second.holds_result and third.holds_result
    assert store.result_bytes() == 800


async def test_the_count_bound_drops_cancelled_then_failed_jobs_before_any_kept_result():
    store = MemoryJobStore(ttl=60, max_finished=4, max_result_bytes=10_000)
    kept = finished(store, "kept", JobStatus.SUCCEEDED, 100)
    failed = finished(store, "failed", JobStatus.FAILED)
    for n in range(20):
        finished(store, f"cancelled-{n}", JobStatus.CANCELLED)
    store.expire()
    assert store.get("kept") is kept and store.get("failed") is failed
    assert [r.id for r in store.recent()] == ["cancelled-19", "cancelled-18", "failed", "kept"]
    for n in range(3):
        finished(store, f"failed-{n}", JobStatus.FAILED)
    store.expire()
    assert store.get("kept") is kept and store.result_bytes() == 100
    assert {r.status for r in store.recent()} == {JobStatus.SUCCEEDED, JobStatus.FAILED}


async def test_one_tenant_s_flood_drops_its_own_jobs_and_never_another_s_results():
    store = MemoryJobStore(ttl=60, max_finished=6, max_result_bytes=1000)
    theirs = [finished(store, f"b{n}", JobStatus.SUCCEEDED, 300, tenant="B") for n in range(2)]
    mine = [finished(store, f"a{n}", JobStatus.SUCCEEDED, 300, tenant="A") for n in range(3)]
    # Over 1000 bytes, A (holding as much as B or more, and the newcomer) loses its oldest, never B's
    assert [r.holds_result for r in mine] == [False, False, True] and all(r.holds_result for r in theirs)
    for n in range(20):
        finished(store, f"a-cancelled-{n}", JobStatus.CANCELLED, tenant="A")
    store.expire()
    assert all(store.get(r.id) is r and r.holds_result for r in theirs)
    assert len(store.recent(tenant="A")) == 4 and store.result_bytes() == 900
    assert [r.id for r in store.recent(tenant="A")] == ["a-cancelled-19", "a2", "a1", "a0"]


async def test_a_tenant_s_own_bounds_hold_while_the_totals_are_not_reached():
    store = MemoryJobStore(ttl=60, max_finished=100, max_result_bytes=10_000, tenant_max_finished=3,
                           tenant_max_result_bytes=500)
    other = finished(store, "b", JobStatus.SUCCEEDED, 400, tenant="B")
    mine = [finished(store, f"a{n}", JobStatus.SUCCEEDED, 400, tenant="A") for n in range(4)]
    store.expire()
    assert store.get("a0") is None and other.holds_result  # beyond A's three finished jobs
    assert [r.holds_result for r in mine[1:]] == [False, False, True]  # within A's 500 bytes
    assert store.result_bytes() == 800


# ---- the real server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    yield from serve(tiny_model_dir, "--max_job_bytes", str(MAX_JOB_BYTES), "--max_jobs", str(MAX_JOBS))


def body(seed: int, **params: Any) -> dict[str, Any]:
    return {"instances": [{"query": "кот", "params": {"seed": seed, **params}}]}


def submit(base: str, payload: dict[str, Any]) -> str:
    r = httpx.post(base + JOBS, json=payload, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def get(base: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}{JOBS}/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def finish(base: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while (job := get(base, job_id))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the job did not finish within 300 s"
        time.sleep(0.3)
    assert job["status"] == "succeeded", job
    return job


def kept_bytes(base: str) -> float:
    return metric(base, "kandinsky_job_result_bytes", "")


def final_event(base: str, job_id: str) -> tuple[str, Any]:
    url = f"{base}{JOBS}/{job_id}/events"
    with httpx.Client(timeout=60) as client, connect_sse(client, "GET", url) as src:
        events = [(sse.event, json.loads(sse.data)) for sse in src.iter_sse()]
    assert events[0][0] == "status" and len(events) == 2, [name for name, _ in events]
    return events[-1]


@pytest.fixture(scope="module")
def retained(srv) -> dict[str, Any]:
    """Three large results finished one after another, then a flood of submitted-and-cancelled jobs."""
    base = srv["base"]
    ids, results, kept = [], [], []
    for n in range(3):
        ids.append(submit(base, body(100 + n, **LARGE)))
        results.append(finish(base, ids[-1])["result"])
        kept.append(kept_bytes(base))
    # Two results fit together, three do not (else the bound tests nothing): the first two are kept
    # whole, and the third pushed the oldest out.
    first, second = kept[0], kept[1] - kept[0]
    assert 0 < first and 0 < second and kept[1] <= MAX_JOB_BYTES < 3 * min(first, second)
    assert kept[2] <= MAX_JOB_BYTES
    flood = []
    before = rss_mb(srv["proc"].pid)
    with httpx.Client(base_url=base, timeout=30) as client:
        for n in range(FLOOD):
            r = client.post(JOBS, json=body(1000 + n, images_to_gen=1, images_to_cherry_pick=1,
                                               super_res=False))
            assert r.status_code == 202, r.text
            flood.append(r.json()["id"])
            assert client.delete(f"{JOBS}/{flood[-1]}").status_code == 200
    return {"base": base, "ids": ids, "results": results, "flood": flood,
            "flood_rss_mb": rss_mb(srv["proc"].pid) - before}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def test_the_oldest_result_expires_first_and_its_record_stays_saying_so(retained):
    base, ids = retained["base"], retained["ids"]
    oldest = get(base, ids[0])
    assert oldest["status"] == "succeeded"
    assert oldest["result"] is None and oldest["result_expired"] is True
    assert kept_bytes(base) <= MAX_JOB_BYTES


def test_a_late_subscriber_of_an_expired_result_gets_succeeded_with_the_record(retained):
    name, data = final_event(retained["base"], retained["ids"][0])
    assert name == "succeeded"
    assert data["id"] == retained["ids"][0] and data["result"] is None and data["result_expired"] is True


def test_a_flood_of_cancelled_jobs_evicts_no_kept_result(retained):
    base, ids, results = retained["base"], retained["ids"], retained["results"]
    for job_id, result in zip(ids[1:], results[1:]):
        job = get(base, job_id)
        assert job["result_expired"] is False
        assert job["result"] == result  # the same bytes as when it finished
        name, data = final_event(base, job_id)
        assert name == "succeeded" and data == result
    # The count bound dropped cancelled records only: the three succeeded ones are all still there.
    assert metric(base, "kandinsky_jobs", '{status="succeeded"}') == 3
    assert metric(base, "kandinsky_jobs", '{status="cancelled"}') == MAX_JOBS - 3
    assert 0 < kept_bytes(base) <= MAX_JOB_BYTES
    assert httpx.get(f"{base}{JOBS}/{retained['flood'][0]}", timeout=10).status_code == 404
    assert get(base, retained["flood"][-1])["status"] == "cancelled"
    assert retained["flood_rss_mb"] < 100  # 300 cancelled jobs cost records, not results


# ---- listing pages ------------------------------------------------------------------------------------


def listing(base: str, **params: Any) -> httpx.Response:
    return httpx.get(base + JOBS, params=params, timeout=30)


def test_listing_pages_through_every_job_newest_first_with_an_opaque_cursor(retained):
    base = retained["base"]
    everything = listing(base, limit=500).json()
    assert everything["next_cursor"] is None
    all_ids = [job["id"] for job in everything["jobs"]]
    assert len(all_ids) == MAX_JOBS  # the kept records: the three results and the newest cancelled ones
    assert all_ids[0] == retained["flood"][-1] and all_ids[-1] == retained["ids"][0]
    created = [job["created"] for job in everything["jobs"]]
    assert created == sorted(created, reverse=True)
    assert all(job["result"] is None for job in everything["jobs"])

    default = listing(base).json()
    assert [job["id"] for job in default["jobs"]] == all_ids[:50] and default["next_cursor"]

    paged: list[str] = []
    cursor = None
    while True:
        page = listing(base, limit=7, **({"cursor": cursor} if cursor else {})).json()
        assert 0 < len(page["jobs"]) <= 7
        paged += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str) and retained["flood"][-1] not in cursor  # opaque, not an id
    assert paged == all_ids


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "501"}, {"limit": "-1"}, {"limit": "5.0"}, {"limit": "five"}, {"limit": ""},
    {"limit": "9" * 30},
])
def test_a_bad_limit_is_a_400_naming_limit(srv, params):
    r = listing(srv["base"], **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("limit")


@pytest.mark.parametrize("cursor", ["", "not a cursor", "zzzz", "am9iczow", "x" * 100, "\u00e9t\u00e9"])
def test_a_bad_cursor_is_a_400_naming_cursor(srv, cursor):
    r = listing(srv["base"], cursor=cursor)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("cursor")
