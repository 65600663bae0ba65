"""The whole generation core on the tiny model: query -> ranked, encoded images, and the offline CLI."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.jobs import Job, JobFailed, JobResult
from app.engine.params import GenerationParams
from app.engine.pipeline import MAX_INVARIANT_THREADS, Pipeline, encode_image, resolve_dtype
from app.tools import generate

FAST = GenerationParams(images_to_gen=2, images_to_cherry_pick=1, top_k=64, super_res=False, seed=11)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


def _image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_pipeline_returns_ranked_upscaled_images_with_scores_ppl_and_codes(pipeline: Pipeline) -> None:
    params = replace(FAST, images_to_gen=3, images_to_cherry_pick=2, super_res=True, format="png")
    (result,) = pipeline.run([Job("Синий кот", params)])

    assert len(result.images) == len(result.clip_scores) == len(result.ppl) == len(result.codes) == 2
    assert [_image(b).size for b in result.images] == [(1024, 1024), (1024, 1024)]
    assert all(_image(b).format == "PNG" for b in result.images)
    assert result.clip_scores == sorted(result.clip_scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in result.clip_scores)
    assert all(p >= 1.0 for p in result.ppl)
    assert result.seed == 11
    for codes in result.codes:
        assert len(codes) == 1024 and all(0 <= c < pipeline.image_vocab_size for c in codes)
    assert set(result.timings) == {"generate", "decode", "rank", "upscale", "encode"}
    assert result.timings["upscale"] > 0


def test_same_seed_gives_same_images_alone_and_inside_a_mixed_batch(pipeline: Pipeline) -> None:
    mine = Job("красный дом у реки", FAST)
    other = Job("синий кот", replace(FAST, images_to_gen=3, top_k=5, temperature=0.7, seed=99))
    (alone,) = pipeline.run([mine])
    batched = pipeline.run([other, mine])

    assert batched[1].codes == alone.codes
    assert batched[1].images == alone.images
    assert batched[1].clip_scores == pytest.approx(alone.clip_scores, abs=1e-6)
    assert batched[0].codes != alone.codes


def test_top_k_one_is_greedy_so_the_seed_does_not_matter(pipeline: Pipeline) -> None:
    greedy = replace(FAST, images_to_gen=1, top_k=1)
    a, b = pipeline.run([Job("кот", replace(greedy, seed=1)), Job("кот", replace(greedy, seed=2))])
    assert a.codes == b.codes


def test_out_of_memory_splits_the_batch_and_retries_with_the_same_result(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = Job("кот", replace(FAST, images_to_gen=2, images_to_cherry_pick=2))
    (expected,) = pipeline.run([job])

    real_generate = pipeline.decoder.generate
    chunk_sizes: list[int] = []

    def generate_or_oom(requests, on_step=None, max_rows=None):  # type: ignore[no-untyped-def]
        chunk_sizes.append(max_rows)
        if max_rows > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_generate(requests, on_step=on_step, max_rows=max_rows)

    monkeypatch.setattr(pipeline.decoder, "generate", generate_or_oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    limit = pipeline.decoder.max_batch_images
    (retried,) = pipeline.run([job])

    assert chunk_sizes[0] == limit and chunk_sizes[-1] == 1
    assert isinstance(retried, JobResult) and isinstance(expected, JobResult)
    assert retried.codes == expected.codes
    assert pipeline.decoder.max_batch_images == limit  # the halving held for that batch only


def test_out_of_memory_at_one_image_is_a_failed_job_saying_so(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_oom(requests, on_step=None, max_rows=None):  # type: ignore[no-untyped-def]
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(pipeline.decoder, "generate", always_oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    limit = pipeline.decoder.max_batch_images
    (outcome,) = pipeline.run([Job("кот", FAST)])
    assert isinstance(outcome, JobFailed) and "out of GPU memory" in outcome.message
    assert pipeline.decoder.max_batch_images == limit  # the limit is unchanged for the next batch


def test_a_failed_shared_batch_reruns_each_job_alone_so_only_the_faulty_one_fails(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = Job("кот", replace(FAST, seed=21))
    poison = Job("яд", replace(FAST, seed=22))
    (alone,) = pipeline.run([good])
    real_generate = pipeline.decoder.generate
    calls: list[int] = []

    def fail_with_poison(requests, on_step=None, max_rows=None):  # type: ignore[no-untyped-def]
        calls.append(len(requests))
        if any(r.seed == 22 for r in requests):
            raise RuntimeError("a fault that only this job triggers, quoting яд")
        return real_generate(requests, on_step=on_step, max_rows=max_rows)

    released: list[bool] = []
    monkeypatch.setattr(pipeline.decoder, "generate", fail_with_poison)
    monkeypatch.setattr("app.engine.pipeline.release_memory", lambda: released.append(True))
    ok, bad = pipeline.run([good, poison])
    assert calls == [2, 1, 1]  # the shared batch, then each job alone
    assert isinstance(ok, JobResult) and isinstance(alone, JobResult) and ok.codes == alone.codes
    assert isinstance(bad, JobFailed) and "RuntimeError" in bad.message and "яд" not in bad.message
    assert released  # memory is released before the jobs run again


def test_a_job_whose_input_fails_late_fails_alone_and_its_partners_neither_fail_nor_rerun(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = Job("кот", replace(FAST, seed=41))
    (alone,) = pipeline.run([good])
    # A lone surrogate passes a str check but cannot be encoded: the tokenizer fails on it, late.
    bad = Job("кот \ud800", replace(FAST, seed=42))
    real_generate = pipeline.decoder.generate
    calls: list[int] = []

    def counting(requests, on_step=None, max_rows=None):  # type: ignore[no-untyped-def]
        calls.append(len(requests))
        return real_generate(requests, on_step=on_step, max_rows=max_rows)

    monkeypatch.setattr(pipeline.decoder, "generate", counting)
    seen: list[list[object]] = []
    failed, ok = pipeline.run([bad, good], on_step=lambda progress: seen.append(list(progress)))
    assert calls == [1]  # one decode, of the good job only: nothing reran
    assert isinstance(failed, JobFailed) and failed.invalid and "\ud800" not in failed.message
    assert isinstance(ok, JobResult) and isinstance(alone, JobResult) and ok.codes == alone.codes
    assert seen and all(p[0] is None and p[1] is not None for p in seen)  # progress keeps batch order


def test_a_stopped_job_in_a_rerun_stays_stopped(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    real_generate = pipeline.decoder.generate

    def fail_shared(requests, on_step=None, max_rows=None):  # type: ignore[no-untyped-def]
        if len(requests) > 1:
            raise RuntimeError("shared batch fault")
        return real_generate(requests, on_step=on_step, max_rows=max_rows)

    monkeypatch.setattr(pipeline.decoder, "generate", fail_shared)
    jobs = [Job("кот", replace(FAST, seed=31)), Job("пёс", replace(FAST, seed=32))]
    # The second job's requester is gone: its rerun is stopped at the first tick, the first runs.
    first, second = pipeline.run(jobs, on_step=lambda progress: [1])
    assert isinstance(first, JobResult) and second is None


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_batch_invariance_caps_cpu_threads_where_mkl_splits_rows(
    tiny_model_dir: Path, batch_invariant: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # From 12 threads on MKL gives a row other bits by its place in the batch, so the invariant pipeline
    # runs the CPU at MAX_INVARIANT_THREADS and says so; without invariance it keeps the threads it got.
    before = torch.get_num_threads()
    torch.set_num_threads(12)
    try:
        with caplog.at_level("WARNING", logger="app.engine.pipeline"):
            Pipeline.load(tiny_model_dir, device="cpu", batch_invariant=batch_invariant)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    warned = [r for r in caplog.records if "batch_invariant" in r.getMessage()]
    if batch_invariant:
        assert threads == MAX_INVARIANT_THREADS
        assert len(warned) == 1 and "8 of 12 threads" in warned[0].getMessage()
    else:
        assert threads == 12 and not warned


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_image_writes_the_requested_format(fmt: str, pil_format: str) -> None:
    pixels = torch.randint(0, 256, (16, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = _image(encode_image(pixels.numpy(), fmt))
    assert image.format == pil_format and image.size == (24, 16)


def test_png_encoding_is_lossless() -> None:
    pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    decoded = np.array(_image(encode_image(pixels.numpy(), "png")))
    assert np.array_equal(decoded, pixels.numpy())


def test_resolve_dtype_rejects_half_precision_on_the_cpu_and_unknown_names() -> None:
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32
    with pytest.raises(ValueError, match="dtype: fp16 needs a CUDA device"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="dtype: 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_describe_reports_architecture_and_placement(pipeline: Pipeline) -> None:
    info = pipeline.describe()
    assert info["transformer"]["num_layers"] == pipeline.manifest.dalle.num_layers
    assert info["transformer"]["parameters"] > 0
    assert info["placement"]["main_device"] == "cpu"
    assert info["max_batch_images"] == pipeline.max_batch_images


def test_generate_cli_writes_images_and_result_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = generate.main([
        "--model_dir", str(tiny_model_dir), "--query", "Кот в шляпе", "--out", str(out),
        "--images_to_gen", "2", "--images_to_cherry_pick", "1", "--no-super_res", "--seed", "5",
        "--format", "png", "--top_k", "64",
    ])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["seed"] == 5 and result["files"] == ["00.png"]
    assert len(result["codes"]) == 1 and len(result["codes"][0]) == 1024
    assert Image.open(out / "00.png").size == (256, 256)


def test_generate_cli_rejects_a_bad_param_naming_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = generate.main([
        "--model_dir", str(tiny_model_dir), "--query", "кот", "--out", str(tmp_path), "--top_p", "1.5",
    ])
    assert code == 2
    assert "top_p" in capsys.readouterr().err
    assert not (tmp_path / "result.json").exists()


def test_progress_reports_each_job_per_image_row_without_previews(pipeline: Pipeline) -> None:
    seen: list[list] = []
    previewed = Job("кот", replace(FAST, images_to_gen=2, preview_every=8))
    plain = Job("собака", replace(FAST, images_to_gen=1, seed=12))
    results = pipeline.run([previewed, plain], on_step=lambda progress: seen.append(list(progress)))

    assert len(seen) == 32  # one tick per image row of the 32x32 grid
    assert [p.step for p, _ in seen] == [32 * (k + 1) for k in range(32)]
    assert all(p.steps == 1024 and q.step == p.step for p, q in seen)
    # Previews go to `Job.on_preview`, drawn on their own thread (tests/engine/test_previews.py).
    assert all(p.preview is None and q.preview is None for p, q in seen)
    assert isinstance(results[0], JobResult) and isinstance(results[1], JobResult)


def test_a_job_stopped_from_the_progress_callback_ends_as_none_and_its_partner_finishes(
    pipeline: Pipeline,
) -> None:
    mine = Job("кот", FAST)
    (alone,) = pipeline.run([mine])

    def stop_the_first(progress: list) -> list[int]:
        return [0] if progress[0] is not None and progress[0].step >= 64 else []

    stopped, kept = pipeline.run([Job("собака", replace(FAST, seed=5)), mine], on_step=stop_the_first)
    assert stopped is None
    assert isinstance(kept, JobResult) and kept.codes == alone.codes


def _prompt_image_b64() -> str:
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray((rng.random((300, 200, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("crop_first", [False, True])
def test_image_prompt_keeps_its_encoded_bands_and_batches_with_plain_jobs(
    pipeline: Pipeline, crop_first: bool
) -> None:
    from app.engine.image_prompt import decode_image, prompt_codes
    from app.engine.params import ImagePrompt

    prompt = ImagePrompt(_prompt_image_b64(), {"up": 4, "down": 0, "left": 2, "right": 0}, crop_first)
    job = Job("кот", replace(FAST, images_to_gen=2, image_prompt=prompt))
    image = decode_image(prompt.image, 10**6)
    forced = prompt_codes(pipeline.vqgan_encoder, image, prompt.borders, crop_first, 32)
    assert int((forced >= 0).sum()) == 4 * 32 + 28 * 2  # 4 rows, then 2 columns of the 28 rows below

    (alone,) = pipeline.run([job])
    plain = Job("собака", replace(FAST, seed=3))
    batched = pipeline.run([plain, job])
    (plain_alone,) = pipeline.run([plain])
    for codes in alone.codes:
        assert torch.equal(torch.tensor(codes)[forced >= 0], forced[forced >= 0])
    assert batched[1].codes == alone.codes and batched[1].images == alone.images
    assert batched[0].codes == plain_alone.codes  # the plain job is undisturbed by its partner's prompt


def test_generate_cli_completes_an_image_prompt_keeping_its_bands(
    pipeline: Pipeline, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from app.engine.image_prompt import decode_image, prompt_codes

    photo = tmp_path / "photo.png"
    photo.write_bytes(base64.b64decode(_prompt_image_b64()))
    out = tmp_path / "out"
    code = generate.main([
        "--model_dir", str(tiny_model_dir), "--query", "кот", "--out", str(out), "--images_to_gen", "1",
        "--images_to_cherry_pick", "1", "--no-super_res", "--seed", "5", "--top_k", "64",
        "--image_prompt", str(photo), "--borders", "up=3,right=5", "--crop_first",
    ])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["params"]["image_prompt"] == {"borders": {"up": 3, "down": 0, "left": 0, "right": 5},
                                                "crop_first": True}
    borders = {"up": 3, "right": 5}
    image = decode_image(_prompt_image_b64(), 10**6)
    forced = prompt_codes(pipeline.vqgan_encoder, image, borders, True, 32)
    codes = torch.tensor(result["codes"][0])
    assert torch.equal(codes[forced >= 0], forced[forced >= 0])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--borders", "up=4"], "--borders and --crop_first need --image_prompt"),
        (["--image_prompt", "missing.png", "--borders", "up=4"], "cannot read"),
        (["--image_prompt", "PHOTO", "--borders", "up=40"], "image_prompt.borders.up"),
    ],
)
def test_generate_cli_rejects_bad_image_prompt_arguments(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(base64.b64decode(_prompt_image_b64()))
    args = [str(photo) if a == "PHOTO" else a for a in args]
    base = ["--model_dir", str(tiny_model_dir), "--query", "кот", "--out", str(tmp_path)]
    code = generate.main([*base, *args])
    assert code == 2 and needle in capsys.readouterr().err
