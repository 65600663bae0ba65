"""Sber VQ-GAN (gumbel, f8): decode (32x32 image tokens -> 256x256 RGB) and encode (RGB -> tokens).

Module and tensor names follow taming-transformers' ``Encoder``/``Decoder`` and ``GumbelVQ`` so the
published Lightning checkpoint loads unchanged. The two halves are separate modules: `VQGANDecoder`
(``decoder.*``, ``post_quant_conv.*``, ``quantize.embed.weight``) is what every generation needs;
`VQGANEncoder` (``encoder.*``, ``quant_conv.*``, ``quantize.proj.*``) is only needed for image prompts
and is loaded on request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.nets.checks import positive_int

__all__ = [
    "DDConfig",
    "VQGANConfig",
    "VQGAN_PRESETS",
    "VQGANDecoder",
    "VQGANEncoder",
    "expected_vqgan_tensors",
    "vqgan_decode_tensor_names",
    "vqgan_encode_tensor_names",
]

_GROUPS = 32  # taming's Normalize(): GroupNorm(32, C, eps=1e-6, affine=True)
_NORM_EPS = 1e-6


def _require(block: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in block:
        raise ValueError(f"{where}: missing key {key!r}")
    return block[key]


def _int_tuple(value: Any, name: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not (value or allow_empty):
        kind = "list" if allow_empty else "non-empty list"
        raise ValueError(f"{name} must be a {kind} of positive integers, got {value!r}")
    return tuple(positive_int(v, f"{name}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class DDConfig:
    """taming's ``ddconfig``: the encoder/decoder hyper-parameters."""

    double_z: bool
    z_channels: int
    resolution: int
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("z_channels", "resolution", "in_channels", "out_ch", "ch", "num_res_blocks"):
            positive_int(getattr(self, name), f"vqgan.ddconfig.{name}")
        object.__setattr__(self, "ch_mult", _int_tuple(self.ch_mult, "vqgan.ddconfig.ch_mult"))
        attn = _int_tuple(self.attn_resolutions, "vqgan.ddconfig.attn_resolutions", allow_empty=True)
        object.__setattr__(self, "attn_resolutions", attn)
        if self.ch % _GROUPS:
            raise ValueError(f"vqgan.ddconfig.ch must be a multiple of {_GROUPS} (GroupNorm), got {self.ch}")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"vqgan.ddconfig.resolution {self.resolution} is not divisible by "
                f"2**(len(ch_mult)-1) = {2 ** (len(self.ch_mult) - 1)}"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per image token along each side (8 for f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the token grid (32 for f8 at 256x256)."""
        return self.resolution // self.downsample_factor

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any]) -> DDConfig:
        """Build from model.json's ``vqgan.ddconfig``; unknown keys are ignored."""
        if not isinstance(block, Mapping):
            raise ValueError(f"vqgan.ddconfig must be an object, got {type(block).__name__}")
        where = "vqgan.ddconfig"
        return cls(
            double_z=bool(_require(block, "double_z", where)),
            z_channels=_require(block, "z_channels", where),
            resolution=_require(block, "resolution", where),
            in_channels=_require(block, "in_channels", where),
            out_ch=_require(block, "out_ch", where),
            ch=_require(block, "ch", where),
            ch_mult=_require(block, "ch_mult", where),
            num_res_blocks=_require(block, "num_res_blocks", where),
            attn_resolutions=_require(block, "attn_resolutions", where),
            dropout=float(block.get("dropout", 0.0)),
        )


@dataclass(frozen=True)
class VQGANConfig:
    """The model.json ``vqgan`` block (without ``checkpoint``)."""

    embed_dim: int
    n_embed: int
    ddconfig: DDConfig

    def __post_init__(self) -> None:
        positive_int(self.embed_dim, "vqgan.embed_dim")
        positive_int(self.n_embed, "vqgan.n_embed")

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any]) -> VQGANConfig:
        """Build from model.json's ``vqgan`` block; ``checkpoint`` and unknown keys are ignored."""
        if not isinstance(block, Mapping):
            raise ValueError(f"vqgan must be an object, got {type(block).__name__}")
        return cls(
            embed_dim=_require(block, "embed_dim", "vqgan"),
            n_embed=_require(block, "n_embed", "vqgan"),
            ddconfig=DDConfig.from_manifest(_require(block, "ddconfig", "vqgan")),
        )


