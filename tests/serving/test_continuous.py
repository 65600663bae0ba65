"""Continuous batching (issue 20) through the real server process: a request that arrives while others
run joins the running decode (image by image when fewer slots are free than it has images), is answered
when its own images are done, and gets the images it gets alone.

One `python -m app` on the tiny model with `--max_batch_images 6` (six row slots) serves the module.
Event order on the job streams, not time, shows the joins: a request sent while another is a quarter
done starts sampling (its `progress` events) before the other's `succeeded`.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.support import metric, serve

R = {"query": "Кот в шляпе", "params": {"images_to_gen": 4, "images_to_cherry_pick": 4, "seed": 7,
                                         "super_res": False, "format": "png", "top_k": 64}}
OTHER = {"query": "Собака", "params": {"images_to_gen": 3, "images_to_cherry_pick": 1, "seed": 8,
                                        "super_res": False, "top_k": 64}}


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    yield from serve(tiny_model_dir, "--max_batch_images", "6")


def predict(base: str, instance: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/models/kandinsky:predict", json={"instances": [instance]}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


class Stream:
    """A job submitted with `Accept: text/event-stream`; its events, in order, on a thread."""

    def __init__(self, base: str, instance: dict[str, Any], log: list[tuple[str, str, Any]], name: str):
        self.events: list[tuple[str, Any]] = []
        self.quarter = threading.Event()
        self.done = threading.Event()

        def run() -> None:
            with httpx.Client(timeout=300) as c, connect_sse(
                c, "POST", f"{base}/v1/models/kandinsky/jobs", json={"instances": [instance]}
            ) as source:
                for sse in source.iter_sse():
                    data = json.loads(sse.data)
                    self.events.append((sse.event, data))
                    log.append((name, sse.event, data))
                    if sse.event == "progress" and data["step"] >= 256:
                        self.quarter.set()
                    if sse.event in ("succeeded", "failed", "cancelled"):
                        break
            self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> dict[str, Any]:
        assert self.done.wait(300)
        name, data = self.events[-1]
        assert name == "succeeded", self.events[-1]
        return data


def same_images(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [base64.b64decode(x) for x in a["images"]] == [base64.b64decode(x) for x in b["images"]]
    assert a["clip_scores"] == b["clip_scores"]
    assert a["ppl"] == b["ppl"]


@pytest.fixture(scope="module")
def alone(srv: dict[str, Any]) -> dict[str, Any]:
    return predict(srv["base"], R)


def test_a_request_sent_a_quarter_in_joins_the_running_decode_and_gets_its_images_alone(srv, alone) -> None:
    log: list[tuple[str, str, Any]] = []
    a = Stream(srv["base"], R, log, "A")
    assert a.quarter.wait(120)
    b = Stream(srv["base"], R, log, "B")  # 4 images, 2 slots free: joins image by image
    same_images(a.result(), alone)
    same_images(b.result(), alone)
    order = [(name, event) for name, event, _ in log]
    a_done = order.index(("A", "succeeded"))
    b_progress = [i for i, (name, event) in enumerate(order) if name == "B" and event == "progress"]
    assert b_progress and b_progress[0] < a_done  # B sampled while A was still running
    assert order.index(("B", "succeeded")) > a_done


def test_three_concurrent_requests_share_the_loop_and_each_gets_its_own_images(srv, alone) -> None:
    log: list[tuple[str, str, Any]] = []
    admitted = metric(srv["base"], "kandinsky_admission_wait_seconds_count", "")
    streams = [Stream(srv["base"], R, log, "R"), Stream(srv["base"], OTHER, log, "O1"),
               Stream(srv["base"], OTHER, log, "O2")]
    same_images(streams[0].result(), alone)
    first, second = streams[1].result(), streams[2].result()
    same_images(first, second)  # the same request twice, at other slots and positions
    assert metric(srv["base"], "kandinsky_admission_wait_seconds_count", "") == admitted + 3
    # Each request's progress rises to the end, once per image row it gains, whatever step it joined at.
    for name in ("R", "O1", "O2"):
        steps = [data["step"] for who, event, data in log if who == name and event == "progress"]
        assert all(a // 32 < b // 32 for a, b in zip(steps, steps[1:])) and steps[-1] == 1024, steps
    assert metric(srv["base"], "kandinsky_loop_slots", "") == 6
    assert metric(srv["base"], "kandinsky_loop_live_rows", "") == 0  # every row done and freed


def test_a_cancelled_job_frees_its_slots_for_the_next_request_at_once(srv, alone) -> None:
    log: list[tuple[str, str, Any]] = []
    big = {**OTHER, "params": {**OTHER["params"], "images_to_gen": 6, "images_to_cherry_pick": 1}}
    first = Stream(srv["base"], big, log, "big")  # all six slots
    assert first.quarter.wait(120)
    job_id = next(data["id"] for name, event, data in log if name == "big" and event == "status")
    waiting = Stream(srv["base"], R, log, "R")  # no free slot: waits in line
    r = httpx.delete(f"{srv['base']}/v1/models/kandinsky/jobs/{job_id}", timeout=30)
    assert r.status_code == 200
    same_images(waiting.result(), alone)
    assert first.done.wait(60) and first.events[-1][0] == "cancelled"


def test_the_batch_at_a_time_worker_is_still_there_when_asked(tiny_model_dir: Path, alone) -> None:
    # --no-continuous_batching: one merged batch at a time, the same codes and images; its ppl may differ
    # from the loop's in the last float bits (tests/engine/test_continuous.py).
    for s in serve(tiny_model_dir, "--no-continuous_batching", "--max_batch_images", "6"):
        got = predict(s["base"], R)
        assert any("batch: 1 request(s)" in line for line in s["lines"])
    assert [base64.b64decode(x) for x in got["images"]] == [base64.b64decode(x) for x in alone["images"]]
    assert got["ppl"] == pytest.approx(alone["ppl"], rel=1e-5)
