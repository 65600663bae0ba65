"""Text the server cannot encode, and error texts, through the real server process (SPEC sections 3 and 8).

A lone surrogate (`"\\ud800"`, which JSON text can carry and Python's parser keeps) anywhere a string is
accepted is a 400 naming the field at parse time, on v1 predict, jobs, v2 REST infer, gRPC ModelInfer
(bytes that are not UTF-8, INVALID_ARGUMENT) and the OpenAI images API; never a 5xx, and the server goes on
serving. Standard clients refuse to encode such text, so it goes as raw JSON bytes with `\\ud800` escapes
(through the `openai` client's raw-content call for OpenAI) or as raw bytes in a gRPC message; the
standard clients then show that a good request is still served. And no error text quotes a Python
object (`<_io.BytesIO object at 0x7f...>`): undecodable image prompts are refused in words of our own.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from PIL import Image

from tests.support import NAME, metric, prompt_png, serve

Tensor = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: The same character as UTF-8 would write it if it could (CESU-8): not valid UTF-8.
LONE_BYTES = b"\xed\xa0\x80"
#: A reference to a Python object or its address in an error text.
OBJECT_TEXT = re.compile(r"0x[0-9a-fA-F]{4,}|<[^<>]*(?:object|class|at 0x)[^<>]*>")
SMALL = {"images_to_gen": 1, "images_to_cherry_pick": 1, "super_res": False, "seed": 3}


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    for running in serve(tiny_model_dir):
        channel = grpc.insecure_channel(running["grpc"])
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield {
                **running,
                "stub": pb_grpc.GRPCInferenceServiceStub(channel),
                # the same method, sending bytes as they are: a message protobuf's serializer would refuse
                "raw": channel.unary_unary(MODEL_INFER, request_serializer=lambda b: b,
                                           response_deserializer=pb.ModelInferResponse.FromString),
            }
        finally:
            channel.close()


def post_text(srv: dict[str, Any], path: str, text: str) -> httpx.Response:
    """POST JSON text as it is (its `\\ud800` escapes included)."""
    return httpx.post(f"{srv['base']}{path}", content=text.encode("ascii"),
                      headers={"Content-Type": "application/json"}, timeout=60)


def assert_client_error(r: httpx.Response, field: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["error"]
    assert message.startswith(f"{field}:") or f"; {field}:" in message, message
    return message


def five_xx(srv: dict[str, Any]) -> float:
    """Requests answered with a 5xx (any protocol), or INTERNAL / UNKNOWN over gRPC."""
    text = httpx.get(f"{srv['base']}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^kandinsky_requests_total\{code="(?:5\d\d|INTERNAL|UNKNOWN)",[^}]*\} (\S+)$', text, re.M))


# ---- v1 predict and jobs ---------------------------------------------------------------------------------

def v1_body(*queries: str, **params: Any) -> str:
    # json.dumps writes "\ud800" as its escape (ensure_ascii): the text carries exactly what a client sent
    return json.dumps({"instances": [{"query": q, "params": params} for q in queries]})


V1_CASES = [
    (v1_body("\ud800"), "instances[0].query"),
    (v1_body("кот \udc00 в шляпе"), "instances[0].query"),
    (v1_body("кот", "a\ud800"), "instances[1].query"),
    (v1_body("кот", format="\ud800"), "instances[0].params.format"),
    (v1_body("кот", image_prompt={"image": "\ud800", "borders": {"up": 2}}),
     "instances[0].params.image_prompt.image"),
]


@pytest.mark.parametrize("path", [f"/v1/models/{NAME}:predict", f"/v1/models/{NAME}/jobs"],
                         ids=["predict", "jobs"])
@pytest.mark.parametrize(("text", "field"), V1_CASES, ids=[f for _, f in V1_CASES])
def test_v1_and_jobs_refuse_a_lone_surrogate_naming_the_field(srv, path, text, field):
    r = post_text(srv, path, text)
    message = assert_client_error(r, field)  # a 400 at parse: a job is never created (202) for it
    if field.endswith("query"):
        assert "UTF-8" in message and "surrogate" in message


# ---- v2 REST ---------------------------------------------------------------------------------------------

QUERY_OK = {"name": "query", "datatype": "BYTES", "shape": [1], "data": ["кот"]}


def v2_text(inputs: list[dict[str, Any]], **extra: Any) -> str:
    return json.dumps({"inputs": inputs, **extra})


V2_CASES = [
    (v2_text([{**QUERY_OK, "data": ["\ud800"]}]), "inputs.query[0]"),
    (v2_text([QUERY_OK, {"name": "format", "datatype": "BYTES", "shape": [1], "data": ["p\udc00"]}]),
     "inputs.format[0]"),
    (v2_text([QUERY_OK], parameters={"binary_data_output": "\ud800"}), "parameters.binary_data_output"),
    (v2_text([QUERY_OK], parameters={"\ud800": True}), "parameters"),
    (v2_text([{**QUERY_OK, "parameters": {"content_type": "\ud800"}}]), "inputs[0].parameters.content_type"),
    (v2_text([QUERY_OK], id="\ud800"), "id"),
    (v2_text([QUERY_OK], outputs=[{"name": "\ud800"}]), "outputs[0].name"),
]


@pytest.mark.parametrize(("text", "field"), V2_CASES, ids=[f for _, f in V2_CASES])
def test_v2_rest_refuses_a_lone_surrogate_naming_the_field(srv, text, field):
    assert "\\ud800" in text or "\\udc00" in text
    message = assert_client_error(post_text(srv, f"/v2/models/{NAME}/infer", text), field)
    assert "UTF-8" in message


def test_tritonclient_http_bytes_that_are_not_utf8_are_a_400_and_a_good_request_follows(srv):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(srv["hostport"], network_timeout=300)
    bad = triton.InferInput("query", [1], "BYTES")
    bad.set_data_from_numpy(np.array([LONE_BYTES], dtype=object), binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        client.infer(NAME, [bad])
    assert err.value.status() == "400" and "inputs[0]" in err.value.message()
    assert "not valid UTF-8" in err.value.message()

    inputs = []
    for name, datatype, value in (("query", "BYTES", np.array(["кот".encode()], dtype=object)),
                                  ("images_to_gen", "INT32", np.array([1], dtype=np.int32)),
                                  ("super_res", "BOOL", np.array([False]))):
        inp = triton.InferInput(name, [1], datatype)
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    result = client.infer(NAME, inputs, outputs=[triton.InferRequestedOutput("images")])
    assert Image.open(io.BytesIO(result.as_numpy("images")[0])).size == (256, 256)


# ---- gRPC ModelInfer -------------------------------------------------------------------------------------


def bytes_tensor(name: str, *values: bytes) -> Tensor:
    return Tensor(name=name, datatype="BYTES", shape=[len(values)],
                  contents=pb.InferTensorContents(bytes_contents=list(values)))


def with_lone_surrogate(message: pb.ModelInferRequest, marker: str = "MARKER") -> bytes:
    """The message's bytes with `marker` (in a string field) replaced by a CESU-8 surrogate: what a
    client that writes strings without checking them sends; protobuf's parser refuses the message."""
    data = message.SerializeToString()
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), LONE_BYTES.ljust(len(marker), b"x"))


