"""`python -m app`: KServe's flags plus ours; settings are checked before anything heavy is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from app.serving.core.settings import ServerSettings
from app.serving.model import KandinskyModel
from app.serving.observability.logs import configure_logging
from app.serving.web.app import LockedRepository, configure_app

log = logging.getLogger("app")

EXIT_BAD_SETTINGS = 2


class SettingsError(Exception):
    """A start-up setting is wrong; the message is printed on one line and the process exits with 2."""


def build_parser() -> argparse.ArgumentParser:
    from kserve import model_server

    parser = argparse.ArgumentParser(
        prog="python -m app",
        parents=[model_server.parser],
        description="Serve ruDALL-E Kandinsky (or any ruDALL-E model directory) with KServe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from app.serving.protocols.v2_grpc import GRPC_MESSAGE_BYTES

    # KServe's 8 MiB gRPC limit is less than sixteen upscaled PNGs; the flags still override it.
    parser.set_defaults(
        model_name="kandinsky",
        grpc_max_send_message_length=GRPC_MESSAGE_BYTES,
        grpc_max_receive_message_length=GRPC_MESSAGE_BYTES,
    )
    for setting in dataclasses.fields(ServerSettings):
        options: dict[str, Any] = {"default": setting.default, **setting.metadata}  # help, choices
        if not isinstance(setting.default, str | bool):
            options["type"] = type(setting.default)
        parser.add_argument(f"--{setting.name}", **options)
    return parser


def check_device(spec: str) -> str:
    """The --device flag, parsed by the same code that places the model, and checked against this host."""
    from app.engine.placement import parse_devices

    if spec.strip().lower() == "auto":
        return "auto"
    try:
        names = parse_devices(spec)
    except ValueError as exc:
        raise SettingsError(f"--device: {exc}") from None
    if names == ["cpu"]:
        return "cpu"
    import torch

    count = torch.cuda.device_count()
    missing = [n for n in names if int(n.split(":")[1]) >= count]
    if missing:
        have = f"this machine has {count} CUDA device(s)"
        raise SettingsError(f"--device: {', '.join(missing)} not present ({have})")
    return ",".join(names)


def check_dtype(spec: str, device: str) -> None:
    """The --dtype flag against the devices, by the same rule the pipeline resolves it with."""
    from app.engine.pipeline import resolve_dtype
    from app.engine.placement import parse_devices

    try:
        resolve_dtype(spec, parse_devices(device)[0])
    except ValueError as exc:
        raise SettingsError(f"--{exc}") from None


def check_host(flag: str, host: str) -> None:
    """A bind address of this host: an IP address or a name it resolves (`localhost`), bound once to port 0
    here so that a mistyped or foreign address stops start-up with one line, not a traceback later."""
    import socket

    if not host.strip():
        raise SettingsError(f"{flag}: must not be empty (0.0.0.0 binds every interface)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except (OSError, UnicodeError):
        raise SettingsError(f"{flag}: {host!r} is not an address this host can bind") from None


def check_redis(args: argparse.Namespace) -> None:
    """--redis_url parses and its password is found (never shown); the split roles need it."""
    if not args.redis_url:
        if args.role != "all":
            raise SettingsError(f"--role {args.role}: needs --redis_url (replicas share work through Redis)")
        if args.redis_password_file:
            raise SettingsError("--redis_password_file: given without --redis_url")
        return
    from app.serving.queue.redis_conn import resolve

    try:
        resolve(args.redis_url, args.redis_password_file or None)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def check_api_keys(args: argparse.Namespace) -> None:
    """--api_keys reads and parses (the error names the line, never a token); tenant bounds >= 0."""
    for flag in ("tenant_queue_size", "tenant_max_jobs", "tenant_max_job_bytes"):
        if getattr(args, flag) < 0:
            raise SettingsError(f"--{flag}: must be >= 0 (0: no bound of its own), got {getattr(args, flag)}")
    if not args.api_keys:
        return
    from app.serving.core.tenants import ApiKeys, KeysFileError

    try:
        ApiKeys.load(args.api_keys)
    except KeysFileError as exc:
        raise SettingsError(f"--api_keys: {exc}") from None


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Check every flag of ours and the model directory; raises SettingsError with a one-line message."""
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise SettingsError(f"--model_dir: {model_dir} is not a directory")
    if not (model_dir / "model.json").is_file():
        raise SettingsError(f"--model_dir: {model_dir / 'model.json'} is missing")
    device = check_device(args.device)
    check_dtype(args.dtype, device)
    positive = {
        "--max_images_per_request": args.max_images_per_request,
        "--queue_size": args.queue_size,
        "--request_timeout": args.request_timeout,
        "--max_body_bytes": args.max_body_bytes,
        "--body_timeout": args.body_timeout,
        "--job_ttl": args.job_ttl,
        "--max_jobs": args.max_jobs,
        "--keepalive": args.keepalive,
        "--max_job_bytes": args.max_job_bytes,
        "--send_timeout": args.send_timeout,
        "--header_timeout": args.header_timeout,
        "--max_connections": args.max_connections,
        "--job_lease": args.job_lease,
        "--max_deliveries": args.max_deliveries,
    }
    for flag, value in positive.items():
        if not value > 0:
            raise SettingsError(f"{flag}: must be > 0, got {value}")
    if not args.drain_timeout >= 0:
        raise SettingsError(f"--drain_timeout: must be >= 0 seconds, got {args.drain_timeout}")
    for flag in ("grpc_max_send_message_length", "grpc_max_receive_message_length"):
        value = getattr(args, flag)
        if not (value > 0 or value == -1):
            raise SettingsError(f"--{flag}: must be > 0 bytes (or -1: no limit), got {value}")
    for flag in ("http_host", "grpc_host"):
        check_host(f"--{flag}", getattr(args, flag))
    if args.max_batch_images < 0:
        got = args.max_batch_images
        raise SettingsError(f"--max_batch_images: must be >= 0 (0 = derive from memory), got {got}")
    if args.workers != 1:
        raise SettingsError("--workers: must be 1 (one process owns the GPUs; batching happens inside it)")
    check_redis(args)
    check_api_keys(args)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)}
    return ServerSettings(**{**given, "model_dir": str(model_dir), "device": device})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_SETTINGS

    # One format for our, KServe's and uvicorn's records, with client-controlled text escaped.
    configure_logging(settings.log_format)
    # KServe 0.21 still returns ORJSONResponse, which this FastAPI deprecates on every request: log noise.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    import kserve
    from kserve import model_server

    from app.engine.store import ModelStoreError
    from app.serving.observability.metrics import HTTP_CONNECTIONS
    from app.serving.protocols.v2_grpc import add_grpc_server
    from app.serving.web.server import install_rest_server

    model = KandinskyModel(args.model_name, settings)
    try:
        model.load()
    except (ModelStoreError, ValueError, FileNotFoundError) as exc:
        # A bad model directory is a setting problem: one line, no traceback.
        sys.stderr.write(f"error: {exc}\n".replace("\n", " ").rstrip() + "\n")
        return EXIT_BAD_SETTINGS
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        # ours instead (add_grpc_server below): the same protocol, with message limits and metrics
        enable_grpc=False,
        enable_docs_url=True,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
        # uvicorn waits this long for in-flight requests after SIGTERM; each ends by its deadline anyway.
        grace_period=int(settings.request_timeout) + 5,
    )
    # The repository extension would let any client unload or reload the one model this process serves
    # (REST and gRPC alike); the locked one refuses, and the REST routes are not served at all.
    server.model_repository_extension = LockedRepository(server.registered_models)
    if args.enable_grpc:
        add_grpc_server(
            server,
            port=args.grpc_port,
            max_threads=args.max_threads,
            max_send_bytes=args.grpc_max_send_message_length,
            max_receive_bytes=args.grpc_max_receive_message_length,
            host=settings.grpc_host,
        )
    # KServe's REST server on --http_host, with the header timeout and the connection cap (server.py).
    guard = install_rest_server(settings, args.model_name)
    HTTP_CONNECTIONS.set_function(lambda: guard.open)
    configure_app(model_server.app, model.context, model.begin_drain)
    server.start([model])
    log.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
