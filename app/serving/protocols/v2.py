"""The Open Inference Protocol (KServe v2) tensors (SPEC section 8): a v2 `InferRequest` (REST infer or
gRPC ModelInfer, both through KServe's own v2 path) becomes validated instances and a typed request on the
shared Service (v2 requests batch with v1 ones, and a seed gives the same images whichever protocol asked);
the typed result becomes an `InferResponse`.

    inputs   query BYTES (required); images_to_gen, images_to_cherry_pick, top_k INT32|INT64;
             top_p, temperature FP32|FP64; super_res BOOL; seed INT64|UINT64; format BYTES;
             image_prompt BYTES, borders BYTES (JSON text), crop_first BOOL.
             Each of shape [N] (one element per instance) or [1] (the same for every instance).
    outputs  images BYTES [M] (encoded files, instance by instance, best first), clip_scores FP32 [M],
             ppl FP32 [M], instance INT32 [M], seed INT64 [N]; all unless the request names some.

Client errors name the input (`inputs.top_k: must be <= 8192 ...`); the REST routes are in v2_rest.py,
the gRPC server in v2_grpc.py (which maps these errors to gRPC statuses).
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput

from app.serving.core.errors import (
    FieldProblem,
    RequestInvalid,
    find_unencodable,
    format_loc,
    unencodable_text,
)
from app.serving.core.schema import MAX_INSTANCES
from app.serving.core.service import Service
from app.serving.core.types import RequestResult

INFER_PATH = "/v2/models/{model_name}/infer"


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

#: The protocol's `parameters` this server takes, where (on the request, an input or an output), and their
#: kind: the binary data extension's, which KServe's and Triton's clients send, and KServe's `content_type`.
#: Any other is refused, as v1 refuses an unknown key.
PARAMETERS: dict[str, dict[str, type]] = {
    "request": {"binary_data_output": bool},
    "input": {"binary_data_size": int, "content_type": str},
    "output": {"binary_data": bool},
}
#: Parameters of features this server does not have, and what to do instead.
_NOT_SERVED = {
    **dict.fromkeys(
        ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"),
        "shared memory is not served: send the tensor's data in the request",
    ),
    "classification": "classification outputs are not served: ask for the images and their clip_scores",
    **dict.fromkeys(
        ("sequence_id", "sequence_start", "sequence_end"),
        "sequences are not served: each request stands alone",
    ),
}
_KIND_TEXT = {bool: "must be true or false", int: "must be an integer >= 0", str: "must be a string"}


class Unset:
    """A gRPC `InferParameter` whose value is of no kind this server's protocol reads (none set, or Triton's
    double_param or uint64_param, unknown to KServe's proto)."""


UNSET = Unset()


def parameter_problems(where: str, params: Mapping[str, Any] | None, scope: str) -> list[str]:
    """What is wrong with the `parameters` at `where` (`parameters`, `inputs.top_k.parameters`): unknown or
    unserved names, values of the wrong kind; each problem names its parameter."""
    allowed = PARAMETERS[scope]
    problems = []
    for name, value in (params or {}).items():
        at = f"{where}.{name}"
        kind = allowed.get(name)
        if name in _NOT_SERVED:
            problems.append(f"{at}: {_NOT_SERVED[name]}")
        elif kind is None:
            problems.append(f"{at}: unknown parameter; allowed here: {', '.join(allowed)}")
        elif value is UNSET:
            problems.append(f"{at}: has no value of a kind this server reads (bool, int64 or string)")
        elif not _of_kind(value, kind):
            problems.append(f"{at}: {_KIND_TEXT[kind]}")
    return problems


def _of_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, kind)


def input_metadata() -> list[dict[str, Any]]:
    """The inputs for the v2 model metadata (REST and gRPC): one element per instance, or one for all."""
    return [{"name": t.name, "datatype": t.datatypes[0], "shape": [-1]} for t in INPUTS]


def output_metadata() -> list[dict[str, Any]]:
    """The outputs for the v2 model metadata: images, clip_scores, ppl and instance [M]; seed [N]."""
    return [{"name": t.name, "datatype": t.datatypes[0], "shape": [-1]} for t in OUTPUTS]


# ---- infer ----------------------------------------------------------------------------------------


