"""The ruDALL-E transformer (Kandinsky 12B, Malevich/Emojich XL), faithful to upstream ``rudalle.dalle``.

Module and parameter names match the published state dicts exactly, so a checkpoint loads with
``load_state_dict(strict=True)`` once the upstream mask buffers (``MASK_BUFFERS``) are dropped: the
masks are rebuilt here from the config instead of being stored as module state.

Sequence layout: ``text_seq_length`` text positions (v2 prepends one more, id 2), then
``image_tokens_per_dim ** 2`` image positions in row-major order. Masks are built against
``text_seq_length`` in both versions, exactly as upstream does (so in v2 the grid of the masks is
shifted by one position against the image tokens).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.nets.checks import OPTIONAL_IN_MANIFEST, positive_int
from app.engine.nets.invariance import row_floor
from app.engine.nets.kv_cache import (
    KVCache,
    RowLookup,
    RowWindowCache,
    mask_is_window,
    window_slots,
    window_table,
)

MaskKind = Literal["row", "col", "conv"]

MASK_BUFFERS = ("transformer.row_mask", "transformer.col_mask", "transformer.conv_mask")

# Upstream's get_conv_mask default; no published model changes it.
CONV_KERNEL = 11
LAYERNORM_EPS = 1e-5
# Largest finite fp16 value: upstream clamps the attention output so fp16 inference cannot overflow.
FP16_MAX = 65504.0
HF_VERSIONS = ("v2", "v3")


@dataclass(frozen=True)
class DalleConfig:
    """Shapes and flags of one ruDALL-E transformer; maps one to one onto the manifest's ``dalle`` block."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    text_seq_length: int = 128
    image_tokens_per_dim: int = 32
    vocab_size: int = 16512  # text vocabulary incl. the text_seq_length pad-position ids
    image_vocab_size: int = 8192
    hf_version: str = "v3"  # "v2" (Emojich) or "v3"
    cogview_sandwich_layernorm: bool = True
    # pb-relax rescales the attention scores before the softmax and back after it: the same softmax in
    # exact arithmetic (SPEC section 6), so no code reads this flag and model.json may leave it out.
    cogview_pb_relax: bool = field(default=True, metadata=OPTIONAL_IN_MANIFEST)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "text_seq_length",
                     "image_tokens_per_dim", "vocab_size", "image_vocab_size"):
            positive_int(getattr(self, name), f"dalle.{name}")
        for name in ("cogview_sandwich_layernorm", "cogview_pb_relax"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"dalle.{name} must be true or false, got {getattr(self, name)!r}")
        if self.hf_version not in HF_VERSIONS:
            raise ValueError(f"dalle.hf_version must be one of {HF_VERSIONS}, got {self.hf_version!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"dalle.hidden_size ({self.hidden_size}) must be divisible by "
                f"dalle.num_attention_heads ({self.num_attention_heads})"
            )
        if self.vocab_size <= self.text_seq_length:
            raise ValueError(
                f"dalle.vocab_size ({self.vocab_size}) must exceed dalle.text_seq_length "
                f"({self.text_seq_length}): the last text_seq_length ids are the pad-position ids"
            )

    @property
    def image_seq_length(self) -> int:
        return self.image_tokens_per_dim**2

    @property
    def total_seq_length(self) -> int:
        return self.text_seq_length + self.image_seq_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.image_vocab_size

    @property
    def n_text(self) -> int:
        """Text positions in the sequence: v2 prepends one extra id 2."""
        return self.text_seq_length + (1 if self.hf_version == "v2" else 0)

    @classmethod
    def from_manifest(cls, block: dict[str, Any]) -> DalleConfig:
        """Build from a manifest ``dalle`` block; ``checkpoint`` and unknown keys are ignored.

        Raises ValueError naming the missing or invalid key.
        """
        if not isinstance(block, dict):
            raise ValueError(f"dalle block must be a mapping, got {type(block).__name__}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in block:
                kwargs[f.name] = block[f.name]
            elif f.default is MISSING:
                raise ValueError(f"dalle.{f.name} is missing from the manifest")
        return cls(**kwargs)


DALLE_PRESETS: dict[str, DalleConfig] = {
    "kandinsky": DalleConfig(num_layers=64, hidden_size=3840, num_attention_heads=60),
    "malevich": DalleConfig(num_layers=24, hidden_size=2048, num_attention_heads=16),
    "emojich": DalleConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, hf_version="v2"),
}


