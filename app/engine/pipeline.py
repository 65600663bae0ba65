"""One batch of jobs: tokenize -> sample tokens -> VQ-GAN decode -> ruCLIP rank -> upscale -> encode.

The pipeline is synchronous: the scheduler calls `Pipeline.run` from its single GPU worker thread with
the jobs it merged into one batch. Every stage is a short function that returns a named result, so a
reader can follow the data path top to bottom. Previews alone are drawn on a thread of their own
(`app.engine.previews`), so that they never hold the decode up.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.engine import placement, store
from app.engine.image_prompt import decode_image, prompt_codes
from app.engine.jobs import Job, JobFailed, JobResult, OnProgress, Outcome, Progress
from app.engine.nets.clip import ClipRanker
from app.engine.nets.dalle import DalleModel
from app.engine.nets.decoding import (
    GenerationOutput,
    GenerationRequest,
    ImageTokenDecoder,
    OnStep,
    SamplingParams,
    Tick,
)
from app.engine.nets.realesrgan import RRDBNet, upscale_batch
from app.engine.nets.vqgan import VQGANDecoder, VQGANEncoder
from app.engine.params import FORMATS, MAX_IMAGE_PROMPT_PIXELS, STAGES, ImagePrompt
from app.engine.previews import Deliver, PreviewRenderer
from app.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Previews are this size whatever the model's image size, JPEG at this quality; unsampled rows grey.
PREVIEW_SIZE = 256
PREVIEW_QUALITY = 80
PREVIEW_GREY = 128


@dataclass
class Ranked:
    order: list[int]  # indices into the generated images, best first, cut to images_to_cherry_pick
    scores: list[float]


#: Intra-op threads on the CPU with batch invariance: measured clean at 1..11, not at 12, 15, 16 or 32.
MAX_INVARIANT_THREADS = 8


@dataclass
class _JobState:
    """What one job has accumulated while its batch moves through the stages."""

    job: Job
    output: GenerationOutput | None = None
    pixels: torch.Tensor | None = None  # uint8 [n, H, W, 3]
    ranked: Ranked | None = None
    kept: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3] each, best first
    encoded: list[str] = field(default_factory=list)
    preview_step: int = 0  # the step of the newest grid handed to the preview renderer
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


def resolve_dtype(spec: str | torch.dtype | None, device: str) -> torch.dtype:
    """`auto`: fp32 on the CPU, fp16 on CUDA, the precision ruDALL-E runs its published weights in
    (with the attention-output clamp). bf16 is there on request, from Ampere (compute capability 8) on.
    """
    if isinstance(spec, torch.dtype):
        return spec
    if spec in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if spec not in DTYPES:
        raise ValueError(f"dtype: {spec!r} is not one of auto, {', '.join(DTYPES)}")
    if spec != "fp32" and not device.startswith("cuda"):
        raise ValueError(f"dtype: {spec} needs a CUDA device; the CPU runs fp32")
    if spec == "bf16" and torch.cuda.get_device_capability(torch.device(device))[0] < 8:
        raise ValueError(f"dtype: bf16 needs compute capability 8.0 or later (Ampere); {device} has less")
    return DTYPES[spec]


class Pipeline:
    """Every network of one model directory, placed on its devices, and the batch path through them."""

    def __init__(
        self,
        manifest: store.Manifest,
        tokenizer: Tokenizer,
        dalle: DalleModel,
        decoder: ImageTokenDecoder,
        vqgan: VQGANDecoder,
        realesrgan: RRDBNet,
        clip: ClipRanker,
        plan: placement.PlacementPlan,
        dtype: torch.dtype,
        vqgan_encoder: VQGANEncoder | None = None,
    ) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.dalle = dalle
        self.decoder = decoder
        self.vqgan = vqgan
        self.realesrgan = realesrgan
        self.clip = clip
        self.plan = plan
        self.dtype = dtype
        self.main_device = torch.device(plan.main_device)
        self.image_vocab_size = manifest.dalle.image_vocab_size
        self.vqgan_encoder = vqgan_encoder  # image prompts; None: a pipeline that cannot take them
        # Previews are drawn on their own thread, never on the decode thread (SPEC section 7).
        self.previews = PreviewRenderer(self.render_preview, self.main_device)

    @property
    def max_batch_images(self) -> int:
        """Images decoded together: the memory-derived limit the scheduler merges requests up to."""
        return self.decoder.max_batch_images

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_batch_images: int | None = None,
        batch_invariant: bool = True,
    ) -> Pipeline:
        """Load and place every component of `model_dir`; raises store.ModelStoreError naming the bad file.

        `batch_invariant`: a seed's images do not depend on what shares its batch (see
        app/engine/nets/decoding.py); off, small batches decode a little faster and may differ in bits.
        """
        t0 = time.perf_counter()
        manifest = store.load_manifest(model_dir)
        store.check_files_present(manifest)
        names = placement.parse_devices(device)
        torch_dtype = resolve_dtype(dtype, names[0])
        specs = placement.probe_devices(names)
        plan = placement.plan_placement(manifest.dalle, specs, torch_dtype, max_batch_images or None)
        log.info("placement: %s", plan.describe())
        main = torch.device(plan.main_device)
        if batch_invariant and main.type == "cpu" and torch.get_num_threads() > MAX_INVARIANT_THREADS:
            # MKL splits a product's rows between threads from 12 threads on, and rows then get other bits
            # by their place in the batch (tests/engine/nets/test_batch_invariance.py); 1..11 are clean.
            log.warning("batch_invariant on the CPU: using %d of %d threads (more split a product's rows "
                        "with other bits)", MAX_INVARIANT_THREADS, torch.get_num_threads())
            torch.set_num_threads(MAX_INVARIANT_THREADS)
        dalle = store.load_dalle(manifest, plan.device_map, torch_dtype)
        on_cuda = main.type == "cuda"
        decoder = ImageTokenDecoder(
            dalle,
            max_batch_images=plan.batch_limit,
            windowed=True,
            microbatches=len(plan.stages) if len(plan.stages) > 1 else 1,
            capture_graphs=on_cuda,
            batch_invariant=batch_invariant,
        )
        # The decoders are small next to the transformer: keep them in fp32, as upstream runs them, so
        # pixels match the reference exactly (bf16 VQ-GAN decoding is off by up to 9 levels).
        vqgan = store.load_vqgan(manifest, main, torch.float32)
        # fp32 too: in half precision the argmax over codes can flip between two near-equal codes.
        vqgan_encoder = store.load_vqgan_encoder(manifest, main, torch.float32)
        realesrgan = store.load_realesrgan(manifest, main, torch.float32)
        clip = store.load_clip(manifest, main, torch.float32)
        tokenizer = store.load_tokenizer(manifest)
        log.info("model %s loaded in %.1f s", manifest.name, time.perf_counter() - t0)
        return cls(manifest, tokenizer, dalle, decoder, vqgan, realesrgan, clip, plan, torch_dtype,
                   vqgan_encoder=vqgan_encoder)

    # ---- the batch path -------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job], on_step: OnProgress | None = None) -> list[Outcome]:
        """Run one merged batch; every job keeps its own params and seed. One outcome per job.

        ``on_step`` gets every job's `Progress` once per completed image row and may name jobs to stop
        (see ``OnProgress``): a stopped job's outcome is None and it costs no further time; the other
        jobs go on unchanged. A job with `preview_every` and an `on_preview` gets its previews there, from
        the renderer's thread (`app.engine.previews`), when `wants_preview` says someone would see one:
        in step order, coalesced to the newest grid when the renderer falls behind, the newest one of a
        finished job always drawn, and none after `run` returns.

        Failures end here, not in the caller. A job whose input cannot be prepared (tokenized, its image
        prompt encoded) fails alone with an `invalid` `JobFailed` before the batch decodes: the others
        neither fail nor rerun. An out-of-memory halves the decode chunk and tries again (same seeds,
        same images); a batch that still fails releases its memory and runs each job alone, so only a
        job that fails by itself gets a `JobFailed`.
        """
        outcomes: list[Outcome] = [None] * len(jobs)
        ready: list[tuple[int, GenerationRequest]] = []
        for n, job in enumerate(jobs):
            try:
                ready.append((n, self._request(job)))
            except Exception as exc:  # the job's own input: the message names no prompt
                log.warning("job %d of %d: its input could not be prepared (%s)", n, len(jobs),
                            type(exc).__name__)
                outcomes[n] = JobFailed(f"the request's input could not be used ({type(exc).__name__})",
                                        invalid=True)
        if ready:
            members = [n for n, _ in ready]
            done = self._run_prepared([jobs[n] for n in members], [r for _, r in ready],
                                      _subset(members, len(jobs), on_step))
            for n, outcome in zip(members, done, strict=True):
                outcomes[n] = outcome
        return outcomes

    def _run_prepared(self, jobs: Sequence[Job], requests: list[GenerationRequest],
                      on_step: OnProgress | None) -> list[Outcome]:
        try:
            return list(self._run_batch(jobs, requests, on_step))
        except Exception as exc:
            # The traceback goes to the log (no prompt in it); the job gets a short, generic reason.
            log.exception("batch of %d job(s), %d image(s) failed", len(jobs), _images(jobs))
            message = failure_message(exc, _images(jobs))
        # Outside the except block the failed run's frames, and the tensors they held, are gone.
        release_memory()
        if len(jobs) == 1:
            return [JobFailed(message)]
        log.info("retrying each of the %d jobs of the failed batch alone", len(jobs))
        return [self._run_prepared([job], [req], _subset([n], len(jobs), on_step))[0]
                for n, (job, req) in enumerate(zip(jobs, requests, strict=True))]

    def _run_batch(self, jobs: Sequence[Job], requests: list[GenerationRequest],
                   on_step: OnProgress | None) -> list[JobResult | None]:
        states = [_JobState(job) for job in jobs]
        run = object()
        keys = [(run, n) for n in range(len(jobs))]  # this run's jobs in the preview renderer
        try:
            with torch.inference_mode():
                self._generate(states, requests, on_step, keys)
                for key, st in zip(keys, states, strict=True):
                    if st.output is None:
                        continue
                    self._decode(st)
                    self._finished_preview(key, st, st.job.on_preview)
                    self._rank(st)
                    self._upscale(st)
                    self._encode(st)
            # A job whose newest preview is a partial grid gets it drawn (while the stages ran, mostly).
            for key, st in zip(keys, states, strict=True):
                if st.output is not None and st.preview_step:
                    self.previews.flush(key)
        finally:
            for key in keys:  # no preview of these jobs after this: their results come after `run`
                self.previews.close(key)
        return [self._result(st) if st.output is not None else None for st in states]

    def _finished_preview(self, key: Hashable, st: _JobState, deliver: Deliver | None) -> None:
        """When a preview was due at the last row, it is the job's decoded images: JPEG those here (the
        VQ-GAN ran anyway) rather than wait for the renderer to decode the same codes again."""
        steps = self.manifest.dalle.image_seq_length
        if deliver is None or st.preview_step != steps:
            return
        st.preview_step = 0  # settled here
        if self.previews.close(key) < steps:
            assert st.pixels is not None
            deliver(steps, preview_jpegs(st.pixels))

    def _generate(self, states: list[_JobState], requests: list[GenerationRequest],
                  on_step: OnProgress | None, keys: list[tuple[object, int]]) -> None:
        t0 = time.perf_counter()
        jobs = [st.job for st in states]
        previews = any(job.on_preview is not None and job.params.preview_every for job in jobs)
        tick = self._progress_reporter(states, on_step, keys) if on_step is not None or previews else None
        outputs = self._generate_splitting_on_oom(requests, tick)
        elapsed = time.perf_counter() - t0
        for st, out in zip(states, outputs, strict=True):
            st.output = out
            st.timings["generate"] = elapsed  # the batch's wall time: every job waited for all of it

    def finish_job(self, job: Job, output: GenerationOutput, generate_s: float, *,
                   previews: tuple[Hashable, int, Deliver] | None = None) -> Outcome:
        """A job whose codes are sampled (continuous batching): VQ-GAN decode, rank, upscale, encode.
        Safe on another thread than the decode loop's; a failure fails this job only.

        `previews`: (its key in `self.previews`, the step of the newest grid handed over, where its
        previews go). Its previews are then settled before this returns, as `run` settles its jobs': a
        finished grid is JPEG'd from the decoded images, a newer partial one is drawn, and none is
        delivered after this returns."""
        st = _JobState(job, output=output)
        st.timings["generate"] = generate_s
        if previews is not None:
            st.preview_step = previews[1]
        try:
            with torch.inference_mode():
                self._decode(st)
                if previews is not None:
                    self._finished_preview(previews[0], st, previews[2])
                self._rank(st)
                self._upscale(st)
                self._encode(st)
            if previews is not None and st.preview_step:
                self.previews.flush(previews[0])
            return self._result(st)
        except Exception as exc:
            log.exception("finishing a job of %d image(s) failed", job.params.images_to_gen)
            message = failure_message(exc, job.params.images_to_gen)
        finally:
            if previews is not None:
                self.previews.close(previews[0])
        release_memory()
        return JobFailed(message)

    def _progress_reporter(self, states: Sequence[_JobState], on_step: OnProgress | None,
                           keys: list[tuple[object, int]]) -> OnStep:
        """The decoder's tick, as every job's `Progress`; hands a job's grid to the preview renderer
        when a preview is due and someone would see it (`Job.on_preview`, `Job.wants_preview`)."""
        steps = self.manifest.dalle.image_seq_length
        per_row = self.manifest.dalle.image_tokens_per_dim
        previewed = [0] * len(states)  # image rows of the last preview due, per job

        def tick(t: Tick) -> Collection[int] | None:
            progress: list[Progress | None] = []
            for n, st in enumerate(states):
                job = st.job
                step = t.done[n] // job.params.images_to_gen
                every, rows = job.params.preview_every, step // per_row
                if every and job.on_preview is not None and rows >= previewed[n] + every:
                    previewed[n] = rows - rows % every
                    if job.wants_preview is None or job.wants_preview():
                        # A CPU copy of the grid (small ints): the renderer's thread draws it while the
                        # decode goes on, and never reads the decoder's own tensors.
                        self.previews.submit(keys[n], step, t.partial(n), job.on_preview)
                        st.preview_step = step
                progress.append(Progress(step=step, steps=steps))
            stop = on_step(progress) if on_step is not None else None
            for n in stop or ():
                self.previews.drop(keys[n])  # a stopped job's pending grid is not worth drawing
            return stop

        return tick

    def render_preview(self, partial: torch.Tensor) -> list[str]:
        """Partial codes [n, image_seq_length] (-1: not sampled yet) -> one base64 JPEG per image,
        PREVIEW_SIZE square, decoded through the VQ-GAN with the cells of unsampled tokens grey.

        Only the rows sampled so far go through the VQ-GAN (the rest would be painted grey anyway), so a
        preview early in the grid costs a fraction of a full decode; near the edge of the sampled rows
        its pixels may differ a little from what the whole grid decodes to."""
        t0 = time.perf_counter()
        per_row = self.manifest.dalle.image_tokens_per_dim
        known = (partial >= 0).view(-1, per_row, per_row)  # [n, rows, cols]
        rows = max(1, int(known.any(2).sum(1).max()))  # rows with a sampled cell, in the furthest image
        pixels = self._decode_rows(partial[:, : rows * per_row].clamp(min=0), rows)  # uint8 [n, h, W, 3]
        cell = pixels.shape[2] // per_row
        full = torch.full((pixels.shape[0], per_row * cell, per_row * cell, pixels.shape[3]), PREVIEW_GREY,
                          dtype=torch.uint8)
        full[:, : pixels.shape[1]] = pixels
        mask = known.repeat_interleave(cell, 1).repeat_interleave(cell, 2)  # [n, H, W]
        full[~mask] = PREVIEW_GREY
        out = preview_jpegs(full)
        log.debug("preview of %d image(s), %d row(s), in %.3f s", len(out), rows, time.perf_counter() - t0)
        return out

    def _decode_rows(self, codes: torch.Tensor, rows: int) -> torch.Tensor:
        """VQ-GAN decode of the top `rows` rows of each grid: codes [n, rows * per_row] -> uint8 [n, h, W, 3]
        on the CPU (the decoder is convolutional, with attention over whatever grid it is given)."""
        vq = self.vqgan
        weight = vq.quantize.embed.weight
        outs = []
        for i in range(0, codes.shape[0], vq.chunk):
            z = F.embedding(codes[i : i + vq.chunk].to(weight.device), weight)  # [b, rows * cols, embed]
            z = z.transpose(1, 2).reshape(z.shape[0], -1, rows, codes.shape[1] // rows)  # [b, e, rows, cols]
            x = vq.decoder(vq.post_quant_conv(z))  # [b, 3, h, W]
            outs.append(((x.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(outs)

    def _request(self, job: Job) -> GenerationRequest:
        cfg = self.manifest.dalle
        p = job.params
        return GenerationRequest(
            text_ids=self.tokenizer.encode(job.query, cfg.text_seq_length),
            num_images=p.images_to_gen,
            sampling=SamplingParams(top_k=p.top_k, top_p=p.top_p, temperature=p.temperature),
            seed=p.seed,
            forced=None if p.image_prompt is None else self.prompt_codes(p.image_prompt),
        )

    def prompt_codes(self, prompt: ImagePrompt) -> torch.Tensor:
        """The image prompt's forced codes [image_seq_length] long (-1 where sampled), as upstream's
        ImagePrompts computes them from the VQ-GAN encoder of the same checkpoint."""
        if self.vqgan_encoder is None:
            raise RuntimeError("this pipeline was built without the VQ-GAN encoder")
        image = decode_image(prompt.image, MAX_IMAGE_PROMPT_PIXELS)
        per_dim = self.manifest.dalle.image_tokens_per_dim
        return prompt_codes(self.vqgan_encoder, image, prompt.borders, prompt.crop_first, per_dim)

    def _generate_splitting_on_oom(
        self, requests: list[GenerationRequest], on_step: OnStep | None
    ) -> list[GenerationOutput | None]:
        # Per-row random streams make the codes independent of how rows are chunked, so halving the
        # chunk size after an out-of-memory retries the same work with the same result. The halving
        # holds for this batch only: one transient OOM must not shrink every later batch.
        rows = self.decoder.max_batch_images
        while True:
            try:
                return self.decoder.generate(requests, on_step=on_step, max_rows=rows)
            except torch.cuda.OutOfMemoryError:
                if rows <= 1:
                    raise
            rows = max(1, rows // 2)
            self.decoder.release_caches()  # the next try allocates caches for the smaller chunks
            release_memory()
            log.warning("CUDA out of memory: retrying in chunks of %d", rows)

    def _decode(self, st: _JobState) -> None:
        t0 = time.perf_counter()
        assert st.output is not None
        st.pixels = self.vqgan.decode(st.output.codes.to(self.main_device)).cpu()
        st.timings["decode"] = time.perf_counter() - t0

    def _rank(self, st: _JobState) -> None:
        t0 = time.perf_counter()
        assert st.pixels is not None
        images = [Image.fromarray(px.numpy()) for px in st.pixels]
        text_latent = self.clip.text_latents([st.job.query])[0]
        scores = self.clip.score(images, text_latent).float().cpu()
        keep = min(st.job.params.images_to_cherry_pick, len(images))
        order = torch.argsort(scores, descending=True, stable=True)[:keep].tolist()
        st.ranked = Ranked(order=order, scores=[float(scores[i]) for i in order])
        st.timings["rank"] = time.perf_counter() - t0

    def _upscale(self, st: _JobState) -> None:
        t0 = time.perf_counter()
        assert st.pixels is not None and st.ranked is not None
        kept = [st.pixels[i].numpy() for i in st.ranked.order]
        if st.job.params.super_res:
            kept = upscale_batch(self.realesrgan, kept)  # tiles of all kept images share forward passes
        st.kept = kept
        st.timings["upscale"] = time.perf_counter() - t0

    def _encode(self, st: _JobState) -> None:
        t0 = time.perf_counter()
        st.encoded = [encode_image(img, st.job.params.format) for img in st.kept]
        st.timings["encode"] = time.perf_counter() - t0

    def _result(self, st: _JobState) -> JobResult:
        assert st.output is not None and st.ranked is not None
        order = st.ranked.order
        return JobResult(
            images=st.encoded,
            clip_scores=st.ranked.scores,
            ppl=[float(st.output.ppl[i]) for i in order],
            seed=st.job.params.seed,
            timings={k: round(v, 4) for k, v in st.timings.items()},
            codes=[st.output.codes[i].tolist() for i in order],
        )

    def describe(self) -> dict[str, Any]:
        """Architecture and placement, for the model card and the start-up log."""
        cfg = self.manifest.dalle
        return {
            "name": self.manifest.name,
            "transformer": {
                "num_layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "text_seq_length": cfg.text_seq_length,
                "image_tokens_per_dim": cfg.image_tokens_per_dim,
                "vocab_size": cfg.vocab_size,
                "image_vocab_size": cfg.image_vocab_size,
                "hf_version": cfg.hf_version,
                "parameters": sum(p.numel() for p in self.dalle.parameters()),
            },
            "dtype": str(self.dtype).removeprefix("torch."),
            "placement": self.plan.describe(),
            "max_batch_images": self.decoder.max_batch_images,
        }


def _images(jobs: Sequence[Job]) -> int:
    return sum(job.params.images_to_gen for job in jobs)


def _subset(members: list[int], jobs: int, on_step: OnProgress | None) -> OnProgress | None:
    """`on_step` of a batch of `jobs` jobs, as seen by its jobs `members` run on their own (indices
    0.. there, in that order); the other jobs have no news."""
    if on_step is None:
        return None

    def tick(progress: Sequence[Progress | None]) -> list[int]:
        seen: list[Progress | None] = [None] * jobs
        for k, n in enumerate(members):
            seen[n] = progress[k]
        stop = set(on_step(seen) or ())
        return [k for k, n in enumerate(members) if n in stop]

    return tick


def failure_message(exc: BaseException, images: int) -> str:
    """What a client is told about a failed batch: out of memory, or generic (never the exception text)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return (
            f"out of GPU memory while generating a batch of {images} image(s); "
            "retry, or ask for fewer images_to_gen"
        )
    return f"generation failed ({type(exc).__name__}); the server keeps serving, retry the request"


def release_memory() -> None:
    """Return cached CUDA memory to the driver (a no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def preview_jpegs(pixels: torch.Tensor) -> list[str]:
    """uint8 [n, H, W, 3] -> one base64 JPEG per image, PREVIEW_SIZE square."""
    out = []
    for px in pixels:
        image = Image.fromarray(px.numpy())
        if image.size != (PREVIEW_SIZE, PREVIEW_SIZE):
            image = image.resize((PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def encode_image(pixels: np.ndarray, fmt: str) -> str:
    """uint8 [H, W, 3] -> base64 of a JPEG, PNG or WebP file."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=FORMATS[fmt], quality=95)
    return base64.b64encode(buf.getvalue()).decode("ascii")
