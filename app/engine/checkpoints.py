"""Checkpoint files: safe reading (no pickled objects) and checking names and shapes, one error for all.

Shared by the model store (app/engine/store.py) and the networks that read their own files (ruCLIP),
so neither imports the other for these.

Training checkpoints (PyTorch Lightning's, such as the published Sber VQ-GAN) also pickle objects
beside the tensors: callbacks keyed by their class, OmegaConf hyper-parameters, ... `read_state_dict`
with ``metadata_keys`` reads them still with ``torch.load(weights_only=True)``: every class or function
the file names that torch does not allow is bound to a fresh inert stand-in (`InertPickled`), never to
the real one, so nothing the file pickles is imported, constructed or run; a stand-in is accepted only
under the named metadata keys and refused anywhere else (``state_dict`` included), naming the global.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

log = logging.getLogger("app.engine.store")

# Problems listed in one error before the rest are only counted: a wrong config can mismatch every tensor.
MAX_LISTED_PROBLEMS = 25


class ModelStoreError(Exception):
    """A model directory, manifest or checkpoint problem; the message names the file (and tensor)."""


#: Top-level keys where PyTorch Lightning (0.x to 2.x) keeps training state rather than the model:
#: objects pickled under these are read as inert stand-ins (see `read_state_dict`).
LIGHTNING_METADATA_KEYS: frozenset[str] = frozenset({
    "epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states",
    "lr_schedulers", "loops", "hparams_name", "hyper_parameters", "hparams_type",
    "datamodule_hparams_name", "datamodule_hyper_parameters", "datamodule_hparams_type",
    "native_amp_scaling_state", "amp_scaling_state", "MixedPrecisionPlugin", "MixedPrecision",
    "checkpoint_callback_best_model_score", "checkpoint_callback_best_model_path",
    "checkpoint_callback_best", "early_stop_callback_state", "early_stop_callback_wait",
    "early_stop_callback_patience", "hparams",
})


class InertPickled:
    """Stands in for an object (or the class or function itself) of a global a checkpoint pickles.

    `read_state_dict` makes one subclass per global, named after it (``pickled_global``). Whatever
    the pickle asks of it (construct, call, ``__setstate__``), it takes the arguments and keeps
    nothing: no code of the real class runs, and the real package need not be installed.
    """

    __slots__ = ()
    #: ``module.QualName`` of the global this class stands for.
    pickled_global: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertPickled:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass  # the state has been unpickled by torch's restricted unpickler already; drop it

    def __reduce__(self) -> Any:
        raise TypeError(f"an inert stand-in for {self.pickled_global} cannot be pickled again")

    def __repr__(self) -> str:
        return f"<inert {self.pickled_global}>"


def _inert_class(full_path: str) -> type[InertPickled]:
    return type(f"InertPickled[{full_path}]", (InertPickled,),
                {"__slots__": (), "pickled_global": full_path, "__module__": __name__})


def _inert_global(obj: Any) -> str | None:
    """The global an inert stand-in (instance or class) stands for, else None."""
    if isinstance(obj, InertPickled):
        return obj.pickled_global
    if isinstance(obj, type) and issubclass(obj, InertPickled):
        return obj.pickled_global
    return None


def _find_inert(obj: Any, where: str, seen: set[int]) -> tuple[str, str] | None:
    """First (path, global) of a stand-in inside plain containers, depth first; tensors are leaves."""
    name = _inert_global(obj)
    if name is not None:
        return where, name
    if isinstance(obj, torch.Tensor | str | bytes | int | float | complex | type(None)):
        return None
    if id(obj) in seen:  # a pickle may share or nest containers
        return None
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found = _find_inert(key, f"a key of {where}", seen)
            found = found or _find_inert(value, f"{where}[{key!r}]", seen)
            if found:
                return found
    elif isinstance(obj, list | tuple | set | frozenset):
        for i, value in enumerate(obj):
            found = _find_inert(value, f"{where}[{i}]", seen)
            if found:
                return found
    return None


# torch's allow-list of globals is process-wide; one inert load at a time keeps ours from mixing.
_INERT_LOCK = threading.Lock()


def _foreign_globals(path: Path) -> list[str]:
    """Globals in the checkpoint's pickle that torch's weights_only unpickler would refuse (static scan)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except ValueError:  # not a zip checkpoint (torch < 1.6 format): no scan, load as usual
        return []


