"""The layers' KV caches: ring slots and mask tables, update results, compaction, shared row lookups."""

from __future__ import annotations

import pytest
import torch

from app.engine.nets.dalle import DalleConfig, build_mask, row_mask_is_window, row_window
from app.engine.nets.kv_cache import (
    KVCache,
    RowLookup,
    RowWindowCache,
    mask_is_window,
    window_slots,
    window_table,
)

CFG = DalleConfig(num_layers=4, hidden_size=16, num_attention_heads=2, text_seq_length=6,
                  image_tokens_per_dim=4, vocab_size=40, image_vocab_size=24)
S = CFG.text_seq_length + CFG.image_seq_length - 1
T, W = CFG.text_seq_length, row_window(CFG)


def test_the_row_mask_is_a_window_and_the_column_mask_is_not():
    assert row_mask_is_window(CFG)
    assert mask_is_window(build_mask("row", CFG)[:S, :S], T, W)
    assert not mask_is_window(build_mask("col", CFG)[:S, :S], T, W)


def test_the_window_table_marks_exactly_the_slots_holding_visible_positions():
    mask = build_mask("row", CFG)[:S, :S]
    slots, table = window_slots(S, T, W), window_table(mask, T, W)
    assert table.shape == (S, T + W)
    held = torch.full((T + W,), -1)  # which position each slot holds after position p is written
    for p in range(S):
        held[slots[p]] = p
        visible = {int(q) for q in held[table[p]]}
        assert visible == set(torch.nonzero(mask[p]).flatten().tolist()), p


def _caches(rows: int = 3) -> tuple[KVCache, RowWindowCache]:
    mask = build_mask("row", CFG)[:S, :S]
    table, slots = window_table(mask, T, W), window_slots(S, T, W)
    kw = {"dtype": torch.float32, "device": torch.device("cpu")}
    full = KVCache(rows, 2, S, 8, mask, RowLookup(mask), **kw)
    ring = RowWindowCache(rows, 2, 8, T, W, mask, table, slots, RowLookup(table), RowLookup(slots), **kw)
    return full, ring


def _attend(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


@pytest.mark.parametrize("device_pos", [False, True])
def test_full_and_ring_caches_give_the_same_attention_at_every_position(device_pos):
    full, ring = _caches()
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)  # two texts
    rows = torch.tensor([0, 1, 1])
    for cache in (full, ring):
        keys, values, mask = cache.update(0, k, v, rows)
        assert keys is k and values is v and torch.equal(mask, build_mask("row", CFG)[:T, :T])
    for p in range(T, S):
        k1, v1, q = (torch.randn(2, 2, 1, 8, generator=g) for _ in range(3))
        at: int | torch.Tensor = torch.tensor([p]) if device_pos else p
        out = []
        for cache in (full, ring):
            keys, values, mask = cache.update(at, k1, v1, slice(1, 3))  # [2, nh, S', hd], [1, S']
            if cache is full and not device_pos:
                assert keys.shape[2] == mask.shape[1] == p + 1  # only the written prefix
            if isinstance(at, torch.Tensor):
                cache.lookup.forget()  # the step does this at each call: the next tensor is new
            out.append(_attend(keys, values, mask, q))
        torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)


def test_prefill_fans_each_text_out_to_its_rows_and_only_at_position_zero():
    full, ring = _caches()
    k = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 2, T, 8)
    for cache in (full, ring):
        cache.update(0, k, k, torch.tensor([1, 0, 1]))
        assert cache.k_cache[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]
        with pytest.raises(ValueError, match="position 0"):
            cache.update(T, k, k, torch.tensor([0]))


def test_compact_keeps_the_listed_rows_in_order():
    full, _ = _caches(rows=4)
    full.k_cache.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(full.k_cache))
    full.compact(torch.tensor([1, 3]), 4)
    assert full.k_cache[:, 0, 0, 0].tolist() == [1.0, 3.0, 2.0, 3.0]


def test_a_row_lookup_gathers_once_per_position_tensor_until_forgotten():
    lookup = RowLookup(torch.arange(12).view(6, 2))
    pos = torch.tensor([2])
    first = lookup(pos)
    assert first.tolist() == [[4, 5]] and lookup(pos) is first
    pos.fill_(3)
    lookup.forget()
    assert lookup(pos).tolist() == [[6, 7]]
