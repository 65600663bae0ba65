"""Previews drawn off the decode thread (issue 19, item 5), on the tiny model: the decode never waits for
the renderer, a slow renderer skips stale grids and still draws the newest, jobs nobody watches get none,
none arrives after `run` returned, and previews never change the images."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.jobs import Job, JobResult, Progress
from app.engine.params import GenerationParams
from app.engine.pipeline import Pipeline
from app.engine.previews import PreviewRenderer

FAST = GenerationParams(images_to_gen=2, images_to_cherry_pick=1, top_k=64, super_res=False, seed=11)
LAST_STEP = 1024  # the tiny model's 32x32 grid
#: A bound for liveness only: a render held back waits at most this long for the decode to end.
HOLD_S = 120.0


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


class Recorder:
    """A job's preview sink: (step, images, thread name) of each preview, in arrival order."""

    def __init__(self) -> None:
        self.got: list[tuple[int, list[str], str]] = []

    def __call__(self, step: int, images: list[str]) -> None:
        self.got.append((step, images, threading.current_thread().name))

    @property
    def steps(self) -> list[int]:
        return [step for step, _, _ in self.got]


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def _wait_idle(renderer: PreviewRenderer) -> None:
    assert renderer.wait_idle(HOLD_S), "the renderer never went idle"