def _check_inert_placement(obj: Any, path: Path, metadata_keys: Collection[str]) -> None:
    """Stand-ins may sit only under the metadata keys of a top-level dict; else refuse, naming one."""
    if isinstance(obj, dict):
        found = None
        for key, value in obj.items():
            if isinstance(key, str) and key in metadata_keys:
                continue
            found = _find_inert(key, "a top-level key", set()) or _find_inert(value, f"[{key!r}]", set())
            if found:
                break
    else:
        found = _find_inert(obj, "the top level", set())
    if found:
        at, name = found
        raise ModelStoreError(
            f"refusing to load {path}: it pickles {name} at {at}; objects other than tensors and plain "
            f"containers are accepted only as training metadata (top-level keys such as 'callbacks', "
            f"'hyper_parameters', 'optimizer_states'), never in the weights"
        )


def read_state_dict(
    path: str | Path, *, mmap: bool = True, metadata_keys: Collection[str] = ()
) -> dict[str, Any]:
    """Read a checkpoint safely: ``torch.load(weights_only=True)`` (memory-mapped) or safetensors.

    Returns the top-level dict as stored (a wrapper such as ``{"state_dict": ...}`` is not unwrapped).
    With ``metadata_keys`` (e.g. `LIGHTNING_METADATA_KEYS`), pickled objects under those top-level
    keys are read as inert stand-ins (`InertPickled`) instead of being refused; anywhere else they are
    still refused, with a message naming the global and where it is.
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
        if metadata_keys:
            obj = _load_with_inert_globals(path, mmap, metadata_keys)
        else:
            obj = _load_weights_only(path, mmap)
    except pickle.UnpicklingError as exc:
        raise ModelStoreError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only=True): {_unpickling_reason(exc)}"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        raise ModelStoreError(f"cannot read checkpoint {path} (corrupt or truncated?): {exc}") from exc
    if not isinstance(obj, dict):
        raise ModelStoreError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _unpickling_reason(exc: Exception) -> str:
    """The part of torch's weights_only error that says what was refused (it names the global),
    without the boilerplate around it or its advice to allow-list the global."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    tail = text.split(marker, 1)[1] if marker in text else text
    boilerplate = ("Weights only load failed", "Check the documentation of torch.load")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    reason = reasons[0] if reasons else (text.strip().splitlines() or [type(exc).__name__])[0]
    return reason.split(" Please use `torch.serialization.add_safe_globals", 1)[0]


def _load_weights_only(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        # Files written by torch < 1.6 (legacy, non-zip format) cannot be memory-mapped.
        if not (mmap and "mmap" in str(exc)):
            raise
        log.warning("%s: legacy format, cannot be memory-mapped; reading it into memory", path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)


def _load_with_inert_globals(path: Path, mmap: bool, metadata_keys: Collection[str]) -> Any:
    with _INERT_LOCK:
        foreign = _foreign_globals(path)
        if not foreign:
            obj = _load_weights_only(path, mmap)
        else:
            stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
                (_inert_class(name), name) for name in foreign
            ]
            with torch.serialization.safe_globals(stand_ins):
                obj = _load_weights_only(path, mmap)
    if foreign:
        _check_inert_placement(obj, path, metadata_keys)
        kept = sorted(str(k) for k in obj if k in metadata_keys) if isinstance(obj, dict) else []
        log.info("%s: read %d pickled global(s) of training metadata as inert stand-ins (%s) under %s",
                 path, len(foreign), ", ".join(foreign[:5]), ", ".join(kept))
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
