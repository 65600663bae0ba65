"""Helpers shared by several test modules (no test module imports another; they all import from here).

- A real `python -m app` process, bound to loopback: `ROOT`, `free_port`, `start_server`, `wait_ready`,
  `serve`, `listening_addresses` (from /proc/net); a real `redis-server`: `RedisServer`.
- KServe's REST app in-process: `build_app`, `client`; the routes `python -m app` serves: `_served_routes`.
- The Open Inference Protocol (v2) reference request and its expectations: `NAME`, `V1_BODY`, `V2_INPUTS`,
  `OUTPUT_NAMES`, `INPUT_TYPES`, `OUTPUT_TYPES`, `assert_same_as_v1`, `metric`, `prompt_png`,
  `PROMPT_BORDERS`.

Imports that need kserve, FastAPI or the serving package happen inside the helpers that use them, so the
modules that only need the light helpers stay light to collect.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.serving.model import KandinskyModel

# ---- a real `python -m app` process (from tests/serving/test_e2e.py) ------------------------------------

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Every server a test starts binds loopback only (HTTP and gRPC); a test's own flags come later and win.
LOOPBACK_FLAGS = ("--http_host", "127.0.0.1", "--grpc_host", "127.0.0.1")


def start_server(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "app", *LOOPBACK_FLAGS, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def listening_addresses(port: int) -> set[str]:
    """The addresses with a TCP socket listening on `port` on this host (from /proc/net/tcp and tcp6);
    an IPv4-mapped IPv6 address is given in its IPv4 form."""
    found: set[str] = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            # the kernel writes each 32-bit word of the address in host (little-endian) order
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
            address = socket.inet_ntop(family, raw)
            # gRPC binds 127.0.0.1 on an IPv6 socket: its v4-mapped form is the same address
            found.add(address.removeprefix("::ffff:") if "." in address else address)
    return found


class RedisServer:
    """A real `redis-server` (Debian's package) on a free loopback port, its data in `workdir`: start,
    stop (SIGTERM, or `kill()` for SIGKILL) and start again on the same port and data (append-only
    file on), as a Redis restart in production does."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.workdir, self.password, self.port = workdir, password, free_port()
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if shutil.which("redis-server") is None:  # .ci/run installs Debian's package
            import pytest

            pytest.skip("redis-server is not installed (Debian's redis-server package; .ci/run installs it)")
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
                "--appendonly", "yes", "--save", "", "--protected-mode", "yes"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise AssertionError("redis-server did not listen within 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready within {READY_TIMEOUT_S} s")


def serve(model_dir: Path, *flags: str) -> Iterator[dict[str, Any]]:
    """A real `python -m app` on free HTTP and gRPC ports for a test module (use as a fixture body):
    yields its addresses (`base`, `port`, `hostport`, `grpc`), `proc`, and `lines`, its output so far
    (read from the start: a full pipe must never block the server)."""
    port, grpc_port = free_port(), free_port()
    proc = start_server(["--model_dir", str(model_dir), "--device", "cpu", "--http_port", str(port),
                         "--grpc_port", str(grpc_port), *flags])
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}/v1/models/kandinsky")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{''.join(lines[-40:])}") from None
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "hostport": f"127.0.0.1:{port}",
               "grpc": f"127.0.0.1:{grpc_port}", "proc": proc, "lines": lines}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def serve_keyed(model_dir: Path, folder: Path, keys: dict[str, str], *flags: str) -> Iterator[dict[str, Any]]:
    """`serve` with an `--api_keys` file of `keys` (tenant -> token) written in `folder`."""
    path = folder / "api_keys"
    path.write_text("".join(f"{tenant} {token}\n" for tenant, token in keys.items()), encoding="utf-8")
    yield from serve(model_dir, "--api_keys", str(path), *flags)


# ---- KServe's REST app in-process (from tests/serving/test_http.py) --------------------------------------


def build_app(model: KandinskyModel) -> FastAPI:
    """KServe's own REST app construction (routes, middleware, handlers) on a fresh FastAPI app."""
    import kserve
    from fastapi import FastAPI
    from fastapi.responses import ORJSONResponse
    from kserve import model_server
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    from app.serving.web.app import configure_app

    app = FastAPI(default_response_class=ORJSONResponse)
    server = kserve.ModelServer(http_port=0, enable_grpc=False, enable_latency_logging=False)
    server.register_model(model)
    configure_app(app, model.context, model.begin_drain)
    saved = model_server.app
    model_server.app = app  # RESTServer imports the app by this name
    try:
        RESTServer(
            FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, 0
        ).create_application()
    finally:
        model_server.app = saved
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=300)


# ---- the routes `python -m app` serves (from tests/test_k8s_manifests.py) --------------------------------


