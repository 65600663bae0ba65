"""Image-prompt parity (not a test): ours against ruDALL-E 1.1.3's ``ImagePrompts`` and ``generate_images``.

    .venv/bin/python bench/image_prompt_parity.py                  # tiny model's VQ-GAN, built in a temp dir
    .venv/bin/python bench/image_prompt_parity.py --vqgan sber     # the Sber VQ-GAN's shapes, random weights
    .venv/bin/python bench/image_prompt_parity.py --model_dir model_store/tiny --out out/parity.json
    .venv/bin/python bench/image_prompt_parity.py --mode generate  # whole image completion, greedy
    .venv/bin/python bench/image_prompt_parity.py --mode all --out out/image-prompt-parity.json

``--mode prompts`` (the default) checks the forced codes alone, ``--mode generate`` the whole image
completion (below), ``--mode all`` both.

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

Generate mode: image completion end to end, greedy (``top_k=1``), on the model directory's weights.
Upstream is its own ``rudalle.pipelines.generate_images(query, tokenizer, dalle, vae, top_k=1, ...,
image_prompts=ImagePrompts(...), seed=...)``, unchanged, with its own ``YTTMTokenizerWrapper``
(``rudalle.tokenizer.get_tokenizer(path)`` on the directory's ``bpe.model``), its ``DalleModel`` loaded
strictly from the directory's checkpoint (``bench/decode.py``'s ``load_upstream_model``) and the
``VQGanGumbelVAE`` above. ``generate_images`` runs upstream's loop: forced positions appended without a
forward pass, the cache then catching up on them. To import ``rudalle/pipelines.py`` unchanged, the bare
``transformers`` package of ``bench/upstream.py`` gets the real 4.10.2 ``top_k_top_p_filtering`` as
its attribute (what ``transformers/__init__`` exports), and ``matplotlib``, which only its ``show``
uses, is a stub while the module is imported. ``generate_images`` keeps its codes to itself, so the VAE
it is given records what it is asked to decode (and then decodes it with the real one).

Ours is ``Pipeline.load(model_dir)``: ``pipeline.decoder.generate([pipeline._request(job)])`` for the
codes in generation order, ``pipeline.vqgan.decode`` for their pixels, and ``pipeline.run`` for what a
client gets (PNG, so pixels compare exactly; ``codes`` and images ranked by ruCLIP, so compared as
multisets). Per job, all must hold: the same text ids from both tokenizers; codes equal at every one
of the 1024 positions for every image; ``run``'s codes and PNG pixels the multiset of upstream's;
``vqgan.decode`` pixels equal to upstream's ``vae.decode`` images (``to_pil_image`` as upstream's
``utils.torch_tensors_to_pil_list``). Jobs: four border sets with ``crop_first`` both ways on the
smooth image, the notebook's borders on the 300x200 RGBA one (ours resizes it, upstream is handed it
resized), a plain request, and two batches, a plain job with one image-prompt job and a plain job
between two (each job compared with upstream run alone). ``--vqgan sber`` keeps the smooth image only.
A control must differ: the first prompted job without its prompt, against upstream's completion, at
sampled positions (so equal codes cannot come from a prompt both sides ignore).

``ppl`` is reported, not required equal: upstream's averages ``exp(CE)`` over image positions 1..1023
from a second forward pass, forced positions included; our decoder averages over the sampled
positions only (its ``generate`` docstring). So each job also gets upstream's formula over the
positions ours samples, computed with upstream's model on upstream's codes (must agree to 1e-4,
relative), and a plain job's ppl must agree with upstream's own.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Run as a script: make the repository root importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.engine import store  # noqa: E402
from app.engine.image_prompt import BORDER_SIDES, SAMPLE, prompt_codes  # noqa: E402
from app.engine.jobs import Job, JobResult  # noqa: E402
from app.engine.nets.vqgan import VQGAN_PRESETS, expected_vqgan_tensors  # noqa: E402
from app.engine.params import DEFAULT_TOP_P, GenerationParams, ImagePrompt  # noqa: E402
from app.engine.pipeline import Pipeline  # noqa: E402
from app.tools.tiny import _generator, build_tiny_model_dir, random_state_dict  # noqa: E402
from bench.decode import load_upstream_model  # noqa: E402
from bench.upstream import ENV_DIR, _package, ensure_installed  # noqa: E402
from bench.upstream import load as load_upstream_dalle  # noqa: E402

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


# ----------------------------------------------------------------------------------- generate mode

#: Border sets of the generate mode: the Kandinsky notebook's, single bands, all four sides.
GENERATE_BORDERS: tuple[dict[str, int], ...] = (
    {"up": 4},
    {"up": 5, "left": 8, "right": 8},
    {"down": 6, "right": 3},
    {"up": 10, "down": 6, "left": 4, "right": 7},
)
PROMPT_QUERY = "синий кот сидит на окне"
PLAIN_QUERY = "горы на закате"
IMAGES_PER_JOB = 2
PPL_RTOL = 1e-4


@dataclass(frozen=True)
class Spec:
    """One job of the generate mode; ``image`` None is a plain text-to-image request."""

    query: str
    seed: int
    image: str | None = None
    borders: tuple[tuple[str, int], ...] = ()
    crop_first: bool = False

    def label(self) -> str:
        if self.image is None:
            return "plain"
        sides = ",".join(f"{k}={v}" for k, v in self.borders if v)
        return f"{self.image} {{{sides}}}{' crop_first' if self.crop_first else ''}"


@dataclass
class UpstreamPipeline:
    """What ``generate_images`` is given upstream, built from the model directory's files."""

    generate_images: Any  # rudalle.pipelines.generate_images
    tokenizer: Any  # rudalle.tokenizer.YTTMTokenizerWrapper
    dalle: Any  # rudalle.dalle.model.DalleModel
    vae: Any  # rudalle.vae.model.VQGanGumbelVAE
    image_prompts_cls: Any  # rudalle.image_prompts.ImagePrompts
    to_pil_list: Any  # rudalle.utils.torch_tensors_to_pil_list
    masks_equal: bool


