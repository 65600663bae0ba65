"""The generation parameters of one instance, with their defaults and bounds, in plain Python.

The one source for these rules: the API's request schema builds its pydantic models from
these constants, the decoder checks seeds against `SEED_MAX`, the pipeline and the metrics name the
stages by `Stage`, and every image format is one of `FORMATS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DEFAULT_IMAGES_TO_GEN = 8
DEFAULT_CHERRY_PICK = 4
DEFAULT_TOP_K = 4096
DEFAULT_TOP_P = 0.975
DEFAULT_TEMPERATURE = 1.0
MAX_TEMPERATURE = 10.0
#: A partial preview at most every this many image rows (Kandinsky's grid has 32); 0: no previews.
MAX_PREVIEW_EVERY = 32
#: Image prompts: the largest decoded image (it is resized to 256x256 anyway; this bounds the decode).
MAX_IMAGE_PROMPT_PIXELS = 2048 * 2048
#: Image-prompt borders, in image tokens (8 px each): 0 .. 32, Kandinsky's grid.
MAX_BORDER = 32
#: The largest seed, the API's: 0 .. 2**63-1 (a signed 64-bit integer, what every JSON client can send).
SEED_MAX = 2**63 - 1
#: Encodings of the returned images: our name -> Pillow's.
FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


class Stage(StrEnum):
    """The pipeline's stages, in order: timings, metrics labels and response keys use these names."""

    GENERATE = "generate"
    DECODE = "decode"
    RANK = "rank"
    UPSCALE = "upscale"
    ENCODE = "encode"


STAGES = tuple(stage.value for stage in Stage)


@dataclass(frozen=True)
class ImagePrompt:
    """Keep bands of a given image and generate the rest (ruDALL-E's ImagePrompts; SPEC section 9)."""

    image: str  # base64 PNG, JPEG or WebP, validated by the API
    borders: dict[str, int]  # up, down, left, right in image tokens (8 px each)
    crop_first: bool = False


@dataclass(frozen=True)
class GenerationParams:
    """Validated parameters of one instance. `seed` has no default: the API draws a random one."""

    seed: int
    images_to_gen: int = DEFAULT_IMAGES_TO_GEN
    images_to_cherry_pick: int = DEFAULT_CHERRY_PICK
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    super_res: bool = True
    temperature: float = DEFAULT_TEMPERATURE
    format: str = "jpeg"
    preview_every: int = 0  # image rows between partial previews (jobs and streams); 0: none
    image_prompt: ImagePrompt | None = None
