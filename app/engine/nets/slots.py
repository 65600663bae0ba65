"""Continuous batching: a step loop over a fixed number of row slots (vLLM's scheduler, simplified).

Every sequence is exactly ``n_text`` text positions and ``image_seq_length`` image positions, so a
slot's memory is known in advance: the decoder's KV caches have ``slots`` rows and each live row has its
own image position. ``admit`` prefills a request's text once into free slots (its rows start at image
position 0 while the others go on); ``step`` samples one token in every live row and feeds it at that
row's own position (a [P] position tensor: each row reads its own row, column and conv mask rows and
its own ring slots); a row that samples its last token frees its slot at once, and a request whose rows
are all done is returned by that ``step``.

Batch invariance: every step runs all ``slots`` rows, live or not (free slots decode along as padding
and their outputs are dropped), and attends each row over the whole cache, so every product has one
shape whatever is live and a row's codes are those it gets alone; randomness is per (request seed,
image, position) as in ``ImageTokenDecoder``. On CUDA each segment of the step is captured once as a
CUDA graph (positions in a static [P] buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from app.engine.nets.decoding import (
    GenerationOutput,
    GenerationRequest,
    ImageTokenDecoder,
    _CapturedSegment,
    _forced_of,
    _Group,
    _Segment,
    _to,
)
from app.engine.nets.sampling import request_uniforms, sample_tokens

log = logging.getLogger(__name__)


@dataclass
class _Admitted:
    """A request in the loop: its slots (one per image, in image order) and where it stands."""

    request: GenerationRequest
    slots: list[int]
    steps: int = 0  # image positions sampled per image
    joined_at: int = 0  # the loop's step count when it was admitted
    done: list[bool] = field(default_factory=list)


class SlotDecoder:
    """Decode image tokens for requests that join and leave a running batch at any step.

    ``decoder`` provides the model, its placement (segments, micro-batches), the checks and graph
    capture; ``slots`` is the number of rows decoded together (default: its ``max_batch_images``).
    Not thread-safe: one thread calls ``admit``, ``cancel`` and ``step``.
    """

    def __init__(self, decoder: ImageTokenDecoder, slots: int | None = None) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.cfg = decoder.cfg
        self.slots = slots or decoder.max_batch_images
        self.seq = self.cfg.image_seq_length
        self.steps_run = 0
        self._requests: dict[Hashable, _Admitted] = {}
        self._free = list(range(self.slots))
        self._graphs: dict[tuple[int, int, int], _CapturedSegment] = {}
        self._static_pos: dict[torch.device, torch.Tensor] = {}
        self._cache_generation: int | None = None
        self._live: torch.Tensor | None = None  # [P] bool on the head device, rebuilt when rows change
        self._allocate()

    # ----------------------------------------------------------------------------------- state

    def _allocate(self) -> None:
        p, seq, head = self.slots, self.seq, self.decoder.head_device
        iv = self.cfg.image_vocab_size
        self.step_of = torch.zeros(p, dtype=torch.long, device=head)  # image index sampled next
        self.uniforms = torch.zeros(p, seq, dtype=torch.float32, device=head)
        self.forced = torch.full((p, seq), -1, dtype=torch.long, device=head)
        self.temperature = torch.ones(p, dtype=torch.float32, device=head)
        self.top_k = torch.ones(p, dtype=torch.long, device=head)
        self.top_p = torch.ones(p, dtype=torch.float32, device=head)
        self.codes = torch.zeros(p, seq, dtype=torch.long, device=head)
        self.ppl_sum = torch.zeros(p, dtype=torch.float32, device=head)
        self.ppl_count = torch.zeros(p, dtype=torch.float32, device=head)
        self.logits = torch.zeros(p, iv, dtype=torch.float32, device=head)

    def _ensure_caches(self) -> None:
        d, m = self.decoder, self.model
        d._ensure_caches(self.slots)
        if self._cache_generation != m.cache_generation:
            self._graphs.clear()
            self._cache_generation = m.cache_generation

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def live_rows(self) -> int:
        return self.slots - len(self._free)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._requests

    def keys(self) -> list[Hashable]:
        return list(self._requests)

    def rows(self, key: Hashable) -> int:
        """The request's rows (images) in the loop."""
        return len(self._requests[key].slots)

    def progress(self, key: Hashable) -> int:
        """Image positions the request has sampled per image (0..image_seq_length)."""
        return self._requests[key].steps

    def partial(self, key: Hashable) -> torch.Tensor:
        """The request's codes so far, [num_images, image_seq_length] long on the CPU, -1 not yet sampled."""
        adm = self._requests[key]
        out = self.codes[adm.slots].cpu()
        out[:, adm.steps :] = -1
        return out

    # ----------------------------------------------------------------------------------- admission

    @torch.inference_mode()
    def admit(self, key: Hashable, request: GenerationRequest, images: range | None = None) -> None:
        """Prefill the request's text into free slots; its rows sample from the next ``step`` on.

        ``images``: which of the request's images (default all): a request may join image by image, each
        image with the randomness it has in the whole request, so the pieces give the whole's codes.
        ValueError for a bad request or a key already admitted; RuntimeError when fewer slots are free
        than it has images (the caller admits only what fits).
        """
        if key in self._requests:
            raise ValueError(f"request {key!r} is already in the loop")
        self.decoder._check_request(0, request)
        images = images if images is not None else range(request.num_images)
        if not images or images.step != 1 or images.start < 0 or images.stop > request.num_images:
            raise ValueError(f"images {images!r} is not a non-empty run of the request's images")
        n = len(images)
        if n > len(self._free):
            raise RuntimeError(f"{n} image(s) do not fit in {len(self._free)} free slot(s)")
        d = self.decoder
        d.model.set_min_rows(None if d.batch_invariant and d.head_device.type != "cuda" else 0)
        self._ensure_caches()
        slots, self._free = self._free[:n], self._free[n:]
        head = d.head_device
        text = request.text_ids.long()[None]  # [1, text_seq_length]: each text alone
        first = self.model.prefill(text, torch.zeros(n, dtype=torch.long), slots)  # [n, iv]
        idx = torch.tensor(slots, device=head)
        self.logits[idx] = _to(first.float(), head)
        uniforms = request_uniforms(request.seed, request.num_images, self.seq)[images.start : images.stop]
        self.uniforms[idx] = uniforms.to(head)
        self.forced[idx] = _forced_of(request, self.seq).to(head).expand(n, -1)
        sp = request.sampling
        self.temperature[idx], self.top_k[idx], self.top_p[idx] = sp.temperature, sp.top_k, sp.top_p
        self.step_of[idx] = 0
        self.ppl_sum[idx] = 0
        self.ppl_count[idx] = 0
        self._requests[key] = _Admitted(request, slots, joined_at=self.steps_run, done=[False] * n)
        self._live = None

    def cancel(self, key: Hashable) -> None:
        """The request leaves the loop now; its slots are free for the next admission."""
        adm = self._requests.pop(key, None)
        if adm is not None:
            self._release(adm.slots)

    def _release(self, slots: list[int]) -> None:
        self._free = sorted(self._free + slots)
        self._live = None

    # ----------------------------------------------------------------------------------- the step

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, GenerationOutput]]:
        """One token in every live row; returns the requests whose rows are all done, with their output."""
        if not self._requests:
            return []
        seq = self.seq
        hi = self._rows()
        live = self._live_mask()[:hi]
        j = self.step_of[:hi]  # [R]
        logits = self.logits[:hi]
        u = self.uniforms[:hi].gather(1, j[:, None])[:, 0]
        tok = sample_tokens(logits, u, self.temperature[:hi], self.top_k[:hi], self.top_p[:hi])  # [R]
        given = self.forced[:hi].gather(1, j[:, None])[:, 0]
        tok = torch.where(given >= 0, given, tok)
        # Upstream's ppl: exp(CE) of the raw logits over image tokens 1.., exact zeros and forced
        # positions excluded (as ImageTokenDecoder).
        ce = F.cross_entropy(logits, tok, reduction="none")
        counted = (ce != 0) & (given < 0) & (j > 0) & live
        self.ppl_sum[:hi] += torch.where(counted, ce.exp(), torch.zeros_like(ce))
        self.ppl_count[:hi] += counted
        self.codes[:hi].scatter_(1, j[:, None], tok[:, None])
        # Where the sampled token is fed; a row that sampled its last token is done (and not fed, as
        # padding it reads a valid position).
        pos = self.cfg.n_text + j.clamp(max=seq - 2)
        self.step_of[:hi] = torch.where(live, (j + 1).clamp(max=seq - 1), j)
        self.steps_run += 1

        finished: list[tuple[Hashable, GenerationOutput]] = []
        for key, adm in list(self._requests.items()):
            adm.steps += 1
            if adm.steps == seq:
                finished.append((key, self._output(adm)))
                del self._requests[key]
                self._release(adm.slots)
        if self._requests:
            fed = self._rows()
            self.logits[:fed] = self._forward(tok[:fed], pos[:fed], fed)
        return finished

    def _rows(self) -> int:
        """Rows a step runs: every slot on CUDA (one shape for graphs and kernels), on the CPU up to the
        last live slot (the row floors keep each row's bits whatever the count; free slots are taken
        lowest first, so live rows gather at the front)."""
        if self.decoder.head_device.type == "cuda":
            return self.slots
        return 1 + max(s for adm in self._requests.values() for s in adm.slots)

    def _live_mask(self) -> torch.Tensor:
        if self._live is None:
            live = torch.zeros(self.slots, dtype=torch.bool)
            for adm in self._requests.values():
                live[adm.slots] = True
            self._live = live.to(self.decoder.head_device)
        return self._live

    def _output(self, adm: _Admitted) -> GenerationOutput:
        idx = torch.tensor(adm.slots, device=self.decoder.head_device)
        s, c = self.ppl_sum[idx], self.ppl_count[idx]
        ppl = torch.where(c > 0, s / c.clamp(min=1), torch.ones_like(s))
        return GenerationOutput(codes=self.codes[idx].cpu(), ppl=ppl.cpu())

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, rows: int) -> torch.Tensor:
        """Feed tokens [R] at per-row positions [R] into cache rows 0..R-1; the next logits [R, iv] fp32."""
        d = self.decoder
        groups = d._groups(rows)
        out = []
        for g in groups:
            x: torch.Tensor = tokens[g.r0 : g.r1]
            if d.capture_graphs:
                x = self._graphed(g, x, pos)
            else:
                for seg in d.segments:
                    x = d._segment(g, seg, _to(x, seg.device), _to(pos[g.r0 : g.r1], seg.device))
            out.append(x)
        return torch.cat(out) if len(out) > 1 else out[0]

    def _graphed(self, g: _Group, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        for seg in d.segments:
            if seg.device not in self._static_pos:
                self._static_pos[seg.device] = torch.zeros(self.slots, dtype=torch.long, device=seg.device)
            self._static_pos[seg.device].copy_(pos)
        for n, seg in enumerate(d.segments):
            x = _to(x, seg.device)
            if not seg.capturable:
                x = self._static(g, seg, x)
                continue
            key = (g.r0, g.r1, n)
            graph = self._graphs.get(key)
            if graph is None:
                log.info("capturing the slot step: rows %d..%d, segment %d on %s", g.r0, g.r1, n, seg.device)
                def run(inp: torch.Tensor, g: _Group = g, seg: _Segment = seg) -> torch.Tensor:
                    return self._static(g, seg, inp)

                with torch.cuda.device(seg.device):
                    graph = _CapturedSegment(run, x)
                self._graphs[key] = graph
            x = graph(x)
        return x

    def _static(self, g: _Group, seg: _Segment, x: torch.Tensor) -> torch.Tensor:
        return self.decoder._segment(g, seg, x, self._static_pos[seg.device][g.r0 : g.r1])
