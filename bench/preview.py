"""What previews cost a generation (issue 19: at most 1.3x the time without them).

Runs one job of `--images` images through `Pipeline.run`, asking a preview every `--every` image rows,
and the same job without previews, alternately, `--runs` times each. Previews are rendered on their own
thread (`app.engine.previews`), coalesced to the newest grid when the renderer falls behind, so the
decode never waits for them. Reports the wall time of both (medians), their ratio, the previews delivered
and skipped, the time spent rendering, and how long a render disowned at the job's end ran on after
`run` returned (each run waits for it, so that it never slows the next one down).

    python bench/preview.py --model_dir model_store/tiny --every 1 --images 16 --runs 3

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
    delivered: list[int] = []
    renderer = pipeline.previews
    real = renderer._render

    def timed(partial: torch.Tensor) -> list[str]:
        t0 = time.perf_counter()
        try:
            return real(partial)
        finally:
            spent.append(time.perf_counter() - t0)

    renderer._render = timed  # type: ignore[method-assign]
    skipped_before = renderer.skipped
    top_k = min(64, pipeline.image_vocab_size)
    params = GenerationParams(seed=1, images_to_gen=images, images_to_cherry_pick=1, top_k=top_k,
                              super_res=False, preview_every=every)
    job = Job("кот", params, on_preview=(lambda step, imgs: delivered.append(step)) if every else None)
    t0 = time.perf_counter()
    try:
        outcomes = pipeline.run([job], on_step=lambda progress: None)
    finally:
        renderer._render = real  # type: ignore[method-assign]
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    renderer.wait_idle(600)  # a render disowned at the end runs on: not into the next measurement
    after = time.perf_counter() - t1
    if not isinstance(outcomes[0], JobResult):
        raise SystemExit(f"the job failed: {outcomes[0]}")
    return {"wall_s": wall, "previews": len(delivered), "skipped": renderer.skipped - skipped_before,
            "preview_s": sum(spent), "last_step": delivered[-1] if delivered else 0, "after_s": after}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_dir", default="model_store/tiny")
    parser.add_argument("--every", type=int, default=1, help="preview_every (image rows)")
    parser.add_argument("--images", type=int, default=16, help="images of the job")
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
    wall_off = statistics.median(r["wall_s"] for r in off)
    wall_on = statistics.median(r["wall_s"] for r in on)
    tail_on = statistics.median(r["wall_s"] + r["after_s"] for r in on)
    result = {
        "images": args.images,
        "preview_every_rows": args.every,
        "without_previews_s": round(wall_off, 3),
        "with_previews_s": round(wall_on, 3),
        "ratio": round(wall_on / wall_off, 3),
        "ratio_with_tail": round(tail_on / wall_off, 3),  # counting the render that ran on after return
        "runs_without_s": [round(r["wall_s"], 3) for r in off],
        "runs_with_s": [round(r["wall_s"], 3) for r in on],
        "last_preview_step": [r["last_step"] for r in on],
        "previews_delivered": [r["previews"] for r in on],
        "previews_skipped": [r["skipped"] for r in on],
        "render_s": round(statistics.median(r["preview_s"] for r in on), 3),
        "renderer_busy_after_return_s": [round(r["after_s"], 3) for r in on],
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
