"""Previews through the worker as the server wires it (`LocalQueue` -> `BatchWorker` -> the real tiny
`Pipeline`), heard on the event loop: only while someone watches, in step order, never after the result,
and without changing the images; then through the real server process, as a client streams a job.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from httpx_sse import connect_sse

from app.engine.jobs import Job
from app.engine.params import GenerationParams
from app.engine.pipeline import Pipeline
from app.serving.core.types import Event, ImageRequest, Progressed, RequestResult
from app.serving.queue.base import Work
from app.serving.queue.local import LocalQueue
from app.serving.queue.worker import BatchWorker
from tests.support import serve

FAST = GenerationParams(images_to_gen=2, images_to_cherry_pick=2, top_k=64, super_res=False, seed=21)
LAST_STEP = 1024
HOLD_S = 120.0  # a bound for liveness only


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


class Heard:
    """What one request's listener hears on the event loop, and when its result came, in order."""

    def __init__(self) -> None:
        # ("progress" | "preview", instance, step), and ("result", -1, -1) when the result came
        self.log: list[tuple[str, int, int]] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, Progressed):
            for n, p in enumerate(event.instances):
                if p is not None and p.preview is not None:
                    self.log.append(("preview", n, p.step))
                elif p is not None:
                    self.log.append(("progress", n, p.step))

    def previews(self, instance: int = 0) -> list[int]:
        return [step for kind, n, step in self.log if kind == "preview" and n == instance]


def run_works(pipeline: Pipeline, requests: list[tuple[tuple[Job, ...], Heard, Any]],
              during: Any = None) -> list[RequestResult]:
    """Queue every request (jobs, listener, wants_previews or None) at once, so that they share a batch;
    wait for every result, then a little longer, so that a stray preview would still be heard."""
    queue = LocalQueue(8)
    runner: Any = pipeline  # BatchRunner's max_batch_images is a plain attribute, Pipeline's a property
    worker = BatchWorker(runner, queue, max_batch_images=16)

    async def main() -> list[RequestResult]:
        works = []
        for jobs, heard, wants in requests:
            now = time.monotonic()
            work = Work(ImageRequest(jobs, 600, "jobs"), enqueued=now, deadline=now + 600)
            if wants is not None:
                work.wants_previews = wants
            await queue.put(work, heard)
            works.append(work)
        worker.start()
        results = []
        for work, (_, heard, _) in zip(works, requests, strict=True):
            results.append(await queue.outcome(work))
            heard.log.append(("result", -1, -1))
        await asyncio.sleep(1.0)  # anything still scheduled on the loop runs now
        return results

    try:
        return asyncio.run(main())
    finally:
        worker.stop(30)


def hold_renders_until_the_last_tick(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every render waits until the decode has passed its last tick, so that at the end of generation a
    render is under way and a newer grid pending: the worst case for ordering against the result."""
    real = pipeline.previews._render
    decode_done = threading.Event()
    real_run = pipeline._generate_splitting_on_oom

    def generate(*args: Any, **kwargs: Any) -> Any:
        try:
            return real_run(*args, **kwargs)
        finally:
            decode_done.set()

    def held(partial: torch.Tensor) -> list[str]:
        decode_done.wait(HOLD_S)
        return real(partial)

    monkeypatch.setattr(pipeline, "_generate_splitting_on_oom", generate)
    monkeypatch.setattr(pipeline.previews, "_render", held)


def test_previews_are_heard_in_step_order_and_never_after_the_result(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold_renders_until_the_last_tick(pipeline, monkeypatch)
    a, b = Heard(), Heard()
    two = (Job("кот", replace(FAST, preview_every=1)), Job("дом", replace(FAST, seed=22, preview_every=4)))
    run_works(pipeline, [(two, a, None), ((Job("лес", replace(FAST, seed=23, preview_every=2)),), b, None)])

    for heard, instances in ((a, 2), (b, 1)):
        assert heard.log[-1] == ("result", -1, -1)
        assert [kind for kind, _, _ in heard.log].count("result") == 1
        for n in range(instances):
            steps = heard.previews(n)
            assert steps == sorted(set(steps)) and steps[-1] == LAST_STEP, (n, steps)


def test_no_preview_is_rendered_or_heard_while_nobody_watches(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline.previews._render
    drawn: list[int] = []

    def counted(partial: torch.Tensor) -> list[str]:
        drawn.append(len(partial))
        return real(partial)

    monkeypatch.setattr(pipeline.previews, "_render", counted)
    unwatched, watched, broken = Heard(), Heard(), Heard()

    def fails() -> bool:
        raise RuntimeError("a bug in the jobs layer")

    run_works(pipeline, [
        ((Job("кот", replace(FAST, preview_every=1)),), unwatched, lambda: False),
        ((Job("дом", replace(FAST, images_to_gen=3, seed=24, preview_every=8)),), watched, lambda: True),
        ((Job("лес", replace(FAST, seed=25, preview_every=1)),), broken, fails),
    ])

    assert unwatched.previews() == [] and broken.previews() == []
    assert [step for kind, _, step in unwatched.log if kind == "progress"][-1] == LAST_STEP
    assert broken.log[-1] == ("result", -1, -1)  # a failing predicate costs previews, not the request
    assert watched.previews()[-1] == LAST_STEP
    assert set(drawn) <= {3}  # only the watched job's 3-image grids were ever drawn


# ---- through the real server process --------------------------------------------------------------------

JOBS = "/v1/models/kandinsky/jobs"
PREDICT = "/v1/models/kandinsky:predict"


@pytest.fixture(scope="module", params=["--no-continuous_batching", "--continuous_batching"])
def srv(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    yield from serve(tiny_model_dir, request.param)


def body(images: int, seed: int, **params: Any) -> dict[str, Any]:
    p = {"images_to_gen": images, "images_to_cherry_pick": images, "super_res": False, "seed": seed,
         **params}
    return {"instances": [{"query": "кот", "params": p}]}


def test_a_streamed_job_with_a_preview_every_row_gets_them_in_order_before_its_result_and_the_same_images(
    srv: dict[str, Any],
) -> None:
    events: list[tuple[str, Any]] = []
    with httpx.Client(timeout=300) as client, connect_sse(
        client, "POST", srv["base"] + JOBS, json=body(16, 77, preview_every=1),
        headers={"accept": "text/event-stream"},
    ) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            events.append((sse.event, json.loads(sse.data)))
    plain = httpx.post(srv["base"] + PREDICT, json=body(16, 77), timeout=300)

    names = [name for name, _ in events]
    assert names[0] == "status" and names[-1] == "succeeded" and names.count("succeeded") == 1
    previews = [data for name, data in events if name == "preview"]
    assert previews, names
    steps = [p["step"] for p in previews]
    assert steps == sorted(set(steps)) and all(len(p["images"]) == 16 for p in previews)
    assert plain.status_code == 200, plain.text
    assert events[-1][1]["images"] == plain.json()["images"]  # previews never change the images
