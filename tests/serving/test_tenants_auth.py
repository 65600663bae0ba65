"""API keys on every generating and job route (SPEC section 12), through the real server process and real
clients: httpx, KServe's `InferenceRESTClient`, `tritonclient.http`, `tritonclient.grpc` (in a subprocess:
its protobuf module and KServe's both define `inference.*`), the official `openai` client.

One server serves the module, with a keys file of two tenants: A by its plain token (weight=2), B by the
SHA-256 of its token; `--tenant_queue_size 1` (and 4 row slots); JSON logs (each access record carries
the text line and the fields). The keys file is edited while it runs (near the end), and last of all its
whole output and `/metrics` are searched for every token the module sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton_http
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.support import NAME, ROOT, metric, serve

TOKEN_A = f"tenant-a-{secrets.token_hex(12)}"
TOKEN_B = f"tenant-b-{secrets.token_hex(12)}"
TOKEN_C = f"tenant-c-{secrets.token_hex(12)}"  # added while the server runs
WRONG = f"not-a-key-{secrets.token_hex(12)}"
EVERY_TOKEN = (TOKEN_A, TOKEN_B, TOKEN_C, WRONG)
DIGEST_B = hashlib.sha256(TOKEN_B.encode()).hexdigest()
KEYS_TEXT = f"# tenants of this module\nA {TOKEN_A} weight=2\nB sha256:{DIGEST_B}\n"

PREDICT = f"/v1/models/{NAME}:predict"
JOBS = f"/v1/models/{NAME}/jobs"
INFER = f"/v2/models/{NAME}/infer"
GENERATIONS = "/openai/v1/images/generations"
TIMEOUT_S = 20.0


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body(seed: int, images: int = 1) -> dict[str, Any]:
    """A v1 predict body of one small instance (no upscaling)."""
    return {"instances": [{"query": "кот", "params": {"images_to_gen": images, "images_to_cherry_pick": 1,
                                                      "super_res": False, "seed": seed}}]}


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def write_keys(path: Path, text: str) -> None:
    """Replace the keys file at once, as a Secret's update does (never a half-written file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, Any]]:
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(KEYS_TEXT, encoding="utf-8")
    # 4 row slots: a running 16-image request leaves no room, so the next one waits in the queue
    for running in serve(tiny_model_dir, "--api_keys", str(keys), "--tenant_queue_size", "1",
                         "--max_batch_images", "4", "--log_format", "json"):
        yield {**running, "keys": keys}


# ---- refused without a valid key -----------------------------------------------------------------------

# (method, path, protocol's error shape): every generating and job route.
PROTECTED = [
    ("POST", PREDICT, "plain"),
    ("POST", JOBS, "plain"),
    ("GET", JOBS, "plain"),
    ("GET", f"{JOBS}/0123456789abcdef", "plain"),
    ("DELETE", f"{JOBS}/0123456789abcdef", "plain"),
    ("GET", f"{JOBS}/0123456789abcdef/events", "plain"),
    ("POST", INFER, "plain"),
    ("POST", GENERATIONS, "openai"),
]


