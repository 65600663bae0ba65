"""VQ-GAN encode path: published tensor names, taming's Encoder arithmetic, strict loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from app.engine import store
from app.engine.nets.vqgan import (
    VQGAN_PRESETS,
    DDConfig,
    VQGANConfig,
    VQGANEncoder,
    expected_vqgan_tensors,
    vqgan_decode_tensor_names,
    vqgan_encode_tensor_names,
)
from app.engine.store import ModelStoreError

# Two levels (f2) with a channel change (nin_shortcut) and attention at the lower level, as the real
# model has both (ch_mult 1,1,2,4; attention at 32x32).
SMALL = VQGANConfig(
    embed_dim=32,
    n_embed=48,
    ddconfig=DDConfig(
        double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
        num_res_blocks=2, attn_resolutions=(8,),
    ),
)


def random_weights(cfg: VQGANConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every model tensor, seeded; norms near 1 and fan-in scaled convolutions keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_vqgan_tensors(cfg).items():
        if len(shape) == 1:  # 1-D weights are GroupNorm scales, the rest biases
            base = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
            out[name] = base + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[name] = torch.randn(shape, generator=g) / fan_in**0.5
    return out


def encoder_with(cfg: VQGANConfig, sd: dict[str, torch.Tensor]) -> VQGANEncoder:
    enc = VQGANEncoder(cfg).eval()
    enc.load_state_dict({k: sd[k] for k in vqgan_encode_tensor_names(cfg)}, strict=True)
    return enc


# ------------------------------------------------------------------ an independent re-statement
# taming's Encoder + GumbelVQ.encode written as plain functional ops over the state dict, with names
# spelled out, so that a wrong block order, padding, norm or attention in the module shows here.


def _gn(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, stride: int = 1, pad: int | None = None
          ) -> torch.Tensor:
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd[f"{p}.bias"], stride=stride, padding=w.shape[-1] // 2 if pad is None else pad)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _resnet(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    h = _conv(_silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1")
    h = _conv(_silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2")
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv(x, sd, f"{p}.nin_shortcut")
    return x + h


def _attn(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    b, c, h, w = x.shape
    hn = _gn(x, sd, f"{p}.norm")
    q, k, v = (_conv(hn, sd, f"{p}.{n}").reshape(b, c, h * w) for n in ("q", "k", "v"))  # [B, C, HW]
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c**0.5, dim=2)  # [B, HW q, HW k]
    out = torch.einsum("bcj,bij->bci", v, weights).reshape(b, c, h, w)
    return x + _conv(out, sd, f"{p}.proj_out")


def reference_logits(x: torch.Tensor, sd: dict[str, torch.Tensor], cfg: VQGANConfig) -> torch.Tensor:
    dd = cfg.ddconfig
    h = _conv(x, sd, "encoder.conv_in")
    res = dd.resolution
    for level in range(len(dd.ch_mult)):
        for block in range(dd.num_res_blocks):
            h = _resnet(h, sd, f"encoder.down.{level}.block.{block}")
            if res in dd.attn_resolutions:
                h = _attn(h, sd, f"encoder.down.{level}.attn.{block}")
        if level != len(dd.ch_mult) - 1:
            h = F.pad(h, (0, 1, 0, 1))  # bottom/right only
            h = _conv(h, sd, f"encoder.down.{level}.downsample.conv", stride=2, pad=0)
            res //= 2
    h = _resnet(h, sd, "encoder.mid.block_1")
    h = _attn(h, sd, "encoder.mid.attn_1")
    h = _resnet(h, sd, "encoder.mid.block_2")
    h = _conv(_silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    h = _conv(h, sd, "quant_conv")
    return _conv(h, sd, "quantize.proj")  # [B, n_embed, H/f, W/f]


def pixels(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------- tests


def test_encode_names_are_the_encoder_quant_conv_and_proj_of_the_published_file():
    cfg = VQGAN_PRESETS["sber-gumbelf8"]
    full = expected_vqgan_tensors(cfg)
    wanted = {k for k in full if k.startswith(("encoder.", "quant_conv.", "quantize.proj."))}
    assert vqgan_encode_tensor_names(cfg) == wanted
    assert {"quantize.proj.weight", "quantize.proj.bias", "quant_conv.weight"} <= wanted
    # the two halves split the model between them
    assert not wanted & vqgan_decode_tensor_names(cfg)
    assert wanted | vqgan_decode_tensor_names(cfg) == set(full)


def test_encoder_module_has_the_published_shapes_and_builds_on_meta():
    cfg = VQGAN_PRESETS["sber-gumbelf8"]
    with torch.device("meta"):
        enc = VQGANEncoder(cfg)
    full = expected_vqgan_tensors(cfg)
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == {
        k: full[k] for k in vqgan_encode_tensor_names(cfg)
    }
    assert full["quantize.proj.weight"] == (8192, 256, 1, 1)
    assert all(p.is_meta for p in enc.parameters())
    assert enc.downsample_factor == 8


def test_encode_equals_a_functional_restatement_of_taming():
    sd = random_weights(SMALL)
    enc = encoder_with(SMALL, sd)
    x = pixels(2, 16, 16)
    with torch.no_grad():
        ref = reference_logits(x, sd, SMALL)
        got = enc(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    codes = enc.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long and codes.device.type == "cpu"
    assert torch.equal(codes, ref.argmax(dim=1))
    assert codes.unique().numel() > 5  # the comparison is not between two constant grids


def test_a_band_encodes_to_its_own_token_rows():
    sd = random_weights(SMALL, seed=3)
    enc = encoder_with(SMALL, sd)
    band = pixels(1, 4, 16, seed=2)  # 2 token rows of an 8x8-token image
    codes = enc.encode(band)
    assert codes.shape == (1, 2, 8)
    with torch.no_grad():
        assert torch.equal(codes, reference_logits(band, sd, SMALL).argmax(dim=1))


def test_encode_moves_pixels_to_the_module_dtype():
    sd = random_weights(SMALL)
    enc = encoder_with(SMALL, sd).double()
    x = pixels(1, 16, 16)
    with torch.no_grad():
        ref = reference_logits(x.double(), {k: v.double() for k, v in sd.items()}, SMALL)
    assert torch.equal(enc.encode(x), ref.argmax(dim=1))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(1, 3, 15, 16), "multiple of 2"),
        (torch.zeros(1, 3, 16, 0), "multiple of 2"),
        (torch.zeros(1, 4, 16, 16), r"\[batch, 3, H, W\]"),
        (torch.zeros(3, 16, 16), r"\[batch, 3, H, W\]"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating point"),
    ],
)
def test_encode_rejects_pixels_it_cannot_encode(x: torch.Tensor, match: str):
    enc = encoder_with(SMALL, random_weights(SMALL))
    with pytest.raises(ValueError, match=match):
        enc.encode(x)


def test_encoder_needs_embed_dim_equal_to_z_channels():
    cfg = VQGANConfig(embed_dim=16, n_embed=48, ddconfig=SMALL.ddconfig)
    with pytest.raises(ValueError, match=r"embed_dim \(16\) must equal vqgan.ddconfig.z_channels \(32\)"):
        VQGANEncoder(cfg)


# ----------------------------------------------------------------------------- loading from the store


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def rewrite_vqgan(model_dir: Path, edit: Any) -> Path:
    path = store.load_manifest(model_dir).vqgan_checkpoint
    obj = torch.load(path, weights_only=True)
    edit(obj["state_dict"])
    torch.save(obj, path)
    return path


def test_load_vqgan_encoder_streams_in_every_encode_tensor(tiny_model_dir: Path):
    m = store.load_manifest(tiny_model_dir)
    raw = torch.load(m.vqgan_checkpoint, weights_only=True)["state_dict"]
    enc = store.load_vqgan_encoder(m, "cpu", torch.float32)
    names = vqgan_encode_tensor_names(m.vqgan)
    got = enc.state_dict()
    assert set(got) == names
    assert all(torch.equal(got[n], raw[n]) for n in names)
    assert not any(t.is_meta or t.requires_grad for t in enc.parameters())
    assert not enc.training
    side = m.dalle.image_tokens_per_dim * enc.downsample_factor
    codes = enc.encode(pixels(1, side, side))
    assert codes.shape == (1, 32, 32) and 0 <= int(codes.min()) and int(codes.max()) < m.vqgan.n_embed


def test_load_vqgan_encoder_names_a_missing_encoder_tensor(model_dir: Path):
    path = rewrite_vqgan(model_dir, lambda sd: sd.pop("encoder.down.1.block.0.conv2.weight"))
    m = store.load_manifest(model_dir)
    missing = r"vqgan\.tiny\.ckpt: missing tensor 'encoder\.down\.1\.block\.0\.conv2\.weight'"
    with pytest.raises(ModelStoreError, match=missing) as info:
        store.load_vqgan_encoder(m, "cpu", torch.float32)
    assert str(path) in str(info.value)
    store.load_vqgan(m, "cpu", torch.float32)  # the decoder does not need it


def test_load_vqgan_encoder_names_a_missing_proj(model_dir: Path):
    rewrite_vqgan(model_dir, lambda sd: sd.pop("quantize.proj.bias"))
    with pytest.raises(ModelStoreError, match=r"missing tensor 'quantize\.proj\.bias'"):
        store.load_vqgan_encoder(store.load_manifest(model_dir), "cpu", torch.float32)


def test_load_vqgan_encoder_names_a_mis_shaped_tensor_and_both_shapes(model_dir: Path):
    m = store.load_manifest(model_dir)
    n_embed, z = m.vqgan.n_embed, m.vqgan.ddconfig.z_channels
    wrong = torch.zeros(n_embed, z + 1, 1, 1)
    rewrite_vqgan(model_dir, lambda sd: sd.update({"quantize.proj.weight": wrong}))
    with pytest.raises(ModelStoreError) as info:
        store.load_vqgan_encoder(m, "cpu", torch.float32)
    msg = str(info.value)
    assert "'quantize.proj.weight' has shape" in msg
    assert f"[{n_embed}, {z + 1}, 1, 1]" in msg and f"expected [{n_embed}, {z}, 1, 1]" in msg


def test_load_vqgan_encoder_still_checks_the_decoder_tensors_present(model_dir: Path):
    rewrite_vqgan(model_dir, lambda sd: sd.update({"post_quant_conv.bias": torch.zeros(3)}))
    with pytest.raises(ModelStoreError, match=r"'post_quant_conv\.bias' has shape \[3\]"):
        store.load_vqgan_encoder(store.load_manifest(model_dir), "cpu", torch.float32)


def test_load_vqgan_encoder_refuses_a_manifest_it_cannot_encode_with(model_dir: Path):
    raw = json.loads((model_dir / "model.json").read_text())
    raw["vqgan"]["embed_dim"] = raw["vqgan"]["ddconfig"]["z_channels"] // 2
    (model_dir / "model.json").write_text(json.dumps(raw))
    m = store.load_manifest(model_dir)
    sd = random_weights(m.vqgan)  # a file that matches the edited manifest
    torch.save({"state_dict": sd}, m.vqgan_checkpoint)
    store.load_vqgan(m, "cpu", torch.float32)  # decoding does not care
    refused = r"model\.json: cannot build the encoder: vqgan\.embed_dim \(\d+\) must equal"
    with pytest.raises(ModelStoreError, match=refused):
        store.load_vqgan_encoder(m, "cpu", torch.float32)
