"""RealESRGAN: published tensor names, checkpoint wrappers, and the tiled upscale arithmetic."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.nets.realesrgan import (
    RealESRGANConfig,
    RRDBNet,
    expected_realesrgan_tensors,
    reflect_pad,
    unwrap_realesrgan_state_dict,
    upscale,
    upscale_batch,
)

TENSORS = Path(__file__).resolve().parents[4] / "shared" / "tensors"
TINY = RealESRGANConfig(scale=4, num_feat=8, num_block=1, num_grow_ch=4)
# Receptive field of TINY, in input pixels: 17 3x3 convs at input resolution plus < 2 after upsampling.
TINY_REACH = 19


def _net(cfg: RealESRGANConfig = TINY, seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    net = RRDBNet(cfg).eval()
    with torch.no_grad():  # outputs spread over [0, 1] instead of sitting near 0
        net.conv_last.bias.fill_(0.5)
        net.conv_last.weight.mul_(4)
    return net


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _to_uint8(x: torch.Tensor) -> np.ndarray:  # [1, 3, H, W] float -> [H, W, 3] uint8, upstream's rule
    return (x.float().clamp(0, 1).double() * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def _whole(net: RRDBNet, canvas: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(canvas).permute(2, 0, 1)[None].double() / 255
    with torch.no_grad():
        return _to_uint8(net(x.float()))


def test_expected_tensors_equal_published_realesrgan_list():
    path = TENSORS / "realesrgan-x4.json"
    if not path.exists():
        pytest.skip(f"{path} is not available in this checkout")
    published = {k: tuple(v) for k, v in json.loads(path.read_text())["tensors"].items()}
    assert expected_realesrgan_tensors(RealESRGANConfig()) == published


def test_from_manifest_reads_the_spec_block():
    block = {"checkpoint": "x4/RealESRGAN_x4.pth", "scale": 4, "num_feat": 64, "num_block": 23,
             "num_grow_ch": 32, "description": "catalog metadata"}
    assert RealESRGANConfig.from_manifest(block) == RealESRGANConfig()


@pytest.mark.parametrize("key", ["scale", "num_feat", "num_block", "num_grow_ch"])
def test_from_manifest_names_a_missing_key(key):
    block = {"scale": 4, "num_feat": 64, "num_block": 23, "num_grow_ch": 32}
    del block[key]
    with pytest.raises(ValueError, match=repr(key)):
        RealESRGANConfig.from_manifest(block)


def test_unsupported_scale_is_rejected():
    with pytest.raises(ValueError, match="realesrgan.scale"):
        RealESRGANConfig(scale=3)


def test_unwrap_accepts_a_bare_state_dict():
    sd = {"conv_first.weight": torch.zeros(1)}
    assert unwrap_realesrgan_state_dict(sd) == sd


def test_unwrap_reads_params_ema():
    inner = {"conv_first.weight": torch.ones(1)}
    assert unwrap_realesrgan_state_dict({"params_ema": inner}) == inner


def test_unwrap_prefers_params_over_params_ema_as_upstream_does():
    params, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert unwrap_realesrgan_state_dict({"params_ema": ema, "params": params})["w"] is params["w"]


@pytest.mark.parametrize("obj", [[1, 2], {"params": [1]}, {"conv_first.weight": "x"}])
def test_unwrap_rejects_what_is_not_a_dict_of_tensors(obj):
    with pytest.raises(ValueError, match="realesrgan checkpoint"):
        unwrap_realesrgan_state_dict(obj)


def test_published_state_dict_loads_strictly_after_unwrapping():
    sd = {k: torch.randn(s) for k, s in expected_realesrgan_tensors(TINY).items()}
    net = RRDBNet(TINY)
    net.load_state_dict(unwrap_realesrgan_state_dict({"params_ema": sd}), strict=True)


def test_reflect_pad_mirrors_the_border_including_the_edge_pixel():
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = reflect_pad(img, 2)
    assert out.shape == (8, 9, 3)
    np.testing.assert_array_equal(out[2:-2, 2:-2], img)
    np.testing.assert_array_equal(out[:2, 2:-2], img[1::-1])  # top: rows 1, 0
    np.testing.assert_array_equal(out[-2:, 2:-2], img[:-3:-1])  # bottom: rows 3, 2
    np.testing.assert_array_equal(out[2:-2, :2], img[:, 1::-1])  # left: cols 1, 0
    np.testing.assert_array_equal(out[:2, :2], img[1::-1, 1::-1])  # corner: mirrored both ways


def test_upscale_returns_uint8_scaled_by_four():
    out = upscale(_net(), _image(37, 23), tile=16, overlap=4, pad=3, batch=4)
    assert out.shape == (148, 92, 3) and out.dtype == np.uint8
    assert out.max() > out.min()


def test_tiles_with_enough_overlap_equal_one_pass_over_the_padded_image():
    net, img, pad, tile = _net(), _image(50, 22), 3, 28  # padded 56x28: exactly 2x1 tiles, no extension
    got = upscale(net, img, tile=tile, overlap=TINY_REACH + 1, pad=pad, batch=1)
    canvas = np.pad(np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric"),
                    ((TINY_REACH + 1,) * 2, (TINY_REACH + 1,) * 2, (0, 0)), mode="edge")
    cut = (TINY_REACH + 1 + pad) * 4
    ref = _whole(net, canvas)[cut:-cut, cut:-cut]
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_too_little_overlap_shows_seams_so_the_comparison_above_can_fail():
    net, img, pad, tile = _net(), _image(50, 22), 3, 28
    got = upscale(net, img, tile=tile, overlap=2, pad=pad, batch=1)
    canvas = np.pad(np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric"),
                    ((2, 2), (2, 2), (0, 0)), mode="edge")
    ref = _whole(net, canvas)[(2 + pad) * 4 : -(2 + pad) * 4, (2 + pad) * 4 : -(2 + pad) * 4]
    assert np.abs(got.astype(int) - ref.astype(int)).max() > 1


def _record_batches(net: RRDBNet) -> list[int]:
    sizes: list[int] = []
    net.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes


def test_network_never_sees_more_than_batch_tiles():
    net = _net()
    sizes = _record_batches(net)
    upscale(net, _image(40, 30), tile=12, overlap=4, pad=2, batch=3)  # padded 44x34: 4x3 = 12 tiles
    assert sizes == [3, 3, 3, 3]
    sizes.clear()
    upscale(net, _image(40, 30), tile=12, overlap=4, pad=2, batch=5)
    assert sizes == [5, 5, 2]


def test_tile_batch_size_does_not_change_the_pixels():
    net, img = _net(), _image(30, 26)
    one = upscale(net, img, tile=12, overlap=4, pad=2, batch=1)
    many = upscale(net, img, tile=12, overlap=4, pad=2, batch=7)
    assert np.abs(one.astype(int) - many.astype(int)).max() <= 1


def test_upscale_batch_shares_batches_across_images_and_matches_single_runs():
    net = _net()
    images = [_image(20, 14, seed=1), _image(9, 31, seed=2)]
    singles = [upscale(net, im, tile=10, overlap=4, pad=2, batch=4) for im in images]
    sizes = _record_batches(net)
    together = upscale_batch(net, images, tile=10, overlap=4, pad=2, batch=4)
    # 24x18 -> 3x2 tiles, 13x35 -> 2x4 tiles: 14 tiles in batches of 4, the second mixing both images
    assert sizes == [4, 4, 4, 2]
    for a, b in zip(singles, together):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_output_is_clamped_then_scaled_by_255_and_truncated():
    net = _net()
    with torch.no_grad():  # constant output per channel: exactly the bias
        net.conv_last.weight.zero_()
        net.conv_last.bias.copy_(torch.tensor([0.5, 1.7, -0.3]))
    out = upscale(net, _image(10, 10), tile=8, overlap=2, pad=1)
    # 0.5 * 255 = 127.5 -> 127 (rounding would give 128)
    assert np.unique(out[..., 0]).tolist() == [127]
    assert np.unique(out[..., 1]).tolist() == [255]
    assert np.unique(out[..., 2]).tolist() == [0]


def test_tensor_and_numpy_inputs_give_the_same_image():
    net, img = _net(), _image(16, 12)
    a = upscale(net, img, tile=8, overlap=2, pad=2)
    b = upscale(net, torch.from_numpy(img), tile=8, overlap=2, pad=2)
    np.testing.assert_array_equal(a, b)


def test_zero_padding_and_images_smaller_than_a_tile_work():
    out = upscale(_net(), _image(5, 3), tile=16, overlap=2, pad=0)
    assert out.shape == (20, 12, 3)


def test_scale_two_folds_pixels_into_channels_like_basicsr():
    cfg = RealESRGANConfig(scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    net = _net(cfg)
    seen: list[torch.Tensor] = []
    net.conv_first.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.rand(1, 3, 6, 4)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 3, 12, 8)
    # BasicSR's pixel_unshuffle: channel c*4 + i*2 + j holds x[c, 2h + i, 2w + j]
    expected = x.view(1, 3, 3, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 12, 3, 2)
    assert torch.equal(seen[0], expected)
    assert upscale(net, _image(11, 7), tile=8, overlap=2, pad=2).shape == (22, 14, 3)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "uint8"),
        (np.zeros((8, 8, 4), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((8, 8), dtype=np.uint8), r"\[H, W, 3\]"),
        ("not an image", "numpy array or tensor"),
    ],
)
def test_upscale_rejects_bad_images_naming_the_argument(image, message):
    with pytest.raises(ValueError, match=f"image must .*{message}"):
        upscale(_net(), image)


def test_upscale_batch_names_the_bad_image_by_index():
    with pytest.raises(ValueError, match=r"images\[1\]"):
        upscale_batch(_net(), [_image(8, 8), np.zeros((8, 8), dtype=np.uint8)])


@pytest.mark.parametrize("kwargs", [{"tile": 0}, {"overlap": -1}, {"pad": -2}, {"batch": 0}])
def test_upscale_rejects_bad_tiling_parameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        upscale(_net(), _image(8, 8), **kwargs)
