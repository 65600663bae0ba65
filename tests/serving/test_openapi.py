"""`/openapi.json` and `/docs` on KServe's real app: every served route documented with its real statuses and
bodies, no 422, `/metrics` as text, and a Swagger UI that loads nothing from the internet.

Real responses are checked against the document here for the routes that need no generation, and for a
job's event stream (documented as the array of its events `{event, data}`); the schemathesis run in
test_openapi_fuzz.py checks every route, predict and the streams included, on a real server process.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import APIRouter, FastAPI
from httpx_sse import aconnect_sse

from app.engine.pipeline import Pipeline
from app.serving.core.card import CARD_PATH
from app.serving.core.schema import CATALOG_EXAMPLE, Limits, Schema
from app.serving.model import KandinskyModel, ServerSettings
from app.serving.protocols.routes import Operation
from app.serving.web.app import build_table
from app.serving.web.openapi import (
    DOCS_STATIC_PATH,
    EVENT_STREAM,
    TITLE,
    build_openapi,
    install_openapi,
    undocumented_routes,
)
from tests.support import build_app

NAME = "kandinsky"
PREDICT = "/v1/models/{model_name}:predict"
JOBS = "/v1/models/{model_name}/jobs"
JOB_EVENTS = JOBS + "/{job_id}/events"
OPENAI_GENERATIONS = "/openai/v1/images/generations"
# SPEC.md section 7: a job's events and their data (a component, or the predict response).
JOB_EVENT_DATA = {"status": "JobView", "progress": "JobProgressView", "preview": "JobPreview",
                  "succeeded": "Prediction|MultiPrediction|JobView", "failed": "JobFailure",
                  "cancelled": "JobView"}

# SPEC.md section 3: what each route answers (and nothing else).
STATUSES: dict[tuple[str, str], set[int]] = {
    ("POST", PREDICT): {200, 400, 404, 408, 413, 415, 500, 503, 504},
    ("GET", "/v1/models"): {200},
    ("GET", "/v1/models/{model_name}"): {200, 404, 503},
    ("GET", CARD_PATH): {200, 404, 503},
    ("GET", "/v2"): {200},
    ("GET", "/v2/models"): {200},
    ("GET", "/v2/models/{model_name}"): {200, 400, 404},
    ("GET", "/v2/models/{model_name}/ready"): {200, 404, 503},
    ("GET", "/"): {200, 503},
    # SPEC.md section 8: the Open Inference Protocol.
    ("POST", "/v2/models/{model_name}/infer"): {200, 400, 404, 408, 413, 500, 503, 504},
    ("POST", "/openai/v1/images/generations"): {200, 400, 404, 408, 413, 500, 503, 504},
    ("GET", "/openai/v1/models"): {200},
    # SPEC.md section 7: jobs.
    ("POST", "/v1/models/{model_name}/jobs"): {200, 202, 400, 404, 408, 409, 413, 415, 503},
    ("GET", "/v1/models/{model_name}/jobs"): {200, 400, 404},
    ("GET", "/v1/models/{model_name}/jobs/{job_id}"): {200, 404},
    ("DELETE", "/v1/models/{model_name}/jobs/{job_id}"): {200, 404, 409},
    ("GET", "/v1/models/{model_name}/jobs/{job_id}/events"): {200, 404},
    ("GET", "/v2/health/live"): {200, 503},
    ("GET", "/v2/health/ready"): {200, 503},
    ("GET", "/metrics"): {200},
}

# KServe routes this model does not serve: configure_app shadows them with 404s (left out of the document).
KSERVE_UNSERVED = {
    ("POST", "/v1/models/{model_name}:explain"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}/ready"),
    ("POST", "/v2/models/{model_name}/versions/{model_version}/infer"),
    ("POST", "/v2/repository/models/{model_name}/load"),
    ("POST", "/v2/repository/models/{model_name}/unload"),
}


def install(app: FastAPI, model: KandinskyModel) -> None:
    """Our API document on an app, from the route table of every protocol."""
    install_openapi(app, build_table(model.context), model.service)


def kserve_app(model: KandinskyModel) -> FastAPI:
    """KServe's app as the server builds it, with our OpenAPI installed (idempotent once configure_app
    installs it itself)."""
    app = build_app(model)
    install(app, model)
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


@pytest.fixture(scope="module")
def spec_app() -> tuple[KandinskyModel, FastAPI]:
    """An app whose model has its request schema (2 images per request, 64 image tokens), not loaded."""
    model = KandinskyModel(NAME, ServerSettings(max_images_per_request=2))
    model.service.schema = Schema(Limits(2, 64))
    return model, kserve_app(model)


@pytest.fixture(scope="module")
def doc(spec_app) -> dict[str, Any]:
    _, app = spec_app
    return app.openapi()


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]


def schema_of(doc: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    content = operation(doc, method, path)["responses"][str(status)]["content"]["application/json"]
    return content["schema"]


def assert_matches(doc: dict[str, Any], schema: dict[str, Any], value: Any) -> None:
    validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
    errors = [e.message for e in validator.iter_errors(value)]
    assert not errors, (value, errors)


def stream_schema(doc: dict[str, Any], method: str, path: str, status: int = 200) -> dict[str, Any]:
    return operation(doc, method, path)["responses"][str(status)]["content"][EVENT_STREAM]["schema"]


def event_data(stream: dict[str, Any]) -> dict[str, str]:
    """Event name -> its data's component name(s), from a documented stream's items."""
    out = {}
    for event in stream["items"]["oneOf"]:
        assert event["type"] == "object" and event["required"] == ["event", "data"]
        assert event["additionalProperties"] is False
        data = event["properties"]["data"]
        refs = [data] if "$ref" in data else data["oneOf"]
        out[event["properties"]["event"]["const"]] = "|".join(r["$ref"].rsplit("/", 1)[1] for r in refs)
    return out


# ---- the table against the app --------------------------------------------------------------------


def test_every_served_route_is_documented(spec_app):
    _, app = spec_app
    assert undocumented_routes(app) == [], "declare these routes in their protocol's routes()"


def test_a_new_route_without_a_table_entry_is_reported():
    model = KandinskyModel(NAME)
    app = FastAPI()
    install(app, model)
    app.add_api_route("/v1/extra", lambda: {}, methods=["GET"])
    router = APIRouter(prefix="/v3")
    router.add_api_route("/thing", lambda: {}, methods=["POST"])
    app.include_router(router)
    assert undocumented_routes(app) == [("GET", "/v1/extra"), ("POST", "/v3/thing")]
    assert "/v1/extra" not in app.openapi()["paths"]


def test_a_route_shadowed_by_a_hidden_one_is_not_served_and_not_documented():
    model = KandinskyModel(NAME)
    app = FastAPI()
    install(app, model)
    app.add_api_route("/v2/models/{model_name}/infer", lambda: {}, methods=["POST"], include_in_schema=False)
    app.add_api_route("/metrics", lambda: "", methods=["GET"])
    router = APIRouter(prefix="/v2")
    router.add_api_route("/models/{model_name}/infer", lambda: {}, methods=["POST"])  # KServe's, shadowed
    app.include_router(router)
    assert undocumented_routes(app) == []
    assert list(app.openapi()["paths"]) == ["/metrics"]


def test_the_table_documents_exactly_the_spec_statuses():
    operations = build_table(KandinskyModel(NAME).context).operations()
    assert {key: {op.ok_status, *op.other_ok, *op.errors} for key, op in operations.items()} == STATUSES


def test_document_lists_the_served_routes_with_their_statuses_and_no_422(doc):
    documented = {(m.upper(), p): set(map(int, op["responses"])) for p, item in doc["paths"].items()
                  for m, op in item.items()}
    assert documented == STATUSES
    text = str(doc)
    assert "422" not in text and "ValidationError" not in text
    assert not any(key in KSERVE_UNSERVED for key in documented)
    assert "/docs" not in doc["paths"] and "/openapi.json" not in doc["paths"]
    assert not any(p.startswith(DOCS_STATIC_PATH) for p in doc["paths"])


def test_info_names_this_server_and_its_version(doc):
    from app import __version__

    assert doc["info"]["title"] == TITLE and doc["info"]["version"] == __version__
    assert NAME in doc["info"]["description"]


def test_every_ref_resolves_and_schemathesis_loads_the_document(doc):
    import schemathesis

    refs = set(re.findall(r"#/components/schemas/([\w.-]+)", str(doc)))
    assert refs <= set(doc["components"]["schemas"])
    schema = schemathesis.openapi.from_dict(doc)
    assert len(list(schema.get_all_operations())) == len(STATUSES)


def test_predict_documents_body_example_both_success_shapes_and_error_bodies(doc):
    post = operation(doc, "POST", PREDICT)
    body = post["requestBody"]["content"]["application/json"]
    assert body["example"] == CATALOG_EXAMPLE and body["schema"]["$ref"].endswith("/PredictRequest")
    params = doc["components"]["schemas"]["GenerationParams"]["properties"]
    assert params["images_to_gen"]["maximum"] == 2 and params["top_k"]["maximum"] == 64
    ok = schema_of(doc, "POST", PREDICT, 200)
    assert [r["$ref"].rsplit("/", 1)[1] for r in ok["oneOf"]] == ["Prediction", "MultiPrediction"]
    for status in (400, 404, 408, 413, 415, 503, 504):
        assert schema_of(doc, "POST", PREDICT, status)["$ref"].endswith("/ErrorBody")
    failure = doc["components"]["schemas"]["FailureBody"]
    assert failure["required"] == ["ok", "error"] and failure["properties"]["ok"]["const"] is False
    assert schema_of(doc, "POST", PREDICT, 500)["$ref"].endswith("/FailureBody")
    prediction = doc["components"]["schemas"]["Prediction"]
    assert set(prediction["required"]) == {"ok", "images", "clip_scores", "seed", "ppl", "timings"}


def test_job_streams_are_documented_as_the_array_of_their_events(doc):
    events = operation(doc, "GET", JOB_EVENTS)["responses"]["200"]
    assert list(events["content"]) == [EVENT_STREAM]
    schema = stream_schema(doc, "GET", JOB_EVENTS)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert event_data(schema) == JOB_EVENT_DATA
    # Exactly one final event.
    assert schema["contains"]["properties"]["event"]["enum"] == ["succeeded", "failed", "cancelled"]
    assert schema["minContains"] == schema["maxContains"] == 1
    assert "`event:`" in events["description"] and "`data:`" in events["description"]
    # The streamed submit answers the same stream, or the existing job of a reused Idempotency-Key.
    submitted = operation(doc, "POST", JOBS)["responses"]
    assert list(submitted["200"]["content"]) == ["application/json", EVENT_STREAM]
    assert schema_of(doc, "POST", JOBS, 200)["$ref"].endswith("/JobView")
    assert stream_schema(doc, "POST", JOBS) == schema
    assert list(submitted["202"]["content"]) == ["application/json"]
    preview = doc["components"]["schemas"]["JobPreview"]
    assert set(preview["required"]) == {"step", "instance", "images"}


def test_openai_stream_is_documented_as_the_array_of_its_events(doc):
    assert list(operation(doc, "POST", OPENAI_GENERATIONS)["responses"]["200"]["content"]) == [
        "application/json", EVENT_STREAM]
    schema = stream_schema(doc, "POST", OPENAI_GENERATIONS)
    assert schema["type"] == "array" and "contains" not in schema
    assert event_data(schema) == {
        "image_generation.partial_image": "ImageGenPartialImageEvent",
        "image_generation.completed": "ImageGenCompletedEvent",
        "error": "OpenAIErrorBody",
    }
    partial = doc["components"]["schemas"]["ImageGenPartialImageEvent"]["properties"]
    assert partial["type"]["const"] == "image_generation.partial_image"


def test_a_documented_stream_names_its_status_and_final_events():
    with pytest.raises(ValueError, match="not a success status"):
        Operation("x", "Jobs", None, stream_events={"a": {}}, stream_status=201)
    with pytest.raises(ValueError, match="undeclared stream events"):
        Operation("x", "Jobs", None, stream_events={"a": {}}, stream_final=("b",))
    with pytest.raises(ValueError, match="without stream_events"):
        Operation("x", "Jobs", None, stream_final=("b",))


# SPEC.md section 12: the routes that need an API key, and those that answer a tenant's full queue.
SECURED = {key for key in STATUSES if key[1].startswith("/v1/models/{model_name}/jobs")} | {
    ("POST", PREDICT), ("POST", "/v2/models/{model_name}/infer"), ("POST", OPENAI_GENERATIONS)}
TENANT_LIMITED = {("POST", PREDICT), ("POST", JOBS), ("POST", "/v2/models/{model_name}/infer"),
                  ("POST", OPENAI_GENERATIONS)}


def test_without_api_keys_the_document_asks_for_no_key(doc):
    assert "securitySchemes" not in doc["components"]
    assert not any("security" in op or "401" in op["responses"] or "429" in op["responses"]
                   for item in doc["paths"].values() for op in item.values())


def test_with_api_keys_the_document_declares_bearer_on_the_generating_and_job_routes(spec_app):
    model, app = spec_app
    doc = build_openapi(app, build_table(model.context), model.service, api_keys=True, tenant_queue=True)
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert {key for key, op in ops.items() if op.get("security") == [{"bearerAuth": []}]} == SECURED
    assert {key for key, op in ops.items() if "401" in op["responses"]} == SECURED
    assert {key for key, op in ops.items() if "429" in op["responses"]} == TENANT_LIMITED
    for key in SECURED:
        refused = ops[key]["responses"]["401"]
        assert refused["headers"]["WWW-Authenticate"]["required"] is True, key
        body = "OpenAIErrorBody" if key[1] == OPENAI_GENERATIONS else "ErrorBody"
        assert refused["content"]["application/json"]["schema"]["$ref"].endswith(f"/{body}"), key
    for key in TENANT_LIMITED:
        assert ops[key]["responses"]["429"]["headers"]["Retry-After"]["required"] is True, key
    assert "Bearer <key>" in doc["info"]["description"]
    assert not re.search(r"Bearer [A-Za-z0-9]", json.dumps(doc))  # no key in any example
    import schemathesis

    assert len(list(schemathesis.openapi.from_dict(doc).get_all_operations())) == len(STATUSES)


def test_every_503_documents_retry_after(doc):
    for item in doc["paths"].values():
        for op in item.values():
            if "503" in op["responses"]:
                header = op["responses"]["503"]["headers"]["Retry-After"]
                assert header["required"] is True and header["schema"]["type"] == "integer"


def test_metrics_are_documented_as_prometheus_text(doc):
    content = operation(doc, "GET", "/metrics")["responses"]["200"]["content"]
    assert set(content) == {"text/plain", "application/openmetrics-text"}


def test_model_name_parameter_is_documented_with_an_example(doc):
    param = operation(doc, "GET", "/v1/models/{model_name}")["parameters"][0]
    assert param["name"] == "model_name" and param["in"] == "path" and param["example"] == NAME
    assert re.fullmatch(param["schema"]["pattern"], NAME) and not re.search(param["schema"]["pattern"], "a/b")


def test_document_without_a_loaded_model_is_not_cached():
    model = KandinskyModel(NAME)
    app = kserve_app(model)
    first = app.openapi()
    assert "requestBody" not in operation(first, "POST", PREDICT)
    model.service.schema = Schema(Limits(16, 8192))
    second = app.openapi()
    assert "requestBody" in operation(second, "POST", PREDICT)
    assert app.openapi() is second  # cached from now on


def test_build_openapi_describes_the_routes_present_when_it_is_called(spec_app):
    model, _ = spec_app
    app = FastAPI()
    install(app, model)
    table = build_table(model.context)
    assert build_openapi(app, table, model.service)["paths"] == {}
    app.add_api_route("/metrics", lambda: "", methods=["GET"])
    assert list(build_openapi(app, table, model.service)["paths"]) == ["/metrics"]


# ---- real responses against the document ----------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


async def test_real_responses_match_the_documented_schemas(pipeline):
    model = KandinskyModel(NAME, ServerSettings(max_images_per_request=2))
    app = kserve_app(model)
    async with client(app) as c:
        not_ready = {path: await c.get(path) for path in (f"/v1/models/{NAME}", f"/v1/models/{NAME}/card")}
        model.attach(pipeline)
        try:
            doc = (await c.get("/openapi.json")).json()
            checks = {
                ("/v1/models", "/v1/models"): 200,
                ("/v1/models/{model_name}", f"/v1/models/{NAME}"): 200,
                ("/v1/models/{model_name}", "/v1/models/nope"): 404,
                (CARD_PATH, f"/v1/models/{NAME}/card"): 200,
                (CARD_PATH, "/v1/models/nope/card"): 404,
                ("/v2", "/v2"): 200,
                ("/v2/models", "/v2/models"): 200,
                ("/v2/models/{model_name}", f"/v2/models/{NAME}"): 200,
                ("/v2/models/{model_name}", "/v2/models/nope"): 404,
                ("/v2/models/{model_name}/ready", f"/v2/models/{NAME}/ready"): 200,
                ("/v2/models/{model_name}/ready", "/v2/models/nope/ready"): 404,
            }
            for (template, path), status in checks.items():
                r = await c.get(path)
                assert r.status_code == status, (path, r.text)
                assert_matches(doc, schema_of(doc, "GET", template, status), r.json())
            bad = await c.post(f"/v1/models/{NAME}:predict", json={"instances": []})
            assert bad.status_code == 400
            assert_matches(doc, schema_of(doc, "POST", PREDICT, 400), bad.json())
            metrics = await c.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
        finally:
            model.stop()
    pairs = (("/v1/models/{model_name}", f"/v1/models/{NAME}"), (CARD_PATH, f"/v1/models/{NAME}/card"))
    for template, path in pairs:
        r = not_ready[path]
        assert r.status_code == 503 and r.headers["retry-after"], (path, r.text)
        assert_matches(doc, schema_of(doc, "GET", template, 503), r.json())


async def read_stream(c: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> list[dict[str, Any]]:
    """A stream read with httpx-sse (as the command-line client reads it) into the documented array."""
    async with aconnect_sse(c, method, url, **kwargs) as source:
        assert source.response.status_code == 200, await source.response.aread()
        return [{"event": sse.event, "data": json.loads(sse.data)} async for sse in source.aiter_sse()]


async def test_a_real_jobs_stream_matches_the_documented_array_of_events(pipeline):
    model = KandinskyModel(NAME, ServerSettings(max_images_per_request=2))
    app = kserve_app(model)
    params = {"images_to_gen": 1, "images_to_cherry_pick": 1, "super_res": False, "seed": 3,
              "preview_every": 16}
    async with client(app) as c:
        model.attach(pipeline)
        try:
            doc = (await c.get("/openapi.json")).json()
            url = f"/v1/models/{NAME}/jobs"
            body = {"instances": [{"query": "кот", "params": params}]}
            streamed = await read_stream(c, "POST", url, json=body, headers={"Accept": EVENT_STREAM})
            job_id = streamed[0]["data"]["id"]
            finished = await read_stream(c, "GET", f"{url}/{job_id}/events")
        finally:
            model.stop()
    names = [e["event"] for e in streamed]
    assert names[0] == "status" and names[-1] == "succeeded" and {"progress", "preview"} <= set(names)
    assert_matches(doc, stream_schema(doc, "POST", JOBS), streamed)
    assert [e["event"] for e in finished] == ["status", "succeeded"]
    assert_matches(doc, stream_schema(doc, "GET", JOB_EVENTS), finished)
    # Every kind of event validates, and only as what it is: a failed job's stream; a stream with no end.
    failed = [finished[0], {"event": "failed", "data": {"error": "CUDA out of memory"}}]
    assert_matches(doc, stream_schema(doc, "GET", JOB_EVENTS), failed)
    validator = jsonschema.Draft202012Validator({**stream_schema(doc, "GET", JOB_EVENTS),
                                                 "components": doc["components"]})
    assert not validator.is_valid(finished[:1])
    assert not validator.is_valid([*finished, failed[1]])
    assert not validator.is_valid([finished[0], {"event": "failed", "data": finished[1]["data"]}])


# ---- Swagger UI -----------------------------------------------------------------------------------


LOCAL_REF = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.mark.parametrize("fastapi_docs", [False, True], ids=["kserve-default", "fastapi-cdn-docs-on"])
async def test_docs_page_loads_only_local_files(fastapi_docs):
    app = FastAPI(docs_url="/docs" if fastapi_docs else None)  # KServe's --enable_docs_url: a CDN page
    model = KandinskyModel(NAME)
    install(app, model)
    async with client(app) as c:
        page = await c.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        html = page.text
        assert "SwaggerUIBundle" in html
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
        refs = [a or b for a, b in LOCAL_REF.findall(html)]
        assert "/openapi.json" in refs
        assert {f"{DOCS_STATIC_PATH}/swagger-ui-bundle.js", f"{DOCS_STATIC_PATH}/swagger-ui.css"} <= set(refs)
        for ref in refs:
            assert ref.startswith("/") and not ref.startswith("//"), ref
            r = await c.get(ref)
            assert r.status_code == 200 and r.content, ref
        js = await c.get(f"{DOCS_STATIC_PATH}/swagger-ui-bundle.js")
        assert "javascript" in js.headers["content-type"] and len(js.content) > 100_000
        assert (await c.get("/docs/oauth2-redirect")).status_code == 404  # FastAPI's CDN page is gone
        assert (await c.get(f"{DOCS_STATIC_PATH}/../../app/serving/openapi.py")).status_code == 404


async def test_docs_swagger_ui_renders_openapi_3_1():
    # Swagger UI 4 refuses "openapi: 3.1.x" documents (FastAPI writes 3.1): the bundle must be 5 or later.
    from swagger_ui_bundle import swagger_ui_path

    major = int(re.search(r"swagger-ui-(\d+)\.", str(swagger_ui_path)).group(1))
    assert major >= 5, swagger_ui_path
