"""Every malformed gRPC `ModelInfer` is INVALID_ARGUMENT naming its place, never UNKNOWN or INTERNAL.

A property test (hypothesis) against the real server process on the tiny model: each generated
`ModelInferRequest` starts from a valid request (one to three instances, small and without the upscale)
and gets at least one defect that makes it invalid whatever else it holds: a datatype the input does not
take, a shape that disagrees with its contents, contents in the field of another datatype, raw contents
that are too few or too many or of the wrong length, an element that is not UTF-8, an unknown or
repeated input, or a bad parameter of any kind on the request, an input or an output (unknown, of the
wrong kind, with no value, a feature not served). The messages go over a real channel with KServe's
generated stub, or as bytes for what protobuf's own serializer refuses to write.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from tests.support import NAME, metric, serve

Tensor = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

#: datatype -> the contents field that carries it
CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
ITEMSIZE = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "INT32": 4, "UINT32": 4, "FP32": 4,
            "INT64": 8, "UINT64": 8, "FP64": 8}
#: The inputs a valid base request may hold: name -> (datatype, strategy of one valid element)
VALID: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "images_to_gen": ("INT32", st.just(1)),
    "images_to_cherry_pick": ("INT64", st.just(1)),
    "top_k": ("INT32", st.integers(1, 16)),
    "top_p": ("FP64", st.sampled_from([0.5, 0.9, 1.0])),
    "temperature": ("FP32", st.sampled_from([0.5, 1.0])),
    "seed": ("INT64", st.integers(0, 2**40)),
    "format": ("BYTES", st.sampled_from([b"png", b"jpeg", b"webp"])),
}
ACCEPTED = {
    "query": {"BYTES"}, "images_to_gen": {"INT32", "INT64"}, "images_to_cherry_pick": {"INT32", "INT64"},
    "top_k": {"INT32", "INT64"}, "top_p": {"FP32", "FP64"}, "temperature": {"FP32", "FP64"},
    "super_res": {"BOOL"}, "seed": {"INT64", "UINT64"}, "format": {"BYTES"},
}
ALL_DATATYPES = [*CONTENTS, "FP16", "BF16"]
MARKER = "MARKER"
WHERE = re.compile(r"^(inputs[.\[]|outputs[.\[]|parameters[.:]|raw_input_contents:|id:)")
OBJECT_TEXT = re.compile(r"0x[0-9a-fA-F]{4,}|<[^<>]*(?:object|class)[^<>]*>")


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    for running in serve(tiny_model_dir):
        channel = grpc.insecure_channel(running["grpc"])
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield {**running, "stub": pb_grpc.GRPCInferenceServiceStub(channel),
                   "raw": channel.unary_unary(MODEL_INFER, request_serializer=lambda b: b,
                                              response_deserializer=pb.ModelInferResponse.FromString)}
        finally:
            channel.close()


def tensor(name: str, datatype: str, values: list[Any]) -> Tensor:
    t = Tensor(name=name, datatype=datatype, shape=[len(values)])
    getattr(t.contents, CONTENTS[datatype]).extend(values)
    return t


def raw_element(datatype: str, value: Any) -> bytes:
    if datatype == "BYTES":
        return len(value).to_bytes(4, "little") + value
    if datatype in ("FP32", "FP64"):
        return struct.pack("<f" if datatype == "FP32" else "<d", value)
    return int(value).to_bytes(ITEMSIZE[datatype], "little", signed=datatype.startswith("INT"))


def to_raw(request: pb.ModelInferRequest) -> None:
    """Move every input's contents into raw_input_contents, as clients that send raw tensors do."""
    for t in request.inputs:
        values = list(getattr(t.contents, CONTENTS[t.datatype]))
        request.raw_input_contents.append(b"".join(raw_element(t.datatype, v) for v in values))
        t.ClearField("contents")


@st.composite
def base_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    n = draw(st.integers(1, 3))
    queries = draw(st.lists(st.text("абвгдкот ", min_size=1, max_size=8).filter(str.strip), min_size=n,
                            max_size=n))
    inputs = [tensor("query", "BYTES", [q.encode() for q in queries]),
              tensor("super_res", "BOOL", [False])]
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=4)):
        datatype, element = VALID[name]
        count = draw(st.sampled_from([1, n]))
        inputs.append(tensor(name, datatype, [draw(element) for _ in range(count)]))
    order = draw(st.permutations(range(len(inputs))))
    return pb.ModelInferRequest(model_name=NAME, inputs=[inputs[i] for i in order])


def bad_parameter(draw: st.DrawFn, known: str, kind: str) -> tuple[str, pb.InferParameter]:
    """A parameter this server refuses: unknown, a feature not served, of the wrong kind, or empty."""
    choice = draw(st.sampled_from(["unknown", "unserved", "wrong kind", "empty"]))
    if choice == "unknown":
        return draw(st.sampled_from(["priority", "timeout", "x", "binary_data_outputs"])), \
            pb.InferParameter(int64_param=draw(st.integers(-5, 5)))
    if choice == "unserved":
        name = draw(st.sampled_from(["shared_memory_region", "shared_memory_byte_size", "sequence_id",
                                     "classification"]))
        return name, pb.InferParameter(string_param="r")
    if choice == "empty":
        return known, pb.InferParameter()
    wrong = {"bool": pb.InferParameter(string_param="true"), "int": pb.InferParameter(bool_param=True),
             "str": pb.InferParameter(int64_param=3)}
    return known, wrong[kind]


