from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ruclip
import torch
from PIL import Image

from app.engine.nets.clip import ClipRanker, expected_clip_tensors, read_clip_config
from app.engine.store import ModelStoreError

TEMPLATES = [
    "{}",
    "фото, на котором изображено {}",
    "изображение с {}",
    "картинка с {}",
    "фото с {}",
    "на фото видно {}",
]


@pytest.fixture(scope="module")
def clip_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "ruclip-tiny"


@pytest.fixture(scope="module")
def ranker(clip_dir: Path) -> ClipRanker:
    return ClipRanker.load(clip_dir, "cpu", batch_size=4)


@pytest.fixture(scope="module")
def reference(clip_dir: Path) -> tuple[ruclip.CLIP, ruclip.RuCLIPProcessor]:
    """The package's own model and processor, built without our loader."""
    config = json.loads((clip_dir / "config.json").read_text())
    model = ruclip.CLIP(**{k: config[k] for k in read_clip_config(clip_dir)})
    model.load_state_dict(torch.load(clip_dir / "pytorch_model.bin", weights_only=True))
    return model.eval(), ruclip.RuCLIPProcessor.from_pretrained(str(clip_dir))


def images(n: int, seed: int = 0, size: int = 256) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_text_latents_follow_the_ruclip_predictor_recipe(ranker: ClipRanker, reference) -> None:
    model, processor = reference
    queries = ["  Кот В Шляпе ", "синий кот"]
    with torch.no_grad():
        per_template = []
        for template in TEMPLATES:
            texts = [template.format(q.lower().strip()) for q in queries]
            per_template.append(model.encode_text(processor(text=texts, return_tensors="pt")["input_ids"]))
        mean = torch.stack(per_template).mean(0)  # [Q, D]
        expected = mean / mean.norm(dim=-1, keepdim=True)
    got = ranker.text_latents(queries)
    assert got.shape == (2, ranker.embed_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))


def test_score_is_cosine_of_processed_image_and_text_latents(ranker: ClipRanker, reference) -> None:
    model, processor = reference
    imgs = images(5)
    text = ranker.text_latents(["синий кот"])[0]
    with torch.no_grad():
        pixels = processor(text="", images=imgs, return_tensors="pt")["pixel_values"]
        lat = model.encode_image(pixels)
        expected = torch.nn.functional.cosine_similarity(lat, text.unsqueeze(0), dim=-1)
    scores = ranker.score(imgs, text)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert ((scores >= -1) & (scores <= 1)).all()
    assert scores.unique().numel() == 5  # different images, different scores


def test_score_does_not_depend_on_batching(ranker: ClipRanker) -> None:
    imgs = images(9, seed=1)
    text = ranker.text_latents(["собака"])[0]
    together = ranker.score(imgs, text)  # batches of 4, 4, 1
    alone = torch.cat([ranker.score([im], text) for im in imgs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_score_leaves_the_global_rng_alone(ranker: ClipRanker) -> None:
    text = ranker.text_latents(["кот"])[0]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ranker.score(images(2), text)
    assert torch.equal(torch.rand(3), expected)


def test_score_of_no_images_is_empty(ranker: ClipRanker) -> None:
    assert ranker.score([], ranker.text_latents(["кот"])[0]).shape == (0,)


def test_score_rejects_a_text_latent_of_the_wrong_size(ranker: ClipRanker) -> None:
    with pytest.raises(ValueError, match="text_latent"):
        ranker.score(images(1), torch.ones(ranker.embed_dim + 1))


def test_bfloat16_ranker_is_close_to_fp32(clip_dir: Path, ranker: ClipRanker) -> None:
    half = ClipRanker.load(clip_dir, "cpu", torch.bfloat16)
    imgs = images(2, seed=3)
    text = ranker.text_latents(["кот"])[0]
    torch.testing.assert_close(half.text_latents(["кот"])[0], text, atol=0.05, rtol=0)
    torch.testing.assert_close(half.score(imgs, text), ranker.score(imgs, text), atol=0.05, rtol=0)


def test_expected_tensors_match_the_saved_folder(clip_dir: Path) -> None:
    sd = torch.load(clip_dir / "pytorch_model.bin", weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_clip_tensors(read_clip_config(clip_dir))


def test_load_names_a_missing_weight_tensor(clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del sd["visual.proj"]
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(ModelStoreError, match=r"pytorch_model\.bin.*missing tensor 'visual\.proj'"):
        ClipRanker.load(folder)


def test_load_names_a_missing_config_key(clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["vision_patch_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelStoreError, match=r"config\.json.*'vision_patch_size'"):
        ClipRanker.load(folder)


def test_load_names_a_missing_file(clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    (folder / "bpe.model").unlink()
    with pytest.raises(ModelStoreError, match=r"bpe\.model"):
        ClipRanker.load(folder)
