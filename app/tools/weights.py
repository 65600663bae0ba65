"""Weights tooling: download the published files into a model directory, and verify one offline.

    python -m app.tools.weights download kandinsky --dest model_store/kandinsky
    python -m app.tools.weights verify model_store/kandinsky [--sha256 sums.json]
    python -m app.tools.weights sha256 model_store/kandinsky --output sums.json

The download places every published file, unchanged, at the path the repository's model.json template
(`model_store/<name>/model.json`) names, then copies that template into the directory. Verification needs
no GPU: it memory-maps each checkpoint and compares tensor names and shapes with what the manifest implies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = REPO_ROOT / "model_store"
# Incomplete downloads live here (inside the destination, so the final rename never crosses filesystems);
# huggingface_hub resumes a partial file it finds here on the next run.
STAGING_DIR = ".download"
RUCLIP_FILES = ("bpe.model", "config.json", "pytorch_model.bin")
MODELS = ("kandinsky", "malevich")


class WeightsError(Exception):
    """A download or verification problem; the message names the file or repository."""


@dataclass(frozen=True)
class HubFile:
    """One file of a model directory and the hub locations it may be fetched from, tried in order."""

    dest: str  # relative to the model directory
    sources: tuple[tuple[str, str], ...]  # (repo_id, filename)


def _with_renamed_org(repos: Iterable[str]) -> list[str]:
    # The sberbank-ai organisation became ai-forever; old names may 404 where the hub has no redirect.
    out: list[str] = []
    for repo in repos:
        out.append(repo)
        if repo.startswith("sberbank-ai/"):
            out.append("ai-forever/" + repo.split("/", 1)[1])
    return out


_TRANSFORMER_SOURCES: dict[str, list[tuple[str, str]]] = {
    "kandinsky": [
        *((r, "pytorch_model.bin") for r in _with_renamed_org(["sberbank-ai/rudalle-Kandinsky"])),
        ("shonenkov-AI/Kandinsky", "pytorch_model.bin"),
    ],
    "malevich": [(r, "pytorch_model_v3.bin") for r in _with_renamed_org(["sberbank-ai/rudalle-Malevich"])],
}
_TOKENIZER_REPOS = ["shonenkov/rudalle-utils", *_with_renamed_org(["sberbank-ai/rudalle-utils"])]
_VQGAN_REPOS = _with_renamed_org(["sberbank-ai/rudalle-utils"])
_REALESRGAN_REPOS = _with_renamed_org(["sberbank-ai/Real-ESRGAN"])
_RUCLIP_REPOS = _with_renamed_org(["sberbank-ai/ruclip-vit-large-patch14-336"])


def template_path(name: str) -> Path:
    return TEMPLATES_DIR / name / "model.json"


def load_template(name: str, path: Path | None = None) -> dict[str, Any]:
    """Read the model.json template of `name`; WeightsError if it is missing or not a JSON object."""
    path = Path(path) if path is not None else template_path(name)
    if not path.is_file():
        raise WeightsError(
            f"model.json template for {name!r} not found at {path}; the repository's "
            f"model_store/{name}/model.json names the layout to download into (or pass --template FILE)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data


def _template_value(template: Mapping[str, Any], block: str, key: str) -> str:
    value = template.get(block, {}).get(key) if isinstance(template.get(block), dict) else None
    if not isinstance(value, str) or not value:
        raise WeightsError(f"model.json template: missing string {block}.{key}")
    return value


def download_plan(name: str, template: Mapping[str, Any]) -> list[HubFile]:
    """The files of model `name` and where each comes from; destinations are read from the template."""
    if name not in _TRANSFORMER_SOURCES:
        raise WeightsError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    ruclip_dir = _template_value(template, "ruclip", "path")
    return [
        HubFile(_template_value(template, "dalle", "checkpoint"), tuple(_TRANSFORMER_SOURCES[name])),
        HubFile(
            _template_value(template, "tokenizer", "path"), tuple((r, "bpe.model") for r in _TOKENIZER_REPOS)
        ),
        HubFile(
            _template_value(template, "vqgan", "checkpoint"),
            tuple((r, "vqgan.gumbelf8-sber.model.ckpt") for r in _VQGAN_REPOS),
        ),
        HubFile(
            _template_value(template, "realesrgan", "checkpoint"),
            tuple((r, "RealESRGAN_x4.pth") for r in _REALESRGAN_REPOS),
        ),
        *(HubFile(f"{ruclip_dir}/{f}", tuple((r, f) for r in _RUCLIP_REPOS)) for f in RUCLIP_FILES),
    ]


def _is_not_found(exc: BaseException) -> bool:
    # Fall back to the next repository only when this one lacks the file (or hides it behind a gate);
    # network failures are raised, since the next repository would fail the same way.
    if isinstance(exc, RepositoryNotFoundError | EntryNotFoundError | RevisionNotFoundError):
        return True
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code in (401, 403, 404)
    return False


def _fetch(item: HubFile, staging: Path, token: str | bool | None) -> Path:
    tried: list[str] = []
    for repo_id, filename in item.sources:
        local_dir = staging / repo_id.replace("/", "--")
        try:
            path = hf_hub_download(repo_id=repo_id, filename=filename, local_dir=local_dir, token=token)
        except Exception as exc:
            if not _is_not_found(exc):
                raise WeightsError(f"{item.dest}: download of {repo_id}/{filename} failed: {exc}") from exc
            tried.append(f"{repo_id}/{filename} ({type(exc).__name__})")
            log.warning("%s: %s/%s not available, trying the next source", item.dest, repo_id, filename)
            continue
        return Path(path)
    raise WeightsError(f"{item.dest}: not found in any source: {'; '.join(tried)}")


def download(
    name: str,
    dest: str | os.PathLike[str],
    *,
    template: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> list[Path]:
    """Download model `name` into `dest` in the model-directory layout and write its model.json.

    Files already in place are skipped (each is renamed into place only once complete), and an interrupted
    file resumes from the partial download kept under `dest/.download/`. Returns the downloaded paths.
    """
    tmpl_path = Path(template) if template is not None else template_path(name)
    tmpl = load_template(name, tmpl_path)
    plan = download_plan(name, tmpl)
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / STAGING_DIR
    fetched: list[Path] = []
    for item in tqdm(plan, desc=f"{name} files", unit="file"):
        final = root / item.dest
        if final.is_file() and final.stat().st_size > 0:
            log.info("%s: present, skipped", item.dest)
            continue
        src = _fetch(item, staging, token)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, final)
        fetched.append(final)
        log.info("%s: downloaded (%d bytes)", item.dest, final.stat().st_size)
    manifest_path = root / "model.json"
    if not (manifest_path.exists() and manifest_path.samefile(tmpl_path)):  # `--dest model_store/<name>`
        shutil.copyfile(tmpl_path, manifest_path)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: model.json written; %d file(s) downloaded", root, len(fetched))
    return fetched


# ------------------------------------------------------------------------------------------------ verify


@dataclass
class VerifyReport:
    """What `verify` checked and every problem it found (an empty `problems` means the directory is good)."""

    model_dir: Path
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    hint: str = ""  # how to fix the problems (e.g. the command that fetches missing files)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"model directory {self.model_dir}:"]
        lines += [f"  ok       {c}" for c in self.checked]
        lines += [f"  PROBLEM  {p}" for p in self.problems]
        if self.hint and not self.ok:
            lines.append(f"  FIX      {self.hint}")
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines) + "\n"


def _ignore(_: object) -> None:
    return None


def _unwrap_lightning(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    state = obj.get("state_dict")
    return state if isinstance(state, Mapping) else obj


def _check(report: VerifyReport, what: str, fn: Callable[[], None]) -> None:
    from app.engine.checkpoints import ModelStoreError

    try:
        fn()
    except (ModelStoreError, WeightsError, OSError, ValueError, KeyError, TypeError) as exc:
        report.problems.append(str(exc))
    else:
        report.checked.append(what)


def _checkpoint_check(
    path: Path,
    expected: Mapping[str, tuple[int, ...]],
    unwrap: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    metadata_keys: frozenset[str] = frozenset(),
    **kwargs: Any,
) -> Callable[[], None]:
    from app.engine.checkpoints import check_state_dict, read_state_dict

    def run() -> None:
        obj = read_state_dict(path, mmap=True, metadata_keys=metadata_keys)
        sd = unwrap(obj) if unwrap is not None else obj
        check_state_dict(sd, expected, path, **kwargs)

    return run


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """Every file the model directory's manifest names (ruCLIP's folder expanded), relative to it."""
    from app.engine.store import load_manifest, manifest_file_paths

    m = load_manifest(Path(model_dir))
    return [Path(os.path.relpath(f, m.root)) for f in manifest_file_paths(m)]


def verify(model_dir: str | os.PathLike[str], *, sha256: Mapping[str, str] | None = None) -> VerifyReport:
    """Check a model directory on the CPU: manifest valid, every file present, every checkpoint's tensor
    names and shapes as the manifest implies (memory-mapped, nothing is loaded onto a device), and
    optionally each file's sha256 against `sha256` (relative path -> hex digest). Collects every problem.
    """
    from app.engine.checkpoints import LIGHTNING_METADATA_KEYS
    from app.engine.nets.clip import expected_clip_tensors, read_clip_config
    from app.engine.nets.dalle import MASK_BUFFERS
    from app.engine.nets.realesrgan import unwrap_realesrgan_state_dict
    from app.engine.nets.vqgan import vqgan_decode_tensor_names, vqgan_encode_tensor_names
    from app.engine.store import (
        ModelStoreError,
        expected_tensors,
        fetch_hint,
        load_manifest,
        load_tokenizer,
        missing_files,
    )

    root = Path(model_dir)
    report = VerifyReport(root)
    try:
        manifest = load_manifest(root)
    except ModelStoreError as exc:
        report.problems.append(str(exc))
        return report
    report.checked.append(f"{manifest.path}: manifest of {manifest.name!r}")

    # The manifest's paths are absolute, as are the checks' below: each missing file is reported once,
    # here, and its checks are skipped (`root` may be relative).
    missing = missing_files(manifest)
    report.problems += [f"file not found: {path}" for path in missing]
    if missing:
        report.hint = fetch_hint(manifest)
    missing_set = set(missing)

    expected = expected_tensors(manifest)
    vq_needed = {*vqgan_decode_tensor_names(manifest.vqgan), *vqgan_encode_tensor_names(manifest.vqgan)}
    shapes = "tensors and shapes"
    checks: list[tuple[Path, str, Callable[[], None]]] = [
        (
            manifest.dalle_checkpoint,
            shapes,
            _checkpoint_check(manifest.dalle_checkpoint, expected["dalle"], allowed_extra=MASK_BUFFERS),
        ),
        (
            manifest.vqgan_checkpoint,
            shapes,
            # Lightning checkpoints also hold loss/discriminator tensors and pickled training metadata
            # (read as inert stand-ins); the model's encode and decode tensors are required.
            _checkpoint_check(
                manifest.vqgan_checkpoint, expected["vqgan"], unwrap=_unwrap_lightning,
                metadata_keys=LIGHTNING_METADATA_KEYS,
                optional=set(expected["vqgan"]) - vq_needed, ignore_unknown=True,
            ),
        ),
        (
            manifest.realesrgan_checkpoint,
            shapes,
            _checkpoint_check(
                manifest.realesrgan_checkpoint, expected["realesrgan"],
                unwrap=lambda obj: dict(unwrap_realesrgan_state_dict(obj)),
            ),
        ),
        (manifest.tokenizer, "BPE model within the text vocabulary",
         lambda: _ignore(load_tokenizer(manifest))),
    ]
    clip_file = manifest.ruclip / "pytorch_model.bin"
    if (manifest.ruclip / "config.json").is_file():

        def clip_check() -> None:
            _checkpoint_check(clip_file, expected_clip_tensors(read_clip_config(manifest.ruclip)))()

        checks.append((clip_file, f"{shapes} (as config.json implies)", clip_check))
    for path, what, fn in checks:
        if path not in missing_set:
            _check(report, f"{path}: {what}", fn)

    for rel, want in (sha256 or {}).items():
        path = root / rel
        if not path.is_file():
            report.problems.append(f"sha256: file not found: {path}")
            continue
        got = sha256_file(path)
        if got.lower() != str(want).lower():
            report.problems.append(f"sha256 mismatch for {path}: got {got}, expected {want}")
        else:
            report.checked.append(f"{path}: sha256")
    return report


# --------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.tools.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download the published files of a model into a model directory")
    dl.add_argument("model", choices=MODELS)
    dl.add_argument("--dest", required=True, type=Path, help="model directory to fill (created if missing)")
    dl.add_argument("--template", type=Path, default=None,
                    help="model.json to copy (default: the repository's model_store/<model>/model.json)")
    dl.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or the saved login)")
    ver = sub.add_parser("verify", help="check a model directory offline (files, tensor names and shapes)")
    ver.add_argument("model_dir", type=Path)
    ver.add_argument("--sha256", type=Path, default=None, help="JSON object: relative path -> sha256 hex")
    sha = sub.add_parser("sha256", help="write the sha256 of every file the manifest names, as JSON")
    sha.add_argument("model_dir", type=Path)
    sha.add_argument("--output", type=Path, default=None, help="file to write (default: stdout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.engine.checkpoints import ModelStoreError

    try:
        if args.command == "download":
            download(args.model, args.dest, template=args.template, token=args.token)
            return 0
        if args.command == "verify":
            digests = None
            if args.sha256 is not None:
                digests = json.loads(args.sha256.read_text(encoding="utf-8"))
                if not isinstance(digests, dict):
                    raise WeightsError(f"{args.sha256}: expected a JSON object of path -> sha256")
            report = verify(args.model_dir, sha256=digests)
            sys.stdout.write(report.render())
            return 0 if report.ok else 1
        sums = {str(rel): sha256_file(args.model_dir / rel) for rel in manifest_files(args.model_dir)}
        text = json.dumps(sums, indent=2, sort_keys=True) + "\n"
        if args.output is not None:
            args.output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0
    except (WeightsError, ModelStoreError, OSError, json.JSONDecodeError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
