"""RealESRGAN: RRDBNet plus ruDALL-E's tiled ``RealESRGAN.predict`` upscaling.

Tensor names match the published ``RealESRGAN_x4.pth`` (BasicSR's RRDBNet). ``upscale`` reproduces
upstream's algorithm: symmetric ("reflect" in upstream's naming) border of ``pad`` pixels, the padded image
cut into ``tile``-sized patches that each carry ``overlap`` pixels of edge-padded context, the network
run on at most ``batch`` patches at a time, the context cropped off again, and x*255 truncated to 8 bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.engine.nets.checks import OPTIONAL_IN_MANIFEST, manifest_values, positive_int

__all__ = [
    "RRDBNet",
    "RealESRGANConfig",
    "expected_realesrgan_tensors",
    "reflect_pad",
    "unwrap_realesrgan_state_dict",
    "upscale",
    "upscale_batch",
]

_SUPPORTED_SCALES = (1, 2, 4, 8)
# Scales 1 and 2 fold pixels into channels first (pixel-unshuffle by 4 or 2), then upsample x4.
_UNSHUFFLE = {1: 4, 2: 2, 4: 1, 8: 1}


@dataclass(frozen=True)
class RealESRGANConfig:
    """RRDBNet hyper-parameters (the model.json ``realesrgan`` block without ``checkpoint``)."""

    scale: int = 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    num_in_ch: int = field(default=3, metadata=OPTIONAL_IN_MANIFEST)
    num_out_ch: int = field(default=3, metadata=OPTIONAL_IN_MANIFEST)

    def __post_init__(self) -> None:
        for name in ("num_feat", "num_block", "num_grow_ch", "num_in_ch", "num_out_ch"):
            positive_int(getattr(self, name), f"realesrgan.{name}")
        if self.scale not in _SUPPORTED_SCALES:
            raise ValueError(f"realesrgan.scale must be one of {_SUPPORTED_SCALES}, got {self.scale!r}")

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any]) -> RealESRGANConfig:
        """Build from model.json's ``realesrgan`` block; ``checkpoint`` and unknown keys are ignored."""
        if not isinstance(block, Mapping):
            raise ValueError(f"realesrgan must be an object, got {type(block).__name__}")
        return cls(**manifest_values(cls, block, "realesrgan"))


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        f, g = num_feat, num_grow_ch
        self.conv1 = nn.Conv2d(f, g, 3, 1, 1)
        self.conv2 = nn.Conv2d(f + g, g, 3, 1, 1)
        self.conv3 = nn.Conv2d(f + 2 * g, g, 3, 1, 1)
        self.conv4 = nn.Conv2d(f + 3 * g, g, 3, 1, 1)
        self.conv5 = nn.Conv2d(f + 4 * g, f, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, F, H, W]
        x1 = _lrelu(self.conv1(x))  # [B, G, H, W]
        x2 = _lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = _lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = _lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # [B, F, H, W]
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    # In place is safe: every caller passes a fresh convolution output.
    return F.leaky_relu(x, 0.2, inplace=True)


class RRDBNet(nn.Module):
    """ESRGAN's Residual-in-Residual Dense Block network: [B, 3, h, w] in [0, 1] -> [B, 3, h*s, w*s]."""

    def __init__(self, cfg: RealESRGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        f = cfg.num_feat
        unshuffle = _UNSHUFFLE[cfg.scale]
        self.conv_first = nn.Conv2d(cfg.num_in_ch * unshuffle * unshuffle, f, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(f, cfg.num_grow_ch) for _ in range(cfg.num_block)))
        self.conv_body = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(f, f, 3, 1, 1)
        if cfg.scale == 8:
            self.conv_up3 = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_hr = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_last = nn.Conv2d(f, cfg.num_out_ch, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.cfg.scale

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (the pixel-unshuffle factor)."""
        return _UNSHUFFLE[self.cfg.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, C_out, h*s, w*s]
        unshuffle = _UNSHUFFLE[self.cfg.scale]
        # F.pixel_unshuffle orders channels c*r*r + i*r + j, as BasicSR's view/permute version does.
        feat = F.pixel_unshuffle(x, unshuffle) if unshuffle > 1 else x
        feat = self.conv_first(feat)  # [B, F, h', w']
        feat = feat + self.conv_body(self.body(feat))
        ups = [self.conv_up1, self.conv_up2] + ([self.conv_up3] if self.cfg.scale == 8 else [])
        for conv in ups:
            feat = _lrelu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.conv_hr(feat)))


def expected_realesrgan_tensors(cfg: RealESRGANConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published RRDBNet state dict (name -> shape)."""
    with torch.device("meta"):
        net = RRDBNet(cfg)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def unwrap_realesrgan_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The RRDBNet weights inside a loaded ``.pth``: under ``params``, else ``params_ema``, else bare.

    The order is upstream's ``RealESRGAN.load_weights``.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"realesrgan checkpoint must hold a dict of tensors, got {type(obj).__name__}")
    for key in ("params", "params_ema"):
        if key in obj:
            inner = obj[key]
            if not isinstance(inner, Mapping):
                raise ValueError(f"realesrgan checkpoint: {key!r} is a {type(inner).__name__}, not a dict")
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"realesrgan checkpoint: entries that are not tensors: {bad[:5]}")
    return dict(obj)


def reflect_pad(image: np.ndarray, pad: int) -> np.ndarray:
    """Upstream's ``pad_reflect``: mirror ``pad`` pixels at every border, edge pixel included
    (numpy's "symmetric" mode). [H, W, C] -> [H + 2*pad, W + 2*pad, C]."""
    if pad == 0:
        return image
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")


