"""Offline generation: a query and params in; image files and a JSON of scores, seed and codes out.

    python -m app.tools.generate --model_dir model_store/tiny --query "синий кот" --images_to_gen 4 --out out/

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
from app.engine.params import GenerationParams
from app.engine.pipeline import Pipeline
from app.engine.store import ModelStoreError
from app.serving.errors import RequestInvalid
from app.serving.schema import Limits, Schema
from app.serving.settings import ServerSettings

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = {k: getattr(args, k) for k in (*_PARAM_TYPES, "super_res") if getattr(args, k) is not None}
    try:
        pipeline = Pipeline.load(args.model_dir, device=args.device, dtype=args.dtype)
        schema = Schema(Limits(args.max_images_per_request, pipeline.image_vocab_size))
        (instance,) = schema.parse({"instances": [{"query": args.query, "params": params}]})
    except (RequestInvalid, ModelStoreError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    job = Job(instance.query, GenerationParams(**instance.params.model_dump()))
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
        "params": instance.params.model_dump(),
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
