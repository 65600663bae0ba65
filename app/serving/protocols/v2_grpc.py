"""The Open Inference Protocol over gRPC (SPEC section 8): `ModelInfer` on `--grpc_port`.

KServe's gRPC server is replaced by `GRPCServer` (same servicer, interceptors and protocol) for what
KServe's lacks: 64 MiB messages by default (a response over the limit refused with a message saying so),
`kandinsky_requests_total{protocol="grpc"}` counted by an interceptor with the final status name, our
errors as gRPC statuses (INVALID_ARGUMENT naming the input, UNAVAILABLE, DEADLINE_EXCEEDED), and
readiness checked before `ModelInfer` (KServe's gRPC path calls `model.load()` on a model that is not
ready, which here would load a second pipeline while draining). Requests reach `v2.infer` through
KServe's data plane and `KandinskyModel.predict`, as REST ones do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
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
from app.serving.observability import metrics

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
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
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
        for tensor in request.inputs:
            if to_np_dtype(tensor.datatype) is None:
                # KServe's decoding would say only "invalid content type"
                raise GrpcException(
                    f"inputs.{tensor.name}: datatype {tensor.datatype!r} is not a v2 datatype",
                    status_code=grpc.StatusCode.INVALID_ARGUMENT,
                )
        try:
            return await super().ModelInfer(request, context)
        except ServiceError as exc:
            # KServe's interceptor would make our errors INTERNAL: each gets its gRPC status
            status = _GRPC_STATUS.get(exc.status, grpc.StatusCode.INTERNAL)
            raise GrpcException(exc.message, status_code=status) from None


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
                # One access line per call, as REST requests get (app/serving/web/middleware.py).
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


