"""The Open Inference Protocol (KServe v2): REST `/v2/models/{name}/infer` and gRPC `ModelInfer`.

Both arrive through KServe's own v2 path as an `InferRequest`; `infer()` turns its tensors into v1
instances, validates them with the v1 schema (one set of rules, `KandinskyModel.parse`), queues them on
the shared scheduler (`KandinskyModel.generate`: v2 requests batch with v1 ones, and a seed gives the same
images whichever protocol asked) and answers an `InferResponse` (SPEC.md section 8):

    inputs   query BYTES (required); images_to_gen, images_to_cherry_pick, top_k INT32|INT64;
             top_p, temperature FP32|FP64; super_res BOOL; seed INT64|UINT64; format BYTES.
             Each of shape [N] (one element per instance) or [1] (the same for every instance).
    outputs  images BYTES [M] (encoded files, instance by instance, best first), clip_scores FP32 [M],
             ppl FP32 [M], instance INT32 [M], seed INT64 [N]; all unless the request names some.

Client errors name the input (`inputs.top_k: must be <= 8192 ...`): REST 400, gRPC INVALID_ARGUMENT.

KServe's gRPC server is replaced by `GRPCServer` (same servicer, interceptors and protocol) for what
KServe's lacks: 64 MiB messages by default (a response over the limit refused with a message saying
so), `kandinsky_requests_total{protocol="grpc"}` counted by an interceptor with the final status name,
and readiness checked before `ModelInfer` (KServe's gRPC path calls `model.load()` on a model that is not
ready, which here would load a second pipeline while draining).

`rest_body_problem()` checks a raw REST v2 body before KServe decodes it: KServe answers a malformed JSON
body with FastAPI's 422, and a malformed binary one (a missing key, a short buffer, non-UTF-8 BYTES)
with a 500; the HTTP middleware calls it to answer those with a 400 naming the place.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import orjson
from grpc import aio
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import ModelNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer as KServeGRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer as KServeInferenceServicer
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput
from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse
from kserve.utils.numpy_codec import to_np_dtype
from pydantic import ConfigDict, ValidationError

from app.serving import metrics
from app.serving.errors import RequestInvalid, ServiceError
from app.serving.openapi import Operation, register_operations
from app.serving.schema import MAX_INSTANCES

if TYPE_CHECKING:
    import kserve

    from app.serving.model import KandinskyModel

log = logging.getLogger(__name__)

INFER_PATH = "/v2/models/{model_name}/infer"
#: gRPC messages either way, unless --grpc_max_send_message_length / --grpc_max_receive_message_length
#: say otherwise: sixteen 1024x1024 PNGs exceed KServe's 8 MiB default.
GRPC_MESSAGE_BYTES = 64 << 20
#: The header KServe and Triton read the JSON length of a binary REST body from.
JSON_LENGTH_HEADER = "inference-header-content-length"
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


# ---- the tensors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One input or output: its name, the datatypes it accepts (the first is the one metadata lists)."""

    name: str
    datatypes: tuple[str, ...]


INPUTS = (
    Tensor("query", ("BYTES",)),
    Tensor("images_to_gen", ("INT32", "INT64")),
    Tensor("images_to_cherry_pick", ("INT32", "INT64")),
    Tensor("top_k", ("INT32", "INT64")),
    Tensor("top_p", ("FP32", "FP64")),
    Tensor("temperature", ("FP32", "FP64")),
    Tensor("super_res", ("BOOL",)),
    Tensor("seed", ("INT64", "UINT64")),
    Tensor("format", ("BYTES",)),
    # An image prompt (SPEC section 9): the image file's bytes (base64 text in REST JSON), its borders as
    # JSON text ({"up": 4, "left": 2}) and crop_first; v1's params.image_prompt in three tensors.
    Tensor("image_prompt", ("BYTES",)),
    Tensor("borders", ("BYTES",)),
    Tensor("crop_first", ("BOOL",)),
)
#: The inputs that together make v1's params.image_prompt.
_IMAGE_PROMPT_INPUTS = ("image_prompt", "borders", "crop_first")
OUTPUTS = (
    Tensor("images", ("BYTES",)),
    Tensor("clip_scores", ("FP32",)),
    Tensor("ppl", ("FP32",)),
    Tensor("instance", ("INT32",)),
    Tensor("seed", ("INT64",)),
)
_INPUTS = {t.name: t for t in INPUTS}
_OUTPUTS = {t.name: t for t in OUTPUTS}
#: v1 parameters that v2 does not take, and why (an unknown input otherwise).
_NOT_V2 = {"preview_every": "previews are sent by jobs and streams only, not by v2 infer"}


