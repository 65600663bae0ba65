"""A tiny, seeded, random-weight model directory in the exact published file formats.

``python -m app.tools.tiny [PATH]`` (default ``model_store/tiny``) writes ``model.json`` plus:

- ``tokenizer/bpe.model``: a YouTokenToMe BPE model learnt from a few dozen Russian sentences;
- ``rudalle_tiny.bin``: a plain ``torch.save`` dict with ruDALL-E's tensor names, including the three
  attention-mask buffers the published files carry (stored as bool here to keep the file small);
- ``vae/vqgan.tiny.ckpt``: ``{"state_dict": {...}}`` with every taming model tensor (encoder included)
  plus a few ``loss.discriminator.*`` tensors, as a Lightning checkpoint holds them;
- ``x4/RealESRGAN_x4_tiny.pth``: ``{"params_ema": {...}}`` as BasicSR publishes it;
- ``ruclip-tiny/``: ``config.json``, ``pytorch_model.bin``, ``bpe.model`` as the ruclip package reads them.

Images are 256x256 from a 32x32 token grid as in production; everything else is small. The same seed
gives the same tensors.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from app.engine.nets.dalle import MASK_BUFFERS, DalleConfig, build_mask, expected_dalle_tensors
from app.engine.nets.realesrgan import RealESRGANConfig, expected_realesrgan_tensors
from app.engine.nets.vqgan import VQGANConfig, expected_vqgan_tensors

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("model_store/tiny")

# Training text for the tiny BPE: catalog-style queries and plain sentences (lower-case, as queries are).
CORPUS = (
    "кот в шляпе",
    "синий кот",
    "рыжий кот спит на диване",
    "чёрный кот сидит на окне",
    "собака бежит по полю",
    "белая собака в снегу",
    "красная машина на дороге",
    "зелёное дерево у реки",
    "горы на закате",
    "море и небо",
    "осенний лес после дождя",
    "зимний город ночью",
    "дом на берегу озера",
    "портрет девушки в стиле импрессионизма",
    "картина маслом, натюрморт с яблоками",
    "ваза с цветами на столе",
    "космонавт верхом на лошади",
    "ракета летит к луне",
    "звёздное небо над полем",
    "старый замок в тумане",
    "маленький жёлтый цыплёнок",
    "сова сидит на ветке",
    "лиса в зимнем лесу",
    "медведь ловит рыбу",
    "чашка кофе и книга",
    "велосипед у стены",
    "мост через реку",
    "улица с фонарями",
    "поезд едет через мост",
    "бабочка на цветке",
    "корабль в открытом море",
    "пингвин на льдине",
    "акварельный рисунок кота",
    "фото, на котором изображено солнце",
    "изображение с облаками",
    "картинка с собакой",
    "фото с котом",
    "на фото видно горы",
    "авокадо в форме кресла",
    "шахматы на доске",
    "ёжик в тумане",
    "сказочный лес с грибами",
    "девочка с воздушным шаром",
    "кит плывёт в океане",
    "пустыня и верблюды",
)

TEXT_SEQ_LENGTH = 128
TINY_DALLE = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "text_seq_length": TEXT_SEQ_LENGTH,
    "image_tokens_per_dim": 32,
    "hf_version": "v3",
    "cogview_sandwich_layernorm": True,
    "cogview_pb_relax": True,
}
TINY_VQGAN_DDCONFIG = {
    "double_z": False,
    "z_channels": 16,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [32],
    "dropout": 0.0,
}
# Equal to z_channels, as in the Sber file (256 and 256): GumbelQuantize's proj reads quant_conv's
# embed_dim-channel output with z_channels inputs, so only then can the encoder run (image prompts).
TINY_VQGAN_EMBED_DIM = 16
TINY_REALESRGAN = {"scale": 4, "num_feat": 8, "num_block": 1, "num_grow_ch": 4}
TINY_CLIP = {
    "embed_dim": 32,
    "image_resolution": 64,
    "vision_layers": 2,
    "vision_width": 64,  # ruclip uses width // 64 vision heads
    "vision_patch_size": 16,
    "context_length": 77,
    "transformer_width": 64,
    "transformer_heads": 2,
    "transformer_layers": 2,
}

FILES = {
    "tokenizer": "tokenizer/bpe.model",
    "dalle": "rudalle_tiny.bin",
    "vqgan": "vae/vqgan.tiny.ckpt",
    "realesrgan": "x4/RealESRGAN_x4_tiny.pth",
    "ruclip": "ruclip-tiny",
}


def _generator(seed: int, component: str) -> torch.Generator:
    # One stream per component, so changing one component's shapes leaves the others' weights alone.
    digest = hashlib.sha256(f"{seed}:{component}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def _random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, logit_gain: float
) -> torch.Tensor:
    """Seeded values shaped like a trained network's: norms near 1, small biases, fan-in scaled weights."""
    if len(shape) == 1:
        leaf = name.rsplit(".", 1)[-1]
        is_norm_scale = leaf == "weight"  # 1-D weights are LayerNorm/GroupNorm scales
        base = torch.ones(shape) if is_norm_scale else torch.zeros(shape)
        return base + 0.05 * torch.randn(shape, generator=gen)
    if "embed" in name:  # embedding tables and the VQ codebook: O(1) entries
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    gain = logit_gain if name.startswith("to_logits.") else 1.0
    return torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))


