"""Continuous batching at the decoder: requests join and leave a running step loop over row slots, and a
request's codes and ppl are bit-for-bit those it gets alone, whatever step it joined at and whatever
its partners do (join, finish, cancel), with micro-batches and image prompts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import pytest
import torch

from app.engine.nets.dalle import DalleConfig, DalleModel
from app.engine.nets.decoding import GenerationOutput, GenerationRequest, ImageTokenDecoder, SamplingParams
from app.engine.nets.slots import SlotDecoder

# Two layers (a row-mask layer with its ring cache and a column-mask layer), an 8x8 grid: 64 steps per
# image, so that joins "at and between image rows" (every 8 steps) are cheap to reach.
SMALL = DalleConfig(num_layers=2, hidden_size=64, num_attention_heads=4, text_seq_length=16,
                    image_tokens_per_dim=8, vocab_size=256 + 16, image_vocab_size=512)
# Kandinsky's sampling width and grid (8192 codes, 32x32), hidden 256, for one end-to-end join.
WIDE = DalleConfig(num_layers=2, hidden_size=256, num_attention_heads=4, text_seq_length=128,
                   image_tokens_per_dim=32, image_vocab_size=8192)
FREE = SamplingParams(top_k=64, top_p=0.95, temperature=1.0)
SLOTS = 8


def make_model(cfg: DalleConfig, seed: int = 0, std: float = 0.3) -> DalleModel:
    model = DalleModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if name.endswith("weight") and p.dim() == 1 else noise)
    return model


def text(cfg: DalleConfig, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(cfg.text_seq_length, dtype=torch.long)
    ids[:5] = torch.randint(4, cfg.vocab_size - cfg.text_seq_length, (5,), generator=gen)
    return ids


def req(cfg: DalleConfig, seed: int, n: int = 2, sampling: SamplingParams = FREE,
        forced: torch.Tensor | None = None) -> GenerationRequest:
    return GenerationRequest(text(cfg, seed), n, sampling, seed, forced)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Module-scoped, so that it is set before the module's `alone` results are made too: a request's
    # codes and ppl are the same whatever shares its batch at one thread count; across thread counts the
    # product's kernels (and their rounding) may differ on some CPUs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small() -> DalleModel:
    return make_model(SMALL, seed=3)


def loop(model: DalleModel, slots: int = SLOTS, microbatches: int = 1) -> SlotDecoder:
    return SlotDecoder(ImageTokenDecoder(model, slots, microbatches=microbatches), slots)


def run(dec: SlotDecoder, plan: dict[int, list[tuple[Hashable, GenerationRequest]]],
        cancel: dict[int, list[Hashable]] | None = None) -> dict[Hashable, GenerationOutput]:
    """Step the loop, admitting plan[k] and cancelling cancel[k] before step k, until all are done."""
    out: dict[Hashable, GenerationOutput] = {}
    step = 0
    while step <= max(plan) or dec.keys():
        for key in (cancel or {}).get(step, []):
            dec.cancel(key)
        for key, r in plan.get(step, []):
            dec.admit(key, r)
        out.update(dec.step())
        step += 1
    return out


def same(a: GenerationOutput, b: GenerationOutput) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.ppl, b.ppl)


@pytest.fixture(scope="module")
def alone(small: DalleModel) -> GenerationOutput:
    return run(loop(small), {0: [("R", req(SMALL, 7, n=3))]})["R"]


@pytest.mark.parametrize("k", [1, 7, 8, 9, 20, 40, 63])
def test_a_request_joining_at_step_k_gets_the_codes_and_ppl_it_gets_alone(small, alone, k) -> None:
    # A partner is mid-way when R joins at step k (at and between image rows of 8 steps), and another
    # joins after R: R's rows sit at other slots and other positions than alone.
    plan = {0: [("A", req(SMALL, 1, n=2))], k: [("R", req(SMALL, 7, n=3))],
            k + 5: [("B", req(SMALL, 2, n=3))]}
    out = run(loop(small), plan)
    same(out["R"], alone)
    assert set(out) == {"A", "B", "R"}


def test_partners_that_finish_or_are_cancelled_do_not_change_a_request(small, alone) -> None:
    plan = {0: [("A", req(SMALL, 1, n=1)), ("C", req(SMALL, 4, n=4))], 30: [("R", req(SMALL, 7, n=3))]}
    # A finishes at step 64 while R runs; C is cancelled at step 50; D takes C's freed slots.
    plan[51] = [("D", req(SMALL, 5, n=4))]
    out = run(loop(small), plan, cancel={50: ["C"]})
    same(out["R"], alone)
    assert "C" not in out and {"A", "D", "R"} <= set(out)


def test_a_full_loop_admits_nothing_and_a_cancel_frees_slots_at_once(small) -> None:
    dec = loop(small, slots=4)
    dec.admit("A", req(SMALL, 1, n=3))
    assert dec.free_slots == 1 and dec.live_rows == 3
    with pytest.raises(RuntimeError, match="do not fit"):
        dec.admit("B", req(SMALL, 2, n=2))
    with pytest.raises(ValueError, match="already"):
        dec.admit("A", req(SMALL, 1, n=1))
    dec.step()
    dec.cancel("A")
    assert dec.free_slots == 4 and dec.keys() == []
    assert dec.step() == []


def test_rows_free_their_slots_when_their_request_is_done_and_partial_shows_progress(small) -> None:
    dec = loop(small, slots=4)
    dec.admit("A", req(SMALL, 1, n=2))
    for _ in range(10):
        assert dec.step() == []
    dec.admit("B", req(SMALL, 2, n=2))
    part = dec.partial("A")
    assert part.shape == (2, SMALL.image_seq_length)
    assert bool((part[:, :10] >= 0).all()) and bool((part[:, 10:] == -1).all())
    assert dec.progress("A") == 10 and dec.progress("B") == 0
    finished = []
    while not finished:
        finished = dec.step()
    assert [key for key, _ in finished] == ["A"]
    assert dec.free_slots == 2 and dec.progress("B") == SMALL.image_seq_length - 10


def test_a_request_joining_image_by_image_gets_the_codes_of_the_whole(small, alone) -> None:
    r = req(SMALL, 7, n=3)
    dec = loop(small, slots=4)
    dec.admit("A", req(SMALL, 1, n=2))
    for _ in range(5):
        dec.step()
    dec.admit(("R", 0), r, range(0, 2))  # two images now, the third when a slot frees
    out: dict = {}
    while len(out) < 3:
        out.update(dec.step())
        if "A" in out and ("R", 2) not in dec and ("R", 2) not in out:
            dec.admit(("R", 2), r, range(2, 3))
    codes = torch.cat([out[("R", 0)].codes, out[("R", 2)].codes])
    ppl = torch.cat([out[("R", 0)].ppl, out[("R", 2)].ppl])
    assert torch.equal(codes, alone.codes) and torch.equal(ppl, alone.ppl)
    with pytest.raises(ValueError, match="run of the request"):
        dec.admit("bad", r, range(2, 5))


def test_micro_batches_give_the_same_codes_as_one_batch(small, alone) -> None:
    plan = {0: [("A", req(SMALL, 1, n=2))], 9: [("R", req(SMALL, 7, n=3))]}
    out = run(loop(small, microbatches=2), plan)
    same(out["R"], alone)


def test_an_image_prompt_keeps_its_forced_codes_and_is_the_same_joined_late(small) -> None:
    forced = torch.full((SMALL.image_seq_length,), -1, dtype=torch.long)
    forced[:16] = torch.arange(16) * 7 % SMALL.image_vocab_size  # two grid rows given
    prompt = req(SMALL, 9, n=2, forced=forced)
    first = run(loop(small), {0: [("P", prompt)]})["P"]
    assert torch.equal(first.codes[:, :16], forced[:16].expand(2, -1))
    late = run(loop(small), {0: [("A", req(SMALL, 1, n=3))], 13: [("P", prompt)]})["P"]
    same(late, first)


def test_greedy_codes_equal_the_batch_decoders(small) -> None:
    # The loop is the same model computation as ImageTokenDecoder: greedy codes agree at every position.
    greedy = SamplingParams(top_k=1, top_p=1.0, temperature=1.0)
    r = req(SMALL, 11, n=2, sampling=greedy)
    (batch,) = ImageTokenDecoder(small, 4).generate([r])
    assert batch is not None
    looped = run(loop(small), {0: [("A", req(SMALL, 1, n=2))], 5: [("G", r)]})["G"]
    assert torch.equal(looped.codes, batch.codes)
    torch.testing.assert_close(looped.ppl, batch.ppl)


def test_without_invariance_the_loops_control_can_fail(small) -> None:
    # The comparisons above can fail: another seed gives other codes.
    a = run(loop(small), {0: [("R", req(SMALL, 7, n=3))]})["R"]
    b = run(loop(small), {0: [("R", GenerationRequest(text(SMALL, 7), 3, FREE, 8))]})["R"]
    assert not torch.equal(a.codes, b.codes)


@pytest.mark.long
def test_at_kandinskys_width_a_request_joining_mid_row_is_the_same_as_alone() -> None:
    model = make_model(WIDE, seed=5)
    kandinsky = SamplingParams(top_k=4096, top_p=0.975, temperature=1.0)
    r = req(WIDE, 21, n=2, sampling=kandinsky)
    alone_out = run(loop(model, slots=6), {0: [("R", r)]})["R"]
    plan = {0: [("A", req(WIDE, 22, n=3, sampling=kandinsky))], 45: [("R", r)]}
    out = run(loop(model, slots=6), plan)
    same(out["R"], alone_out)