def input_metadata() -> list[dict[str, Any]]:
    """The inputs for the v2 model metadata (REST and gRPC): one element per instance, or one for all."""
    return [{"name": t.name, "datatype": t.datatypes[0], "shape": [-1]} for t in INPUTS]


def output_metadata() -> list[dict[str, Any]]:
    """The outputs for the v2 model metadata: images, clip_scores, ppl and instance [M]; seed [N]."""
    return [{"name": t.name, "datatype": t.datatypes[0], "shape": [-1]} for t in OUTPUTS]


# ---- infer ----------------------------------------------------------------------------------------


async def infer(model: KandinskyModel, request: InferRequest) -> InferResponse:
    """Answer one v2 request (REST or gRPC) through the v1 path; errors name the input or output.

    gRPC requests get our errors as gRPC statuses (KServe's interceptor would make them INTERNAL).
    """
    try:
        wanted = _requested_outputs(request)
        payload, indexed = _v1_payload(request)
        try:
            instances = model.parse(payload)
        except RequestInvalid as exc:
            raise RequestInvalid(_v2_message(exc.message, indexed)) from None
        predictions = await model.generate(instances)
        return _response(model.name, request, predictions, wanted)
    except ServiceError as exc:
        if request.from_grpc:
            status = _GRPC_STATUS.get(exc.status, grpc.StatusCode.INTERNAL)
            raise GrpcException(exc.message, status_code=status) from None
        raise


# HTTP statuses of our errors -> gRPC's (the usual mapping, as grpc-gateway's in reverse).
_GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _v1_payload(request: InferRequest) -> tuple[dict[str, Any], set[str]]:
    """The v1 body the inputs describe, and the names of the inputs with one element per instance (of
    several): an error in one of those names its element (`inputs.top_k[2]`)."""
    problems: list[str] = []
    given: dict[str, InferInput] = {}
    for inp in request.inputs:
        where = f"inputs.{inp.name}"
        if inp.name in given:
            problems.append(f"{where}: given twice")
        elif inp.name in _NOT_V2:
            problems.append(f"{where}: not a v2 input ({_NOT_V2[inp.name]})")
        elif inp.name not in _INPUTS:
            problems.append(f"{where}: unknown input; allowed: {', '.join(_INPUTS)}")
        else:
            given[inp.name] = inp
    if "query" not in given:
        problems.append("inputs.query: is required (BYTES, one UTF-8 string per instance)")
    if problems:
        raise RequestInvalid("; ".join(problems))

    values = {}
    for name, inp in given.items():
        try:
            values[name] = _values(inp, _INPUTS[name])
        except _InputProblem as exc:
            problems.append(f"inputs.{name}{exc.where}: {exc}")
    if problems:
        raise RequestInvalid("; ".join(problems))

    n = len(values["query"])
    if n > MAX_INSTANCES:
        raise RequestInvalid(f"inputs.query: {n} instances; allowed: 1..{MAX_INSTANCES} per request")
    for name, vals in values.items():
        if len(vals) not in (1, n):
            allowed = f"[{n}] (one element per instance) or [1] (the same for every instance)"
            allowed = "[1]" if n == 1 else allowed
            problems.append(f"inputs.{name}: shape [{len(vals)}] for {n} instance(s); allowed: {allowed}")
    if problems:
        raise RequestInvalid("; ".join(problems))

    prompt_given = [name for name in _IMAGE_PROMPT_INPUTS if name in values]
    if prompt_given and "image_prompt" not in values:
        raise RequestInvalid(f"inputs.{prompt_given[0]}: needs the image_prompt input (the image file)")
    if "image_prompt" in values and "borders" not in values:
        raise RequestInvalid('inputs.borders: is required with image_prompt (JSON text such as {"up": 4})')
    instances = []
    for i, query in enumerate(values["query"]):
        params = {name: vals[i % len(vals)] for name, vals in values.items()
                  if name != "query" and name not in _IMAGE_PROMPT_INPUTS}
        if "image_prompt" in values:
            params["image_prompt"] = {
                name.replace("image_prompt", "image"): vals[i % len(vals)]
                for name, vals in values.items() if name in _IMAGE_PROMPT_INPUTS
            }
        instances.append({"query": query, "params": params})
    return {"instances": instances}, {name for name, vals in values.items() if n > 1 and len(vals) == n}


class _InputProblem(ValueError):
    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where  # an element index such as "[2]", after the input's name


