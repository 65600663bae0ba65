"""Image prompts (SPEC section 9): keep bands of a given image, generate the rest.

Pure functions, as ruDALL-E 1.1.3's ``ImagePrompts`` computes them:

- `decode_image`: the request's base64 PNG/JPEG/WebP -> an RGB ``PIL.Image`` (size checked from the
  header before any pixel is decoded);
- `check_borders`: the ``borders`` object -> ``{"up", "down", "left", "right"}`` in image tokens;
- `prompt_codes`: image + borders -> one long tensor over the token grid (row-major), the VQ-GAN code
  at every forced position and ``-1`` (`SAMPLE`) where the transformer samples as usual.

Bad client input raises `ImagePromptError` (a ValueError) whose ``field`` names the request field
(``image_prompt.image``, ``image_prompt.borders.left``, ...), for a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app.engine.nets.vqgan import VQGANEncoder

__all__ = [
    "BORDER_SIDES",
    "IMAGE_FIELD",
    "BORDERS_FIELD",
    "SAMPLE",
    "ImagePromptError",
    "check_borders",
    "decode_image",
    "forced_mask",
    "image_pixels",
    "prompt_codes",
]

IMAGE_FIELD = "image_prompt.image"
BORDERS_FIELD = "image_prompt.borders"
#: The sides of ``borders``, each a count of image tokens (8 pixels each at f8).
BORDER_SIDES = ("up", "down", "left", "right")
#: The value of a position the transformer samples (not forced) in `prompt_codes`' result.
SAMPLE = -1

# Format -> how the data starts. Checked before PIL sees the bytes, so no other decoder ever runs.
_ACCEPTED = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
# Formats named in the refusal when recognised (PIL is not asked: it would try every plugin it has).
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"),
)
_DATA_URL = re.compile(r"data:[\w.+/-]*;base64,", re.ASCII)
_WHITESPACE = re.compile(r"\s+", re.ASCII)


class ImagePromptError(ValueError):
    """Bad image-prompt input; ``field`` is the request field (``image_prompt.borders.left``, ...)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _sniff(raw: bytes) -> str | None:
    """The accepted format ``raw`` starts with (PIL's name), else None."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(raw: bytes) -> str | None:
    for signature, name in _OTHER_SIGNATURES:
        if raw.startswith(signature):
            return name
    if raw[4:8] == b"ftyp":  # ISO media: AVIF, HEIC, ...
        return raw[8:12].decode("ascii", "replace").strip().upper() or "ISO media"
    if raw.lstrip()[:1] == b"<":
        return "SVG/XML"
    return None


def _b64decode(data_b64: Any) -> bytes:
    if not isinstance(data_b64, str):
        raise ImagePromptError(IMAGE_FIELD, f"must be a base64 string, got {type(data_b64).__name__}")
    text = _WHITESPACE.sub("", data_b64)  # MIME-style line breaks are common in base64 encoders
    match = _DATA_URL.match(text)
    if match:  # what a browser's FileReader.readAsDataURL gives
        text = text[match.end():]
    if not text:
        raise ImagePromptError(IMAGE_FIELD, "must not be empty (a base64 PNG, JPEG or WebP image)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImagePromptError(
            IMAGE_FIELD, "is not valid base64 (A-Z, a-z, 0-9, + and /, padded with = to a multiple of 4)"
        ) from None


def decode_image(data_b64: str, max_pixels: int) -> Image.Image:
    """A base64 PNG, JPEG or WebP (optionally a ``data:...;base64,`` URL) -> an RGB ``PIL.Image``.

    The size is read from the file's header and refused above ``max_pixels`` (width x height) before
    any pixel is decoded; PIL's own decompression-bomb limit applies too. Only the first frame of an
    animated file is used; EXIF orientation is not applied (upstream does not either). Every problem
    is an `ImagePromptError` naming ``image_prompt.image``.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    raw = _b64decode(data_b64)
    fmt = _sniff(raw)
    if fmt is None:
        other = _other_format(raw)
        if other is not None:
            raise ImagePromptError(IMAGE_FIELD, f"is a {other} image; only PNG, JPEG and WebP are accepted")
        raise ImagePromptError(IMAGE_FIELD, "is not an image (not PNG, JPEG or WebP data)")
    name = _ACCEPTED[fmt]
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    try:
        # formats=[fmt]: only the decoder the signature names may look at the data.
        with Image.open(io.BytesIO(raw), formats=[fmt]) as im:
            width, height = im.size  # from the header; nothing decoded yet
            if width <= 0 or height <= 0:
                raise ImagePromptError(IMAGE_FIELD, f"has no pixels ({width}x{height})")
            if width * height > limit:
                raise ImagePromptError(
                    IMAGE_FIELD,
                    f"is {width}x{height} = {width * height} pixels, more than the limit of {limit} pixels",
                )
            im.load()
            return im.convert("RGB")
    except ImagePromptError:
        raise
    except Image.DecompressionBombError:
        raise ImagePromptError(IMAGE_FIELD, f"is too large to decode (more than {limit} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt data behind a valid signature; PIL raises all of these.
        raise ImagePromptError(IMAGE_FIELD, f"is not a valid {name} image ({_why_invalid(exc)})") from None


def _why_invalid(exc: BaseException) -> str:
    """What is wrong with data PIL refused, in words of our own: PIL's messages can quote a Python object
    (`cannot identify image file <_io.BytesIO object at 0x7f...>`), which a client must never see."""
    if isinstance(exc, UnidentifiedImageError):
        return "its header cannot be read"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "the file is cut short"
    return "its data are corrupt"


def _describe(value: Any) -> str:
    """A client's value for an error message: a number as written, anything else by its JSON type (never a
    repr, which could be long or quote an object)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (str, "a string"), (Mapping, "an object"), (list | tuple, "an array"))
    return next((noun for kind, noun in kinds if isinstance(value, kind)), "a value of another kind")


def check_borders(borders: Mapping[str, Any], tokens_per_dim: int) -> dict[str, int]:
    """Validate ``borders`` and return all four sides (a missing side is 0).

    Each side is an integer 0 .. ``tokens_per_dim`` (image tokens); at least one must be above 0, and
    together they must leave at least one position to generate. `ImagePromptError` names the field
    (``image_prompt.borders.left``; ``image_prompt.borders`` for the rules about all sides).
    """
    if not isinstance(borders, Mapping):
        raise ImagePromptError(BORDERS_FIELD, f"must be an object with keys {', '.join(BORDER_SIDES)}")
    unknown = [k for k in borders if k not in BORDER_SIDES]
    if unknown:
        raise ImagePromptError(
            f"{BORDERS_FIELD}.{unknown[0]}", f"is not a side; the sides are {', '.join(BORDER_SIDES)}"
        )
    sides: dict[str, int] = {}
    for side in BORDER_SIDES:
        value = borders.get(side, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= tokens_per_dim:
            raise ImagePromptError(
                f"{BORDERS_FIELD}.{side}",
                f"must be an integer from 0 to {tokens_per_dim} (image tokens, 8 pixels each), "
                f"got {_describe(value)}",
            )
        sides[side] = value
    if not any(sides.values()):
        raise ImagePromptError(BORDERS_FIELD, f"at least one of {', '.join(BORDER_SIDES)} must be above 0")
    if sides["up"] + sides["down"] >= tokens_per_dim or sides["left"] + sides["right"] >= tokens_per_dim:
        raise ImagePromptError(
            BORDERS_FIELD,
            f"up + down and left + right must each be below {tokens_per_dim}: these borders keep the whole "
            f"image and leave no position to generate",
        )
    return sides


def forced_mask(borders: Mapping[str, int], tokens_per_dim: int) -> torch.Tensor:
    """Bool [tokens_per_dim, tokens_per_dim]: True inside the borders (rows up/down, columns left/right)."""
    t = tokens_per_dim
    mask = torch.zeros(t, t, dtype=torch.bool)
    if borders["up"]:
        mask[: borders["up"], :] = True
    if borders["down"]:
        mask[t - borders["down"]:, :] = True
    if borders["left"]:
        mask[:, : borders["left"]] = True
    if borders["right"]:
        mask[:, t - borders["right"]:] = True
    return mask


def image_pixels(image: Image.Image, side: int) -> torch.Tensor:
    """RGB, resized to ``side`` x ``side`` bicubic unless it already is, as float32 [1, 3, side, side]
    in [-1, 1] by upstream's arithmetic (``uint8 / 255.``, then ``2 * x - 1``)."""
    rgb = image.convert("RGB")
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), Image.Resampling.BICUBIC)
    hwc = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # [H, W, 3]
    x = hwc.permute(2, 0, 1).unsqueeze(0) / 255.0  # [1, 3, H, W], float32
    return 2 * x - 1