def random_state_dict(
    expected: Mapping[str, tuple[int, ...]], gen: torch.Generator, *, logit_gain: float = 1.0
) -> dict[str, torch.Tensor]:
    """Seeded random tensors for every name and shape, in the given order."""
    return {name: _random_tensor(name, tuple(shape), gen, logit_gain) for name, shape in expected.items()}


SPACE = "\u2581"  # YouTokenToMe marks the start of every word with "▁"


def bpe_merges(lines: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[int, int, int]]]:
    """Byte-pair merges learnt from ``lines``, with deterministic tie-breaking.

    YouTokenToMe's trainer breaks frequency ties differently from run to run (observed with
    n_threads=1), so its models are not reproducible; this one picks the most frequent pair, then the
    smallest ids. Returns (char -> id, merges as (left id, right id, new id)); ids 0..3 are PAD, UNK,
    BOS, EOS as in YouTokenToMe.
    """
    words: collections.Counter[str] = collections.Counter()
    for line in lines:
        words.update(SPACE + w for w in line.split())
    char_counts: collections.Counter[str] = collections.Counter()
    for word, n in words.items():
        for ch in word:
            char_counts[ch] += n
    chars = sorted(char_counts, key=lambda c: (-char_counts[c], ord(c)))
    char_ids = {c: 4 + i for i, c in enumerate(chars)}
    seqs = [([char_ids[c] for c in word], n) for word, n in sorted(words.items())]
    merges: list[tuple[int, int, int]] = []
    next_id = 4 + len(chars)
    while next_id < vocab_size:
        pairs: collections.Counter[tuple[int, int]] = collections.Counter()
        for seq, n in seqs:
            for pair in zip(seq, seq[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((best[0], best[1], next_id))
        for seq, _ in seqs:
            i = 0
            while i < len(seq) - 1:
                if (seq[i], seq[i + 1]) == best:
                    seq[i : i + 2] = [next_id]
                i += 1
        next_id += 1
    return char_ids, merges


def train_bpe(path: Path, vocab_size: int) -> int:
    """Write a YouTokenToMe BPE model learnt from ``CORPUS`` to ``path``; returns its vocabulary size.

    The file is YouTokenToMe's own model format (read back with ``yttm.BPE``): a header with the
    character and merge counts, one ``codepoint id`` line per character, one ``left right new`` line per
    merge, then the special ids ``unk pad bos eos``.
    """
    import youtokentome as yttm

    char_ids, merges = bpe_merges(CORPUS, vocab_size)
    lines = [f"{len(char_ids)} {len(merges)}"]
    lines += [f"{ord(c)} {i}" for c, i in char_ids.items()]
    lines += [f"{a} {b} {c}" for a, b, c in merges]
    lines.append("1 0 2 3")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return int(yttm.BPE(model=str(path)).vocab_size())


def _write_clip(folder: Path, bpe_model: Path, vocab_size: int, seed: int) -> dict[str, int]:
    from app.engine.nets.clip import build_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = {**TINY_CLIP, "vocab_size": vocab_size}
    ordered = {k: config[k] for k in sorted(config)}
    (folder / "config.json").write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:ruclip".encode()).digest()[:8], "little"))
        model = build_clip(config)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    shutil.copyfile(bpe_model, folder / "bpe.model")
    return config


def build_tiny_model_dir(
    path: str | Path,
    seed: int = 0,
    *,
    hf_version: str = "v3",
    bpe_vocab_size: int = 256,
    image_vocab_size: int = 64,
    name: str = "tiny",
    num_layers: int | None = None,
    hidden_size: int | None = None,
) -> Path:
    """Write the tiny model directory at ``path`` and return it (overwrites the files it writes).

    ``num_layers``, ``hidden_size`` and ``image_vocab_size`` make a wider generated model in the same
    formats (e.g. 8 layers, hidden 256 and Kandinsky's 8192 codes, for batching and invariance checks).
    """
    started = time.perf_counter()
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)

    bpe_path = root / FILES["tokenizer"]
    bpe_vocab = train_bpe(bpe_path, bpe_vocab_size)

    dalle_block: dict[str, Any] = {
        "checkpoint": FILES["dalle"],
        **TINY_DALLE,
        **({"num_layers": num_layers} if num_layers else {}),
        **({"hidden_size": hidden_size} if hidden_size else {}),
        "vocab_size": bpe_vocab + TEXT_SEQ_LENGTH,  # BPE ids, then one pad id per position
        "image_vocab_size": image_vocab_size,
        "hf_version": hf_version,
    }
    dalle_cfg = DalleConfig.from_manifest(dalle_block)
    dalle_sd = random_state_dict(expected_dalle_tensors(dalle_cfg), _generator(seed, "dalle"), logit_gain=2.0)
    # The published files carry upstream's mask buffers; they are ignored by the loader but must be accepted.
    for buffer in MASK_BUFFERS:  # "transformer.row_mask" -> "row"
        kind = buffer.rsplit(".", 1)[1].removesuffix("_mask")
        dalle_sd[buffer] = build_mask(kind, dalle_cfg)  # type: ignore[arg-type]  # [S, S] bool
    torch.save(dalle_sd, root / FILES["dalle"])

    vqgan_block: dict[str, Any] = {
        "checkpoint": FILES["vqgan"],
        "embed_dim": TINY_VQGAN_EMBED_DIM,
        "n_embed": image_vocab_size,
        "ddconfig": dict(TINY_VQGAN_DDCONFIG),
    }
    vqgan_cfg = VQGANConfig.from_manifest(vqgan_block)
    vqgan_gen = _generator(seed, "vqgan")
    vqgan_sd = random_state_dict(expected_vqgan_tensors(vqgan_cfg), vqgan_gen)
    # A Lightning checkpoint of taming's GumbelVQ also holds the loss module's discriminator.
    vqgan_sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=vqgan_gen)
    vqgan_sd["loss.discriminator.main.0.bias"] = torch.zeros(8)
    vqgan_sd["loss.logvar"] = torch.zeros(())
    (root / FILES["vqgan"]).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": vqgan_sd}, root / FILES["vqgan"])

    esr_block: dict[str, Any] = {"checkpoint": FILES["realesrgan"], **TINY_REALESRGAN}
    esr_cfg = RealESRGANConfig.from_manifest(esr_block)
    esr_sd = random_state_dict(expected_realesrgan_tensors(esr_cfg), _generator(seed, "realesrgan"))
    (root / FILES["realesrgan"]).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": esr_sd}, root / FILES["realesrgan"])

    _write_clip(root / FILES["ruclip"], bpe_path, bpe_vocab, seed)

    manifest = {
        "name": name,
        "description": "Tiny random-weight ruDALL-E for tests and local runs (produces noise, not art).",
        "license": "Apache-2.0",
        "version": "0.0.1",
        "seed": seed,
        "dalle": dalle_block,
        "tokenizer": {"path": FILES["tokenizer"]},
        "vqgan": vqgan_block,
        "realesrgan": esr_block,
        "ruclip": {"path": FILES["ruclip"]},
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    (root / "model.json").write_text(text, encoding="utf-8")
    log.info("tiny model directory written to %s in %.1f s", root, time.perf_counter() - started)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.tools.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT_DIR), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-version", choices=("v2", "v3"), default="v3")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default 4)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 64)")
    parser.add_argument("--image-vocab", type=int, default=64, help="image codes (Kandinsky: 8192)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_tiny_model_dir(args.path, args.seed, hf_version=args.hf_version, image_vocab_size=args.image_vocab,
                         num_layers=args.layers, hidden_size=args.hidden)
    return 0


if __name__ == "__main__":
    sys.exit(main())