def _values(inp: InferInput, spec: Tensor) -> list[Any]:
    """The elements of a 1-D input as Python values; the schema checks their types and ranges."""
    datatype = inp.datatype
    if datatype not in spec.datatypes:
        raise _InputProblem(f"datatype {datatype} is not accepted; allowed: {', '.join(spec.datatypes)}")
    shape = list(inp.shape)
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise _InputProblem(f"shape {shape} is not accepted; allowed: [N] (N >= 1 instances) or [1]")
    # JSON and gRPC contents arrive as a list; gRPC's raw_input_contents only as bytes (as_numpy decodes).
    if inp.data:
        values = list(inp.data)
    else:
        try:
            values = inp.as_numpy().reshape(-1).tolist()
        except Exception:  # any decoding failure is the client's buffer
            raise _InputProblem(f"its data do not hold shape {shape} of {datatype}") from None
    if len(values) != shape[0]:
        raise _InputProblem(f"shape {shape} but {len(values)} element(s)")
    if spec.name == "image_prompt":
        # Raw file bytes (binary data, gRPC) travel on as base64, as v1 carries them; JSON has base64 text.
        return [base64.b64encode(bytes(v)).decode("ascii") if isinstance(v, bytes | bytearray) else v
                for v in values]
    if spec.name == "borders":
        return [_json_object(_text(v, i), i) for i, v in enumerate(values)]
    if datatype == "BYTES":
        return [_text(v, i) for i, v in enumerate(values)]
    if datatype == "FP32":
        return [_from_fp32(v) for v in values]
    return values


def _text(value: Any, index: int) -> Any:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _InputProblem(f"not valid UTF-8 (byte {exc.start})", f"[{index}]") from None
    return value  # a str from JSON, or a wrong type the schema names


def _json_object(value: Any, index: int) -> Any:
    if not isinstance(value, str):
        return value  # the schema names the wrong type
    try:
        return json.loads(value)
    except ValueError:
        raise _InputProblem('not JSON text such as {"up": 4, "left": 2}', f"[{index}]") from None


def _from_fp32(value: Any) -> Any:
    # An FP32 element arrives widened (0.975 as 0.9750000238...): take the decimal the client wrote, so
    # top_p and temperature mean the same as in a v1 request.
    if isinstance(value, float) and math.isfinite(value):
        narrow = np.float32(value)
        if float(narrow) == value:
            return float(str(narrow))
    return value


_INSTANCE_LOC = re.compile(r"instances\[(\d+)\](?:\.params)?(?:\.(\w+))?")
_ALLOWED_INSTANCES = re.compile(r"; allowed: a list of [^;]*")
_PROMPT_PART = re.compile(r"inputs\.image_prompt(\[\d+\])?\.(borders|crop_first)")
_PROMPT_IMAGE = re.compile(r"inputs\.image_prompt(\[\d+\])?\.image\b")
_ERROR_START = re.compile(r"; (?=inputs\.|\.\.\. and )")


def _v2_message(message: str, indexed: set[str]) -> str:
    """The v1 schema's message with each field named as the input (`instances[2].params.top_k` ->
    `inputs.top_k[2]`, without the index for an input given once), each error once."""

    def name(match: re.Match[str]) -> str:
        field = match.group(2)
        if field is None:
            return "inputs"
        return f"inputs.{field}[{match.group(1)}]" if field in indexed else f"inputs.{field}"

    text = _INSTANCE_LOC.sub(name, message)
    # params.image_prompt is three inputs here: its image, borders and crop_first.
    text = _PROMPT_PART.sub(lambda m: f"inputs.{m.group(2)}{m.group(1) or ''}", text)
    text = _PROMPT_IMAGE.sub(lambda m: f"inputs.image_prompt{m.group(1) or ''}", text)
    # The only request-wide rule: the images of all instances together.
    text = _ALLOWED_INSTANCES.sub("", text).replace("instances: asks for", "inputs.images_to_gen: asks for")
    return "; ".join(dict.fromkeys(_ERROR_START.split(text)))


# ---- the response ---------------------------------------------------------------------------------


def _requested_outputs(request: InferRequest) -> dict[str, bool]:
    """Output name -> binary (raw file bytes, not base64), in the order to answer them."""
    if request.from_grpc:
        names = [o.name for o in request.request_outputs or ()] or list(_OUTPUTS)
        _check_output_names(names)
        return dict.fromkeys(names, True)  # gRPC always carries bytes
    default = (request.parameters or {}).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise RequestInvalid("parameters.binary_data_output: must be true or false")
    if not request.request_outputs:
        return dict.fromkeys(_OUTPUTS, default)
    _check_output_names([o.name for o in request.request_outputs])
    wanted = {}
    for out in request.request_outputs:
        binary = (out.parameters or {}).get("binary_data", default)
        if not isinstance(binary, bool):
            raise RequestInvalid(f"outputs.{out.name}.parameters.binary_data: must be true or false")
        wanted[out.name] = binary
    return wanted