async def infer(service: Service, model_name: str, request: InferRequest, tenant: str | None = None
                ) -> InferResponse:
    """Answer one v2 request (REST or gRPC) on the shared path, as `tenant`'s; errors name the input or
    output."""
    if not request.from_grpc:  # gRPC's are checked on the message (v2_grpc.py): KServe drops unset values
        _check_rest_parameters(request)
    wanted = _requested_outputs(request)
    payload, indexed = _v1_payload(request)
    try:
        instances = service.parse(payload)
    except RequestInvalid as exc:
        raise RequestInvalid(exc.named(lambda p: _v2_text(p, indexed)), exc.problems, exc.more) from None
    protocol = "grpc" if request.from_grpc else "v2"
    result = await service.generate(service.request(instances, protocol, tenant))
    return _response(model_name, request, result, wanted)


def _check_rest_parameters(request: InferRequest) -> None:
    problems = parameter_problems("parameters", request.parameters, "request")
    for inp in request.inputs:
        problems += parameter_problems(f"inputs.{inp.name}.parameters", inp.parameters, "input")
    for out in request.request_outputs or ():
        problems += parameter_problems(f"outputs.{out.name}.parameters", out.parameters, "output")
    if problems:
        raise RequestInvalid("; ".join(problems))


def _v1_payload(request: InferRequest) -> tuple[dict[str, Any], set[str]]:
    """The v1 body the inputs describe, and the names of the inputs with one element per instance (of
    several): an error in one of those names its element (`inputs.top_k[2]`)."""
    problems: list[str] = []
    given: dict[str, InferInput] = {}
    for i, inp in enumerate(request.inputs):
        where = f"inputs.{inp.name}"
        if not inp.name:
            problems.append(f"inputs[{i}].name: is required; the inputs are {', '.join(_INPUTS)}")
        elif inp.name in given:
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
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, which JSON text can carry ("\\ud800")
            raise _InputProblem(unencodable_text(exc.start), f"[{index}]") from None
    return value  # a str from JSON, or a wrong type the schema names


def _json_object(value: Any, index: int) -> Any:
    if not isinstance(value, str):
        return value  # the schema names the wrong type
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # nested too deep for Python's parser is not borders either
        raise _InputProblem('not JSON text such as {"up": 4, "left": 2}', f"[{index}]") from None
    found = find_unencodable(parsed)  # "\\ud800" in JSON text decodes to a lone surrogate
    if found is not None:
        key = "a key is not text that UTF-8 can encode" if found.in_key else "not text that UTF-8 can encode"
        where = f"[{index}]" + (f".{format_loc(found.loc)}" if found.loc else "")
        raise _InputProblem(f"{key} (a lone surrogate at character {found.at})", where)
    return parsed


def _from_fp32(value: Any) -> Any:
    # An FP32 element arrives widened (0.975 as 0.9750000238...): take the decimal the client wrote, so
    # top_p and temperature mean the same as in a v1 request.
    if isinstance(value, float) and math.isfinite(value):
        narrow = np.float32(value)
        if float(narrow) == value:
            return float(str(narrow))
    return value


def _v2_text(problem: FieldProblem, indexed: set[str]) -> str:
    """A problem with the field named as the input: `instances[2].params.top_k` -> `inputs.top_k[2]`
    (without the index for an input given once); image_prompt's parts are their own inputs."""
    loc = problem.loc
    if loc == ("instances",):  # the one request-wide rule: the images of all instances together
        return f"inputs.images_to_gen: {problem.message}"
    if len(loc) < 2 or loc[0] != "instances" or not isinstance(loc[1], int):
        return problem.text()
    index, rest = loc[1], list(loc[2:])
    if rest[:1] == ["params"]:
        rest = rest[1:]
    if not rest:
        return problem.text(lambda _: "inputs")
    name, tail = str(rest[0]), rest[1:]
    if name == "image_prompt" and tail:
        part = str(tail[0])
        name, tail = ("image_prompt" if part == "image" else part), tail[1:]
    where = f"inputs.{name}" + (f"[{index}]" if name in indexed else "")
    if tail:
        where += "." + format_loc(tuple(tail))
    return problem.text(lambda _: where)


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
    model_name: str, request: InferRequest, result: RequestResult, wanted: dict[str, bool]
) -> InferResponse:
    predictions = result.instances
    images = [b64 for p in predictions for b64 in p.images]
    binary_images = wanted.get("images", False)
    arrays = {
        # object arrays: KServe writes str elements as JSON strings and bytes elements as raw bytes
        "images": np.array([base64.b64decode(b) for b in images] if binary_images else images, dtype=object),
        "clip_scores": np.array([s for p in predictions for s in p.clip_scores], dtype=np.float32),
        "ppl": np.array([v for p in predictions for v in p.ppl], dtype=np.float32),
        "instance": np.array([i for i, p in enumerate(predictions) for _ in p.images], dtype=np.int32),
        "seed": np.array([p.seed for p in predictions], dtype=np.int64),
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


