"""Static checks of the deployment: k8s/ manifests against KServe's real CRD schemas, against the real
server (its argument parser, its HTTP routes, its metric names) and against the Dockerfile.

Nothing here needs a cluster, Docker or the network. The CRDs come from the shared folder
(KANDINSKY_SHARED_DIR, else <repo>/../shared, else <repo>/shared).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

import app as app_pkg
from tests.support import _served_routes

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
IMAGE_NAME = "kandinsky-serving"
VOLTA_IMAGE_NAME = f"{IMAGE_NAME}-volta"  # `make docker-build-volta`: the V100 build, $(IMAGE)-volta
# The Volta image's torch build, measured rather than assumed (no V100 here): on 2026-11-21,
# `pip install torch==2.10.0 torchvision==0.25.0` (the default PyPI manylinux_2_28 x86_64 cp311 wheels)
# into a fresh venv gave torch.__version__ 2.10.0+cu128, torch.version.cuda "12.8" and
# torch._C._cuda_getArchFlags() below; the .nv_fatbin sections of libtorch_cuda.so and torchvision's
# _C.so hold sm_70 cubins; in the image `make docker-build-volta` built (Debian base, 2026-12-05) torch
# reports the same version, CUDA and arch flags. The newer PyPI wheels (2.11.0, 2.12.1, 2.13.0, 2.14.1,
# 2.15.0) are CUDA 13 builds whose arch list starts at sm_75. The Makefile's docker-build-volta must pin
# exactly this pair (a test checks it): change the pins only together with a new measurement.
VOLTA_TORCH_PINS = ("torch==2.10.0", "torchvision==0.25.0")
VOLTA_TORCH_CUDA = "12.8"  # its CUDA libraries come with the wheels (nvidia-*-cu12), like the default's
VOLTA_TORCH_ARCH_FLAGS = "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
KANDINSKY_CHECKPOINT_BYTES = 23 * 10**9  # SPEC section 2: the published transformer file
GPU = "nvidia.com/gpu"

NATIVE_KINDS = {
    ("v1", "ServiceAccount"),
    ("v1", "Secret"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "ConfigMap"),
    ("batch/v1", "Job"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
CRD_FILES = {
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
    "ClusterServingRuntime": "serving.kserve.io_clusterservingruntimes.yaml",
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
}
# prometheus-operator's CRDs (kube-prometheus-stack installs them), in the same shared folder.
MONITORING_CRD_FILES = {
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}
# Metrics the alert rules may use that come from the cluster, not from our server.
EXTERNAL_METRICS = {"kube_pod_status_ready", "up"}
# Labels Prometheus' pod scraping attaches to every series (plus `le` of histogram buckets).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container", "service", "le"}


# ------------------------------------------------------------------------------------------ k8s loading


def _load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _kustomization(directory: Path) -> dict[str, Any]:
    return _load_yaml(directory / "kustomization.yaml")[0]


def _walk_kustomization(directory: Path) -> Iterator[tuple[Path, Path]]:
    """(kustomization dir, file) for every resource and generator file, following nested kustomizations."""
    kust = _kustomization(directory)
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            yield from _walk_kustomization(target)
        else:
            yield directory, target
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        for entry in gen.get("files", []):
            yield directory, (directory / entry.split("=", 1)[-1]).resolve()


@cache
def _roots() -> tuple[Path, ...]:
    """k8s/ itself plus every kustomization not included by another (e.g. the one-off weights Job)."""
    all_dirs = {p.parent.resolve() for p in K8S.rglob("kustomization.yaml")}
    included: set[Path] = set()
    for d in all_dirs:
        for entry in _kustomization(d).get("resources", []):
            target = (d / entry).resolve()
            if target.is_dir():
                included.add(target)
    return tuple(sorted(all_dirs - included))


@cache
def _objects() -> tuple[tuple[Path, dict[str, Any]], ...]:
    out: list[tuple[Path, dict[str, Any]]] = []
    for root in _roots():
        for _, path in _walk_kustomization(root):
            if path.suffix in (".yaml", ".yml"):
                out.extend((path, doc) for doc in _load_yaml(path))
    return tuple(out)


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _objects() if doc.get("kind") == kind]


def _isvc_ids() -> list[str]:
    return [d["metadata"]["name"] for d in _of_kind("InferenceService")]


def _isvc(name: str) -> dict[str, Any]:
    return next(d for d in _of_kind("InferenceService") if d["metadata"]["name"] == name)


def _runtime_for(isvc: dict[str, Any]) -> dict[str, Any]:
    model = isvc["spec"]["predictor"]["model"]
    runtimes = _of_kind("ClusterServingRuntime") + _of_kind("ServingRuntime")
    matches = [r for r in runtimes if r["metadata"]["name"] == model["runtime"]]
    assert matches, f"{isvc['metadata']['name']}: runtime {model['runtime']!r} is not defined in k8s/"
    return matches[0]


def _quantity(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m, f"not a quantity: {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def _duration_s(text: str) -> float:
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(h|m|s)", text):
        assert m.start() == pos, f"not a Go duration: {text!r}"
        total += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1}[m.group(2)]
        pos = m.end()
    assert pos == len(text) and pos, f"not a Go duration: {text!r}"
    return total


def test_kustomize_build_renders_every_root_with_the_registry_image() -> None:
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` cannot be checked here")
    for root in _roots():
        out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"kubectl kustomize {root}: {out.stderr}"
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        spec_images = re.findall(r"^\s*image: (\S+)$", out.stdout, re.M)
        # Every image is rewritten to the registry, and every `images:` entry is used (the Volta one too).
        registry = {f"{i['newName']}:{app_pkg.__version__}" for i in _kustomization(root)["images"]}
        assert spec_images and set(spec_images) == registry, f"{root}: {sorted(set(spec_images))}"
        for doc in docs:
            assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "kandinsky-serving"
            if doc["kind"] == "ClusterServingRuntime":
                assert "namespace" not in doc["metadata"]


# ---------------------------------------------------------------------------------------- CRD schemas


def _shared_dir() -> Path | None:
    explicit = os.environ.get("KANDINSKY_SHARED_DIR")
    if explicit:  # set on purpose: a wrong path is an error, not a reason to skip
        if not (Path(explicit) / "k8s" / "crds").is_dir():
            pytest.fail(f"KANDINSKY_SHARED_DIR={explicit} has no k8s/crds/")
        return Path(explicit)
    for c in (REPO.parent / "shared", REPO / "shared"):
        if (c / "k8s" / "crds").is_dir():
            return c
    return None


def _strict(schema: Any) -> Any:
    """Reject unknown fields as `kubectl apply --validate=strict` does: the API server would otherwise
    prune them silently, and a misspelled field (minReplica) would just vanish."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _validator(kind: str) -> Any:
    import jsonschema

    shared = _shared_dir()
    if shared is None:
        pytest.skip("CRDs not found: set KANDINSKY_SHARED_DIR or put shared/k8s/crds next to the repo")
    crd = _load_yaml(shared / "k8s" / "crds" / {**CRD_FILES, **MONITORING_CRD_FILES}[kind])[0]
    assert crd["spec"]["names"]["kind"] == kind
    versions = [v for v in crd["spec"]["versions"] if v.get("served")]
    version = next((v for v in versions if v.get("storage")), versions[0])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return f"{crd['spec']['group']}/{version['name']}", cls(schema)


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    api_version, validator = _validator(doc["kind"])
    errors = [f"apiVersion {doc.get('apiVersion')!r}, served: {api_version!r}"] if (
        doc.get("apiVersion") != api_version) else []
    for err in validator.iter_errors(doc):
        errors.append(f"{'.'.join(str(p) for p in err.absolute_path)}: {err.message}")
    return errors


