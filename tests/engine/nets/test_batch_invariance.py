"""Batch invariance of the decode path, bit for bit: a row computes the same bits alone and in a batch of
any size, at any position in it, and after its partners leave.

Each operation of the one-token step is run on a row alone and inside batches of every size from 1 to 24
(fewer sizes at Kandinsky's 3840 width, where a product takes tens of milliseconds), every row of every
batch compared with ``torch.equal``; then the decoder end to end at Kandinsky's sampling width (8192 codes,
top_k 4096, top_p 0.975, the 32x32 grid), where a request must get the same codes and ppl whatever shares
its batch. The op-level tests run at 1 and 2 intra-op threads (what ``INVARIANT_MIN_ROWS`` was measured
at), the end-to-end tests at 1 thread. Controls show that the comparisons can fail: plain ``F.linear`` below
16 rows, and the decoder with ``batch_invariant=False``.

Not invariant, recorded by an xfail test: MKL at 12, 15, 16 or 32 intra-op threads (not at 1..11, 13, 14)
splits a product's rows between threads and gives the later rows of a batch other bits at hidden 256's
4h -> h width (1024 -> 256); no floor on the row count fixes that, since it depends on the row's position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F

from app.engine.nets import decoding
from app.engine.nets.dalle import (
    DalleConfig,
    DalleModel,
    FloorLinear,
    attention,
    build_mask,
    floor_linear,
    row_window,
)
from app.engine.nets.decoding import (
    INVARIANT_MIN_ROWS,
    GenerationOutput,
    GenerationRequest,
    ImageTokenDecoder,
    SamplingParams,
)
from app.engine.nets.invariance import row_floor
from app.engine.nets.kv_cache import window_table
from app.engine.nets.sampling import filter_logits, request_uniforms, sample_tokens

pytestmark = pytest.mark.long  # about 2 min on 2 cores: `make test-long`

SIZES = range(1, 25)  # every batch size compared
# At 3840 a product costs tens of ms: sizes on both sides of MKL's kernel changes (11 and 16 rows).
WIDE_SIZES = (1, 2, 3, 5, 8, 10, 11, 15, 16, 17)

# The decode path's widths at hidden 256 (qkv, dense, h->4h, 4h->h, the image head) and at Kandinsky's
# hidden 3840 (dense, qkv, h->4h, 4h->h, the image head).
NARROW_LINEARS = [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 8192)]
WIDE_LINEARS = [(3840, 3840), (3840, 11520), (3840, 15360), (15360, 3840), (3840, 8192)]

# Hidden 256 at Kandinsky's sampling width: 128 text positions, the 32x32 grid (1024 image positions),
# 8192 image codes. Two layers: a row-mask layer (ring cache) and a column-mask layer (full cache).
CFG = DalleConfig(num_layers=2, hidden_size=256, num_attention_heads=4, text_seq_length=128,
                  image_tokens_per_dim=32, image_vocab_size=8192)
KANDINSKY = SamplingParams(top_k=4096, top_p=0.975, temperature=1.0)
# The partners sample with other settings, so that rows with other parameters share the step.
OTHER_SAMPLING = [KANDINSKY, SamplingParams(512, 0.9, 0.8), SamplingParams(4096, 1.0, 1.3),
                  SamplingParams(1, 1.0, 1.0), SamplingParams(64, 0.95, 1.0)]
E2E_THREADS = 1  # as tests/engine/nets/test_decoding.py: 2 OpenMP threads crawl on a shared machine
HALF_WAY = CFG.image_seq_length // 2  # the tick at which a stopped partner leaves


# ------------------------------------------------------------------------------------------- helpers


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


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def rows_that_differ(op, x: torch.Tensor, sizes: Sequence[int] = SIZES) -> list[tuple[int, int]]:
    """(batch size, position) of every row whose bits in ``op(x[:m])`` differ from ``op(x[j:j+1])``.

    ``op`` maps a batch along dim 0 to a batch along dim 0; row j sits at position j of every batch that
    holds it, so every position of every size is compared, each with another row."""
    alone = [op(x[j : j + 1]) for j in range(max(sizes))]
    bad = []
    for m in sizes:
        out = op(x[:m])
        bad += [(m, j) for j in range(m) if not torch.equal(out[j : j + 1], alone[j])]
    return bad


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}-threads")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> DalleModel:
    return make_model(CFG, seed=1)


# ------------------------------------------------------------------------------------------- linears


@pytest.mark.parametrize(("n_in", "n_out"), NARROW_LINEARS, ids=lambda v: str(v))
@torch.inference_mode()
def test_floor_linear_gives_a_row_the_same_bits_alone_and_in_batches_of_1_to_24(threads, n_in, n_out):
    w, b = randn(n_out, n_in, seed=1, scale=n_in**-0.5), randn(n_out, seed=2)
    x = randn(24, n_in, seed=3)
    assert rows_that_differ(lambda rows: floor_linear(rows, w, b, INVARIANT_MIN_ROWS), x) == []


@pytest.mark.parametrize(("n_in", "n_out"), WIDE_LINEARS, ids=lambda v: str(v))
@torch.inference_mode()
def test_floor_linear_gives_a_row_the_same_bits_alone_and_in_batches_at_kandinskys_3840_width(
    two_threads, n_in, n_out
):
    w, b = randn(n_out, n_in, seed=1, scale=n_in**-0.5), randn(n_out, seed=2)
    x = randn(max(WIDE_SIZES), n_in, seed=3)
    assert rows_that_differ(lambda rows: floor_linear(rows, w, b, INVARIANT_MIN_ROWS), x, WIDE_SIZES) == []


@torch.inference_mode()
def test_plain_linear_gives_a_row_other_bits_below_16_rows_than_at_16(threads):
    # The cause of the floor: BLAS picks a kernel by the product's shape. On MKL every row count below 16
    # (below 11 at an input width of 256) rounds a row differently from a product of 16 rows.
    w, b = randn(1024, 256, seed=1, scale=256**-0.5), randn(1024, seed=2)
    x = randn(16, 256, seed=3)
    at_16 = F.linear(x, w, b)
    assert torch.equal(floor_linear(x[:3], w, b, 0), F.linear(x[:3], w, b))  # min_rows 0 is plain F.linear
    differ = [m for m in range(1, 16) if not torch.equal(F.linear(x[:m], w, b), at_16[:m])]
    if not differ:
        pytest.skip("this BLAS gives a row the same bits at every row count below 16: nothing to show")
    assert differ  # e.g. [1, ..., 10] with MKL on AVX-512


@pytest.mark.xfail(reason="MKL at 12, 15, 16 or 32 intra-op threads splits a product's rows between threads "
                          "and gives the later rows of a batch other bits (1024 -> 256 from 9 rows on at 16 "
                          "threads): the 16-row floor does not make it batch invariant there",
                   strict=False)
@torch.inference_mode()
def test_floor_linear_is_batch_invariant_at_16_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(16)
    try:
        w, b = randn(256, 1024, seed=1, scale=1024**-0.5), randn(256, seed=2)
        x = randn(24, 1024, seed=3)
        bad = rows_that_differ(lambda rows: floor_linear(rows, w, b, INVARIANT_MIN_ROWS), x,
                               (1, 8, 9, 12, 16, 17, 24))
    finally:
        torch.set_num_threads(before)
    assert bad == []


@torch.inference_mode()
def test_floor_linear_module_gives_a_step_row_the_same_bits_alone_and_in_batches(threads):
    layer = FloorLinear(256, 1024)
    layer.min_rows = INVARIANT_MIN_ROWS
    x = randn(24, 1, 256, seed=4)  # [B, 1, h], as the step feeds it
    assert rows_that_differ(layer, x) == []


@torch.inference_mode()
def test_image_logits_give_a_row_the_same_bits_alone_and_in_batches(threads, model):
    model.set_min_rows(INVARIANT_MIN_ROWS)
    assert {m.min_rows for m in model.modules() if isinstance(m, FloorLinear)} == {INVARIANT_MIN_ROWS}
    hidden = randn(24, CFG.hidden_size, seed=5, scale=3.0)
    assert rows_that_differ(model.image_logits, hidden) == []


@pytest.mark.parametrize(("n_in", "n_out"), NARROW_LINEARS, ids=lambda v: str(v))
@torch.inference_mode()
def test_a_measured_row_floor_gives_a_row_the_same_bits_in_batches_of_1_to_64(threads, n_in, n_out):
    # The floor is measured on the probe's own random data; these are other weights, bias and rows.
    floor = row_floor(n_in, n_out, torch.float32, "cpu", threads)
    assert 1 <= floor <= INVARIANT_MIN_ROWS  # never more than the flat floor it replaced
    w, b = randn(n_out, n_in, seed=11, scale=n_in**-0.5), randn(n_out, seed=12)
    x = randn(64, n_in, seed=13)
    sizes = (*range(1, 25), 31, 32, 33, 47, 48, 49, 63, 64)
    assert rows_that_differ(lambda rows: floor_linear(rows, w, b, floor), x, sizes) == []


@torch.inference_mode()
def test_a_measured_row_floor_is_below_the_flat_floor_where_the_kernel_is_stable_sooner(threads):
    # With MKL, input width 256 is stable from 11 rows, 1024 only from 16; with a BLAS whose every row
    # count agrees both are 1. Either way the narrower product never needs more rows than the wider.
    narrow, wide = row_floor(256, 1024, torch.float32, "cpu", threads), row_floor(1024, 256, torch.float32,
                                                                                  "cpu", threads)
    assert narrow <= wide
    x, w = randn(48, 1024, seed=3), randn(256, 1024, seed=1, scale=1024**-0.5)
    if wide > 1:  # one row fewer than the floor is a product whose rows get other bits (on this data too)
        assert not torch.equal(F.linear(x[: wide - 1], w), F.linear(x, w)[: wide - 1])


@torch.inference_mode()
def test_set_min_rows_none_gives_each_product_its_measured_floor(threads, model):
    model.set_min_rows(None)
    head = model.to_logits[1]
    floors = {}
    for module in model.modules():
        if isinstance(module, FloorLinear):
            out = CFG.image_vocab_size if module is head else module.out_features
            assert module.min_rows == row_floor(module.in_features, out, torch.float32, "cpu", threads)
            floors[module.in_features, out] = module.min_rows
    assert set(floors) == {(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 8192)}
    hidden = randn(24, CFG.hidden_size, seed=5, scale=3.0)
    assert rows_that_differ(model.image_logits, hidden) == []
    model.set_min_rows(0)
    assert {m.min_rows for m in model.modules() if isinstance(m, FloorLinear)} == {0}


# ------------------------------------------------------------------------------------------- the step


def fill_caches(model: DalleModel, rows: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Caches of ``rows`` rows holding random keys and values (every slot); returns copies to restore."""
    model.setup_caches(rows)
    gen = torch.Generator().manual_seed(seed)
    saved = []
    for cache in model.kv_caches:
        cache.k_cache.copy_(torch.randn(cache.k_cache.shape, generator=gen))
        cache.v_cache.copy_(torch.randn(cache.v_cache.shape, generator=gen))
        saved.append((cache.k_cache.clone(), cache.v_cache.clone()))
    return saved


