from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine import store
from app.engine.nets.dalle import MASK_BUFFERS
from app.engine.store import ModelStoreError


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model directory that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def edit_manifest(model_dir: Path, edit) -> None:
    path = model_dir / "model.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def rewrite_checkpoint(path: Path, edit) -> None:
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_resolves_paths_and_keeps_catalog_keys_in_extra(tiny_model_dir: Path) -> None:
    m = store.load_manifest(tiny_model_dir)
    assert m.name == "tiny"
    assert m.root == tiny_model_dir.resolve()
    assert m.dalle_checkpoint == m.root / "rudalle_tiny.bin" and m.dalle_checkpoint.is_file()
    assert m.tokenizer.is_file() and m.vqgan_checkpoint.is_file() and m.realesrgan_checkpoint.is_file()
    assert (m.ruclip / "config.json").is_file()
    assert m.dalle.num_layers == 4 and m.dalle.image_vocab_size == m.vqgan.n_embed
    assert m.realesrgan.scale == 4
    assert {"description", "license", "version"} <= set(m.extra)
    assert not {"dalle", "vqgan", "realesrgan", "tokenizer", "ruclip", "name"} & set(m.extra)


def test_manifest_keeps_unknown_top_level_keys(model_dir: Path) -> None:
    edit_manifest(model_dir, lambda raw: raw.update(owner={"team": "vision"}))
    assert store.load_manifest(model_dir).extra["owner"] == {"team": "vision"}


@pytest.mark.parametrize(
    ("block", "key", "named"),
    [
        (None, "name", "'name'"),
        (None, "vqgan", "'vqgan'"),
        ("dalle", "num_layers", "'dalle.num_layers'"),
        ("dalle", "checkpoint", "'dalle.checkpoint'"),
        ("dalle", "hf_version", "'dalle.hf_version'"),
        ("vqgan", "n_embed", "'vqgan.n_embed'"),
        ("realesrgan", "num_grow_ch", "'realesrgan.num_grow_ch'"),
        ("tokenizer", "path", "'tokenizer.path'"),
        ("ruclip", "path", "'ruclip.path'"),
    ],
)
def test_manifest_missing_key_is_named_with_the_file(model_dir: Path, block, key, named) -> None:
    edit_manifest(model_dir, lambda raw: (raw[block] if block else raw).pop(key))
    with pytest.raises(ModelStoreError, match="model.json") as err:
        store.load_manifest(model_dir)
    assert named in str(err.value)


def test_manifest_missing_ddconfig_key_is_named(model_dir: Path) -> None:
    edit_manifest(model_dir, lambda raw: raw["vqgan"]["ddconfig"].pop("ch_mult"))
    with pytest.raises(ModelStoreError, match=r"model\.json.*'vqgan\.ddconfig\.ch_mult'"):
        store.load_manifest(model_dir)


@pytest.mark.parametrize(
    ("key", "value"), [("num_layers", "4"), ("num_layers", True), ("cogview_pb_relax", 1), ("hf_version", 3)]
)
def test_manifest_rejects_wrong_types_naming_the_key(model_dir: Path, key: str, value: Any) -> None:
    edit_manifest(model_dir, lambda raw: raw["dalle"].update({key: value}))
    with pytest.raises(ModelStoreError, match=rf"model\.json.*'dalle\.{key}'"):
        store.load_manifest(model_dir)


def test_manifest_rejects_an_invalid_value_naming_the_file(model_dir: Path) -> None:
    edit_manifest(model_dir, lambda raw: raw["dalle"].update(hf_version="v9"))
    with pytest.raises(ModelStoreError, match=r"model\.json.*hf_version"):
        store.load_manifest(model_dir)


def test_manifest_requires_codebook_size_to_match_the_image_vocabulary(model_dir: Path) -> None:
    edit_manifest(model_dir, lambda raw: raw["vqgan"].update(n_embed=32))
    with pytest.raises(ModelStoreError, match="n_embed"):
        store.load_manifest(model_dir)


