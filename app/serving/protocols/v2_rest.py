"""The Open Inference Protocol over REST (SPEC section 8): `POST /v2/models/{name}/infer` and the v2
model routes. KServe's own app serves them (infer calls `KandinskyModel.predict` with an `InferRequest`,
answered by `v2.infer`); here they are declared, documented and counted, and a raw infer body is checked
before KServe decodes it: KServe answers a malformed JSON body with FastAPI's 422, and a malformed binary
one (a missing key, a short buffer, non-UTF-8 BYTES) with a 500; `rest_body_problem` makes those 400s
naming the place.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from kserve.protocol.rest.v2_datamodels import (
    InferenceRequest,
    InferenceResponse,
    ListModelsResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerMetadataResponse,
)
from kserve.utils.numpy_codec import to_np_dtype
from pydantic import ConfigDict, ValidationError

from app.serving.core.errors import find_unencodable
from app.serving.protocols.routes import Operation, ProtocolContext, Route
from app.serving.protocols.v2 import INFER_PATH

#: The header KServe and Triton read the JSON length of a binary REST body from.
JSON_LENGTH_HEADER = "inference-header-content-length"
PROTOCOL = "v2"


# ---- the REST body, before KServe decodes it ----------------------------------------------------------


def rest_body_problem(body: bytes, headers: Mapping[str, str]) -> str | None:
    """What is wrong with a REST v2 infer body, naming the place (`inputs[0].datatype: ...`); None if fine.

    `headers` with lower-case names. Covers what KServe's decoding would answer with a 422 or a 500;
    the inputs' names, datatypes, shapes and values are checked later by `infer()`.
    """
    length = headers.get(JSON_LENGTH_HEADER)
    if length is None:
        return _json_body_problem(body)
    if not length.isdigit() or int(length) > len(body):
        return f"{JSON_LENGTH_HEADER}: must be the JSON part's length in bytes, 0..{len(body)}"
    try:
        doc = _loads(body[: int(length)])
    except _NotJSON as exc:
        return f"body: the JSON part is not valid JSON ({exc})"
    return _unencodable_problem(doc) or _binary_body_problem(doc, memoryview(body)[int(length):])


class _NotJSON(ValueError):
    pass


def _loads(text: bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        try:
            # NaN, Infinity, integers beyond 64 bits and lone surrogates ("\\ud800"): Python's parser reads
            # them, and the field they are in is named (by infer(), as v1 names the field, or here).
            return json.loads(text)
        except (ValueError, RecursionError):
            raise _NotJSON(str(exc)) from None


def _unencodable_problem(doc: Any) -> str | None:
    """A string that UTF-8 cannot encode, named: KServe would fail on it writing the answer (a 500 after the
    whole generation, for `id`). The inputs' `data` are left to infer(), which names them by input."""
    found = find_unencodable(doc, skip=lambda loc: len(loc) == 3 and loc[0] == "inputs" and loc[2] == "data")
    return None if found is None else found.text()


def _json_body_problem(body: bytes) -> str | None:
    try:
        doc = _loads(body)
    except _NotJSON as exc:
        return f"body: not valid JSON ({exc})"
    problem = _unencodable_problem(doc)
    if problem is not None:
        return problem
    try:
        InferenceRequest.model_validate(doc)
    except ValidationError as exc:
        return _pydantic_message(exc)
    return None


