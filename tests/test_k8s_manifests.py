"""Static checks of the deployment: k8s/ manifests against KServe's, prometheus-operator's and KEDA's real
CRD schemas (native objects against the Kubernetes API types), against the real server (its argument
parser, its HTTP routes, its metric names, its Redis queue) and against the Dockerfile.

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
# Images we do not build, pinned by their own tag (ours carry app.__version__).
THIRD_PARTY_IMAGES = {"redis": "7.4"}

NATIVE_KINDS = {
    ("v1", "ServiceAccount"),
    ("v1", "Secret"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "StatefulSet"),
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
# KEDA's CRDs (the many-replicas layout scales its GPU workers with them), in the same shared folder.
KEDA_CRD_FILES = {
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
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


def _image_entries(root: Path) -> dict[str, dict[str, Any]]:
    """The `images:` entries of a root kustomization and of the kustomizations it includes, by name."""
    dirs = {root.resolve()} | {d.resolve() for d, _ in _walk_kustomization(root)}
    return {i["name"]: i for d in sorted(dirs) for i in _kustomization(d).get("images", [])}


def _image_tag(name: str) -> str:
    return THIRD_PARTY_IMAGES.get(name, app_pkg.__version__)


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
        registry = {f"{i['newName']}:{_image_tag(name)}" for name, i in _image_entries(root).items()}
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
    files = {**CRD_FILES, **MONITORING_CRD_FILES, **KEDA_CRD_FILES}
    crd = _load_yaml(shared / "k8s" / "crds" / files[kind])[0]
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
        if doc.get("kind") not in CRD_FILES.keys() | KEDA_CRD_FILES.keys():
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


# The many-replicas layout (k8s/replicas/): every replica serves this model name, so they all use the Redis
# keys kandinsky:<model name>:* (the queue stream among them) and the route /v1/models/<model name>.
REPLICAS_MODEL_NAME = "kandinsky"


def _gpus(isvc: dict[str, Any]) -> int:
    resources = isvc["spec"]["predictor"]["model"]["resources"]
    return int(resources.get("limits", {}).get(GPU, 0)) + int(resources.get("requests", {}).get(GPU, 0))


@pytest.mark.parametrize("name", _isvc_ids())
def test_container_args_parse_with_the_real_server_parser(name: str) -> None:
    isvc = _isvc(name)
    args = _parse(_server_args(isvc))
    if args.redis_url:  # one of many replicas: the shared model name, whatever the InferenceService's
        assert args.model_name == REPLICAS_MODEL_NAME
    else:
        assert args.model_name == name  # the route is /v1/models/<InferenceService name>
    assert args.model_dir == KSERVE_MODEL_DIR
    assert args.workers == 1
    if args.role == "api":  # loads no weights: no GPU, and --device says so
        assert args.device == "cpu" and _gpus(isvc) == 0
        return
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
    if args.redis_url and args.role == "worker":
        # Only the v2 readiness also asks Redis: a worker that cannot reach it shows not ready (it gets no
        # traffic, so that only reports it).
        assert ready["path"] == "/v2/health/ready"
        assert _route_for(ready["path"]) == "/v2/health/ready"
    else:
        # The api replicas share the one Redis: they stay in rotation while it is down and answer 503 with
        # Retry-After themselves (out of rotation, Knative's activator would hold the requests instead).
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
    ann = isvc["metadata"]["annotations"]
    model = pred["model"]
    startup = model["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    if args.role != "api" and pred["model"]["storageUri"].rstrip("/").endswith("/kandinsky"):
        assert budget >= 30 * 60, "a 23 GB load needs a 30 min start-up budget"
    if ann[DEPLOYMENT_MODE] == "Standard":
        # A worker scaled by KEDA (see test_scaledobjects_scale_each_worker_deployment_on_the_queue):
        # KServe must leave the replica count alone. After SIGTERM the worker lets running work finish for
        # --drain_timeout (0: the request deadline), then hands the rest back: the kubelet's SIGKILL must
        # come later, and the drain must cover a generation started just before (up to the deadline).
        assert args.role == "worker", "only workers get no client traffic and so no Knative"
        assert ann[AUTOSCALER_CLASS] == "external"
        drain = args.drain_timeout or args.request_timeout
        assert drain >= args.request_timeout, "a drain shorter than the deadline reruns running work"
        assert pred["terminationGracePeriodSeconds"] >= drain + 60, "no time left to hand work back"
        assert not {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"} & pred.keys(), (
            "the ScaledObject sets the replicas; KServe ignores these with autoscalerClass external")
        return
    assert ann[DEPLOYMENT_MODE] == "Knative"
    # The server's deadline answers first (a JSON 504); the pod's grace period (Knative: the revision
    # timeout) covers the server's drain of request_timeout + 5 s after SIGTERM.
    assert pred["timeout"] >= args.request_timeout + 5
    # Knative never hands a pod more requests than its queue holds, so the server never answers 503 "full".
    assert 1 <= pred["containerConcurrency"] <= args.queue_size
    assert pred["minReplicas"] >= 1, "a multi-GB model must not scale to zero"
    assert pred["maxReplicas"] >= pred["minReplicas"]
    assert pred["scaleMetric"] == "concurrency" and 1 <= pred["scaleTarget"] <= pred["containerConcurrency"]
    deadline = _duration_s(ann["serving.knative.dev/progress-deadline"])
    assert deadline >= budget, "Knative would give up on the revision before the startupProbe does"
    assert _duration_s(ann["autoscaling.knative.dev/window"]) >= 60


@pytest.mark.parametrize("name", _isvc_ids())
def test_memory_gpu_and_shared_memory_sizing(name: str) -> None:
    isvc = _isvc(name)
    pred = isvc["spec"]["predictor"]
    res = pred["model"]["resources"]
    if _parse(_server_args(isvc)).role == "api":  # no weights, no GPU, no GPU node
        assert _gpus(isvc) == 0 and _selected_gpu(isvc) is None and "tolerations" not in pred
        assert res["requests"]["memory"] == res["limits"]["memory"]
        return
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
    if gpu is None and _parse(_server_args(isvc)).role == "api":
        assert _gpus(isvc) == 0, f"{name}: requests a GPU without selecting a GPU node"
        return
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
    allowed |= {f"{name}:{tag}" for name, tag in THIRD_PARTY_IMAGES.items()}
    for owner, image in refs:
        assert image in allowed, f"{owner}: {image} is not one of {sorted(allowed)}"
    for root in _roots():
        used = {image.rpartition(":")[0] for _, path in _walk_kustomization(root) if path.suffix == ".yaml"
                for doc in _load_yaml(path) for image in _container_images(doc)}
        images = _image_entries(root)
        missing = used - set(images)
        assert used and not missing, f"{root}/kustomization.yaml: no images: entry for {sorted(missing)}"
        for name in used:
            tag = images[name]["newTag"]
            assert tag == _image_tag(name), f"{root}: {name} tag {tag}, expected {_image_tag(name)}"


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
    problems: list[str] = []
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


def _example_pod_names(isvc: dict[str, Any]) -> list[str]:
    """Names the predictor's pods get: Knative's revision Deployment, or Standard mode's Deployment."""
    name = isvc["metadata"]["name"]
    return [f"{name}-predictor-00001-deployment-6d8f9c7b5-x2x7q", f"{name}-predictor-7c9d8f6b4-qr5tz"]