def test_manifest_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="model.json"):
        store.load_manifest(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelStoreError, match="model.json"):
        store.load_manifest(tmp_path)


def test_repository_manifests_parse_and_match_the_shared_tensor_lists() -> None:
    shared = Path(__file__).resolve().parents[3] / "shared" / "tensors"
    if not shared.is_dir():
        shared = Path("/work/shared/tensors")
    if not shared.is_dir():
        pytest.skip("shared tensor lists not available")
    root = Path(__file__).resolve().parents[2] / "model_store"
    for name, files in {
        "kandinsky": {"dalle": "kandinsky-transformer.json"},
        "malevich": {"dalle": "malevich-transformer.json"},
    }.items():
        m = store.load_manifest(root / name)
        expected = store.expected_tensors(m)
        files = {**files, "vqgan": "vqgan-gumbelf8-sber.json", "realesrgan": "realesrgan-x4.json"}
        for component, file in files.items():
            listed = json.loads((shared / file).read_text())["tensors"]
            assert expected[component] == {k: tuple(v) for k, v in listed.items()}, (name, component)


# ---------------------------------------------------------------------------------------- checkpoints


def test_read_state_dict_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="absent.bin"):
        store.read_state_dict(tmp_path / "absent.bin")


def test_read_state_dict_names_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.bin"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ModelStoreError, match="broken.bin"):
        store.read_state_dict(path)


def test_read_state_dict_names_a_truncated_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = (tiny_model_dir / "x4" / "RealESRGAN_x4_tiny.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelStoreError, match="cut.pth"):
        store.read_state_dict(path)


class Payload:
    """A custom class: unpickling it would run arbitrary code paths."""


def test_read_state_dict_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "obj": Payload()}, path)
    with pytest.raises(ModelStoreError, match=r"refusing to load .*evil\.bin"):
        store.read_state_dict(path)


