"""`python -m app` as a real process on a free port: ready, the catalog example, a clean SIGTERM exit.

Also checks that bad settings stop start-up with exit code 2 and a one-line message.
"""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from PIL import Image

from app.serving.core.schema import CATALOG_EXAMPLE
from tests.support import ROOT, free_port, start_server, wait_ready


@pytest.fixture
def server(tiny_model_dir):
    port = free_port()
    # gRPC stays on (as in production) on its own free port, so parallel runs never collide on 8081
    args = ["--model_dir", str(tiny_model_dir), "--device", "cpu"]
    proc = start_server([*args, "--http_port", str(port), "--grpc_port", str(free_port())])
    # drain the pipe so a chatty server never blocks on a full stdout buffer
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/v1/models/kandinsky")
        reader.start()
        yield proc, f"http://127.0.0.1:{port}", lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_server_process_answers_the_catalog_example_and_exits_cleanly_on_sigterm(server):
    proc, base, lines = server
    r = httpx.post(f"{base}/v1/models/kandinsky:predict", json=CATALOG_EXAMPLE, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and len(body["images"]) == 2
    for b64 in body["images"]:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()
    assert httpx.get(f"{base}/v2/health/live", timeout=5).status_code == 200
    metrics_text = httpx.get(f"{base}/metrics", timeout=5).text
    assert 'kandinsky_requests_total{code="200",protocol="v1",tenant=""}' in metrics_text

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "".join(lines)[-3000:]
    assert "draining" in "".join(lines)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model_dir", "/nonexistent/model"], "--model_dir"),
        (["--device", "gpu0"], "--device"),
        (["--device", "cpu", "--queue_size", "0"], "--queue_size"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tiny_model_dir, args, needle):
    if "--model_dir" not in args:
        args = ["--model_dir", str(tiny_model_dir), *args]
    proc = subprocess.run(
        [sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_model_dir_without_model_json_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "app", "--model_dir", str(tmp_path), "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "model.json" in proc.stderr