def layer_mask_kind(layer: int, num_layers: int) -> MaskKind:
    """Which sparse mask layer ``layer`` of ``num_layers`` uses (upstream ``_get_layer_mask``)."""
    if (layer - 1) % 4 == 0:
        return "col"
    if layer != num_layers - 1:
        return "row"
    return "conv"


def row_window(cfg: DalleConfig) -> int:
    """How many image keys a row-mask query sees, itself included: keys at q - d .. q."""
    return cfg.image_tokens_per_dim + 1


def cached_positions(cfg: DalleConfig) -> int:
    """Positions ever fed through the layers while decoding: the text, then every image token but the last."""
    return cfg.n_text + cfg.image_seq_length - 1


@functools.lru_cache(maxsize=32)
def build_mask(kind: MaskKind, cfg: DalleConfig) -> torch.Tensor:
    """Upstream's bool mask of ``kind``: [total_seq_length, total_seq_length], [query, key], True = visible.

    Causal everywhere; text keys are visible to every later query; an image key is visible to later
    queries only as the kind says. Cached per (kind, cfg): do not modify the returned tensor.
    """
    n, t, d = cfg.total_seq_length, cfg.text_seq_length, cfg.image_tokens_per_dim
    pos = torch.arange(n)
    q, k = pos[:, None], pos[None, :]  # [N, 1], [1, N]
    delta = q - k  # [N, N], how far the query is after the key
    causal = delta >= 0
    text_key = k < t
    if kind == "row":
        image_rule = delta <= d
    elif kind == "col":
        image_rule = delta % d == 0
    elif kind == "conv":
        shift = CONV_KERNEL // 2
        cell_q, cell_k = (q - t).clamp(min=0), (k - t).clamp(min=0)
        dr = cell_q // d - cell_k // d  # [N, N]
        dc = cell_q % d - cell_k % d  # [N, N]
        if cfg.hf_version == "v2":
            # Window coordinates wrap around the grid edges.
            in_window = ((dr + shift) % d <= 2 * shift) & ((dc + shift) % d <= 2 * shift)
        else:
            # Window coordinates are clamped to the grid: the window is cut at the edges.
            in_window = (dr.abs() <= shift) & (dc.abs() <= shift)
        image_rule = (delta == 0) | in_window
    else:
        raise ValueError(f"mask kind must be 'row', 'col' or 'conv', got {kind!r}")
    return causal & (text_key | image_rule)


