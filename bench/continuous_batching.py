"""Continuous batching against batch-at-a-time, through the real server: an arrival trace replayed.

Starts `python -m app` twice on a generated model (`--continuous_batching` and
`--no-continuous_batching`, everything else equal) and replays the same trace against each: Poisson
arrivals of v1 predict requests of 1 to 8 images (seeded), at three load levels given as a fraction of
what one batch-at-a-time server can do. Reports p50 and p95 latency and images per second per level.
Before the trace, two scenarios on each server: request A (4 images) alone takes T; A again with B
(4 images) sent at T/4: each one's latency over T, and whether both got the images they get alone; and
three concurrent 4-image requests against one (wall time over T).

    python bench/continuous_batching.py --requests 12 --out out/bench-continuous.json
    python bench/continuous_batching.py --layers 8 --hidden 256 --requests 0   # the scenarios only

The default model is the tiny one (its step is mostly fixed overhead, as a GPU's bandwidth-bound step
is); `--layers 8 --hidden 256` gives the issue's 8-layer model. Needs an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.tools.tiny import build_tiny_model_dir  # noqa: E402
from bench.server import start as start_server  # noqa: E402

LOADS = (0.5, 1.0, 2.0)  # arrivals per second, as a fraction of one-at-a-time capacity


def start(model_dir: Path, continuous: bool, max_batch: int) -> tuple[subprocess.Popen[bytes], str]:
    flag = "--continuous_batching" if continuous else "--no-continuous_batching"
    return start_server(model_dir, "--max_batch_images", str(max_batch), flag)


async def post(client: httpx.AsyncClient, url: str, images: int, seed: int, after: float = 0.0
               ) -> tuple[float, list[str]]:
    """One v1 predict sent `after` s from now: (latency s, its images)."""
    await asyncio.sleep(after)
    sent = time.perf_counter()
    r = await client.post(f"{url}/v1/models/kandinsky:predict", json=body(images, seed))
    r.raise_for_status()
    return time.perf_counter() - sent, r.json()["images"]


async def scenarios(url: str) -> dict[str, float | bool]:
    """A alone (T); A with B at T/4; three concurrent 4-image requests. Ratios to T."""
    async with httpx.AsyncClient(timeout=3600) as client:
        await post(client, url, 1, 99)  # warm-up
        t, a_alone = await post(client, url, 4, 7)
        _, b_alone = await post(client, url, 4, 8)
        (ta, a_images), (tb, b_images) = await asyncio.gather(post(client, url, 4, 7),
                                                                post(client, url, 4, 8, after=t / 4))
        t0 = time.perf_counter()
        three = await asyncio.gather(*(post(client, url, 4, seed) for seed in (7, 8, 9)))
        wall = time.perf_counter() - t0
    return {"T_s": round(t, 2), "A_with_B_over_T": round(ta / t, 3),
            "B_sent_at_T_over_4_over_T": round(tb / t, 3),
            "same_images_as_alone": a_images == a_alone and b_images == b_alone,
            "three_concurrent_over_T": round(wall / t, 3),
            "three_first_images_as_alone": three[0][1] == a_alone}


def body(images: int, seed: int) -> dict:
    params = {"images_to_gen": images, "images_to_cherry_pick": images, "super_res": False, "seed": seed}
    return {"instances": [{"query": "Кот в шляпе", "params": params}]}


async def replay(url: str, trace: list[tuple[float, int]]) -> tuple[list[float], int, float]:
    """Send each (arrival s, images) request at its time; (latencies, images, seconds to the last answer)."""
    latencies: list[float] = []
    images = 0
    async with httpx.AsyncClient(timeout=3600) as client:
        t0 = time.perf_counter()

        async def one(at: float, n: int, seed: int) -> None:
            nonlocal images
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            sent = time.perf_counter()
            r = await client.post(f"{url}/v1/models/kandinsky:predict", json=body(n, seed))
            r.raise_for_status()
            latencies.append(time.perf_counter() - sent)
            images += n

        await asyncio.gather(*(one(at, n, i) for i, (at, n) in enumerate(trace)))
        return latencies, images, time.perf_counter() - t0


def trace(rate: float, count: int, seed: int) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append((round(t, 3), rng.randint(1, 8)))
    return out


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12, help="requests per load level")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    found: dict[str, dict[str, float | bool]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model_dir(Path(tmp) / "model", num_layers=args.layers, hidden_size=args.hidden)
        # One-at-a-time capacity: a 4-image request alone on the old server sets the time scale.
        proc, url = start(model_dir, False, args.max_batch)
        try:
            found["batch"] = asyncio.run(scenarios(url))
            print(json.dumps({"scheduler": "batch", **found["batch"]}), flush=True)
            single, _, _ = asyncio.run(replay(url, [(0.0, 4)]))
            per_image = single[0] / 4
            traces = {load: trace(load / (4.5 * per_image), args.requests, seed=int(load * 100))
                      for load in LOADS}
            old = {load: asyncio.run(replay(url, t)) for load, t in traces.items() if t}
        finally:
            proc.terminate()
            proc.wait(60)
        proc, url = start(model_dir, True, args.max_batch)
        try:
            found["continuous"] = asyncio.run(scenarios(url))
            print(json.dumps({"scheduler": "continuous", **found["continuous"]}), flush=True)
            new = {load: asyncio.run(replay(url, t)) for load, t in traces.items() if t}
        finally:
            proc.terminate()
            proc.wait(60)
    for load in (load for load in LOADS if load in old):
        for name, res in (("batch", old[load]), ("continuous", new[load])):
            lat, images, seconds = res
            row = {"load": load, "scheduler": name, "requests": len(lat), "p50_s": round(pct(lat, 50), 2),
                   "p95_s": round(pct(lat, 95), 2), "images_per_s": round(images / seconds, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"single_4_images_s": single[0], "scenarios": found, "rows": rows},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