def test_pod_alerts_cover_every_predictor_and_the_stuck_queue_alert_only_generating_ones() -> None:
    rules = {r["alert"]: r["expr"] for rule in _of_kind("PrometheusRule") for g in rule["spec"]["groups"]
             for r in g["rules"]}
    for alert in ("KandinskyPodNotReady", "KandinskyMetricsDown"):
        (pattern,) = re.findall(r'pod=~"([^"]+)"', rules[alert])
        for isvc in _of_kind("InferenceService"):  # PromQL regexes are anchored: fullmatch
            assert all(re.fullmatch(pattern, p) for p in _example_pod_names(isvc)), (alert, isvc["metadata"])
        assert not re.fullmatch(pattern, "kandinsky-redis-0")
    # An api replica reports the shared queue's depth but never samples an image: it must not count as stuck.
    excluded = re.findall(r'pod!~"([^"]+)"', rules["KandinskyQueueStuck"])
    for isvc in _of_kind("InferenceService"):
        is_api = _parse(_server_args(isvc)).role == "api"
        for pod in _example_pod_names(isvc):
            assert any(re.fullmatch(p, pod) for p in excluded) == is_api, (pod, excluded)


def test_redis_alert_fires_only_when_no_replica_reaches_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = {r["alert"]: r for rule in _of_kind("PrometheusRule") for g in rule["spec"]["groups"]
             for r in g["rules"]}
    rule = rules["KandinskyRedisUnreachable"]
    expr = re.sub(r"\s+", " ", rule["expr"])
    # Errors, and not one successful round trip: a slow or flaky Redis is not "unreachable".
    assert 'kandinsky_redis_seconds_count{outcome="error"}' in expr
    ok = 'unless on (namespace) sum by (namespace) (rate(kandinsky_redis_seconds_count{outcome="ok"}'
    assert ok in expr
    assert rule["labels"]["severity"] == "critical" and _duration_s(rule["for"]) >= 60
    # The outcomes the alert names are the ones the server records (into a private copy of the metric).
    from prometheus_client import CollectorRegistry, Histogram

    from app.serving.observability import metrics

    private = Histogram(metrics.REDIS_SECONDS._name, "copy", ["outcome"], registry=CollectorRegistry())
    monkeypatch.setattr(metrics, "REDIS_SECONDS", private)
    metrics.PrometheusObserver().redis_call(0.001, ok=False)
    metrics.PrometheusObserver().redis_call(0.001, ok=True)
    outcomes = {s.labels["outcome"] for m in private.collect() for s in m.samples if "outcome" in s.labels}
    assert set(re.findall(r'outcome="(\w+)"', expr)) == outcomes == {"ok", "error"}


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


def test_podmonitors_scrape_every_predictor_pod_once_on_the_servers_metrics_port() -> None:
    monitors = _of_kind("PodMonitor")
    for monitor in monitors:
        # No namespaceSelector: the PodMonitor looks in its own namespace, where `-n` puts the pods too.
        assert "namespaceSelector" not in monitor["spec"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert _route_for(endpoint["path"]) == "/metrics"
            assert endpoint.get("scheme", "http") == "http"
    for isvc in _of_kind("InferenceService"):
        name = isvc["metadata"]["name"]
        labels, ports = _predictor_pod_labels(isvc), _predictor_pod_ports(isvc)
        # A target per (monitor, endpoint) whose selector takes the pod and whose port name the pod has.
        targets = [(m["metadata"]["name"], e["port"]) for m in monitors
                   if _selects(m["spec"]["selector"], labels)
                   for e in m["spec"]["podMetricsEndpoints"] if e["port"] in ports]
        assert len(targets) == 1, f"{name} (pod ports {ports}) is scraped by {targets}, not exactly once"
        assert ports[targets[0][1]] == _parse(_server_args(isvc)).http_port
        # Other components of the same InferenceService (a transformer) are not the model server.
        other = {**labels, KSERVE_COMPONENT_LABEL: "transformer"}
        assert not any(_selects(m["spec"]["selector"], other) for m in monitors)
    for job in _of_kind("Job"):
        job_labels = job["spec"]["template"].get("metadata", {}).get("labels", {})
        assert not any(_selects(m["spec"]["selector"], job_labels) for m in monitors)


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
    releases = {(d["kind"], d["metadata"]["name"]): d["metadata"].get("labels", {}).get("release")
                for d in _of_kind("PodMonitor") + _of_kind("PrometheusRule")}
    assert {kind for kind, _ in releases} == {"PodMonitor", "PrometheusRule"}
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


# ------------------------------------------------ many replicas: Redis, the split InferenceServices, KEDA

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
AUTOSCALER_CLASS = "serving.kserve.io/autoscalerClass"
# KServe names a predictor's Deployment (Standard mode) <InferenceService name>-predictor:
# constants.PredictorServiceName in kserve/kserve pkg/constants/constants.go, used by
# pkg/controller/v1beta1/inferenceservice/components/predictor.go for the Deployment's metadata.name.
KSERVE_PREDICTOR_SUFFIX = "-predictor"
# The flags the many-replicas manifests pass (README "Server flags"); a missing one fails with its name.
REPLICA_FLAGS = ("--redis_url", "--redis_password_file", "--role", "--replica_name", "--job_lease",
                 "--max_deliveries", "--drain_timeout")
PASSWORD_ENV = "REDIS_PASSWORD"  # the server reads the password from here (app/serving/queue/redis_conn.py)
SECRET_PLACEHOLDER = "REPLACE_ME"


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name!r} in k8s/"
    return found[0]