@functools.lru_cache(maxsize=32)
def row_mask_is_window(cfg: DalleConfig) -> bool:
    """Whether the row mask sees image keys only ``row_window(cfg)`` positions back (a ring cache fits)."""
    s = cached_positions(cfg)
    return mask_is_window(build_mask("row", cfg)[:s, :s], cfg.text_seq_length, row_window(cfg))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Upstream's tanh-approximated GELU, term for term."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with a boolean [Tq, Tk] mask (True = visible) -> [B, nh, Tq, hd].

    q: [B, nh, Tq, hd], k and v: [B, nh, Tk, hd]. Upstream's pb-relax rescaling only subtracts a
    per-head constant before the softmax, so it is left out.

    On the CPU it is upstream's own sequence of products and softmax: PyTorch's fused CPU kernel shares
    its work out by the call's batch size, and with more than one thread a row's bits then depend on how
    many rows share the call (torch 2.14 on an AVX-512 EPYC: every batch below 16 rounds differently),
    which would break batch invariance; the plain products give a row the same bits whatever the batch.
    A row that sees nothing gets a uniform softmax instead of NaNs.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def floor_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 min_rows: int) -> torch.Tensor:
    """``F.linear`` run as a product of at least ``min_rows`` rows (zero rows appended, then dropped).

    BLAS libraries pick a kernel by the product's shape, and kernels for few rows round differently
    (MKL: every row count below 16); with a floor, a row's bits do not depend on how many rows it shares
    the product with. x [..., in] -> [..., out].
    """
    rows = x.numel() // x.shape[-1]
    if rows >= min_rows:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])  # [rows, in]
    padded = torch.cat((flat, flat.new_zeros(min_rows - rows, flat.shape[-1])))  # [min_rows, in]
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class FloorLinear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose products have at least ``min_rows`` rows."""

    min_rows = 0  # set per instance by DalleModel.set_min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return floor_linear(x, self.weight, self.bias, self.min_rows)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.to(device)


class DalleSelfAttention(nn.Module):
    def __init__(self, cfg: DalleConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query_key_value = FloorLinear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = FloorLinear(cfg.hidden_size, cfg.hidden_size)
        # Set by DalleModel.setup_caches, dropped by release_caches (buffers not in the state dict).
        self.kv_cache: KVCache | None = None


class DalleMLP(nn.Module):
    def __init__(self, cfg: DalleConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = FloorLinear(cfg.hidden_size, 4 * cfg.hidden_size)
        self.dense_4h_to_h = FloorLinear(4 * cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class DalleLayer(nn.Module):
    """One transformer layer: ``forward(x, mask)`` is the full uncached layer, ``forward_cached(x, pos,
    rows)`` the same layer against its ``attention.kv_cache``. The pieces, in order:

    - ``h = layer.input_layernorm(x)``
    - ``q, k, v = layer.qkv(h)``: each [B, nh, T, hd] (q, k, v split along the last dim, in that order)
    - ``ctx = attention(q, k_all, v_all, mask)``: [B, nh, T, hd], mask a bool [T, T_all] slice
    - ``x = x + layer.attn_out(ctx)``: merge heads, ``dense``, clamp to +-65504, then the sandwich norm
    - ``x = layer.mlp_block(x)``: the whole second residual half, ``x + LN_b(mlp(LN_post(x)))``
    """

    def __init__(self, cfg: DalleConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.sandwich = cfg.cogview_sandwich_layernorm
        # Registration order follows upstream so that parameters enumerate in the file's order.
        self.input_layernorm = nn.LayerNorm(h, eps=LAYERNORM_EPS)
        if self.sandwich:
            self.before_first_addition_layernorm = nn.LayerNorm(h, eps=LAYERNORM_EPS)
            self.before_second_addition_layernorm = nn.LayerNorm(h, eps=LAYERNORM_EPS)
        self.attention = DalleSelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=LAYERNORM_EPS)
        self.mlp = DalleMLP(cfg)

    def qkv(self, x_normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, h] (after input_layernorm) -> q, k, v, each [B, nh, T, hd]."""
        b, t, _ = x_normed.shape
        att = self.attention
        mixed = att.query_key_value(x_normed)  # [B, T, 3h]
        q, k, v = mixed.chunk(3, dim=-1)  # each [B, T, h]
        shape = (b, t, att.num_heads, att.head_dim)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def attn_out(self, ctx: torch.Tensor) -> torch.Tensor:
        """Attention context [B, nh, T, hd] -> the residual branch [B, T, h] (dense, clamp, sandwich norm)."""
        b, _, t, _ = ctx.shape
        merged = ctx.transpose(1, 2).reshape(b, t, -1)  # [B, T, h]
        out = self.attention.dense(merged).clamp(min=-FP16_MAX, max=FP16_MAX)
        if self.sandwich:
            out = self.before_first_addition_layernorm(out)
        return out

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """The second residual half: x + LN_b(mlp(LN_post(x))), [B, T, h] -> [B, T, h]."""
        out = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            out = self.before_second_addition_layernorm(out)
        return x + out

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.input_layernorm(x))
        x = x + self.attn_out(attention(q, k, v, mask))
        return self.mlp_block(x)

    def forward_cached(self, x: torch.Tensor, pos: int | torch.Tensor,
                       rows: slice | torch.Tensor, start: int | list[int] = 0) -> torch.Tensor:
        """x [Bg, T, h] at positions pos.. (``KVCache.update`` tells ``pos`` and ``rows``) -> [Bg', T, h]."""
        cache = self.attention.kv_cache
        if cache is None:
            raise RuntimeError("no KV cache: call DalleModel.setup_caches first")
        q, k, v = self.qkv(self.input_layernorm(x))  # each [Bg, nh, T, hd]
        keys, values, mask = cache.update(pos, k, v, rows, start)  # [Bg, nh, S', hd] x2, [T, S']
        x = x + self.attn_out(attention(q, keys, values, mask))
        return self.mlp_block(x)


class DalleTransformer(nn.Module):
    def __init__(self, cfg: DalleConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DalleLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS)


