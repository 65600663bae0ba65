"""The model card that internal catalogs read at `GET /v1/models/{name}/card`.

The parameter table is the JSON schema of the same pydantic models that validate requests, so the card
shows exactly the defaults and bounds the server enforces.
"""

from __future__ import annotations

from typing import Any

from app.serving.core.responses import RESPONSE_EXAMPLE, MultiPrediction, Prediction
from app.serving.core.schema import CATALOG_EXAMPLE, Schema

CARD_PATH = "/v1/models/{model_name}/card"

# Rough serving needs per transformer size, for the catalog's capacity planning.
_HARDWARE = {
    "large": {
        "gpu": "3x V100 32 GB or 1x A100/H100 (fp16; bf16 on request); layers are split by free memory",
        "gpu_memory_gb_min": 40,
        "cpu_memory_gb_min": 64,
        "disk_gb": 30,
    },
    "medium": {
        "gpu": "1 GPU with 16 GB or more (fp16/bf16)",
        "gpu_memory_gb_min": 12,
        "cpu_memory_gb_min": 16,
        "disk_gb": 8,
    },
    "tiny": {"gpu": "none: runs on the CPU", "gpu_memory_gb_min": 0, "cpu_memory_gb_min": 2, "disk_gb": 1},
}


def _hardware(parameters: int | None, hidden: int) -> dict[str, Any]:
    if (parameters or 0) >= 5e9 or hidden >= 3000:
        return _HARDWARE["large"]
    if (parameters or 0) >= 5e8 or hidden >= 1024:
        return _HARDWARE["medium"]
    return _HARDWARE["tiny"]


def build_card(
    name: str, extra: dict[str, Any], description: dict[str, Any], schema: Schema
) -> dict[str, Any]:
    """The card of one loaded model: catalog metadata (`extra`), architecture (`Pipeline.describe()`),
    the request/response schemas and an example request."""
    transformer = dict(description.get("transformer", {}))
    arch = {
        "family": "ruDALL-E",
        "layers": transformer.get("num_layers"),
        "hidden": transformer.get("hidden_size"),
        "heads": transformer.get("num_attention_heads"),
        "parameters": transformer.get("parameters"),
        "transformer": transformer,
        "dtype": description.get("dtype"),
        "placement": description.get("placement"),
        "max_batch_images": description.get("max_batch_images"),
        "components": ["ruDALL-E transformer", "Sber VQ-GAN (gumbel f8)", "ruCLIP ranker", "RealESRGAN x4"],
    }
    return {
        "name": name,
        "model": description.get("name", name),
        "version": str(extra.get("version", "unversioned")),
        "license": extra.get("license", "unknown"),
        "description": extra.get("description", ""),
        "architecture": arch,
        "hardware": _hardware(transformer.get("parameters"), int(transformer.get("hidden_size") or 0)),
        "limits": {
            "max_images_per_request": schema.limits.max_images_per_request,
            "image_vocab_size": schema.limits.image_vocab_size,
        },
        "endpoints": {
            "predict": f"POST /v1/models/{name}:predict",
            "ready": f"GET /v1/models/{name}",
            "live": "GET /v2/health/live",
            "metrics": "GET /metrics",
            "card": CARD_PATH.format(model_name=name),
            "docs": "GET /docs",
        },
        "parameters": schema.params.model_json_schema(),
        "request_schema": schema.request.model_json_schema(),
        "response_schema": {
            "one_instance": Prediction.model_json_schema(),
            "several_instances": MultiPrediction.model_json_schema(),
        },
        "example_request": CATALOG_EXAMPLE,
        "example_response": RESPONSE_EXAMPLE,
    }
