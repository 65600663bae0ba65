"""`python -m app.client` against the real server process on the tiny model: saved files, Ctrl-C, errors."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, free_port, serve, serve_keyed

JOBS = "/v1/models/kandinsky/jobs"


@pytest.fixture(scope="module")
def base_url(tiny_model_dir):
    for srv in serve(tiny_model_dir):
        yield srv["base"]


def client(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.client", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
        **kwargs,
    )


def test_importing_the_client_loads_nothing_heavy():
    probe = "import sys, app.client; print(sorted(m for m in ('torch', 'numpy', 'kserve', 'fastapi') " \
            "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_client_saves_the_kept_images_and_result_json_equal_to_the_job_result(base_url, tmp_path):
    out = tmp_path / "cat"
    run = client("Кот в шляпе", "--url", base_url, "--images_to_gen", "3", "--images_to_cherry_pick", "2",
                 "--seed", "11", "--no-super_res", "--format", "png", "--quiet", "--out", str(out))
    assert run.returncode == 0, run.stderr
    saved = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert saved["files"] == ["image_01.png", "image_02.png"]
    # stdout names every file written, one a line
    assert [Path(line.split("\t")[0]) for line in run.stdout.splitlines()] == [
        out / "image_01.png", out / "image_02.png", out / "result.json"
    ]

    job = httpx.get(f"{base_url}{JOBS}/{saved['job_id']}", timeout=10).json()
    assert job["status"] == "succeeded"
    result = job["result"]
    assert {k: v for k, v in saved.items() if k not in ("files", "job_id")} == {
        k: v for k, v in result.items() if k != "images"
    }
    assert saved["seed"] == 11 and len(saved["clip_scores"]) == 2
    for name, b64 in zip(saved["files"], result["images"], strict=True):
        data = (out / name).read_bytes()
        assert data == base64.b64decode(b64) and data.startswith(b"\x89PNG")


@pytest.mark.slow
def test_ctrl_c_cancels_the_job_on_the_server_and_exits_130(base_url, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.client", "кот", "--url", base_url, "--images_to_gen", "16",
         "--no-super_res", "--out", str(tmp_path / "never")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stderr.readline()  # "job <id> <status>", written as soon as the server names it
        assert first.startswith("job "), first
        job_id = first.split()[1]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # interrupt mid-generation, not while it is still queued
            job = httpx.get(f"{base_url}{JOBS}/{job_id}", timeout=10).json()
            if job["status"] != "queued" and job["progress"]["step"] > 0:
                break
            time.sleep(0.1)
        assert job["status"] == "running", job
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert f"job {job_id} cancelled" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    job = httpx.get(f"{base_url}{JOBS}/{job_id}", timeout=10).json()
    assert job["status"] == "cancelled" and job["result"] is None
    assert not (tmp_path / "never").exists()


def test_a_400_exits_1_with_the_server_message_naming_the_field(base_url, tmp_path):
    run = client("кот", "--url", base_url, "--images_to_gen", "2", "--images_to_cherry_pick", "3",
                 "--out", str(tmp_path))
    assert run.returncode == 1
    assert "400" in run.stderr and "images_to_cherry_pick" in run.stderr
    assert not (tmp_path / "result.json").exists()


def test_an_unreachable_server_exits_1_with_a_message(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run = client("кот", "--url", url, "--out", str(tmp_path))
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: {url}") and "Traceback" not in run.stderr


# ---- a server with API keys (SPEC section 12) -----------------------------------------------------------

KEY = "client-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_url(tiny_model_dir, tmp_path_factory):
    for srv in serve_keyed(tiny_model_dir, tmp_path_factory.mktemp("keys"), {"tenant-1": KEY}):
        yield srv["base"]


def without_key_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "KANDINSKY_API_KEY"}


def test_without_a_key_a_keyed_server_exits_1_with_one_line_saying_how_to_pass_one(keyed_url, tmp_path):
    run = client("кот", "--url", keyed_url, "--out", str(tmp_path), env=without_key_env())
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: 401: the server needs an API key: pass --api-key KEY or set "
                                 "KANDINSKY_API_KEY"), run.stderr


def test_a_refused_key_says_so_without_echoing_it(keyed_url, tmp_path):
    wrong = "not-the-key-0123456789abcdef"
    run = client("кот", "--url", keyed_url, "--api-key", wrong, "--out", str(tmp_path), env=without_key_env())
    assert run.returncode == 1
    assert "401: the server did not accept the API key" in run.stderr and wrong not in run.stderr


def test_the_key_from_the_environment_is_sent_and_the_job_is_the_tenants(keyed_url, tmp_path):
    out = tmp_path / "cat"
    run = client("кот", "--url", keyed_url, "--images_to_gen", "1", "--no-super_res", "--quiet", "--out",
                 str(out), env={**without_key_env(), "KANDINSKY_API_KEY": KEY})
    assert run.returncode == 0, run.stderr
    job_id = json.loads((out / "result.json").read_text(encoding="utf-8"))["job_id"]
    assert KEY not in run.stderr + run.stdout
    headers = {"Authorization": f"Bearer {KEY}"}
    job = httpx.get(f"{keyed_url}{JOBS}/{job_id}", headers=headers, timeout=10).json()
    assert job["status"] == "succeeded"
    # and --api-key wins over the variable
    env = {**without_key_env(), "KANDINSKY_API_KEY": "wrong-wrong-wrong"}
    flagged = client("кот", "--url", keyed_url, "--api-key", KEY, "--images_to_gen", "1", "--no-super_res",
                     "--quiet", "--out", str(tmp_path / "flag"), env=env)
    assert flagged.returncode == 0, flagged.stderr