def _redis_statefulset() -> dict[str, Any]:
    (sts,) = [d for d in _of_kind("StatefulSet") if "redis" in d["metadata"]["name"]]
    return sts


def _redis_container() -> dict[str, Any]:
    (container,) = _redis_statefulset()["spec"]["template"]["spec"]["containers"]
    return container


def _redis_conf() -> dict[str, list[str]]:
    """The redis.conf the Redis StatefulSet mounts (a configMapGenerator file): directive -> arguments."""
    volumes = {v["name"]: v for v in _redis_statefulset()["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in _redis_container()["volumeMounts"] if "configMap" in volumes.get(m["name"], {})]
    conf_arg = next(a for a in _redis_container()["args"] if a.endswith(".conf"))
    assert conf_arg.startswith(mount["mountPath"] + "/"), f"{conf_arg} is not in the ConfigMap's mount"
    map_name = volumes[mount["name"]]["configMap"]["name"]
    files = [(d, f) for root in _roots() for d, f in _walk_kustomization(root)
             if f.name == Path(conf_arg).name
             and any(g["name"] == map_name for g in _kustomization(d).get("configMapGenerator", []))]
    assert len(files) == 1, f"no configMapGenerator {map_name} with {Path(conf_arg).name}"
    conf: dict[str, list[str]] = {}
    for line in files[0][1].read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, *rest = shlex.split(line)
            conf[word.lower()] = rest
    return conf


def _env_secret(container: dict[str, Any], env: str) -> tuple[str, str] | None:
    """(Secret name, key) an env var of a container comes from, or None."""
    for e in container.get("env", []):
        if e["name"] == env:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            return (ref["name"], ref["key"]) if ref else None
    return None


def _redis_secret_ref() -> tuple[str, str]:
    """The Secret and key Redis takes its --requirepass from."""
    container = _redis_container()
    args = container["args"]
    assert "--requirepass" in args, "Redis runs without a password"
    value = args[args.index("--requirepass") + 1]
    m = re.fullmatch(r"\$\((\w+)\)", value)
    assert m, f"--requirepass {value!r}: not an env var reference (a literal password in the pod spec)"
    ref = _env_secret(container, m.group(1))
    assert ref, f"{m.group(1)} does not come from a Secret"
    return ref


def _redis_service() -> dict[str, Any]:
    (svc,) = [s for s in _of_kind("Service") if "redis" in s["metadata"]["name"]
              and s["spec"].get("clusterIP") != "None"]
    return svc


def _replicas() -> list[dict[str, Any]]:
    """The InferenceServices that share work through Redis (--redis_url)."""
    return [i for i in _of_kind("InferenceService") if _parse(_server_args(i)).redis_url]


def _comments_of(doc: dict[str, Any]) -> str:
    """The comments of the file that defines an object, joined."""
    (path,) = {p for p, d in _objects() if d is doc}
    return " ".join(m.group(1) for m in re.finditer(r"^\s*#\s?(.*)$", path.read_text(encoding="utf-8"), re.M))


def _scaledobjects_for(isvc: dict[str, Any]) -> list[dict[str, Any]]:
    deployment = isvc["metadata"]["name"] + KSERVE_PREDICTOR_SUFFIX
    return [so for so in _of_kind("ScaledObject") if so["spec"]["scaleTargetRef"]["name"] == deployment]


def test_every_keda_object_validates_against_the_keda_crd_schema() -> None:
    docs = [(p, d) for p, d in _objects() if d.get("kind") in KEDA_CRD_FILES]
    assert {d["kind"] for _, d in docs} == set(KEDA_CRD_FILES)
    problems = [f"{p.relative_to(REPO)} {d['metadata']['name']}: {e}" for p, d in docs
                for e in _schema_errors(d)]
    assert not problems, "\n".join(problems)


def test_strict_keda_schema_rejects_a_misspelled_field_and_a_number_as_metadata() -> None:
    doc = json.loads(json.dumps(_of_kind("ScaledObject")[0]))
    doc["spec"]["minReplicas"] = 1  # the field is minReplicaCount
    doc["spec"]["triggers"][0]["metadata"]["streamLength"] = 8  # trigger metadata are strings
    doc["spec"]["cooldownPeriod"] = "30m"
    errors = "\n".join(_schema_errors(doc))
    assert "minReplicas" in errors and "8 is not of type 'string'" in errors
    assert "'30m' is not of type" in errors


def _api_type_problems(value: Any, type_name: str, path: str) -> list[str]:
    """Unknown fields and wrong JSON types in a native object, by the Kubernetes Python client's models
    (generated from the API's OpenAPI types): what `kubectl apply --validate=strict` rejects."""
    from kubernetes import client

    # The client's type names: List[X] and Dict[str, X] (list[X] and dict(str, X) in older releases).
    listed = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    if listed:
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        item = listed.group(1)
        return [p for i, v in enumerate(value) for p in _api_type_problems(v, item, f"{path}[{i}]")]
    mapped = re.fullmatch(r"Dict\[str, (.+)\]|dict\(str, (.+)\)", type_name)
    if mapped:
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a map"]
        inner = mapped.group(1) or mapped.group(2)
        return [p for k, v in value.items() for p in _api_type_problems(v, inner, f"{path}.{k}")]
    scalars: dict[str, Any] = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
                               "datetime": str, "bytes": str}
    if type_name in scalars:
        ok = isinstance(value, scalars[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: {value!r} is not {type_name}"]
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: {value!r} is not a {type_name}"]
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = [f"{path}.{k}: no such field in {type_name}" for k in value if k not in fields]
    return problems + [p for k, v in value.items() if k in fields
                       for p in _api_type_problems(v, model.openapi_types[fields[k]], f"{path}.{k}")]


def _native_problems(doc: dict[str, Any]) -> list[str]:
    group_version = doc["apiVersion"].rpartition("/")[2]  # v1, apps/v1, batch/v1: the V1 models
    return _api_type_problems(doc, f"{group_version.capitalize()}{doc['kind']}", doc["kind"])


def test_every_native_object_has_only_fields_of_its_kubernetes_type() -> None:
    pytest.importorskip("kubernetes")  # KServe's SDK depends on it
    docs = [(p, d) for p, d in _objects() if (d.get("apiVersion"), d.get("kind")) in NATIVE_KINDS
            and d["apiVersion"] in ("v1", "apps/v1", "batch/v1")]
    assert {"StatefulSet", "Service", "Secret", "Job"} <= {d["kind"] for _, d in docs}
    problems = [f"{p.relative_to(REPO)}: {e}" for p, d in docs for e in _native_problems(d)]
    assert not problems, "\n".join(problems)


def test_the_native_type_check_rejects_a_misspelled_field_and_a_wrong_type() -> None:
    pytest.importorskip("kubernetes")
    sts = json.loads(json.dumps(_redis_statefulset()))
    sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    sts["spec"]["replicas"] = "1"
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["accesModes"] = ["ReadWriteOnce"]
    errors = "\n".join(_native_problems(sts))
    assert "imagePullPolcy: no such field in V1Container" in errors
    assert "spec.replicas: '1' is not int" in errors and "accesModes" in errors


def test_redis_keeps_the_queue_on_its_claim_and_never_evicts() -> None:
    conf = _redis_conf()
    # Every write in the append-only file, fsynced once a second: a restart replays the queue.
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["everysec"]
    # Never drop a queue entry, a lease or a result to make room: refuse writes at the bound instead.
    assert conf["maxmemory-policy"] == ["noeviction"]
    (maxmemory,) = conf["maxmemory"]
    maxmemory_bytes = _quantity(maxmemory.replace("gb", "Gi").replace("mb", "Mi"))
    container = _redis_container()
    limit = _quantity(container["resources"]["limits"]["memory"])
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    assert 0 < maxmemory_bytes <= 0.75 * limit, "an AOF rewrite forks: keep maxmemory <= 3/4 of the limit"
    # The AOF's directory is the claim of the volumeClaimTemplates, not the container's own filesystem.
    sts = _redis_statefulset()
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (data_dir,) = conf["dir"]
    assert mounts.get(data_dir) in claims, f"dir {data_dir} is not on a claim ({mounts})"
    claim = claims[mounts[data_dir]]["spec"]
    # Between rewrites the AOF grows to twice its base, and a rewrite writes a new base beside it.
    assert _quantity(claim["resources"]["requests"]["storage"]) >= 3 * maxmemory_bytes
    assert sts["spec"]["replicas"] == 1, "one Redis: the replicas share its single queue"
    # The port Redis listens on is the one the Services and the probes reach.
    (port,) = container["ports"]
    assert conf["port"] == [str(port["containerPort"])]
    for svc in [s for s in _of_kind("Service") if "redis" in s["metadata"]["name"]]:
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert _selects({"matchLabels": svc["spec"]["selector"]}, pod_labels), svc["metadata"]["name"]
        assert [p["targetPort"] for p in svc["spec"]["ports"]] in ([port["name"]], [port["containerPort"]])
    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service is headless"
    # Not root, no privilege escalation, nothing writable but the claim.
    pod_sc, sc = sts["spec"]["template"]["spec"]["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["fsGroup"] == pod_sc["runAsUser"], "the claim must be writable to Redis' user"
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # The probes ask Redis itself, authenticated, and ready means PONG (not LOADING the AOF).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "redis-cli ping" in " ".join(container[probe]["exec"]["command"]), probe
    assert "grep -qx PONG" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert _env_secret(container, "REDISCLI_AUTH") == _redis_secret_ref()


def test_redis_conf_starts_a_real_redis_with_those_settings(tmp_path: Path) -> None:
    import shutil
    import socket
    import subprocess
    import time

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from tests.support import free_port

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian's redis-server package)")
    conf_file = tmp_path / "redis.conf"
    port = free_port()
    # The manifest's file, with only where it listens and writes moved to this machine.
    conf = {**_redis_conf(), "port": [str(port)], "bind": ["127.0.0.1"], "dir": [str(tmp_path)]}
    conf_file.write_text("".join(" ".join(shlex.quote(a) for a in [k, *v]) + "\n" for k, v in conf.items()))
    proc = subprocess.Popen(["redis-server", str(conf_file), "--requirepass", "test-only"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:  # a plain connect: redis-py's retries would back off for seconds
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, f"redis-server rejected the config: {proc.communicate()[1]!r}"
            assert time.monotonic() < deadline, "redis-server did not listen within 20 s"
            time.sleep(0.05)
        client = redis.Redis(port=port, password="test-only", socket_timeout=2)
        client.ping()
        keys = ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")
        got: dict[str, Any] = {k: client.config_get(k)[k] for k in keys}
        assert got["appendonly"] == "yes" and got["appendfsync"] == "everysec"
        assert got["maxmemory-policy"] == "noeviction" and int(got["maxmemory"]) >= 2**30
        with pytest.raises(redis.AuthenticationError):  # no password: refused (no retries: they back off)
            redis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0)).set("k", "v")
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_replica_flags_exist_in_the_server() -> None:
    # Fails naming each flag the manifests need that `python -m app` does not (yet) take.
    known = {opt for action in _server_parser()._actions for opt in action.option_strings}
    missing = [flag for flag in REPLICA_FLAGS if flag not in known]
    assert not missing, f"python -m app has no {missing}"


def test_replicas_share_one_queue_on_the_redis_service_with_the_password_from_its_secret() -> None:
    replicas = _replicas()
    roles = sorted(_parse(_server_args(i)).role for i in replicas)
    assert roles.count("api") == 1 and roles.count("worker") >= 1 and set(roles) == {"api", "worker"}, roles
    secret_ref = _redis_secret_ref()
    secret = _one("Secret", secret_ref[0])
    assert secret["stringData"][secret_ref[1]] == SECRET_PLACEHOLDER, "commit a placeholder, not the password"
    svc = _redis_service()
    (svc_port,) = [p["port"] for p in svc["spec"]["ports"]]
    shared = {"model_name", "redis_url", "request_timeout", "max_images_per_request", "queue_size"}
    seen: dict[str, set[Any]] = {k: set() for k in shared}
    for isvc in replicas:
        name, args = isvc["metadata"]["name"], _parse(_server_args(isvc))
        for key in shared:
            seen[key].add(getattr(args, key))
        from urllib.parse import urlsplit

        url = urlsplit(args.redis_url)
        assert url.scheme in ("redis", "rediss") and url.hostname == svc["metadata"]["name"], args.redis_url
        assert url.port == svc_port and url.path.strip("/").isdigit()
        assert url.password is None and not args.redis_password_file, f"{name}: the password is env only"
        model = isvc["spec"]["predictor"]["model"]
        assert _env_secret(model, PASSWORD_ENV) == secret_ref, f"{name}: {PASSWORD_ENV} not from the Secret"
        all_args = _server_args(isvc)
        assert not [a for a in all_args if SECRET_PLACEHOLDER in a or "password" in a.lower()], all_args
        if args.role == "worker":
            # The consumer's name in Redis is the pod's (downward API), expanded by the kubelet.
            assert args.replica_name == "$(POD_NAME)"
            (pod_name,) = [e for e in model["env"] if e["name"] == "POD_NAME"]
            assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            assert args.job_lease > 0 and args.max_deliveries >= 1 and _gpus(isvc) > 0
        else:
            assert _gpus(isvc) == 0
    assert all(len(v) == 1 for v in seen.values()), f"the replicas disagree: {seen}"
    assert seen["model_name"] == {REPLICAS_MODEL_NAME}
    # The single-replica InferenceServices stay in-process: no Redis, role all.
    for isvc in _of_kind("InferenceService"):
        if isvc not in replicas:
            assert _parse(_server_args(isvc)).role == "all"
    # No Redis password anywhere else either: not in any container's args, not in a ScaledObject.
    for _, doc in _objects():
        if doc.get("kind") != "Secret":
            assert SECRET_PLACEHOLDER not in json.dumps(doc), f"{doc['kind']} {doc['metadata']['name']}"


def _queue_stream(model_name: str) -> str:
    """The stream the server puts requests on, from the server's own queue class."""
    from app.serving.queue.redis_conn import resolve
    from app.serving.queue.redis_queue import RedisQueue

    return str(RedisQueue(resolve("redis://unused:6379/0", environ={}), model_name).stream)


def test_scaledobjects_scale_each_worker_deployment_on_the_queue() -> None:
    svc = _redis_service()
    (svc_port,) = [p["port"] for p in svc["spec"]["ports"]]
    workers = [i for i in _replicas() if _parse(_server_args(i)).role == "worker"]
    assert workers
    targeted = set()
    for isvc in workers:
        name, args = isvc["metadata"]["name"], _parse(_server_args(isvc))
        ann = isvc["metadata"]["annotations"]
        # KServe makes a plain Deployment <name>-predictor and, with the external class, no HPA of its own
        # and leaves its replica count to the ScaledObject.
        assert ann[DEPLOYMENT_MODE] == "Standard" and ann[AUTOSCALER_CLASS] == "external"
        (so,) = _scaledobjects_for(isvc)
        ref = so["spec"]["scaleTargetRef"]
        assert (ref.get("apiVersion"), ref.get("kind")) == ("apps/v1", "Deployment")
        targeted.add(ref["name"])
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == _queue_stream(args.model_name) == "kandinsky:kandinsky:queue"
        # streamLength (XLEN: queued + running) is KEDA's metric only without a consumerGroup.
        assert "consumerGroup" not in meta and int(meta["streamLength"]) >= 1
        from urllib.parse import urlsplit

        url = urlsplit(args.redis_url)
        # KEDA's operator lives in another namespace: the Service's name needs the namespace.
        assert meta["address"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc:{svc_port}"
        assert int(meta.get("databaseIndex", "0")) == int(url.path.strip("/") or 0)
        assert meta.get("enableTLS", "false") == ("true" if url.scheme == "rediss" else "false")
        assert not {"password", "passwordFromEnv"} & meta.keys()
        auth = _one("TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
            ("password", *_redis_secret_ref())}
        spec = so["spec"]
        # A worker may take its whole start-up budget (10-30 min) to start, longer than a request may wait
        # in the queue: with no worker the first request would expire. Keep one warm.
        startup = isvc["spec"]["predictor"]["model"]["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] > args.request_timeout
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], f"{name}: keep one worker warm"
        comments = _comments_of(so)
        assert "minReplicaCount" in comments and "start" in comments, f"{name}: say why minReplicaCount"
        # No worker goes while a generation may still run: longer than the deadline, to zero or by the HPA.
        assert spec["cooldownPeriod"] > args.request_timeout
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] > args.request_timeout
    assert targeted == {i["metadata"]["name"] + KSERVE_PREDICTOR_SUFFIX for i in workers}
    assert len(_of_kind("ScaledObject")) == len(workers), "a ScaledObject for something else"


async def test_the_stream_length_keda_reads_is_the_unfinished_requests(tmp_path: Path) -> None:
    """XLEN of the queue stream counts exactly the requests queued or running: the server deletes an
    entry when its request finishes (in any order) or when a queued one is cancelled."""
    import asyncio
    import time

    from app.engine.jobs import Job
    from app.engine.params import GenerationParams
    from app.serving.core.types import ImageRequest, InstanceResult, RequestResult
    from app.serving.queue.base import Work
    from app.serving.queue.redis_conn import resolve
    from app.serving.queue.redis_queue import RedisQueue
    from tests.support import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    target = resolve(server.url, environ={})
    api = RedisQueue(target, REPLICAS_MODEL_NAME, consumer="api")
    worker = RedisQueue(target, REPLICAS_MODEL_NAME, consumer="w")
    try:
        stream = _one("ScaledObject", "kandinsky-worker")["spec"]["triggers"][0]["metadata"]["stream"]
        xlen = target.client().xlen

        def work(seed: int) -> Work:
            params = GenerationParams(seed=seed, images_to_gen=1, images_to_cherry_pick=1, super_res=False)
            now = time.monotonic()
            return Work(ImageRequest((Job("кот", params),), 60.0, "v1"), enqueued=now, deadline=now + 60)

        def done(seed: int) -> RequestResult:
            return RequestResult([InstanceResult(images=["x"], format="jpeg", clip_scores=[0.5], ppl=[3.0],
                                                 seed=seed, timings={})], queue_seconds=0.0)

        works = [work(i) for i in range(4)]
        for w in works:
            await api.put(w)
        assert xlen(stream) == 4  # queued
        first, second = await asyncio.to_thread(worker.take, 2, wait=1.0)
        assert xlen(stream) == 4  # 2 running + 2 queued
        worker.finish(second, done(1))  # the later one finishes first
        assert xlen(stream) == 3
        # Why not KEDA's lagCount: Redis cannot count the entries not yet taken any more (2 are), and
        # answers null, which KEDA reads as -1, no demand.
        (group,) = target.client().xinfo_groups(stream)
        assert group["pending"] == 1 and group["lag"] is None, group
        api.cancel(works[3])  # a queued one
        for _ in range(100):
            if xlen(stream) == 2:
                break
            await asyncio.sleep(0.02)
        assert xlen(stream) == 2
        worker.finish(first, done(0))
        (third,) = await asyncio.to_thread(worker.take, 1, wait=1.0)
        worker.finish(third, done(2))
        assert xlen(stream) == 0  # nothing left: KEDA sees no demand
    finally:
        await api.aclose()  # its event reader first: it would retry a stopped Redis forever
        server.stop()


def test_deploy_guide_many_replicas_section_matches_the_manifests() -> None:
    text = _doc("docs/DEPLOY.md")
    section = text.split("## 6a. ", 1)[1].split("\n## ", 1)[0]
    flat = re.sub(r"\s+", " ", section)
    # Every file of the layout is described.
    for path in sorted({p for root in _roots() for _, p in _walk_kustomization(root)
                        if K8S / "replicas" in p.parents or K8S / "redis" in p.parents}):
        assert f"`{path.relative_to(REPO)}`" in section, f"6a does not describe {path.relative_to(REPO)}"
    # The numbers it states are the manifests'.
    worker = _isvc("kandinsky-worker")
    args = _parse(_server_args(worker))
    so = _one("ScaledObject", "kandinsky-worker")["spec"]
    meta = so["triggers"][0]["metadata"]
    conf = _redis_conf()
    grace = worker["spec"]["predictor"]["terminationGracePeriodSeconds"]
    for needle in (f"`--job_lease`, {args.job_lease:g} s", f"`--max_deliveries` ({args.max_deliveries})",
                   f"`--drain_timeout` ({args.drain_timeout:g} s",
                   f"`terminationGracePeriodSeconds: {grace}`",
                   f"`minReplicaCount: {so['minReplicaCount']}`", f"`cooldownPeriod: {so['cooldownPeriod']}`",
                   f'`streamLength: "{meta["streamLength"]}"`', f"`{meta['stream']}`",
                   f"`--queue_size`, {args.queue_size}", f"`maxmemory {conf['maxmemory'][0]}`",
                   f"`appendfsync {conf['appendfsync'][0]}`",
                   f"`maxmemory-policy {conf['maxmemory-policy'][0]}`", f"`{meta['address']}`"):
        assert needle in flat, f"6a does not say {needle}"
    # What a Redis failure costs, as SPEC section 11 has it.
    for needle in ("503 with `Retry-After` within 2 s", "`/v2/health/ready` is false",
                   "`/v2/health/live` stays true", "A Redis restart", "A Redis crash"):
        assert needle in flat, f"6a does not say {needle}"


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
    "pod": "Pod", "pods": "Pod", "deployment": "Deployment", "statefulset": "StatefulSet",
    "sts": "StatefulSet", "scaledobject": "ScaledObject", "so": "ScaledObject",
    "hpa": "HorizontalPodAutoscaler", "triggerauthentication": "TriggerAuthentication",
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
        elif kind in ("InferenceService", "Job", "ScaledObject", "StatefulSet") and name and not defined:
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
        if "timeout" in isvc["spec"]["predictor"]:  # Knative's revision timeout (the workers get no requests)
            assert f"`timeout: {isvc['spec']['predictor']['timeout']}`" in para


# ------------------------------------------------------------------------ tenants: the API keys Secret

KEYS_SECRET = "kandinsky-api-keys"  # k8s/tenants/api-keys-secret.yaml


def _api_isvcs() -> list[dict[str, Any]]:
    """The InferenceServices that serve the APIs (role all or api): the ones that need the keys. Workers
    serve only probes and metrics."""
    return [i for i in _of_kind("InferenceService") if _parse(_server_args(i)).role != "worker"]


def _keys_secret() -> dict[str, Any]:
    # k8s/ and k8s/replicas/ both include k8s/tenants/, so the one file is seen from both roots.
    found = {p: d for p, d in _objects()
             if d.get("kind") == "Secret" and d["metadata"]["name"] == KEYS_SECRET}
    assert len(found) == 1, f"{KEYS_SECRET} is defined in {len(found)} files"
    return next(iter(found.values()))


def _secret_files(secret: dict[str, Any]) -> dict[str, str]:
    """The files a Secret volume without `items` shows: one per key, named after it."""
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def _keys_mount_problems(isvc: dict[str, Any]) -> list[str]:
    """Why an InferenceService's --api_keys would not be the keys Secret, updated in place when it changes."""
    name = isvc["metadata"]["name"]
    args = _parse(_server_args(isvc))
    pred = isvc["spec"]["predictor"]
    volumes = [v for v in pred.get("volumes", []) if v.get("secret", {}).get("secretName") == KEYS_SECRET]
    if len(volumes) != 1:
        return [f"{name}: {len(volumes)} volumes of the Secret {KEYS_SECRET}"]
    (volume,) = volumes
    mounts = [m for m in pred["model"].get("volumeMounts", []) if m["name"] == volume["name"]]
    if len(mounts) != 1:
        return [f"{name}: the keys volume is mounted {len(mounts)} times"]
    (mount,) = mounts
    problems: list[str] = []
    if "subPath" in mount or "subPathExpr" in mount:
        problems.append(f"{name}: a subPath mount is never updated by the kubelet: key changes never arrive")
    if mount.get("readOnly") is not True:
        problems.append(f"{name}: Knative refuses a Secret volume mount that is not readOnly")
    if "items" in volume["secret"]:
        problems.append(f"{name}: `items` picks files; mount the whole Secret, its keys are the files")
    keys_file = Path(args.api_keys) if args.api_keys else None
    if keys_file is None or keys_file.parent != Path(mount["mountPath"]):
        problems.append(f"{name}: --api_keys={args.api_keys!r} is not a file of the mount "
                        f"{mount['mountPath']}")
    elif keys_file.name not in _secret_files(_keys_secret()):
        problems.append(f"{name}: the Secret has no key {keys_file.name!r} for --api_keys={args.api_keys}")
    return problems


def test_every_api_serving_inferenceservice_reads_the_keys_secret_mounted_as_a_directory() -> None:
    api = _api_isvcs()
    assert {_parse(_server_args(i)).role for i in api} == {"all", "api"}, "single replicas and the api tier"
    problems = [p for isvc in api for p in _keys_mount_problems(isvc)]
    assert not problems, "\n".join(problems)
    # Workers authenticate nothing (they serve probes and metrics): no keys, no copy of the Secret.
    for isvc in _of_kind("InferenceService"):
        if isvc not in api:
            assert not _parse(_server_args(isvc)).api_keys, isvc["metadata"]["name"]
            assert KEYS_SECRET not in json.dumps(isvc["spec"]), isvc["metadata"]["name"]


def test_the_keys_mount_check_catches_a_subpath_a_writable_mount_and_a_path_outside_it() -> None:
    isvc = json.loads(json.dumps(_isvc("kandinsky")))
    assert not _keys_mount_problems(isvc)
    model = isvc["spec"]["predictor"]["model"]
    (mount,) = [m for m in model["volumeMounts"] if m["mountPath"] in _parse(_server_args(isvc)).api_keys]
    mount["subPath"], mount["readOnly"] = "keys", False
    model["args"] = [a for a in model["args"] if not a.startswith("--api_keys")] + ["--api_keys=/etc/keys"]
    problems = "\n".join(_keys_mount_problems(isvc))
    assert "subPath" in problems and "readOnly" in problems and "'/etc/keys' is not a file" in problems
    model["args"][-1] = f"--api_keys={mount['mountPath']}/tokens"
    assert "no key 'tokens'" in "\n".join(_keys_mount_problems(isvc))
    pred = isvc["spec"]["predictor"]
    pred["volumes"] = [v for v in pred["volumes"] if "secret" not in v]
    assert "0 volumes of the Secret" in "\n".join(_keys_mount_problems(isvc))


def test_tenant_queue_size_bounds_one_tenant_below_the_whole_queue() -> None:
    for isvc in _api_isvcs():
        args = _parse(_server_args(isvc))
        # 0 would let one tenant fill the whole queue; equal to --queue_size the same: others would find none.
        assert 1 <= args.tenant_queue_size < args.queue_size, (isvc["metadata"]["name"], args.queue_size,
                                                               args.tenant_queue_size)


def _quoted_start_up_errors(text: str) -> list[str]:
    """The `error: --api_keys: MESSAGE ...` quotes in some text, whitespace joined, without the `...`."""
    return re.findall(r"error: --api_keys: ([^`\s][^`]*?) \.\.\.", re.sub(r"\s*\n\s*#?\s*", " ", text))


def test_the_keys_secret_placeholder_is_refused_by_the_servers_own_parser() -> None:
    from app.serving.core.tenants import KeysFileError, parse_keys

    secret = _keys_secret()
    (keys_path,) = {_parse(_server_args(i)).api_keys for i in _api_isvcs()}  # one file name, one Secret
    text = _secret_files(secret)[Path(keys_path).name]
    assert SECRET_PLACEHOLDER in text, "the placeholder says what to replace, as the other Secrets do"
    # Nobody ships it open: the server refuses to start with it, naming the line.
    with pytest.raises(KeysFileError, match=r" line \d+: ") as refused:
        parse_keys(text, keys_path)
    # What the Secret's comments and the guide quote is what the server says (`error: --api_keys: ...`).
    (path,) = {p for p, d in _objects() if d is secret}
    quotes = _quoted_start_up_errors(path.read_text(encoding="utf-8"))
    quotes += _quoted_start_up_errors(_doc("docs/DEPLOY.md"))
    assert len(quotes) >= 3, quotes  # the Secret's comment, section 4a and the troubleshooting table
    for quote in quotes:
        assert str(refused.value).startswith(quote), (quote, str(refused.value))


def _tenants_section() -> str:
    return _doc("docs/DEPLOY.md").split("## 4a. ", 1)[1].split("\n## ", 1)[0]


def test_the_deploy_guides_keys_example_is_accepted_by_the_servers_own_parser() -> None:
    from app.serving.core.tenants import parse_keys

    blocks = re.findall(r"^```yaml\n(.*?)^```", _tenants_section(), re.S | re.M)
    examples = [d for b in blocks for d in yaml.safe_load_all(b)
                if d and d.get("kind") == "Secret" and d["metadata"]["name"] == KEYS_SECRET]
    assert len(examples) == 1, "section 4a shows the edited Secret once"
    (example,) = examples
    assert set(_secret_files(example)) == set(_secret_files(_keys_secret())), "the same key as the Secret"
    (text,) = _secret_files(example).values()
    keys = parse_keys(text, "docs/DEPLOY.md")
    assert len(keys.tenants) >= 2, "show how tenants differ"
    assert any(t.weight != 1 for t in keys.tenants.values()), "show a weight"
    # It follows its own advice: digests only, no token in the Secret.
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert all(fields[1].startswith("sha256:") for fields in lines), lines


def test_the_documented_hash_command_gives_the_digest_the_server_compares() -> None:
    import shutil
    import subprocess

    from app.serving.core.tenants import digest

    if shutil.which("sha256sum") is None or shutil.which("bash") is None:
        pytest.skip("no sha256sum or bash here")
    (secret_file,) = {p for p, d in _objects() if d is _keys_secret()}
    token = "3f1c0e9a7b5d4c2e8f6a1b3c5d7e9f0a"
    for source, text in (("docs/DEPLOY.md", _tenants_section()), (str(secret_file), secret_file.read_text())):
        commands = re.findall(r'printf %s "\$TOKEN" \| sha256sum[^#\n`]*', text)
        assert commands, f"{source} shows no `printf %s \"$TOKEN\" | sha256sum` (echo would add a newline)"
        for command in commands:
            out = subprocess.run(["bash", "-c", command], env={**os.environ, "TOKEN": token},
                                 capture_output=True, text=True, timeout=10, check=True)
            assert out.stdout.strip() == digest(token).hex(), (source, command, out.stdout)


def test_the_deploy_guides_tenants_section_matches_the_manifests_and_the_clients() -> None:
    import app.client
    from app.serving.core import tenants

    flat = re.sub(r"\s+", " ", _tenants_section())
    needles = [f"`{KEYS_SECRET}`", "`subPath`", "`Authorization: Bearer <token>`",
               "`authorization: Bearer <token>`", "`WWW-Authenticate: Bearer`", f"`{app.client.API_KEY_ENV}`",
               "`--api-key TOKEN`", "`api_key`", "`sessionStorage`", "`--tenant_max_jobs`",
               "`--tenant_max_job_bytes`", 'printf %s "$TOKEN" | sha256sum']
    for isvc in _api_isvcs():
        args = _parse(_server_args(isvc))
        needles.append(f"`--api_keys={args.api_keys}`")
        if args.role == "api":
            needles.append(f"{args.tenant_queue_size} on `{isvc['metadata']['name']}` "
                           f"(a quarter of {args.queue_size}")
        else:
            needles.append(f"`--tenant_queue_size`: {args.tenant_queue_size} on the single-replica "
                           f"InferenceServices (a quarter of their `--queue_size` {args.queue_size}")
    missing = [n for n in needles if n not in flat]
    assert not missing, f"section 4a does not say {missing}"
    # The log lines it tells the operator to look for are the ones the server writes.
    source = Path(tenants.__file__).read_text(encoding="utf-8")
    for quoted in ("API keys reloaded from", "API keys not reloaded, the keys in force are kept:"):
        assert quoted in flat and quoted in source, quoted
    assert "grep 'API keys'" in flat


def test_the_manifests_probes_and_metrics_need_no_api_key() -> None:
    # With --api_keys the middleware refuses routes declared `auth` without a key: a probe or the scrape
    # path among them would never pass (the kubelet and Prometheus send no key).
    from app.serving.model import KandinskyModel, ServerSettings
    from app.serving.web.app import build_table

    table = build_table(KandinskyModel("kandinsky", ServerSettings()).context)
    predict = table.match("POST", "/v1/models/kandinsky:predict")
    assert predict is not None and predict[0].auth, "the check would pass for any table"
    for isvc in _api_isvcs():
        model = isvc["spec"]["predictor"]["model"]
        paths = [model[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")]
        paths.append(isvc["metadata"]["annotations"]["prometheus.io/path"])
        for path in paths:
            found = table.match("GET", path)
            assert found is not None and not found[0].auth, f"{isvc['metadata']['name']}: {path} needs a key"
    for monitor in _of_kind("PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            found = table.match("GET", endpoint.get("path", "/metrics"))
            assert found is not None and not found[0].auth, monitor["metadata"]["name"]


def test_tenant_throttled_alert_counts_the_refusals_the_server_gives_a_tenant_over_its_bound() -> None:
    from app.serving.core.errors import TenantQueueFull
    from app.serving.protocols import v2_grpc

    rules = {r["alert"]: r for rule in _of_kind("PrometheusRule") for g in rule["spec"]["groups"]
             for r in g["rules"]}
    rule = rules["KandinskyTenantThrottled"]
    expr = re.sub(r"\s+", " ", rule["expr"])
    # The statuses it counts are the server's for a full tenant queue, over HTTP and gRPC.
    counted = re.search(r'code=~"([^"]+)"', expr)
    assert counted, expr
    codes = set(counted.group(1).split("|"))
    grpc_code = v2_grpc._status_name(v2_grpc._GRPC_STATUS[TenantQueueFull.status])
    expected = {str(TenantQueueFull.status), grpc_code}
    assert codes == expected, (codes, expected)
    # Per tenant, as a share of that tenant's requests, named tenants only, over a long enough time.
    assert expr.count("sum by (namespace, tenant)") == 2 and 'tenant!=""' in expr
    assert rule["labels"]["severity"] == "warning" and _duration_s(rule["for"]) >= 15 * 60
    assert "{{ $labels.tenant }}" in rule["annotations"]["summary"]