@pytest.mark.parametrize(("method", "path", "shape"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_no_key_another_scheme_and_a_wrong_key_get_401_with_the_bearer_challenge(srv, method, path, shape):
    # The body is not even JSON: the key is checked first, so the caller learns nothing of the schema.
    sent = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    cases = {
        "missing": ({}, "Bearer"),
        "another scheme": ({"Authorization": f"Basic {TOKEN_A}"}, "Bearer"),
        "unknown key": (bearer(WRONG), 'Bearer error="invalid_token"'),
        "a key's digest": (bearer(DIGEST_B), 'Bearer error="invalid_token"'),
    }
    for case, (headers, challenge) in cases.items():
        r = httpx.request(method, srv["base"] + path, content=sent["content"], timeout=10,
                          headers={**sent["headers"], **headers})
        assert r.status_code == 401, (case, r.status_code, r.text)
        assert r.headers["www-authenticate"] == challenge, case
        error = r.json()["error"]
        if shape == "openai":
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error", error
            assert error["param"] is None
            message = error["message"]
        else:
            message = error
        assert "Bearer" in message or "not valid" in message, message
        for token in EVERY_TOKEN:
            assert token not in r.text, case


OPEN = ["/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json", "/docs", f"/v1/models/{NAME}",
        "/v1/models", "/", f"/v1/models/{NAME}/card", "/openai/v1/models"]


@pytest.mark.parametrize("path", OPEN)
def test_probes_metrics_and_the_docs_answer_without_a_key(srv, path):
    r = httpx.get(srv["base"] + path, timeout=10)
    assert r.status_code == 200, r.text


def test_the_page_and_its_html_are_served_without_a_key(srv):
    r = httpx.get(srv["base"] + "/", headers={"Accept": "text/html"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def test_the_api_document_declares_the_bearer_scheme_on_the_protected_routes_only(srv):
    doc = httpx.get(srv["base"] + "/openapi.json", timeout=10).json()
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    secured = {(method.upper(), path) for path, item in doc["paths"].items()
               for method, op in item.items() if "security" in op}
    templates = {("POST", "/v1/models/{model_name}:predict"), ("POST", "/v1/models/{model_name}/jobs"),
                 ("GET", "/v1/models/{model_name}/jobs"), ("GET", "/v1/models/{model_name}/jobs/{job_id}"),
                 ("DELETE", "/v1/models/{model_name}/jobs/{job_id}"),
                 ("GET", "/v1/models/{model_name}/jobs/{job_id}/events"),
                 ("POST", "/v2/models/{model_name}/infer"), ("POST", GENERATIONS)}
    assert secured == templates
    for method, path in templates:
        responses = doc["paths"][path][method.lower()]["responses"]
        assert "WWW-Authenticate" in responses["401"]["headers"], (method, path)
    predict = doc["paths"]["/v1/models/{model_name}:predict"]["post"]["responses"]
    assert "Retry-After" in predict["429"]["headers"]  # --tenant_queue_size is set
    assert "429" not in doc["paths"]["/v1/models/{model_name}/jobs/{job_id}"]["get"]["responses"]


# ---- each protocol with the right key ------------------------------------------------------------------


def test_v1_with_kserves_rest_client_is_refused_without_a_key_and_answered_with_one(srv):
    async def predict(headers: dict[str, str] | None) -> Any:
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=300))
        try:
            return await client.infer(srv["base"], body(seed=5), model_name=NAME, headers=headers)
        finally:
            await client.close()

    with pytest.raises(httpx.HTTPStatusError) as refused:
        asyncio.run(predict(None))
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["www-authenticate"] == "Bearer"
    answer = asyncio.run(predict(bearer(TOKEN_A)))
    assert answer["ok"] is True and len(answer["images"]) == 1 and answer["seed"] == 5


def triton_inputs() -> list[triton_http.InferInput]:
    arrays = {"query": np.array(["кот".encode()], dtype=object), "images_to_gen": np.array([1], np.int32),
              "super_res": np.array([False]), "seed": np.array([6], np.int64)}
    inputs = []
    for name, array in arrays.items():
        tensor = triton_http.InferInput(name, list(array.shape), triton_http.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)  # binary, after the JSON
        inputs.append(tensor)
    return inputs


def test_v2_rest_with_tritonclient_carries_the_401_and_works_with_a_key(srv):
    client = triton_http.InferenceServerClient(srv["hostport"], network_timeout=300, connection_timeout=300)
    for headers in (None, bearer(WRONG)):
        with pytest.raises(InferenceServerException) as refused:
            client.infer(NAME, triton_inputs(), headers=headers)
        assert refused.value.status() == "401" and WRONG not in str(refused.value)
    result = client.infer(NAME, triton_inputs(), headers=bearer(TOKEN_B))
    assert len(result.as_numpy("images")) == 1 and result.as_numpy("seed").tolist() == [6]


# tritonclient.grpc in its own process; prints the outcome of each call as JSON.
TRITON_GRPC = """
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException

url, name, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = g.InferenceServerClient(url)
query = g.InferInput("query", [1], "BYTES")
query.set_data_from_numpy(np.array(["кот".encode()], dtype=object))
count = g.InferInput("images_to_gen", [1], "INT32")
count.set_data_from_numpy(np.array([1], dtype=np.int32))
upscale = g.InferInput("super_res", [1], "BOOL")
upscale.set_data_from_numpy(np.array([False]))
out = {"live": client.is_server_live(), "ready": client.is_model_ready(name),
       "inputs": len(client.get_model_metadata(name).inputs), "calls": []}
for token in tokens:
    headers = {"authorization": f"Bearer {token}"} if token else None
    try:
        result = client.infer(name, [query, count, upscale], headers=headers, client_timeout=300)
        out["calls"].append(["OK", len(result.as_numpy("images"))])
    except InferenceServerException as exc:
        out["calls"].append([exc.status(), exc.message()])
print(json.dumps(out))
"""


def test_grpc_model_infer_with_tritonclient_is_unauthenticated_without_a_valid_key(srv):
    run = subprocess.run(
        [sys.executable, "-c", TRITON_GRPC, srv["grpc"], NAME, json.dumps(["", WRONG, TOKEN_A])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    # the other methods stay open
    assert got["live"] is True and got["ready"] is True and got["inputs"] > 0
    (no_key, no_key_message), (wrong, wrong_message), ok = got["calls"]
    assert no_key == wrong == "StatusCode.UNAUTHENTICATED"
    assert "authorization" in no_key_message and "not valid" in wrong_message and WRONG not in wrong_message
    assert ok == ["OK", 1]


def test_grpc_refuses_before_reading_the_message_and_sends_the_challenge(srv):
    channel = grpc.insecure_channel(srv["grpc"])
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        bad = pb.ModelInferRequest(model_name=NAME)  # no inputs: INVALID_ARGUMENT once authenticated
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(bad, timeout=30, metadata=(("authorization", f"Bearer {WRONG}"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(refused.value.trailing_metadata())["www-authenticate"] == 'Bearer error="invalid_token"'
        with pytest.raises(grpc.RpcError) as invalid:
            stub.ModelInfer(bad, timeout=30, metadata=(("authorization", f"Bearer {TOKEN_A}"),))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


def test_openai_client_raises_authentication_error_for_a_wrong_key_and_generates_with_a_right_one(srv):
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{srv['base']}/openai/v1", api_key=key, timeout=300, max_retries=0)

    with pytest.raises(openai.AuthenticationError) as refused:
        client(WRONG).images.generate(model=NAME, prompt="кот", size="256x256")
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert WRONG not in str(refused.value)
    r = client(TOKEN_B).images.generate(model=NAME, prompt="кот", size="256x256", extra_body={"seed": 8})
    assert len(r.data) == 1 and base64.b64decode(r.data[0].b64_json).startswith(b"\x89PNG")


# ---- jobs are the tenant's own ------------------------------------------------------------------------


def submit(base: str, token: str, payload: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {**bearer(token), **({"Idempotency-Key": key} if key else {})}
    r = httpx.post(f"{base}{JOBS}", json=payload, headers=headers, timeout=30)
    assert r.status_code in (200, 202), r.text
    return r


def listed(base: str, token: str) -> set[str]:
    r = httpx.get(f"{base}{JOBS}", headers=bearer(token), timeout=10)
    assert r.status_code == 200, r.text
    return {job["id"] for job in r.json()["jobs"]}


def test_a_tenant_sees_only_its_own_jobs_another_tenants_id_is_a_404(srv):
    base = srv["base"]
    submitted = metric(base, "kandinsky_jobs_submitted_total", '{tenant="A"}')
    job_id = submit(base, TOKEN_A, body(seed=9)).json()["id"]
    assert metric(base, "kandinsky_jobs_submitted_total", '{tenant="A"}') == submitted + 1
    unknown = httpx.get(f"{base}{JOBS}/{'f' * 32}", headers=bearer(TOKEN_B), timeout=10)
    assert unknown.status_code == 404
    for method, suffix in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        r = httpx.request(method, f"{base}{JOBS}/{job_id}{suffix}", headers=bearer(TOKEN_B), timeout=10)
        assert r.status_code == 404, (method, suffix, r.text)
        # exactly as an unknown id: nothing says the job exists
        assert r.json()["error"] == unknown.json()["error"].replace("f" * 32, job_id)
    assert job_id not in listed(base, TOKEN_B)
    assert job_id in listed(base, TOKEN_A)
    with httpx.stream("GET", f"{base}{JOBS}/{job_id}/events", headers=bearer(TOKEN_A), timeout=60) as events:
        assert events.status_code == 200
        text = "".join(events.iter_text())
    assert "event: status" in text and "event: succeeded" in text
    job = httpx.get(f"{base}{JOBS}/{job_id}", headers=bearer(TOKEN_A), timeout=10).json()
    assert job["status"] == "succeeded"  # B's DELETE did not cancel it
    assert not any(token in json.dumps(job) for token in EVERY_TOKEN)


def test_idempotency_keys_are_per_tenant(srv):
    base, key = srv["base"], f"same-key-{secrets.token_hex(4)}"
    first_a = submit(base, TOKEN_A, body(seed=10), key)
    first_b = submit(base, TOKEN_B, body(seed=10), key)
    again_a = submit(base, TOKEN_A, body(seed=10), key)
    assert first_a.status_code == first_b.status_code == 202 and again_a.status_code == 200
    assert first_a.json()["id"] != first_b.json()["id"]
    assert again_a.json()["id"] == first_a.json()["id"]


# ---- a tenant's full queue -----------------------------------------------------------------------------


def test_a_tenants_full_queue_is_a_429_in_every_protocols_shape_and_other_tenants_go_on(srv):
    base = srv["base"]
    running = submit(base, TOKEN_A, body(seed=11, images=16)).json()["id"]

    def status(job_id: str) -> str:
        return httpx.get(f"{base}{JOBS}/{job_id}", headers=bearer(TOKEN_A), timeout=10).json()["status"]

    wait_for(lambda: status(running) == "running")
    queued = submit(base, TOKEN_A, body(seed=12)).json()["id"]  # A's one waiting request
    try:
        assert status(queued) == "queued"
        for path, payload in ((PREDICT, body(seed=13)), (JOBS, body(seed=13))):
            r = httpx.post(base + path, json=payload, headers=bearer(TOKEN_A), timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "5", (path, r.text)
            assert "--tenant_queue_size" in r.json()["error"]
        v2 = {"inputs": [{"name": "query", "shape": [1], "datatype": "BYTES", "data": ["кот"]}]}
        r = httpx.post(base + INFER, json=v2, headers=bearer(TOKEN_A), timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "5" and "error" in r.json(), r.text
        limited = openai.OpenAI(base_url=f"{base}/openai/v1", api_key=TOKEN_A, timeout=30, max_retries=0)
        with pytest.raises(openai.RateLimitError) as rate:
            limited.images.generate(model=NAME, prompt="кот", size="256x256")
        assert rate.value.code == "rate_limit_exceeded" and rate.value.response.headers["retry-after"] == "5"
        channel = grpc.insecure_channel(srv["grpc"])
        try:
            query = pb.ModelInferRequest.InferInputTensor(name="query", datatype="BYTES", shape=[1],
                                                          contents=pb.InferTensorContents(bytes_contents=[b"x"]))
            message = pb.ModelInferRequest(model_name=NAME, inputs=[query])
            with pytest.raises(grpc.RpcError) as exhausted:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    message, timeout=30, metadata=(("authorization", f"Bearer {TOKEN_A}"),))
            assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(exhausted.value.trailing_metadata()).get("retry-after") == "5"
        finally:
            channel.close()
        # B's queue is its own
        other = submit(base, TOKEN_B, body(seed=14)).json()["id"]
        httpx.delete(f"{base}{JOBS}/{other}", headers=bearer(TOKEN_B), timeout=10)
    finally:
        for job_id in (queued, running):
            httpx.delete(f"{base}{JOBS}/{job_id}", headers=bearer(TOKEN_A), timeout=10)
    wait_for(lambda: status(running) == "cancelled" and status(queued) == "cancelled")


# ---- the keys file, edited while the server runs ----------------------------------------------------------


def answers(base: str, token: str) -> int:
    return httpx.get(f"{base}{JOBS}", headers=bearer(token), timeout=10).status_code


def test_an_edited_keys_file_takes_effect_and_a_broken_edit_keeps_the_keys_in_force(srv):
    base, path = srv["base"], srv["keys"]
    assert answers(base, TOKEN_C) == 401
    try:
        write_keys(path, KEYS_TEXT + f"C {TOKEN_C}\n")
        wait_for(lambda: answers(base, TOKEN_C) == 200)  # a new key works within seconds
        write_keys(path, f"A {TOKEN_A} weight=2\nC {TOKEN_C}\n")
        wait_for(lambda: answers(base, TOKEN_B) == 401)  # a removed one is refused
        assert answers(base, TOKEN_A) == 200 and answers(base, TOKEN_C) == 200

        errors = re.compile(r"API keys not reloaded, the keys in force are kept: .* line 3: ")
        write_keys(path, f"A {TOKEN_A} weight=2\nC {TOKEN_C}\nbroken-line-with-one-field\n")
        wait_for(lambda: any(errors.search(line) for line in list(srv["lines"])))
        time.sleep(2.5)  # two more looks at the unchanged broken file: still one error, not one a second
        assert len([line for line in list(srv["lines"]) if errors.search(line)]) == 1
        assert answers(base, TOKEN_A) == 200 and answers(base, TOKEN_C) == 200
        assert answers(base, TOKEN_B) == 401
        assert file_ok(base) == 0  # what an alert watches: the edit in the Secret is not in force
    finally:
        write_keys(path, KEYS_TEXT)
    wait_for(lambda: answers(base, TOKEN_B) == 200 and answers(base, TOKEN_C) == 401)
    assert file_ok(base) == 1


def file_ok(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return float(re.search(r"^kandinsky_api_keys_file_ok (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


# ---- a handler reached without the middleware's tenant -------------------------------------------------


def test_a_handler_never_runs_as_nobodys_even_where_the_middleware_did_not_authenticate(tmp_path):
    from starlette.requests import Request

    from app.serving.core.errors import Unauthenticated
    from app.serving.core.tenants import ApiKeys
    from app.serving.model import KandinskyModel, ServerSettings
    from app.serving.protocols.routes import TENANT_STATE

    keys = tmp_path / "api_keys"
    keys.write_text(KEYS_TEXT, encoding="utf-8")
    ctx = KandinskyModel(NAME, ServerSettings()).context
    keyed = type(ctx)(ctx.name, ctx.service, ctx.jobs, ctx.settings, ctx.card, ApiKeys.load(keys))

    def request(headers: dict[str, str], state: dict[str, Any] | None = None) -> Request:
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return Request({"type": "http", "method": "HEAD", "path": JOBS, "headers": raw,
                        **({"state": state} if state is not None else {})})

    assert ctx.tenant(request({})) is None  # no keys asked for: nobody's, as before
    with pytest.raises(Unauthenticated) as refused:
        keyed.tenant(request(bearer(WRONG)))
    assert WRONG not in refused.value.message
    assert keyed.tenant(request(bearer(TOKEN_B))) == "B"
    assert keyed.tenant(request({}, {TENANT_STATE: "A"})) == "A"  # as the middleware named it


# ---- last: no token anywhere --------------------------------------------------------------------------


def logged(line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def test_no_token_reaches_the_log_or_metrics_while_tenant_names_do(srv):
    time.sleep(0.5)  # the access lines of the last requests reach the pipe
    log = "".join(list(srv["lines"]))
    metrics = httpx.get(srv["base"] + "/metrics", timeout=10).text
    for token in EVERY_TOKEN:
        assert token not in log and token not in metrics
    access = [entry for entry in map(logged, log.splitlines()) if entry.get("logger") == "app.access"]
    for name in ("A", "B"):
        # the text line names it, and the JSON record has it as a field
        assert any(f" tenant={name}" in e["message"] and e["tenant"] == name for e in access), name
        ok = rf'^kandinsky_requests_total{{code="200",protocol="\w+",tenant="{name}"}} [1-9]'
        assert re.search(ok, metrics, re.M), name
    assert any('"gRPC ModelInfer" OK' in e["message"] and e["tenant"] == "A" for e in access)
    assert any(e["status"] == 401 and e["tenant"] is None and "tenant=" not in e["message"] for e in access)
    assert re.search(r'^kandinsky_jobs_submitted_total\{tenant="B"\} [1-9]', metrics, re.M)
    assert re.search(r'^kandinsky_requests_total\{code="401",protocol="v1",tenant=""\} [1-9]', metrics, re.M)
    assert set(re.findall(r'tenant="([^"]*)"', metrics)) <= {"", "A", "B", "C"}