@st.composite
def malformed_requests(draw: st.DrawFn) -> tuple[str, pb.ModelInferRequest | bytes]:
    """(the defect, a request it makes invalid: a message, or its bytes where protobuf would not write it)."""
    request = draw(base_requests())
    defect = draw(st.sampled_from([
        "datatype", "shape", "contents field", "raw count", "raw length", "not utf-8", "unknown input",
        "input twice", "request parameter", "input parameter", "output parameter", "string field",
    ]))
    victim = request.inputs[draw(st.integers(0, len(request.inputs) - 1))]
    name = victim.name
    if defect == "datatype":
        victim.datatype = draw(st.sampled_from(
            [d for d in ALL_DATATYPES if d not in ACCEPTED[name]] + ["", "INT128", "bytes", "STRING"]))
    elif defect == "shape":
        count = len(getattr(victim.contents, CONTENTS[victim.datatype]))
        shape = draw(st.one_of(
            st.lists(st.integers(-3, 2**40), min_size=1, max_size=1).filter(lambda s: s[0] != count),
            st.lists(st.integers(0, 4), min_size=0, max_size=4).filter(lambda s: len(s) != 1),
        ))
        del victim.shape[:]
        victim.shape.extend(shape)
    elif defect == "contents field":
        values = list(getattr(victim.contents, CONTENTS[victim.datatype]))
        victim.ClearField("contents")
        other = draw(st.sampled_from([f for f in set(CONTENTS.values()) if f != CONTENTS[victim.datatype]]))
        samples = {"bool_contents": True, "bytes_contents": b"1", "fp32_contents": 1.0, "fp64_contents": 1.0}
        getattr(victim.contents, other).extend([samples.get(other, 1)] * len(values))
    elif defect == "raw count":
        to_raw(request)
        if draw(st.booleans()) and len(request.raw_input_contents) > 1:
            del request.raw_input_contents[draw(st.integers(0, len(request.raw_input_contents) - 1))]
        else:
            request.raw_input_contents.append(draw(st.binary(max_size=16)))
    elif defect == "raw length":
        to_raw(request)
        i = list(request.inputs).index(victim)
        raw = request.raw_input_contents[i]
        if draw(st.booleans()) and raw:
            request.raw_input_contents[i] = raw[: draw(st.integers(0, len(raw) - 1))]
        else:
            extra = draw(st.binary(min_size=1, max_size=12))
            if victim.datatype == "BYTES" and len(extra) < 4:
                extra = extra.ljust(4, b"\xff")  # a length prefix that promises more than there is
            request.raw_input_contents[i] = raw + extra
    elif defect == "not utf-8":
        bad = draw(st.sampled_from([b"\xed\xa0\x80", b"\xff", b"\xc3", b"a\x80b"]))
        target = next(t for t in request.inputs if t.datatype == "BYTES")
        elements = target.contents.bytes_contents
        elements[draw(st.integers(0, len(elements) - 1))] = bad
    elif defect == "unknown input":
        request.inputs.append(tensor(draw(st.sampled_from(["steps", "Query", "prompt", "preview_every", ""])),
                                     "INT32", [1]))
    elif defect == "string field":
        # text that is not UTF-8 in a `string` field: protobuf's parser refuses the whole message
        where = draw(st.sampled_from(["id", "request parameter", "input parameter", "parameter name"]))
        if where == "id":
            request.id = MARKER
        elif where == "request parameter":
            request.parameters["binary_data_output"].string_param = MARKER
        elif where == "input parameter":
            victim.parameters["content_type"].string_param = MARKER
        else:
            request.parameters[MARKER].bool_param = True
        bad = draw(st.sampled_from([b"\xed\xa0\x80", b"\xff\xfe\xfd", b"\xc3(\xa0"]))
        return defect, request.SerializeToString().replace(MARKER.encode(), bad + b"x" * (len(MARKER) - 3))
    elif defect == "input twice":
        request.inputs.append(victim)
    elif defect == "request parameter":
        key, value = bad_parameter(draw, "binary_data_output", "bool")
        request.parameters[key].CopyFrom(value)
    elif defect == "input parameter":
        known, kind = draw(st.sampled_from([("binary_data_size", "int"), ("content_type", "str")]))
        key, value = bad_parameter(draw, known, kind)
        victim.parameters[key].CopyFrom(value)
    else:
        output = Output(name=draw(st.sampled_from(["images", "clip_scores", "seed"])))
        key, value = bad_parameter(draw, "binary_data", "bool")
        output.parameters[key].CopyFrom(value)
        request.outputs.append(output)
    return defect, request


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed_requests())
def test_every_malformed_model_infer_is_invalid_argument_naming_its_place(srv, case):
    defect, request = case
    with pytest.raises(grpc.RpcError) as err:
        # served (OK) would fail here: it is not valid
        (srv["raw"] if isinstance(request, bytes) else srv["stub"].ModelInfer)(request, timeout=60)
    code, details = err.value.code(), err.value.details() or ""
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (defect, details, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (defect, code, details, request)
    assert WHERE.match(details), (defect, details)
    assert not OBJECT_TEXT.search(details), details


def test_the_property_run_left_no_server_fault(srv):
    # after the property test in this module: no call was answered UNKNOWN or INTERNAL, and none logged a
    # traceback; a good request is still served
    def count(code: str) -> float:
        return metric(srv["base"], "kandinsky_requests_total", f'{{code="{code}",protocol="grpc",tenant=""}}')

    for code in ("UNKNOWN", "INTERNAL"):
        assert count(code) == 0
    assert count("INVALID_ARGUMENT") > 50
    assert not [line for line in srv["lines"] if "Traceback" in line]
    request = pb.ModelInferRequest(model_name=NAME, inputs=[
        tensor("query", "BYTES", ["кот".encode()]), tensor("images_to_gen", "INT32", [1]),
        tensor("super_res", "BOOL", [False])])
    response = srv["stub"].ModelInfer(request, timeout=300)
    assert "images" in [o.name for o in response.outputs]
