"""Issue 18 through the real server process: a request's images do not depend on what shares its batch.

One `python -m app` (a generated 8-layer, hidden-256 model with Kandinsky's 8192 codes, `--max_batch_images
16`, on the CPU) serves the module. The reference request R (4 images, one seed, top_k 4096, top_p 0.975,
PNG) runs alone once; then R runs again, both as a v1 predict and as a job, merged into batches of other
sizes and compositions. Every copy must give R's images (same PNG bytes, same pixels) and clip scores.

To keep the runtime short, the whole scenario is one chain of six generations, each queued while the one
before it runs (so the worker takes each group together, and no time goes to a blocker that is thrown
away): R alone is the first generation and the blocker of the second, and so on.

1. R (v1) alone.
2. R (job) and R (v1) beside 8 partner images (a two-instance v1 request and a job): each copy of R
   shares its batch with 12 other images.
3. R (v1) and R (job) beside a 4-image partner: 8 other images each.
4. R (v1) beside a 2-image partner job.
5. R (job) beside a 2-image partner predict.
6. R (v1) and R (job) beside a 2-image predict whose client hangs up mid-way (a raw socket that closes)
   and a 2-image job cancelled mid-way (DELETE once its progress is past 0): 12 rows, then 10, then 8.

The server's own record proves each merge: its "batch: N request(s), J job(s), I image(s)" log lines, one
per generation, and the `kandinsky_batch_images` histogram's count and sum.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import metric, pixels, serve

pytestmark = [pytest.mark.slow, pytest.mark.long]

NAME = "kandinsky"
PREDICT = f"/v1/models/{NAME}:predict"
JOBS = f"/v1/models/{NAME}/jobs"
R_QUERY, R_SEED, R_IMAGES = "кот в шляпе", 1818, 4
BATCH_LINE = re.compile(r"batch: (\d+) request\(s\), (\d+) job\(s\), (\d+) image\(s\)")
#: (requests, jobs, images) of each generation of the scenario, in order.
EXPECTED_BATCHES = [(1, 1, 4), (4, 5, 16), (3, 3, 12), (2, 2, 6), (2, 2, 6), (4, 4, 12)]
#: Images that finish: every generation's, less the hung-up and the cancelled partners' 2 each.
FINISHED_IMAGES = sum(images for _, _, images in EXPECTED_BATCHES) - 4
TIMEOUT_S = 300.0
#: Between two requests that ask the server how things stand: each costs the worker some of the server's
#: cores (and its GIL), so not too often.
POLL_S = 0.2

#: kandinsky_requests_total of v1 requests whose client hung up (no API keys: tenant "").
CLOSED_V1 = '{code="499",protocol="v1",tenant=""}'


def params(images: int, seed: int) -> dict[str, Any]:
    return {"images_to_gen": images, "images_to_cherry_pick": images, "top_k": 4096, "top_p": 0.975,
            "super_res": False, "seed": seed, "format": "png"}


def body(*instances: tuple[str, int, int]) -> dict[str, Any]:
    """A v1 body of (query, images, seed) instances."""
    return {"instances": [{"query": q, "params": params(n, s)} for q, n, s in instances]}


R_BODY = body((R_QUERY, R_IMAGES, R_SEED))


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT_S, every: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(every)


def batches(lines: list[str]) -> list[tuple[int, int, int]]:
    """The (requests, jobs, images) of every batch the server logged so far, in order."""
    found = (BATCH_LINE.search(line) for line in list(lines))
    return [(int(m[1]), int(m[2]), int(m[3])) for m in found if m]


def job(base: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}{JOBS}/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def job_final(base: str, job_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def ended() -> bool:
        seen.update(job(base, job_id))
        return seen["status"] in ("succeeded", "failed", "cancelled")

    wait_for(ended)
    return seen


def raw_predict(port: int, payload: dict[str, Any]) -> socket.socket:
    """A v1 predict sent on a raw socket, left unread: closing the socket is the client hanging up."""
    data = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


class Scenario:
    """Queues requests in a known order and remembers what each one gave."""

    def __init__(self, srv: dict[str, Any], pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.base, self.port, self.lines, self.pool = srv["base"], srv["port"], srv["lines"], pool
        self.predicts: dict[str, concurrent.futures.Future[httpx.Response]] = {}
        self.jobs: dict[str, str] = {}

    def _queued(self, action: Callable[[], Any], wait: bool = True) -> Any:
        """Run `action` (which queues one request) and wait until the queue holds it (while the worker is
        busy: an idle worker takes it at once)."""
        depth = metric(self.base, "kandinsky_queue_depth", "")
        out = action()
        if wait:
            wait_for(lambda: metric(self.base, "kandinsky_queue_depth", "") == depth + 1, timeout=30)
        return out

    def predict(self, key: str, payload: dict[str, Any], wait: bool = True) -> None:
        self.predicts[key] = self._queued(lambda: self.pool.submit(
            httpx.post, self.base + PREDICT, json=payload, timeout=TIMEOUT_S), wait)

    def submit_job(self, key: str, payload: dict[str, Any]) -> None:
        r = self._queued(lambda: httpx.post(self.base + JOBS, json=payload, timeout=30))
        assert r.status_code == 202, r.text
        self.jobs[key] = r.json()["id"]

    def hang_up_later(self, payload: dict[str, Any]) -> socket.socket:
        return self._queued(lambda: raw_predict(self.port, payload))

    def started(self, generation: int) -> None:
        """Wait until the worker has taken the `generation`-th batch (1-based) of the scenario."""
        wait_for(lambda: len(batches(self.lines)) >= generation, every=0.02)  # no request: the log

    def step(self, key: str) -> int:
        return job(self.base, self.jobs[key])["progress"]["step"]

    def prediction(self, key: str) -> dict[str, Any]:
        r = self.predicts[key].result(TIMEOUT_S)
        assert r.status_code == 200, r.text
        return r.json()

    def job_result(self, key: str) -> dict[str, Any]:
        done = job_final(self.base, self.jobs[key])
        assert done["status"] == "succeeded", done
        return done["result"]


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.tools.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("wide-model"), 0, num_layers=8, hidden_size=256,
                                image_vocab_size=8192)


@pytest.fixture(scope="module")
def srv(wide_model_dir: Path) -> Iterator[dict[str, Any]]:
    # Batch at a time, as merged batches are what this module checks (test_continuous.py: the loop).
    yield from serve(wide_model_dir, "--max_batch_images", "16", "--no-continuous_batching")


@pytest.fixture(scope="module")
def scenario(srv: dict[str, Any]) -> dict[str, Any]:
    """Runs the six generations of the module docstring; returns R's copies' results and the counters."""
    base = srv["base"]
    before = {
        "count": metric(base, "kandinsky_batch_images_count", ""),
        "sum": metric(base, "kandinsky_batch_images_sum", ""),
        "images": metric(base, "kandinsky_images_total", ""),
        "499": metric(base, "kandinsky_requests_total", CLOSED_V1),
        "batches": len(batches(srv["lines"])),
    }
    assert before["batches"] == 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        s = Scenario(srv, pool)
        # 1. R alone; it keeps the worker busy while generation 2 queues.
        s.predict("alone", R_BODY, wait=False)
        s.started(1)
        # 2. R beside 12 other images: 5 + 3 partner images and the other copy of R.
        s.predict("p12a", body(("собака бежит по полю", 3, 21), ("море и небо", 2, 22)))
        s.submit_job("r12", R_BODY)
        s.submit_job("p12b", body(("лиса в зимнем лесу", 3, 23)))
        s.predict("r12", R_BODY)
        s.started(2)
        # 3. R beside 8 other images: a 4-image partner and the other copy of R.
        s.predict("r8", R_BODY)
        s.predict("p8", body(("зимний город ночью", 4, 31)))
        s.submit_job("r8", R_BODY)
        s.started(3)
        # 4. R (v1) beside a 2-image job.
        s.submit_job("p2v1", body(("сова сидит на ветке", 2, 41)))
        s.predict("r2", R_BODY)
        s.started(4)
        # 5. R (job) beside a 2-image predict.
        s.submit_job("r2", R_BODY)
        s.predict("p2job", body(("сова сидит на ветке", 2, 41)))
        s.started(5)
        # 6. R beside a predict whose client hangs up and a job cancelled, both mid-way.
        hasty = s.hang_up_later(body(("старый замок в тумане", 2, 61)))
        s.predict("r_drop", R_BODY)
        s.submit_job("doomed", body(("ракета летит к луне", 2, 62)))
        s.submit_job("r_drop", R_BODY)
        s.started(6)
        wait_for(lambda: s.step("doomed") > 0)
        cancel = httpx.delete(f"{base}{JOBS}/{s.jobs['doomed']}", timeout=10)
        assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled", cancel.text
        cancelled_at = cancel.json()["progress"]["step"]
        # Three image rows later (10 rows of 12 still decoding), the other partner's client hangs up.
        wait_for(lambda: s.step("r_drop") >= cancelled_at + 96)
        hung_up_at = s.step("r_drop")
        hasty.close()

        out = {
            "alone": s.prediction("alone"),
            "v1": {case: s.prediction(case) for case in ("r12", "r8", "r2", "r_drop")},
            "job": {case: s.job_result(case) for case in ("r12", "r8", "r2", "r_drop")},
            "partners": {key: s.prediction(key) for key in ("p12a", "p8", "p2job")},
            "partner_jobs": {key: s.job_result(key) for key in ("p12b", "p2v1")},
            "doomed": job_final(base, s.jobs["doomed"]),
            "cancelled_at": cancelled_at,
            "hung_up_at": hung_up_at,
        }
    wait_for(lambda: metric(base, "kandinsky_requests_total", CLOSED_V1) > before["499"],
             timeout=30)
    out["batches"] = batches(srv["lines"])
    out["lines"] = list(srv["lines"])
    out["delta"] = {
        "count": metric(base, "kandinsky_batch_images_count", "") - before["count"],
        "sum": metric(base, "kandinsky_batch_images_sum", "") - before["sum"],
        "images": metric(base, "kandinsky_images_total", "") - before["images"],
        "499": metric(base, "kandinsky_requests_total", CLOSED_V1) - before["499"],
    }
    return out


def assert_same_as_alone(got: dict[str, Any], alone: dict[str, Any]) -> None:
    assert len(got["images"]) == len(alone["images"]) == R_IMAGES
    for n, (mine, want) in enumerate(zip(got["images"], alone["images"], strict=True)):
        mine_png, want_png = base64.b64decode(mine), base64.b64decode(want)
        assert (pixels(mine_png) == pixels(want_png)).all(), f"image {n}: other pixels than alone"
        assert mine_png == want_png, f"image {n}: other PNG bytes than alone"
    assert got["clip_scores"] == alone["clip_scores"]
    assert got["seed"] == alone["seed"] == R_SEED


# ---- the merges happened as planned ----------------------------------------------------------------


def test_each_generation_was_one_batch_of_the_planned_requests(scenario):
    assert scenario["batches"] == EXPECTED_BATCHES, "".join(scenario["lines"][-60:])
    assert scenario["delta"]["count"] == len(EXPECTED_BATCHES)
    assert scenario["delta"]["sum"] == sum(images for _, _, images in EXPECTED_BATCHES)


def test_the_dropped_partners_left_their_batch_mid_way(scenario):
    doomed = scenario["doomed"]
    assert doomed["status"] == "cancelled" and doomed["result"] is None
    assert 0 < scenario["cancelled_at"] < scenario["hung_up_at"] < 1024
    assert doomed["progress"]["step"] <= scenario["cancelled_at"] + 32  # gone at the next tick
    assert scenario["delta"]["499"] == 1
    assert sum("stopped: its requester gave up" in line for line in scenario["lines"]) == 2
    # Neither dropped partner finished its 2 images.
    assert scenario["delta"]["images"] == FINISHED_IMAGES


def test_the_partners_got_their_own_images(scenario):
    partners = {**scenario["partners"], **scenario["partner_jobs"]}
    alone = scenario["alone"]["images"]
    for key, result in partners.items():
        images = [i for p in result.get("predictions", [result]) for i in p["images"]]
        assert images and not set(images) & set(alone), key
    # The same partner request gives the same images as a job (batch 4) and as a predict (batch 5).
    assert scenario["partners"]["p2job"]["images"] == scenario["partner_jobs"]["p2v1"]["images"]


# ---- R's images and scores in every batch are those it gets alone -----------------------------------


@pytest.mark.parametrize("protocol", ["v1", "job"])
@pytest.mark.parametrize(
    "case", ["r12", "r8", "r2", "r_drop"],
    ids=["beside-12-images", "beside-8-images", "beside-2-images", "beside-cancel-and-hang-up"],
)
def test_r_gives_its_alone_images_and_scores(scenario, case, protocol):
    assert_same_as_alone(scenario[protocol][case], scenario["alone"])
