"""Checkpoint files: safe reading (no pickled objects) and checking names and shapes, one error for all.

Shared by the model store (app/engine/store.py) and the networks that read their own files (ruCLIP),
so neither imports the other for these.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("app.engine.store")

# Problems listed in one error before the rest are only counted: a wrong config can mismatch every tensor.
MAX_LISTED_PROBLEMS = 25


class ModelStoreError(Exception):
    """A model directory, manifest or checkpoint problem; the message names the file (and tensor)."""


def read_state_dict(path: str | Path, *, mmap: bool = True) -> dict[str, Any]:
    """Read a checkpoint safely: ``torch.load(weights_only=True)`` (memory-mapped) or safetensors.

    Returns the top-level dict as stored (a wrapper such as ``{"state_dict": ...}`` is not unwrapped).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelStoreError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelStoreError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            # Files written by torch < 1.6 (legacy, non-zip format) cannot be memory-mapped.
            if not (mmap and "mmap" in str(exc)):
                raise
            log.warning("%s: legacy format, cannot be memory-mapped; reading it into memory", path)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise ModelStoreError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only=True): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        raise ModelStoreError(f"cannot read checkpoint {path} (corrupt or truncated?): {exc}") from exc
    if not isinstance(obj, dict):
        raise ModelStoreError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _shape(shape: Iterable[int]) -> list[int]:
    return [int(s) for s in shape]


def check_state_dict(
    sd: Mapping[str, Any],
    expected: Mapping[str, Iterable[int]],
    file: str | Path,
    *,
    allowed_extra: Collection[str] = (),
    ignore_prefixes: Iterable[str] = (),
    optional: Collection[str] = (),
    ignore_unknown: bool = False,
) -> None:
    """Compare a state dict with the expected names and shapes; one error lists every problem.

    ``allowed_extra`` names (e.g. the ruDALL-E mask buffers) and names under ``ignore_prefixes`` may be
    present or not; ``optional`` expected names may be absent but are shape-checked when present;
    ``ignore_unknown`` accepts any other extra name.
    """
    prefixes = tuple(ignore_prefixes)
    problems: list[str] = []
    for name, shape in expected.items():
        want = _shape(shape)
        if name not in sd:
            if name not in optional:
                problems.append(f"{file}: missing tensor {name!r} (expected shape {want})")
            continue
        value = sd[name]
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            problems.append(f"{file}: {name!r} is a {kind}, expected a tensor of shape {want}")
        elif _shape(value.shape) != want:
            problems.append(f"{file}: tensor {name!r} has shape {_shape(value.shape)}, expected {want}")
    if not ignore_unknown:
        for name in sd:
            if name in expected or name in allowed_extra or (prefixes and str(name).startswith(prefixes)):
                continue
            value = sd[name]
            found = _shape(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"{file}: unexpected tensor {name!r} (shape {found})")
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        tail = f"\n  ... and {more} more" if more else ""
        raise ModelStoreError(
            f"checkpoint {file} does not match the manifest's architecture ({len(problems)} problems):\n  "
            + "\n  ".join(listed)
            + tail
        )
