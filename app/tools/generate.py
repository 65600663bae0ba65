"""Offline generation: a query and params in; image files and a JSON of scores, seed and codes out.

    python -m app.tools.generate --model_dir model_store/tiny --query "синий кот" --images_to_gen 4 --out out/
    python -m app.tools.generate --model_dir model_store/tiny --query "кот в шляпе" \
        --image_prompt photo.png --borders up=4,left=2 --out out/

Parameters are validated by the same pydantic models as the HTTP API, so bounds and defaults agree.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any

from app.engine.jobs import Job, JobFailed
from app.engine.pipeline import Pipeline
from app.engine.store import ModelStoreError
from app.serving.core.errors import RequestInvalid
from app.serving.core.schema import Limits, Schema, generation_params
from app.serving.core.settings import ServerSettings

log = logging.getLogger("app.tools.generate")

_PARAM_TYPES: dict[str, Any] = {
    "images_to_gen": int,
    "images_to_cherry_pick": int,
    "top_k": int,
    "top_p": float,
    "temperature": float,
    "seed": int,
    "format": str,
}
_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.tools.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a model directory with model.json")
    parser.add_argument("--query", required=True, help="what to draw (Russian)")
    parser.add_argument("--out", default="out", help="output folder (created)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, or cuda:0[,cuda:1,...]")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    parser.add_argument(
        "--max_images_per_request", type=int, default=ServerSettings.max_images_per_request
    )
    for name, kind in _PARAM_TYPES.items():
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument(
        "--super_res", action=argparse.BooleanOptionalAction, default=None, help="x4 upscale (default on)"
    )
    parser.add_argument("--image_prompt", type=Path, default=None,
                        help="an image file (PNG, JPEG, WebP) whose borders are kept; the rest is generated")
    parser.add_argument("--borders", type=parse_borders, default=None,
                        help="with --image_prompt: image tokens (8 px) kept per side, e.g. up=4,left=2")
    parser.add_argument("--crop_first", action="store_true", help="encode each border band from its own crop")
    return parser


def parse_borders(text: str) -> dict[str, int]:
    """`up=4,left=2` -> {"up": 4, "left": 2}; the schema checks the sides and their bounds."""
    borders: dict[str, int] = {}
    for part in text.split(","):
        side, sep, value = part.strip().partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"{part!r} is not SIDE=N (e.g. up=4,left=2)")
        borders[side.strip()] = int(value)
    return borders


def _image_prompt(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.image_prompt is None:
        if args.borders is not None or args.crop_first:
            raise ValueError("--borders and --crop_first need --image_prompt FILE")
        return None
    if args.borders is None:
        raise ValueError("--image_prompt needs --borders, e.g. --borders up=4")
    try:
        data = args.image_prompt.read_bytes()
    except OSError as exc:
        raise ValueError(f"--image_prompt: cannot read {args.image_prompt} ({exc.strerror})") from None
    return {"image": base64.b64encode(data).decode("ascii"), "borders": args.borders,
            "crop_first": args.crop_first}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = {k: getattr(args, k) for k in (*_PARAM_TYPES, "super_res") if getattr(args, k) is not None}
    try:
        prompt = _image_prompt(args)
        if prompt is not None:
            params["image_prompt"] = prompt
        pipeline = Pipeline.load(args.model_dir, device=args.device, dtype=args.dtype)
        limits = Limits(args.max_images_per_request, pipeline.image_vocab_size,
                        pipeline.manifest.dalle.image_tokens_per_dim)
        (instance,) = Schema(limits).parse({"instances": [{"query": args.query, "params": params}]})
    except (RequestInvalid, ModelStoreError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    job = Job(instance.query, generation_params(instance))
    (result,) = pipeline.run([job])
    if isinstance(result, JobFailed):
        sys.stderr.write(f"error: {result.message}\n")
        return 1
    assert result is not None  # only an on_step callback stops a job, and none is given

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ext = _EXTENSIONS[job.params.format]
    files = []
    for rank, image in enumerate(result.images):
        path = out / f"{rank:02d}.{ext}"
        path.write_bytes(base64.b64decode(image))
        files.append(path.name)
    summary = {
        "query": job.query,
        "params": instance.params.model_dump(exclude={"image_prompt": {"image"}}),
        "image_prompt_file": str(args.image_prompt) if args.image_prompt else None,
        "files": files,
        "clip_scores": result.clip_scores,
        "ppl": result.ppl,
        "seed": result.seed,
        "timings": result.timings,
        "codes": result.codes,
    }
    (out / "result.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    log.info("wrote %d images and result.json to %s (seed %d)", len(files), out, result.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