def test_previews_are_drawn_on_the_renderer_thread_in_step_order_up_to_the_finished_grid(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    renderer = pipeline.previews
    real = renderer._render
    drawn_on: list[str] = []

    def recorded(partial: torch.Tensor) -> list[str]:
        drawn_on.append(threading.current_thread().name)
        return real(partial)

    monkeypatch.setattr(renderer, "_render", recorded)
    decode_threads: set[str] = set()
    sink = Recorder()
    job = Job("кот", replace(FAST, preview_every=8), on_preview=sink)

    (result,) = pipeline.run([job], on_step=lambda p: decode_threads.add(threading.current_thread().name))

    assert isinstance(result, JobResult)
    assert decode_threads == {threading.current_thread().name}  # the ticks run on the caller's thread
    assert drawn_on and set(drawn_on) == {PreviewRenderer.THREAD_NAME} != decode_threads
    # Partial grids come from the renderer; the finished one may be the decoded images, JPEG'd at once.
    assert {thread for step, _, thread in sink.got if step < LAST_STEP} == {PreviewRenderer.THREAD_NAME}
    assert sink.steps == sorted(set(sink.steps)) and set(sink.steps) <= {256, 512, 768, 1024}
    assert sink.steps[-1] == LAST_STEP  # a finished job's newest grid is always delivered
    first = [_pixels(b) for b in sink.got[0][1]]
    assert len(first) == 2 and first[0].shape == (256, 256, 3)
    rows = sink.steps[0] // 32
    assert np.abs(first[0][rows * 8 + 4 :] - 128).max() <= 6  # rows not sampled yet: grey
    assert min(_pixels(b)[64:].std() for b in sink.got[-1][1]) > 20  # the last grid: no grey left


def test_the_decode_never_waits_for_a_stuck_renderer_which_then_draws_only_the_newest_grid(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first render is held until the decode has passed its last tick: were any tick to wait for
    # the renderer, the decode could not get there and the hold would run out instead.
    renderer = pipeline.previews
    real = renderer._render
    last_tick = threading.Event()
    released_by_tick: list[bool] = []

    def held(partial: torch.Tensor) -> list[str]:
        if not released_by_tick:
            released_by_tick.append(last_tick.wait(HOLD_S))
        return real(partial)

    def on_step(progress: Sequence[Progress | None]) -> None:
        if progress[0] is not None and progress[0].step == LAST_STEP:
            last_tick.set()

    monkeypatch.setattr(renderer, "_render", held)
    sink = Recorder()
    skipped = renderer.skipped
    job = Job("кот", replace(FAST, images_to_gen=3, preview_every=1), on_preview=sink)

    (result,) = pipeline.run([job], on_step=on_step)
    at_return = list(sink.steps)
    _wait_idle(renderer)  # the held render may still be under way: it is not delivered any more

    assert isinstance(result, JobResult)
    assert released_by_tick == [True]
    assert sink.steps == at_return
    # 32 grids were due: the renderer took the first it saw and was held; each later one replaced the one
    # pending before it. The newest, the finished grid, was then drawn, or taken from the decoded images.
    assert 1 <= len(sink.steps) <= 2 and sink.steps == sorted(sink.steps) and sink.steps[-1] == LAST_STEP
    assert renderer.skipped - skipped in (30, 31)  # of 32: one or two drawn, the rest never


def test_no_preview_is_drawn_for_a_job_nobody_watches(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    renderer = pipeline.previews
    real = renderer._render
    drawn: list[int] = []

    def counted(partial: torch.Tensor) -> list[str]:
        drawn.append(1)
        return real(partial)

    monkeypatch.setattr(renderer, "_render", counted)
    watched = [False]
    sink = Recorder()

    def on_step(progress: Sequence[Progress | None]) -> None:
        if progress[0] is not None and progress[0].step >= 512:
            watched[0] = True  # a subscriber arrives halfway

    job = Job("кот", replace(FAST, preview_every=4), on_preview=sink, wants_preview=lambda: watched[0])
    pipeline.run([job], on_step=lambda p: None)
    assert sink.got == [] and drawn == []

    pipeline.run([job], on_step=on_step)
    assert sink.steps and min(sink.steps) > 512 and sink.steps[-1] == LAST_STEP


def test_no_preview_arrives_after_run_returned_even_with_a_render_under_way_at_the_end(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    renderer = pipeline.previews
    real = renderer._render
    last_tick = threading.Event()
    events: list[str] = []

    def slow(partial: torch.Tensor) -> list[str]:
        last_tick.wait(HOLD_S)  # every render is still under way when the decode ends
        return real(partial)

    def on_step(progress: Sequence[Progress | None]) -> None:
        if progress[0] is not None and progress[0].step == LAST_STEP:
            last_tick.set()

    monkeypatch.setattr(renderer, "_render", slow)
    watched = Job("кот", replace(FAST, preview_every=2), on_preview=lambda s, _: events.append(f"a{s}"))
    partner = Job("дом", replace(FAST, seed=5, preview_every=3),
                  on_preview=lambda s, _: events.append(f"b{s}"))

    results = pipeline.run([watched, partner], on_step=on_step)
    events.append("returned")
    _wait_idle(renderer)  # whatever was still being drawn is done now

    assert all(isinstance(r, JobResult) for r in results)
    assert events[-1] == "returned"
    assert "a1024" in events and "b960" in events  # each newest grid: rows 32 and 30 (every 3rd)


def test_a_stopped_job_gets_no_more_previews_and_its_partner_finishes(pipeline: Pipeline) -> None:
    stopped, partner = Recorder(), Recorder()
    jobs = [Job("кот", replace(FAST, preview_every=1), on_preview=stopped),
            Job("дом", replace(FAST, seed=5, preview_every=8), on_preview=partner)]

    def on_step(progress: Sequence[Progress | None]) -> list[int]:
        return [0] if progress[0] is not None and progress[0].step >= 256 else []

    outcomes = pipeline.run(jobs, on_step=on_step)

    assert outcomes[0] is None and isinstance(outcomes[1], JobResult)
    assert all(step <= 256 for step in stopped.steps)
    assert partner.steps[-1] == LAST_STEP


def test_a_failing_render_costs_only_that_preview(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    renderer = pipeline.previews
    real = renderer._render
    failed: list[int] = []

    def failing_once(partial: torch.Tensor) -> list[str]:
        if not failed:
            failed.append(int((partial[0] >= 0).sum()))  # the step of the grid it was given
            raise RuntimeError("boom")
        return real(partial)

    monkeypatch.setattr(renderer, "_render", failing_once)
    sink = Recorder()
    (result,) = pipeline.run([Job("кот", replace(FAST, preview_every=8), on_preview=sink)])

    assert isinstance(result, JobResult)
    assert failed and failed[0] not in sink.steps
    assert sink.steps and sink.steps[-1] == LAST_STEP  # the renderer went on


def test_previews_every_row_leave_the_images_unchanged(pipeline: Pipeline) -> None:
    params = replace(FAST, images_to_gen=3, images_to_cherry_pick=2)
    sink = Recorder()
    (with_previews,) = pipeline.run([Job("кот", replace(params, preview_every=1), on_preview=sink)],
                                    on_step=lambda p: None)
    (without,) = pipeline.run([Job("кот", params)])

    assert isinstance(with_previews, JobResult) and isinstance(without, JobResult)
    assert sink.got
    assert with_previews.codes == without.codes and with_previews.images == without.images
    assert with_previews.ppl == without.ppl and with_previews.clip_scores == without.clip_scores


def test_finish_job_settles_the_previews_of_a_job_finished_elsewhere(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Continuous batching finishes a job on its own thread: the newest grid handed over is settled
    # before `finish_job` returns, a finished grid from the decoded images, a partial one drawn.
    job = Job("кот", FAST)
    (output,) = pipeline.decoder.generate([pipeline._request(job)])
    assert output is not None
    renderer = pipeline.previews
    real = renderer._render
    last_tick = threading.Event()

    def held(partial: torch.Tensor) -> list[str]:
        last_tick.wait(HOLD_S)
        return real(partial)

    monkeypatch.setattr(renderer, "_render", held)

    finished, partial = Recorder(), Recorder()
    grid = output.codes.clone()
    renderer.submit(("elsewhere", 0), LAST_STEP, grid, finished)  # drawn slowly: held until released
    outcome = pipeline.finish_job(job, output, 0.0, previews=(("elsewhere", 0), LAST_STEP, finished))
    last_tick.set()
    half = grid.clone()
    half[:, 640:] = -1
    renderer.submit(("elsewhere", 1), 640, half, partial)
    pipeline.finish_job(job, output, 0.0, previews=(("elsewhere", 1), 640, partial))
    delivered = (len(finished.got), len(partial.got))
    _wait_idle(renderer)

    assert isinstance(outcome, JobResult)
    assert finished.steps == [LAST_STEP] and partial.steps == [640]
    assert (len(finished.got), len(partial.got)) == delivered  # nothing after finish_job returned
    assert min(_pixels(b)[64:].std() for b in finished.got[0][1]) > 20
