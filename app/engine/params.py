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
