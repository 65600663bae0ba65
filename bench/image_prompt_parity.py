"""Image-prompt parity (not a test): our `prompt_codes` against the real ruDALL-E 1.1.3 ``ImagePrompts``.

    .venv/bin/python bench/image_prompt_parity.py                  # tiny model's VQ-GAN, built in a temp dir
    .venv/bin/python bench/image_prompt_parity.py --vqgan sber     # the Sber VQ-GAN's shapes, random weights
    .venv/bin/python bench/image_prompt_parity.py --model_dir model_store/tiny --out out/parity.json

Both sides get the same VQ-GAN weights: the model directory's checkpoint (the tiny model's random
weights unless ``--model_dir`` says otherwise; ``--vqgan sber`` swaps in random weights of the published
Sber VQ-GAN's architecture, f8 with ``ch_mult`` 1,1,2,4 and 8192 codes, which is slow on a CPU, so it
runs the smooth image only). Ours loads the encoder with
``app.engine.store.load_vqgan_encoder``; upstream builds its own ``VQGanGumbelVAE`` (``rudalle/vae/model.py``
of ``rudalle==1.1.3``, on taming-transformers' ``Encoder``) and loads the same ``state_dict`` with
``load_state_dict`` as its ``get_vae`` does (every model tensor present; only loss tensors left over).
For several images, border sets and ``crop_first`` both ways, upstream's ``ImagePrompts`` gives
``image_prompts_idx`` (the forced positions) and ``image_prompts`` (the codes); ours must force exactly
those positions with exactly those codes. Exit status 1 on any difference.

Upstream comes from ``.venv-bench`` (``bench/upstream.py`` installs rudalle there with ``--no-deps``);
this script adds ``taming-transformers==0.0.1`` the same way. ``rudalle/vae/__init__.py`` would pull in
the hub client and OmegaConf, and ``decoder_dwt.py`` PyWavelets (only for ``dwt=True``), so
``rudalle`` and ``rudalle.vae`` are registered as bare packages and ``decoder_dwt`` as a stub; only
``rudalle/vae/model.py`` and ``rudalle/image_prompts.py`` run, unchanged. Nothing is copied here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Run as a script: make the repository root importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.engine import store  # noqa: E402
from app.engine.image_prompt import BORDER_SIDES, SAMPLE, prompt_codes  # noqa: E402
from app.engine.nets.vqgan import VQGAN_PRESETS, expected_vqgan_tensors  # noqa: E402
from app.tools.tiny import _generator, build_tiny_model_dir, random_state_dict  # noqa: E402
from bench.upstream import ENV_DIR, _package, ensure_installed  # noqa: E402

TAMING_PIN = "taming-transformers==0.0.1"

BORDER_SETS: tuple[dict[str, int], ...] = (
    {"up": 4},
    {"down": 8},
    {"left": 3},
    {"right": 5},
    {"up": 2, "left": 2},
    {"down": 7, "right": 9},
    {"up": 10, "down": 6, "left": 4, "right": 7},
    {"left": 16, "right": 15},
    {"up": 31},
    {"up": 1, "down": 1, "left": 1, "right": 1},
)


class _AttrDict(dict):  # what OmegaConf gives upstream: both config.key and **config work
    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc


def _ensure_taming(env: Path) -> None:
    if not (env / "taming" / "modules" / "diffusionmodules" / "model.py").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(env),
               TAMING_PIN]
        print(f"installing {TAMING_PIN} for the benchmark: {' '.join(cmd)}", file=sys.stderr)
        subprocess.run(cmd, check=True)


def load_upstream(env: Path = ENV_DIR) -> tuple[Any, Any]:
    """Upstream's ``VQGanGumbelVAE`` and ``ImagePrompts`` classes, imported from their installed files."""
    ensure_installed(env)
    _ensure_taming(env)
    if str(env) not in sys.path:
        sys.path.append(str(env))  # taming and einops; appended, so nothing of .venv is shadowed
    _package("rudalle", env / "rudalle")
    _package("rudalle.vae", env / "rudalle" / "vae")
    if "rudalle.vae.decoder_dwt" not in sys.modules:
        stub = types.ModuleType("rudalle.vae.decoder_dwt")

        class DecoderDWT:  # dwt=False never builds it
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise RuntimeError("the DWT decoder is not part of this benchmark")

        stub.DecoderDWT = DecoderDWT  # type: ignore[attr-defined]
        sys.modules["rudalle.vae.decoder_dwt"] = stub
    vae_model = importlib.import_module("rudalle.vae.model")
    prompts = importlib.import_module("rudalle.image_prompts")
    return vae_model.VQGanGumbelVAE, prompts.ImagePrompts