def _as_hwc_uint8(image: Any, where: str) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        kind = type(image).__name__
        raise ValueError(f"{where} must be a uint8 numpy array or tensor [H, W, 3], got {kind}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{where} must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    return image


@dataclass
class _Job:
    # One image in flight: its padded canvas, where its output goes, and how to crop it.
    canvas: torch.Tensor  # [rows*tile + 2*overlap, cols*tile + 2*overlap, 3] uint8, on the net's device
    out: np.ndarray  # [rows*tile*s, cols*tile*s, 3] uint8
    cols: int
    tiles: int
    crop: tuple[int, int, int]  # padded height, padded width, pad (all in output pixels)


def _plan(image: np.ndarray, tile: int, overlap: int, pad: int, scale: int, device: torch.device) -> _Job:
    padded = reflect_pad(image, pad)  # [Hp, Wp, 3]
    hp, wp = padded.shape[:2]
    rows, cols = math.ceil(hp / tile), math.ceil(wp / tile)
    # Upstream first extends bottom/right by edge values to whole tiles, then edge-pads `overlap` all
    # round; edge padding an edge padding is one edge padding with the summed widths.
    widths = ((overlap, rows * tile - hp + overlap), (overlap, cols * tile - wp + overlap), (0, 0))
    canvas = np.pad(padded, widths, mode="edge")  # [rows*tile + 2*overlap, cols*tile + 2*overlap, 3]
    return _Job(
        canvas=torch.from_numpy(canvas).to(device),
        out=np.empty((rows * tile * scale, cols * tile * scale, 3), dtype=np.uint8),
        cols=cols,
        tiles=rows * cols,
        crop=(hp * scale, wp * scale, pad * scale),
    )


def _check_tiling(net: RRDBNet, tile: int, overlap: int, pad: int, batch: int) -> None:
    limits = (("tile", tile, 1), ("overlap", overlap, 0), ("pad", pad, 0), ("batch", batch, 1))
    for name, value, low in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if (tile + 2 * overlap) % net.input_multiple:
        raise ValueError(
            f"tile + 2*overlap = {tile + 2 * overlap} must be a multiple of {net.input_multiple} "
            f"for scale {net.scale}"
        )


@torch.inference_mode()
def upscale_batch(
    net: RRDBNet,
    images: Sequence[Any],
    *,
    tile: int = 192,
    overlap: int = 24,
    pad: int = 15,
    batch: int = 4,
) -> list[np.ndarray]:
    """Upscale several uint8 [H, W, 3] images; their tiles share network batches of at most ``batch``.

    Returns one uint8 numpy array [H*s, W*s, 3] per image, equal to upscaling each alone.
    """
    _check_tiling(net, tile, overlap, pad, batch)
    arrays = [_as_hwc_uint8(img, f"images[{i}]") for i, img in enumerate(images)]
    param = next(net.parameters())
    device, dtype = param.device, param.dtype
    s = net.scale
    # upstream: torch.FloatTensor(patches / 255), i.e. v/255 in float64 rounded once to the net's dtype
    lut = torch.from_numpy(np.arange(256, dtype=np.float64) / 255).to(device=device, dtype=dtype)
    side, step, keep = tile + 2 * overlap, tile, tile * s
    lo = overlap * s

    jobs = [_plan(a, tile, overlap, pad, s, device) for a in arrays]
    order = [(j, t) for j, job in enumerate(jobs) for t in range(job.tiles)]  # row-major per image
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        corners = [(j, *divmod(t, jobs[j].cols)) for j, t in chunk]  # (image, tile row, tile col)
        patches = torch.stack(
            [jobs[j].canvas[r * step : r * step + side, c * step : c * step + side] for j, r, c in corners]
        )  # [b, side, side, 3] uint8
        # Channels-last view like upstream's permute: convolution kernels pick their algorithm by layout.
        x = lut[patches.long()].permute(0, 3, 1, 2)  # [b, 3, side, side]
        sr = net(x).float().clamp_(0, 1)  # [b, 3, side*s, side*s]
        sr = sr[:, :, lo : lo + keep, lo : lo + keep]  # drop the overlap context
        # float64 * 255 truncated, as upstream's (np_sr_image * 255).astype(np.uint8)
        pix = (sr.double() * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # [b, keep, keep, 3]
        # Upstream's stich_together counts (padded width + 2*overlap) // tile columns, which misplaces
        # tiles when 2*overlap >= tile; the true grid is used here (identical for upstream's defaults).
        for (j, r, c), p in zip(corners, pix):
            jobs[j].out[r * keep : (r + 1) * keep, c * keep : (c + 1) * keep] = p

    results = []
    for job in jobs:
        hp, wp, cut = job.crop
        results.append(np.ascontiguousarray(job.out[cut : hp - cut, cut : wp - cut]))
    return results


def upscale(
    net: RRDBNet,
    image: Any,
    *,
    tile: int = 192,
    overlap: int = 24,
    pad: int = 15,
    batch: int = 4,
) -> np.ndarray:
    """Upscale one uint8 [H, W, 3] image (numpy or tensor) -> uint8 numpy [H*s, W*s, 3].

    Upstream ``RealESRGAN.predict``'s algorithm; network memory is bounded by ``batch`` tiles of
    ``tile + 2*overlap`` pixels whatever the image size.
    """
    image = _as_hwc_uint8(image, "image")
    return upscale_batch(net, [image], tile=tile, overlap=overlap, pad=pad, batch=batch)[0]