class DalleModel(nn.Module):
    """The ruDALL-E transformer; ``forward`` is the full, uncached reference pass.

    Cached decoding, as in gpt-fast: ``setup_caches(rows)`` gives each layer a KV cache, ``prefill``
    runs the text and fills the caches, ``step`` feeds one image token per row at a position and returns
    the next image logits. ``embed_step``, ``step_layers`` and ``image_logits`` are ``step``'s pieces,
    for a caller that runs the layers of each device on its own (pipelined micro-batches, graphs).

    Layers may sit on different devices (an accelerate-style device map): hidden states follow each
    module's device at the boundary, and masks are copied to each device once.
    """

    def __init__(self, cfg: DalleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.text_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.image_embeddings = nn.Embedding(cfg.image_vocab_size, h)
        # Upstream sizes this table text_seq_length + 1 for every version; v3 only uses the first rows.
        self.text_pos_embeddings = nn.Embedding(cfg.text_seq_length + 1, h)
        self.image_row_embeddings = nn.Embedding(cfg.image_tokens_per_dim, h)
        self.image_col_embeddings = nn.Embedding(cfg.image_tokens_per_dim, h)
        self.to_logits = nn.Sequential(
            nn.LayerNorm(h, eps=LAYERNORM_EPS), FloorLinear(h, cfg.total_vocab_size)
        )
        self.transformer = DalleTransformer(cfg)
        self._masks: dict[tuple[MaskKind, torch.device], torch.Tensor] = {}
        # Per (kind, windowed, device): mask/slot tables and their device-position lookups, shared by caches.
        self._lookups: dict[tuple[MaskKind, bool, torch.device], tuple[RowLookup, ...]] = {}
        self._window_tables: dict[tuple[MaskKind, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        #: Rows of the current caches (0: none), whether row layers keep rings, and a counter that
        #: changes whenever the caches are replaced or dropped (graphs recorded on them are then stale).
        self.cache_rows = 0
        self.cache_windowed = False
        self.cache_generation = 0

    def set_min_rows(self, rows: int | None) -> None:
        """Every linear product of the model runs with at least ``rows`` rows (0: as given; None: each
        product's measured ``row_floor``, so that its rows are bit-stable whatever their count)."""
        head = self.to_logits[1]
        for module in self.modules():
            if isinstance(module, FloorLinear):
                if rows is not None:
                    module.min_rows = rows
                    continue
                # The head's product in decoding is its image columns only (``image_logits``).
                out = self.cfg.image_vocab_size if module is head else module.out_features
                w = module.weight
                module.min_rows = row_floor(module.in_features, out, w.dtype, str(w.device),
                                            torch.get_num_threads())

    def layer_mask(self, layer: int, device: torch.device | str) -> torch.Tensor:
        """Layer ``layer``'s full bool mask [total_seq_length, total_seq_length] on ``device`` (cached).

        Indexed by sequence position: in v2, image token j sits at position n_text + j.
        """
        kind = layer_mask_kind(layer, self.cfg.num_layers)
        key = (kind, torch.device(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = build_mask(kind, self.cfg).to(key[1])
            self._masks[key] = mask
        return mask

    # ------------------------------------------------------------------------------- KV caches

    @property
    def blocks(self) -> list[DalleLayer]:
        """``transformer.layers``, typed."""
        return cast(list[DalleLayer], list(self.transformer.layers))

    @property
    def kv_caches(self) -> list[KVCache]:
        """The layers' caches, in layer order (empty when none are set up)."""
        caches = [layer.attention.kv_cache for layer in self.blocks]
        return [c for c in caches if c is not None]

    def setup_caches(self, rows: int, *, windowed: bool = True) -> None:
        """Give every layer a zeroed cache for ``rows`` sequences of ``cached_positions(cfg)`` positions.

        With ``windowed`` (and a row mask that is a window) row-mask layers keep a ``RowWindowCache``.
        The old caches are dropped first; an allocation that fails leaves no caches at all.
        """
        cfg = self.cfg
        windowed = windowed and row_mask_is_window(cfg)
        self.release_caches()
        s, t, w = cached_positions(cfg), cfg.text_seq_length, row_window(cfg)
        try:
            for i, layer in enumerate(self.blocks):
                dev, kind = _device_of(layer), layer_mask_kind(i, cfg.num_layers)
                dtype = layer.attention.query_key_value.weight.dtype
                mask = self.layer_mask(i, dev)[:s, :s]  # [S, S], a view of the cached mask
                ring = windowed and kind == "row"
                lookups = self._lookups.get((kind, ring, dev))
                cache: KVCache
                if ring:
                    tables = self._window_tables.get((kind, dev))
                    if tables is None:
                        tables = (window_table(mask, t, w).to(dev), window_slots(s, t, w).to(dev))
                        self._window_tables[kind, dev] = tables
                    if lookups is None:
                        lookups = (RowLookup(tables[0]), RowLookup(tables[1]))
                        self._lookups[kind, ring, dev] = lookups
                    cache = RowWindowCache(rows, cfg.num_attention_heads, cfg.head_dim, t, w, mask, *tables,
                                           *lookups, dtype=dtype, device=dev)
                else:
                    if lookups is None:
                        lookups = self._lookups[kind, ring, dev] = (RowLookup(mask),)
                    cache = KVCache(rows, cfg.num_attention_heads, s, cfg.head_dim, mask, lookups[0],
                                    dtype=dtype, device=dev)
                layer.attention.kv_cache = cache
        except BaseException:
            self.release_caches()
            raise
        self.cache_rows, self.cache_windowed = rows, windowed

    def release_caches(self) -> None:
        """Drop every layer's cache (their memory is freed once nothing else holds it)."""
        for layer in self.blocks:
            layer.attention.kv_cache = None
        for lookups in self._lookups.values():
            for lookup in lookups:
                lookup.forget()
        self.cache_rows, self.cache_windowed = 0, False
        self.cache_generation += 1

    def compact_caches(self, keep: torch.Tensor, rows: int) -> None:
        """Move cache rows ``keep`` (ascending indices into the first ``rows``) to the front, every layer."""
        for cache in self.kv_caches:
            cache.compact(keep, rows)

    # ------------------------------------------------------------------------------- cached decoding

    def prefill(self, text_ids: torch.Tensor, rows: torch.Tensor, start: int | list[int] = 0) -> torch.Tensor:
        """Run texts [R, text_seq_length] once; cache row start + b (or ``start[b]``, a list of cache rows)
        gets text ``rows[b]``'s keys and values.

        rows: [B] long, indices into the texts. Returns the logits of image token 0, [B, iv] float32.
        """
        x = self.embed_text(text_ids)  # [R, n_text, h]
        for layer in self.blocks:
            dev = _device_of(layer)
            x = layer.forward_cached(_to(x, dev), 0, _to(rows, dev), start)  # [R, n_text, h]
        logits = self.image_logits(x[:, -1])  # [R, iv]
        return logits.index_select(0, _to(rows, logits.device))

    def embed_step(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Image tokens [Bg] at position ``pos`` (an int, a [1] tensor or one per row) -> [Bg, 1, h]."""
        return self.embed_image(tokens[:, None], start=pos - self.cfg.n_text)

    def step_layers(self, x: torch.Tensor, pos: int | torch.Tensor, layers: Sequence[int],
                    rows: slice = slice(None)) -> torch.Tensor:
        """Hidden states [Bg, 1, h] at ``pos`` through ``layers`` (consecutive indices), cache rows ``rows``.

        An int ``pos`` slices full caches to the written prefix; a [1] long tensor on the layers' device
        (as a captured graph reads it) attends whole caches with mask rows gathered on the device; a [Bg]
        tensor gives each row its own position (continuous batching), whole caches attended.
        """
        for lookups in self._lookups.values():
            for lookup in lookups:
                lookup.forget()
        blocks = self.blocks
        for i in layers:
            layer = blocks[i]
            dev = _device_of(layer)
            x = layer.forward_cached(_to(x, dev), pos if isinstance(pos, int) else _to(pos, dev), rows)
        return x

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., h] (before final_layernorm) -> image logits [..., iv] float32.

        Only the last image_vocab_size columns of ``to_logits`` are computed.
        """
        iv = self.cfg.image_vocab_size
        x = self.transformer.final_layernorm(_to(hidden, _device_of(self.transformer.final_layernorm)))
        x = self.to_logits[0](_to(x, _device_of(self.to_logits)))
        proj = self.to_logits[1]
        assert isinstance(proj, FloorLinear)
        return floor_linear(x, proj.weight[-iv:], proj.bias[-iv:], proj.min_rows).float()  # [..., iv]

    def step(self, tokens: torch.Tensor, pos: int | torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Feed image tokens [Bg] at sequence position ``pos`` into cache rows ``rows``; returns the
        logits of the next image token, [Bg, iv] float32. Image token j sits at position n_text + j.
        """
        x = self.embed_step(tokens, pos)  # [Bg, 1, h]
        x = self.step_layers(x, pos, range(len(self.transformer.layers)), rows)
        return self.image_logits(x[:, -1])

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Text ids [B, text_seq_length] (pads = 0) -> embeddings [B, n_text, h].

        Each pad at position i becomes id ``vocab_size - text_seq_length + i``; v2 prepends id 2.
        """
        cfg = self.cfg
        if text_ids.dim() != 2 or text_ids.shape[1] != cfg.text_seq_length:
            raise ValueError(
                f"text_ids must have shape [batch, {cfg.text_seq_length}], got {tuple(text_ids.shape)}"
            )
        device = self.text_embeddings.weight.device
        ids = _to(text_ids, device).long()
        pad_ids = torch.arange(cfg.text_seq_length, device=device) + (cfg.vocab_size - cfg.text_seq_length)
        ids = torch.where(ids == 0, pad_ids, ids)  # [B, T_text]
        if cfg.hf_version == "v2":
            ids = F.pad(ids, (1, 0), value=2)  # [B, T_text + 1]
        pos_device = self.text_pos_embeddings.weight.device
        pos = self.text_pos_embeddings(torch.arange(ids.shape[1], device=pos_device))  # [n_text, h]
        return self.text_embeddings(ids) + _to(pos, device)  # [B, n_text, h]

    def embed_image(self, codes: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Image codes [B, T] at image token indices start .. start+T-1 -> embeddings [B, T, h].

        ``start`` is an int, a 0-d tensor or a [B] tensor (one start per row). Token index j sits at
        grid row j // image_tokens_per_dim and column j % image_tokens_per_dim.
        """
        d = self.cfg.image_tokens_per_dim
        device = self.image_embeddings.weight.device
        codes = _to(codes, device).long()
        offsets = torch.arange(codes.shape[1], device=device)  # [T]
        if isinstance(start, torch.Tensor):
            j = _to(start, device).long().reshape(-1, 1) + offsets  # [1 or B, T]
        else:
            j = (offsets + start).unsqueeze(0)  # [1, T]
        rows = self.image_row_embeddings(_to(j // d, self.image_row_embeddings.weight.device))
        cols = self.image_col_embeddings(_to(j % d, self.image_col_embeddings.weight.device))
        return self.image_embeddings(codes) + _to(rows, device) + _to(cols, device)  # [B, T, h]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full pass: input_ids [B, S] = text_seq_length text ids then image codes -> logits [B, S', vocab].

        S' = S, except that v2 drops the last position when its extra text position would push the
        sequence past total_seq_length. Logits cover vocab_size + image_vocab_size columns.
        """
        cfg = self.cfg
        if input_ids.dim() != 2 or not cfg.text_seq_length <= input_ids.shape[1] <= cfg.total_seq_length:
            raise ValueError(
                f"input_ids must have shape [batch, S] with {cfg.text_seq_length} <= S <= "
                f"{cfg.total_seq_length}, got {tuple(input_ids.shape)}"
            )
        x = self.embed_text(input_ids[:, : cfg.text_seq_length])  # [B, n_text, h]
        image_ids = input_ids[:, cfg.text_seq_length :]
        if image_ids.shape[1]:
            x = torch.cat((x, _to(self.embed_image(image_ids, 0), x.device)), dim=1)  # [B, S', h]
        if x.shape[1] > cfg.total_seq_length:
            x = x[:, : cfg.total_seq_length]
        s = x.shape[1]
        for i, layer in enumerate(self.transformer.layers):
            device = _device_of(layer)
            x = _to(x, device)
            x = layer(x, self.layer_mask(i, device)[:s, :s])
        x = self.transformer.final_layernorm(_to(x, _device_of(self.transformer.final_layernorm)))
        return self.to_logits(_to(x, _device_of(self.to_logits)))  # [B, S', total_vocab]


def expected_dalle_tensors(cfg: DalleConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the published state dict for ``cfg`` (mask buffers excluded)."""
    with torch.device("meta"):
        model = DalleModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