def upstream_vae(vae_cls: Any, manifest: store.Manifest) -> Any:
    dd = manifest.vqgan.ddconfig
    ddconfig = _AttrDict(
        double_z=dd.double_z, z_channels=dd.z_channels, resolution=dd.resolution, in_channels=dd.in_channels,
        out_ch=dd.out_ch, ch=dd.ch, ch_mult=list(dd.ch_mult), num_res_blocks=dd.num_res_blocks,
        attn_resolutions=list(dd.attn_resolutions), dropout=dd.dropout,
    )
    params = _AttrDict(ddconfig=ddconfig, n_embed=manifest.vqgan.n_embed, embed_dim=manifest.vqgan.embed_dim,
                       kl_weight=1e-8)
    vae = vae_cls(_AttrDict(model=_AttrDict(params=params)), dwt=False)
    sd = torch.load(manifest.vqgan_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    result = vae.model.load_state_dict(sd, strict=False)  # as rudalle's get_vae
    if result.missing_keys:
        raise SystemExit(f"upstream VQ-GAN: tensors missing from the checkpoint: {result.missing_keys[:5]}")
    stray = [k for k in result.unexpected_keys if not k.startswith("loss.")]
    if stray:
        raise SystemExit(f"upstream VQ-GAN: tensors it does not know: {stray[:5]}")
    return vae.eval()


def test_images(side: int) -> dict[str, Image.Image]:
    """Seeded images: noise, smooth gradients with shapes, and one that needs the bicubic resize."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:side, 0:side] / side
    smooth = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy)], axis=-1)
    smooth[(xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.05] = (0.9, 0.2, 0.1)
    smooth_u8 = (smooth * 255).astype(np.uint8)
    odd = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).convert("RGBA")
    return {"noise": Image.fromarray(noise), "smooth": Image.fromarray(smooth_u8), "rgba-300x200": odd}


def sber_shaped_model_dir(root: Path) -> Path:
    """The tiny model directory with the VQ-GAN replaced by random weights of the Sber architecture."""
    cfg = VQGAN_PRESETS["sber-gumbelf8"]
    build_tiny_model_dir(root, seed=0, image_vocab_size=cfg.n_embed)
    sd = random_state_dict(expected_vqgan_tensors(cfg), _generator(0, "vqgan-sber"))
    checkpoint = "vae/vqgan.sber-shaped.ckpt"
    torch.save({"state_dict": sd}, root / checkpoint)
    manifest = json.loads((root / "model.json").read_text())
    dd = cfg.ddconfig
    manifest["vqgan"] = {
        "checkpoint": checkpoint, "embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed,
        "ddconfig": {"double_z": dd.double_z, "z_channels": dd.z_channels, "resolution": dd.resolution,
                     "in_channels": dd.in_channels, "out_ch": dd.out_ch, "ch": dd.ch,
                     "ch_mult": list(dd.ch_mult), "num_res_blocks": dd.num_res_blocks,
                     "attn_resolutions": list(dd.attn_resolutions), "dropout": dd.dropout},
    }
    (root / "model.json").write_text(json.dumps(manifest, indent=2))
    return root


def compare(manifest: store.Manifest, verbose: bool, images: tuple[str, ...] | None = None) -> dict[str, Any]:
    vae_cls, image_prompts_cls = load_upstream()
    theirs = upstream_vae(vae_cls, manifest)
    ours = store.load_vqgan_encoder(manifest, "cpu", torch.float32)
    t = manifest.dalle.image_tokens_per_dim
    side = t * ours.downsample_factor
    cases, failures = [], []
    for name, image in test_images(side).items():
        if images is not None and name not in images:
            continue
        # Upstream takes the image as given; the caller (its notebooks) resizes to 256x256 first.
        given = image.convert("RGB")
        if given.size != (side, side):
            given = given.resize((side, side), Image.Resampling.BICUBIC)
        for crop_first in (False, True):
            for partial in BORDER_SETS:
                borders = {s: partial.get(s, 0) for s in BORDER_SIDES}
                started = time.perf_counter()
                up = image_prompts_cls(given, borders, theirs, device="cpu", crop_first=crop_first)
                t_up = time.perf_counter() - started
                started = time.perf_counter()
                codes = prompt_codes(ours, image, borders, crop_first, t)
                t_ours = time.perf_counter() - started
                up_idx = sorted(int(i) for i in up.image_prompts_idx)
                our_idx = torch.nonzero(codes != SAMPLE).flatten().tolist()
                up_codes = up.image_prompts[0, up_idx].long()
                same_idx = our_idx == up_idx
                same_codes = same_idx and torch.equal(codes[our_idx], up_codes)
                case: dict[str, Any] = {
                    "image": name, "crop_first": crop_first, "borders": partial, "forced": len(up_idx),
                    "distinct_codes": int(up_codes.unique().numel()), "positions_equal": same_idx,
                    "codes_equal": same_codes, "seconds_upstream": round(t_up, 3),
                    "seconds_ours": round(t_ours, 3),
                }
                if not same_codes:
                    diff = (codes[up_idx] != up_codes).sum().item() if same_idx else None
                    case["codes_differing"] = diff
                    failures.append(case)
                cases.append(case)
                if verbose:
                    print(json.dumps(case, ensure_ascii=False))
    return {
        "upstream": "rudalle==1.1.3 ImagePrompts + VQGanGumbelVAE (taming-transformers==0.0.1 Encoder)",
        "model_dir": str(manifest.root), "tokens_per_dim": t, "n_embed": manifest.vqgan.n_embed,
        "cases": len(cases), "failures": len(failures), "failed_cases": failures,
        "distinct_codes_min": min(c["distinct_codes"] for c in cases),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "results": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="model directory (default: a tiny one built in a temp dir)")
    parser.add_argument("--vqgan", choices=("tiny", "sber"), default="tiny",
                        help="without --model_dir: the tiny VQ-GAN, or random weights of Sber's architecture")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        images: tuple[str, ...] | None = None
        if args.model_dir:
            model_dir = Path(args.model_dir)
        elif args.vqgan == "sber":
            model_dir, images = sber_shaped_model_dir(Path(tmp) / "sber-shaped"), ("smooth",)
        else:
            model_dir = build_tiny_model_dir(Path(tmp) / "tiny", seed=0)
        report = compare(store.load_manifest(model_dir), args.verbose, images)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"{report['cases']} cases (images x {len(BORDER_SETS)} border sets x crop_first on/off): "
          f"{report['cases'] - report['failures']} equal, {report['failures']} differ; "
          f"fewest distinct forced codes in a case: {report['distinct_codes_min']}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