VQGAN_PRESETS: dict[str, VQGANConfig] = {
    "sber-gumbelf8": VQGANConfig(
        embed_dim=256,
        n_embed=8192,
        ddconfig=DDConfig(
            double_z=False,
            z_channels=256,
            resolution=256,
            in_channels=3,
            out_ch=3,
            ch=128,
            ch_mult=(1, 1, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(32,),
            dropout=0.0,
        ),
    ),
}


# ----------------------------------------------------------------------------------------------
# Building blocks (taming's ResnetBlock / AttnBlock / Upsample / Downsample, inference only)


def _swish(x: torch.Tensor) -> torch.Tensor:
    # taming's nonlinearity(); F.silu rounds differently in the last bit, which adds up over 30 blocks.
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=_NORM_EPS, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


class ResnetBlock(nn.Module):
    # Dropout and the timestep projection (temb_channels=0 in the VQ-GAN) hold no tensors and do
    # nothing at inference, so they are left out.
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.conv2 = _conv3(out_channels, out_channels)
        self.nin_shortcut = _conv1(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = _conv1(channels, channels)
        self.k = _conv1(channels, channels)
        self.v = _conv1(channels, channels)
        self.proj_out = _conv1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        b, c, h, w = x.shape
        hn = self.norm(x)
        if hn.dtype in (torch.float16, torch.bfloat16):
            # Half precision: the fused kernel scales before the product and accumulates in fp32;
            # taming's unscaled q.k over 512 channels can pass fp16's 65504.
            def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
                return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

            o = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
            out = o.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # [B, C, H, W]
        else:
            q = self.q(hn).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
            k = self.k(hn).reshape(b, c, h * w)  # [B, C, HW]
            v = self.v(hn).reshape(b, c, h * w)  # [B, C, HW]
            # Explicit softmax in taming's op order (scores scaled after the product): the 1024x1024
            # score matrix is small next to the convolutions, and fp32 stays bit-faithful.
            attn = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # [B, HW query, HW key]
            out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)  # [B, C, H, W]
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H/2, W/2]
        # taming pads one zero row/column at the bottom/right only (torch's conv pads symmetrically).
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    # One resolution level: ``block``/``attn`` lists plus an optional ``upsample``/``downsample``.
    upsample: nn.Module
    downsample: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class Decoder(nn.Module):
    """taming's ``Decoder`` with ``give_pre_end=False``, ``tanh_out=False``.

    z [B, z_channels, h, w] -> x [B, out_ch, h * 2**(levels-1), w * 2**(levels-1)].
    """

    def __init__(self, dd: DDConfig) -> None:
        super().__init__()
        levels = len(dd.ch_mult)
        block_in = dd.ch * dd.ch_mult[-1]
        curr_res = dd.latent_size
        self.conv_in = _conv3(dd.z_channels, block_in)
        self.mid = _Mid(block_in)
        # Built from the lowest resolution up and prepended, so up[i] is level i as in taming.
        self.up = nn.ModuleList()
        for i_level in reversed(range(levels)):
            level = _Level()
            block_out = dd.ch * dd.ch_mult[i_level]
            for _ in range(dd.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in dd.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, level)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3(block_in, dd.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(len(self.up))):
            level = cast(_Level, self.up[i_level])
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Encoder(nn.Module):
    """taming's ``Encoder`` (``resamp_with_conv=True``, no timestep embedding).

    x [B, in_channels, H, W] -> z [B, z_channels (x2 if double_z), H / 2**(levels-1), W / 2**(levels-1)].
    Attention levels are chosen from ``resolution`` at build time, as in taming, so a band cropped from
    the image (smaller H) goes through the same blocks.
    """

    def __init__(self, dd: DDConfig) -> None:
        super().__init__()
        levels = len(dd.ch_mult)
        in_ch_mult = (1, *dd.ch_mult)
        curr_res = dd.resolution
        self.conv_in = _conv3(dd.in_channels, dd.ch)
        self.down = nn.ModuleList()
        block_in = dd.ch
        for i_level in range(levels):
            level = _Level()
            block_in = dd.ch * in_ch_mult[i_level]
            block_out = dd.ch * dd.ch_mult[i_level]
            for _ in range(dd.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in dd.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != levels - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3(block_in, 2 * dd.z_channels if dd.double_z else dd.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        last = len(self.down) - 1
        for i_level, module in enumerate(self.down):
            level = cast(_Level, module)
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != last:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _Quantize(nn.Module):
    # GumbelQuantize's tensors: ``proj`` is the encoder side (features -> code logits), ``embed`` the
    # decoder side (the codebook). Each half of the model holds only its own.
    def __init__(self, cfg: VQGANConfig, *, with_proj: bool, with_embed: bool) -> None:
        super().__init__()
        if with_proj:
            # GumbelQuantize(num_hiddens=z_channels, ...): it reads quant_conv's output, which has
            # embed_dim channels, so encoding works only where the two are equal (256 in the Sber file).
            self.proj = _conv1(cfg.ddconfig.z_channels, cfg.n_embed)
        if with_embed:
            self.embed = nn.Embedding(cfg.n_embed, cfg.embed_dim)


class _GumbelVQShapes(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        dd = cfg.ddconfig
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        self.quantize = _Quantize(cfg, with_proj=True, with_embed=True)
        self.quant_conv = _conv1(dd.z_channels, cfg.embed_dim)
        self.post_quant_conv = _conv1(cfg.embed_dim, dd.z_channels)


def expected_vqgan_tensors(cfg: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Every model tensor of the published checkpoint's ``state_dict`` (name -> shape), loss excluded."""
    with torch.device("meta"):
        model = _GumbelVQShapes(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def vqgan_decode_tensor_names(cfg: VQGANConfig) -> set[str]:
    """The tensors decoding needs: ``decoder.*``, ``post_quant_conv.*`` and ``quantize.embed.weight``."""
    with torch.device("meta"):
        model = VQGANDecoder(cfg)
    return set(model.state_dict())


def vqgan_encode_tensor_names(cfg: VQGANConfig) -> set[str]:
    """The tensors encoding needs: ``encoder.*``, ``quant_conv.*`` and ``quantize.proj.*``.

    Taken from the whole model's names (not from `VQGANEncoder`, which refuses configurations it
    cannot run), so a checkpoint can be checked against any manifest.
    """
    prefixes = ("encoder.", "quant_conv.", "quantize.proj.")
    return {k for k in expected_vqgan_tensors(cfg) if k.startswith(prefixes)}


#: Images per pass of `VQGANDecoder.decode` unless told otherwise.
DECODE_CHUNK = 8


class VQGANDecoder(nn.Module):
    """Image tokens -> RGB, as ruDALL-E's ``VQGanGumbelVAE.decode`` followed by ``to_pil_image``.

    Its ``state_dict`` names are exactly :func:`vqgan_decode_tensor_names`, so the subset of the
    checkpoint loads with ``strict=True``.
    """

    def __init__(self, cfg: VQGANConfig, *, chunk: int = DECODE_CHUNK) -> None:
        super().__init__()
        self.cfg = cfg
        #: How many images go through the decoder at once in `decode` (bounds its activation memory).
        self.chunk = positive_int(chunk, "chunk")
        self.decoder = Decoder(cfg.ddconfig)
        self.post_quant_conv = _conv1(cfg.embed_dim, cfg.ddconfig.z_channels)
        self.quantize = _Quantize(cfg, with_proj=False, with_embed=True)

    def _check_codes(self, codes: torch.Tensor) -> int:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            got = getattr(codes, "shape", codes)
            raise ValueError(f"codes must be a 2-D tensor [batch, tokens], got {got!r}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        n = codes.shape[1]
        side = math.isqrt(n)
        if n == 0 or side * side != n:
            raise ValueError(f"codes: {n} tokens per image is not a square grid")
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.cfg.n_embed:
                raise ValueError(f"codes out of range: [{lo}, {hi}] not within [0, {self.cfg.n_embed})")
        return side

    def latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook rows for ``codes`` [B, n] as a grid [B, embed_dim, sqrt(n), sqrt(n)]."""
        side = self._check_codes(codes)
        weight = self.quantize.embed.weight
        # Row lookup == upstream's one_hot(codes) @ weight exactly (one product of 1, the rest 0).
        z = F.embedding(codes.to(weight.device, torch.long), weight)  # [B, n, embed_dim]
        return z.transpose(1, 2).reshape(codes.shape[0], -1, side, side)  # 'b (h w) c -> b c h w'

    @torch.inference_mode()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n] -> decoder output in [-1, 1]-ish, float in the module's dtype [B, out_ch, H, W]."""
        return self.decoder(self.post_quant_conv(self.latents(codes)))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes LongTensor [B, n] -> uint8 RGB [B, H, W, 3] on the CPU, `self.chunk` images at a time."""
        side = self._check_codes(codes)
        step = self.chunk
        outs = [self._to_uint8(self(codes[i : i + step])) for i in range(0, codes.shape[0], step)]
        if not outs:
            res = side * 2 ** (len(self.cfg.ddconfig.ch_mult) - 1)
            return torch.empty(0, res, res, self.cfg.ddconfig.out_ch, dtype=torch.uint8)
        return torch.cat(outs)

    @staticmethod
    def _to_uint8(x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] float -> [B, H, W, C] uint8, CPU
        # Same float32 op order as upstream: (clamp + 1) * 0.5, then to_pil_image's x * 255 truncated.
        img = (x.float().clamp(-1.0, 1.0) + 1) * 0.5
        return (img * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


class VQGANEncoder(nn.Module):
    """RGB -> image tokens, as ruDALL-E's ``GumbelVQ.encode(x, disable_gumbel_softmax=True)``:
    ``encoder`` -> ``quant_conv`` -> ``quantize.proj`` -> argmax over the codes (no Gumbel noise).

    Its ``state_dict`` names are exactly :func:`vqgan_encode_tensor_names`. Pixels come in as upstream
    feeds them, scaled to [-1, 1] (``2 * x - 1`` of [0, 1] values); see `app.engine.image_prompt`.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        if cfg.embed_dim != cfg.ddconfig.z_channels:
            raise ValueError(
                f"vqgan.embed_dim ({cfg.embed_dim}) must equal vqgan.ddconfig.z_channels "
                f"({cfg.ddconfig.z_channels}) to encode: quantize.proj reads quant_conv's output"
            )
        if cfg.ddconfig.double_z:
            # quant_conv takes z_channels inputs, a double_z encoder gives twice that (a KL model).
            raise ValueError("vqgan.ddconfig.double_z must be false to encode (a VQ model, not a KL one)")
        self.cfg = cfg
        self.encoder = Encoder(cfg.ddconfig)
        self.quant_conv = _conv1(cfg.ddconfig.z_channels, cfg.embed_dim)
        self.quantize = _Quantize(cfg, with_proj=True, with_embed=False)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side (8 for f8)."""
        return self.cfg.ddconfig.downsample_factor

    def _check_pixels(self, x: torch.Tensor) -> None:
        dd = self.cfg.ddconfig
        f = self.downsample_factor
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != dd.in_channels:
            got = getattr(x, "shape", x)
            raise ValueError(f"pixels must be a tensor [batch, {dd.in_channels}, H, W], got {got!r}")
        if not x.is_floating_point():
            raise ValueError(f"pixels must be floating point in [-1, 1], got {x.dtype}")
        h, w = x.shape[2], x.shape[3]
        if h == 0 or w == 0 or h % f or w % f:
            raise ValueError(f"pixels: {h}x{w} is not a non-empty multiple of {f} pixels per token")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, H, W] in [-1, 1] -> code logits [B, n_embed, H/f, W/f]."""
        return self.quantize.proj(self.quant_conv(self.encoder(x)))

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, H, W] in [-1, 1] -> codes LongTensor [B, H/f, W/f] on the CPU.

        The pixels are moved to the module's device and dtype first; in fp32 the codes equal upstream's.
        """
        self._check_pixels(x)
        weight = self.encoder.conv_in.weight
        logits = self(x.to(weight.device, weight.dtype))  # [B, n_embed, H/f, W/f]
        return logits.argmax(dim=1).cpu()