@cache
def _served_routes() -> dict[str, set[str]]:
    """Path templates -> methods of the app `python -m app` serves: KServe's REST routes plus ours."""
    from fastapi import APIRouter, FastAPI
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.rest.server import metrics_handler
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    from app.serving.model import KandinskyModel, ServerSettings
    from app.serving.web.app import configure_app

    app = FastAPI()
    repo = ModelRepository()
    root = APIRouter()  # as kserve's RESTServer registers /metrics
    root.add_api_route("/metrics", metrics_handler, methods=["GET"])
    app.include_router(root)
    register_v1_endpoints(app, DataPlane(model_registry=repo), None)
    register_v2_endpoints(app, DataPlane(model_registry=repo), None)
    model = KandinskyModel("kandinsky", ServerSettings())
    configure_app(app, model.context, model.begin_drain)

    routes: dict[str, set[str]] = {}

    def walk(items: Any) -> None:
        for r in items:
            if getattr(r, "path", None):
                routes.setdefault(r.path, set()).update(getattr(r, "methods", None) or ())
            sub = getattr(r, "original_router", None)  # FastAPI's lazily included routers
            if sub is not None:
                walk(sub.routes)

    walk(app.routes)
    return routes


# ---- the v2 reference request and its expectations (from tests/serving/test_v2.py) -----------------------

NAME = "kandinsky"

# The reference request: two instances with their own query, seed and image counts, and two inputs of
# shape [1] that apply to both. PNG, so the same pixels are the same bytes.
QUERIES = ["кот в шляпе", "собака"]
SEEDS = [11, 12]
COUNTS = [2, 1]
TOP_P = 0.9  # 0.9 is not a float32: an FP32 input must still mean the v1 value
V1_BODY = {
    "instances": [
        {"query": q, "params": {"images_to_gen": n, "images_to_cherry_pick": n, "super_res": False,
                                "seed": s, "format": "png", "top_p": TOP_P}}
        for q, s, n in zip(QUERIES, SEEDS, COUNTS)
    ]
}
#: name -> (datatype, elements): the reference as v2 inputs.
V2_INPUTS: dict[str, tuple[str, list[Any]]] = {
    "query": ("BYTES", QUERIES),
    "seed": ("INT64", SEEDS),
    "images_to_gen": ("INT32", COUNTS),
    "images_to_cherry_pick": ("INT64", COUNTS),
    "super_res": ("BOOL", [False]),
    "format": ("BYTES", ["png"]),
    "top_p": ("FP64", [TOP_P]),
}
OUTPUT_NAMES = ["images", "clip_scores", "ppl", "instance", "seed"]
INPUT_TYPES = {
    "query": "BYTES", "images_to_gen": "INT32", "images_to_cherry_pick": "INT32", "top_k": "INT32",
    "top_p": "FP32", "temperature": "FP32", "super_res": "BOOL", "seed": "INT64", "format": "BYTES",
    "image_prompt": "BYTES", "borders": "BYTES", "crop_first": "BOOL",
}
OUTPUT_TYPES = {"images": "BYTES", "clip_scores": "FP32", "ppl": "FP32", "instance": "INT32", "seed": "INT64"}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_same_as_v1(reference: dict[str, Any], images: list[bytes], clip_scores: Any, ppl: Any = None,
                      instance: Any = None, seed: Any = None) -> None:
    """The v2 outputs hold v1's images (same files, same pixels) and scores, instance by instance."""
    expected = [base64.b64decode(b) for p in reference["predictions"] for b in p["images"]]
    assert len(images) == len(expected) == sum(COUNTS)
    for got, want in zip(images, expected):
        assert np.array_equal(pixels(got), pixels(want))
        assert got == want
    scores = [s for p in reference["predictions"] for s in p["clip_scores"]]
    assert np.allclose(np.asarray(clip_scores, dtype=np.float64), scores, rtol=1e-6, atol=1e-7)
    if ppl is not None:
        want_ppl = [v for p in reference["predictions"] for v in p["ppl"]]
        assert np.allclose(np.asarray(ppl, dtype=np.float64), want_ppl, rtol=1e-6)
    if instance is not None:
        assert list(instance) == [i for i, n in enumerate(COUNTS) for _ in range(n)]
    if seed is not None:
        assert list(seed) == SEEDS


def metric(base: str, name: str, labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def prompt_png() -> bytes:
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray((rng.random((120, 90, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PROMPT_BORDERS = {"up": 3, "right": 4}


# ---- many replicas on one Redis (tests/serving/test_replicas.py, test_redis_jobs.py) --------------------

replica = contextlib.contextmanager(serve)
REPLICA_LEASE_S = "2"


def seeded_body(seed: int, images: int = 1) -> dict[str, Any]:
    """A predict body of one instance: `images` images of the seed, no upscaling, top_k 64."""
    return {"instances": [{"query": "Кот в шляпе", "params": {
        "images_to_gen": images, "images_to_cherry_pick": images, "super_res": False, "seed": seed,
        "top_k": 64}}]}


def replica_flags(redis_srv: RedisServer, role: str, name: str) -> list[str]:
    return ["--redis_url", redis_srv.url, "--role", role, "--replica_name", name, "--job_lease",
            REPLICA_LEASE_S, "--enable_grpc", "false"]


def in_process(model_dir: Path, seed: int, images: int = 1) -> list[bytes]:
    """The PNG bytes the pipeline gives in this process for `seeded_body(seed, images)`."""
    from app.engine.jobs import Job
    from app.engine.params import GenerationParams
    from app.engine.pipeline import Pipeline

    pipeline = Pipeline.load(model_dir, device="cpu")
    params = GenerationParams(seed=seed, images_to_gen=images, images_to_cherry_pick=images, super_res=False,
                              top_k=64)
    (result,) = pipeline.run([Job("Кот в шляпе", params)])
    return [base64.b64decode(b) for b in result.images]  # type: ignore[union-attr]
