"""KV caches that belong to the attention layers, as in gpt-fast's ``KVCache``.

``DalleModel.setup_caches`` gives every layer's ``attention.kv_cache`` one of these; ``update(pos, k, v,
rows)`` writes the new keys and values and returns what attention reads: (keys, values, bool mask rows).

- ``KVCache``: slot p holds position p, for every position ever fed (text, then image tokens).
- ``RowWindowCache``: for row-mask layers, whose queries see the text and only the last ``window``
  positions: the text slots, then a ring of ``window`` slots (position p >= text_len in slot
  ``text_len + (p - text_len) % window``).

``pos`` is a Python int (eager: the full cache attends only over the prefix written so far), a [1]
long tensor on the cache's device (the position read on the device, as a captured CUDA graph needs: the
whole cache is attended and the mask row gathered there), or a [Bg] long tensor: one position per row
(continuous batching, where rows joined at different steps; the whole cache is attended and each row
reads its own mask row). ``rows`` is the slice of cache rows the new keys belong to (a micro-batch), or,
for the prefill at position 0, a [B] long index: cache row ``start + b`` (or ``start[b]``, a list of
cache rows) takes row ``rows[b]`` of the new keys (one text per request, several images each), and
attention then reads the new keys themselves.
"""

from __future__ import annotations

import torch
from torch import nn


def mask_is_window(mask: torch.Tensor, text_len: int, window: int) -> bool:
    """Whether no query of the position mask [S, S] sees an image key ``window`` or more positions back."""
    s = mask.shape[0]
    q = torch.arange(s)[:, None]
    k = torch.arange(s)[None, :]
    outside = (k >= text_len) & (k <= q - window)  # image keys older than the window
    return not bool((mask.cpu() & outside).any())


def window_slots(length: int, text_len: int, window: int) -> torch.Tensor:
    """[length] long: the ring cache slot that stores each position."""
    p = torch.arange(length)
    return torch.where(p < text_len, p, text_len + (p - text_len) % window)


def window_table(mask: torch.Tensor, text_len: int, window: int) -> torch.Tensor:
    """[S, text_len + window] bool: which ring slots the query at each position may read (mask [S, S])."""
    mask = mask.cpu()
    s = mask.shape[0]
    p = torch.arange(s)[:, None]  # [S, 1]
    slot = torch.arange(window)[None, :]  # [1, W]
    held = p - (p - text_len - slot) % window  # [S, W], newest position <= p stored in each ring slot
    seen = (held >= text_len) & mask.gather(1, held.clamp(min=0))  # [S, W]
    return torch.cat((mask[:, :text_len], seen), dim=1).contiguous()  # [S, t + W]


class RowLookup:
    """Row ``pos`` of a table for a position held in a device tensor, gathered once per position tensor.

    Every cache of one mask kind on one device shares one, so a step gathers each mask row once, not
    once per layer. The row is remembered by the identity of the ``pos`` tensor (whose value changes in
    place between steps), so ``forget`` must be called at the start of each step call
    (``DalleModel.step_layers`` does): for the new value, and so that a row gathered inside one captured
    graph is never read by another graph.
    """

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self._pos: torch.Tensor | None = None
        self._row = table[:0]

    def forget(self) -> None:
        self._pos = None

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        if self._pos is not pos:
            self._row = self.table.index_select(0, pos)
            self._pos = pos
        return self._row


Rows = slice | torch.Tensor
#: Where a prefill's rows go: cache rows start.. (an int), or these cache rows (a list).
Start = int | list[int]