def restore_caches(model: DalleModel, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for cache, (k, v) in zip(model.kv_caches, saved):
        cache.k_cache.copy_(k)
        cache.v_cache.copy_(v)


# The first image position, one in the middle (the row ring has wrapped), and the last one fed.
STEP_POSITIONS = [CFG.n_text, CFG.n_text + 600, CFG.n_text + CFG.image_seq_length - 2]


@pytest.mark.parametrize("pos", STEP_POSITIONS, ids=lambda p: f"pos{p}")
@torch.inference_mode()
def test_a_model_step_gives_a_row_the_same_hidden_and_logits_alone_and_in_batches(threads, model, pos):
    model.set_min_rows(INVARIANT_MIN_ROWS)
    fill_caches(model, 24, seed=pos)
    tokens = torch.randint(0, CFG.image_vocab_size, (24,), generator=torch.Generator().manual_seed(pos))

    def step(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x = model.embed_step(tokens[rows], pos)
        hidden = model.step_layers(x, pos, range(CFG.num_layers), rows)  # [B, 1, h]
        return hidden, model.image_logits(hidden[:, -1])

    alone = [step(slice(j, j + 1)) for j in range(24)]
    for m in SIZES:
        hidden, logits = step(slice(0, m))
        for j in range(m):
            assert torch.equal(hidden[j : j + 1], alone[j][0]), (m, j)
            assert torch.equal(logits[j : j + 1], alone[j][1]), (m, j)
    model.release_caches()


# Survivors after partners leave: three spread out, 16 of 24 (a product of the floor's size), the last row.
KEEPS = {
    "3-of-24": [0, 7, 23],
    "16-of-24": list(range(4, 20)),
    "the-last": [23],
}


@pytest.mark.parametrize("keep", KEEPS.values(), ids=KEEPS.keys())
@torch.inference_mode()
def test_survivors_compute_the_same_bits_after_their_partners_are_removed(threads, model, keep):
    # A step with all 24 rows, compact_caches moves the survivors to the front (index_select), and the next
    # step runs the survivors only: each survivor's logits at both steps are those of the row decoded alone.
    model.set_min_rows(INVARIANT_MIN_ROWS)
    pos = CFG.n_text + 100
    saved = fill_caches(model, 24, seed=7)
    gen = torch.Generator().manual_seed(8)
    tok0, tok1 = (torch.randint(0, CFG.image_vocab_size, (24,), generator=gen) for _ in range(2))
    alone = []
    for j in keep:
        restore_caches(model, saved)
        rows = slice(j, j + 1)
        alone.append((model.step(tok0[rows], pos, rows), model.step(tok1[rows], pos + 1, rows)))
    restore_caches(model, saved)
    first = model.step(tok0, pos)  # [24, iv]
    idx = torch.tensor(keep)
    model.compact_caches(idx, 24)
    second = model.step(tok1.index_select(0, idx), pos + 1, slice(0, len(keep)))
    for k, j in enumerate(keep):
        assert torch.equal(first[j : j + 1], alone[k][0]), j
        assert torch.equal(second[k : k + 1], alone[k][1]), j
    model.release_caches()


@pytest.mark.parametrize("hidden", [256, 3840])
@torch.inference_mode()
def test_layer_norm_gives_a_row_the_same_bits_alone_and_in_batches(threads, hidden):
    norm = torch.nn.LayerNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + randn(hidden, seed=1, scale=0.3))
        norm.bias.copy_(randn(hidden, seed=2, scale=0.3))
    x = randn(24, 1, hidden, seed=3, scale=5.0)
    assert rows_that_differ(norm, x) == []


# Eager steps attend a prefix of the full cache (1152 positions) with one row of the layer's mask: at the
# first image token, the middle, the last; a row layer's ring cache has the text and 33 slots, read through
# a row of its slot table; a captured step attends the whole cache with a [1, S] mask row.
CACHE_LEN = CFG.total_seq_length  # 1152
RING = CFG.text_seq_length + row_window(CFG)  # 161 slots


def _prefix(kind: str, pos: int) -> tuple[int, torch.Tensor]:
    return pos + 1, build_mask(kind, CFG)[pos : pos + 1, : pos + 1]  # a [1, S] slice of the mask


def _ring_table() -> torch.Tensor:
    """[S, RING] bool: the ring slots each position's query reads."""
    return window_table(build_mask("row", CFG)[:CACHE_LEN, :CACHE_LEN], CFG.text_seq_length, row_window(CFG))


ATTENTION_CASES = {
    "col-prefix-first-image": lambda: _prefix("col", CFG.n_text),
    "col-prefix-middle": lambda: _prefix("col", CFG.n_text + 600),
    "conv-prefix-last": lambda: _prefix("conv", CACHE_LEN - 1),
    "row-ring": lambda: (RING, _ring_table()[700:701]),
    "whole-cache": lambda: (CACHE_LEN, build_mask("col", CFG)[900:901].contiguous()),
}


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
@torch.inference_mode()
def test_attention_over_cached_keys_gives_a_row_the_same_bits_alone_and_in_batches(threads, case):
    visible, mask = case()
    assert mask.dtype == torch.bool and mask.shape == (1, visible)
    nh, hd = 4, 64
    q = randn(24, nh, 1, hd, seed=1)
    k_cache, v_cache = randn(24, nh, CACHE_LEN, hd, seed=2), randn(24, nh, CACHE_LEN, hd, seed=3)

    # A row's keys and values are the same rows of the cache as its query (strided views, as
    # KVCache.update returns them).
    alone = [attention(q[j : j + 1], k_cache[j : j + 1, :, :visible], v_cache[j : j + 1, :, :visible], mask)
             for j in range(24)]
    for m in SIZES:
        out = attention(q[:m], k_cache[:m, :, :visible], v_cache[:m, :, :visible], mask)  # [m, nh, 1, hd]
        for j in range(m):
            assert torch.equal(out[j : j + 1], alone[j]), (m, j)


# ------------------------------------------------------------------------------------------- sampling


def sampling_rows(settings: Sequence[SamplingParams], n: int) -> tuple[torch.Tensor, ...]:
    """Per-row temperature, top_k and top_p for ``n`` rows cycling through ``settings``."""
    rows = [settings[i % len(settings)] for i in range(n)]
    return (torch.tensor([s.temperature for s in rows], dtype=torch.float32),
            torch.tensor([s.top_k for s in rows]), torch.tensor([s.top_p for s in rows], dtype=torch.float32))


SAMPLING_CASES = {
    "kandinsky": [KANDINSKY],
    "k64-p0.9-t0.7": [SamplingParams(64, 0.9, 0.7)],
    "mixed-rows": [KANDINSKY, SamplingParams(64, 0.9, 0.7), SamplingParams(1, 1.0, 1.0),
                   SamplingParams(8192, 1.0, 1.5)],
}


@pytest.mark.parametrize("settings", SAMPLING_CASES.values(), ids=SAMPLING_CASES.keys())
@torch.inference_mode()
def test_filtering_and_sampling_give_a_row_the_same_bits_alone_and_in_batches(threads, settings):
    logits = randn(24, CFG.image_vocab_size, seed=1, scale=4.0)
    u = torch.rand(24, generator=torch.Generator().manual_seed(2))
    temperature, top_k, top_p = sampling_rows(settings, 24)
    packed = torch.cat((logits, u[:, None], temperature[:, None], top_k[:, None].float(), top_p[:, None]), 1)

    def unpack(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        iv = CFG.image_vocab_size
        return rows[:, :iv], rows[:, iv], rows[:, iv + 1], rows[:, iv + 2].long(), rows[:, iv + 3]

    def filtered(rows: torch.Tensor) -> torch.Tensor:
        lg, _, t, k, p = unpack(rows)
        return filter_logits(lg, t, k, p)

    def sampled(rows: torch.Tensor) -> torch.Tensor:
        lg, uu, t, k, p = unpack(rows)
        return sample_tokens(lg, uu, t, k, p)

    assert rows_that_differ(filtered, packed) == []
    assert rows_that_differ(sampled, packed) == []
    kept = (filter_logits(logits, temperature, top_k, top_p) > -math.inf).sum(1)  # [24]
    cuts = (top_k < CFG.image_vocab_size) | (top_p < 1)
    assert bool((kept[cuts] < CFG.image_vocab_size).all()) and int(kept.min()) >= 1  # the filters did cut


@torch.inference_mode()
def test_cross_entropy_over_8192_codes_gives_a_row_the_same_bits_alone_and_in_batches(threads):
    logits = randn(24, CFG.image_vocab_size, seed=1, scale=4.0)
    targets = torch.randint(0, CFG.image_vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    packed = torch.cat((logits, targets[:, None].float()), 1)

    def ce(rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(rows[:, :-1], rows[:, -1].long(), reduction="none").exp()

    assert rows_that_differ(ce, packed) == []


def test_a_seeds_uniforms_do_not_depend_on_other_requests_or_the_global_generator():
    seq = CFG.image_seq_length
    alone = request_uniforms(123, 4, seq)
    assert alone.shape == (4, seq) and alone.dtype == torch.float32
    state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        before = [request_uniforms(s, n, seq) for s, n in [(7, 3), (123, 4), (8, 20)]]
        torch.rand(1000)  # the global generator moves on
        after = [request_uniforms(s, n, seq) for s, n in [(8, 20), (9, 1), (123, 4)]]
    finally:
        torch.set_rng_state(state)
    assert torch.equal(before[1], alone) and torch.equal(after[2], alone)
    assert not torch.equal(request_uniforms(124, 4, seq), alone)


# ------------------------------------------------------------------------------------------- end to end


def other_requests(n_images: int, first_seed: int) -> list[GenerationRequest]:
    """Partners: ``n_images`` images in requests of 1..5, each with its own text, seed and sampling."""
    reqs, k = [], 0
    while n_images:
        n = min(n_images, 1 + (first_seed + k) % 5)
        sampling = OTHER_SAMPLING[(first_seed + k) % len(OTHER_SAMPLING)]
        text = text_ids(CFG, first_seed + k, length=4 + (first_seed + k) % 20)
        reqs.append(GenerationRequest(text, n, sampling, 10_000 + first_seed + k))
        n_images -= n
        k += 1
    return reqs


# The request: 4 images at Kandinsky's sampling. (Its seed is one whose codes the control below sees change
# without batch invariance on MKL: most seeds only change the ppl bits there, no sample crossing a boundary.)
MINE = GenerationRequest(text_ids(CFG, 0, length=12), 4, KANDINSKY, 7)

# (images before MINE, images after MINE): MINE last of 5 rows, first of 12, in the middle of 16.
MERGES = {
    "beside-1-last": (1, 0),
    "beside-8-first": (0, 8),
    "beside-12-middle": (5, 7),
}


def merged(before: int, after: int) -> tuple[list[GenerationRequest], int]:
    """MINE between partners of ``before`` and ``after`` images; returns the requests and MINE's index."""
    head, tail = other_requests(before, first_seed=1), other_requests(after, first_seed=50)
    return [*head, MINE, *tail], len(head)


def assert_same(got: GenerationOutput | None, want: GenerationOutput) -> None:
    assert got is not None
    assert torch.equal(got.codes, want.codes), f"{int((got.codes != want.codes).sum())} codes differ"
    assert torch.equal(got.ppl, want.ppl), (got.ppl, want.ppl)


def count_step_rows(dec: ImageTokenDecoder) -> list[int]:
    """The rows of every step the decoder feeds through the layers, appended as it runs."""
    fed: list[int] = []
    real = dec._forward_token

    def counting(g, tokens, pos):  # type: ignore[no-untyped-def]
        fed.append(tokens.shape[0])
        return real(g, tokens, pos)

    dec._forward_token = counting  # type: ignore[method-assign]
    return fed


def stop_half_way(*stopped: int):
    def on_step(tick: decoding.Tick) -> list[int]:
        return list(stopped) if tick.steps >= HALF_WAY else []

    return on_step


@pytest.fixture
def e2e_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(E2E_THREADS)
    yield
    torch.set_num_threads(before)


def generate(model: DalleModel, reqs: list[GenerationRequest], **kwargs) -> list[GenerationOutput | None]:
    before = torch.get_num_threads()
    torch.set_num_threads(E2E_THREADS)
    try:
        return ImageTokenDecoder(model, 24, **kwargs).generate(reqs)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def alone(model: DalleModel) -> GenerationOutput:
    out = generate(model, [MINE])[0]
    assert out is not None and out.codes.shape == (4, CFG.image_seq_length)
    assert len(set(out.codes.flatten().tolist())) > 100  # sampled, not collapsed onto a few codes
    return out


@pytest.mark.parametrize(("before", "after"), MERGES.values(), ids=MERGES.keys())
def test_a_request_gets_the_same_codes_and_ppl_alone_and_merged_with_other_images(
    e2e_threads, model, alone, before, after
):
    reqs, mine = merged(before, after)
    assert sum(r.num_images for r in reqs) == 4 + before + after
    dec = ImageTokenDecoder(model, 24)
    fed = count_step_rows(dec)
    out = dec.generate(reqs)
    assert set(fed) == {4 + before + after}
    assert_same(out[mine], alone)


def test_a_request_gets_the_same_codes_and_ppl_beside_20_images_of_which_two_partners_stop_half_way(
    e2e_threads, model, alone
):
    # 9 partner images, MINE, 11 more: 24 rows. After step 512 the first partner (2 images) and the one
    # right after MINE (1 image) stop: their rows are compacted away and MINE's rows move from 9..12 to 7..10
    # of a 21-row step.
    reqs, mine = merged(9, 11)
    first, after_mine = 0, mine + 1
    assert reqs[first].num_images == 2 and reqs[after_mine].num_images == 1
    dec = ImageTokenDecoder(model, 24)
    fed = count_step_rows(dec)
    out = dec.generate(reqs, on_step=stop_half_way(first, after_mine))
    assert out[first] is None and out[after_mine] is None
    assert fed == [24] * HALF_WAY + [21] * (CFG.image_seq_length - 1 - HALF_WAY)
    assert_same(out[mine], alone)


def test_a_request_split_into_smaller_chunks_by_max_rows_gets_the_same_codes_and_ppl(
    e2e_threads, model, alone
):
    # The out-of-memory retry: chunks of 3 rows, [partner, partner, MINE 0] then [MINE 1..3].
    reqs = [*other_requests(2, first_seed=90), MINE]
    out = ImageTokenDecoder(model, 24).generate(reqs, max_rows=3)
    assert_same(out[-1], alone)


def test_padded_steps_give_the_same_codes_and_ppl_beside_a_stopped_partner_and_split(
    e2e_threads, model, alone
):
    # CUDA's batch-invariant mode on the CPU: every step runs the chunk's capacity of rows (4, from max_rows)
    # and padding rows decode along. Chunk 1: a partner image (stopped half way: it decodes on as padding),
    # MINE 0..2; chunk 2: MINE 3, a partner image and two padding rows.
    dec = ImageTokenDecoder(model, 24)
    dec.pad_steps = True
    fed = count_step_rows(dec)
    reqs = [GenerationRequest(text_ids(CFG, 95, 7), 1, OTHER_SAMPLING[2], 95), MINE,
            *other_requests(1, first_seed=96)]
    out = dec.generate(reqs, on_step=stop_half_way(0), max_rows=4)
    assert out[0] is None
    assert set(fed) == {4} and len(fed) == 2 * (CFG.image_seq_length - 1)
    assert_same(out[1], alone)


@pytest.fixture(scope="module")
def without_invariance(model: DalleModel) -> tuple[GenerationOutput, GenerationOutput]:
    """MINE alone and beside 8 partner images (12 rows), decoded with batch_invariant=False."""
    reqs, mine = merged(*MERGES["beside-8-first"])
    base = generate(model, [MINE], batch_invariant=False)[0]
    out = generate(model, reqs, batch_invariant=False)[mine]
    assert base is not None and out is not None
    return base, out


def test_without_batch_invariance_a_merge_changes_the_ppl_bits(without_invariance):
    # The control: the comparison above must be able to fail. Without the floor, the alone run's 4-row
    # products take MKL's small-row kernels and the 12-row products others.
    base, out = without_invariance
    if torch.equal(out.ppl, base.ppl):
        pytest.skip("without batch invariance the merge gave the same ppl bits on this machine's BLAS")
    assert not torch.equal(out.ppl, base.ppl)


def test_without_batch_invariance_a_merge_changes_some_codes(without_invariance):
    # A code changes only when a sample's uniform falls between the two runs' CDF values (or near-tied codes
    # swap order): most seeds see only other ppl bits, MINE's seed sees codes change on MKL.
    base, out = without_invariance
    if torch.equal(out.codes, base.codes):
        pytest.skip("without batch invariance no code of this merge changed on this machine (the ppl bits "
                    "may still differ: see the test above)")
    assert int((out.codes != base.codes).sum()) > 0