def _check_output_names(names: Sequence[str]) -> None:
    allowed = ", ".join(_OUTPUTS)
    problems = [f"outputs.{n}: unknown output; allowed: {allowed}" for n in names if n not in _OUTPUTS]
    twice = dict.fromkeys(n for n in names if names.count(n) > 1)
    problems += [f"outputs.{n}: requested twice" for n in twice]
    if problems:
        raise RequestInvalid("; ".join(problems))


def _response(
    model_name: str, request: InferRequest, predictions: list[dict[str, Any]], wanted: dict[str, bool]
) -> InferResponse:
    images = [b64 for p in predictions for b64 in p["images"]]
    binary_images = wanted.get("images", False)
    arrays = {
        # object arrays: KServe writes str elements as JSON strings and bytes elements as raw bytes
        "images": np.array([base64.b64decode(b) for b in images] if binary_images else images, dtype=object),
        "clip_scores": np.array([s for p in predictions for s in p["clip_scores"]], dtype=np.float32),
        "ppl": np.array([v for p in predictions for v in p["ppl"]], dtype=np.float32),
        "instance": np.array([i for i, p in enumerate(predictions) for _ in p["images"]], dtype=np.int32),
        "seed": np.array([p["seed"] for p in predictions], dtype=np.int64),
    }
    outputs = [
        InferOutput(name, list(arrays[name].shape), _OUTPUTS[name].datatypes[0], data=arrays[name])
        for name in wanted
    ]
    return InferResponse(
        response_id=request.id or uuid.uuid4().hex,
        model_name=model_name,
        infer_outputs=outputs,
        from_grpc=request.from_grpc,
        # per output, so that `binary_data` on one output and `binary_data_output` combine as the
        # extension says (KServe alone reads only the former once outputs are named)
        requested_outputs=None
        if request.from_grpc
        else [RequestedOutput(name, {"binary_data": binary}) for name, binary in wanted.items()],
    )


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
        doc = orjson.loads(body[: int(length)])
    except orjson.JSONDecodeError as exc:
        return f"body: the JSON part is not valid JSON ({exc})"
    return _binary_body_problem(doc, memoryview(body)[int(length):])


def _json_body_problem(body: bytes) -> str | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            # NaN, Infinity and integers beyond 64 bits: Python's parser reads them, and infer() names
            # the input they are in, as v1 names the field.
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return f"body: not valid JSON ({exc})"
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


# ---- gRPC -----------------------------------------------------------------------------------------


class InferenceServicer(KServeInferenceServicer):
    """KServe's servicer; `ModelInfer` checks the model is served and ready first, as KServe's REST
    infer does, and names the input of a datatype gRPC cannot carry."""

    async def ModelInfer(  # noqa: N802 - the protocol's name
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        # KServe's gRPC infer would call model.load() on a model that is not ready (loading a second
        # pipeline while draining); refuse instead, as its REST infer does.
        if not await self._data_plane.model_ready(request.model_name, True):
            raise ModelNotReady(request.model_name)
        for tensor in request.inputs:
            if to_np_dtype(tensor.datatype) is None:
                # KServe's decoding would say only "invalid content type"
                raise GrpcException(
                    f"inputs.{tensor.name}: datatype {tensor.datatype!r} is not a v2 datatype",
                    status_code=grpc.StatusCode.INVALID_ARGUMENT,
                )
        return await super().ModelInfer(request, context)


Behavior = Callable[[Any, Any], Awaitable[Any]]


class InferInterceptor(aio.ServerInterceptor):
    """Around every ModelInfer: `kandinsky_requests_total{code=<gRPC status name>, protocol="grpc"}` and
    the request duration, with the final status (the interceptors inside it turn exceptions into
    statuses); and a response over the send limit refused with a message that says so (gRPC alone would
    say RESOURCE_EXHAUSTED after the handler returned, unseen by the count)."""

    def __init__(self, max_send_bytes: int) -> None:
        self.max_send_bytes = max_send_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != _MODEL_INFER or handler.unary_unary is None:
            return handler
        behavior: Behavior = handler.unary_unary

        async def counted(request: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                response = await behavior(request, context)
                size = response.ByteSize()
                if 0 < self.max_send_bytes < size:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the response is {size} bytes, over this server's gRPC message limit of "
                        f"{self.max_send_bytes} (--grpc_max_send_message_length): ask for fewer images, "
                        "or use REST",
                    )
                return response
            except asyncio.CancelledError:
                # the client cancelled, or gave up at its deadline (it then sees DEADLINE_EXCEEDED; its
                # cancellation reaches the server first, so the server's own deadline has not passed)
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN  # set by abort(), or gRPC's default
                raise
            finally:
                elapsed = time.perf_counter() - started
                metrics.REQUESTS_TOTAL.labels(code=_status_name(code), protocol="grpc").inc()
                metrics.REQUEST_SECONDS.observe(elapsed)
                # One access line per call, as REST requests get (app/serving/http.py).
                peer = context.peer() or "-"
                access_log.log(
                    logging.WARNING if code in _SERVER_FAULTS else logging.INFO,
                    '%s "gRPC ModelInfer" %s %.1f ms protocol=grpc', peer, _status_name(code), elapsed * 1000,
                    extra={"method": "gRPC", "route": _MODEL_INFER, "path": _MODEL_INFER,
                           "status": _status_name(code), "duration_ms": round(elapsed * 1000, 1),
                           "client": peer, "protocol": "grpc"},
                )

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                  grpc.StatusCode.DEADLINE_EXCEEDED}
access_log = logging.getLogger("app.access")


