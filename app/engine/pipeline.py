"""One batch of jobs: tokenize -> sample tokens -> VQ-GAN decode -> ruCLIP rank -> upscale -> encode.

The pipeline is synchronous and owns no threads: the scheduler calls `Pipeline.run` from its single GPU
worker thread with the jobs it merged into one batch. Every stage is a short function that returns a
named result, so a reader can follow the data path top to bottom.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

        ``on_step`` gets every job's `Progress` once per completed image row (with previews for the
        jobs that asked) and may name jobs to stop (see ``OnProgress``): a stopped job's outcome is
        None and it costs no further time; the other jobs go on unchanged.

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
        with torch.inference_mode():
            self._generate(states, requests, on_step)
            for st in states:
                if st.output is None:
                    continue
                self._decode(st)
                self._rank(st)
                self._upscale(st)
                self._encode(st)
        return [self._result(st) if st.output is not None else None for st in states]

    def _generate(self, states: list[_JobState], requests: list[GenerationRequest],
                  on_step: OnProgress | None) -> None:
        t0 = time.perf_counter()
        tick = None if on_step is None else self._progress_reporter([st.job for st in states], on_step)
        outputs = self._generate_splitting_on_oom(requests, tick)
        elapsed = time.perf_counter() - t0
        for st, out in zip(states, outputs, strict=True):
            st.output = out
            st.timings["generate"] = elapsed  # the batch's wall time: every job waited for all of it

    def _progress_reporter(self, jobs: Sequence[Job], on_step: OnProgress) -> OnStep:
        """The decoder's tick, as every job's `Progress`; renders a job's preview when one is due."""
        steps = self.manifest.dalle.image_seq_length
        per_row = self.manifest.dalle.image_tokens_per_dim
        previewed = [0] * len(jobs)  # image rows of the last preview sent, per job

        def tick(t: Tick) -> Collection[int] | None:
            progress: list[Progress | None] = []
            for n, job in enumerate(jobs):
                step = t.done[n] // job.params.images_to_gen
                every, rows = job.params.preview_every, step // per_row
                preview = None
                if every and rows >= previewed[n] + every:
                    previewed[n] = rows - rows % every
                    preview = self.render_preview(t.partial(n))
                progress.append(Progress(step=step, steps=steps, preview=preview))
            return on_step(progress)

        return tick

    def render_preview(self, partial: torch.Tensor) -> list[str]:
        """Partial codes [n, image_seq_length] (-1: not sampled yet) -> one base64 JPEG per image,
        PREVIEW_SIZE square, decoded through the VQ-GAN with the cells of unsampled tokens grey."""
        t0 = time.perf_counter()
        per_row = self.manifest.dalle.image_tokens_per_dim
        known = (partial >= 0).view(-1, per_row, per_row)  # [n, rows, cols]
        pixels = self.vqgan.decode(partial.clamp(min=0).to(self.main_device)).cpu()  # uint8 [n, H, W, 3]
        cell = pixels.shape[1] // per_row
        mask = known.repeat_interleave(cell, 1).repeat_interleave(cell, 2)  # [n, H, W]
        pixels[~mask] = PREVIEW_GREY
        out = []
        for px in pixels:
            image = Image.fromarray(px.numpy())
            if image.size != (PREVIEW_SIZE, PREVIEW_SIZE):
                image = image.resize((PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        log.debug("preview of %d image(s) in %.3f s", len(out), time.perf_counter() - t0)
        return out

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


def encode_image(pixels: np.ndarray, fmt: str) -> str:
    """uint8 [H, W, 3] -> base64 of a JPEG, PNG or WebP file."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=FORMATS[fmt], quality=95)
    return base64.b64encode(buf.getvalue()).decode("ascii")