# Upstream encodes the bands in this order into one grid, so a later band wins at the corners it
# shares with an earlier one (up over left over right over down).
_CROP_ORDER = ("down", "right", "left", "up")


def prompt_codes(
    encoder: VQGANEncoder,
    image: Image.Image,
    borders: Mapping[str, Any],
    crop_first: bool,
    tokens_per_dim: int,
) -> torch.Tensor:
    """Forced image tokens for an image prompt: LongTensor [tokens_per_dim**2] (row-major, CPU).

    Positions inside ``borders`` hold the VQ-GAN code of the image there; every other position is
    `SAMPLE` (-1). The image is converted to RGB and resized to 256x256 (``tokens_per_dim`` x the
    encoder's pixels per token) bicubic unless it already is. Without ``crop_first`` the whole image is
    encoded once; with it each band is cropped and encoded on its own, as upstream's ``ImagePrompts``.
    ``borders`` is validated by `check_borders`.
    """
    sides = check_borders(borders, tokens_per_dim)
    f = encoder.downsample_factor
    t = tokens_per_dim
    x = image_pixels(image, t * f)  # [1, 3, t*f, t*f]
    if not crop_first:
        grid = encoder.encode(x)[0]  # [t, t]
    else:
        grid = torch.zeros(t, t, dtype=torch.long)
        for side in _CROP_ORDER:
            n = sides[side]
            if not n:
                continue
            px = n * f
            if side == "down":
                grid[t - n:, :] = encoder.encode(x[:, :, -px:, :])[0]  # [n, t]
            elif side == "right":
                grid[:, t - n:] = encoder.encode(x[:, :, :, -px:])[0]  # [t, n]
            elif side == "left":
                grid[:, :n] = encoder.encode(x[:, :, :, :px])[0]  # [t, n]
            else:
                grid[:n, :] = encoder.encode(x[:, :, :px, :])[0]  # [n, t]
    if grid.shape != (t, t):
        raise ValueError(f"the encoder gave a {tuple(grid.shape)} grid for {t}x{t} tokens")
    codes = torch.full((t * t,), SAMPLE, dtype=torch.long)
    mask = forced_mask(sides, t).reshape(-1)
    codes[mask] = grid.reshape(-1).to(torch.long)[mask]
    return codes
