"""The model directory: ``model.json`` manifest, checkpoint checks and safe, streaming loading.

Every checkpoint is read with ``torch.load(..., weights_only=True)`` (or from safetensors). Every error
names the file it is about, and for tensors the tensor and both shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# Re-exported: callers and tests name them as store.ModelStoreError, store.read_state_dict, ...
from app.engine.checkpoints import (
    LIGHTNING_METADATA_KEYS,
    ModelStoreError,
    check_state_dict,
    read_state_dict,
)
from app.engine.nets.checks import manifest_keys
from app.engine.nets.dalle import MASK_BUFFERS, DalleConfig, DalleModel, expected_dalle_tensors
from app.engine.nets.realesrgan import (
    RealESRGANConfig,
    RRDBNet,
    expected_realesrgan_tensors,
    unwrap_realesrgan_state_dict,
)
from app.engine.nets.vqgan import (
    DDConfig,
    VQGANConfig,
    VQGANDecoder,
    VQGANEncoder,
    expected_vqgan_tensors,
    vqgan_decode_tensor_names,
    vqgan_encode_tensor_names,
)

if TYPE_CHECKING:
    from app.engine.nets.clip import ClipRanker
    from app.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST_FILE = "model.json"


@dataclass
class Manifest:
    """A parsed ``model.json``: architecture configs and absolute file paths."""

    name: str
    root: Path
    dalle: DalleConfig
    dalle_checkpoint: Path
    tokenizer: Path
    vqgan: VQGANConfig
    vqgan_checkpoint: Path
    realesrgan: RealESRGANConfig
    realesrgan_checkpoint: Path
    ruclip: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_FILE


# --------------------------------------------------------------------------------------------- manifest

_KNOWN_TOP_KEYS = ("name", "dalle", "tokenizer", "vqgan", "realesrgan", "ruclip")
# The architecture keys SPEC.md section 2 requires in each block (a model directory names every one):
# every field of the block's config dataclass that is not marked OPTIONAL_IN_MANIFEST.
DALLE_KEYS = manifest_keys(DalleConfig)
VQGAN_KEYS = manifest_keys(VQGANConfig)
DDCONFIG_KEYS = manifest_keys(DDConfig)
REALESRGAN_KEYS = manifest_keys(RealESRGANConfig)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return all(_type_ok(v, args[0]) for v in value) if args else True
    return True  # a nested dataclass or a type we do not police; from_manifest validates it


def _check_block_keys(
    block: Mapping[str, Any], keys: Iterable[str], cls: type, where: str, file: Path
) -> None:
    """Every required key must be in the block, and every key of a config field (required or optional)
    that is there must have a value of the field's type."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation we cannot resolve: leave typing to from_manifest
        hints = {}
    for name in keys:
        if name not in block:
            raise ModelStoreError(f"{file}: missing key '{where}.{name}'")
    for name in [f.name for f in dataclasses.fields(cls) if f.name in block]:
        key = f"{where}.{name}"
        value = block[name]
        hint = hints.get(name, Any)
        if not _type_ok(value, hint):
            raise ModelStoreError(f"{file}: {key!r} has the wrong type: {value!r} (expected {hint})")
    known = {f.name for f in dataclasses.fields(cls)} | set(keys) | {"checkpoint"}
    unknown = sorted(set(block) - known)
    if unknown:
        log.warning("%s: ignoring unknown keys in %r: %s", file, where, ", ".join(unknown))


def _block(raw: Mapping[str, Any], key: str, file: Path) -> dict[str, Any]:
    if key not in raw:
        raise ModelStoreError(f"{file}: missing key {key!r}")
    value = raw[key]
    if not isinstance(value, dict):
        raise ModelStoreError(f"{file}: {key!r} must be an object, got {type(value).__name__}")
    return value


def _path(block: Mapping[str, Any], key: str, where: str, root: Path, file: Path) -> Path:
    if key not in block:
        raise ModelStoreError(f"{file}: missing key '{where}.{key}'")
    value = block[key]
    if not isinstance(value, str) or not value:
        raise ModelStoreError(f"{file}: '{where}.{key}' must be a non-empty path string, got {value!r}")
    return root / value


def _config(cls: Any, block: dict[str, Any], where: str, file: Path) -> Any:
    if cls is DalleConfig:
        _check_block_keys(block, DALLE_KEYS, cls, where, file)
    elif cls is VQGANConfig:
        _check_block_keys(block, VQGAN_KEYS, cls, where, file)
        dd = block["ddconfig"]
        if not isinstance(dd, dict):
            raise ModelStoreError(f"{file}: 'vqgan.ddconfig' must be an object, got {dd!r}")
        _check_block_keys(dd, DDCONFIG_KEYS, DDConfig, "vqgan.ddconfig", file)
    else:
        _check_block_keys(block, REALESRGAN_KEYS, cls, where, file)
    try:
        return cls.from_manifest(block)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelStoreError(f"{file}: invalid {where!r} block: {exc}") from exc