def _status_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    # grpc.aio reports an aborted call's code as the raw integer on some versions
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


class GRPCServer(KServeGRPCServer):
    """KServe's gRPC server with our servicer, our interceptor (metrics, size) and explicit message limits."""

    def __init__(self, *args: Any, max_send_bytes: int, max_receive_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_send_bytes = max_send_bytes
        self.max_receive_bytes = max_receive_bytes

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            # ours outermost, so that it sees the status KServe's interceptor gave an exception
            interceptors=(
                InferInterceptor(self.max_send_bytes), LoggingInterceptor(), ExceptionToStatusInterceptor()
            ),
            options=[
                ("grpc.max_send_message_length", self.max_send_bytes),
                ("grpc.max_receive_message_length", self.max_receive_bytes),
            ],
        )
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        log.info(
            "gRPC server on port %d: %d threads, messages up to %d bytes sent and %d received",
            self._port, max_workers, self.max_send_bytes, self.max_receive_bytes,
        )
        await self._server.start()
        await self._server.wait_for_termination()


def add_grpc_server(
    server: kserve.ModelServer, port: int, max_threads: int, max_send_bytes: int, max_receive_bytes: int
) -> GRPCServer:
    """Serve gRPC next to `server`'s REST (build it with `enable_grpc=False`; call before `start()`).

    `ModelServer.start()` awaits everything in `servers` and `stop()` stops `_grpc_server`, so ours runs
    and shuts down exactly as KServe's own would.
    """
    grpc_server = GRPCServer(
        port,
        server.dataplane,
        server.model_repository_extension,
        kwargs={},
        grace_period=server.grace_period,
        max_send_bytes=max_send_bytes,
        max_receive_bytes=max_receive_bytes,
    )
    server._grpc_server = grpc_server
    server.servers.append(grpc_server.start(max_threads))
    return grpc_server


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
    `format` BYTES. Defaults and bounds as the v1 parameters (see the model card)."""

    model_config = ConfigDict(title="InferRequest", json_schema_extra={"examples": [_INFER_EXAMPLE]})


register_operations({
    ("POST", INFER_PATH): Operation(
        "Generate images (Open Inference Protocol, KServe v2)",
        "Predict",
        InferenceResponse,
        (400, 404, 408, 413, 500, 503, 504),
        request=InferRequestBody,
        description=(
            "Outputs, all unless `outputs` names some: `images` BYTES [M] (encoded files, instance by "
            "instance, best first), `clip_scores` FP32 [M], `ppl` FP32 [M], `instance` INT32 [M] (the "
            "instance of each image), `seed` INT64 [N]. In JSON `images` elements are base64 strings; with "
            "the binary data extension (`parameters.binary_data_output`, or `binary_data` on an output) the "
            "answer is `application/octet-stream`: the JSON (its length in the "
            "`Inference-Header-Content-Length` header) followed by the raw tensors, each image file as it "
            "is. The same seed gives the same images as v1 predict. gRPC `ModelInfer` on the gRPC port "
            "takes the same tensors."
        ),
        ok_description="The generated images of every instance, with their scores.",
        ok_media=("application/octet-stream",),
        error_descriptions={
            400: "The request is invalid; `error` names the input (`inputs.top_k: ...`) or output.",
        },
    )
})