def _pydantic_message(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        where = ""
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else ("." if where else "") + str(part)
        parts.append(f"{where or 'body'}: {err['msg']}")
    return "; ".join(parts)


def _binary_body_problem(doc: Any, binary: memoryview) -> str | None:
    if not isinstance(doc, dict):
        return "body: the JSON part must be an object with `inputs`"
    if not isinstance(doc.get("inputs"), list):
        return "inputs: is required, a list of tensors"
    offset = 0
    for i, inp in enumerate(doc["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(inp, dict):
            return f"{where}: must be an object"
        required = (("name", str, "a string"), ("datatype", str, "a string"), ("shape", list, "a list"))
        for key, kind, noun in required:
            if not isinstance(inp.get(key), kind):
                return f"{where}.{key}: is required, {noun}"
        shape = inp["shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            return f"{where}.shape: must be a list of integers >= 0"
        params = inp.get("parameters")
        if params is not None and not isinstance(params, dict):
            return f"{where}.parameters: must be an object"
        size = (params or {}).get("binary_data_size")
        if size is None:
            if not isinstance(inp.get("data"), list):
                return f"{where}.data: is required (a list), or parameters.binary_data_size"
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"{where}.parameters.binary_data_size: must be an integer >= 0"
        if offset + size > len(binary):
            return f"{where}.parameters.binary_data_size: {size} bytes but {len(binary) - offset} remain"
        problem = _raw_problem(binary[offset : offset + size], inp["datatype"].upper(), shape)
        if problem is not None and inp["name"] == "image_prompt" and "UTF-8" in problem:
            # KServe's REST decoding takes BYTES elements as UTF-8 text only (gRPC takes raw bytes).
            problem += ": over REST send the image file as base64 text; gRPC takes its raw bytes"
        if problem is not None:
            return f"{where}: {problem}"
        offset += size
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            return "outputs: must be a list of objects"
        for i, out in enumerate(outputs):
            if not isinstance(out.get("name"), str):
                return f"outputs[{i}].name: is required, a string"
    if doc.get("parameters") is not None and not isinstance(doc["parameters"], dict):
        return "parameters: must be an object"
    return None


def _raw_problem(raw: memoryview, datatype: str, shape: list[int]) -> str | None:
    count = math.prod(shape)
    dtype = to_np_dtype(datatype)
    if dtype is None:
        return f"datatype {datatype} is not a v2 datatype"
    if datatype != "BYTES":
        itemsize = np.dtype(dtype).itemsize
        if len(raw) != count * itemsize:
            return f"{len(raw)} bytes of binary data; shape {shape} of {datatype} needs {count * itemsize}"
        return None
    offset, elements = 0, 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            return f"binary BYTES element {elements} is cut short"
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            return f"binary BYTES element {elements} is cut short"
        try:
            bytes(raw[offset : offset + size]).decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"binary BYTES element {elements} is not valid UTF-8 (byte {exc.start})"
        offset += size
        elements += 1
    if elements != count:
        return f"{elements} BYTES element(s) in the binary data; shape {shape} needs {count}"
    return None




# ---- the API document -----------------------------------------------------------------------------

_INFER_EXAMPLE: dict[str, Any] = {
    "id": "42",
    "inputs": [
        {"name": "query", "shape": [1], "datatype": "BYTES", "data": ["Кот в шляпе"]},
        {"name": "images_to_gen", "shape": [1], "datatype": "INT32", "data": [4]},
        {"name": "images_to_cherry_pick", "shape": [1], "datatype": "INT32", "data": [2]},
        {"name": "super_res", "shape": [1], "datatype": "BOOL", "data": [False]},
        {"name": "seed", "shape": [1], "datatype": "INT64", "data": [123]},
        {"name": "format", "shape": [1], "datatype": "BYTES", "data": ["png"]},
    ],
}


class InferRequestBody(InferenceRequest):
    """An Open Inference Protocol request. Inputs, each of shape [N] (one element per instance) or [1]
    (the same for every instance): `query` BYTES (required); `images_to_gen`, `images_to_cherry_pick`,
    `top_k` INT32 or INT64; `top_p`, `temperature` FP32 or FP64; `super_res` BOOL; `seed` INT64 or UINT64;
    `format` BYTES. Defaults and bounds as the v1 parameters (see the model card). `parameters` taken:
    `binary_data_output` (the request), `binary_data` (an output), `binary_data_size` and `content_type`
    (an input); any other is a 400 naming it. Text that UTF-8 cannot encode (a lone surrogate) anywhere is
    a 400 naming its place."""

    model_config = ConfigDict(title="InferRequest", json_schema_extra={"examples": [_INFER_EXAMPLE]})




def routes(ctx: ProtocolContext) -> list[Route]:
    return [
        Route("POST", INFER_PATH, protocol=PROTOCOL, auth=True, body_check=rest_body_problem, doc=Operation(
            "Generate images (Open Inference Protocol, KServe v2)",
            "Predict",
            InferenceResponse,
            (400, 404, 408, 413, 500, 503, 504),
            request=InferRequestBody,
            description=(
                "Outputs, all unless `outputs` names some: `images` BYTES [M] (encoded files, instance by "
                "instance, best first), `clip_scores` FP32 [M], `ppl` FP32 [M], `instance` INT32 [M] (the "
                "instance of each image), `seed` INT64 [N]. In JSON `images` elements are base64 strings; "
                "with the binary data extension (`parameters.binary_data_output`, or `binary_data` on an "
                "output) the answer is `application/octet-stream`: the JSON (its length in the "
                "`Inference-Header-Content-Length` header) followed by the raw tensors, each image file as "
                "it is. The same seed gives the same images as v1 predict. gRPC `ModelInfer` on the gRPC "
                "port takes the same tensors."
            ),
            ok_description="The generated images of every instance, with their scores.",
            ok_media=("application/octet-stream",),
            error_descriptions={
                400: "The request is invalid; `error` names the input (`inputs.top_k: ...`) or output.",
            },
        )),
        Route("GET", "/v2", Operation("Server metadata", "Models", ServerMetadataResponse)),
        Route("GET", "/v2/models", Operation("List the served models (v2)", "Models", ListModelsResponse)),
        Route("GET", "/v2/models/{model_name}", Operation(
            "Model metadata (v2)",
            "Models",
            ModelMetadataResponse,
            (400, 404),
            error_descriptions={400: "The model's metadata cannot be given."},
        )),
        Route("GET", "/v2/models/{model_name}/ready", Operation(
            "Model readiness (v2)",
            "Health",
            ModelReadyResponse,
            (404, 503),
            error_descriptions={503: "The model is loading or the server is shutting down."},
        )),
    ]
