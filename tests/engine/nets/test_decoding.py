"""The KV-cached image-token decoder against full uncached forwards of tiny seeded random models."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from app.engine.nets import decoding
from app.engine.nets.dalle import DalleConfig, DalleModel, layer_mask_kind
from app.engine.nets.decoding import GenerationRequest, ImageTokenDecoder, SamplingParams
from app.engine.nets.kv_cache import RowWindowCache
from app.engine.nets.sampling import filter_logits, sample_tokens

# 4 layers: row, col, row, conv. A 6x6 grid is long enough (36 positions) to wrap a 7-slot row ring.
SMALL = DalleConfig(num_layers=4, hidden_size=32, num_attention_heads=4, text_seq_length=8,
                    image_tokens_per_dim=6, vocab_size=64, image_vocab_size=48)
# The real 32x32 grid (1024 image positions), tiny everywhere else.
GRID32 = DalleConfig(num_layers=4, hidden_size=32, num_attention_heads=4, text_seq_length=8,
                     image_tokens_per_dim=32, vocab_size=64, image_vocab_size=64)
FREE = SamplingParams(top_k=10_000, top_p=1.0, temperature=1.0)


def make_model(cfg: DalleConfig, seed: int = 0, std: float = 0.3) -> DalleModel:
    """A seeded random model with weights large enough that the distributions are far from flat."""
    model = DalleModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_weight = name.endswith("weight") and p.dim() == 1
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return model


def text_ids(cfg: DalleConfig, seed: int, length: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(cfg.text_seq_length, dtype=torch.long)
    ids[:length] = torch.randint(4, cfg.vocab_size - cfg.text_seq_length, (length,), generator=gen)
    ids[0], ids[length - 1] = 2, 3
    return ids


def request(cfg: DalleConfig, seed: int, num_images: int = 2, sampling: SamplingParams = FREE,
            text_seed: int = 0) -> GenerationRequest:
    sp = SamplingParams(min(sampling.top_k, cfg.image_vocab_size), sampling.top_p, sampling.temperature)
    return GenerationRequest(text_ids(cfg, text_seed), num_images, sp, seed)


def record_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Collect the raw logits each sampling call receives (one call per step and micro-batch), padding
    rows of a batch-invariant step included (the live rows come first)."""
    seen: list[torch.Tensor] = []
    real = decoding.sample_tokens

    def spy(logits: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return real(logits, *args)

    monkeypatch.setattr(decoding, "sample_tokens", spy)
    return seen


def full_image_logits(model: DalleModel, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced uncached pass: the image logits that predict each token, [B, image_seq, iv] fp32."""
    cfg = model.cfg
    ids = torch.cat((text.expand(codes.shape[0], -1), codes), dim=1)  # [B, text + image]
    with torch.no_grad():
        logits = model(ids).float()  # [B, S', total_vocab]
    first = cfg.n_text - 1  # the last text position predicts image token 0
    return logits[:, first : first + cfg.image_seq_length, cfg.vocab_size :]


def upstream_ppl(image_logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """pipelines.ce_to_ppl on a second pass: mean exp(CE) over tokens 1.., exact-zero CE terms excluded."""
    ce = F.cross_entropy(image_logits[:, 1:].transpose(1, 2), codes[:, 1:], reduction="none")  # [B, T-1]
    nonzero = ce != 0
    return torch.where(nonzero, ce.exp(), torch.zeros_like(ce)).sum(1) / nonzero.sum(1)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # These models are tiny: intra-op threads only add synchronisation on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_model() -> DalleModel:
    return make_model(SMALL)


@pytest.fixture(scope="module")
def grid32_model() -> DalleModel:
    return make_model(GRID32, seed=1)


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
@pytest.mark.parametrize("windowed", [True, False])
def test_cached_step_logits_equal_full_forward_at_every_step(monkeypatch, hf_version, windowed):
    cfg = DalleConfig(**{**SMALL.__dict__, "hf_version": hf_version})
    model = make_model(cfg, seed=3)
    seen = record_logits(monkeypatch)
    out = ImageTokenDecoder(model, 8, windowed=windowed).generate([request(cfg, seed=11)])[0]
    assert len(seen) == cfg.image_seq_length
    cached = torch.stack(seen, dim=1)[: out.codes.shape[0]]  # [B, steps, iv]
    reference = full_image_logits(model, text_ids(cfg, 0), out.codes)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)


def test_window_cache_gives_full_cache_tokens_and_logits_on_the_32x32_grid(monkeypatch, grid32_model):
    cfg = GRID32
    windowed = ImageTokenDecoder(grid32_model, 4, windowed=True)
    reqs = [request(cfg, seed=5, num_images=2)]
    seen = record_logits(monkeypatch)
    out_w = windowed.generate(reqs)[0]
    row_caches = {layer.attention.kv_cache.length for i, layer in enumerate(grid32_model.transformer.layers)
                  if layer_mask_kind(i, cfg.num_layers) == "row"}
    assert row_caches == {cfg.text_seq_length + cfg.image_tokens_per_dim + 1}
    logits_w = torch.stack(seen, dim=1)[:2]
    seen.clear()
    out_f = ImageTokenDecoder(grid32_model, 4, windowed=False).generate(reqs)[0]
    logits_f = torch.stack(seen, dim=1)[:2]
    assert torch.equal(out_w.codes, out_f.codes)
    torch.testing.assert_close(logits_w, logits_f, atol=1e-5, rtol=0)
    reference = full_image_logits(grid32_model, text_ids(cfg, 0), out_w.codes)
    torch.testing.assert_close(logits_w, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_w.ppl, out_f.ppl, atol=1e-6, rtol=1e-6)


def test_row_layers_keep_a_ring_and_other_layers_a_full_cache(small_model):
    full = SMALL.n_text + SMALL.image_seq_length - 1
    ImageTokenDecoder(small_model, 2)._ensure_caches(2)
    caches = small_model.kv_caches
    assert len(caches) == SMALL.num_layers
    for i, cache in enumerate(caches):
        kind = layer_mask_kind(i, SMALL.num_layers)
        assert isinstance(cache, RowWindowCache) == (kind == "row")
        expected = SMALL.text_seq_length + 7 if kind == "row" else full
        assert cache.length == expected
    ImageTokenDecoder(small_model, 2, windowed=False)._ensure_caches(2)
    assert all(cache.length == full for cache in small_model.kv_caches)


def test_microbatches_give_the_same_codes_as_one_batch(small_model):
    reqs = [request(SMALL, seed=1, num_images=3),
            request(SMALL, seed=2, num_images=2, sampling=SamplingParams(20, 0.9, 0.7), text_seed=4)]
    one = ImageTokenDecoder(small_model, 8, microbatches=1).generate(reqs)
    three = ImageTokenDecoder(small_model, 8, microbatches=3).generate(reqs)
    for a, b in zip(one, three):
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.ppl, b.ppl, atol=1e-6, rtol=1e-6)


def test_chunking_gives_the_same_codes_as_one_chunk(small_model):
    # 4 + 3 images in chunks of 3: the first request straddles two chunks.
    reqs = [request(SMALL, seed=7, num_images=4),
            request(SMALL, seed=8, num_images=3, sampling=SamplingParams(5, 0.8, 1.3), text_seed=2)]
    whole = ImageTokenDecoder(small_model, 8).generate(reqs)
    chunked = ImageTokenDecoder(small_model, 3).generate(reqs)
    for a, b in zip(whole, chunked):
        assert a.codes.shape == (a.codes.shape[0], SMALL.image_seq_length)
        assert torch.equal(a.codes, b.codes)
        # ppl is a float32 mean over 1023 positions: a chunk of another row count may run other BLAS kernels
        # (bits differ by about 1e-6 relative on some CPUs) while every sampled code stays the same
        torch.testing.assert_close(a.ppl, b.ppl, atol=1e-6, rtol=1e-5)


def test_a_seed_gives_the_same_codes_alone_and_in_a_mixed_batch(small_model):
    mine = request(SMALL, seed=123, num_images=2, sampling=SamplingParams(30, 0.95, 1.0))
    alone = ImageTokenDecoder(small_model, 8).generate([mine])[0]
    others = [request(SMALL, seed=9, num_images=3, sampling=SamplingParams(1, 1.0, 1.0), text_seed=5),
              request(SMALL, seed=10, num_images=1, sampling=SamplingParams(4, 0.5, 2.0), text_seed=6)]
    mixed = ImageTokenDecoder(small_model, 8, microbatches=2).generate([others[0], mine, others[1]])[1]
    assert torch.equal(alone.codes, mixed.codes)
    torch.testing.assert_close(alone.ppl, mixed.ppl, atol=1e-6, rtol=1e-6)
    # And a different seed gives different images.
    other_seed = ImageTokenDecoder(small_model, 8).generate([request(SMALL, seed=124, num_images=2)])[0]
    assert not torch.equal(alone.codes, other_seed.codes)


def test_top_k_1_is_greedy_argmax_of_the_full_forward(small_model):
    req = request(SMALL, seed=3, num_images=2, sampling=SamplingParams(1, 0.9, 0.5))
    out = ImageTokenDecoder(small_model, 8).generate([req])[0]
    reference = full_image_logits(small_model, text_ids(SMALL, 0), out.codes)
    assert torch.equal(out.codes, reference.argmax(dim=-1))
    # Greedy ignores the seed.
    other_seed = request(SMALL, 99, 2, SamplingParams(1, 0.9, 0.5))
    again = ImageTokenDecoder(small_model, 8).generate([other_seed])[0]
    assert torch.equal(out.codes, again.codes)


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
def test_ppl_equals_upstream_formula_on_a_second_full_pass(hf_version):
    cfg = DalleConfig(**{**SMALL.__dict__, "hf_version": hf_version})
    model = make_model(cfg, seed=4)
    out = ImageTokenDecoder(model, 8).generate([request(cfg, seed=21, num_images=3,
                                                        sampling=SamplingParams(12, 0.9, 1.5))])[0]
    reference = upstream_ppl(full_image_logits(model, text_ids(cfg, 0), out.codes), out.codes)
    assert torch.all(out.ppl > 1)
    torch.testing.assert_close(out.ppl, reference, atol=1e-4, rtol=0)


# Stated tolerances on the image logits (std ~2) of this 4-layer model, teacher-forced on the half-precision
# run's own codes against the fp32 full forward (max abs, mean abs):
# - bf16 keeps 8 significant bits (relative rounding 2**-9 per op): 0.25 (~12% of the std) and 0.03.
#   Seen on three seeds: max 0.09..0.18, mean 0.014..0.029.
# - fp16 keeps 11 (2**-12 per op), so it is tighter: 0.05 and 0.006. Seen: max 0.012..0.019, mean
#   0.0017..0.0031. fp16 is what V100s run (no bf16 before Ampere).
HALF_TOLERANCES = [(torch.bfloat16, 0.25, 0.03), (torch.float16, 0.05, 0.006)]


@pytest.mark.parametrize(("dtype", "max_tol", "mean_tol"), HALF_TOLERANCES, ids=["bf16", "fp16"])
def test_half_precision_step_logits_stay_close_to_fp32(monkeypatch, small_model, dtype, max_tol, mean_tol):
    half = copy.deepcopy(small_model).to(dtype)
    seen = record_logits(monkeypatch)
    out = ImageTokenDecoder(half, 8).generate([request(SMALL, seed=31, num_images=2)])[0]
    cached = torch.stack(seen, dim=1)[:2]
    reference = full_image_logits(small_model, text_ids(SMALL, 0), out.codes)
    diff = (cached - reference).abs()
    assert reference.std() > 1.0
    assert diff.max() < max_tol, diff.max()
    assert diff.mean() < mean_tol, diff.mean()


def test_fp16_clamp_keeps_an_overflowing_attention_output_finite(small_model):
    # The published models were trained with the +-65504 clamp on `dense`: an attention output that
    # overflows fp16 must saturate, not turn into inf/NaN that poisons every later position.
    fp16 = copy.deepcopy(small_model).to(torch.float16)
    with torch.no_grad():
        fp16.transformer.layers[0].attention.dense.weight.mul_(1e4)
    out = ImageTokenDecoder(fp16, 8).generate([request(SMALL, seed=5, num_images=1)])[0]
    assert torch.isfinite(out.ppl).all()
    logits = fp16(torch.cat((text_ids(SMALL, 0)[None], out.codes[:, :-1]), dim=1))
    assert torch.isfinite(logits.float()).all()


def reference_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's classic top_k_top_p_filtering for one row [V], written out step by step."""
    x = logits.double() / temperature
    kth = sorted(x.tolist(), reverse=True)[top_k - 1]
    x = torch.where(x < kth, torch.tensor(-math.inf, dtype=x.dtype), x)
    if top_p < 1.0:
        order = sorted(range(len(x)), key=lambda i: (-x[i].item(), i))
        probs = torch.softmax(x[order], dim=0).tolist()
        cum, out = 0.0, x.clone()
        for rank, token in enumerate(order):
            if rank > 0 and cum > top_p:  # the token that first crossed top_p was kept
                out[token] = -math.inf
            cum += probs[rank]
        x = out
    return x.float()


def test_filter_keeps_top_k_ties_and_the_token_crossing_top_p():
    gen = torch.Generator().manual_seed(0)
    # Quarter steps make many exact ties.
    logits = torch.randint(-12, 12, (6, 40), generator=gen).float() / 4
    cases = [(1.0, 1, 1.0), (1.0, 5, 1.0), (0.7, 7, 0.9), (1.3, 40, 0.5), (2.0, 40, 1e-6), (0.5, 12, 0.999)]
    temperature = torch.tensor([c[0] for c in cases])
    top_k = torch.tensor([c[1] for c in cases])
    top_p = torch.tensor([c[2] for c in cases])
    ours = filter_logits(logits, temperature, top_k, top_p)
    for row, (t, k, p) in enumerate(cases):
        expected = reference_filter(logits[row], t, k, p)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), row
        kept = ~torch.isinf(expected)
        torch.testing.assert_close(ours[row][kept], expected[kept])
        assert kept.sum() >= 1
    # top_k keeps ties: row 1's fifth-largest value may repeat, and all copies stay.
    fifth = logits[1].sort(descending=True).values[4]
    assert (~torch.isinf(ours[1])).sum() == (logits[1] >= fifth).sum()
    # A tiny top_p keeps exactly the single most likely token.
    assert (~torch.isinf(ours[4])).sum() == 1


def test_sampling_inverts_the_cdf_of_the_filtered_distribution():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 30, generator=gen) * 2
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0])
    top_k = torch.tensor([30, 10, 25, 3, 30])
    top_p = torch.tensor([1.0, 0.9, 0.7, 1.0, 0.95])
    for u_value in (0.0, 0.13, 0.5, 0.87, 1.0 - 2**-24):
        u = torch.full((5,), u_value)
        tokens = sample_tokens(logits, u, temperature, top_k, top_p)
        for row in range(5):
            x = reference_filter(logits[row], temperature[row].item(), top_k[row].item(), top_p[row].item())
            order = sorted(range(30), key=lambda i: (-x[i].item(), i))
            order = [i for i in order if not math.isinf(x[i].item())]
            cdf = torch.softmax(x[order].double(), 0).cumsum(0)
            rank = min(int((cdf <= u_value).sum()), len(order) - 1)
            assert tokens[row].item() == order[rank], (u_value, row)