class _RecordingVAE:
    """Upstream's VQ-GAN as ``generate_images`` sees it: it keeps the codes it is asked to decode and
    the real ``decode``'s output (``generate_images`` returns neither, only PIL images sorted by ppl)."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.codes: list[torch.Tensor] = []
        self.decoded: list[torch.Tensor] = []

    def decode(self, img_seq: torch.Tensor) -> torch.Tensor:
        self.codes.append(img_seq.detach().clone())
        out = self.vae.decode(img_seq)
        self.decoded.append(out.detach().clone())
        return out


def load_upstream_pipeline(manifest: store.Manifest, env: Path = ENV_DIR) -> UpstreamPipeline:
    """Upstream's generate_images with its tokenizer, DalleModel and VQ-GAN on the directory's files."""
    up = load_upstream_dalle(env)  # DalleModel + transformers 4.10.2's top_k_top_p_filtering
    vae_cls, image_prompts_cls = load_upstream(env)
    # pipelines.py calls transformers.top_k_top_p_filtering: the bare package gets the real function.
    sys.modules["transformers"].top_k_top_p_filtering = up.top_k_top_p_filtering  # type: ignore[attr-defined]
    stubs: list[str] = []
    if importlib.util.find_spec("matplotlib") is None:  # only pipelines.show plots
        mpl = types.ModuleType("matplotlib")
        mpl.__path__ = []
        sys.modules["matplotlib"] = mpl
        sys.modules["matplotlib.pyplot"] = types.ModuleType("matplotlib.pyplot")
        stubs = ["matplotlib.pyplot", "matplotlib"]
    try:
        pipelines = importlib.import_module("rudalle.pipelines")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    tokenizer_mod = importlib.import_module("rudalle.tokenizer")
    utils = importlib.import_module("rudalle.utils")
    tokenizer = tokenizer_mod.get_tokenizer(str(manifest.tokenizer))
    dalle, masks_equal = load_upstream_model(up, manifest.dalle, manifest.dalle_checkpoint)
    return UpstreamPipeline(pipelines.generate_images, tokenizer, dalle, upstream_vae(vae_cls, manifest),
                            image_prompts_cls, utils.torch_tensors_to_pil_list, masks_equal)


def _given_image(image: Image.Image, side: int) -> Image.Image:
    """What upstream's ImagePrompts is handed: RGB, resized to the model's size as its notebooks do."""
    given = image.convert("RGB")
    if given.size != (side, side):
        given = given.resize((side, side), Image.Resampling.BICUBIC)
    return given


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pixels_of_b64(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return np.array(im.convert("RGB"))


def _multiset(arrays: Sequence[np.ndarray] | Sequence[list[int]]) -> list[bytes]:
    return sorted(np.asarray(a).tobytes() for a in arrays)


def upstream_run(upp: UpstreamPipeline, spec: Spec, image: Image.Image | None, side: int) -> dict[str, Any]:
    """One ``generate_images`` call: codes [n, seq] and pixels in generation order, returned images, ppl."""
    prompts = forced_idx = None
    if spec.image is not None:
        assert image is not None
        prompts = upp.image_prompts_cls(_given_image(image, side), dict(spec.borders), upp.vae, device="cpu",
                                        crop_first=spec.crop_first)
        forced_idx = sorted(int(i) for i in prompts.image_prompts_idx)
    rec = _RecordingVAE(upp.vae)
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar over the 1024 steps
        pil_images, ppl = upp.generate_images(spec.query, upp.tokenizer, upp.dalle, rec, top_k=1,
                                              top_p=DEFAULT_TOP_P, images_num=IMAGES_PER_JOB,
                                              image_prompts=prompts, temperature=1.0, bs=8, seed=spec.seed,
                                              use_cache=True)
    seconds = time.perf_counter() - started
    codes = torch.cat(rec.codes).long()  # [n, seq], generation order
    decoded = [np.array(im) for im in upp.to_pil_list(torch.cat(rec.decoded))]
    returned = [np.array(im) for im in pil_images]  # sorted by upstream's ppl
    return {"codes": codes, "pixels": decoded, "returned": returned, "ppl": list(ppl), "seconds": seconds,
            "forced_idx": forced_idx,
            "forced_codes": None if prompts is None else prompts.image_prompts[0].long()}


def upstream_ppl(upp: UpstreamPipeline, spec: Spec, codes: torch.Tensor,
                 sampled: torch.Tensor) -> list[float]:
    """Upstream's ppl formula (``generate_images``' second forward, ``ce_to_ppl``) with upstream's model,
    averaged over the positions 1.. that ``sampled`` [seq] marks instead of all of them."""
    d = upp.dalle
    vocab, text_len = d.get_param("vocab_size"), d.get_param("text_seq_length")
    seq = d.get_param("image_seq_length")
    ids = upp.tokenizer.encode_text(spec.query.lower().strip(), text_seq_length=text_len)
    out = torch.cat([ids.unsqueeze(0).repeat(codes.shape[0], 1), codes], dim=1)
    total = d.get_param("total_seq_length")
    mask = torch.tril(torch.ones((codes.shape[0], 1, total, total)))
    with torch.no_grad():
        logits, _ = d(out, mask, cache=None, use_cache=False, return_loss=False)
    image_logits = logits[:, -seq:-1, vocab:].transpose(1, 2).float()  # [n, image vocab, seq - 1]
    ce = F.cross_entropy(image_logits, codes[:, 1:], reduction="none")  # [n, seq - 1]
    keep = (ce != 0) & sampled[1:].unsqueeze(0)
    return ((ce.exp() * keep).sum(1) / keep.sum(1)).tolist()


def _job(spec: Spec, image: Image.Image | None) -> Job:
    prompt = None
    if spec.image is not None:
        assert image is not None
        prompt = ImagePrompt(_png_b64(image), {s: dict(spec.borders).get(s, 0) for s in BORDER_SIDES},
                             spec.crop_first)
    return Job(spec.query, GenerationParams(seed=spec.seed, top_k=1, images_to_gen=IMAGES_PER_JOB,
                                            images_to_cherry_pick=IMAGES_PER_JOB, super_res=False,
                                            format="png", image_prompt=prompt))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= PPL_RTOL * max(abs(a), abs(b))


def compare_job(pipe: Pipeline, upp: UpstreamPipeline, spec: Spec, job: Job, raw: Any, result: Any,
                up: dict[str, Any]) -> dict[str, Any]:
    """Every check of one job: ours (decoder output ``raw``, ``run`` result) against upstream's ``up``."""
    seq = pipe.manifest.dalle.image_seq_length
    ours_codes = raw.codes.long()  # [n, seq], generation order
    up_codes = up["codes"]
    eq_positions = (ours_codes == up_codes).all(0)  # [seq]
    forced = pipe._request(job).forced
    sampled = torch.ones(seq, dtype=torch.bool) if forced is None else forced < 0
    ours_pixels = pipe.vqgan.decode(ours_codes).numpy()
    pixel_diff = max(int(np.abs(o.astype(np.int16) - u.astype(np.int16)).max())
                     for o, u in zip(ours_pixels, up["pixels"], strict=True))
    case: dict[str, Any] = {
        "job": spec.label(), "query": spec.query, "seed": spec.seed, "borders": dict(spec.borders),
        "crop_first": spec.crop_first, "forced": int((~sampled).sum()),
        "distinct_sampled_codes": int(ours_codes[:, sampled].unique().numel()),
        "codes_equal": bool(eq_positions.all()), "equal_positions": int(eq_positions.sum()),
        "first_difference": None if bool(eq_positions.all()) else int((~eq_positions).nonzero()[0]),
        "pixels_equal": pixel_diff == 0, "pixels_max_abs_diff": pixel_diff,
        "upstream_returned_is_its_decode": _multiset(up["returned"]) == _multiset(up["pixels"]),
    }
    if up["forced_idx"] is not None:
        ours_idx = torch.nonzero(~sampled).flatten().tolist()
        assert forced is not None
        case["forced_equal"] = ours_idx == up["forced_idx"] and torch.equal(
            forced[ours_idx], up["forced_codes"][ours_idx])
        case["forced_kept"] = bool((ours_codes[:, ours_idx] == forced[ours_idx]).all())
    if isinstance(result, JobResult):
        case["run_codes_equal"] = _multiset(result.codes) == _multiset(up_codes.tolist())
        case["run_pixels_equal"] = _multiset([_pixels_of_b64(b) for b in result.images]) == _multiset(
            up["returned"])
        run_ppl = sorted(result.ppl)
    else:
        case["run_codes_equal"] = case["run_pixels_equal"] = False
        case["run_failed"] = repr(result)
        run_ppl = []
    # ppl: ours over sampled positions; upstream's own (all positions), and its formula over ours.
    ours_ppl = raw.ppl.tolist()
    up_sampled = upstream_ppl(upp, spec, up_codes, sampled)
    case["ppl_ours"] = [round(v, 6) for v in ours_ppl]
    case["ppl_upstream"] = [round(v, 6) for v in up["ppl"]]
    case["ppl_upstream_over_sampled"] = [round(v, 6) for v in up_sampled]
    case["ppl_formula_equal"] = all(_close(a, b) for a, b in zip(ours_ppl, up_sampled, strict=True))
    if forced is None:
        case["ppl_equal_upstream"] = all(
            _close(a, b) for a, b in zip(sorted(ours_ppl), up["ppl"], strict=True))
    case["run_ppl_is_decoder_ppl"] = bool(run_ppl) and all(
        _close(a, b) for a, b in zip(run_ppl, sorted(ours_ppl), strict=True))
    case["seconds_upstream"] = round(up["seconds"], 2)
    required = ("codes_equal", "pixels_equal", "run_codes_equal", "run_pixels_equal", "forced_equal",
                "forced_kept", "ppl_formula_equal", "ppl_equal_upstream", "run_ppl_is_decoder_ppl",
                "upstream_returned_is_its_decode")
    case["equal"] = all(case[k] for k in required if k in case)
    return case


