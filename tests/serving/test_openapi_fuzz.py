"""Schemathesis against `python -m app` on the tiny model: every documented route answers only its
documented statuses, content types and body schemas, and never a 5xx for generated input.

The server runs with a 2-image request limit so the generated requests that are valid stay fast. The
routes that generate (v1 predict, job submission, v2 infer, OpenAI generations) get their boundary cases
(schemathesis' coverage phase) as invalid input only, which the server answers at once, and a few valid
generated requests; every other route gets every phase. `make fuzz` runs this
module. Set KANDINSKY_FUZZ_URL to fuzz a server that is already running instead of starting one.

The event streams (a job's `.../events`, a submit with `Accept: text/event-stream`, OpenAI's `stream: true`)
are documented as the array of their events `{event, data}`. This module is also schemathesis' hooks file:
it registers a `text/event-stream` deserializer that reads a stream into that array, so
response_schema_conformance checks every event and the stream's order. A targeted run sends
`Accept: text/event-stream` to the job submission and follows the events of a finished job; a test reads
each kind of stream off the real server and validates it with the same parser and jsonschema.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis as st
from schemathesis.core.failures import Failure

from app.serving.web.openapi import DOCS_STATIC_PATH, EVENT_STREAM, TITLE
from tests.support import ROOT, free_port, start_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.long]

NAME = "kandinsky"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
PREDICT_RE = r":predict$"
# The operations that start a generation (schemathesis names an operation "METHOD /path").
GENERATE_RE = r"^POST .*(:predict|/jobs|/infer|/images/generations)$"
SCHEMATHESIS_TIMEOUT_S = 150
JOBS = "/v1/models/{model_name}/jobs"
JOB_EVENTS = JOBS + "/{job_id}/events"
OPENAI_GENERATIONS = "/openai/v1/images/generations"
# The job submission (streamed with `Accept: text/event-stream`) and a finished job's routes.
STREAM_RE = r"^(POST .*/jobs|[A-Z]+ .*/jobs/\{job_id\}(/events)?)$"
# schemathesis stops reading a stream after 20 events by default; a job sends one per image row.
MAX_STREAM_EVENTS = 1000
# A small generation, with previews: a stream of every kind of event but the failed ones.
SMALL = {"images_to_gen": 1, "images_to_cherry_pick": 1, "super_res": False, "seed": 7, "preview_every": 16}


# ---- the event stream, as the document describes it -----------------------------------------------


def parse_event_stream(body: bytes) -> list[dict[str, Any]]:
    """A `text/event-stream` body -> the array of its events `{"event", "data"}`, data JSON-decoded.

    Comment lines (`: keep-alive`) and the `id`/`retry` fields are skipped; data lines join with newlines.
    """
    events: list[dict[str, Any]] = []
    name, data = "message", []
    for line in re.split(r"\r\n|\r|\n", body.decode("utf-8").removeprefix("\ufeff")) + [""]:
        if not line:
            if data:
                events.append({"event": name, "data": json.loads("\n".join(data))})
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return events


@st.deserializer(EVENT_STREAM)
def _event_stream(ctx: Any, response: Any) -> list[list[dict[str, Any]]]:
    """schemathesis' reading of a `text/event-stream` response: the parsed stream, in a one-item list.

    schemathesis (4.32) reads an OpenAPI 3.1 `text/event-stream` schema without `itemSchema` (a 3.2
    keyword) as one event's schema and validates each item of the deserialized value against it. Ours
    describes the whole stream, so the one item is the stream.
    """
    if response.stream_cut_short:
        raise ValueError(f"stream cut short after {len(parse_event_stream(response.content))} events "
                         "(raise max-stream-events or the request timeout)")
    return [parse_event_stream(response.content)]

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


def schemathesis(base: str, cwd: Path, *args: str, model_name: str | None = None,
                 job_id: str | None = None) -> str | None:
    """One `schemathesis run` with our checks and this module as its hooks file (the event stream
    deserializer): its report if it failed, else None.

    `model_name` and `job_id` pin those path parameters to these values."""
    pinned = {"path.model_name": model_name, "path.job_id": job_id}
    config = f"hooks = {json.dumps(__file__)}\nmax-stream-events = {MAX_STREAM_EVENTS}\n[parameters]\n"
    config += "".join(f'"{key}" = {json.dumps(value)}\n' for key, value in pinned.items() if value)
    path = cwd / f"schemathesis-{model_name}-{job_id}.toml"
    path.write_text(config)
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(path), "run", f"{base}/openapi.json",
        "--checks", CHECKS, "--workers", "1", "--seed", "20260", "--generation-database", "none",
        "--request-timeout", "120", "--no-color", *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=SCHEMATHESIS_TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)},  # the hooks import tests/
    )
    if proc.returncode == 0:
        return None
    return f"schemathesis {' '.join(args)}\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def streamed_job(server) -> tuple[str, list[dict[str, Any]]]:
    """A small job submitted with `Accept: text/event-stream`, read to its end: (its id, its events)."""
    base, _ = server
    body = {"instances": [{"query": "кот", "params": SMALL}]}
    r = httpx.post(f"{base}/v1/models/{NAME}/jobs", json=body, headers={"Accept": EVENT_STREAM}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith(EVENT_STREAM), r.text
    events = parse_event_stream(r.content)
    return events[0]["data"]["id"], events


def test_schemathesis_finds_every_route_answering_as_documented(server, doc, streamed_job, tmp_path):
    base, _ = server
    job_id, _ = streamed_job
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
        # The event streams: valid job submissions streamed on their connection (each one a generation,
        # so two), and a finished job's events, get and cancel (409).
        schemathesis(
            base, tmp_path, "--include-name-regex", STREAM_RE, "--mode", "positive",
            "--phases", "examples,fuzzing", "--max-examples", "2", "--no-shrink",
            "--header", f"Accept: {EVENT_STREAM}", model_name=NAME, job_id=job_id,
        ),
    ]
    failed = [report for report in runs if report is not None]
    assert not failed, "\n\n".join(failed)


def validate(doc: dict, method: str, path: str, status: int, body: object,
             media: str = "application/json") -> None:
    schema = doc["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(body)


def test_every_event_stream_answers_as_documented(server, doc, streamed_job):
    base, _ = server
    job_id, events = streamed_job
    names = [e["event"] for e in events]
    assert names[0] == "status" and names[-1] == "succeeded", names
    assert {"progress", "preview"} <= set(names), names
    validate(doc, "post", JOBS, 200, events, EVENT_STREAM)
    # The finished job's stream: its status, then its final event.
    r = httpx.get(f"{base}/v1/models/{NAME}/jobs/{job_id}/events", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith(EVENT_STREAM), r.text
    finished = parse_event_stream(r.content)
    assert [e["event"] for e in finished] == ["status", "succeeded"]
    assert finished[1]["data"] == events[-1]["data"]
    validate(doc, "get", JOB_EVENTS, 200, finished, EVENT_STREAM)
    # A cancelled job's.
    body = {"instances": [{"query": "кот", "params": {**SMALL, "images_to_gen": 2}}]}
    created = httpx.post(f"{base}/v1/models/{NAME}/jobs", json=body, timeout=30)
    assert created.status_code == 202, created.text
    cancelled_id = created.json()["id"]
    assert httpx.delete(f"{base}/v1/models/{NAME}/jobs/{cancelled_id}", timeout=30).status_code == 200
    r = httpx.get(f"{base}/v1/models/{NAME}/jobs/{cancelled_id}/events", timeout=60)
    cancelled = parse_event_stream(r.content)
    assert [e["event"] for e in cancelled] == ["status", "cancelled"]
    validate(doc, "get", JOB_EVENTS, 200, cancelled, EVENT_STREAM)
    # OpenAI's stream: partial images, then the completed images.
    request = {"model": NAME, "prompt": "кот", "size": "256x256", "stream": True, "partial_images": 1,
               "seed": 7}
    r = httpx.post(base + OPENAI_GENERATIONS, json=request, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith(EVENT_STREAM), r.text
    streamed = parse_event_stream(r.content)
    kinds = [e["event"] for e in streamed]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"], kinds
    validate(doc, "post", OPENAI_GENERATIONS, 200, streamed, EVENT_STREAM)
    # The document is not satisfied by any list: two final events, an unknown event, or data of another
    # shape fail it.
    unknown = {"event": "message", "data": {}}
    for wrong in (events + events[-1:], [*events, unknown], [*events[:-1], {"event": "failed", "data": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            validate(doc, "post", JOBS, 200, wrong, EVENT_STREAM)


def test_schemathesis_validates_a_stream_as_the_array_of_its_events(server, doc, streamed_job):
    # In this process too, schemathesis reads streams with our deserializer (registered at import).
    base, _ = server
    job_id, _ = streamed_job
    events = st.openapi.from_dict(doc)[JOB_EVENTS]["GET"]
    r = httpx.get(f"{base}/v1/models/{NAME}/jobs/{job_id}/events", timeout=60)
    events.validate_response(r)
    twice = r.content + r.content.split(b"\r\n\r\n", 1)[1]  # its final event twice
    broken = httpx.Response(200, headers=r.headers, content=twice, request=r.request)
    broken.elapsed = r.elapsed
    with pytest.raises(Failure, match="SSE event violates schema"):
        events.validate_response(broken)


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
