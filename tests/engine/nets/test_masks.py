"""The three sparse attention masks of ruDALL-E and which layer uses which."""

import time
from collections import Counter

import pytest
import torch

from app.engine.nets.dalle import CONV_KERNEL, DalleConfig, build_mask, layer_mask_kind, row_window


def _cfg(text: int, d: int, version: str = "v3") -> DalleConfig:
    return DalleConfig(num_layers=2, hidden_size=8, num_attention_heads=2, text_seq_length=text,
                       image_tokens_per_dim=d, vocab_size=text + 10, hf_version=version)


def _verbal_reference(kind: str, cfg: DalleConfig) -> torch.Tensor:
    """SPEC section 6, word for word, one (query, key) pair at a time."""
    t, d = cfg.text_seq_length, cfg.image_tokens_per_dim
    shift = CONV_KERNEL // 2
    n = cfg.total_seq_length
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(q + 1):
            if k < t or q == k:
                mask[q, k] = True
                continue
            if kind == "row":
                mask[q, k] = q - k <= d
            elif kind == "col":
                mask[q, k] = (q - k) % d == 0
            else:
                rq, cq = divmod(q - t, d)
                rk, ck = divmod(k - t, d)
                if cfg.hf_version == "v3":
                    mask[q, k] = abs(rq - rk) <= shift and abs(cq - ck) <= shift
                else:
                    wrapped_r = min((rq - rk) % d, (rk - rq) % d)
                    wrapped_c = min((cq - ck) % d, (ck - cq) % d)
                    mask[q, k] = wrapped_r <= shift and wrapped_c <= shift
    return mask


def _upstream_style_conv(cfg: DalleConfig) -> torch.Tensor:
    """The conv mask the way upstream builds it: enumerate window offsets, clamp (v3) or wrap (v2)."""
    t, d = cfg.text_seq_length, cfg.image_tokens_per_dim
    shift = CONV_KERNEL // 2
    mask = torch.ones(cfg.total_seq_length, cfg.total_seq_length, dtype=torch.bool).tril()
    for pos in range(t, cfg.total_seq_length):
        mask[pos + 1:, pos] = False
        row, col = divmod(pos - t, d)
        for r in range(-shift, shift + 1):
            for c in range(-shift, shift + 1):
                if cfg.hf_version == "v2":
                    r_abs, c_abs = (row + r) % d, (col + c) % d
                else:
                    r_abs, c_abs = min(max(row + r, 0), d - 1), min(max(col + c, 0), d - 1)
                cell = t + r_abs * d + c_abs
                if cell > pos:
                    mask[cell, pos] = True
    return mask


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
@pytest.mark.parametrize("version", ["v3", "v2"])
@pytest.mark.parametrize("d", [4, 12])
def test_mask_matches_the_verbal_definition(kind, version, d):
    cfg = _cfg(4, d, version)
    assert torch.equal(build_mask(kind, cfg), _verbal_reference(kind, cfg))


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_conv_mask_matches_upstream_window_enumeration_on_12x12_grid(version):
    cfg = _cfg(4, 12, version)
    assert torch.equal(build_mask("conv", cfg), _upstream_style_conv(cfg))


def test_conv_window_is_clamped_at_the_grid_corner_in_v3():
    cfg = _cfg(4, 12, "v3")
    mask = build_mask("conv", cfg)
    key = 4  # grid cell (0, 0)
    visible = {divmod(q - 4, 12) for q in range(4, cfg.total_seq_length) if mask[q, key]}
    assert visible == {(r, c) for r in range(6) for c in range(6)}


def test_conv_window_wraps_around_the_grid_edges_in_v2():
    cfg = _cfg(4, 12, "v2")
    mask = build_mask("conv", cfg)
    key = 4  # grid cell (0, 0); the wrapped window spans rows/cols 7..11 and 0..5
    visible = {divmod(q - 4, 12) for q in range(4, cfg.total_seq_length) if mask[q, key]}
    window = list(range(7, 12)) + list(range(6))
    assert visible == {(r, c) for r in window for c in window}
    assert (0, 11) in visible and (11, 11) in visible


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
@pytest.mark.parametrize("version", ["v3", "v2"])
def test_masks_are_causal_and_keep_text_keys_visible(kind, version):
    cfg = _cfg(4, 12, version)
    mask = build_mask(kind, cfg)
    n, t = cfg.total_seq_length, cfg.text_seq_length
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert not (mask & ~causal).any()
    assert mask.diagonal().all()
    assert torch.equal(mask[:, :t], causal[:, :t])


def test_row_mask_hides_keys_beyond_33_positions():
    cfg = DalleConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
    mask = build_mask("row", cfg)
    assert row_window(cfg) == 33
    key = 128 + 100
    visible = torch.nonzero(mask[:, key]).flatten().tolist()
    assert visible == list(range(key, key + 33))


def test_col_mask_shows_an_image_key_only_to_its_grid_column():
    cfg = DalleConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
    mask = build_mask("col", cfg)
    key = 128 + 37  # grid cell (1, 5)
    visible = torch.nonzero(mask[:, key]).flatten().tolist()
    assert visible == list(range(key, cfg.total_seq_length, 32))


def test_conv_mask_differs_between_versions_and_row_col_do_not():
    v3, v2 = _cfg(4, 12, "v3"), _cfg(4, 12, "v2")
    assert torch.equal(build_mask("row", v3), build_mask("row", v2))
    assert torch.equal(build_mask("col", v3), build_mask("col", v2))
    assert not torch.equal(build_mask("conv", v3), build_mask("conv", v2))


def test_full_size_masks_build_quickly_and_are_cached():
    cfg = DalleConfig(num_layers=3, hidden_size=8, num_attention_heads=2, hf_version="v2")
    start = time.perf_counter()
    masks = [build_mask(kind, cfg) for kind in ("row", "col", "conv")]
    assert time.perf_counter() - start < 2.0
    assert all(m.shape == (1152, 1152) for m in masks)
    assert build_mask("conv", cfg) is masks[2]


def test_unknown_mask_kind_is_rejected():
    with pytest.raises(ValueError, match="diagonal"):
        build_mask("diagonal", _cfg(4, 4))  # type: ignore[arg-type]


def test_layer_mask_kinds_for_8_layers():
    kinds = [layer_mask_kind(i, 8) for i in range(8)]
    assert kinds == ["row", "col", "row", "row", "row", "col", "row", "conv"]


def test_kandinsky_64_layers_have_47_row_16_col_and_1_conv_mask():
    kinds = [layer_mask_kind(i, 64) for i in range(64)]
    assert Counter(kinds) == {"row": 47, "col": 16, "conv": 1}
    assert kinds[-1] == "conv"


def test_column_rule_takes_precedence_over_the_last_layer():
    # Upstream checks the column rule first, so a 6-layer model ends on a column layer, no conv.
    assert [layer_mask_kind(i, 6) for i in range(6)] == ["row", "col", "row", "row", "row", "col"]
