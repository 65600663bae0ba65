"""Image prompts: request image decoding, border rules, forced codes as upstream's ImagePrompts."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine import store
from app.engine.image_prompt import (
    BORDER_SIDES,
    SAMPLE,
    ImagePromptError,
    check_borders,
    decode_image,
    forced_mask,
    image_pixels,
    prompt_codes,
)
from app.engine.nets.vqgan import DDConfig, VQGANConfig, VQGANEncoder

# An encoder with 2 pixels per token: an 8x8-token grid is a 16x16 image, cheap enough for many cases.
T = 8
CFG = VQGANConfig(
    embed_dim=32,
    n_embed=48,
    ddconfig=DDConfig(
        double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
        num_res_blocks=1, attn_resolutions=(8,),
    ),
)


@pytest.fixture(scope="module")
def encoder() -> VQGANEncoder:
    torch.manual_seed(0)
    enc = VQGANEncoder(CFG).eval()
    with torch.no_grad():  # non-trivial norms, so that every tensor matters
        for name, p in enc.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return enc


def rgb_image(side: int = 2 * T, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **save: object) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is rewritten to claim ``width`` x ``height`` (valid CRC, tiny data)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), data (13), crc (4)
    data = bytearray(raw[ihdr + 8 : ihdr + 21])
    data[0:8] = struct.pack(">II", width, height)
    raw[ihdr + 8 : ihdr + 21] = data
    raw[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(data)))
    return bytes(raw)


def field_of(exc: pytest.ExceptionInfo[ImagePromptError]) -> str:
    assert isinstance(exc.value, ValueError)
    assert str(exc.value).startswith(exc.value.field + ": ")
    return exc.value.field


# ------------------------------------------------------------------------------------- decode_image


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_images_decode_to_the_same_rgb_pixels(fmt: str) -> None:
    image = rgb_image(24)
    save = {"lossless": True} if fmt == "WEBP" else {}
    got = decode_image(encoded(image, fmt, **save), max_pixels=10_000)
    assert got.mode == "RGB" and got.size == (24, 24)
    assert np.array_equal(np.asarray(got), np.asarray(image))


def test_jpeg_decodes_to_rgb_of_its_size() -> None:
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    got = decode_image(encoded(image, "JPEG", quality=95), max_pixels=10_000)
    assert got.mode == "RGB" and got.size == (40, 30)
    assert np.abs(np.asarray(got).astype(int) - (200, 30, 90)).max() <= 3


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "I;16"])
def test_other_modes_are_converted_to_rgb(mode: str) -> None:
    image = rgb_image(16).convert(mode) if mode != "I;16" else Image.new("I;16", (16, 16), 300)
    got = decode_image(encoded(image, "PNG"), max_pixels=10_000)
    assert got.mode == "RGB" and got.size == (16, 16)


def test_data_urls_and_wrapped_base64_are_accepted() -> None:
    image = rgb_image(16)
    data = encoded(image, "PNG")
    wrapped = "\n".join(data[i : i + 76] for i in range(0, len(data), 76))
    for text in (f"data:image/png;base64,{data}", wrapped):
        assert np.array_equal(np.asarray(decode_image(text, max_pixels=10_000)), np.asarray(image))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "must be a base64 string"),
        (b"iVBORw0KGgo=", "must be a base64 string"),
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("not base64!", "is not valid base64"),
        ("iVBORw0KGgo", "is not valid base64"),  # missing padding
        (base64.b64encode(b"hello, this is text").decode(), "is not an image"),
        (base64.b64encode(bytes(range(256))).decode(), "is not an image"),
        (base64.b64encode(b"GIF89a" + b"\0" * 20).decode(), "is a GIF image; only PNG, JPEG and WebP"),
        (base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(), "is a SVG/XML image"),
    ],
)
def test_bad_image_data_is_refused_naming_the_field(value: object, reason: str) -> None:
    with pytest.raises(ImagePromptError, match=reason) as exc:
        decode_image(value, max_pixels=10_000)  # type: ignore[arg-type]
    assert field_of(exc) == "image_prompt.image"


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_real_files_of_other_formats_are_refused_by_name(fmt: str) -> None:
    with pytest.raises(ImagePromptError, match=f"is a {fmt} image; only PNG, JPEG and WebP are accepted"):
        decode_image(encoded(rgb_image(8), fmt), max_pixels=10_000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused_as_invalid(fmt: str) -> None:
    raw = base64.b64decode(encoded(rgb_image(64), fmt))
    cut = base64.b64encode(raw[: len(raw) // 2]).decode()
    name = {"WEBP": "WebP"}.get(fmt, fmt)
    with pytest.raises(ImagePromptError, match=f"is not a valid {name} image") as exc:
        decode_image(cut, max_pixels=10_000)
    assert field_of(exc) == "image_prompt.image"


def test_more_pixels_than_allowed_are_refused() -> None:
    data = encoded(rgb_image(32), "PNG")
    assert decode_image(data, max_pixels=32 * 32).size == (32, 32)
    with pytest.raises(ImagePromptError, match="is 32x32 = 1024 pixels, more than the limit of 1023") as exc:
        decode_image(data, max_pixels=32 * 32 - 1)
    assert field_of(exc) == "image_prompt.image"


def test_the_size_is_refused_from_the_header_before_any_pixel_is_decoded() -> None:
    # The file claims 5000x4000 but holds one pixel's data: decoding it would fail as truncated, so
    # a size refusal proves the header was checked first.
    data = base64.b64encode(png_claiming_size(5_000, 4_000)).decode()
    too_many = "is 5000x4000 = 20000000 pixels, more than the limit of 16777216"
    with pytest.raises(ImagePromptError, match=too_many):
        decode_image(data, max_pixels=4096 * 4096)
    with pytest.raises(ImagePromptError, match="is not a valid PNG image"):
        decode_image(data, max_pixels=5_000 * 4_000)  # within the limit: now the data is read, and fails


def test_pils_decompression_bomb_error_is_a_client_error() -> None:
    data = base64.b64encode(png_claiming_size(50_000, 40_000)).decode()  # over twice PIL's limit
    with pytest.raises(ImagePromptError, match="is too large to decode") as exc:
        decode_image(data, max_pixels=10**12)
    assert field_of(exc) == "image_prompt.image"


def test_pils_decompression_bomb_limit_caps_a_larger_server_limit() -> None:
    claimed = 12_000 * 10_000  # over PIL's MAX_IMAGE_PIXELS (89.5 M) but within 2x of it
    data = base64.b64encode(png_claiming_size(12_000, 10_000)).decode()
    assert Image.MAX_IMAGE_PIXELS is not None and claimed > Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
        ImagePromptError, match=f"more than the limit of {Image.MAX_IMAGE_PIXELS} pixels"
    ):
        decode_image(data, max_pixels=10**12)


def test_max_pixels_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(encoded(rgb_image(8), "PNG"), max_pixels=0)


# ------------------------------------------------------------------------------------- check_borders


def test_borders_are_returned_with_every_side() -> None:
    assert check_borders({"up": 4}, 32) == {"up": 4, "down": 0, "left": 0, "right": 0}
    full = {"up": 1, "down": 2, "left": 3, "right": 28}
    assert check_borders(full, 32) == full


@pytest.mark.parametrize("side", BORDER_SIDES)
@pytest.mark.parametrize("value", [-1, 33, 1.5, 4.0, True, "4", None])
def test_a_bad_side_is_refused_naming_it(side: str, value: object) -> None:
    with pytest.raises(ImagePromptError, match="must be an integer from 0 to 32") as exc:
        check_borders({"up": 1, side: value}, 32)
    assert field_of(exc) == f"image_prompt.borders.{side}"


def test_an_unknown_side_is_refused_naming_it() -> None:
    with pytest.raises(ImagePromptError, match="is not a side; the sides are up, down, left, right") as exc:
        check_borders({"up": 1, "top": 2}, 32)
    assert field_of(exc) == "image_prompt.borders.top"


@pytest.mark.parametrize("borders", [{}, {"up": 0, "down": 0, "left": 0, "right": 0}])
def test_at_least_one_side_must_be_above_zero(borders: dict[str, int]) -> None:
    with pytest.raises(ImagePromptError, match="at least one of up, down, left, right must be above") as exc:
        check_borders(borders, 32)
    assert field_of(exc) == "image_prompt.borders"


@pytest.mark.parametrize(
    "borders",
    [{"up": 32}, {"right": 32}, {"up": 16, "down": 16}, {"left": 20, "right": 12}, {"up": 30, "down": 5}],
)
def test_borders_that_keep_every_position_are_refused(borders: dict[str, int]) -> None:
    with pytest.raises(ImagePromptError, match="leave no position to generate") as exc:
        check_borders(borders, 32)
    assert field_of(exc) == "image_prompt.borders"
    assert forced_mask({s: borders.get(s, 0) for s in BORDER_SIDES}, 32).all()  # indeed nothing left


@pytest.mark.parametrize(
    "borders", [{"up": 31}, {"up": 16, "down": 15}, {"left": 31}, {"up": 31, "left": 31}]
)
def test_borders_leaving_one_row_or_column_are_accepted(borders: dict[str, int]) -> None:
    sides = check_borders(borders, 32)
    assert not forced_mask(sides, 32).all()


def test_borders_must_be_an_object() -> None:
    with pytest.raises(ImagePromptError) as exc:
        check_borders([("up", 1)], 32)  # type: ignore[arg-type]
    assert field_of(exc) == "image_prompt.borders"


# ------------------------------------------------------------------------------------- prompt_codes


def positions(**borders: int) -> set[int]:
    """Forced positions, row-major over the T x T grid, written out from the definition."""
    b = {s: borders.get(s, 0) for s in BORDER_SIDES}
    return {
        r * T + c
        for r in range(T)
        for c in range(T)
        if r < b["up"] or r >= T - b["down"] or c < b["left"] or c >= T - b["right"]
    }


def whole_grid(encoder: VQGANEncoder, image: Image.Image) -> torch.Tensor:
    return encoder.encode(image_pixels(image, 2 * T))[0].reshape(-1)  # [T*T]


@pytest.mark.parametrize(
    "borders",
    [{"up": 3}, {"down": 2}, {"left": 1}, {"right": 4}, {"up": 1, "down": 1, "left": 2, "right": 2},
     {"up": 7}, {"left": 3, "right": 4}],
)
def test_forced_positions_are_the_bands_with_the_whole_images_codes(encoder: VQGANEncoder, borders) -> None:
    image = rgb_image()
    codes = prompt_codes(encoder, image, borders, False, T)
    assert codes.shape == (T * T,) and codes.dtype == torch.long and codes.device.type == "cpu"
    forced = set(torch.nonzero(codes != SAMPLE).flatten().tolist())
    assert forced == positions(**borders)
    grid = whole_grid(encoder, image)
    idx = sorted(forced)
    assert torch.equal(codes[idx], grid[idx])
    assert (codes[[i for i in range(T * T) if i not in forced]] == SAMPLE).all()


def band_codes(encoder: VQGANEncoder, image: Image.Image, rows: slice, cols: slice) -> torch.Tensor:
    x = image_pixels(image, 2 * T)[:, :, rows, cols]
    return encoder.encode(x)[0]


def test_crop_first_encodes_each_band_on_its_own(encoder: VQGANEncoder) -> None:
    image = rgb_image(seed=5)
    up = prompt_codes(encoder, image, {"up": 3}, True, T).reshape(T, T)
    expected_up = band_codes(encoder, image, slice(0, 6), slice(None))  # 3 token rows = 6 pixels
    assert torch.equal(up[:3], expected_up)
    assert (up[3:] == SAMPLE).all()
    # the crop changes the codes (borders and attention see less), or crop_first would mean nothing
    assert not torch.equal(up[:3], whole_grid(encoder, image).reshape(T, T)[:3])

    right = prompt_codes(encoder, image, {"right": 2}, True, T).reshape(T, T)
    assert torch.equal(right[:, T - 2 :], band_codes(encoder, image, slice(None), slice(2 * T - 4, None)))
    assert (right[:, : T - 2] == SAMPLE).all()


def test_crop_first_corners_go_to_the_band_upstream_writes_last(encoder: VQGANEncoder) -> None:
    # upstream writes down, right, left, up in that order into one grid: up wins its corners over left,
    # left over right, right over down.
    image = rgb_image(seed=6)
    b = {"up": 2, "down": 3, "left": 2, "right": 3}
    got = prompt_codes(encoder, image, b, True, T).reshape(T, T)
    up = band_codes(encoder, image, slice(0, 4), slice(None))  # [2, T]
    down = band_codes(encoder, image, slice(2 * T - 6, None), slice(None))  # [3, T]
    left = band_codes(encoder, image, slice(None), slice(0, 4))  # [T, 2]
    right = band_codes(encoder, image, slice(None), slice(2 * T - 6, None))  # [T, 3]
    expected = torch.full((T, T), SAMPLE, dtype=torch.long)
    expected[T - 3 :, :] = down
    expected[:, T - 3 :] = right
    expected[:, :2] = left
    expected[:2, :] = up
    assert torch.equal(got, expected)
    # the bands disagree somewhere at the corners, so the order is what decided them
    assert not torch.equal(up[:, :2], left[:2, :]) or not torch.equal(down[:, T - 3 :], right[T - 3 :, :])


def test_the_image_is_converted_and_resized_bicubic_unless_already_the_size(encoder: VQGANEncoder) -> None:
    rng = np.random.default_rng(3)
    odd = Image.fromarray(rng.integers(0, 256, (30, 44, 4), dtype=np.uint8), mode="RGBA")
    borders = {"up": 2, "left": 1}
    resized = odd.convert("RGB").resize((2 * T, 2 * T), Image.Resampling.BICUBIC)
    assert torch.equal(
        prompt_codes(encoder, odd, borders, False, T), prompt_codes(encoder, resized, borders, False, T)
    )
    bilinear = odd.convert("RGB").resize((2 * T, 2 * T), Image.Resampling.BILINEAR)
    assert not torch.equal(image_pixels(odd, 2 * T), image_pixels(bilinear, 2 * T))
    # an image already at the size is used as is
    exact = rgb_image(2 * T, seed=4)
    assert torch.equal(image_pixels(exact, 2 * T)[0].permute(1, 2, 0),
                       torch.from_numpy(np.array(exact)).float() / 255.0 * 2 - 1)


def test_pixels_are_scaled_as_upstream_does() -> None:
    values = np.array([[[0, 51, 255]]], dtype=np.uint8).repeat(2, 0).repeat(2, 1)  # [2, 2, 3]
    x = image_pixels(Image.fromarray(values), 2)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    upstream = 2 * (torch.tensor(values.transpose(2, 0, 1)) / 255.0) - 1
    assert torch.equal(x[0], upstream)
    assert x[0, :, 0, 0].tolist() == [-1.0, 2 * np.float32(51 / 255) - 1, 1.0]


def test_prompt_codes_validates_the_borders(encoder: VQGANEncoder) -> None:
    with pytest.raises(ImagePromptError) as exc:
        prompt_codes(encoder, rgb_image(), {"up": T}, False, T)
    assert field_of(exc) == "image_prompt.borders"


def test_the_tiny_models_encoder_gives_a_32x32_prompt(tiny_model_dir: Path) -> None:
    m = store.load_manifest(tiny_model_dir)
    enc = store.load_vqgan_encoder(m, "cpu", torch.float32)
    t = m.dalle.image_tokens_per_dim
    image = decode_image(encoded(rgb_image(100, seed=9), "PNG"), max_pixels=256 * 256)
    codes = prompt_codes(enc, image, {"down": 4, "right": 2}, True, t)
    assert codes.shape == (t * t,)
    grid = codes.reshape(t, t)
    assert (grid[: t - 4, : t - 2] == SAMPLE).all()
    forced = grid[grid != SAMPLE]
    assert forced.numel() == 4 * t + 2 * (t - 4)
    assert 0 <= int(forced.min()) and int(forced.max()) < m.vqgan.n_embed
