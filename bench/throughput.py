"""Batching throughput of a running server: N concurrent clients vs one at a time.

    python bench/throughput.py --url http://127.0.0.1:8080 --concurrency 8 --requests 16

Each client sends the same small request in a loop. Prints images/s and latency p50/p90/p99 for
concurrency 1 and for --concurrency, and the ratio of the two throughputs (what cross-request batching
buys). Start the server first, e.g. `python -m app --model_dir model_store/tiny --device cpu`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class RunStats:
    concurrency: int
    requests: int
    failures: int
    images: int
    seconds: float
    latencies: list[float]

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


def body(images: int, super_res: bool, seed: int) -> dict:
    params = {"images_to_gen": images, "images_to_cherry_pick": images, "super_res": super_res, "seed": seed}
    return {"instances": [{"query": "Кот в шляпе", "params": params}]}


async def run(url: str, model: str, concurrency: int, total: int, images: int, super_res: bool) -> RunStats:
    endpoint = f"{url.rstrip('/')}/v1/models/{model}:predict"
    counter = iter(range(total))
    latencies: list[float] = []
    failures = 0
    generated = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal failures, generated
        for i in counter:
            t0 = time.perf_counter()
            r = await c.post(endpoint, json=body(images, super_res, seed=i))
            latencies.append(time.perf_counter() - t0)
            if r.status_code == 200:
                generated += images
            else:
                failures += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    return RunStats(concurrency, total, failures, generated, time.perf_counter() - start, latencies)


def report(s: RunStats) -> None:
    print(
        f"concurrency {s.concurrency:3d}: {s.requests} requests ({s.failures} failed) in {s.seconds:7.1f} s, "
        f"{s.images_per_s:7.3f} images/s, latency p50 {s.pct(50):6.2f} s  p90 {s.pct(90):6.2f} s  "
        f"p99 {s.pct(99):6.2f} s"
    )


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="kandinsky")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=16, help="requests per run (each run: the same count)")
    p.add_argument("--images", type=int, default=1, help="images_to_gen per request")
    p.add_argument("--super_res", action="store_true")
    args = p.parse_args()

    async with httpx.AsyncClient(timeout=10) as c:
        ready = await c.get(f"{args.url.rstrip('/')}/v1/models/{args.model}")
        ready.raise_for_status()
    # one warm-up request so neither run pays for first-call compilation or allocation
    await run(args.url, args.model, 1, 1, args.images, args.super_res)
    serial = await run(args.url, args.model, 1, args.requests, args.images, args.super_res)
    report(serial)
    batched = await run(args.url, args.model, args.concurrency, args.requests, args.images, args.super_res)
    report(batched)
    if serial.images_per_s > 0:
        print(f"batched / one-at-a-time throughput: {batched.images_per_s / serial.images_per_s:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