def grpc_error(call: Any, message: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(message, timeout=60)
    return err.value


def test_grpc_bytes_that_are_not_utf8_are_invalid_argument_naming_the_input(srv):
    query = bytes_tensor("query", "кот".encode())
    cases = [
        ([bytes_tensor("query", LONE_BYTES)], "inputs.query[0]: not valid UTF-8"),
        ([bytes_tensor("query", b"a", b"b" + LONE_BYTES)], "inputs.query[1]: not valid UTF-8"),
        ([query, bytes_tensor("format", LONE_BYTES)], "inputs.format[0]: not valid UTF-8"),
        ([query, bytes_tensor("image_prompt", prompt_png()), bytes_tensor("borders", b'{"\\ud800": 2}')],
         "inputs.borders[0]: a key is not text that UTF-8 can encode"),
        ([query, bytes_tensor("image_prompt", prompt_png()), bytes_tensor("borders", b'{"up": "\\udc00"}')],
         "inputs.borders[0].up: not text that UTF-8 can encode"),
    ]
    for inputs, needle in cases:
        err = grpc_error(srv["stub"].ModelInfer, pb.ModelInferRequest(model_name=NAME, inputs=inputs))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert needle in err.details()


def test_grpc_string_fields_that_are_not_utf8_are_invalid_argument_naming_the_field(srv):
    def request(**fields: Any) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(model_name=NAME, inputs=[bytes_tensor("query", b"cat")], **fields)

    on_request = request()
    on_request.parameters["MARKER"].bool_param = True
    string_param = request()
    string_param.parameters["binary_data_output"].string_param = "MARKER"
    on_input = request()
    on_input.inputs[0].parameters["content_type"].string_param = "MARKER"
    on_output = request(outputs=[Output(name="images")])
    on_output.outputs[0].parameters["binary_data"].string_param = "MARKER"
    cases = [
        (request(id="MARKER"), "id: not valid UTF-8"),
        (on_request, "parameters: a parameter's name"),
        (string_param, "parameters.binary_data_output: not valid UTF-8"),
        (on_input, "inputs.query.parameters.content_type: not valid UTF-8"),
        (on_output, "outputs.images.parameters.binary_data: not valid UTF-8"),
        (pb.ModelInferRequest(model_name=NAME, inputs=[Tensor(name="MARKER", datatype="BYTES", shape=[1])]),
         "inputs[0].name: not valid UTF-8"),
    ]
    invalid = '{code="INVALID_ARGUMENT",protocol="grpc",tenant=""}'
    before = metric(srv["base"], "kandinsky_requests_total", invalid)
    for message, needle in cases:
        err = grpc_error(srv["raw"], with_lone_surrogate(message))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith(needle), err.details()
        assert not OBJECT_TEXT.search(err.details())
    after = metric(srv["base"], "kandinsky_requests_total", invalid)
    assert after == before + len(cases)

    err = grpc_error(srv["raw"], b"\xff\xff\xff\xff")  # not a protobuf message at all
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a ModelInferRequest message" in err.details()


def test_grpc_serves_a_good_request_after_the_refusals(srv):
    inputs = [bytes_tensor("query", "кот".encode()), bytes_tensor("format", b"png"),
              Tensor(name="images_to_gen", datatype="INT32", shape=[1],
                     contents=pb.InferTensorContents(int_contents=[1])),
              Tensor(name="super_res", datatype="BOOL", shape=[1],
                     contents=pb.InferTensorContents(bool_contents=[False]))]
    response = srv["stub"].ModelInfer(pb.ModelInferRequest(model_name=NAME, inputs=inputs), timeout=300)
    assert [o.name for o in response.outputs][:1] == ["images"]


# ---- OpenAI ----------------------------------------------------------------------------------------------

OPENAI_CASES = [
    ({"model": NAME, "prompt": "\ud800"}, "prompt"),
    ({"model": NAME, "prompt": "кот", "user": "\ud800"}, "user"),
    ({"model": "\ud800", "prompt": "кот"}, "model"),
    ({"model": NAME, "prompt": "кот", "size": "256x256\udc00"}, "size"),
    ({"model": NAME, "prompt": "кот", "image_prompt": {"image": "\ud800", "borders": {"up": 2}}},
     "image_prompt.image"),
]


@pytest.mark.parametrize(("body", "param"), OPENAI_CASES, ids=[p for _, p in OPENAI_CASES])
def test_openai_client_gets_a_400_naming_the_parameter(srv, body, param):
    import openai

    client = openai.OpenAI(base_url=f"{srv['base']}/openai/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/images/generations", cast_to=openai.types.ImagesResponse,
                    content=json.dumps(body).encode("ascii"),
                    options={"headers": {"Content-Type": "application/json"}})
    assert err.value.status_code == 400
    error = err.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["message"].startswith(f"{param}:") and "UTF-8" in error["message"]


def test_openai_client_is_served_after_the_refusals(srv):
    import openai

    client = openai.OpenAI(base_url=f"{srv['base']}/openai/v1", api_key="unused", max_retries=0, timeout=300)
    result = client.images.generate(model=NAME, prompt="кот", size="256x256", extra_body={"seed": 3})
    assert result.data and result.data[0].b64_json
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (256, 256)


def test_v1_is_served_after_the_refusals_and_none_was_a_5xx(srv):
    r = httpx.post(f"{srv['base']}/v1/models/{NAME}:predict",
                   json={"instances": [{"query": "кот", "params": SMALL}]}, timeout=300)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert five_xx(srv) == 0
    assert not [line for line in srv["lines"] if "Traceback" in line]


# ---- error texts quote no Python object ------------------------------------------------------------------


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


GARBAGE = np.random.default_rng(2).bytes(300)
UNDECODABLE = {
    "truncated PNG": _encoded("PNG")[:400],
    "PNG header only": _encoded("PNG")[:30],
    "random bytes": GARBAGE,
    "PNG signature and garbage": b"\x89PNG\r\n\x1a\n" + GARBAGE,
    "PNG IHDR and garbage": _encoded("PNG")[:33] + GARBAGE,
    "JPEG signature and garbage": b"\xff\xd8\xff" + GARBAGE,
    "truncated JPEG": _encoded("JPEG")[:300],
    "WebP header and garbage": b"RIFF\x00\x01\x00\x00WEBP" + GARBAGE,
    "truncated WebP": _encoded("WEBP")[:200],
}


@pytest.mark.parametrize("data", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
def test_undecodable_image_prompt_is_refused_in_words_without_an_object_repr(srv, data):
    params = {"image_prompt": {"image": base64.b64encode(data).decode(), "borders": {"up": 2}}}
    r = httpx.post(f"{srv['base']}/v1/models/{NAME}:predict",
                   json={"instances": [{"query": "кот", "params": params}]}, timeout=60)
    message = assert_client_error(r, "instances[0].params.image_prompt.image")
    assert not OBJECT_TEXT.search(message), message
    assert re.search(r"is not (an image|a valid (PNG|JPEG|WebP) image)", message), message

    # gRPC carries the file's raw bytes: the same words
    inputs = [bytes_tensor("query", b"cat"), bytes_tensor("image_prompt", data),
              bytes_tensor("borders", b'{"up": 2}')]
    err = grpc_error(srv["stub"].ModelInfer, pb.ModelInferRequest(model_name=NAME, inputs=inputs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("inputs.image_prompt") and not OBJECT_TEXT.search(err.details())


def test_bad_base64_and_bad_borders_are_refused_without_a_repr(srv):
    cases = [
        ({"image": "@@not base64@@", "borders": {"up": 2}}, "instances[0].params.image_prompt.image"),
        ({"image": base64.b64encode(prompt_png()).decode(), "borders": {"up": {"deep": [1]}}},
         "instances[0].params.image_prompt.borders.up"),
    ]
    for prompt, field in cases:
        r = httpx.post(f"{srv['base']}/v1/models/{NAME}:predict",
                       json={"instances": [{"query": "кот", "params": {"image_prompt": prompt}}]}, timeout=60)
        message = assert_client_error(r, field)
        assert not OBJECT_TEXT.search(message) and "{'deep'" not in message, message