def test_every_kserve_object_validates_against_the_served_crd_schema() -> None:
    kserve_docs = [(p, d) for p, d in _objects() if d.get("kind") in CRD_FILES]
    assert {d["kind"] for _, d in kserve_docs} >= {"InferenceService", "ClusterServingRuntime"}
    problems = [f"{p.relative_to(REPO)} {d['metadata']['name']}: {e}" for p, d in kserve_docs
                for e in _schema_errors(d)]
    assert not problems, "\n".join(problems)


def test_strict_schema_rejects_a_misspelled_field_and_a_wrong_type() -> None:
    doc = json.loads(json.dumps(_of_kind("InferenceService")[0]))
    doc["spec"]["predictor"]["minReplica"] = 1
    doc["spec"]["predictor"]["timeout"] = "900"
    errors = "\n".join(_schema_errors(doc))
    assert "minReplica" in errors and "'900' is not of type 'integer'" in errors


def test_every_other_object_is_a_known_kubernetes_kind_with_a_name() -> None:
    name_re = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for path, doc in _objects():
        key = (doc.get("apiVersion"), doc.get("kind"))
        if doc.get("kind") not in CRD_FILES:
            assert key in NATIVE_KINDS, f"{path}: unexpected {key}"
        name = doc.get("metadata", {}).get("name", "")
        assert name_re.match(name) and len(name) <= 63, f"{path}: bad metadata.name {name!r}"
        assert "namespace" not in doc["metadata"], f"{path}: the namespace comes from `kubectl -n`"


def test_kustomizations_reference_every_manifest_file_under_k8s() -> None:
    referenced = {p for root in _roots() for _, p in _walk_kustomization(root)}
    for p in referenced:
        assert p.is_file(), f"kustomization references a missing file: {p}"
    on_disk = {p.resolve() for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml", ".json")
               and p.name != "kustomization.yaml"}
    orphans = sorted(str(p.relative_to(K8S)) for p in on_disk - referenced)
    assert not orphans, f"files under k8s/ that no kustomization applies: {orphans}"
    assert K8S.resolve() in _roots()


# ------------------------------------------------------------------------------------- the real server


@cache
def _server_parser() -> Any:
    """The argument parser `python -m app` really uses."""
    import argparse

    import app.__main__ as entry

    builder = getattr(entry, "build_parser", None)
    if builder is None:  # tolerate a rename, but insist that the entry point exposes its parser
        builders = [f for n, f in vars(entry).items() if "parser" in n.lower() and callable(f)]
        assert builders, "app/__main__.py exposes no parser builder"
        builder = builders[0]
    parser = builder()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def _server_args(isvc: dict[str, Any]) -> list[str]:
    """Runtime args (templated with the InferenceService name), then the InferenceService's own:
    KServe concatenates the two lists when it merges the containers."""
    runtime_args = _runtime_for(isvc)["spec"]["containers"][0].get("args", [])
    name = isvc["metadata"]["name"]
    args = [a.replace("{{.Name}}", name) for a in runtime_args]
    return args + list(isvc["spec"]["predictor"]["model"].get("args", []))


def _parse(args: list[str]) -> Any:
    try:
        return _server_parser().parse_args(args)
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
        raise AssertionError(f"the server rejects its manifest args {args}") from exc


def _route_for(path: str, method: str = "GET") -> str | None:
    for template, methods in _served_routes().items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/:]+", re.escape(template))
        if re.fullmatch(pattern, path) and method in methods:
            return template
    return None


def test_route_discovery_finds_the_documented_routes() -> None:
    assert _route_for("/v1/models/kandinsky") == "/v1/models/{model_name}"
    assert _route_for("/v1/models/kandinsky:predict", "POST") == "/v1/models/{model_name}:predict"
    assert _route_for("/v1/models/kandinsky/card") == "/v1/models/{model_name}/card"
    assert _route_for("/v2/health/live") and _route_for("/metrics")
    assert _route_for("/v2/health/alive") is None


@pytest.mark.parametrize("name", _isvc_ids())
def test_container_args_parse_with_the_real_server_parser(name: str) -> None:
    isvc = _isvc(name)
    args = _parse(_server_args(isvc))
    assert args.model_name == name  # the route is /v1/models/<InferenceService name>
    assert args.model_dir == KSERVE_MODEL_DIR
    assert args.workers == 1
    devices = args.device.split(",")
    gpus = int(isvc["spec"]["predictor"]["model"]["resources"]["limits"][GPU])
    assert all(re.fullmatch(r"cuda:\d+", d) for d in devices) and len(set(devices)) == len(devices)
    assert len(devices) == gpus, f"--device names {len(devices)} GPUs, the pod gets {gpus}"
    product = isvc["spec"]["predictor"].get("nodeSelector", {}).get("nvidia.com/gpu.product", "")
    if "V100" in product or "T4" in product:  # no bf16 before Ampere
        assert args.dtype == "fp16"


def test_the_parser_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="rejects"):
        _parse(["--model_name=x", "--devices=cuda:0"])


