"""Schemathesis against `python -m app` on the tiny model: every documented route answers only its
documented statuses, content types and body schemas, and never a 5xx for generated input.

The server runs with a 2-image request limit so the generated requests that are valid stay fast. The
routes that generate (v1 predict, job submission, v2 infer, OpenAI generations) get their boundary cases
(schemathesis' coverage phase) as invalid input only, which the server answers at once, and a few valid
generated requests; every other route gets every phase. `make fuzz` runs this
module. Set KANDINSKY_FUZZ_URL to fuzz a server that is already running instead of starting one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from app.serving.openapi import DOCS_STATIC_PATH, TITLE
from tests.support import free_port, start_server, wait_ready

pytestmark = pytest.mark.slow

NAME = "kandinsky"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
PREDICT_RE = r":predict$"
# The operations that start a generation (schemathesis names an operation "METHOD /path").
GENERATE_RE = r"^POST .*(:predict|/jobs|/infer|/images/generations)$"
SCHEMATHESIS_TIMEOUT_S = 150

# Routes KServe registers that this model does not serve: start-up removes them.
UNSERVED = [
    ("POST", "/v1/models/kandinsky:explain"),
    ("GET", "/v2/models/kandinsky/versions/1"),
    ("GET", "/v2/models/kandinsky/versions/1/ready"),
    ("POST", "/v2/models/kandinsky/versions/1/infer"),
    ("POST", "/v2/repository/models/kandinsky/load"),
    ("POST", "/v2/repository/models/kandinsky/unload"),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[tuple[str, list[str]]]:
    url = os.environ.get("KANDINSKY_FUZZ_URL")
    if url:
        yield url.rstrip("/"), []
        return
    port = free_port()
    args = [
        "--model_dir", str(tiny_model_dir), "--device", "cpu",
        "--http_port", str(port), "--grpc_port", str(free_port()),
        "--max_images_per_request", "2", "--queue_size", "4", "--request_timeout", "30",
    ]
    proc = start_server(args)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/v1/models/{NAME}")
        reader.start()
        yield f"http://127.0.0.1:{port}", lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def doc(server) -> dict:
    base, _ = server
    r = httpx.get(f"{base}/openapi.json", timeout=30)
    assert r.status_code == 200
    return r.json()


def schemathesis(base: str, cwd: Path, *args: str, model_name: str | None = None) -> str | None:
    """One `schemathesis run` with our checks: its report if it failed, else None.

    `model_name` pins the path parameter to that value."""
    config: list[str] = []
    if model_name is not None:
        path = cwd / f"schemathesis-{model_name}.toml"
        path.write_text(f'[parameters]\n"path.model_name" = "{model_name}"\n')
        config = ["--config-file", str(path)]
    cmd = [
        sys.executable, "-m", "schemathesis.cli", *config, "run", f"{base}/openapi.json",
        "--checks", CHECKS, "--workers", "1", "--seed", "20260", "--generation-database", "none",
        "--request-timeout", "120", "--no-color", *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=SCHEMATHESIS_TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if proc.returncode == 0:
        return None
    return f"schemathesis {' '.join(args)}\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"


def test_schemathesis_finds_every_route_answering_as_documented(server, doc, tmp_path):
    base, _ = server
    runs = [
        # Every route that does not generate: all phases, any model name (unknown ones answer 404).
        schemathesis(base, tmp_path, "--exclude-name-regex", GENERATE_RE, "--max-examples", "25"),
        # The generating routes, served model, invalid bodies only (answered at once): boundary cases and
        # fuzzing. (With any model name, schemathesis pairs most invalid bodies with a wrong name: a 404.)
        schemathesis(
            base, tmp_path, "--include-name-regex", GENERATE_RE, "--mode", "negative",
            "--phases", "coverage,fuzzing", "--max-examples", "30", model_name=NAME,
        ),
        # Valid bodies: each one a generation, so a few, and no shrinking.
        schemathesis(
            base, tmp_path, "--include-name-regex", GENERATE_RE, "--mode", "positive",
            "--phases", "examples,fuzzing", "--max-examples", "4", "--no-shrink", model_name=NAME,
        ),
        # Unknown model names (404), valid and invalid bodies.
        schemathesis(
            base, tmp_path, "--include-path-regex", PREDICT_RE, "--phases", "fuzzing", "--max-examples", "10"
        ),
    ]
    failed = [report for report in runs if report is not None]
    assert not failed, "\n\n".join(failed)


def validate(doc: dict, method: str, path: str, status: int, body: object) -> None:
    schema = doc["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(body)


def test_predict_answers_both_documented_shapes(server, doc):
    base, _ = server
    small = {"images_to_gen": 1, "super_res": False, "seed": 1}
    path = "/v1/models/{model_name}:predict"
    for instances in ([{"query": "кот", "params": small}], [{"query": "кот", "params": small}] * 2):
        r = httpx.post(f"{base}/v1/models/{NAME}:predict", json={"instances": instances}, timeout=120)
        assert r.status_code == 200, r.text
        validate(doc, "post", path, 200, r.json())
    assert ("predictions" in r.json()) is True


def test_document_is_ours_and_lists_no_unserved_route(server, doc):
    base, lines = server
    assert doc["info"]["title"] == TITLE
    assert not any(("/versions/" in p or ":explain" in p or "/repository/" in p) for p in doc["paths"])
    body = {"instances": [{"query": "a"}]}
    served = {
        f"{m} {p}": httpx.request(m, base + p, json=body if m == "POST" else None, timeout=30).status_code
        for m, p in UNSERVED
    }
    assert all(code in (404, 405) for code in served.values()), served
    undocumented = [line for line in lines if "not documented in app/serving/openapi.py" in line]
    assert not undocumented, "".join(lines)[-3000:]


def test_docs_page_works_offline(server):
    base, _ = server
    html = httpx.get(f"{base}/docs", timeout=30).text
    assert "http://" not in html and "https://" not in html
    refs = re.findall(r"""(?:src|href)="([^"]+)"|url: '([^']+)'""", html)
    assert f"{DOCS_STATIC_PATH}/swagger-ui-bundle.js" in {a for a, _ in refs}
    for ref in {a or b for a, b in refs}:
        assert ref.startswith("/") and httpx.get(base + ref, timeout=30).status_code == 200, ref
