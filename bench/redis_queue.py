"""What the Redis queue adds to a request (issue 21: at most 2 ms aimed, 5 ms accepted), and its Redis
round trips per request.

A real `redis-server` on a free loopback port; the same request goes N times through `LocalQueue` and
through `RedisQueue`, each with a worker thread that takes it, tells it started and finishes it at once
with a 200 kB result, so that what is measured is the queue's own critical path: put -> take -> started
-> finish -> the waiter's answer. Reports p50 and p95 of each and their difference. Then the same with
32 progress ticks per request (one per image row of 1024 positions, as the loop worker sends them,
spread over the generation in real use) for the client round trips to Redis per request, counted at
redis-py's `execute_command`. A decode step itself makes no Redis call; a busy worker with free slots
looks at the queue at most every 50 ms.

    python bench/redis_queue.py --requests 300 --out out/bench-redis-queue.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.engine.jobs import Job, Progress  # noqa: E402
from app.engine.params import GenerationParams  # noqa: E402
from app.serving.core.types import ImageRequest, InstanceResult, Progressed, RequestResult, Started  # noqa: E402
from app.serving.queue.base import Work  # noqa: E402
from app.serving.queue.local import LocalQueue  # noqa: E402
from app.serving.queue.redis_conn import resolve  # noqa: E402
from app.serving.queue.redis_queue import RedisQueue  # noqa: E402

RESULT = RequestResult([InstanceResult(["x" * 200_000], "jpeg", [0.3], [2.0], 1, {"generate": 1.0})], 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CALLS = [0]


def count_round_trips() -> None:
    import redis
    import redis.asyncio

    sync_call, async_call = redis.Redis.execute_command, redis.asyncio.Redis.execute_command

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        CALLS[0] += 1
        return sync_call(self, *args, **kwargs)

    async def counted_async(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        CALLS[0] += 1
        return await async_call(self, *args, **kwargs)

    redis.Redis.execute_command = counted  # type: ignore[method-assign]
    redis.asyncio.Redis.execute_command = counted_async  # type: ignore[method-assign]


def worker(queue, stop: threading.Event, ticks: int) -> None:  # type: ignore[no-untyped-def]
    while not stop.is_set():
        for work in queue.take(1, wait=0.2):
            queue.tell(work, Started())
            for row in range(1, ticks + 1):
                queue.tell(work, Progressed((Progress(step=row * 32, steps=1024),)))
            queue.finish(work, RESULT)


async def run(queue, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    params = GenerationParams(seed=1, images_to_gen=1, super_res=False)
    times = []
    for _ in range(n):
        now = time.monotonic()
        work = Work(ImageRequest((Job("кот", params),), 60.0, "v1"), enqueued=now, deadline=now + 60)
        t0 = time.perf_counter()
        await queue.put(work, lambda event: None)
        await queue.outcome(work)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def measure(queue, n: int, ticks: int = 0) -> list[float]:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    thread = threading.Thread(target=worker, args=(queue, stop, ticks), daemon=True)
    thread.start()
    async def both() -> list[float]:
        await run(queue, 20)  # warm-up
        return await run(queue, n)

    try:
        return asyncio.run(both())
    finally:
        stop.set()
        thread.join(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (Debian's redis-server package)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", tmp,
                                 "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            target = resolve(f"redis://127.0.0.1:{port}/0", environ={})
            local = measure(LocalQueue(64), args.requests)
            remote = measure(RedisQueue(target, "bench", queue_size=64), args.requests)
            count_round_trips()
            measure(RedisQueue(target, "bench-ticks", queue_size=64), args.requests, ticks=32)
            trips = CALLS[0] / (args.requests + 20)
        finally:
            proc.terminate()
            proc.wait(10)

    def pct(v: list[float], q: int) -> float:
        return statistics.quantiles(v, n=100, method="inclusive")[q - 1]

    row = {"requests": args.requests, "local_p50_ms": round(pct(local, 50), 3),
           "local_p95_ms": round(pct(local, 95), 3), "redis_p50_ms": round(pct(remote, 50), 3),
           "redis_p95_ms": round(pct(remote, 95), 3),
           "added_p50_ms": round(pct(remote, 50) - pct(local, 50), 3),
           "added_p95_ms": round(pct(remote, 95) - pct(local, 95), 3),
           "round_trips_per_request_with_32_ticks": round(trips, 1)}
    print(json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
