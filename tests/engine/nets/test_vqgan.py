"""VQ-GAN decode path: published tensor names, manifest parsing, token -> pixel arithmetic."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.engine.nets.vqgan import (
    VQGAN_PRESETS,
    AttnBlock,
    DDConfig,
    VQGANConfig,
    VQGANDecoder,
    expected_vqgan_tensors,
    vqgan_decode_tensor_names,
)

TENSORS = Path(__file__).resolve().parents[4] / "shared" / "tensors"

SPEC_BLOCK = {
    "checkpoint": "vae/vqgan.gumbelf8-sber.model.ckpt",
    "embed_dim": 256,
    "n_embed": 8192,
    "ddconfig": {
        "double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32], "dropout": 0.0,
    },
}

# 8x8 tokens -> 16x16 pixels; attention at the 8x8 level as the real model has it at 32x32.
TINY = VQGANConfig(
    embed_dim=16,
    n_embed=64,
    ddconfig=DDConfig(
        double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
        num_res_blocks=1, attn_resolutions=(8,),
    ),
)


def _published() -> dict[str, tuple[int, ...]]:
    path = TENSORS / "vqgan-gumbelf8-sber.json"
    if not path.exists():
        pytest.skip(f"{path} is not available in this checkout")
    return {k: tuple(v) for k, v in json.loads(path.read_text())["tensors"].items()}


def _decoder(cfg: VQGANConfig = TINY, seed: int = 0) -> VQGANDecoder:
    torch.manual_seed(seed)
    dec = VQGANDecoder(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that every tensor matters
        for name, p in dec.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return dec


def _codes(cfg: VQGANConfig, batch: int, side: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.n_embed, (batch, side * side), generator=g)


def test_expected_tensors_equal_published_vqgan_list():
    assert expected_vqgan_tensors(VQGAN_PRESETS["sber-gumbelf8"]) == _published()


def test_decode_names_are_the_decoder_post_quant_and_codebook_subset():
    cfg = VQGAN_PRESETS["sber-gumbelf8"]
    full = expected_vqgan_tensors(cfg)
    wanted = {
        k for k in full if k.startswith(("decoder.", "post_quant_conv.")) or k == "quantize.embed.weight"
    }
    assert vqgan_decode_tensor_names(cfg) == wanted
    assert "quantize.proj.weight" not in wanted and "quant_conv.weight" not in wanted


def test_decoder_module_state_dict_is_exactly_the_decode_subset_with_published_shapes():
    cfg = VQGAN_PRESETS["sber-gumbelf8"]
    with torch.device("meta"):
        dec = VQGANDecoder(cfg)
    full = expected_vqgan_tensors(cfg)
    built = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert built == {k: full[k] for k in vqgan_decode_tensor_names(cfg)}
    assert all(p.is_meta for p in dec.parameters())


def test_decode_subset_of_a_full_checkpoint_loads_strictly():
    full = {k: torch.randn(s) for k, s in expected_vqgan_tensors(TINY).items()}
    names = vqgan_decode_tensor_names(TINY)
    dec = VQGANDecoder(TINY)
    dec.load_state_dict({k: v for k, v in full.items() if k in names}, strict=True)
    assert torch.equal(dec.quantize.embed.weight, full["quantize.embed.weight"])


def test_from_manifest_reads_the_spec_block_and_ignores_checkpoint():
    assert VQGANConfig.from_manifest(SPEC_BLOCK) == VQGAN_PRESETS["sber-gumbelf8"]
    assert VQGAN_PRESETS["sber-gumbelf8"].ddconfig.latent_size == 32


@pytest.mark.parametrize(
    "path", ["embed_dim", "n_embed", "ddconfig", "ddconfig.ch_mult", "ddconfig.z_channels"]
)
def test_from_manifest_names_a_missing_key(path):
    block = json.loads(json.dumps(SPEC_BLOCK))
    *parents, key = path.split(".")
    target = block
    for p in parents:
        target = target[p]
    del target[key]
    with pytest.raises(ValueError, match=repr(key)):
        VQGANConfig.from_manifest(block)


def test_channels_not_divisible_by_32_groups_are_rejected():
    block = json.loads(json.dumps(SPEC_BLOCK))
    block["ddconfig"]["ch"] = 48
    with pytest.raises(ValueError, match="ch must be a multiple of 32"):
        VQGANConfig.from_manifest(block)


def test_decode_returns_uint8_rgb_images_on_cpu():
    dec = _decoder()
    images = dec.decode(_codes(TINY, batch=3, side=8))
    assert images.shape == (3, 16, 16, 3)
    assert images.dtype == torch.uint8 and images.device.type == "cpu"
    assert int(images.max()) > int(images.min())  # not a constant image


def test_32x32_tokens_decode_to_256x256_with_the_f8_layout():
    cfg = VQGANConfig(
        embed_dim=8, n_embed=16,
        ddconfig=DDConfig(False, 32, 256, 3, 3, 32, (1, 1, 1, 1), 1, (32,)),
    )
    images = _decoder(cfg).decode(_codes(cfg, batch=1, side=32))
    assert images.shape == (1, 256, 256, 3)


def test_embedding_lookup_equals_upstream_one_hot_matmul_exactly():
    dec = _decoder()
    codes = _codes(TINY, batch=2, side=8)
    one_hot = F.one_hot(codes, num_classes=TINY.n_embed).float()  # [B, n, n_embed]
    z = one_hot @ dec.quantize.embed.weight  # [B, n, embed_dim]
    expected = z.reshape(2, 8, 8, TINY.embed_dim).permute(0, 3, 1, 2)  # 'b (h w) c -> b c h w'
    assert torch.equal(dec.latents(codes), expected)


def test_pixels_are_clamped_then_scaled_by_255_and_truncated():
    dec = _decoder()
    conv_out = dec.decoder.conv_out
    with torch.no_grad():  # a constant output per channel: exactly the bias
        conv_out.weight.zero_()
        conv_out.bias.copy_(torch.tensor([0.0, 2.0, -0.999]))
    pixels = dec.decode(_codes(TINY, batch=1, side=8))[0]  # [H, W, 3]
    # 0.0 -> 127.5 -> 127 (rounding would give 128); 2.0 clamps to 255; -0.999 -> 0.1275 -> 0
    assert pixels[..., 0].unique().tolist() == [127]
    assert pixels[..., 1].unique().tolist() == [255]
    assert pixels[..., 2].unique().tolist() == [0]


def test_attention_block_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (block.q, block.k, block.v))  # [B, HW, C]
        ref = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(32))  # [B, HW, C]
        ref = x + block.proj_out(ref.transpose(1, 2).reshape(2, 32, 8, 8))
        got = block(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_half_precision_attention_stays_finite_where_unscaled_scores_overflow_fp16():
    torch.manual_seed(0)
    block = AttnBlock(512).eval()
    with torch.no_grad():
        block.q.weight.mul_(64)
        block.k.weight.mul_(64)
        x = torch.randn(1, 512, 8, 8)
        h = block.norm(x)
        scores = block.q(h).flatten(2).transpose(1, 2) @ block.k(h).flatten(2)  # [B, HW, HW], unscaled
        assert scores.abs().max() > torch.finfo(torch.float16).max  # taming's order would give inf
        ref = block(x)
        got = block.half()(x.half())
    assert torch.isfinite(got).all()
    assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_decoding_in_chunks_gives_the_same_pixels():
    dec = _decoder()
    codes = _codes(TINY, batch=3, side=8)
    whole = dec.decode(codes)  # the default chunk (8) holds all three
    dec.chunk = 1
    chunked = dec.decode(codes)
    assert (whole.int() - chunked.int()).abs().max() <= 1


def test_each_image_depends_only_on_its_own_codes():
    dec = _decoder()
    codes = _codes(TINY, batch=2, side=8)
    pair = dec.decode(codes)
    alone = dec.decode(codes[1:])
    assert (pair[1:].int() - alone.int()).abs().max() <= 1
    assert not torch.equal(pair[0], pair[1])


def test_bfloat16_decoder_returns_uint8_close_to_float32():
    dec = _decoder()
    codes = _codes(TINY, batch=1, side=8)
    ref = dec.decode(codes).float()
    got = dec.to(torch.bfloat16).decode(codes)
    assert got.dtype == torch.uint8
    assert (got.float() - ref).abs().mean() < 8


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.zeros(2, 63, dtype=torch.long), "not a square grid"),
        (torch.full((1, 64), 64, dtype=torch.long), "out of range"),
        (torch.full((1, 64), -1, dtype=torch.long), "out of range"),
        (torch.zeros(64, dtype=torch.long), "2-D"),
        (torch.zeros(1, 64), "integer"),
    ],
)
def test_decode_rejects_bad_codes_naming_them(codes, message):
    with pytest.raises(ValueError, match=message):
        _decoder().decode(codes)
