"""Open Inference Protocol (KServe v2) over REST, through the real server process and real clients.

One server (tiny model) serves the module. One v1 predict is the reference: every v2 client (plain JSON
over httpx as curl sends it, KServe's `InferenceRESTClient`, Triton's `tritonclient.http` with the binary
data extension) must get the same image files and CLIP scores for the same seeds. Everything else here
(metadata, readiness, client errors, the API document) costs no generation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from app.serving.model import KandinskyModel, ServerSettings
from app.serving.protocols.v2_rest import rest_body_problem
from tests.support import (
    COUNTS,
    INPUT_TYPES,
    NAME,
    OUTPUT_NAMES,
    OUTPUT_TYPES,
    PROMPT_BORDERS,
    QUERIES,
    SEEDS,
    TOP_P,
    V1_BODY,
    V2_INPUTS,
    assert_same_as_v1,
    build_app,
    client,
    metric,
    prompt_png,
    serve,
)

INFER = f"/v2/models/{NAME}/infer"


def json_inputs(inputs: dict[str, tuple[str, list[Any]]] = V2_INPUTS) -> list[dict[str, Any]]:
    return [{"name": n, "datatype": dt, "shape": [len(v)], "data": v} for n, (dt, v) in inputs.items()]


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    yield from serve(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(srv) -> dict[str, Any]:
    r = httpx.post(f"{srv['base']}/v1/models/{NAME}:predict", json=V1_BODY, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


# ---- the same images as v1, through every client -----------------------------------------------------


def test_plain_json_infer_gives_v1_images_and_scores_base64(srv, reference):
    r = httpx.post(f"{srv['base']}{INFER}", json={"id": "ref-1", "inputs": json_inputs()}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "ref-1" and body["model_name"] == NAME
    outputs = {o["name"]: o for o in body["outputs"]}
    assert list(outputs) == OUTPUT_NAMES
    for name, out in outputs.items():
        assert out["datatype"] == OUTPUT_TYPES[name]
        assert out["shape"] == [len(SEEDS) if name == "seed" else sum(COUNTS)]
    assert_same_as_v1(
        reference, [base64.b64decode(s) for s in outputs["images"]["data"]], outputs["clip_scores"]["data"],
        outputs["ppl"]["data"], outputs["instance"]["data"], outputs["seed"]["data"],
    )


def test_kserve_rest_client_v2_gives_v1_images_and_scores(srv, reference):
    async def infer() -> Any:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=300))
        try:
            inputs = [InferInput(n, [len(v)], dt, list(v)) for n, (dt, v) in V2_INPUTS.items()]
            return await client.infer(srv["base"], InferRequest(NAME, inputs), model_name=NAME)
        finally:
            await client.close()

    result = asyncio.run(infer())
    out = {o.name: o for o in result.outputs}
    assert list(out) == OUTPUT_NAMES
    assert_same_as_v1(
        reference, [base64.b64decode(s) for s in out["images"].data], out["clip_scores"].data,
        out["ppl"].data, out["instance"].data, out["seed"].data,
    )


def test_tritonclient_http_binary_data_gives_the_raw_image_files(srv, reference):
    client = triton_http.InferenceServerClient(srv["hostport"], network_timeout=300, connection_timeout=300)
    arrays = {
        "query": np.array([q.encode() for q in QUERIES], dtype=object),
        "seed": np.array(SEEDS, dtype=np.uint64),
        "images_to_gen": np.array(COUNTS, dtype=np.int64),
        "images_to_cherry_pick": np.array(COUNTS, dtype=np.int32),
        "super_res": np.array([False]),
        "format": np.array([b"png"], dtype=object),
        "top_p": np.array([TOP_P], dtype=np.float32),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = triton_http.InferInput(name, list(array.shape), triton_http.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)  # binary, after the JSON
        inputs.append(tensor)
    result = client.infer(NAME, inputs)  # no outputs named: tritonclient asks binary_data_output
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == OUTPUT_NAMES
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    assert_same_as_v1(
        reference, list(result.as_numpy("images")), result.as_numpy("clip_scores"), result.as_numpy("ppl"),
        result.as_numpy("instance"), result.as_numpy("seed"),
    )


def test_named_outputs_come_alone_in_order_each_binary_or_json_as_asked(srv, reference):
    header = json.dumps({
        "inputs": json_inputs(),
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "seed", "parameters": {"binary_data": False}}, {"name": "images"}],
    }).encode()
    r = httpx.post(f"{srv['base']}{INFER}", content=header, timeout=300,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    json_length = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.content[:json_length])
    seed, images = doc["outputs"]
    assert [seed["name"], images["name"]] == ["seed", "images"]
    assert seed["data"] == SEEDS and "data" not in images
    raw = r.content[json_length:]
    assert len(raw) == images["parameters"]["binary_data_size"]
    files, offset = [], 0
    while offset < len(raw):  # the binary data extension's BYTES: a 4-byte length before each element
        (size,) = struct.unpack_from("<I", raw, offset)
        files.append(raw[offset + 4: offset + 4 + size])
        offset += 4 + size
    clip_scores = [s for p in reference["predictions"] for s in p["clip_scores"]]
    assert_same_as_v1(reference, files, clip_scores)


# ---- metadata and readiness ----------------------------------------------------------------------------


def test_model_metadata_lists_every_input_and_output_with_datatype_and_shape(srv):
    body = httpx.get(f"{srv['base']}/v2/models/{NAME}", timeout=10).json()
    assert {i["name"]: i["datatype"] for i in body["inputs"]} == INPUT_TYPES
    assert {o["name"]: o["datatype"] for o in body["outputs"]} == OUTPUT_TYPES
    assert all(t["shape"] == [-1] for t in body["inputs"] + body["outputs"])
    triton = triton_http.InferenceServerClient(srv["hostport"]).get_model_metadata(NAME)
    assert [i["name"] for i in triton["inputs"]] == list(INPUT_TYPES)


def test_model_is_ready_once_loaded(srv):
    r = httpx.get(f"{srv['base']}/v2/models/{NAME}/ready", timeout=10)
    assert r.status_code == 200 and r.json() == {"name": NAME, "ready": True}
    assert triton_http.InferenceServerClient(srv["hostport"]).is_model_ready(NAME) is True


async def test_a_model_not_loaded_is_not_ready_and_infer_answers_503_without_loading_it(monkeypatch):
    model = KandinskyModel(NAME, ServerSettings())
    monkeypatch.setattr(model, "load", lambda: pytest.fail("v2 infer must not load the model"))
    async with client(build_app(model)) as c:
        assert (await c.get(f"/v2/models/{NAME}/ready")).status_code == 503
        r = await c.post(INFER, json={"inputs": json_inputs()})
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        meta = await c.get(f"/v2/models/{NAME}")
        assert meta.status_code == 200 and len(meta.json()["inputs"]) == len(INPUT_TYPES)


# ---- client errors: 400 naming the input, 404 for another model ------------------------------------------


def q(*queries: str) -> dict[str, Any]:
    return {"name": "query", "datatype": "BYTES", "shape": [len(queries)], "data": list(queries)}


def tensor(name: str, datatype: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


BAD_INPUTS = [
    ([tensor("seed", "INT64", [1])], "inputs.query: is required"),
    ([q("кот"), tensor("top_k", "FP32", [8.0])], "inputs.top_k: datatype FP32 is not accepted"),
    ([q("кот"), tensor("top_k", "INT32", [8, 9])], "inputs.top_k: shape [2] for 1 instance"),
    ([q("a", "b", "c"), tensor("seed", "INT64", [1, 2])], "inputs.seed: shape [2] for 3 instance"),
    ([q("кот"), tensor("top_k", "INT32", [100000])], "inputs.top_k: must be <= 64"),
    ([q("a", "b"), tensor("top_k", "INT32", [5, 100000])], "inputs.top_k[1]: must be <= 64"),
    ([q("кот"), tensor("top_p", "FP64", [1.5])], "inputs.top_p: must be <= 1"),
    ([q("кот"), tensor("temperature", "FP32", [0.0])], "inputs.temperature: must be > 0"),
    ([q("кот"), tensor("seed", "UINT64", [2**64 - 1])], "inputs.seed: must be <= 9223372036854775807"),
    ([q("кот"), tensor("images_to_gen", "INT32", [True])], "inputs.images_to_gen: must be an integer"),
    ([q("кот"), tensor("images_to_gen", "INT32", [1.5])], "inputs.images_to_gen: must be an integer"),
    ([q("кот"), tensor("super_res", "BOOL", ["yes"])], "inputs.super_res: must be true or false"),
    ([q("кот"), tensor("format", "BYTES", ["gif"])], "inputs.format: must be one of"),
    ([q("   ")], "inputs.query: must not be empty"),
    ([q("a", "b", "c")], "inputs.images_to_gen: asks for 24 images in all"),
    ([q(*["a"] * 17)], "inputs.query: 17 instances"),
    ([q("кот"), tensor("images_to_gen", "INT32", [1]), tensor("images_to_cherry_pick", "INT32", [2])],
     "inputs.images_to_cherry_pick: must be <= images_to_gen"),
    ([q("кот"), tensor("steps", "INT32", [1])], "inputs.steps: unknown input"),
    ([q("кот"), tensor("preview_every", "INT32", [1])], "inputs.preview_every: not a v2 input"),
    ([q("кот"), q("пёс")], "inputs.query: given twice"),
    ([q("кот"), tensor("top_k", "INT32", [8], [1, 1])], "inputs.top_k: shape [1, 1] is not accepted"),
    ([q("кот"), tensor("top_k", "INT32", [8, 9], [1])], "inputs.top_k: shape [1] but 2 element(s)"),
]


@pytest.mark.parametrize(("inputs", "needle"), BAD_INPUTS, ids=[f"{i}-{n.split(':')[0]}" for i, (_, n) in
                                                                 enumerate(BAD_INPUTS)])
def test_bad_input_is_a_400_naming_the_input(srv, inputs, needle):
    r = httpx.post(f"{srv['base']}{INFER}", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_nan_is_a_400_naming_the_input(srv):
    body = json.dumps({"inputs": [q("кот"), tensor("top_p", "FP64", [float("nan")])]})  # NaN: not strict JSON
    r = httpx.post(f"{srv['base']}{INFER}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("inputs.top_p: must be a finite number")


@pytest.mark.parametrize(("extra", "needle"), [
    ({"outputs": [{"name": "latents"}]}, "outputs.latents: unknown output"),
    ({"outputs": [{"name": "seed"}, {"name": "seed"}]}, "outputs.seed: requested twice"),
    ({"outputs": [{"name": "images", "parameters": {"binary_data": "yes"}}]},
     "outputs.images.parameters.binary_data: must be true or false"),
    ({"parameters": {"binary_data_output": 1}}, "parameters.binary_data_output: must be true or false"),
])
def test_bad_output_request_is_a_400_naming_it(srv, extra, needle):
    r = httpx.post(f"{srv['base']}{INFER}", json={"inputs": [q("кот")], **extra}, timeout=30)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_tritonclient_http_gets_the_400_naming_the_input(srv):
    client = triton_http.InferenceServerClient(srv["hostport"])
    query = triton_http.InferInput("query", [1], "BYTES")
    query.set_data_from_numpy(np.array(["кот".encode()], dtype=object))
    top_k = triton_http.InferInput("top_k", [1], "INT32")
    top_k.set_data_from_numpy(np.array([0], dtype=np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(NAME, [query, top_k])
    assert err.value.status() == "400" and err.value.message().startswith("inputs.top_k: must be >= 1")


def test_client_errors_are_counted_as_v2_400(srv):
    labels = '{code="400",protocol="v2",tenant=""}'
    before = metric(srv["base"], "kandinsky_requests_total", labels)
    httpx.post(f"{srv['base']}{INFER}", json={"inputs": [q("")]}, timeout=30)
    assert metric(srv["base"], "kandinsky_requests_total", labels) == before + 1


def test_unknown_model_is_a_404(srv):
    r = httpx.post(f"{srv['base']}/v2/models/nope/infer", json={"inputs": [q("кот")]}, timeout=30)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    client = triton_http.InferenceServerClient(srv["hostport"])
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [triton_http.InferInput("query", [1], "BYTES")])
    assert err.value.status() == "404"


def test_infer_is_documented_with_its_request_body_and_both_answers(srv):
    doc = httpx.get(f"{srv['base']}/openapi.json", timeout=30).json()
    post = doc["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert set(post["responses"]) == {"200", "400", "404", "408", "413", "500", "503", "504"}
    assert set(post["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    body = doc["components"]["schemas"][post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                                         .rsplit("/", 1)[1]]
    example = body["examples"][0]
    assert {i["name"] for i in example["inputs"]} <= set(INPUT_TYPES)
    assert "query" in body["description"]


# ---- malformed bodies: what KServe's decoding would answer with 422 or 500 ---------------------------------


def binary_body(header: dict[str, Any], *raw: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(raw), {"inference-header-content-length": str(len(text))}


def bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def binary_query(raw: bytes, size: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": "query", "datatype": "BYTES", "shape": [1],
            "parameters": {"binary_data_size": len(raw) if size is None else size}, **extra}


MALFORMED = [
    (b'{"inputs": [{"name": "query"}]}', {}, "inputs[0].shape: Field required"),
    (b'{"inputs": 5}', {}, "inputs: Input should be a valid list"),
    (b'{"inputs": [', {}, "body: not valid JSON"),
    (*binary_body({"inputs": [binary_query(bytes_tensor(b"\xff"))]}, bytes_tensor(b"\xff")),
     "inputs[0]: binary BYTES element 0 is not valid UTF-8"),
    (*binary_body({"inputs": [{"shape": [1], "datatype": "BYTES"}]}), "inputs[0].name: is required"),
    (*binary_body({"inputs": [binary_query(b"", size=50)]}, bytes_tensor(b"cat")),
     "inputs[0].parameters.binary_data_size: 50 bytes but 7 remain"),
    (*binary_body({"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1],
                               "parameters": {"binary_data_size": 3}}]}, b"abc"),
     "inputs[0]: 3 bytes of binary data; shape [1] of INT64 needs 8"),
    (*binary_body({"inputs": [binary_query(bytes_tensor(b"a", b"b"))]}, bytes_tensor(b"a", b"b")),
     "inputs[0]: 2 BYTES element(s) in the binary data; shape [1] needs 1"),
    (*binary_body({"parameters": {}}), "inputs: is required"),
    (b'{"inputs": []}', {"inference-header-content-length": "99"},
     "inference-header-content-length: must be"),
]


@pytest.mark.parametrize(("body", "headers", "needle"), MALFORMED)
def test_rest_body_problem_names_the_place(body, headers, needle):
    problem = rest_body_problem(body, headers)
    assert problem is not None and needle in problem


def test_rest_body_problem_passes_what_kserve_decodes():
    ok_json = json.dumps({"inputs": json_inputs(), "outputs": [{"name": "images"}]}).encode()
    assert rest_body_problem(ok_json, {}) is None
    raw = bytes_tensor("кот".encode())
    body, headers = binary_body(
        {"inputs": [binary_query(raw), {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]}],
         "parameters": {"binary_data_output": True}},
        raw,
    )
    assert rest_body_problem(body, headers) is None


def test_a_json_body_that_is_not_a_v2_request_is_a_400_naming_the_place(srv):
    r = httpx.post(f"{srv['base']}{INFER}", content=b'{"inputs": [{"name": "query"}]}', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "inputs[0].shape: Field required" in r.json()["error"], r.text


@pytest.mark.parametrize(("body", "headers", "needle"), MALFORMED[3:])
def test_malformed_binary_bodies_are_a_400_naming_the_place_not_a_500(srv, body, headers, needle):
    r = httpx.post(f"{srv['base']}{INFER}", content=body, timeout=30,
                   headers={"content-type": "application/octet-stream", **headers})
    assert r.status_code == 400 and needle in r.json()["error"], r.text


# ---- image prompts (SPEC section 9): the image file, its borders as JSON text, crop_first ---------------


def test_image_prompt_inputs_give_the_v1_image_prompt_images_json_and_binary(srv):
    base = srv["base"]
    png = prompt_png()
    params = {"images_to_gen": 1, "images_to_cherry_pick": 1, "super_res": False, "seed": 21, "format": "png",
              "image_prompt": {"image": base64.b64encode(png).decode(), "borders": PROMPT_BORDERS,
                               "crop_first": True}}
    v1 = httpx.post(f"{base}/v1/models/{NAME}:predict", timeout=300,
                    json={"instances": [{"query": "кот", "params": params}]})
    assert v1.status_code == 200, v1.text
    want = base64.b64decode(v1.json()["images"][0])
    # Plain JSON: the image as base64 text.
    inputs = {"query": ("BYTES", ["кот"]), "seed": ("INT64", [21]), "images_to_gen": ("INT32", [1]),
              "super_res": ("BOOL", [False]), "format": ("BYTES", ["png"]),
              "image_prompt": ("BYTES", [base64.b64encode(png).decode()]),
              "borders": ("BYTES", [json.dumps(PROMPT_BORDERS)]), "crop_first": ("BOOL", [True])}
    r = httpx.post(base + INFER, json={"inputs": json_inputs(inputs)}, timeout=300)
    assert r.status_code == 200, r.text
    images = next(o for o in r.json()["outputs"] if o["name"] == "images")["data"]
    assert base64.b64decode(images[0]) == want
    # tritonclient.http with the binary data extension: base64 text (KServe's REST decoding reads BYTES
    # elements as UTF-8; raw file bytes are refused with a 400 saying so, and gRPC takes them).
    client = triton_http.InferenceServerClient(base.removeprefix("http://"), network_timeout=300)
    tensors = []
    for name, datatype, array in [
        ("query", "BYTES", np.array(["кот".encode()], dtype=object)),
        ("seed", "INT64", np.array([21], dtype=np.int64)),
        ("images_to_gen", "INT32", np.array([1], dtype=np.int32)),
        ("super_res", "BOOL", np.array([False])),
        ("format", "BYTES", np.array([b"png"], dtype=object)),
        ("image_prompt", "BYTES", np.array([base64.b64encode(png)], dtype=object)),
        ("borders", "BYTES", np.array([json.dumps(PROMPT_BORDERS).encode()], dtype=object)),
        ("crop_first", "BOOL", np.array([True])),
    ]:
        t = triton_http.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    wanted = [triton_http.InferRequestedOutput("images", binary_data=True)]
    result = client.infer(NAME, tensors, outputs=wanted)
    assert result.as_numpy("images")[0] == want
    raw = triton_http.InferInput("image_prompt", [1], "BYTES")
    raw.set_data_from_numpy(np.array([png], dtype=object))
    with pytest.raises(InferenceServerException, match="over REST send the image file as base64 text"):
        client.infer(NAME, [*tensors[:5], raw, *tensors[6:]])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"borders": ("BYTES", ['{"up": 40}'])}, "inputs.borders.up: must be <= 32"),
        ({"borders": ("BYTES", ["up=4"])}, "inputs.borders[0]: not JSON text"),
        ({"borders": ("BYTES", ["{}"])}, "inputs.borders: at least one of up, down, left, right"),
        ({"image_prompt": ("BYTES", ["aGVsbG8="])}, "inputs.image_prompt: is not an image"),
        ({"crop_first": ("BOOL", [True]), "image_prompt": None, "borders": None},
         "inputs.crop_first: needs the image_prompt"),
        ({"borders": None}, "inputs.borders: is required with image_prompt"),
    ],
)
def test_bad_image_prompt_inputs_are_400_naming_the_input(srv, extra, needle):
    png64 = base64.b64encode(prompt_png()).decode()
    inputs: dict[str, Any] = {"query": ("BYTES", ["кот"]), "image_prompt": ("BYTES", [png64]),
                              "borders": ("BYTES", ['{"up": 4}'])}
    inputs.update(extra)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    r = httpx.post(srv["base"] + INFER, json={"inputs": json_inputs(inputs)}, timeout=30)
    assert r.status_code == 400 and needle in r.json()["error"], r.text
