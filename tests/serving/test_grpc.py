"""Open Inference Protocol (KServe v2) over gRPC (`ModelInfer` on --grpc_port), through the real server.

One server (tiny model) serves the module; the v1 reference request and its expectations are
tests/serving/test_v2.py's (kept in tests/support.py). Clients: KServe's `InferenceGRPCClient`, the raw
KServe stub, and Triton's `tritonclient.grpc`, which runs in a subprocess: its protobuf module and
KServe's both define the `inference.*` messages, and one process cannot load both.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from typing import Any

import grpc
import httpx
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from PIL import Image

from app.serving.model import KandinskyModel, ServerSettings
from app.serving.protocols.v2_grpc import InferenceServicer, InferInterceptor
from tests.support import (
    INPUT_TYPES,
    NAME,
    OUTPUT_NAMES,
    OUTPUT_TYPES,
    PROMPT_BORDERS,
    ROOT,
    V1_BODY,
    V2_INPUTS,
    assert_same_as_v1,
    metric,
    prompt_png,
    serve,
)

KSERVE_DEFAULT_LIMIT = 8 << 20  # KServe's gRPC message limit, which the server raises to 64 MiB
Tensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    for running in serve(tiny_model_dir, "--max_images_per_request", "20"):  # a 20 MB answer (below)
        channel = grpc.insecure_channel(running["grpc"], options=[("grpc.max_receive_message_length", -1)])
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield {**running, "stub": pb_grpc.GRPCInferenceServiceStub(channel)}
        finally:
            channel.close()


@pytest.fixture(scope="module")
def reference(srv) -> dict[str, Any]:
    r = httpx.post(f"{srv['base']}/v1/models/{NAME}:predict", json=V1_BODY, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def grpc_count(srv: dict[str, Any], code: str) -> float:
    return metric(srv["base"], "kandinsky_requests_total", f'{{code="{code}",protocol="grpc",tenant=""}}')


def query(*texts: bytes) -> Tensor:
    return Tensor(name="query", datatype="BYTES", shape=[len(texts)],
                  contents=pb.InferTensorContents(bytes_contents=list(texts)))


def call(srv: dict[str, Any], inputs: list[Tensor], model: str = NAME, raw: list[bytes] | None = None,
         **request: Any) -> pb.ModelInferResponse:
    message = pb.ModelInferRequest(model_name=model, inputs=inputs, raw_input_contents=raw or [], **request)
    return srv["stub"].ModelInfer(message, timeout=300)


# ---- the same images as v1 ---------------------------------------------------------------------------


def test_kserve_grpc_client_gives_v1_images_and_scores_and_is_counted_ok(srv, reference):
    ok_before = grpc_count(srv, "OK")

    async def infer() -> Any:
        client = InferenceGRPCClient(srv["grpc"], timeout=300)
        try:
            inputs = [InferInput(n, [len(v)], dt, list(v)) for n, (dt, v) in V2_INPUTS.items()]
            return await client.infer(InferRequest(NAME, inputs, request_id="g-1"))
        finally:
            await client.close()

    result = asyncio.run(infer())
    assert result.id == "g-1" and result.model_name == NAME
    out = {o.name: o for o in result.outputs}
    assert list(out) == OUTPUT_NAMES
    assert {n: o.datatype for n, o in out.items()} == OUTPUT_TYPES
    assert_same_as_v1(
        reference, list(out["images"].as_numpy()), out["clip_scores"].as_numpy(), out["ppl"].as_numpy(),
        out["instance"].as_numpy(), out["seed"].as_numpy(),
    )
    assert grpc_count(srv, "OK") == ok_before + 1


# tritonclient.grpc in its own process (see the module docstring); prints what it got as JSON.
TRITON_GRPC = """
import base64, json, sys
import numpy as np
import tritonclient.grpc as g

