"""Sampling of one image token per row: a request's uniforms from its seed, HF-classic temperature /
top-k / top-p filtering per row, and inverse-CDF sampling. Every operation is per row, so a row's token
does not depend on the other rows of the batch (tested bit for bit at 8192 codes).
"""

from __future__ import annotations

import math

import torch


def request_uniforms(seed: int, num_images: int, image_seq_length: int) -> torch.Tensor:
    """The uniforms of one request, [num_images, image_seq_length] float32 on the CPU.

    Image i's token at step s is drawn with ``u[i, s]``; this is the whole definition of a seed.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.rand(num_images, image_seq_length, generator=gen)


def _filter_sorted(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k (ties kept), then HF-classic top-p, all per row, in sorted order.

    logits [B, V] float32; temperature [B] float; top_k [B] long in 1..V; top_p [B] float in (0, 1].
    Returns (filtered logits sorted descending with removed entries at -inf [B, V], their token ids [B, V]).
    The kept tokens are always a non-empty prefix of the sorted order. The sort is stable, so ties are
    ordered by token id and the first entry is the argmax.
    """
    x = logits / temperature[:, None]  # [B, V]
    sorted_x, ids = torch.sort(x, dim=-1, descending=True, stable=True)  # [B, V] each
    kth = sorted_x.gather(1, (top_k - 1)[:, None])  # [B, 1]
    # Everything below the k-th largest goes; values equal to it stay (HF keeps ties).
    sorted_x = sorted_x.masked_fill(sorted_x < kth, -math.inf)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    over = (cum > top_p[:, None]) & (top_p[:, None] < 1.0)  # HF applies top-p only when top_p < 1
    # Shift right: the first token that crosses top_p is kept, and so always at least one token.
    remove = torch.cat((torch.zeros_like(over[:, :1]), over[:, :-1]), dim=1)  # [B, V]
    return sorted_x.masked_fill(remove, -math.inf), ids


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """``logits / temperature`` with the tokens removed by top-k then top-p set to -inf, [B, V] float32.

    The same filtering ``sample_tokens`` applies (HF's classic ``top_k_top_p_filtering``, per row).
    """
    sorted_x, ids = _filter_sorted(logits.float(), temperature, top_k, top_p)
    return torch.full_like(sorted_x, -math.inf).scatter(1, ids, sorted_x)


def sample_tokens(
    logits: torch.Tensor,
    u: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """One token per row by inverse-CDF sampling of the filtered distribution, [B] long.

    logits [B, V]; u [B] uniforms in [0, 1). The CDF runs over the kept tokens in descending logit
    order (ties by token id). Rows with top_k == 1 take the argmax exactly. No host sync.
    """
    sorted_x, ids = _filter_sorted(logits.float(), temperature, top_k, top_p)  # [B, V] each
    cdf = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    kept = (sorted_x > -math.inf).sum(dim=-1)  # [B], >= 1
    pick = torch.searchsorted(cdf, u[:, None].to(cdf.dtype).contiguous(), right=True)[:, 0]  # [B]
    # Rounding can leave the last cumulative value below u: fall back to the last kept token.
    pick = torch.minimum(pick, kept - 1)
    tokens = ids.gather(1, pick[:, None])[:, 0]  # [B]
    return torch.where(top_k == 1, ids[:, 0], tokens)


