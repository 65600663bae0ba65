"""The Open Inference Protocol over gRPC (SPEC section 8): `ModelInfer` on `--grpc_port`.

KServe's gRPC server is replaced by `GRPCServer` (same servicer, interceptors and protocol) for what
KServe's lacks: 64 MiB messages by default (a response over the limit refused with a message saying so),
`kandinsky_requests_total{protocol="grpc"}` counted by an interceptor with the final status name, our
errors as gRPC statuses (INVALID_ARGUMENT naming the input, UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED for a tenant's full queue), and readiness checked before `ModelInfer` (KServe's gRPC
path calls `model.load()` on a model that is not ready, which here would load a second pipeline while
draining). With API keys (SPEC section 12) the interceptor refuses a `ModelInfer` without a valid
`authorization: Bearer <key>` metadata (UNAUTHENTICATED) before anything of the message is looked at; the
other methods (liveness, readiness, metadata) stay open. Requests reach `v2.infer` through KServe's data
plane and `KandinskyModel.predict`, as REST ones do (the metadata as its headers: the tenant).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import ModelNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer as KServeGRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer as KServeInferenceServicer
from kserve.utils.numpy_codec import to_np_dtype

from app.serving.core.errors import ServiceError
from app.serving.core.tenants import ApiKeys
from app.serving.observability import metrics
from app.serving.protocols import v2
from app.serving.protocols.routes import ProtocolContext, refusal

if TYPE_CHECKING:
    import kserve

log = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

#: gRPC messages either way, unless --grpc_max_send_message_length / --grpc_max_receive_message_length
#: say otherwise: sixteen 1024x1024 PNGs exceed KServe's 8 MiB default.
GRPC_MESSAGE_BYTES = 64 << 20
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# HTTP statuses of our errors -> gRPC's (the usual mapping, as grpc-gateway's in reverse).
_GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


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
        problems = message_problems(request)
        if problems:
            raise GrpcException("; ".join(problems), status_code=grpc.StatusCode.INVALID_ARGUMENT)
        try:
            return await super().ModelInfer(request, context)
        except ServiceError as exc:
            # KServe's interceptor would make our errors INTERNAL: each gets its gRPC status
            status = _GRPC_STATUS.get(exc.status, grpc.StatusCode.INTERNAL)
            retry = exc.retry_after()
            if retry is not None:  # as REST's Retry-After header
                context.set_trailing_metadata((("retry-after", str(retry)),))
            raise GrpcException(exc.message, status_code=status) from None


def message_problems(request: pb.ModelInferRequest) -> list[str]:
    """What KServe's decoding of a ModelInfer message would refuse without naming the input, or not refuse
    at all: datatypes, contents given twice, the count of raw contents, and every `parameters` map (with
    values KServe would drop: none set, or Triton's double and uint64 kinds). Each problem names its place."""
    problems = v2.parameter_problems("parameters", _parameters(request.parameters), "request")
    raw = len(request.raw_input_contents)
    for i, tensor in enumerate(request.inputs):
        where = _tensor_where("inputs", i, tensor.name)
        if to_np_dtype(tensor.datatype) is None:
            # KServe's decoding would say only "invalid content type"
            problems.append(f"{where}: datatype {tensor.datatype!r} is not a v2 datatype")
        if raw and tensor.HasField("contents"):
            problems.append(f"{where}: has both contents and raw_input_contents; send one of them")
        problems += v2.parameter_problems(f"{where}.parameters", _parameters(tensor.parameters), "input")
    for i, output in enumerate(request.outputs):
        where = _tensor_where("outputs", i, output.name)
        problems += v2.parameter_problems(f"{where}.parameters", _parameters(output.parameters), "output")
    if raw and raw != len(request.inputs):
        problems.append(
            f"raw_input_contents: {raw} entries for {len(request.inputs)} input(s); send one per input, in "
            "the order of the inputs, or none (and each input's contents)"
        )
    return problems


def _tensor_where(kind: str, index: int, name: str) -> str:
    return f"{kind}.{name}" if name else f"{kind}[{index}]"


def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A `parameters` map as Python values; `v2.UNSET` where no kind KServe's proto knows is set."""
    values: dict[str, Any] = {}
    for name, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        values[name] = v2.UNSET if kind is None else getattr(param, kind)
    return values


# ---- a message protobuf refuses --------------------------------------------------------------------------


@dataclass(frozen=True)
class Undecodable:
    """A ModelInfer message that protobuf could not parse, and what is wrong with it (naming the field)."""

    problem: str


def lenient_deserializer(strict: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`strict` (protobuf's parser), but a message it refuses becomes `Undecodable` instead of an exception:
    gRPC would answer that UNKNOWN, quoting the exception's class."""

    def deserialize(data: bytes) -> Any:
        try:
            return strict(data)
        except DecodeError:
            return Undecodable(undecodable_problem(data))

    return deserialize


def undecodable_problem(data: bytes) -> str:
    """Why protobuf refused a ModelInferRequest: the first text field that is not UTF-8 (proto3 requires
    it of `string` fields: names, datatypes, ids, string parameters), or a malformed message."""
    try:
        message = _lenient_request_class().FromString(data)
    except DecodeError:
        return "the request is not a ModelInferRequest message (its protobuf encoding is malformed)"
    texts: list[tuple[str, bytes]] = [
        ("model_name", message.model_name), ("model_version", message.model_version), ("id", message.id),
    ]
    texts += _parameter_texts("parameters", message.parameters)
    for kind, tensors in (("inputs", message.inputs), ("outputs", message.outputs)):
        for i, tensor in enumerate(tensors):
            where = _tensor_where(kind, i, _utf8(tensor.name) or "")
            texts.append((f"{kind}[{i}].name", tensor.name))
            if kind == "inputs":
                texts.append((f"{where}.datatype", tensor.datatype))
            texts += _parameter_texts(f"{where}.parameters", tensor.parameters)
    for where, text in texts:
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{where}: not valid UTF-8 (byte {exc.start})"
    return "the request is not a ModelInferRequest message (protobuf refused it)"


def _parameter_texts(where: str, entries: Any) -> list[tuple[str, bytes]]:
    texts = []
    for entry in entries:  # map entries, read as a repeated message (the same bytes on the wire)
        name = _utf8(entry.key)
        if name is None:
            texts.append((f"{where}: a parameter's name", entry.key))
        else:
            texts.append((f"{where}.{name}", entry.value.string_param))
    return texts


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@cache
def _lenient_request_class() -> Any:
    """ModelInferRequest with every `string` field read as `bytes` (and maps as their repeated entries),
    in a pool of its own: it parses what the strict class refuses for text that is not UTF-8."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    package = "kandinsky.lenient"
    proto.name, proto.package = f"lenient_{proto.name}", package
    del proto.service[:]

    def loosen(message: descriptor_pb2.DescriptorProto) -> None:
        message.options.ClearField("map_entry")  # a bytes key is not allowed in a map
        for field in message.field:
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if field.type_name.startswith(".inference."):
                field.type_name = f".{package}." + field.type_name.removeprefix(".inference.")
        for nested in message.nested_type:
            loosen(nested)

    for message in proto.message_type:
        loosen(message)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ModelInferRequest"))


Behavior = Callable[[Any, Any], Awaitable[Any]]


class InferInterceptor(aio.ServerInterceptor):
    """Around every ModelInfer: with API keys (`keys`), the caller authenticated first (UNAUTHENTICATED
    without a valid `authorization` metadata, before the message is looked at); `kandinsky_requests_total
    {code=<gRPC status name>, protocol="grpc", tenant}` and the request duration, with the final status
    (the interceptors inside it turn exceptions into statuses); one access line naming the tenant; and a
    response over the send limit refused with a message that says so (gRPC alone would say
    RESOURCE_EXHAUSTED after the handler returned, unseen by the count)."""

    def __init__(self, max_send_bytes: int, keys: ApiKeys | None = None) -> None:
        self.max_send_bytes = max_send_bytes
        self.keys = keys

    async def authenticate(self, context: aio.ServicerContext) -> str | None:
        """The caller's tenant (None without keys); aborts UNAUTHENTICATED when no key is valid."""
        if self.keys is None:
            return None
        value = next((v for k, v in context.invocation_metadata() or () if k.lower() == "authorization"),
                     None)
        authorization = value if isinstance(value, str) else None
        tenant = self.keys.authenticate(authorization)
        if tenant is None:
            message, challenge = refusal(authorization, "the metadata authorization")
            context.set_trailing_metadata((("www-authenticate", challenge),))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            raise RuntimeError("unreachable: abort() raises")
        return tenant.name

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
            tenant: str | None = None
            try:
                tenant = await self.authenticate(context)
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
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
                metrics.REQUESTS_TOTAL.labels(code=_status_name(code), protocol="grpc",
                                              tenant=tenant or "").inc()
                metrics.REQUEST_SECONDS.observe(elapsed)
                # One access line per call, as REST requests get (app/serving/web/middleware.py).
                peer = context.peer() or "-"
                access_log.log(
                    logging.WARNING if code in _SERVER_FAULTS else logging.INFO,
                    '%s "gRPC ModelInfer" %s %.1f ms protocol=grpc%s', peer, _status_name(code),
                    elapsed * 1000, f" tenant={tenant}" if tenant else "",
                    extra={"method": "gRPC", "route": _MODEL_INFER, "path": _MODEL_INFER,
                           "status": _status_name(code), "duration_ms": round(elapsed * 1000, 1),
                           "client": peer, "protocol": "grpc", "tenant": tenant},
                )

        strict = handler.request_deserializer
        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=None if strict is None else lenient_deserializer(strict),
            response_serializer=handler.response_serializer,
        )


_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                  grpc.StatusCode.DEADLINE_EXCEEDED}


def _status_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    # grpc.aio reports an aborted call's code as the raw integer on some versions
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


class GRPCServer(KServeGRPCServer):
    """KServe's gRPC server with our servicer, our interceptor (metrics, size) and explicit message limits."""

    def __init__(
        self, *args: Any, max_send_bytes: int, max_receive_bytes: int, host: str = "0.0.0.0", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.host = host
        self.max_send_bytes = max_send_bytes
        self.max_receive_bytes = max_receive_bytes

    async def start(self, max_workers: int) -> None:
        keys = served_keys(self._data_plane.model_registry.get_models().values())
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            # ours outermost, so that it sees the status KServe's interceptor gave an exception
            interceptors=(
                InferInterceptor(self.max_send_bytes, keys), LoggingInterceptor(),
                ExceptionToStatusInterceptor(),
            ),
            options=[
                ("grpc.max_send_message_length", self.max_send_bytes),
                ("grpc.max_receive_message_length", self.max_receive_bytes),
            ],
        )
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(grpc_address(self.host, self._port))
        log.info(
            "gRPC server on %s: %d threads, messages up to %d bytes sent and %d received",
            grpc_address(self.host, self._port), max_workers, self.max_send_bytes, self.max_receive_bytes,
        )
        await self._server.start()
        await self._server.wait_for_termination()


def served_keys(models: Iterable[Any]) -> ApiKeys | None:
    """The API keys of the served model (KServe registers it before it starts its servers), or None."""
    for model in models:
        context = getattr(model, "context", None)
        if isinstance(context, ProtocolContext) and context.keys is not None:
            return context.keys
    return None


def grpc_address(host: str, port: int) -> str:
    """`host:port` as gRPC reads it (an IPv6 literal in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def add_grpc_server(
    server: kserve.ModelServer,
    port: int,
    max_threads: int,
    max_send_bytes: int,
    max_receive_bytes: int,
    host: str = "0.0.0.0",
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
        host=host,
    )
    server._grpc_server = grpc_server
    server.servers.append(grpc_server.start(max_threads))
    return grpc_server


