from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from app.engine import store
from app.engine.nets.dalle import MASK_BUFFERS
from app.tools.tiny import build_tiny_model_dir, main


def checkpoint_tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    m = store.load_manifest(root)
    return {
        "dalle": torch.load(m.dalle_checkpoint, weights_only=True),
        "vqgan": torch.load(m.vqgan_checkpoint, weights_only=True)["state_dict"],
        "realesrgan": torch.load(m.realesrgan_checkpoint, weights_only=True)["params_ema"],
        "ruclip": torch.load(m.ruclip / "pytorch_model.bin", weights_only=True),
    }


@pytest.fixture(scope="module")
def second_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    started = time.perf_counter()
    root = build_tiny_model_dir(tmp_path_factory.mktemp("again"), seed=0)
    return root, time.perf_counter() - started


def test_same_seed_gives_identical_tensors_and_tokenizer(tiny_model_dir: Path, second_build) -> None:
    again, _ = second_build
    a, b = checkpoint_tensors(tiny_model_dir), checkpoint_tensors(again)
    for component in a:
        assert a[component].keys() == b[component].keys(), component
        for name in a[component]:
            assert torch.equal(a[component][name], b[component][name]), (component, name)
    for rel in ("tokenizer/bpe.model", "ruclip-tiny/bpe.model", "ruclip-tiny/config.json"):
        assert (tiny_model_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (tiny_model_dir / "model.json").read_text() == (again / "model.json").read_text()


def test_another_seed_gives_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = checkpoint_tensors(build_tiny_model_dir(tmp_path, seed=1))
    base = checkpoint_tensors(tiny_model_dir)
    for component in base:
        name = next(n for n, t in base[component].items() if t.is_floating_point() and t.dim() >= 2)
        assert not torch.equal(base[component][name], other[component][name]), component


def test_build_is_small_and_quick(second_build) -> None:
    root, seconds = second_build
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 20 * 2**20
    assert seconds < 15


def test_files_use_the_published_layouts(tiny_model_dir: Path) -> None:
    m = store.load_manifest(tiny_model_dir)
    dalle = torch.load(m.dalle_checkpoint, weights_only=True)
    assert set(MASK_BUFFERS) <= set(dalle)
    s = m.dalle.text_seq_length + m.dalle.image_seq_length
    assert all(dalle[k].shape == (s, s) for k in MASK_BUFFERS)
    assert "text_embeddings.weight" in dalle and "to_logits.1.weight" in dalle
    assert set(torch.load(m.vqgan_checkpoint, weights_only=True)) == {"state_dict"}
    vq = torch.load(m.vqgan_checkpoint, weights_only=True)["state_dict"]
    assert any(k.startswith("encoder.") for k in vq) and "quantize.proj.weight" in vq
    assert any(k.startswith("loss.discriminator.") for k in vq)
    assert set(torch.load(m.realesrgan_checkpoint, weights_only=True)) == {"params_ema"}
    config = json.loads((m.ruclip / "config.json").read_text())
    assert set(config) == {
        "embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
        "context_length", "vocab_size", "transformer_width", "transformer_heads", "transformer_layers",
    }


def test_production_shaped_sequence_and_vocabulary(tiny_model_dir: Path) -> None:
    m = store.load_manifest(tiny_model_dir)
    tok = store.load_tokenizer(m)
    assert (m.dalle.text_seq_length, m.dalle.image_tokens_per_dim) == (128, 32)
    assert m.vqgan.ddconfig.resolution == 256 and len(m.vqgan.ddconfig.ch_mult) == 4
    assert m.dalle.vocab_size == tok.vocab_size + m.dalle.text_seq_length
    assert m.dalle.image_vocab_size == m.vqgan.n_embed
    # the catalog example queries are covered by real BPE pieces, not UNK (id 1)
    assert 1 not in tok.encode("Кот в шляпе, синий кот", 128).tolist()


def test_cli_writes_a_loadable_directory(tmp_path: Path) -> None:
    assert main([str(tmp_path / "cli"), "--seed", "2", "--hf-version", "v2"]) == 0
    m = store.load_manifest(tmp_path / "cli")
    assert m.dalle.hf_version == "v2" and m.extra["seed"] == 2
    store.load_dalle(m)