url, name, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
dtypes = {"BYTES": object, "INT64": np.int64, "INT32": np.int32, "BOOL": bool, "FP64": np.float64}
client = g.InferenceServerClient(url)
inputs = []
for tensor, (datatype, values) in spec.items():
    values = [v.encode() for v in values] if datatype == "BYTES" else values
    array = np.array(values, dtype=dtypes[datatype])
    inp = g.InferInput(tensor, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    inputs.append(inp)
outputs = [g.InferRequestedOutput(n) for n in ("images", "clip_scores", "instance")]
result = client.infer(name, inputs, outputs=outputs, client_timeout=300)
meta = client.get_model_metadata(name, as_json=True)
print(json.dumps({
    "outputs": [o["name"] for o in result.get_response(as_json=True)["outputs"]],
    "images": [base64.b64encode(x).decode() for x in result.as_numpy("images")],
    "clip_scores": result.as_numpy("clip_scores").tolist(),
    "instance": result.as_numpy("instance").tolist(),
    "ready": client.is_model_ready(name),
    "inputs": {t["name"]: t["datatype"] for t in meta["inputs"]},
}))
"""


def test_tritonclient_grpc_gets_the_named_outputs_with_v1_images(srv, reference):
    run = subprocess.run(
        [sys.executable, "-c", TRITON_GRPC, srv["grpc"], NAME, json.dumps(V2_INPUTS)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    assert got["outputs"] == ["images", "clip_scores", "instance"]
    assert got["ready"] is True and got["inputs"] == INPUT_TYPES
    images = [base64.b64decode(b) for b in got["images"]]
    assert_same_as_v1(reference, images, got["clip_scores"], instance=got["instance"])


@pytest.mark.long
def test_a_response_over_kserves_8_mib_default_arrives(srv):
    # twenty 1024x1024 PNGs (RealESRGAN x4 of the tiny model's noise) are about 20 MB
    count = 20
    inputs = [
        query("кот".encode()),
        Tensor(name="images_to_gen", datatype="INT32", shape=[1], contents=pb.InferTensorContents(
            int_contents=[count])),
        Tensor(name="images_to_cherry_pick", datatype="INT32", shape=[1], contents=pb.InferTensorContents(
            int_contents=[count])),
        Tensor(name="format", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(
            bytes_contents=[b"png"])),
        Tensor(name="seed", datatype="INT64", shape=[1], contents=pb.InferTensorContents(int64_contents=[5])),
    ]
    response = call(srv, inputs, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="images")])
    assert response.ByteSize() > 2 * KSERVE_DEFAULT_LIMIT  # about 20 MB: more than twice KServe's 8 MiB
    assert [o.name for o in response.outputs] == ["images"] and list(response.outputs[0].shape) == [count]
    raw = response.raw_output_contents[0]
    offset, sizes = 0, []
    while offset < len(raw):
        size = int.from_bytes(raw[offset: offset + 4], "little")
        image = Image.open(io.BytesIO(raw[offset + 4: offset + 4 + size]))
        assert image.format == "PNG" and image.size == (1024, 1024)
        sizes.append(size)
        offset += 4 + size
    assert len(sizes) == count


def test_a_request_over_kserves_8_mib_default_is_read(srv):
    big = Tensor(name="padding", datatype="BYTES", shape=[1],
                 contents=pb.InferTensorContents(bytes_contents=[b"x" * (KSERVE_DEFAULT_LIMIT + 1024)]))
    with pytest.raises(grpc.RpcError) as err:
        call(srv, [query(b"cat"), big])
    # read and answered by our validation, not refused by gRPC (RESOURCE_EXHAUSTED)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("inputs.padding: unknown input")


# ---- metadata, readiness ---------------------------------------------------------------------------------


def test_model_metadata_lists_every_input_and_output(srv):
    meta = srv["stub"].ModelMetadata(pb.ModelMetadataRequest(name=NAME), timeout=30)
    assert {t.name: t.datatype for t in meta.inputs} == INPUT_TYPES
    assert {t.name: t.datatype for t in meta.outputs} == OUTPUT_TYPES
    assert all(list(t.shape) == [-1] for t in [*meta.inputs, *meta.outputs])
    assert srv["stub"].ModelReady(pb.ModelReadyRequest(name=NAME), timeout=30).ready is True


async def test_model_infer_on_a_model_not_ready_is_refused_without_loading_it(monkeypatch):
    from kserve import ModelServer
    from kserve.errors import ModelNotReady

    model = KandinskyModel(NAME, ServerSettings())  # never loaded, as while draining
    monkeypatch.setattr(model, "load", lambda: pytest.fail("ModelInfer must not load the model"))
    server = ModelServer(http_port=0, enable_grpc=False, enable_latency_logging=False)
    server.register_model(model)
    servicer = InferenceServicer(server.dataplane, server.model_repository_extension)
    with pytest.raises(ModelNotReady):
        await servicer.ModelInfer(pb.ModelInferRequest(model_name=NAME, inputs=[query(b"cat")]), None)


# ---- client errors: INVALID_ARGUMENT naming the input, NOT_FOUND for another model ---------------------


def int32(name: str, *values: int) -> Tensor:
    return Tensor(name=name, datatype="INT32", shape=[len(values)],
                  contents=pb.InferTensorContents(int_contents=list(values)))


BAD_CALLS = [
    ([int32("top_k", 5)], None, "inputs.query: is required"),
    ([query(b"cat"), Tensor(name="top_k", datatype="FP32", shape=[1],
                            contents=pb.InferTensorContents(fp32_contents=[5.0]))],
     None, "inputs.top_k: datatype FP32 is not accepted"),
    ([query(b"cat"), int32("top_k", 5, 6)], None, "inputs.top_k: shape [2] for 1 instance"),
    ([query(b"cat"), int32("top_k", 100000)], None, "inputs.top_k: must be <= 64"),
    ([query(b"a", b"b"), int32("images_to_gen", 1, 30)], None, "inputs.images_to_gen[1]: must be <= 20"),
    ([query(b"\xff\xfe")], None, "inputs.query[0]: not valid UTF-8"),
    ([query(b"cat"), int32("steps", 5)], None, "inputs.steps: unknown input"),
    ([query(b"cat"), Tensor(name="top_k", datatype="INT128", shape=[1])], None,
     "inputs.top_k: datatype 'INT128' is not a v2 datatype"),
    ([Tensor(name="query", datatype="BYTES", shape=[1])], [b"\x09\x00\x00\x00cat"],
     "inputs.query: its data do not hold shape [1] of BYTES"),
    ([Tensor(name="query", datatype="BYTES", shape=[1]), Tensor(name="seed", datatype="INT64", shape=[1])],
     [b"\x03\x00\x00\x00cat", b"\x01\x02"], "inputs.seed: its data do not hold shape [1] of INT64"),
]


@pytest.mark.parametrize(("inputs", "raw", "needle"), BAD_CALLS, ids=[n.split(":")[0] for *_, n in BAD_CALLS])
def test_bad_input_is_invalid_argument_naming_the_input_and_counted(srv, inputs, raw, needle):
    before = grpc_count(srv, "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as err:
        call(srv, inputs, raw=raw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert grpc_count(srv, "INVALID_ARGUMENT") == before + 1
    # one access line, as a REST request gets
    logged = [line for line in srv["lines"] if '"gRPC ModelInfer" INVALID_ARGUMENT' in line]
    assert logged and all("protocol=grpc" in line for line in logged)


def test_unknown_output_is_invalid_argument(srv):
    with pytest.raises(grpc.RpcError) as err:
        call(srv, [query(b"cat")], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="latents")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("outputs.latents: unknown output")


def test_unknown_model_is_not_found_and_counted(srv):
    before = grpc_count(srv, "NOT_FOUND")
    with pytest.raises(grpc.RpcError) as err:
        call(srv, [query(b"cat")], model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert grpc_count(srv, "NOT_FOUND") == before + 1
    # REST requests are not counted as gRPC
    assert metric(srv["base"], "kandinsky_requests_total", '{code="NOT_FOUND",protocol="v2",tenant=""}') == 0



# ---- the interceptor, in-process -------------------------------------------------------------------------


class FixedServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with `size` bytes of raw output, or aborts with `fail`."""

    def __init__(self, size: int, fail: grpc.StatusCode | None = None) -> None:
        self.size, self.fail = size, fail

    async def ModelInfer(self, request, context):  # noqa: N802 - the protocol's name
        if self.fail is not None:
            await context.abort(self.fail, "refused")
        return pb.ModelInferResponse(model_name=request.model_name, raw_output_contents=[b"x" * self.size])


async def infer_through_interceptor(servicer: FixedServicer, max_send_bytes: int) -> grpc.RpcError | None:
    server = grpc.aio.server(interceptors=(InferInterceptor(max_send_bytes),))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                await stub.ModelInfer(pb.ModelInferRequest(model_name=NAME), timeout=30)
            except grpc.aio.AioRpcError as err:
                return err
            return None
    finally:
        await server.stop(None)


def counted(code: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"code": code, "protocol": "grpc", "tenant": ""}
    return REGISTRY.get_sample_value("kandinsky_requests_total", labels) or 0.0


async def test_interceptor_refuses_a_response_over_the_send_limit_saying_so_and_counts_it():
    before = counted("RESOURCE_EXHAUSTED")
    err = await infer_through_interceptor(FixedServicer(size=1000), max_send_bytes=500)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--grpc_max_send_message_length" in err.details() and "fewer images" in err.details()
    assert counted("RESOURCE_EXHAUSTED") == before + 1


async def test_interceptor_counts_ok_and_the_status_an_abort_set():
    ok, invalid = counted("OK"), counted("INVALID_ARGUMENT")
    assert await infer_through_interceptor(FixedServicer(size=10), max_send_bytes=500) is None
    err = await infer_through_interceptor(FixedServicer(10, grpc.StatusCode.INVALID_ARGUMENT), 500)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (counted("OK"), counted("INVALID_ARGUMENT")) == (ok + 1, invalid + 1)


def test_image_prompt_as_raw_file_bytes_gives_the_v1_image_prompt_images(srv):
    png = prompt_png()
    params = {"images_to_gen": 1, "images_to_cherry_pick": 1, "super_res": False, "seed": 23, "format": "png",
              "image_prompt": {"image": base64.b64encode(png).decode(), "borders": PROMPT_BORDERS}}
    v1 = httpx.post(f"{srv['base']}/v1/models/{NAME}:predict", timeout=300,
                    json={"instances": [{"query": "кот", "params": params}]})
    assert v1.status_code == 200, v1.text

    async def infer() -> Any:
        client = InferenceGRPCClient(srv["grpc"], timeout=300)
        try:
            inputs = [InferInput("query", [1], "BYTES", ["кот"]), InferInput("seed", [1], "INT64", [23]),
                      InferInput("images_to_gen", [1], "INT32", [1]),
                      InferInput("super_res", [1], "BOOL", [False]),
                      InferInput("format", [1], "BYTES", ["png"]),
                      InferInput("image_prompt", [1], "BYTES", [png]),
                      InferInput("borders", [1], "BYTES", [json.dumps(PROMPT_BORDERS)])]
            return await client.infer(InferRequest(NAME, inputs))
        finally:
            await client.close()

    result = asyncio.run(infer())
    images = next(o for o in result.outputs if o.name == "images").as_numpy()
    assert images[0] == base64.b64decode(v1.json()["images"][0])
