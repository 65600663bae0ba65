"""Probes, the root route and the KServe routes this server does not serve.

Registered ahead of KServe's own routes, so these match first: KServe's liveness and readiness are
always true, and its repository routes would let anyone unload the model. `GET /` is KServe's v1
liveness (`{"status": "alive"}`, which KServe's own clients read), unless the request prefers HTML (a
browser), which gets the page.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from kserve.protocol.rest.v2_datamodels import ServerLiveResponse, ServerReadyResponse
from pydantic import BaseModel

from app.serving.core.service import Service
from app.serving.protocols.routes import METRICS, Operation, Route
from app.serving.web.page import page_response

LIVENESS_PATH = "/v2/health/live"
READINESS_PATH = "/v2/health/ready"
NOT_LIVE = "the model is not loaded or its worker stopped"

# KServe routes this server does not serve: the repository API would let anyone unload the model;
# explain and model versions are not implemented for this model (it has one version).
UNSERVED_ROUTES = (
    ("POST", "/v1/models/{model_name}:explain"),
    ("POST", "/v2/repository/models/{model_name}/load"),
    ("POST", "/v2/repository/models/{model_name}/unload"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}/ready"),
    ("POST", "/v2/models/{model_name}/versions/{model_version}/infer"),
)


class RootLiveness(BaseModel):
    """KServe's v1 liveness, as its clients read it."""

    status: str


def prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks text/html above JSON (a browser's does; curl's `*/*` does not)."""
    html = json = 0.0
    for part in accept.split(","):
        media, _, rest = part.strip().partition(";")
        q = 1.0
        for param in rest.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            html = max(html, q)
        elif media in ("application/json", "*/*", "application/*"):
            json = max(json, q)
    return html > json


def routes(service: Service) -> list[Route]:
    async def root(request: Request) -> Response:
        if prefers_html(request.headers.get("accept", "")):
            return page_response()
        if service.alive:
            return JSONResponse({"status": "alive"})
        return JSONResponse({"error": NOT_LIVE}, status_code=503)

    async def live() -> JSONResponse:
        if service.alive:
            return JSONResponse({"live": True})
        return JSONResponse({"error": NOT_LIVE}, status_code=503)

    async def ready() -> JSONResponse:
        if await service.reachable():
            return JSONResponse({"ready": True})
        return JSONResponse({"error": f"model {service.name} is not ready"}, status_code=503)

    async def not_served(request: Request) -> JSONResponse:
        return JSONResponse({"error": f"{request.url.path} is not served by this server"}, status_code=404)

    return [
        Route("GET", "/", handler=root, doc=Operation(
            "Liveness (KServe v1), or the web page for a browser",
            "Health",
            RootLiveness,
            (503,),
            description=(
                "`{\"status\": \"alive\"}` (KServe's v1 liveness, which its clients read); 503 when the "
                "model is not loaded. A request that prefers `text/html` (a browser) gets the web page "
                "instead: generate images with progress, previews and Cancel; it works offline."
            ),
            ok_media=("text/html",),
            error_descriptions={503: "Not live: the model is not loaded or its worker stopped."},
        )),
        Route("GET", LIVENESS_PATH, handler=live, doc=Operation(
            "Liveness (v2)", "Health", ServerLiveResponse, (503,),
            error_descriptions={503: "Not live: the model is not loaded."},
        )),
        Route("GET", READINESS_PATH, handler=ready, doc=Operation(
            "Readiness (v2)", "Health", ServerReadyResponse, (503,),
            error_descriptions={503: "Not ready: the model is loading or the server is shutting down."},
        )),
        *(Route(method, path, handler=not_served, doc=None) for method, path in UNSERVED_ROUTES),
        Route("GET", "/metrics", Operation(
            "Prometheus metrics", "Metrics", METRICS,
            description="Prometheus text exposition (OpenMetrics when the Accept header asks for it).",
        )),
    ]
