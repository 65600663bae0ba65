"""Fast image-token decoder for ruDALL-E on the model's own KV caches, one token per step.

The model does the cached forward (``DalleModel.setup_caches``/``prefill``/``step``, caches in
``app.engine.nets.kv_cache``): the text is prefilled once per request of a chunk, its keys and values
copied into the cache rows of that request's images; each step feeds the newest image token through
every layer against the caches and computes only the image columns of ``to_logits``.

This module keeps what is the decoder's own: chunks of rows from several requests, micro-batches that
advance in lockstep over the stages of a model split across devices (each device's layers a segment),
sampling, stopping requests at progress ticks, and CUDA-graph capture of the step's segments.

Row-mask layers see text keys and the last ``row_window(cfg)`` positions only, so with ``windowed=True``
they keep a ring buffer of that many positions after the text instead of the whole sequence.

Sequence positions: image token j sits at position ``n_text + j`` and is sampled from the logits at
position ``n_text + j - 1`` (token 0 from the last text position). The last token is never fed back.

Randomness is one uniform per (image, step), drawn on the CPU from the request's seed, so an image's
tokens do not depend on which other rows share its batch, chunk or micro-batch. Batch invariance: a
matrix product's row is computed by a kernel the library picks by the product's shape, and kernels of
different row counts round differently (MKL: below 11 rows at input width 256, below 16 at 1024 and
more; cuBLAS and flash attention pick tiles, split-K and split-KV by shape). With ``batch_invariant``
(the default) each text is prefilled alone, and on the CPU every linear product runs with at least its
measured row floor (``invariance.row_floor``: 11 or 16 rows with MKL; attention, norms and sampling are
per row there, measured), while on CUDA the whole step runs the chunk's capacity
of rows (``pad_steps``: padding rows decode along and are dropped), so a row's bits do not depend on its
partners, its place in the batch, or partners leaving.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.engine.nets.checks import positive_int
from app.engine.nets.dalle import DalleModel, row_mask_is_window
from app.engine.nets.sampling import request_uniforms, sample_tokens
from app.engine.params import SEED_MAX

log = logging.getLogger(__name__)

#: The largest row floor MKL needs here (input width 1024 and more, 1 and 2 threads); the decoder measures
#: each product's own floor (``invariance.row_floor``), which never exceeded this.
INVARIANT_MIN_ROWS = 16


@dataclass
class Tick:
    """What the decoder tells its progress callback, once per completed image row of the current chunk.

    ``steps``: decode steps done so far, summed over chunks. ``done[r]``: image positions request ``r``
    has sampled so far, summed over its images (``num_images * image_seq_length`` when it is complete).
    ``partial(r)``: request ``r``'s codes so far, [num_images, image_seq_length] long on the CPU, -1 at
    positions not sampled yet; it copies from the device, so call it only when a preview is wanted.
    """

    steps: int
    done: list[int]
    partial: Callable[[int], torch.Tensor]


#: The progress callback: gets a ``Tick``, returns the indices of the requests to stop (their rows
#: leave the batch at once; the other rows go on with unchanged codes), or None.
OnStep = Callable[[Tick], Collection[int] | None]


@dataclass(frozen=True)
class SamplingParams:
    top_k: int
    top_p: float
    temperature: float


@dataclass
class GenerationRequest:
    text_ids: torch.Tensor  # [text_seq_length], from Tokenizer.encode (pads = 0, no v2 prefix)
    num_images: int
    sampling: SamplingParams
    seed: int
    # [image_seq_length] long: the code every image of the request takes at that position (an image
    # prompt), -1 where it is sampled. Forced tokens are fed like sampled ones, so they enter the caches.
    forced: torch.Tensor | None = None


@dataclass
class GenerationOutput:
    codes: torch.Tensor  # [num_images, image_seq_length] long, CPU
    ppl: torch.Tensor  # [num_images] float32, CPU


@dataclass
class _Segment:
    """Consecutive pieces of the step on one device; the unit of CUDA graph capture."""

    device: torch.device
    has_embed: bool
    layers: list[int]
    has_head: bool
    capturable: bool


@dataclass
class _Group:
    """A micro-batch: rows [r0, r1) of the current chunk."""

    r0: int
    r1: int


class _CapturedSegment:
    """One segment of the one-token step for one micro-batch, recorded as a CUDA graph."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> None:
        device = example.device
        self.static_in = example.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # Warm-up outside the graph (lazy kernels, workspaces); it writes the cache slot of the
        # position in the static buffer, which the real replay of that step overwrites first.
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(self.static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # A private memory pool per graph: micro-batch graphs replay interleaved with reads of each
        # other's outputs, so a shared pool could hand one graph's scratch space to another's output.
        with torch.cuda.graph(self.graph, stream=side):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def _forced_of(req: GenerationRequest, seq: int) -> torch.Tensor:
    """The request's forced codes [seq] long on the CPU, -1 where it samples."""
    if req.forced is None:
        return torch.full((seq,), -1, dtype=torch.long)
    return req.forced.long()


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.to(device, non_blocking=True)


class ImageTokenDecoder:
    """Samples image tokens for batches of requests with the model's KV-cached one-token step.

    ``max_batch_images`` bounds the rows decoded together (a chunk); ``windowed`` keeps only a ring
    of the last ``row_window`` positions for row-mask layers; ``microbatches`` splits a chunk into
    groups advanced in lockstep so that layers on different GPUs work on different groups at once;
    ``capture_graphs`` records each segment of the one-token step as a CUDA graph (ignored without CUDA);
    ``batch_invariant`` pads every step to a fixed row count (see the module's docstring).
    """

    #: ``on_step`` is called once per this many decode steps (and after the last one); None: once per
    #: completed image row (``image_tokens_per_dim`` steps, 32 for Kandinsky).
    progress_every: int | None = None
    #: Captured step graphs kept at most (micro-batches x segments x distinct chunk sizes).
    max_graphs = 64

    def __init__(self, model: DalleModel, max_batch_images: int, *, windowed: bool = True,
                 microbatches: int = 1, capture_graphs: bool = False, batch_invariant: bool = True) -> None:
        positive_int(max_batch_images, "max_batch_images")
        positive_int(microbatches, "microbatches")
        self.model = model
        self.batch_invariant = batch_invariant
        self.cfg = cfg = model.cfg
        self.max_batch_images = max_batch_images
        self.microbatches = microbatches
        self.n_text = cfg.n_text
        self.windowed = windowed and row_mask_is_window(cfg)
        if windowed and not self.windowed:
            log.warning("row mask is not a sliding window for this config; keeping full caches")

        self.embed_device = _device_of(model.image_embeddings)
        self.head_device = _device_of(model.to_logits)
        self.layer_devices = [_device_of(layer) for layer in model.transformer.layers]
        self.segments = self._plan_segments()
        #: Pad every step to the chunk's capacity (batch invariant on CUDA; tests set it on the CPU).
        self.pad_steps = batch_invariant and self.head_device.type == "cuda"

        devices = {self.embed_device, self.head_device, *self.layer_devices}
        self.capture_graphs = capture_graphs and all(d.type == "cuda" for d in devices)
        if capture_graphs and not self.capture_graphs:
            log.info("capture_graphs: the model is not entirely on CUDA devices, step capture skipped")
        # (group bounds, segment index) -> the captured graph of that segment for that micro-batch.
        self.step_graphs: dict[tuple[int, int, int], _CapturedSegment] = {}
        # Per segment device: the [1] long position the captured step reads, written before each replay.
        self._static_pos: dict[torch.device, torch.Tensor] = {}
        # The model's cache_generation the graphs were recorded against (None: no caches of ours).
        self._cache_generation: int | None = None

    # ----------------------------------------------------------------------------------- planning

    def _plan_segments(self) -> list[_Segment]:
        m = self.model
        embed_ok = len({_device_of(m.image_embeddings), _device_of(m.image_row_embeddings),
                        _device_of(m.image_col_embeddings)}) == 1
        head_ok = _device_of(m.transformer.final_layernorm) == self.head_device
        segments = [_Segment(self.embed_device, True, [], False, embed_ok)]
        for i, dev in enumerate(self.layer_devices):
            if dev != segments[-1].device:
                segments.append(_Segment(dev, False, [], False, True))
            segments[-1].layers.append(i)
        if self.head_device != segments[-1].device:
            segments.append(_Segment(self.head_device, False, [], False, True))
        segments[-1].has_head = True
        segments[-1].capturable = segments[-1].capturable and head_ok
        return segments

    def _ensure_caches(self, rows: int) -> None:
        """The model's caches, with at least ``rows`` rows and this decoder's window choice."""
        m = self.model
        if m.cache_rows < rows or m.cache_windowed != self.windowed:
            # Drop the graphs first: they hold the old caches' memory, which the new ones need.
            self.step_graphs.clear()
            self._cache_generation = None
            m.setup_caches(rows, windowed=self.windowed)
        if self._cache_generation != m.cache_generation:
            self.step_graphs.clear()  # recorded on caches that another user of the model replaced
            self._cache_generation = m.cache_generation

    def release_caches(self) -> None:
        """Free the KV caches and the captured graphs that point into them; the next call reallocates."""
        self.step_graphs.clear()  # graphs hold the cache addresses
        self._cache_generation = None
        self.model.release_caches()

    # ----------------------------------------------------------------------------------- validation

    def _check_request(self, n: int, req: GenerationRequest) -> None:
        cfg = self.cfg
        ids = req.text_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] != cfg.text_seq_length:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"requests[{n}].text_ids must be a [{cfg.text_seq_length}] tensor, got {shape}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"requests[{n}].text_ids must hold integer ids, got {ids.dtype}")
        positive_int(req.num_images, f"requests[{n}].num_images")
        sp = req.sampling
        top_k_is_int = isinstance(sp.top_k, int) and not isinstance(sp.top_k, bool)
        if not (top_k_is_int and 1 <= sp.top_k <= cfg.image_vocab_size):
            raise ValueError(
                f"requests[{n}].sampling.top_k must be in 1..{cfg.image_vocab_size}, got {sp.top_k!r}"
            )
        if not (isinstance(sp.top_p, (int, float)) and 0 < sp.top_p <= 1):
            raise ValueError(f"requests[{n}].sampling.top_p must be in (0, 1], got {sp.top_p!r}")
        if not (isinstance(sp.temperature, (int, float)) and 0 < sp.temperature < math.inf):
            raise ValueError(f"requests[{n}].sampling.temperature must be positive and finite, "
                             f"got {sp.temperature!r}")
        if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= SEED_MAX:
            raise ValueError(f"requests[{n}].seed must be an integer in 0..{SEED_MAX}, got {req.seed!r}")
        if req.forced is not None:
            f = req.forced
            if not isinstance(f, torch.Tensor) or f.dim() != 1 or f.shape[0] != cfg.image_seq_length:
                raise ValueError(f"requests[{n}].forced must be a [{cfg.image_seq_length}] tensor")
            if f.dtype != torch.long or bool(((f < -1) | (f >= cfg.image_vocab_size)).any()):
                last = cfg.image_vocab_size - 1
                raise ValueError(f"requests[{n}].forced must hold -1 or codes in 0..{last}")
            if bool((f >= 0).all()):
                raise ValueError(f"requests[{n}].forced leaves no position to sample")

    # ----------------------------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest], on_step: OnStep | None = None,
                 max_rows: int | None = None) -> list[GenerationOutput | None]:
        """Sample ``num_images`` image-token grids per request; same seed, same codes in any batch.

        Rows are decoded in chunks of at most ``max_batch_images`` (and of ``max_rows``, if given: a
        smaller chunk after an out-of-memory gives the same codes).

        ``on_step(tick)`` is called every ``progress_every`` steps (see ``Tick``); it never forces a
        device sync unless it asks for partial codes. The request indices it returns are stopped
        there: their rows leave the batch (the others go on, with the codes they would have had
        anyway) and their output is None.

        A request with ``forced`` positions takes those codes there in every image (never sampled,
        still fed through every layer); its ppl averages over the sampled positions only.
        """
        for n, req in enumerate(requests):
            self._check_request(n, req)
        if max_rows is not None:
            positive_int(max_rows, "max_rows")
        if not requests:
            return []
        on_cpu = self.head_device.type != "cuda"
        self.model.set_min_rows(None if self.batch_invariant and on_cpu else 0)
        chunk_rows = min(self.max_batch_images, max_rows or self.max_batch_images)
        seq = self.cfg.image_seq_length
        # One row per image: (request index, image index), in request order.
        rows = [(r, i) for r, req in enumerate(requests) for i in range(req.num_images)]
        uniforms = [request_uniforms(req.seed, req.num_images, seq) for req in requests]
        codes_out = [torch.empty(req.num_images, seq, dtype=torch.long) for req in requests]
        ppl_out = [torch.empty(req.num_images, dtype=torch.float32) for req in requests]
        stopped: set[int] = set()
        self._ensure_caches(self.step_rows(min(chunk_rows, len(rows)), chunk_rows))

        steps_done = 0
        finished = [0] * len(requests)  # per request: positions sampled in chunks already done
        finished_rows: set[tuple[int, int]] = set()
        for c0 in range(0, len(rows), chunk_rows):
            chunk = [row for row in rows[c0 : c0 + chunk_rows] if row[0] not in stopped]
            if not chunk:
                continue  # every row of this chunk belongs to stopped requests: no GPU time for it

            def tick(steps: int, live: list[tuple[int, int]], codes: torch.Tensor,
                     steps_before: int = steps_done) -> set[int]:
                if on_step is None:
                    return stopped
                done = list(finished)
                for r, _ in live:
                    done[r] += steps

                def partial(r: int) -> torch.Tensor:
                    out = torch.full((requests[r].num_images, seq), -1, dtype=torch.long)
                    for k, (rr, i) in enumerate(live):
                        if rr == r:
                            out[i, :steps] = codes[:steps, k].cpu()
                    for i in range(requests[r].num_images):
                        if (r, i) in finished_rows:
                            out[i] = codes_out[r][i]
                    return out

                stopped.update(on_step(Tick(steps_before + steps, done, partial)) or ())
                return stopped

            done_rows, codes, ppl = self._decode_chunk(requests, chunk, uniforms, tick, chunk_rows)
            steps_done += seq
            for k, (r, i) in enumerate(done_rows):
                codes_out[r][i] = codes[k]
                ppl_out[r][i] = ppl[k]
                finished[r] += seq
                finished_rows.add((r, i))
        return [None if r in stopped else GenerationOutput(codes=c, ppl=p)
                for r, (c, p) in enumerate(zip(codes_out, ppl_out))]

    def _decode_chunk(self, requests: Sequence[GenerationRequest], chunk: list[tuple[int, int]],
                      uniforms: list[torch.Tensor],
                      tick: Callable[[int, list[tuple[int, int]], torch.Tensor], set[int]],
                      capacity: int) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        """Decode the rows of one chunk: the rows that ran to the end (those of requests that ``tick``
        stopped leave early), their codes [B, image_seq_length] and ppl [B] on the CPU.

        The step runs ``step_rows`` rows: the chunk's, then padding rows (copies of its first row's
        parameters, whose outputs are dropped). ``slot[k]`` is the step row of ``chunk[k]``.
        """
        seq, head = self.cfg.image_seq_length, self.head_device
        b = len(chunk)
        p = self.step_rows(b, capacity)
        padded = chunk + [chunk[0]] * (p - b)  # per step row: its (request, image)
        first_logits = self._prefill(requests, chunk, p)  # [P, iv] fp32 on head
        u = torch.stack([uniforms[r][i] for r, i in padded], dim=1)  # [steps, P], a step's row contiguous
        u = u.to(head)
        temperature = torch.tensor([requests[r].sampling.temperature for r, _ in padded],
                                   dtype=torch.float32).to(head)
        top_k = torch.tensor([requests[r].sampling.top_k for r, _ in padded]).to(head)
        top_p = torch.tensor([requests[r].sampling.top_p for r, _ in padded], dtype=torch.float32).to(head)
        # [steps, P]: the forced code at each position of each row, -1 where the row samples.
        forced = torch.stack([_forced_of(requests[r], seq) for r, _ in padded], dim=1).to(head)
        any_forced = any(requests[r].forced is not None for r, _ in chunk)

        codes = torch.empty(seq, p, dtype=torch.long, device=head)  # [steps, P]
        ppl_sum = torch.zeros(p, dtype=torch.float32, device=head)
        ppl_count = torch.zeros(p, dtype=torch.float32, device=head)
        slot = list(range(b))
        groups = self._groups(p)
        logits = [first_logits[g.r0 : g.r1] for g in groups]  # per group [Bg, iv] fp32
        every = self.progress_every or self.cfg.image_tokens_per_dim

        for step in range(seq):
            for n, g in enumerate(groups):
                rs = slice(g.r0, g.r1)
                tok = sample_tokens(logits[n], u[step, rs], temperature[rs], top_k[rs], top_p[rs])  # [Bg]
                if any_forced:
                    given = forced[step, rs]  # [Bg]
                    tok = torch.where(given >= 0, given, tok)
                if step > 0:
                    # Upstream's ppl: exp(CE) of the raw logits over image tokens 1.., exact zeros excluded.
                    # Always the logits that sampled the token (upstream's v2 second pass is off by one).
                    ce = F.cross_entropy(logits[n], tok, reduction="none")  # [Bg]
                    nonzero = ce != 0
                    if any_forced:
                        nonzero &= forced[step, rs] < 0  # ppl is over the sampled positions only
                    ppl_sum[rs] += torch.where(nonzero, ce.exp(), torch.zeros_like(ce))
                    ppl_count[rs] += nonzero
                codes[step, rs] = tok
                if step + 1 < seq:
                    logits[n] = self._forward_token(g, tok, self.n_text + step)
            if (step + 1) % every == 0 or step + 1 == seq:
                stopped = tick(step + 1, chunk, codes[:, slot])
                keep = [k for k, (r, _) in enumerate(chunk) if r not in stopped]
                if len(keep) < len(chunk):
                    chunk, slot = [chunk[k] for k in keep], [slot[k] for k in keep]
                    if not keep or step + 1 == seq:
                        break
                    q = self.step_rows(len(keep), capacity)
                    if q == p:
                        continue  # the same step shape: stopped rows decode along as padding
                    # Fewer step rows: the survivors and enough padding move to the front of the caches
                    # and of every per-row tensor. Each row's randomness is its own: codes do not change.
                    live = set(slot)
                    idx = torch.tensor(slot + [k for k in range(p) if k not in live][: q - len(slot)])
                    self.model.compact_caches(idx, p)
                    head_idx = idx.to(head)
                    all_logits = torch.cat(logits).index_select(0, head_idx)  # [Q, iv]
                    u, codes, forced = u[:, head_idx], codes[:, head_idx], forced[:, head_idx]
                    temperature, top_k, top_p = temperature[head_idx], top_k[head_idx], top_p[head_idx]
                    ppl_sum, ppl_count = ppl_sum[head_idx], ppl_count[head_idx]
                    p, slot = q, list(range(len(chunk)))
                    groups = self._groups(p)
                    logits = [all_logits[g.r0 : g.r1] for g in groups]

        # A row whose every CE was exactly zero was certain throughout: its ppl is exp(0) = 1.
        ppl = torch.where(ppl_count > 0, ppl_sum / ppl_count.clamp(min=1), torch.ones_like(ppl_sum))
        return chunk, codes[:, slot].t().cpu(), ppl[slot].cpu()

    def _prefill(self, requests: Sequence[GenerationRequest], chunk: list[tuple[int, int]], p: int
                 ) -> torch.Tensor:
        """Prefill the chunk's texts into cache rows 0.. (a request's rows are consecutive): the first
        image logits of every step row, [P, iv] fp32 (padding rows: the first row's). Batch invariant:
        each text alone, so its products have one shape whatever shares the chunk."""
        req_ids = sorted({r for r, _ in chunk})
        if not self.batch_invariant:
            local = {r: n for n, r in enumerate(req_ids)}
            row_req = torch.tensor([local[r] for r, _ in chunk])  # [B], index into this chunk's requests
            text = torch.stack([requests[r].text_ids.long() for r in req_ids])  # [R, text_seq_length]
            first = self.model.prefill(text, row_req)  # [B, iv]
        else:
            parts, start = [], 0
            for r in req_ids:
                n = sum(1 for rr, _ in chunk if rr == r)
                text = requests[r].text_ids.long()[None]  # [1, text_seq_length]
                parts.append(self.model.prefill(text, torch.zeros(n, dtype=torch.long), start))  # [n, iv]
                start += n
            first = torch.cat(parts)
        return torch.cat([first, first[:1].expand(p - len(chunk), -1)])

    def _groups(self, b: int) -> list[_Group]:
        m = min(self.microbatches, b)
        bounds = [b * k // m for k in range(m + 1)]
        return [_Group(bounds[k], bounds[k + 1]) for k in range(m)]

    def step_rows(self, live: int, capacity: int) -> int:
        """Rows a step runs with for ``live`` live rows of a chunk of at most ``capacity``: ``live``, or
        (``pad_steps``) the capacity, the same per micro-batch, so that every kernel of the step has one
        shape whatever is live."""
        if not self.pad_steps:
            return live
        m = self.microbatches
        return m * max(math.ceil(live / m), math.ceil(capacity / m))

    # ----------------------------------------------------------------------------------- the step

    def _forward_token(self, g: _Group, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed tokens [Bg] at sequence position ``pos``; returns the next image logits [Bg, iv] fp32."""
        if self.capture_graphs:
            return self._step_graphed(g, tokens, pos)
        return self._step_eager(g, tokens, pos)

    def _step_eager(self, g: _Group, x: torch.Tensor, pos: int, segments: int = 0) -> torch.Tensor:
        """Segments ``segments``.. of the step at a Python-int position (full caches sliced to the prefix)."""
        for seg in self.segments[segments:]:
            x = self._segment(g, seg, _to(x, seg.device), pos)
        return x

    def _step_graphed(self, g: _Group, x: torch.Tensor, pos: int) -> torch.Tensor:
        """The step through captured graphs, the position read from the static device buffers."""
        if not self._static_pos:
            for dev in {seg.device for seg in self.segments}:
                self._static_pos[dev] = torch.zeros(1, dtype=torch.long, device=dev)
        for buf in self._static_pos.values():
            buf.fill_(pos)
        for n, seg in enumerate(self.segments):
            x = _to(x, seg.device)
            if not seg.capturable:
                x = self._segment_static(g, seg, x)
                continue
            try:
                graph = self._captured(g, n, x)
            except torch.cuda.OutOfMemoryError:
                raise  # the caller splits the batch and retries; capture itself is not at fault
            except Exception:
                # A capture that fails (driver, allocator, an op that cannot be captured) must cost
                # speed, not requests: finish this step and every later one eagerly.
                log.exception("decode step capture failed; continuing without CUDA graphs")
                self.capture_graphs = False
                self.step_graphs.clear()
                return self._step_eager(g, x, pos, segments=n)
            x = graph(x)
        return x

    def _segment(self, g: _Group, seg: _Segment, x: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """One device's part of the step for micro-batch ``g``: tokens [Bg] or hidden [Bg, 1, h] in,
        hidden [Bg, 1, h] or (the head's segment) image logits [Bg, iv] fp32 out.
        """
        m = self.model
        if seg.has_embed:
            x = m.embed_step(x, pos)  # [Bg, 1, h]
        x = m.step_layers(x, pos, seg.layers, rows=slice(g.r0, g.r1))
        if seg.has_head:
            x = m.image_logits(x[:, -1])  # [Bg, iv]
        return x

    def _segment_static(self, g: _Group, seg: _Segment, x: torch.Tensor) -> torch.Tensor:
        """``_segment`` at the position in the device's static buffer: what a captured graph records."""
        return self._segment(g, seg, x, self._static_pos[seg.device])

    def _captured(self, g: _Group, n: int, x: torch.Tensor) -> _CapturedSegment:
        """The CUDA graph of segment ``n`` for micro-batch ``g``, recorded on first use."""
        key = (g.r0, g.r1, n)
        graph = self.step_graphs.get(key)
        if graph is None:
            if len(self.step_graphs) >= self.max_graphs:
                # Every distinct chunk size records its own graphs, each holding a private memory pool:
                # start over rather than let a long-running server accumulate one per batch size seen.
                log.info("decode step: %d captured graphs, releasing them", len(self.step_graphs))
                self.step_graphs.clear()
            seg = self.segments[n]
            log.info("capturing the decode step: rows %d..%d, segment %d on %s", g.r0, g.r1, n, seg.device)
            # Capture on the segment's own GPU: torch's default capture stream belongs to the current
            # device, which for the later stages of a multi-GPU split is another one.
            with torch.cuda.device(seg.device):
                graph = _CapturedSegment(lambda inp: self._segment_static(g, seg, inp), x)
            self.step_graphs[key] = graph
        return graph