def test_sampling_never_returns_a_filtered_token_when_u_is_just_below_one():
    logits = torch.zeros(3, 8192)
    logits[:, :100] = 5.0  # 100 tied tokens holding 65% of the mass
    u = torch.full((3,), 1.0 - 2**-24)
    top_k, top_p = torch.tensor([100, 8192, 50]), torch.tensor([1.0, 0.5, 1.0])
    tokens = sample_tokens(logits, u, torch.ones(3), top_k, top_p)
    kept = ~torch.isinf(filter_logits(logits, torch.ones(3), top_k, top_p))
    # top-k keeps all tied tokens; top-p stops inside them, after the 78th (78 * 0.00647 > 0.5)
    assert kept.sum(1).tolist() == [100, 78, 100]
    assert torch.all(kept.gather(1, tokens[:, None]))


def test_sampling_frequencies_follow_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(20000, -1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(2))
    tokens = sample_tokens(logits, u, torch.ones(20000), torch.full((20000,), 3), torch.ones(20000))
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), 0)
    torch.testing.assert_close(freq[:3], expected, atol=0.015, rtol=0)
    assert freq[3:].sum() == 0


def test_on_step_ticks_once_per_image_row_counted_across_chunks(small_model):
    ticks: list[decoding.Tick] = []
    reqs = [request(SMALL, seed=1, num_images=3)]
    ImageTokenDecoder(small_model, 2).generate(reqs, on_step=ticks.append)
    steps, row = SMALL.image_seq_length, SMALL.image_tokens_per_dim
    # Two chunks (2 rows, then 1) of 36 steps each, a tick after every 6-token image row.
    assert [t.steps for t in ticks] == [k * row for k in range(1, 2 * steps // row + 1)]
    # done: the request's positions sampled so far, over all its images.
    assert [t.done[0] for t in ticks] == [2 * k * row for k in range(1, 7)] + [2 * steps + k * row
                                                                               for k in range(1, 7)]


def test_tick_partial_codes_are_the_sampled_prefix_and_minus_one_after(small_model):
    reqs = [request(SMALL, seed=1, num_images=3), request(SMALL, seed=2, num_images=1, text_seed=3)]
    final = ImageTokenDecoder(small_model, 2).generate(reqs)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def look(tick: decoding.Tick) -> None:
        seen.append((tick.steps, tick.partial(0), tick.partial(1)))

    ImageTokenDecoder(small_model, 2).generate(reqs, on_step=look)
    steps, row = SMALL.image_seq_length, SMALL.image_tokens_per_dim
    first, second = final[0], final[1]
    assert first is not None and second is not None
    # After 2 rows of the first chunk (images 0 and 1 of request 0).
    at, p0, p1 = seen[1]
    assert at == 2 * row
    assert torch.equal(p0[:2, : 2 * row], first.codes[:2, : 2 * row])
    assert (p0[:2, 2 * row :] == -1).all() and (p0[2] == -1).all()
    assert (p1 == -1).all()
    # Two rows into the second chunk: images 0 and 1 complete, image 2 and request 1 partial.
    at, p0, p1 = seen[7]
    assert at == steps + 2 * row
    assert torch.equal(p0[:2], first.codes[:2])
    assert torch.equal(p0[2, : 2 * row], first.codes[2, : 2 * row]) and (p0[2, 2 * row :] == -1).all()
    assert torch.equal(p1[0, : 2 * row], second.codes[0, : 2 * row])


def forced_grid(cfg: DalleConfig, rows: int, left: int, seed: int) -> torch.Tensor:
    """Codes on the top ``rows`` rows and the ``left`` leftmost columns, -1 elsewhere, [image_seq]."""
    n = cfg.image_tokens_per_dim
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.image_vocab_size, (n, n), generator=gen)
    keep = torch.zeros(n, n, dtype=torch.bool)
    keep[:rows] = True
    keep[:, :left] = True
    return torch.where(keep, codes, torch.full_like(codes, -1)).flatten()


def greedy_uncached_with_forced(model: DalleModel, text: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """The reference: one token at a time through the full uncached model, forced codes fed as given."""
    cfg = model.cfg
    codes = torch.empty(1, 0, dtype=torch.long)
    for j in range(cfg.image_seq_length):
        if forced[j] >= 0:
            tok = forced[j : j + 1]
        else:
            ids = torch.cat((text[None], codes), dim=1)
            with torch.no_grad():
                logits = model(ids).float()[:, -1, cfg.vocab_size :]  # [1, iv]
            tok = logits.argmax(-1)
        codes = torch.cat((codes, tok[None]), dim=1)
    return codes[0]


GREEDY = SamplingParams(top_k=1, top_p=1.0, temperature=1.0)


@pytest.mark.parametrize(("chunk", "microbatches"), [(8, 1), (8, 2), (2, 1)])
def test_forced_positions_keep_their_codes_and_the_rest_matches_an_uncached_greedy_loop(
    small_model, chunk, microbatches
):
    forced = forced_grid(SMALL, rows=2, left=1, seed=5)
    with_prompt = GenerationRequest(text_ids(SMALL, 0), 2, GREEDY, seed=1, forced=forced)
    plain = request(SMALL, seed=2, num_images=2, text_seed=4)
    other_prompt = GenerationRequest(text_ids(SMALL, 6), 1, GREEDY, seed=3,
                                     forced=forced_grid(SMALL, rows=0, left=3, seed=7))
    dec = ImageTokenDecoder(small_model, chunk, microbatches=microbatches)
    out = dec.generate([plain, with_prompt, other_prompt])
    alone_plain = ImageTokenDecoder(small_model, 8).generate([plain])[0]
    got, got_other, got_plain = out[1], out[2], out[0]
    assert got is not None and got_other is not None and got_plain is not None and alone_plain is not None
    want = greedy_uncached_with_forced(small_model, text_ids(SMALL, 0), forced)
    assert torch.equal(got.codes[0], want) and torch.equal(got.codes[1], want)
    assert torch.equal(got.codes[0][forced >= 0], forced[forced >= 0])
    other_forced = other_prompt.forced
    assert other_forced is not None
    assert torch.equal(got_other.codes[0], greedy_uncached_with_forced(small_model, text_ids(SMALL, 6),
                                                                       other_forced))
    # A plain request batched with image-prompt ones keeps the codes it has alone.
    assert torch.equal(got_plain.codes, alone_plain.codes)


def test_ppl_with_forced_positions_averages_over_sampled_positions_only(small_model):
    forced = forced_grid(SMALL, rows=3, left=0, seed=9)
    req = GenerationRequest(text_ids(SMALL, 0), 1, SamplingParams(SMALL.image_vocab_size, 1.0, 1.0), seed=4,
                            forced=forced)
    out = ImageTokenDecoder(small_model, 4).generate([req])[0]
    assert out is not None
    logits = full_image_logits(small_model, text_ids(SMALL, 0), out.codes)[0]  # [image_seq, iv]
    ce = F.cross_entropy(logits, out.codes[0], reduction="none")
    sampled = (forced < 0) & (torch.arange(SMALL.image_seq_length) > 0)
    torch.testing.assert_close(out.ppl[0], ce[sampled].exp().mean(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("forced", "message"),
    [(torch.zeros(5, dtype=torch.long), r"forced must be a \[36\] tensor"),
     (torch.full((36,), 48, dtype=torch.long), "codes in 0..47"),
     (torch.zeros(36, dtype=torch.long), "no position to sample")],
)
def test_bad_forced_positions_are_refused_naming_the_field(small_model, forced, message):
    req = GenerationRequest(text_ids(SMALL, 0), 1, GREEDY, seed=1, forced=forced)
    with pytest.raises(ValueError, match=message):
        ImageTokenDecoder(small_model, 2).generate([req])


@pytest.mark.parametrize("pad_steps", [False, True], ids=["live-rows", "padded-steps"])
@pytest.mark.parametrize(("chunk", "microbatches"), [(8, 1), (8, 2), (3, 1)])
def test_a_stopped_request_leaves_the_batch_and_its_partners_codes_do_not_change(
    monkeypatch, small_model, chunk, microbatches, pad_steps
):
    reqs = [request(SMALL, seed=1, num_images=2),
            request(SMALL, seed=2, num_images=3, sampling=SamplingParams(20, 0.9, 0.7), text_seed=4),
            request(SMALL, seed=3, num_images=1, text_seed=5)]
    expected = ImageTokenDecoder(small_model, 8).generate(reqs)
    dec = ImageTokenDecoder(small_model, chunk, microbatches=microbatches)
    dec.pad_steps = pad_steps  # CUDA's batch-invariant mode: every step at the chunk's capacity
    dec.progress_every = 8
    fed: list[int] = []  # rows fed through the layers, per step and micro-batch
    real_forward = dec._forward_token

    def counting_forward(g, tokens, pos):  # type: ignore[no-untyped-def]
        fed.append(tokens.shape[0])
        return real_forward(g, tokens, pos)

    monkeypatch.setattr(dec, "_forward_token", counting_forward)
    ticks: list[int] = []

    def stop_the_second(tick: decoding.Tick) -> list[int]:
        ticks.append(tick.steps)
        return [1] if tick.steps >= 8 else []

    out = dec.generate(reqs, on_step=stop_the_second)
    assert out[1] is None
    for n in (0, 2):
        got, want = out[n], expected[n]
        assert got is not None and want is not None
        assert torch.equal(got.codes, want.codes)
        torch.testing.assert_close(got.ppl, want.ppl, atol=1e-6, rtol=1e-6)
    steps = SMALL.image_seq_length
    if pad_steps:
        # One step shape throughout: the chunk's capacity per micro-batch; the stopped rows decode along
        # as padding, so that nobody's products change shape.
        assert set(fed) == {chunk // microbatches}
        return
    assert sum(fed) < 6 * (steps - 1)  # the stopped rows cost no step after the tick
    if chunk == 8 and microbatches == 1:
        # 6 rows until the tick after step 8, then only the 3 rows of the other two requests.
        assert fed == [6] * 8 + [3] * (steps - 1 - 8)
        assert ticks[0] == 8


def test_stopping_every_request_ends_generation_at_the_tick(monkeypatch, small_model):
    reqs = [request(SMALL, seed=1, num_images=2), request(SMALL, seed=2, num_images=2, text_seed=3)]
    dec = ImageTokenDecoder(small_model, 2)  # two chunks: the second is never started
    fed: list[int] = []
    real_forward = dec._forward_token
    monkeypatch.setattr(dec, "_forward_token",
                        lambda g, tokens, pos: fed.append(pos) or real_forward(g, tokens, pos))
    out = dec.generate(reqs, on_step=lambda tick: [0, 1])
    assert out == [None, None]
    assert len(fed) == SMALL.image_tokens_per_dim  # the first tick, one image row in, stopped everything


def test_capture_graphs_is_a_noop_on_cpu(small_model, caplog):
    reqs = [request(SMALL, seed=4, num_images=2)]
    with caplog.at_level("INFO", logger="app.engine.nets.decoding"):
        dec = ImageTokenDecoder(small_model, 4, capture_graphs=True)
    assert not dec.capture_graphs and "skipped" in caplog.text
    assert torch.equal(dec.generate(reqs)[0].codes, ImageTokenDecoder(small_model, 4).generate(reqs)[0].codes)
    assert dec.step_graphs == {}


@pytest.mark.parametrize(
    "field, change",
    [("text_ids", {"text_ids": torch.zeros(5, dtype=torch.long)}),
     ("num_images", {"num_images": 0}),
     ("top_k", {"sampling": SamplingParams(0, 0.9, 1.0)}),
     ("top_k", {"sampling": SamplingParams(SMALL.image_vocab_size + 1, 0.9, 1.0)}),
     ("top_p", {"sampling": SamplingParams(4, 0.0, 1.0)}),
     ("temperature", {"sampling": SamplingParams(4, 0.9, 0.0)}),
     ("seed", {"seed": -1})],
)
def test_generate_rejects_bad_requests_naming_the_field(small_model, field, change):
    req = request(SMALL, seed=1)
    bad = GenerationRequest(**{**req.__dict__, **change})
    with pytest.raises(ValueError, match=field):
        ImageTokenDecoder(small_model, 4).generate([req, bad])


def test_decoder_rejects_a_zero_batch_limit(small_model):
    with pytest.raises(ValueError, match="max_batch_images"):
        ImageTokenDecoder(small_model, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_cuda_step_gives_the_eager_codes():
    model = make_model(SMALL).cuda()
    reqs = [request(SMALL, seed=1, num_images=3), request(SMALL, seed=2, num_images=2, text_seed=3)]
    eager = ImageTokenDecoder(model, 4, microbatches=2).generate(reqs)
    captured_dec = ImageTokenDecoder(model, 4, microbatches=2, capture_graphs=True)
    captured = captured_dec.generate(reqs)
    assert captured_dec.step_graphs
    for a, b in zip(eager, captured):
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.ppl, b.ppl, atol=1e-5, rtol=1e-5)


def test_static_position_step_path_gives_the_eager_codes(small_model):
    # The path CUDA graphs record (position read from a device buffer, masks gathered on the device,
    # whole caches attended), run eagerly on the CPU by marking every segment as not capturable.
    reqs = [request(SMALL, seed=6, num_images=3), request(SMALL, seed=7, num_images=2, text_seed=1)]
    eager = ImageTokenDecoder(small_model, 4, microbatches=2).generate(reqs)
    static = ImageTokenDecoder(small_model, 4, microbatches=2)
    static.capture_graphs = True
    for seg in static.segments:
        seg.capturable = False
    out = static.generate(reqs)
    assert static.step_graphs == {} and static._static_pos
    for a, b in zip(eager, out):
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.ppl, b.ppl, atol=1e-6, rtol=1e-6)


def test_failed_step_capture_falls_back_to_eager_with_the_same_codes(small_model, monkeypatch, caplog):
    # Capture only exists on CUDA; here it is forced on and made to fail, as a driver or an
    # uncapturable op would: the request must still get its images, and later steps run eagerly.
    reqs = [request(SMALL, seed=8, num_images=2)]
    eager = ImageTokenDecoder(small_model, 4).generate(reqs)

    class FailingCapture:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(decoding, "_CapturedSegment", FailingCapture)
    dec = ImageTokenDecoder(small_model, 4)
    dec.capture_graphs = True
    with caplog.at_level(logging.ERROR, logger="app.engine.nets.decoding"):
        out = dec.generate(reqs)
    assert not dec.capture_graphs and dec.step_graphs == {}
    assert "capture failed" in caplog.text
    assert torch.equal(out[0].codes, eager[0].codes)
    torch.testing.assert_close(out[0].ppl, eager[0].ppl, atol=1e-6, rtol=1e-6)


def test_cache_allocation_that_runs_out_of_memory_leaves_a_usable_decoder(small_model, monkeypatch):
    # Growing the caches for a bigger batch is where an OOM is likeliest; a failure halfway must not
    # leave some layers without a cache for every later, smaller request.
    dec = ImageTokenDecoder(small_model, 8)
    small = [request(SMALL, seed=3, num_images=2)]
    before = dec.generate(small)[0]
    real_zeros = torch.zeros
    calls = {"n": 0}

    def zeros_failing_on_the_third(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros_failing_on_the_third)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        dec.generate([request(SMALL, seed=4, num_images=8)])
    monkeypatch.setattr(torch, "zeros", real_zeros)
    after = dec.generate(small)[0]
    assert torch.equal(after.codes, before.codes)