def load_manifest(model_dir: str | Path) -> Manifest:
    """Parse ``<model_dir>/model.json``. Unknown top-level keys are kept in ``extra``."""
    root = Path(model_dir).resolve()
    file = root / MANIFEST_FILE
    if not file.is_file():
        raise ModelStoreError(f"manifest not found: {file}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"cannot read manifest {file}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelStoreError(f"{file}: the manifest must be a JSON object")

    if "name" not in raw:
        raise ModelStoreError(f"{file}: missing key 'name'")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise ModelStoreError(f"{file}: 'name' must be a non-empty string, got {name!r}")

    dalle_block = _block(raw, "dalle", file)
    vqgan_block = _block(raw, "vqgan", file)
    esr_block = _block(raw, "realesrgan", file)
    manifest = Manifest(
        name=name,
        root=root,
        dalle=_config(DalleConfig, dalle_block, "dalle", file),
        dalle_checkpoint=_path(dalle_block, "checkpoint", "dalle", root, file),
        tokenizer=_path(_block(raw, "tokenizer", file), "path", "tokenizer", root, file),
        vqgan=_config(VQGANConfig, vqgan_block, "vqgan", file),
        vqgan_checkpoint=_path(vqgan_block, "checkpoint", "vqgan", root, file),
        realesrgan=_config(RealESRGANConfig, esr_block, "realesrgan", file),
        realesrgan_checkpoint=_path(esr_block, "checkpoint", "realesrgan", root, file),
        ruclip=_path(_block(raw, "ruclip", file), "path", "ruclip", root, file),
        extra={k: v for k, v in raw.items() if k not in _KNOWN_TOP_KEYS},
    )
    if manifest.vqgan.n_embed != manifest.dalle.image_vocab_size:
        raise ModelStoreError(
            f"{file}: 'vqgan.n_embed' ({manifest.vqgan.n_embed}) must equal "
            f"'dalle.image_vocab_size' ({manifest.dalle.image_vocab_size})"
        )
    return manifest


# The published models `make weights MODEL=<name>` (python -m app.tools.weights download) can fetch;
# app.tools.weights keeps the same list (a test ties them).
PUBLISHED_MODELS = ("kandinsky", "malevich")
# The files of a ruCLIP folder, as the ruclip package reads them (app.engine.nets.clip.CLIP_FILES).
RUCLIP_FILES = ("bpe.model", "config.json", "pytorch_model.bin")


def manifest_file_paths(manifest: Manifest) -> list[Path]:
    """Every file the manifest names (absolute; ruCLIP's folder expanded to its files), in manifest order."""
    return [
        manifest.dalle_checkpoint,
        manifest.tokenizer,
        manifest.vqgan_checkpoint,
        manifest.realesrgan_checkpoint,
        *(manifest.ruclip / f for f in RUCLIP_FILES),
    ]


def missing_files(manifest: Manifest) -> list[Path]:
    """The files the manifest names that are not in the directory (each once, absolute)."""
    return [p for p in manifest_file_paths(manifest) if not p.is_file()]


def fetch_hint(manifest: Manifest) -> str:
    """How to get the files of this model directory, for error messages."""
    if manifest.name in PUBLISHED_MODELS:
        return (f"fetch them with `make weights MODEL={manifest.name}` "
                f"(python -m app.tools.weights download {manifest.name} --dest {manifest.root})")
    return (f"fetch a published model's files with `make weights MODEL=<{'|'.join(PUBLISHED_MODELS)}>` "
            f"(python -m app.tools.weights download <model> --dest DIR); a tiny test model is rebuilt with "
            f"`python -m app.tools.tiny {manifest.root}`")


def check_files_present(manifest: Manifest) -> None:
    """Raise ModelStoreError naming every file model.json names that is missing, and how to fetch them.

    Run before placement, so that an incomplete directory is reported as such and not as a model that
    does not fit the devices."""
    missing = missing_files(manifest)
    if missing:
        raise ModelStoreError(
            f"{'file' if len(missing) == 1 else 'files'} not found: {', '.join(str(p) for p in missing)} "
            f"(named by {manifest.path}); {fetch_hint(manifest)}"
        )


def expected_tensors(manifest: Manifest) -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensor names and shapes of each checkpoint: component -> name -> shape."""
    return {
        "dalle": {k: tuple(v) for k, v in expected_dalle_tensors(manifest.dalle).items()},
        "vqgan": {k: tuple(v) for k, v in expected_vqgan_tensors(manifest.vqgan).items()},
        "realesrgan": {k: tuple(v) for k, v in expected_realesrgan_tensors(manifest.realesrgan).items()},
    }


# ------------------------------------------------------------------------------------------ checkpoints


def device_for(name: str, device_map: Mapping[str, str | torch.device] | None) -> torch.device:
    """Longest-prefix match of a tensor name against accelerate-style module prefixes ("" = everything)."""
    if not device_map:
        return torch.device("cpu")
    best: str | None = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return torch.device(device_map[best]) if best is not None else torch.device("cpu")


def _convert(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    target_dtype = dtype if t.is_floating_point() else t.dtype
    return t.to(device=device, dtype=target_dtype)


def _install(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise ModelStoreError(f"{type(model).__name__} has no parameter or buffer {name!r}")


def _stream_in(
    model: torch.nn.Module,
    sd: dict[str, Any],
    names: Iterable[str],
    device_map: Mapping[str, str | torch.device] | None,
    dtype: torch.dtype,
) -> int:
    """Move tensors one by one to their device and dtype and install them; returns bytes installed.

    Entries are popped from ``sd`` as they go so that no second full copy of the weights is held.
    """
    total = 0
    for name in list(names):
        value = _convert(sd.pop(name), device_for(name, device_map), dtype)
        _install(model, name, value)
        total += value.numel() * value.element_size()
    return total


def _left_on_meta(model: torch.nn.Module) -> list[str]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_meta]


def _log_loaded(what: str, file: Path, n: int, nbytes: int, started: float, where: str) -> None:
    log.info(
        "%s loaded from %s: %d tensors, %.1f MB, on %s, in %.1f s",
        what, file, n, nbytes / 2**20, where, time.perf_counter() - started,
    )


def load_dalle(
    manifest: Manifest,
    device_map: Mapping[str, str | torch.device] | None = None,
    dtype: torch.dtype = torch.float32,
) -> DalleModel:
    """Build the transformer on the meta device, check the checkpoint strictly, stream tensors in.

    ``device_map`` is accelerate-style (module prefix -> device, longest prefix wins, default CPU).
    The checkpoint's mask buffers are accepted and dropped: the model builds its own masks.
    """
    started = time.perf_counter()
    file = manifest.dalle_checkpoint
    sd = read_state_dict(file)
    expected = expected_tensors(manifest)["dalle"]
    check_state_dict(sd, expected, file, allowed_extra=MASK_BUFFERS)
    for name in MASK_BUFFERS:
        sd.pop(name, None)
    with torch.device("meta"):
        model = DalleModel(manifest.dalle)
    nbytes = _stream_in(model, sd, expected, device_map, dtype)
    del sd
    _require_loaded(model, file)
    model.eval()
    where = ", ".join(sorted({str(device_for(n, device_map)) for n in expected}))
    _log_loaded("ruDALL-E transformer", file, len(expected), nbytes, started, where)
    return model


def _require_loaded(model: torch.nn.Module, file: Path) -> None:
    """Every parameter and buffer must have come from the checkpoint (none left on the meta device)."""
    left = _left_on_meta(model)
    if left:
        names = ", ".join(left[:10])
        raise ModelStoreError(f"{file}: no weights for {names} (model left on the meta device)")


def _unwrap_vqgan(obj: dict[str, Any], file: Path) -> dict[str, Any]:
    if "state_dict" in obj:
        sd = obj["state_dict"]
        if not isinstance(sd, dict):
            raise ModelStoreError(f"{file}: 'state_dict' holds a {type(sd).__name__}, expected a dict")
        return sd
    return obj  # a bare state dict (e.g. converted to safetensors)


def read_vqgan_state_dict(manifest: Manifest) -> dict[str, Any]:
    """The VQ-GAN checkpoint's model tensors: the Lightning file's ``state_dict`` (or a bare state dict).

    Training metadata pickled beside it (callbacks, OmegaConf hyper-parameters, ...) is read as inert
    stand-ins and dropped; a pickled object anywhere in the weights is refused, naming its global.
    """
    file = manifest.vqgan_checkpoint
    return _unwrap_vqgan(read_state_dict(file, metadata_keys=LIGHTNING_METADATA_KEYS), file)


VQGANHalf = typing.TypeVar("VQGANHalf", VQGANDecoder, VQGANEncoder)


def _load_vqgan_half(
    manifest: Manifest,
    half: type[VQGANHalf],
    needed: set[str],
    device: str | torch.device,
    dtype: torch.dtype,
    what: str,
) -> VQGANHalf:
    """Check the whole file (``needed`` must be there, the other model tensors are shape-checked when
    present, loss/discriminator tensors ignored), then stream ``needed`` into ``half`` built on meta."""
    started = time.perf_counter()
    file = manifest.vqgan_checkpoint
    sd = read_vqgan_state_dict(manifest)
    expected = expected_tensors(manifest)["vqgan"]
    check_state_dict(sd, expected, file, optional=set(expected) - needed, ignore_unknown=True)
    ignored = [k for k in sd if k not in expected]
    if ignored:
        log.info("%s: ignoring %d tensors outside the model (e.g. %s)", file, len(ignored), ignored[0])
    try:
        with torch.device("meta"):
            model = half(manifest.vqgan)
    except ValueError as exc:
        raise ModelStoreError(f"{manifest.path}: cannot build the {what}: {exc}") from exc
    names = list(model.state_dict())
    missing = [n for n in names if n not in sd]
    if missing:  # the module and its tensor-name function disagree: a bug, but name the tensors
        raise ModelStoreError(f"{file}: missing tensors needed by the {what}: {', '.join(missing[:10])}")
    sd = {n: sd[n] for n in names}
    nbytes = _stream_in(model, sd, names, {"": device}, dtype)
    _require_loaded(model, file)
    model.eval()
    _log_loaded(f"VQ-GAN {what}", file, len(names), nbytes, started, str(device))
    return model


def load_vqgan(manifest: Manifest, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> VQGANDecoder:
    """Load the VQ-GAN decode path from a taming-transformers checkpoint.

    The decode tensors must all be present with the right shapes; the encoder side is shape-checked
    when present; loss/discriminator tensors and other extras are ignored.
    """
    needed = set(vqgan_decode_tensor_names(manifest.vqgan))
    return _load_vqgan_half(manifest, VQGANDecoder, needed, device, dtype, "decoder")


def load_vqgan_encoder(
    manifest: Manifest, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VQGANEncoder:
    """Load the VQ-GAN encode path (image prompts) from the same checkpoint as `load_vqgan`.

    As strict as the decoder: ``encoder.*``, ``quant_conv.*`` and ``quantize.proj.*`` must all be
    present with the manifest's shapes (errors name the file and the tensor); the decoder side is
    shape-checked when present. Keep fp32 for codes equal to upstream's: the argmax over code logits
    can flip between near-equal codes in half precision.
    """
    needed = set(vqgan_encode_tensor_names(manifest.vqgan))
    return _load_vqgan_half(manifest, VQGANEncoder, needed, device, dtype, "encoder")


def load_realesrgan(
    manifest: Manifest, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> RRDBNet:
    """Load RealESRGAN (RRDBNet) from a bare, ``params`` or ``params_ema`` state dict, strictly."""
    started = time.perf_counter()
    file = manifest.realesrgan_checkpoint
    try:
        sd = dict(unwrap_realesrgan_state_dict(read_state_dict(file)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelStoreError(f"{file}: not a RealESRGAN state dict: {exc}") from exc
    expected = expected_tensors(manifest)["realesrgan"]
    check_state_dict(sd, expected, file)
    cfg = manifest.realesrgan
    with torch.device("meta"):
        model = RRDBNet(cfg)
    nbytes = _stream_in(model, sd, expected, {"": device}, dtype)
    _require_loaded(model, file)
    model.eval()
    _log_loaded(f"RealESRGAN x{cfg.scale}", file, len(expected), nbytes, started, str(device))
    return model


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    """The query tokenizer named by ``tokenizer.path``."""
    from app.engine.tokenizer import Tokenizer

    try:
        tok = Tokenizer.load(manifest.tokenizer)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelStoreError(str(exc)) from exc
    text_vocab = manifest.dalle.vocab_size - manifest.dalle.text_seq_length
    if tok.vocab_size > text_vocab:
        raise ModelStoreError(
            f"{manifest.tokenizer}: BPE vocabulary ({tok.vocab_size}) exceeds the transformer's text "
            f"vocabulary (dalle.vocab_size - text_seq_length = {text_vocab})"
        )
    log.info("tokenizer loaded from %s: %d pieces", manifest.tokenizer, tok.vocab_size)
    return tok


def load_clip(manifest: Manifest, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
              ) -> ClipRanker:
    """ruCLIP from the folder named by ``ruclip.path`` (weights read with ``weights_only=True``)."""
    from app.engine.nets.clip import ClipRanker

    return ClipRanker.load(manifest.ruclip, device, dtype)

