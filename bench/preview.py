"""What previews cost the rows that share their batch (issue 10: no more than the decode itself).

Runs one batch of two jobs through `Pipeline.run`: job A asks for a preview every `--every` image rows,
job B asks for none. Measures the generate stage with previews on and off, and the time spent inside
`render_preview` (the VQ-GAN decode of the partial grid, the grey mask and the JPEG encode). The
slow-down B sees is the difference of the generate times; it should equal the preview time (previews run
on the worker thread between two decode steps, nothing else changes).

    python bench/preview.py --model_dir model_store/tiny --every 4 --runs 3

Needs an idle machine: on a shared CPU, contention moves the numbers more than previews do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# `make bench-preview` runs this file as a script: make the repository root importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.engine.jobs import Job, JobResult  # noqa: E402
from app.engine.params import GenerationParams  # noqa: E402
from app.engine.pipeline import Pipeline  # noqa: E402


def run_once(pipeline: Pipeline, every: int, images: int) -> dict[str, float]:
    spent: list[float] = []
    real = pipeline.render_preview

    def timed(partial: torch.Tensor) -> list[str]:
        t0 = time.perf_counter()
        try:
            return real(partial)
        finally:
            spent.append(time.perf_counter() - t0)

    pipeline.render_preview = timed  # type: ignore[method-assign]
    top_k = min(64, pipeline.image_vocab_size)
    try:
        jobs = [
            Job("кот", GenerationParams(seed=1, images_to_gen=images, images_to_cherry_pick=1,
                                        top_k=top_k, super_res=False, preview_every=every)),
            Job("собака", GenerationParams(seed=2, images_to_gen=images, images_to_cherry_pick=1,
                                           top_k=top_k, super_res=False)),
        ]
        outcomes = pipeline.run(jobs, on_step=lambda progress: None)
    finally:
        pipeline.render_preview = real  # type: ignore[method-assign]
    failed = [o for o in outcomes if not isinstance(o, JobResult)]
    if failed:
        raise SystemExit(f"the batch failed: {failed}")
    generate = max(o.timings["generate"] for o in outcomes if isinstance(o, JobResult))
    return {"generate_s": generate, "previews": len(spent), "preview_s": sum(spent)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_dir", default="model_store/tiny")
    parser.add_argument("--every", type=int, default=4, help="preview_every of job A (image rows)")
    parser.add_argument("--images", type=int, default=4, help="images per job")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipeline = Pipeline.load(args.model_dir, device=args.device)
    run_once(pipeline, 0, 1)  # warm-up
    off, on = [], []
    for _ in range(args.runs):  # alternate, so drift in the machine's speed hits both alike
        off.append(run_once(pipeline, 0, args.images))
        on.append(run_once(pipeline, args.every, args.images))
    gen_off = statistics.median(r["generate_s"] for r in off)
    gen_on = statistics.median(r["generate_s"] for r in on)
    preview_s = statistics.median(r["preview_s"] for r in on)
    result = {
        "images_per_job": args.images,
        "preview_every_rows": args.every,
        "previews_per_batch": on[0]["previews"],
        "generate_without_previews_s": round(gen_off, 3),
        "generate_with_previews_s": round(gen_on, 3),
        "slowdown_s": round(gen_on - gen_off, 3),
        "preview_render_s": round(preview_s, 3),
        "per_preview_ms": round(1000 * preview_s / max(1, on[0]["previews"]), 1),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
