"""The row floor of a linear product: the fewest rows from which a BLAS library gives every row the same
bits whatever the product's row count (batch invariance, app/engine/nets/decoding.py).

Libraries choose a kernel by the product's shape; MKL, for example, rounds products of fewer than 11 rows
(input width 256) or 16 rows (input width 1024 and more) differently from larger ones. The floor is
measured once per (input width, output width, dtype, device, threads) on random data of that shape,
since kernel choice depends on the shape, not the values: the smallest f such that every row count from
f to `probe` gives each row the bits it has at `probe` rows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def row_floor(in_features: int, out_features: int, dtype: torch.dtype, device: str, threads: int,
              probe: int = 48) -> int:
    """The fewest rows a product [rows, in] x [in, out] needs for bit-stable rows (1: any count)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(probe, in_features, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(out_features, in_features, generator=gen) * in_features**-0.5).to(device=device,
                                                                                       dtype=dtype)
    with torch.inference_mode():
        ref = F.linear(x, w)
        for rows in range(probe - 1, 0, -1):
            if not torch.equal(F.linear(x[:rows], w), ref[:rows]):
                return rows + 1
    return 1
