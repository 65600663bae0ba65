"""Fair sharing between tenants (issue 23) through the real server: how long a small tenant waits behind
a large one's backlog, with the fair queue and with first in, first out.

Starts `python -m app` on the tiny model with one request decoding at a time (`--max_batch_images 4`)
and a keys file of two tenants. Tenant A queues `--backlog` 4-image jobs; then tenant B submits one
4-image job. Reports B's latency, how many of A's jobs finished before B's, and one job's time alone.
The first-in-first-out baseline is the same trace on a server where A and B share one key (one tenant,
so the queue's order is arrival order, as it was before tenants): B then waits for A's whole backlog.

    python bench/fairness.py --backlog 6 --out out/bench-fairness.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.tools.tiny import build_tiny_model_dir  # noqa: E402
from bench.server import start as start_server  # noqa: E402

JOBS = "/v1/models/kandinsky/jobs"
TOKENS = {"A": "bench-tenant-a-0123456789", "B": "bench-tenant-b-0123456789"}


def start(model_dir: Path, keys: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_server(model_dir, "--max_batch_images", "4", "--api_keys", str(keys))


def body(seed: int) -> dict[str, Any]:
    return {"instances": [{"query": "кот", "params": {"seed": seed, "images_to_gen": 4,
                                                      "images_to_cherry_pick": 1, "super_res": False}}]}


def submit(url: str, token: str, seed: int) -> str:
    r = httpx.post(url + JOBS, json=body(seed), headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return str(r.json()["id"])


def wait(url: str, token: str, job_id: str) -> dict[str, Any]:
    while True:
        r = httpx.get(f"{url}{JOBS}/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        view = r.json()
        if view["status"] not in ("queued", "running"):
            return dict(view)
        time.sleep(0.05)


def trace(url: str, tokens: dict[str, str], backlog: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    alone = wait(url, tokens["A"], submit(url, tokens["A"], 0))
    one_job_s = time.perf_counter() - t0
    a_jobs = [submit(url, tokens["A"], n) for n in range(1, backlog + 1)]
    sent = time.perf_counter()
    b_view = wait(url, tokens["B"], submit(url, tokens["B"], 100))
    b_latency = time.perf_counter() - sent
    a_views = [wait(url, tokens["A"], j) for j in a_jobs]
    assert alone["status"] == b_view["status"] == "succeeded"
    ahead = sum(1 for v in a_views if v["finished"] <= b_view["finished"])
    return {"one_job_alone_s": round(one_job_s, 2), "b_latency_s": round(b_latency, 2),
            "a_jobs_finished_before_b": ahead, "a_backlog": backlog}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=6, help="tenant A's queued 4-image jobs")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-fairness.json")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model_dir(Path(tmp) / "tiny")
        fair_keys, fifo_keys = Path(tmp) / "fair", Path(tmp) / "fifo"
        fair_keys.write_text("".join(f"{t} {token}\n" for t, token in TOKENS.items()))
        fifo_keys.write_text("".join(f"everyone {token}\n" for token in TOKENS.values()))
        for name, keys in (("fair", fair_keys), ("fifo", fifo_keys)):
            proc, url = start(model_dir, keys)
            try:
                report[name] = trace(url, TOKENS, args.backlog)
            finally:
                proc.kill()
                proc.wait(10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
