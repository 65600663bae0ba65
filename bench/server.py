"""A real `python -m app` for the benchmarks that go through the server: started on a free loopback
port with the given flags, its output dropped, ready once the model answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
READY_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(model_dir: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    """The server process and its base URL, once ready (HTTP on loopback, no gRPC)."""
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--model_dir", str(model_dir), "--device", "cpu", "--http_port",
           str(port), "--http_host", "127.0.0.1", "--enable_grpc", "false", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models/kandinsky", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready")
