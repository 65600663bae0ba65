"""ruCLIP ranking: the ``ruclip`` package's model, processor and text recipe, with safe weight loading."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import ruclip
import torch
from PIL import Image

from app.engine.checkpoints import ModelStoreError, check_state_dict, read_state_dict
from app.engine.nets.checks import positive_int

log = logging.getLogger(__name__)

# The keys ruclip.CLIP.from_pretrained reads from config.json, in its argument order.
CLIP_CONFIG_KEYS = (
    "embed_dim",
    "image_resolution",
    "vision_layers",
    "vision_width",
    "vision_patch_size",
    "context_length",
    "vocab_size",
    "transformer_width",
    "transformer_heads",
    "transformer_layers",
)
CLIP_FILES = ("config.json", "pytorch_model.bin", "bpe.model")


def read_clip_config(folder: str | Path) -> dict[str, int]:
    """The architecture keys of a ruCLIP folder's ``config.json``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelStoreError(f"ruCLIP config not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"cannot read ruCLIP config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelStoreError(f"ruCLIP config {path} is not a JSON object")
    config: dict[str, int] = {}
    for key in CLIP_CONFIG_KEYS:
        if key not in raw:
            raise ModelStoreError(f"ruCLIP config {path} lacks the key {key!r}")
        try:
            config[key] = positive_int(raw[key], f"ruCLIP config {path}: {key!r}")
        except ValueError as exc:
            raise ModelStoreError(str(exc)) from None
    return config


def build_clip(config: dict[str, int]) -> ruclip.CLIP:
    """A ``ruclip.CLIP`` with the folder's architecture (random weights on the current default device)."""
    return ruclip.CLIP(**{key: config[key] for key in CLIP_CONFIG_KEYS})


def expected_clip_tensors(config: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a ruCLIP ``pytorch_model.bin`` for this config, without allocating weights."""
    with torch.device("meta"):
        model = build_clip(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


class ClipRanker:
    """Ranks images against a query with ruCLIP, exactly as ``ruclip.Predictor`` scores them."""

    def __init__(
        self,
        model: ruclip.CLIP,
        processor: ruclip.RuCLIPProcessor,
        device: torch.device,
        *,
        batch_size: int = 16,
    ) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        # The package's own recipe: its default six templates, chunking and normalisation.
        self.predictor = ruclip.Predictor(model, processor, device, bs=batch_size, quiet=True)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        batch_size: int = 16,
    ) -> ClipRanker:
        """Load a ruCLIP folder (``config.json``, ``pytorch_model.bin``, ``bpe.model``).

        The weights are read with ``weights_only=True`` (the package's own ``from_pretrained`` unpickles
        arbitrary objects) and checked name by name and shape by shape before they are installed.
        """
        started = time.perf_counter()
        folder = Path(folder)
        for name in CLIP_FILES:
            if not (folder / name).is_file():
                raise ModelStoreError(f"ruCLIP file not found: {folder / name}")
        config = read_clip_config(folder)
        weights = folder / "pytorch_model.bin"
        state = read_state_dict(weights)
        with torch.device("meta"):
            model = build_clip(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        check_state_dict(state, expected, weights)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        # The text causal mask is a plain attribute built in __init__, so it was created on meta: rebuild it.
        text_mask = model.build_attention_mask()  # [context_length, context_length], -inf above the diagonal
        for block in model.transformer.resblocks:
            block.attn_mask = text_mask
        device = torch.device(device)
        model = model.to(device=device, dtype=dtype).eval()
        if dtype != torch.float32:
            # ruclip's LayerNorm casts activations to fp32 and back; its weights must stay fp32 to match.
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.float()
        processor = ruclip.RuCLIPProcessor.from_pretrained(str(folder))
        size = sum(p.numel() for p in model.parameters())
        log.info(
            "ruCLIP loaded from %s: %.1fM parameters, %s on %s, %.1f s",
            folder, size / 1e6, dtype, device, time.perf_counter() - started,
        )
        return cls(model, processor, device, batch_size=batch_size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @torch.inference_mode()
    def text_latents(self, queries: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``[Q, D]`` (fp32): the six templates' embeddings averaged."""
        latents = self.predictor.get_text_latents(list(queries))  # [Q, D], lower/strip done by the recipe
        return latents.float()

    @torch.inference_mode()
    def image_latents(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised image embeddings ``[N, D]`` (fp32), preprocessed by ``RuCLIPProcessor``."""
        if not images:
            return torch.empty(0, self.embed_dim, device=self.device)
        # RandomResizedCrop(scale=(1, 1), ratio=(1, 1)) is deterministic for square images but still
        # draws from the global RNG; keep that from disturbing anyone else's seeded stream.
        with torch.random.fork_rng(devices=[]):
            latents = self.predictor.get_image_latents(list(images))  # [N, D]
        return latents.float()

    def score(self, images: Sequence[Image.Image], text_latent: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``[N]`` (fp32, CPU) of each image with a normalised text latent ``[D]``."""
        if text_latent.dim() != 1 or text_latent.shape[0] != self.embed_dim:
            raise ValueError(f"text_latent must have shape [{self.embed_dim}], got {list(text_latent.shape)}")
        image_latents = self.image_latents(images)  # [N, D]
        sims = image_latents @ text_latent.to(image_latents.device, torch.float32)  # [N]
        # Both sides are unit vectors; rounding may overshoot 1 by an ulp.
        return sims.clamp(-1.0, 1.0).cpu()