class KVCache(nn.Module):
    """Keys and values of every fed position, [B, nh, S, hd] each; slot p holds position p.

    ``mask`` is the layer's position mask [>= S, >= S] (shared, not copied); ``lookup`` gathers its rows
    for a device-held position (shared by the caches of one kind on one device).
    """

    def __init__(self, rows: int, num_heads: int, length: int, head_dim: int, mask: torch.Tensor,
                 lookup: RowLookup, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (rows, num_heads, length, head_dim)  # [B, nh, S, hd]
        # Zeros, not empty: masked slots still enter the attention product, and 0 * NaN is NaN.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.mask = mask
        self.lookup = lookup

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    @property
    def rows(self) -> int:
        return self.k_cache.shape[0]

    @property
    def length(self) -> int:
        return self.k_cache.shape[2]

    def _fan_out(self, pos: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, start: Start) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if pos != 0:
            raise ValueError(f"a row index is only for the prefill at position 0, got position {pos}")
        b, t = rows.shape[0], k.shape[2]
        if isinstance(start, int):
            self.k_cache[start : start + b].index_copy_(2, slots, k.index_select(0, rows))
            self.v_cache[start : start + b].index_copy_(2, slots, v.index_select(0, rows))
        else:  # scattered cache rows (free slots of a continuous batch)
            if len(start) != b:
                raise ValueError(f"{len(start)} cache rows for {b} prefilled rows")
            for n, row in enumerate(start):
                self.k_cache[row].index_copy_(1, slots, k[rows[n]])
                self.v_cache[row].index_copy_(1, slots, v[rows[n]])
        return k, v, self.mask[:t, :t]  # [R, nh, T, hd] x2, [T, T]

    @staticmethod
    def _write_rows(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
        """Write new [Bg, nh, 1, hd] into cache [Bg, nh, S, hd] at one slot per row, slots [Bg]."""
        cache.scatter_(2, slots.view(-1, 1, 1, 1).expand_as(new), new)

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: Rows = slice(None), start: Start = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v [Bg, nh, T, hd] at positions pos.. of cache rows ``rows`` (a row index: the prefill's
        cache rows ``start..``, row ``start + b`` from text ``rows[b]``); returns
        (keys [Bg, nh, S', hd], values [Bg, nh, S', hd], mask [T, S']) for attention.
        """
        t = k.shape[2]
        if isinstance(rows, torch.Tensor):
            assert isinstance(pos, int)
            return self._fan_out(pos, k, v, rows, torch.arange(t, device=k.device), start)
        k_cache, v_cache = self.k_cache[rows], self.v_cache[rows]  # [Bg, nh, S, hd]
        if isinstance(pos, int):
            k_cache[:, :, pos : pos + t] = k
            v_cache[:, :, pos : pos + t] = v
            # Keys after pos are not written yet and are masked anyway; skip them.
            visible = pos + t
            return k_cache[:, :, :visible], v_cache[:, :, :visible], self.mask[pos : pos + t, :visible]
        if pos.numel() > 1:  # one position per row
            self._write_rows(k_cache, pos, k)
            self._write_rows(v_cache, pos, v)
            return k_cache, v_cache, self.lookup(pos)[:, None, None, :]  # mask [Bg, 1, 1, S]
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        return k_cache, v_cache, self.lookup(pos)  # mask [1, S]

    def compact(self, keep: torch.Tensor, rows: int) -> None:
        """Copy cache rows ``keep`` (ascending indices into the first ``rows``) to the front."""
        idx = keep.to(self.k_cache.device)
        self.k_cache[: len(keep)] = self.k_cache[:rows].index_select(0, idx)
        self.v_cache[: len(keep)] = self.v_cache[:rows].index_select(0, idx)


class RowWindowCache(KVCache):
    """The text slots, then a ring of ``window`` slots for the image positions, [B, nh, t + W, hd] each.

    ``table`` [S, t + W] says which slots each position's query reads (``window_table``), ``slots`` [S]
    which slot stores each position (``window_slots``); ``lookup`` gathers table rows and
    ``slot_lookup`` slots for a device-held position. ``mask`` is the layer's position mask (prefill).
    """

    def __init__(self, rows: int, num_heads: int, head_dim: int, text_len: int, window: int,
                 mask: torch.Tensor, table: torch.Tensor, slots: torch.Tensor, lookup: RowLookup,
                 slot_lookup: RowLookup, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(rows, num_heads, text_len + window, head_dim, mask, lookup,
                         dtype=dtype, device=device)
        self.text_len, self.window = text_len, window
        self.table, self.slots, self.slot_lookup = table, slots, slot_lookup

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: Rows = slice(None), start: Start = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``KVCache.update``; the whole ring is always attended: (keys, values [Bg, nh, t + W, hd],
        mask [T, t + W])."""
        t = k.shape[2]
        if isinstance(rows, torch.Tensor):
            assert isinstance(pos, int)
            return self._fan_out(pos, k, v, rows, self.slots[:t], start)
        k_cache, v_cache = self.k_cache[rows], self.v_cache[rows]  # [Bg, nh, t + W, hd]
        if isinstance(pos, int):
            slots, mask = self.slots[pos : pos + t], self.table[pos : pos + t]
        elif pos.numel() > 1:  # one position per row
            slots = self.slot_lookup(pos)  # [Bg]
            self._write_rows(k_cache, slots, k)
            self._write_rows(v_cache, slots, v)
            return k_cache, v_cache, self.lookup(pos)[:, None, None, :]  # mask [Bg, 1, 1, t + W]
        else:
            slots, mask = self.slot_lookup(pos), self.lookup(pos)
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        return k_cache, v_cache, mask