def test_read_state_dict_falls_back_for_legacy_non_zip_files(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    torch.save({"a": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(store.read_state_dict(path, mmap=True)["a"], torch.arange(3.0))
    torch.save({"a": torch.zeros(1), "obj": Payload()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelStoreError, match=r"refusing to load .*old\.bin"):
        store.read_state_dict(path)


def test_read_state_dict_reads_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(4.0)}, str(path))
    assert torch.equal(store.read_state_dict(path)["a"], torch.arange(4.0))
    path.write_bytes(b"garbage")
    with pytest.raises(ModelStoreError, match="w.safetensors"):
        store.read_state_dict(path)


def test_check_state_dict_lists_every_problem_with_file_tensor_and_shapes() -> None:
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    sd = {"a": torch.zeros(3, 2), "c": torch.zeros(1), "z": torch.zeros(5)}
    with pytest.raises(ModelStoreError) as err:
        store.check_state_dict(sd, expected, Path("/m/file.bin"))
    msg = str(err.value)
    assert "3 problems" in msg
    assert "/m/file.bin: tensor 'a' has shape [3, 2], expected [2, 3]" in msg
    assert "/m/file.bin: missing tensor 'b' (expected shape [4])" in msg
    assert "/m/file.bin: unexpected tensor 'z' (shape [5])" in msg


def test_check_state_dict_optional_and_ignored_names() -> None:
    expected = {"a": (2,), "enc": (3,)}
    sd = {"a": torch.zeros(2), "loss.d": torch.zeros(1), "extra": torch.zeros(1)}
    store.check_state_dict(sd, expected, "f", optional={"enc"}, ignore_unknown=True)
    store.check_state_dict(
        sd, expected, "f", optional={"enc"}, allowed_extra={"extra"}, ignore_prefixes=["loss."]
    )
    bad = {**sd, "enc": torch.zeros(4)}
    with pytest.raises(ModelStoreError, match="'enc' has shape"):
        store.check_state_dict(bad, expected, "f", optional={"enc"}, ignore_unknown=True)


def test_device_for_takes_the_longest_module_prefix() -> None:
    device_map = {"": "meta", "transformer.layers.1": "cpu", "transformer.layers.10": "meta"}
    assert store.device_for("transformer.layers.1.mlp.dense_h_to_4h.weight", device_map).type == "cpu"
    assert store.device_for("transformer.layers.10.mlp.dense_h_to_4h.weight", device_map).type == "meta"
    assert store.device_for("transformer.layers.12.mlp.dense_h_to_4h.weight", device_map).type == "meta"
    assert store.device_for("to_logits.1.weight", None) == torch.device("cpu")
    assert store.device_for("to_logits.1.weight", {"transformer": "meta"}) == torch.device("cpu")


# -------------------------------------------------------------------------------------------- ruDALL-E


def test_load_dalle_installs_every_checkpoint_tensor(tiny_model_dir: Path) -> None:
    m = store.load_manifest(tiny_model_dir)
    model = store.load_dalle(m)
    sd = torch.load(m.dalle_checkpoint, weights_only=True)
    params = dict(model.named_parameters())
    assert set(params) == set(sd) - set(MASK_BUFFERS)
    for name, value in params.items():
        assert torch.equal(value, sd[name]), name
        assert not value.requires_grad
    assert not model.training


def test_load_dalle_converts_floating_tensors_to_the_dtype(tiny_model_dir: Path) -> None:
    model = store.load_dalle(store.load_manifest(tiny_model_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.zeros(1, 130, dtype=torch.long)
    with torch.no_grad():
        assert torch.isfinite(model(ids).float()).all()


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_dalle_keeps_fp32_cpu_weights_memory_mapped(tiny_model_dir: Path) -> None:
    # Streaming must not build a second host copy: an fp32 CPU target uses the file's mapped pages.
    m = store.load_manifest(tiny_model_dir)
    model = store.load_dalle(m)
    ranges = file_mappings(m.dalle_checkpoint.resolve())
    assert ranges
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), name


def test_load_dalle_ignores_mask_buffers_present_or_absent(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    sd = torch.load(m.dalle_checkpoint, weights_only=True)
    assert set(MASK_BUFFERS) <= set(sd)  # the tiny file carries them like the published one
    rewrite_checkpoint(m.dalle_checkpoint, lambda obj: [obj.pop(k) for k in MASK_BUFFERS])
    model = store.load_dalle(m)
    assert not any(name.endswith("_mask") for name, _ in model.state_dict().items())


def test_load_dalle_names_a_missing_tensor(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    name = "transformer.layers.2.attention.dense.weight"
    rewrite_checkpoint(m.dalle_checkpoint, lambda obj: obj.pop(name))
    with pytest.raises(ModelStoreError) as err:
        store.load_dalle(m)
    assert f"{m.dalle_checkpoint}: missing tensor '{name}' (expected shape [64, 64])" in str(err.value)


def test_load_dalle_names_an_extra_tensor(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    name = "transformer.layers.4.mystery"
    rewrite_checkpoint(m.dalle_checkpoint, lambda obj: obj.update({name: torch.ones(3)}))
    with pytest.raises(ModelStoreError) as err:
        store.load_dalle(m)
    assert f"{m.dalle_checkpoint}: unexpected tensor '{name}' (shape [3])" in str(err.value)


def test_load_dalle_names_a_mis_shaped_tensor_with_both_shapes(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    name = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    rewrite_checkpoint(m.dalle_checkpoint, lambda obj: obj.update({name: torch.zeros(128, 64)}))
    with pytest.raises(ModelStoreError) as err:
        store.load_dalle(m)
    assert f"{m.dalle_checkpoint}: tensor '{name}' has shape [128, 64], expected [256, 64]" in str(err.value)


def test_load_dalle_rejects_a_config_that_does_not_fit_the_file(model_dir: Path) -> None:
    edit_manifest(model_dir, lambda raw: raw["dalle"].update(num_layers=5))
    m = store.load_manifest(model_dir)
    with pytest.raises(ModelStoreError, match=r"rudalle_tiny\.bin.*missing tensor 'transformer\.layers\.4\."):
        store.load_dalle(m)


# -------------------------------------------------------------------------------------- VQ-GAN, ESRGAN


def test_load_vqgan_ignores_loss_tensors_and_decodes(tiny_model_dir: Path) -> None:
    m = store.load_manifest(tiny_model_dir)
    raw = torch.load(m.vqgan_checkpoint, weights_only=True)["state_dict"]
    assert any(k.startswith("loss.") for k in raw)
    vq = store.load_vqgan(m, "cpu", torch.float32)
    for name, value in vq.state_dict().items():
        assert torch.equal(value, raw[name]), name
    img = vq.decode(torch.arange(1024).remainder(m.vqgan.n_embed).unsqueeze(0))
    assert img.shape == (1, 256, 256, 3) and img.dtype == torch.uint8


def test_load_vqgan_tolerates_a_missing_encoder_tensor(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    rewrite_checkpoint(m.vqgan_checkpoint, lambda obj: obj["state_dict"].pop("encoder.conv_in.weight"))
    store.load_vqgan(m, "cpu", torch.float32)


def test_load_vqgan_names_a_missing_decoder_tensor(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    rewrite_checkpoint(m.vqgan_checkpoint, lambda obj: obj["state_dict"].pop("post_quant_conv.weight"))
    with pytest.raises(ModelStoreError, match=r"vqgan\.tiny\.ckpt: missing tensor 'post_quant_conv\.weight'"):
        store.load_vqgan(m, "cpu", torch.float32)


def quant_conv_bias_7() -> dict[str, torch.Tensor]:
    return {"quant_conv.bias": torch.zeros(7)}


def test_load_vqgan_names_a_mis_shaped_encoder_tensor(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    rewrite_checkpoint(m.vqgan_checkpoint, lambda obj: obj["state_dict"].update(quant_conv_bias_7()))
    with pytest.raises(ModelStoreError, match=r"tensor 'quant_conv\.bias' has shape \[7\], expected \[16\]"):
        store.load_vqgan(m, "cpu", torch.float32)


@pytest.mark.parametrize("wrapper", ["params_ema", "params", None])
def test_load_realesrgan_accepts_every_published_wrapper(model_dir: Path, wrapper: str | None) -> None:
    m = store.load_manifest(model_dir)
    weights = torch.load(m.realesrgan_checkpoint, weights_only=True)["params_ema"]
    torch.save(weights if wrapper is None else {wrapper: weights}, m.realesrgan_checkpoint)
    net = store.load_realesrgan(m, "cpu", torch.float32)
    for name, value in net.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_load_realesrgan_names_a_missing_tensor(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    rewrite_checkpoint(m.realesrgan_checkpoint, lambda obj: obj["params_ema"].pop("conv_last.bias"))
    with pytest.raises(ModelStoreError, match=r"RealESRGAN_x4_tiny\.pth: missing tensor 'conv_last\.bias'"):
        store.load_realesrgan(m, "cpu", torch.float32)


def test_load_tokenizer_names_a_missing_file(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    m.tokenizer.unlink()
    with pytest.raises(ModelStoreError, match=r"bpe\.model"):
        store.load_tokenizer(m)


# ----------------------------------------------------------------------------------------- end to end


def test_tiny_directory_loads_end_to_end(tiny_model_dir: Path) -> None:
    from app.engine.nets.realesrgan import upscale

    m = store.load_manifest(tiny_model_dir)
    tok = store.load_tokenizer(m)
    dalle = store.load_dalle(m, {"": "cpu"})
    vq = store.load_vqgan(m, "cpu", torch.float32)
    esr = store.load_realesrgan(m, "cpu", torch.float32)
    clip = store.load_clip(m, "cpu", torch.float32)

    text = tok.encode("Кот в шляпе", m.dalle.text_seq_length)
    with torch.no_grad():
        logits = dalle(text.unsqueeze(0))  # [1, 128, total_vocab]
    assert logits.shape == (1, 128, m.dalle.vocab_size + m.dalle.image_vocab_size)
    image_probs = logits[0, -1, -m.dalle.image_vocab_size :].softmax(-1)
    assert image_probs.max() < 0.99  # random but not degenerate: sampling has choices

    codes = torch.randint(0, m.dalle.image_vocab_size, (2, 1024), generator=torch.Generator().manual_seed(0))
    pixels = vq.decode(codes)  # [2, 256, 256, 3] uint8
    assert pixels.shape == (2, 256, 256, 3)
    pil = [Image.fromarray(p.numpy()) for p in pixels]
    scores = clip.score(pil, clip.text_latents(["кот в шляпе"])[0])
    assert scores.shape == (2,) and ((scores >= -1) & (scores <= 1)).all()

    small = np.asarray(pil[0].resize((24, 24)))
    big = upscale(esr, small)
    assert big.shape == (96, 96, 3)


def test_mask_buffers_cover_all_three_layer_kinds(tiny_model_dir: Path) -> None:
    from app.engine.nets.dalle import layer_mask_kind

    m = store.load_manifest(tiny_model_dir)
    kinds = collections.Counter(layer_mask_kind(i, m.dalle.num_layers) for i in range(m.dalle.num_layers))
    assert set(kinds) == {"row", "col", "conv"}


# ------------------------------------------------------------------------------ files present at start-up

# A batch no machine holds: placement fails with "does not fit" whenever it is reached, so these tests see
# whether the missing-file check runs first.
UNFITTABLE_BATCH = 10**7


def test_check_files_present_names_every_missing_file_once_and_the_fetch_command(model_dir: Path) -> None:
    m = store.load_manifest(model_dir)
    store.check_files_present(m)  # complete: no error
    gone = [m.dalle_checkpoint, m.ruclip / "config.json"]
    for path in gone:
        path.unlink()
    assert store.missing_files(m) == gone
    with pytest.raises(ModelStoreError) as err:
        store.check_files_present(m)
    msg = str(err.value)
    assert msg.startswith("files not found: ")
    for path in gone:
        assert msg.count(str(path)) == 1
    assert "make weights MODEL=" in msg and "\n" not in msg


@pytest.mark.parametrize("name", store.PUBLISHED_MODELS)
def test_fetch_hint_names_the_make_command_of_a_published_model(model_dir: Path, name: str) -> None:
    edit_manifest(model_dir, lambda raw: raw.update(name=name))
    m = store.load_manifest(model_dir)
    assert f"`make weights MODEL={name}`" in store.fetch_hint(m)
    assert f"python -m app.tools.weights download {name} --dest {m.root}" in store.fetch_hint(m)


def test_manifest_file_paths_are_the_files_the_loaders_and_the_download_use() -> None:
    from app.engine.nets.clip import CLIP_FILES
    from app.tools import weights

    assert set(store.RUCLIP_FILES) == set(CLIP_FILES) == set(weights.RUCLIP_FILES)
    assert store.PUBLISHED_MODELS == weights.MODELS


def test_pipeline_load_reports_a_missing_checkpoint_before_placement(model_dir: Path) -> None:
    from app.engine.pipeline import Pipeline
    from app.engine.placement import PlacementError

    with pytest.raises(PlacementError, match="does not fit"):  # the batch is unfittable indeed
        Pipeline.load(model_dir, device="cpu", max_batch_images=UNFITTABLE_BATCH)
    m = store.load_manifest(model_dir)
    m.vqgan_checkpoint.unlink()
    with pytest.raises(ModelStoreError) as err:
        Pipeline.load(model_dir, device="cpu", max_batch_images=UNFITTABLE_BATCH)
    msg = str(err.value)
    assert msg.startswith(f"file not found: {m.vqgan_checkpoint} ")
    assert "does not fit" not in msg and "make weights MODEL=" in msg


def test_server_start_up_names_the_missing_file_not_the_memory(model_dir: Path) -> None:
    import subprocess
    import sys

    m = store.load_manifest(model_dir)
    m.dalle_checkpoint.unlink()
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "app", "--model_dir", str(model_dir), "--device", "cpu",
         "--max_batch_images", str(UNFITTABLE_BATCH)],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: file not found: {m.dalle_checkpoint} ")
    assert "does not fit" not in out.stderr and "make weights MODEL=" in line
