"""The continuous-batching loop on the tiny model: jobs join a running loop, leave it when done or
cancelled, and give the results `Pipeline.run` gives them alone; out of memory halves the slots and
reruns the live jobs from their first position with their seeds, at one slot it fails them."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.engine.continuous import ContinuousLoop, Done
from app.engine.jobs import Job, JobFailed, JobResult
from app.engine.params import GenerationParams
from app.engine.pipeline import Pipeline

FAST = GenerationParams(images_to_gen=2, images_to_cherry_pick=2, top_k=64, super_res=False, seed=5)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


def drive(loop: ContinuousLoop, joins: dict[int, list[tuple[Hashable, Job]]] | None = None,
          cancels: dict[int, list[Hashable]] | None = None, limit: int = 10_000
          ) -> tuple[dict[Hashable, Done], dict[Hashable, JobFailed], list[int]]:
    """Step until nothing is left, adding joins[k] and cancelling cancels[k] before step k."""
    done: dict[Hashable, Done] = {}
    failed: dict[Hashable, JobFailed] = {}
    live: list[int] = []
    step = 0
    while step < limit:
        for key, job in (joins or {}).get(step, []):
            loop.add(key, job)
        for key in (cancels or {}).get(step, []):
            loop.cancel(key)
        if not loop.keys() and step > max(joins or {0: []}):
            break
        finished, bad = loop.step()
        live.append(loop.live_rows)
        done.update((d.key, d) for d in finished)
        failed.update(bad)
        step += 1
    return done, failed, live


def alone_in_a_loop(pipeline: Pipeline, job: Job, slots: int = 4) -> JobResult:
    loop = ContinuousLoop(pipeline, slots)
    done, failed, _ = drive(loop, {0: [("x", job)]})
    result = loop.finish(done["x"])
    assert isinstance(result, JobResult) and not failed
    return result


def test_jobs_joining_at_and_between_image_rows_get_their_alone_results(pipeline: Pipeline) -> None:
    a = Job("кот", replace(FAST, seed=1))
    b = Job("дом", replace(FAST, seed=2, images_to_gen=3, images_to_cherry_pick=1))
    c = Job("лес", replace(FAST, seed=3, images_to_gen=1, images_to_cherry_pick=1))
    alone = {k: alone_in_a_loop(pipeline, j) for k, j in {"a": a, "b": b, "c": c}.items()}
    # Four slots: b joins at a row boundary (64) and gets two slots, c between rows (77); b's third
    # image waits for a slot (a is done at 1024) and joins then, image by image.
    loop = ContinuousLoop(pipeline, 4)
    done, failed, live = drive(loop, {0: [("a", a)], 64: [("b", b)], 77: [("c", c)]})
    assert not failed and set(done) == {"a", "b", "c"}
    assert max(live) == 4 and live[-1] == 0
    for key, d in done.items():
        got, want = loop.finish(d), alone[key]
        assert isinstance(got, JobResult)
        assert got.codes == want.codes and got.images == want.images and got.ppl == want.ppl
    # The batch-at-a-time decoder samples the same codes and images (here for b, which joined image by
    # image); its ppl may differ in the last float bits (it attends unpadded caches, the loop padded ones).
    (batch,) = pipeline.run([b])
    got = alone["b"]  # equal to b's joined result (above)
    assert isinstance(batch, JobResult) and batch.codes == got.codes and batch.images == got.images
    assert batch.ppl == pytest.approx(got.ppl, rel=1e-5)


def test_first_come_first_admitted_and_nothing_overtakes_a_job_waiting_for_room(pipeline: Pipeline) -> None:
    loop = ContinuousLoop(pipeline, 2)
    loop.add("big", Job("кот", replace(FAST, images_to_gen=3, images_to_cherry_pick=1)))
    loop.add("small", Job("дом", replace(FAST, images_to_gen=1, images_to_cherry_pick=1)))
    loop.step()
    assert loop.live_rows == 2 and loop.room == 0  # big's first two images; its third and small wait
    assert loop.take_admitted() == ["big"]
    for _ in range(1023):
        loop.step()
    # big's first two rows are done: its third image, not small, takes the first free slot.
    loop.step()
    assert loop.take_admitted() == ["small"]  # small joined beside big's third image
    assert loop.progress("big").step < loop.steps and loop.progress("small").step == 1


def test_a_cancelled_job_leaves_at_once_and_its_partner_is_unchanged(pipeline: Pipeline) -> None:
    keep = Job("кот", replace(FAST, seed=8))
    alone = alone_in_a_loop(pipeline, keep)
    loop = ContinuousLoop(pipeline, 4)
    done, failed, live = drive(loop, {0: [("keep", keep), ("gone", Job("дом", replace(FAST, seed=9)))]},
                               cancels={100: ["gone"]})
    assert set(done) == {"keep"} and not failed
    assert live[99] == 4 and live[100] == 2  # the cancelled rows freed their slots at that step
    got = loop.finish(done["keep"])
    assert isinstance(got, JobResult) and got.codes == alone.codes and got.ppl == alone.ppl


def test_out_of_memory_halves_the_slots_and_reruns_the_live_jobs_with_their_seeds(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = Job("кот", replace(FAST, seed=21)), Job("дом", replace(FAST, seed=22))
    alone = {"a": alone_in_a_loop(pipeline, a), "b": alone_in_a_loop(pipeline, b)}
    loop = ContinuousLoop(pipeline, 4)
    loop.add("a", a)
    loop.add("b", b)
    for _ in range(300):
        loop.step()
    real = type(loop.slots).step
    raised: list[int] = []

    def oom_once(self):  # type: ignore[no-untyped-def]
        if not raised:
            raised.append(self.slots)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self)

    monkeypatch.setattr(type(loop.slots), "step", oom_once)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    done, failed, _ = drive(loop)
    assert raised == [4] and loop.capacity == 2 and not failed
    for key in ("a", "b"):  # rerun from the start at two slots: the same codes as alone
        got = loop.finish(done[key])
        assert isinstance(got, JobResult) and got.codes == alone[key].codes and got.ppl == alone[key].ppl


def test_out_of_memory_at_one_slot_fails_the_live_jobs_in_words(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = ContinuousLoop(pipeline, 1)
    loop.add("a", Job("кот", replace(FAST, images_to_gen=1, images_to_cherry_pick=1)))

    def oom(self):  # type: ignore[no-untyped-def]
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(type(loop.slots), "step", oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    done, failed = loop.step()
    assert not done and list(dict(failed)) == ["a"]
    assert "out of GPU memory" in dict(failed)["a"].message and not loop.keys()