def generate_specs(images: tuple[str, ...]) -> tuple[list[Spec], list[list[Spec]]]:
    """The single jobs, then the batches (each job of a batch is also a single job, same seed)."""
    singles: list[Spec] = []
    seed = 100
    for name in images:
        sets = GENERATE_BORDERS if name == images[0] else GENERATE_BORDERS[1:2]
        for partial in sets:
            for crop_first in (False, True):
                borders = tuple((s, partial.get(s, 0)) for s in BORDER_SIDES)
                singles.append(Spec(PROMPT_QUERY, seed, name, borders, crop_first))
                seed += 1
    plain = Spec(PLAIN_QUERY, 7)
    singles.append(plain)
    prompted = [s for s in singles if s.image is not None]
    # A plain job batched with image-prompt ones (different borders and crop orders, another image).
    batches = [[plain, prompted[0]], [prompted[5], plain, prompted[-1]]]
    return singles, batches


def compare_generate(model_dir: Path, verbose: bool, images: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Generate mode: ours against upstream's generate_images, greedy, job by job (see the docstring)."""
    pipe = Pipeline.load(model_dir)
    manifest = pipe.manifest
    upp = load_upstream_pipeline(manifest)
    cfg = manifest.dalle
    assert pipe.vqgan_encoder is not None
    side = cfg.image_tokens_per_dim * pipe.vqgan_encoder.downsample_factor
    pictures = test_images(side)
    names = images or ("smooth", "rgba-300x200")
    singles, batches = generate_specs(names)

    ids_equal = {}
    for query in (PROMPT_QUERY, PLAIN_QUERY):
        theirs = upp.tokenizer.encode_text(query.lower().strip(), text_seq_length=cfg.text_seq_length)
        ids_equal[query] = torch.equal(theirs, pipe.tokenizer.encode(query, cfg.text_seq_length))

    upstream: dict[Spec, dict[str, Any]] = {}
    cases: list[dict[str, Any]] = []
    ours_seconds = 0.0

    def check(batch: list[Spec]) -> None:
        nonlocal ours_seconds
        jobs = [_job(s, pictures.get(s.image or "")) for s in batch]
        started = time.perf_counter()
        raws = pipe.decoder.generate([pipe._request(j) for j in jobs])
        results = pipe.run(jobs)
        ours_seconds += time.perf_counter() - started
        for n, (spec, job) in enumerate(zip(batch, jobs, strict=True)):
            if spec not in upstream:
                upstream[spec] = upstream_run(upp, spec, pictures.get(spec.image or ""), side)
            case = compare_job(pipe, upp, spec, job, raws[n], results[n], upstream[spec])
            case["batch"] = [s.label() for s in batch] if len(batch) > 1 else None
            case["text_ids_equal"] = ids_equal[spec.query]
            case["equal"] = case["equal"] and case["text_ids_equal"]
            cases.append(case)
            if verbose:
                print(json.dumps(case, ensure_ascii=False), flush=True)

    for spec in singles:
        check([spec])
    for batch in batches:
        check(batch)
    # Control: that the codes agree must depend on the prompt. The first prompted job without its
    # prompt (ours), against upstream with it, must differ at sampled positions too, not only forced ones.
    first = next(s for s in singles if s.image is not None)
    bare = pipe._request(_job(Spec(first.query, first.seed), None))
    (out,) = pipe.decoder.generate([bare])
    assert out is not None
    forced = pipe._request(_job(first, pictures[first.image or ""])).forced
    assert forced is not None
    sampled = forced < 0
    differ = (out.codes.long() != upstream[first]["codes"])[:, sampled].any(0)  # [seq] over sampled ones
    control = {"job": first.label(), "sampled_positions": int(sampled.sum()),
               "sampled_positions_differing_without_prompt": int(differ.sum())}
    if not control["sampled_positions_differing_without_prompt"]:
        cases.append({"job": "control: " + first.label(), "batch": None, "equal": False,
                      "prompt_changes_sampled_codes": False})
    failures = [c for c in cases if not c["equal"]]
    return {
        "upstream": "rudalle==1.1.3 generate_images + ImagePrompts + YTTMTokenizerWrapper + DalleModel + "
                    "VQGanGumbelVAE (transformers==4.10.2 top_k_top_p_filtering, taming-transformers==0.0.1)",
        "model_dir": str(model_dir), "images_per_job": IMAGES_PER_JOB, "top_k": 1, "top_p": DEFAULT_TOP_P,
        "upstream_masks_equal_file": upp.masks_equal, "text_ids_equal": all(ids_equal.values()),
        "max_batch_images": pipe.max_batch_images, "control_without_prompt": control,
        "jobs": len(cases), "failures": len(failures), "failed_jobs": failures,
        "codes_equal": sum(c["codes_equal"] for c in cases),
        "pixels_equal": sum(c["pixels_equal"] for c in cases),
        "positions_compared": len(cases) * cfg.image_seq_length,
        "positions_equal": sum(c["equal_positions"] for c in cases),
        "distinct_sampled_codes_min": min(c["distinct_sampled_codes"] for c in cases),
        "seconds_ours": round(ours_seconds, 1),
        "seconds_upstream": round(sum(u["seconds"] for u in upstream.values()), 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "results": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="model directory (default: a tiny one built in a temp dir)")
    parser.add_argument("--vqgan", choices=("tiny", "sber"), default="tiny",
                        help="without --model_dir: the tiny VQ-GAN, or random weights of Sber's architecture")
    parser.add_argument("--mode", choices=("prompts", "generate", "all"), default="prompts",
                        help="forced codes only (default), the whole greedy image completion, or both")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images: tuple[str, ...] | None = None
        if args.model_dir:
            model_dir = Path(args.model_dir)
        elif args.vqgan == "sber":
            model_dir, images = sber_shaped_model_dir(Path(tmp) / "sber-shaped"), ("smooth",)
        else:
            model_dir = build_tiny_model_dir(Path(tmp) / "tiny", seed=0)
        if args.mode in ("prompts", "all"):
            reports["prompts"] = compare(store.load_manifest(model_dir), args.verbose, images)
        if args.mode in ("generate", "all"):
            reports["generate"] = compare_generate(model_dir, args.verbose, images)
    # One mode writes its report as before; both write {"prompts": ..., "generate": ...}.
    report = reports if len(reports) > 1 else next(iter(reports.values()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    failed = 0
    if "prompts" in reports:
        r = reports["prompts"]
        failed += r["failures"]
        print(f"prompts: {r['cases']} cases (images x {len(BORDER_SETS)} border sets x crop_first on/off): "
              f"{r['cases'] - r['failures']} equal, {r['failures']} differ; "
              f"fewest distinct forced codes in a case: {r['distinct_codes_min']}")
    if "generate" in reports:
        g = reports["generate"]
        failed += g["failures"]
        print(f"generate: {g['jobs']} jobs ({IMAGES_PER_JOB} images each, greedy; batched jobs included): "
              f"{g['jobs'] - g['failures']} equal, {g['failures']} differ; "
              f"codes equal in {g['codes_equal']}, "
              f"pixels equal in {g['pixels_equal']}; {g['positions_equal']}/{g['positions_compared']} "
              f"positions equal; fewest distinct sampled codes in a job: {g['distinct_sampled_codes_min']}; "
              f"ours {g['seconds_ours']} s, upstream {g['seconds_upstream']} s")
        c = g["control_without_prompt"]
        print(f"control: {c['job']} without its prompt differs from upstream's completion at "
              f"{c['sampled_positions_differing_without_prompt']}/{c['sampled_positions']} sampled positions")
        for c in g["failed_jobs"]:
            bad = [k for k, v in c.items() if v is False]
            print(f"  differs: {c['job']}{' in batch ' + str(c['batch']) if c['batch'] else ''}: {bad}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