@pytest.mark.parametrize("name", _isvc_ids())
def test_ports_and_probes_match_the_served_routes(name: str) -> None:
    isvc = _isvc(name)
    args = _parse(_server_args(isvc))
    runtime = _runtime_for(isvc)
    container = runtime["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [args.http_port]
    model = isvc["spec"]["predictor"]["model"]

    ready = model["readinessProbe"]["httpGet"]
    assert ready["path"] == f"/v1/models/{args.model_name}"
    assert _route_for(ready["path"]) == "/v1/models/{model_name}"
    for probe in ("livenessProbe", "startupProbe"):
        get = model[probe]["httpGet"]
        assert _route_for(get["path"]) == "/v2/health/live", f"{probe} {get['path']} is not served"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert model[probe]["httpGet"].get("port", args.http_port) == args.http_port

    ann = isvc["metadata"]["annotations"]
    assert ann["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == args.http_port
    assert _route_for(ann["prometheus.io/path"]) == "/metrics"
    rt_ann = runtime["spec"]["annotations"]
    assert int(rt_ann["prometheus.kserve.io/port"]) == args.http_port
    assert _route_for(rt_ann["prometheus.kserve.io/path"]) == "/metrics"


@pytest.mark.parametrize("name", _isvc_ids())
def test_timeouts_concurrency_and_scaling_fit_the_server(name: str) -> None:
    isvc = _isvc(name)
    args = _parse(_server_args(isvc))
    pred = isvc["spec"]["predictor"]
    # The server's deadline answers first (a JSON 504); the pod's grace period (Knative: the revision
    # timeout) covers the server's drain of request_timeout + 5 s after SIGTERM.
    assert pred["timeout"] >= args.request_timeout + 5
    # Knative never hands a pod more requests than its queue holds, so the server never answers 503 "full".
    assert 1 <= pred["containerConcurrency"] <= args.queue_size
    assert pred["minReplicas"] >= 1, "a multi-GB model must not scale to zero"
    assert pred["maxReplicas"] >= pred["minReplicas"]
    assert pred["scaleMetric"] == "concurrency" and 1 <= pred["scaleTarget"] <= pred["containerConcurrency"]

    model = pred["model"]
    startup = model["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    if pred["model"]["storageUri"].rstrip("/").endswith("/kandinsky"):
        assert budget >= 30 * 60, "a 23 GB load needs a 30 min start-up budget"
    ann = isvc["metadata"]["annotations"]
    deadline = _duration_s(ann["serving.knative.dev/progress-deadline"])
    assert deadline >= budget, "Knative would give up on the revision before the startupProbe does"
    assert _duration_s(ann["autoscaling.knative.dev/window"]) >= 60


@pytest.mark.parametrize("name", _isvc_ids())
def test_memory_gpu_and_shared_memory_sizing(name: str) -> None:
    isvc = _isvc(name)
    pred = isvc["spec"]["predictor"]
    res = pred["model"]["resources"]
    assert res["requests"][GPU] == res["limits"][GPU]
    mem = _quantity(res["limits"]["memory"])
    if pred["model"]["storageUri"].rstrip("/").endswith("/kandinsky"):
        # The checkpoint is memory-mapped while streaming to the GPUs: page cache charged to the pod.
        assert mem >= KANDINSKY_CHECKPOINT_BYTES * 1.5
    shm = [v for v in pred["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert len(shm) == 1
    mounts = {m["name"]: m["mountPath"] for m in pred["model"]["volumeMounts"]}
    assert mounts[shm[0]["name"]] == "/dev/shm"
    assert _quantity(shm[0]["emptyDir"]["sizeLimit"]) < mem / 4  # tmpfs pages count against the limit


# Compute capability of the GPUs the InferenceServices select (GPU Feature Discovery product labels).
GPU_CAPABILITY = {"A100": (8, 0), "H100": (9, 0), "H200": (9, 0), "A10": (8, 6), "L4": (8, 9),
                  "T4": (7, 5), "V100": (7, 0)}


def _installed_torch_arch_flags() -> str:
    import torch

    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""
    if not flags:
        pytest.skip("this torch build lists no CUDA architectures")
    return str(flags)


def _image_arch_flags(image: str) -> str:
    """The CUDA architectures of the torch inside an image. The default image's torch is the one
    installed here (test_default_image_pins_the_installed_torch_pair ties them); the Volta image's was
    measured (VOLTA_TORCH_ARCH_FLAGS, tied to the Makefile's pins)."""
    repo = image.rpartition(":")[0]
    if repo == IMAGE_NAME:
        return _installed_torch_arch_flags()
    if repo == VOLTA_IMAGE_NAME:
        return VOLTA_TORCH_ARCH_FLAGS
    raise AssertionError(f"{image}: no known torch build for this image")


def _runs_on(arch_flags: str, capability: tuple[int, int]) -> bool:
    """Whether a cubin runs on the GPU: the same major and a minor <= the GPU's (no PTX is counted)."""
    archs = [int(a) for a in re.findall(r"sm_(\d+)", arch_flags)]
    return any(a // 10 == capability[0] and a % 10 <= capability[1] for a in archs)


def _selected_gpu(isvc: dict[str, Any]) -> str | None:
    product = isvc["spec"]["predictor"].get("nodeSelector", {}).get("nvidia.com/gpu.product", "")
    return next((g for g in sorted(GPU_CAPABILITY, key=len, reverse=True) if g in product), None)


@pytest.mark.parametrize("name", _isvc_ids())
def test_the_image_torch_has_kernels_for_the_selected_gpu(name: str) -> None:
    isvc = _isvc(name)
    gpu = _selected_gpu(isvc)
    assert gpu is not None, f"{name}: nodeSelector names no known GPU product"
    capability = GPU_CAPABILITY[gpu]
    runtime = _runtime_for(isvc)
    image = runtime["spec"]["containers"][0]["image"]
    assert _runs_on(_image_arch_flags(image), capability), (
        f"{name}: runtime {runtime['metadata']['name']} ({image}) has no kernels for {gpu} {capability}")


def test_kernel_check_knows_cubin_compatibility_and_the_cu130_gap() -> None:
    cu130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"
    assert not _runs_on(cu130, GPU_CAPABILITY["V100"])  # why the Volta image exists
    assert _runs_on(VOLTA_TORCH_ARCH_FLAGS, GPU_CAPABILITY["V100"])
    assert _runs_on("sm_80", GPU_CAPABILITY["A10"])  # 8.0 cubins run on 8.6
    assert not _runs_on("sm_86", GPU_CAPABILITY["A100"])  # but not the other way round
    with pytest.raises(AssertionError, match="no known torch build"):
        _image_arch_flags("someone-else/serving:1.0")


def _runtimes_by_image(repo: str) -> list[dict[str, Any]]:
    return [r for r in _of_kind("ClusterServingRuntime")
            if r["spec"]["containers"][0]["image"].rpartition(":")[0] == repo]


def test_volta_runtime_is_the_default_runtime_with_the_volta_image_picked_only_by_name() -> None:
    (default,), (volta,) = _runtimes_by_image(IMAGE_NAME), _runtimes_by_image(VOLTA_IMAGE_NAME)
    assert all(f.get("autoSelect") is False for f in volta["spec"]["supportedModelFormats"])

    def normalized(runtime: dict[str, Any]) -> dict[str, Any]:
        doc = json.loads(json.dumps(runtime))
        del doc["metadata"]["name"]
        for c in doc["spec"]["containers"]:
            c["image"] = c["image"].rpartition(":")[2]  # the tag (version) must still agree
        for f in doc["spec"]["supportedModelFormats"]:
            f.pop("autoSelect", None)
            f.pop("priority", None)
        return doc

    assert normalized(volta) == normalized(default), "the Volta runtime drifted from kandinsky-runtime"
    v100 = [n for n in _isvc_ids() if _selected_gpu(_isvc(n)) == "V100"]
    assert v100 and all(_runtime_for(_isvc(n)) is volta for n in v100)


def test_one_runtime_is_auto_selected_per_model_format() -> None:
    # KServe's ServingRuntime webhook rejects two autoSelect runtimes of equal priority for one format;
    # an InferenceService that names no runtime must land on the default image.
    auto: dict[tuple[str, str | None], list[str]] = {}
    for r in _of_kind("ClusterServingRuntime") + _of_kind("ServingRuntime"):
        for f in r["spec"]["supportedModelFormats"]:
            if f.get("autoSelect"):
                auto.setdefault((f["name"], f.get("version")), []).append(r["spec"]["containers"][0]["image"])
    assert auto and all(len(images) == 1 for images in auto.values()), auto
    assert auto[("kandinsky", "1")][0].rpartition(":")[0] == IMAGE_NAME


def test_storage_uris_point_at_objects_defined_here() -> None:
    pvcs = {d["metadata"]["name"] for d in _of_kind("PersistentVolumeClaim")}
    accounts = {d["metadata"]["name"]: d for d in _of_kind("ServiceAccount")}
    secrets = {d["metadata"]["name"]: d for d in _of_kind("Secret")}
    schemes = set()
    for isvc in _of_kind("InferenceService"):
        pred = isvc["spec"]["predictor"]
        uri = pred["model"]["storageUri"]
        scheme = uri.split("://", 1)[0]
        schemes.add(scheme)
        if scheme == "pvc":
            assert uri.split("/")[2] in pvcs, f"{uri}: no such PVC in k8s/"
        elif scheme == "s3":
            sa = accounts[pred["serviceAccountName"]]
            secret = secrets[sa["secrets"][0]["name"]]
            assert "serving.kserve.io/s3-endpoint" in secret["metadata"]["annotations"]
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
            # The storage initializer downloads into the pod's ephemeral storage before the server starts.
            assert _quantity(pred["model"]["resources"]["requests"]["ephemeral-storage"]) >= 30 * 2**30
        else:
            raise AssertionError(f"unexpected storageUri scheme in {uri}")
    assert schemes == {"pvc", "s3"}


def test_model_format_is_served_by_the_named_runtime() -> None:
    for isvc in _of_kind("InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        formats = {f["name"] for f in _runtime_for(isvc)["spec"]["supportedModelFormats"]}
        assert model["modelFormat"]["name"] in formats


# ------------------------------------------------------------------------------ image and Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    return instructions[last_from:]


def test_dockerfile_runs_the_server_as_uid_1000_on_the_manifests_port() -> None:
    final = _final_stage()
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] == "1000"
    entry = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["python", "-m", "app"]
    exposed = {int(p.split("/")[0]) for w, rest in final if w == "EXPOSE" for p in rest.split()}
    ports = {_parse(_server_args(i)).http_port for i in _of_kind("InferenceService")}
    assert exposed == ports == {8080}
    for runtime in _of_kind("ClusterServingRuntime"):
        sc = runtime["spec"]["containers"][0]["securityContext"]
        assert sc["runAsUser"] == 1000 and sc["runAsNonRoot"] is True
        assert "command" not in runtime["spec"]["containers"][0], "the image's ENTRYPOINT is the server"


def test_dockerfile_uses_the_pinned_install_step_on_the_debian_base() -> None:
    # SPEC section 13: debian:bookworm-slim (Python 3.11 from Debian); torch's wheels bring the CUDA
    # libraries, the node the driver, so no CUDA base image (and no registry) is needed.
    instructions = _dockerfile()
    args = dict(rest.split("=", 1) for w, rest in instructions if w == "ARG" and "=" in rest)
    bases = [rest.split()[0] for w, rest in instructions if w == "FROM"]
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], b) for b in bases]
    assert bases == ["debian:bookworm-slim"] * 2, bases
    copies = " ".join(rest for w, rest in instructions if w == "COPY")
    assert "requirements.txt" in copies and "scripts/install.sh" in copies
    runs = [rest for w, rest in instructions if w == "RUN" and "scripts/install.sh" in rest]
    assert len(runs) == 1
    python = shlex.split(runs[0])[shlex.split(runs[0]).index("scripts/install.sh") + 1]
    path_env = " ".join(rest for w, rest in _final_stage() if w == "ENV")
    assert f"PATH={Path(python).parent}:" in path_env, "ENTRYPOINT's `python` must be the installed one"
    assert "--dev" not in runs[0]


def _install_sh_default(var: str) -> str:
    text = (REPO / "scripts" / "install.sh").read_text(encoding="utf-8")
    m = re.search(rf'^{var}="\$\{{{var}:-([^}}]+)\}}"$', text, re.M)
    assert m, f"scripts/install.sh does not default {var}"
    return m.group(1)


def test_default_image_pins_the_installed_torch_pair() -> None:
    """The default image's torch is the one installed here, so its arch flags stand for the image's."""
    import torch
    import torchvision

    instructions = _dockerfile()
    args = dict(rest.split("=", 1) for w, rest in instructions if w == "ARG" and "=" in rest)
    install = next(rest for w, rest in instructions if w == "RUN" and "scripts/install.sh" in rest)
    for var, module in (("TORCH_PIN", torch), ("TORCHVISION_PIN", torchvision)):
        assert f'{var}="${{{var}}}"' in install, f"the install RUN does not pass {var}"
        assert args[var] == _install_sh_default(var), f"Dockerfile and install.sh disagree on {var}"
        assert args[var] == f"{module.__name__}=={module.__version__.split('+')[0]}", (
            f"{var}={args[var]}, but {module.__name__} {module.__version__} is installed")
    assert "CUDA_IMAGE" not in args, "the base is BASE_IMAGE; torch's wheels bring the CUDA libraries"


def _make_recipe(target: str) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Makefile").read_text(encoding="utf-8"))
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{target}:")), None)
    assert start is not None, f"Makefile has no {target} target"
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_volta_image_build_uses_the_measured_torch_pair_on_its_cuda_runtime() -> None:
    (command,) = _make_recipe("docker-build-volta")
    argv = shlex.split(command)
    assert argv[:3] == ["DOCKER_BUILDKIT=1", "$(DOCKER)", "build"] and argv[-1] == "."
    assert "$(DOCKER_BUILD_FLAGS)" in argv, "the same version labels and pip_ca secret as docker-build"
    assert argv[argv.index("-t") + 1] == "$(IMAGE)-volta:$(VERSION)"  # IMAGE ?= kandinsky-serving
    build_args = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--build-arg")
    assert (build_args["TORCH_PIN"], build_args["TORCHVISION_PIN"]) == VOLTA_TORCH_PINS, (
        "the Volta pins changed: re-measure torch._C._cuda_getArchFlags() and update VOLTA_TORCH_*")
    # The same Debian base: the cu128 wheels bring CUDA 12.8's libraries (VOLTA_TORCH_CUDA) themselves.
    assert "BASE_IMAGE" not in build_args
    declared = {rest.split("=", 1)[0] for w, rest in _dockerfile() if w == "ARG"}
    assert set(build_args) <= declared, f"build args the Dockerfile ignores: {set(build_args) - declared}"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory applies."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        regex = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?"
                        else re.escape(tok) for tok in re.split(r"(\*\*|\*|\?)", pat.strip("/")))
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_weights_and_local_state_out_but_sends_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for rel in ("requirements.txt", "scripts/install.sh", "app/__main__.py", "app/tools/weights.py",
                "model_store/kandinsky/model.json", "model_store/malevich/model.json"):
        assert not _dockerignored(rel, patterns), f"{rel} is needed by the build"
    for rel in (".venv/bin/python", ".git/HEAD", "model_store/kandinsky/rudalle_kandinsky.bin",
                "model_store/kandinsky/ruclip-vit-large-patch14-336/pytorch_model.bin",
                "model_store/tiny/model.json", "app/__pycache__/model.cpython-311.pyc", "tests/conftest.py"):
        assert _dockerignored(rel, patterns), f"{rel} must not reach the image"
    for w, rest in _dockerfile():
        if w == "COPY" and not rest.startswith("--from"):
            for src in shlex.split(rest)[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"


def _container_images(doc: dict[str, Any]) -> list[str]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    return [c["image"] for c in pod.get("containers", []) + pod.get("initContainers", []) if "image" in c]


def _image_refs() -> list[tuple[str, str]]:
    return [(doc["metadata"]["name"], image) for _, doc in _objects() for image in _container_images(doc)]


def test_images_follow_the_makefile_tag_convention() -> None:
    version = app_pkg.__version__
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^IMAGE \?= {IMAGE_NAME}$", makefile, re.M)
    assert "build $(DOCKER_BUILD_FLAGS) -t $(IMAGE):$(VERSION) ." in makefile
    refs = _image_refs()
    assert refs
    allowed = {f"{IMAGE_NAME}:{version}", f"{VOLTA_IMAGE_NAME}:{version}"}
    for owner, image in refs:
        assert image in allowed, f"{owner}: {image} is not one of {sorted(allowed)}"
    for root in _roots():
        used = {image.rpartition(":")[0] for _, path in _walk_kustomization(root) if path.suffix == ".yaml"
                for doc in _load_yaml(path) for image in _container_images(doc)}
        images = {i["name"]: i for i in _kustomization(root).get("images", [])}
        missing = used - set(images)
        assert used and not missing, f"{root}/kustomization.yaml: no images: entry for {sorted(missing)}"
        for name in used:
            tag = images[name]["newTag"]
            assert tag == version, f"{root}/kustomization.yaml: {name} tag {tag}, app {version}"


def test_weights_job_runs_real_weights_tool_commands() -> None:
    from app.tools import weights

    jobs = _of_kind("Job")
    assert jobs
    parser = weights._parser()
    commands = []
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 1000
        for c in pod.get("initContainers", []) + pod["containers"]:
            for cmd in " ".join(c["args"]).split("&&"):
                argv = shlex.split(cmd)
                assert argv[:3] == ["python", "-m", "app.tools.weights"], cmd
                parsed = parser.parse_args(argv[3:])
                commands.append(parsed.command)
                target = getattr(parsed, "dest", None) or parsed.model_dir
                claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]]
                mount = next(m["mountPath"] for m in c["volumeMounts"])
                assert str(target).startswith(mount) and claims == ["kandinsky-weights"]
    assert {"download", "verify"} <= set(commands)


# --------------------------------------------------------------------------------- metrics and alerts


@cache
def _server_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every series name the server exports -> (family, label names), from the metrics module itself."""
    from prometheus_client.metrics import MetricWrapperBase

    import app.serving.observability.metrics as metrics

    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count",
                "_created"), "summary": ("_sum", "_count", "_created")}
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels = frozenset(value._labelnames)
            for family in value.describe():
                for suffix in suffixes[family.type]:
                    out[family.name + suffix] = (family.name, labels)
    assert out, "app.serving.observability.metrics defines no metrics"
    return out


def _dashboard() -> dict[str, Any]:
    return json.loads((K8S / "monitoring" / "kandinsky-dashboard.json").read_text(encoding="utf-8"))


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    for var in _dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def _rule_exprs() -> list[str]:
    groups = [g for rule in _of_kind("PrometheusRule") for g in rule["spec"]["groups"]]
    return [r["expr"] for g in groups for r in g["rules"]]


_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")


def _metric_problems(expr: str, allowed_external: set[str]) -> list[str]:
    known = _server_metrics()
    problems = []
    for name in re.findall(r"\bkandinsky_[a-z0-9_]+\b", expr):
        if name not in known:
            problems.append(f"{name}: not a series the server exports")
    for name, body in _SELECTOR.findall(expr):
        if name in known:
            labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))
            unknown = labels - known[name][1] - TARGET_LABELS
            if unknown:
                problems.append(f"{name}: no label(s) {sorted(unknown)}")
        elif not name.startswith("kandinsky_") and name not in allowed_external | {"label_values"}:
            problems.append(f"{name}: unknown metric")
    return problems


def test_dashboard_and_alerts_use_only_metrics_and_labels_the_server_defines() -> None:
    problems = [f"dashboard: {p}" for e in _dashboard_exprs() for p in _metric_problems(e, set())]
    problems += [f"alert: {p}" for e in _rule_exprs() for p in _metric_problems(e, EXTERNAL_METRICS)]
    assert not problems, "\n".join(problems)


def test_the_metric_name_check_catches_a_rename() -> None:
    assert _metric_problems("sum(rate(kandinsky_request_total[5m]))", set())
    assert _metric_problems('sum(rate(kandinsky_stage_seconds_sum{phase="x"}[5m]))', set())
    assert not _metric_problems('sum(rate(kandinsky_stage_seconds_sum{stage="decode"}[5m]))', set())


def test_dashboard_covers_every_server_metric_and_the_required_panels() -> None:
    used = {_server_metrics()[n][0] for e in _dashboard_exprs()
            for n in re.findall(r"\bkandinsky_[a-z0-9_]+\b", e) if n in _server_metrics()}
    families = {family for family, _ in _server_metrics().values()}
    assert used == families, f"metrics without a panel: {sorted(families - used)}"
    exprs = "\n".join(_dashboard_exprs())
    for needle in ("histogram_quantile(0.99", "by (stage)", 'code=~"5..', "by (pod, device)"):
        assert needle in exprs
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_cover_stuck_queue_errors_and_readiness() -> None:
    rules = {r["alert"]: r for rule in _of_kind("PrometheusRule") for g in rule["spec"]["groups"]
             for r in g["rules"]}
    stuck = rules["KandinskyQueueStuck"]["expr"]
    assert "kandinsky_queue_depth" in stuck and "increase(kandinsky_images_total[10m])" in stuck
    errors = rules["KandinskyHighErrorRate"]
    assert 'code=~"5.."' in errors["expr"] and "0.05" in errors["expr"] and errors["for"] == "10m"
    assert "kube_pod_status_ready" in rules["KandinskyPodNotReady"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]


# ------------------------------------------------------------------ prometheus-operator and Grafana


def test_every_monitoring_object_validates_against_the_prometheus_operator_crd_schema() -> None:
    docs = [(p, d) for p, d in _objects() if d.get("kind") in MONITORING_CRD_FILES]
    assert {d["kind"] for _, d in docs} == set(MONITORING_CRD_FILES)
    problems = [f"{p.relative_to(REPO)} {d['metadata']['name']}: {e}" for p, d in docs
                for e in _schema_errors(d)]
    assert not problems, "\n".join(problems)


def test_strict_monitoring_schema_rejects_a_misspelled_field_and_a_bad_interval() -> None:
    doc = json.loads(json.dumps(_of_kind("PodMonitor")[0]))
    doc["spec"]["podMetricsEndpoints"][0]["portName"] = "user-port"
    doc["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    errors = "\n".join(_schema_errors(doc))
    assert "portName" in errors and "interval" in errors
    rule = json.loads(json.dumps(_of_kind("PrometheusRule")[0]))
    rule["spec"]["groups"][0]["rules"][0]["alertname"] = "x"
    assert "alertname" in "\n".join(_schema_errors(rule))


# KServe labels every predictor pod with these (constants.InferenceServicePodLabelKey and
# KServiceComponentLabel), on top of the runtime's pod labels, the InferenceService's and the predictor's.
KSERVE_POD_NAME_LABEL = "serving.kserve.io/inferenceservice"
KSERVE_COMPONENT_LABEL = "component"
# Knative names the serving container's only port `user-port` in the pod it makes (v1.UserPortName),
# whatever the runtime calls it; KServe's Standard mode keeps the runtime's port as it is.
KNATIVE_USER_PORT = "user-port"


def _predictor_pod_labels(isvc: dict[str, Any]) -> dict[str, str]:
    labels = dict(_runtime_for(isvc)["spec"].get("labels", {}))
    labels.update(isvc["metadata"].get("labels", {}))
    labels.update(isvc["spec"]["predictor"].get("labels", {}))
    labels.update({KSERVE_POD_NAME_LABEL: isvc["metadata"]["name"], KSERVE_COMPONENT_LABEL: "predictor"})
    return labels


def _predictor_pod_ports(isvc: dict[str, Any]) -> dict[str, int]:
    """Port name -> number of the serving container in the predictor pod."""
    ports = _runtime_for(isvc)["spec"]["containers"][0]["ports"]
    mode = isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode", "Knative")
    if mode == "Knative":
        assert len(ports) == 1, "Knative serves one port per container"
        return {KNATIVE_USER_PORT: ports[0]["containerPort"]}
    return {p["name"]: p["containerPort"] for p in ports if p.get("name")}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def test_label_selector_matching_can_fail() -> None:
    sel = {"matchLabels": {"component": "predictor"},
           "matchExpressions": [{"key": KSERVE_POD_NAME_LABEL, "operator": "In", "values": ["a"]}]}
    assert _selects(sel, {"component": "predictor", KSERVE_POD_NAME_LABEL: "a", "x": "y"})
    assert not _selects(sel, {"component": "predictor", KSERVE_POD_NAME_LABEL: "b"})
    assert not _selects(sel, {KSERVE_POD_NAME_LABEL: "a"})
    assert not _selects({}, {"a": "b"}), "an empty selector would select every pod of the namespace"


def test_podmonitor_scrapes_every_predictor_pod_on_the_servers_metrics_port() -> None:
    (monitor,) = _of_kind("PodMonitor")
    spec = monitor["spec"]
    # No namespaceSelector: the PodMonitor looks in its own namespace, where `-n` puts the pods too.
    assert "namespaceSelector" not in spec
    (endpoint,) = spec["podMetricsEndpoints"]
    assert _route_for(endpoint["path"]) == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    for isvc in _of_kind("InferenceService"):
        name = isvc["metadata"]["name"]
        assert _selects(spec["selector"], _predictor_pod_labels(isvc)), f"{name}: pods not selected"
        ports = _predictor_pod_ports(isvc)
        assert endpoint["port"] in ports, f"{name}: the pod has no port {endpoint['port']!r}, only {ports}"
        assert ports[endpoint["port"]] == _parse(_server_args(isvc)).http_port
        # Other components of the same InferenceService (a transformer) are not the model server.
        other = {**_predictor_pod_labels(isvc), KSERVE_COMPONENT_LABEL: "transformer"}
        assert not _selects(spec["selector"], other)
    for job in _of_kind("Job"):
        assert not _selects(spec["selector"], job["spec"]["template"].get("metadata", {}).get("labels", {}))


def test_standard_mode_keeps_the_runtime_port_name_the_podmonitor_docs_name() -> None:
    # Knative accepts only these names for the user port; Standard mode keeps the name, which DEPLOY.md
    # tells the reader to put into the PodMonitor there.
    for runtime in _of_kind("ClusterServingRuntime"):
        (port,) = runtime["spec"]["containers"][0]["ports"]
        assert port.get("name") in ("http1", "h2c")
        assert f"`{port['name']}` instead of Knative's `{KNATIVE_USER_PORT}`" in _doc("docs/DEPLOY.md")
    isvc = json.loads(json.dumps(_of_kind("InferenceService")[0]))
    isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Standard"
    assert set(_predictor_pod_ports(isvc)) == {"http1"}


def test_podmonitor_and_rules_carry_the_release_label_prometheus_selects() -> None:
    releases = {d["kind"]: d["metadata"].get("labels", {}).get("release")
                for d in _of_kind("PodMonitor") + _of_kind("PrometheusRule")}
    assert set(releases) == {"PodMonitor", "PrometheusRule"}
    assert len(set(releases.values())) == 1 and None not in releases.values(), releases


def _dashboard_generator() -> dict[str, Any]:
    gens = [g for g in _kustomization(K8S).get("configMapGenerator", [])
            if any(f.split("=", 1)[-1] == "monitoring/kandinsky-dashboard.json" for f in g.get("files", []))]
    assert len(gens) == 1, "k8s/kustomization.yaml must generate the dashboard ConfigMap"
    return gens[0]


def test_dashboard_configmap_carries_the_grafana_sidecar_label() -> None:
    options = _dashboard_generator()["options"]
    # kube-prometheus-stack's sidecar: label grafana_dashboard, value "1" (a string: labels are strings).
    assert options["labels"]["grafana_dashboard"] == "1"
    assert options["disableNameSuffixHash"] is True, "re-applying must replace the dashboard, not copy it"


def test_rendered_dashboard_configmap_is_labelled_and_holds_the_dashboard() -> None:
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` cannot be checked here")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    maps = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ConfigMap"
            and d["metadata"]["name"] == _dashboard_generator()["name"]]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = maps[0]["data"]
    assert key.endswith(".json") and json.loads(maps[0]["data"][key]) == _dashboard()
    monitors = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "PodMonitor"]
    assert len(monitors) == 1 and "namespace" not in monitors[0]["metadata"]


# ------------------------------------------------------------------- the docs' commands vs the manifests

NAMESPACE = "kandinsky"  # the namespace README.md and docs/DEPLOY.md deploy into
DOCS = ("README.md", "docs/DEPLOY.md")
CLUSTER_SCOPED_KINDS = {"ClusterServingRuntime", "Namespace", "Node", "PersistentVolume", "StorageClass",
                        "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
# kubectl resource names -> kind, for the kinds the docs name.
RESOURCE_KINDS = {
    "job": "Job", "jobs": "Job", "isvc": "InferenceService", "inferenceservice": "InferenceService",
    "inferenceservices": "InferenceService", "pvc": "PersistentVolumeClaim",
    "persistentvolumeclaim": "PersistentVolumeClaim", "secret": "Secret", "serviceaccount": "ServiceAccount",
    "sa": "ServiceAccount", "configmap": "ConfigMap", "cm": "ConfigMap", "podmonitor": "PodMonitor",
    "prometheusrule": "PrometheusRule", "prometheus": "Prometheus", "service": "Service", "svc": "Service",
    "pod": "Pod", "pods": "Pod", "deployment": "Deployment",
    "node": "Node", "nodes": "Node", "namespace": "Namespace", "ns": "Namespace",
    "clusterservingruntime": "ClusterServingRuntime", "clusterservingruntimes": "ClusterServingRuntime",
}
_VALUE_FLAGS = {"-n", "--namespace", "-f", "--filename", "-k", "--kustomize", "-o", "--output", "-c",
                "--container", "-L", "-l", "--selector", "-p", "--patch", "--type", "--context"}
_STOP_TOKENS = {"|", "||", "&&", ";", ")", "&", "(", ">", "<"}


def _doc(rel: str) -> str:
    return (REPO / rel).read_text(encoding="utf-8")


def _code_snippets(text: str) -> list[str]:
    """Shell from Markdown: fenced blocks (continuation lines joined), then inline code spans."""
    fence = r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```"  # also indented, inside a list item
    snippets = [re.sub(r"\\\n\s*", " ", block) for block in re.findall(fence, text, re.S | re.M)]
    prose = re.sub(fence, "", text, flags=re.S | re.M)
    snippets += [re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", prose)]
    return snippets


def _manifest_comment_snippets(path: Path) -> list[str]:
    comments = "\n".join(m.group(1) for m in re.finditer(r"^\s*#\s?(.*)$", path.read_text(), re.M))
    return [line.strip() for line in comments.splitlines() if line.strip().startswith("kubectl ")] + [
        re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", comments)]


def _kubectl_argvs(snippet: str) -> list[list[str]]:
    """Every kubectl command in some shell, up to the end of its pipeline stage, line or comment."""
    import shlex

    out = []
    for m in re.finditer(r"(?<![\w/.-])kubectl\b", snippet):
        # A newline outside quotes ends a command (it is punctuation here, not whitespace); inside quotes
        # (a JSON patch over two lines) it does not.
        lexer = shlex.shlex(snippet[m.start():], posix=True, punctuation_chars="();<>|&\n")
        lexer.whitespace, lexer.commenters, lexer.whitespace_split = " \t\r", "", True
        argv: list[str] = []
        while (token := lexer.get_token()) is not None:
            if token in _STOP_TOKENS or set(token) <= set("();<>|&\n") or token.startswith("#"):
                break
            argv.append(token)
        out.append(argv)
    return out


def _doc_commands() -> list[tuple[str, list[str]]]:
    cmds = [(rel, argv) for rel in DOCS for s in _code_snippets(_doc(rel)) for argv in _kubectl_argvs(s)]
    for path in sorted(K8S.rglob("*.yaml")):
        rel = str(path.relative_to(REPO))
        cmds += [(rel, argv) for s in _manifest_comment_snippets(path) for argv in _kubectl_argvs(s)]
    return cmds


def _split_kubectl(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(flag -> values, positional words) of a kubectl command line."""
    flags: dict[str, list[str]] = {}
    words: list[str] = []
    it = iter(argv[1:])
    for tok in it:
        value_flags = _VALUE_FLAGS - {"-f"} if words[:1] == ["logs"] else _VALUE_FLAGS  # logs -f: follow
        if tok.startswith("-") and "=" in tok:
            key, _, value = tok.partition("=")
            flags.setdefault(key, []).append(value)
        elif tok in value_flags:
            flags.setdefault(tok, []).append(next(it, ""))
        elif tok.startswith("-"):
            flags.setdefault(tok, []).append("")
        else:
            words.append(tok)
    return flags, words


def _objects_in(rel: str, kustomize: bool) -> list[dict[str, Any]]:
    assert rel, "no file or kustomization named"
    target = (REPO / rel).resolve()
    assert target.exists(), f"{rel}: no such path in the repository"
    if not kustomize:
        return _load_yaml(target)
    docs: list[dict[str, Any]] = []
    for _, path in _walk_kustomization(target):
        docs += _load_yaml(path) if path.suffix in (".yaml", ".yml") else [{"kind": "ConfigMap"}]
    return docs


def _kubectl_problems(source: str, argv: list[str]) -> list[str]:
    flags, words = _split_kubectl(argv)
    where = f"{source}: `{' '.join(argv)}`"
    namespaces = flags.get("-n", []) + flags.get("--namespace", [])
    namespaced_ok = bool(namespaces) or "-A" in flags or "--all-namespaces" in flags
    if not words:
        return [f"{where}: no verb"] if len(argv) > 1 else []  # the bare word is a mention, not a command
    verb, rest = words[0], words[1:]
    problems: list[str] = []
    ours: list[dict[str, Any]] = []
    kinds: set[str] = set()
    if verb in ("apply", "create", "delete", "replace") and (flags.keys() & {"-f", "-k", "--filename",
                                                                               "--kustomize"}):
        for flag in ("-f", "--filename", "-k", "--kustomize"):
            for rel in flags.get(flag, []):
                objs = _objects_in(rel, flag in ("-k", "--kustomize"))
                ours += objs
                kinds |= {d.get("kind", "") for d in objs}
    elif verb in ("apply", "replace"):
        return [f"{where}: applies nothing (name the file or kustomization)"]
    elif verb == "create" and rest and RESOURCE_KINDS.get(rest[0]) == "Namespace":
        if rest[1:] != [NAMESPACE]:
            problems.append(f"{where}: the guide's namespace is {NAMESPACE!r}")
        return problems
    elif verb in ("get", "describe", "logs", "delete", "wait", "edit", "rollout", "patch", "port-forward"):
        refs = rest[1:] if verb == "rollout" else rest
        if refs and "/" in refs[0]:
            kind_word, _, name = refs[0].partition("/")
        else:
            kind_word, name = (refs[0] if refs else ""), (refs[1] if len(refs) > 1 else "")
        kind = RESOURCE_KINDS.get(kind_word.lower(), "Pod" if verb == "logs" and not name else "")
        if verb == "logs" and "/" not in (refs[0] if refs else "/"):
            kind, name = "Pod", kind_word
        assert kind, f"{where}: unknown resource {kind_word!r}; add it to RESOURCE_KINDS"
        kinds.add(kind)
        defined = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
        ours += defined
        if verb == "logs" and kind == "Job":
            if not defined:
                problems.append(f"{where}: no Job {name!r} in k8s/")
            else:
                pod = defined[0]["spec"]["template"]["spec"]
                names = [c["name"] for c in pod.get("initContainers", []) + pod["containers"]]
                container = (flags.get("-c") or flags.get("--container") or [""])[0]
                if len(names) > 1 and container not in names:
                    problems.append(f"{where}: the Job's pod has containers {names}: name one with -c")
        elif kind in ("InferenceService", "Job") and name and not defined:
            problems.append(f"{where}: no {kind} {name!r} in k8s/")
    else:
        return []
    if kinds - CLUSTER_SCOPED_KINDS and not namespaced_ok:
        problems.append(f"{where}: namespaced objects ({sorted(kinds - CLUSTER_SCOPED_KINDS)}) need -n")
    if ours and any(d.get("kind") not in CLUSTER_SCOPED_KINDS for d in ours) and namespaces != [NAMESPACE]:
        problems.append(f"{where}: our objects live in -n {NAMESPACE}")
    return problems


def test_docs_kubectl_commands_name_the_namespace_paths_and_containers_of_the_manifests() -> None:
    commands = _doc_commands()
    sources = {src for src, _ in commands}
    assert set(DOCS) <= sources and "k8s/jobs/kustomization.yaml" in sources
    problems = [p for src, argv in commands for p in _kubectl_problems(src, argv)]
    assert not problems, "\n".join(problems)
    # Both guides apply the PVC, the weights Job and the service; the Job's log is followed by container.
    for rel in DOCS:
        text = " ".join(" ".join(argv) for src, argv in commands if src == rel)
        for needed in ("apply -f k8s/storage/weights-pvc.yaml", "apply -k k8s/jobs/", "apply -k k8s/",
                       "logs -f job/kandinsky-weights-download -c download"):
            assert needed in text, f"{rel}: no `kubectl {needed} ...`"


def test_the_docs_create_the_namespace_before_they_use_it() -> None:
    for rel in (*DOCS, "k8s/jobs/kustomization.yaml"):
        ordered = [argv for src, argv in _doc_commands() if src == rel]
        created = [i for i, argv in enumerate(ordered) if argv[1:4] == ["create", "namespace", NAMESPACE]]
        used = [i for i, argv in enumerate(ordered)
                if NAMESPACE in _split_kubectl(argv)[0].get("-n", []) and argv[1] in ("apply", "create")]
        assert created and used and created[0] < used[0], f"{rel}: create the namespace before applying"


def test_the_command_check_catches_what_the_old_readme_did() -> None:
    old = _kubectl_argvs("kubectl apply -f k8s/storage/weights-pvc.yaml && kubectl apply -k k8s/jobs/")
    assert [bool(_kubectl_problems("old", argv)) for argv in old] == [True, True]
    (logs,) = _kubectl_argvs("kubectl logs -f job/kandinsky-weights-download -n kandinsky   # progress")
    assert "name one with -c" in "\n".join(_kubectl_problems("old", logs))
    (wrong_ns,) = _kubectl_argvs("kubectl apply -k k8s/ -n default")
    assert _kubectl_problems("old", wrong_ns)
    (missing,) = _kubectl_argvs("kubectl apply -f k8s/storage/pvc.yaml -n kandinsky")
    with pytest.raises(AssertionError, match="no such path"):
        _kubectl_problems("old", missing)
    (cluster,) = _kubectl_argvs("kubectl get nodes -L nvidia.com/gpu.product")
    assert not _kubectl_problems("ok", cluster)


def test_every_k8s_path_the_docs_name_exists() -> None:
    for rel in DOCS:
        for path in re.findall(r"\b(k8s/[\w./-]*[\w/])", _doc(rel)):
            assert (REPO / path).exists(), f"{rel} names {path}, which does not exist"


def test_deploy_guide_sets_front_timeouts_to_the_request_deadline() -> None:
    deadline = int(_server_parser().get_default("request_timeout"))
    text = re.sub(r"\s+", " ", _doc("docs/DEPLOY.md"))
    para = next((p for p in text.split("**Timeouts in front of the service.**")[1:]), "")
    assert "load balancer" in para and "ingress" in para, "DEPLOY.md must cover timeouts in front"
    assert f"{deadline} s" in para and "job API" in para
    readme = re.sub(r"\s+", " ", _doc("README.md"))
    assert f"at least the {deadline} s request deadline" in readme
    for isvc in _of_kind("InferenceService"):
        assert f"`timeout: {isvc['spec']['predictor']['timeout']}`" in para
