# syntax=docker/dockerfile:1
# Kandinsky serving image: the KServe model server (`python -m app`) on the CUDA 13.0 runtime that
# torch 2.14.1 (+cu130) is built for. No weights inside: KServe's storage initializer mounts them from
# storageUri at /mnt/models. Build: `make docker-build` (docker build -t kandinsky-serving:<version> .).
#
# Volta (V100) variant: CUDA 13 dropped compute capability 7.0, so torch 2.14.1+cu130 has no sm_70
# kernels and every CUDA op fails on a V100. `make docker-build-volta` builds the same code with the
# newest torch whose PyPI wheels still ship sm_70 (2.10.0+cu128) on the CUDA 12.8 runtime:
#   docker build -t kandinsky-serving-volta:<version> \
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 \
#     --build-arg TORCH_PIN=torch==2.10.0 --build-arg TORCHVISION_PIN=torchvision==0.25.0 .
# k8s/runtime/kandinsky-runtime-volta.yaml serves that image; only the V100 InferenceService names it.
#
# Reproducibility: the base image is pinned by tag (pin it by digest in your registry mirror:
# nvidia/cuda:13.0.0-runtime-ubuntu22.04@sha256:...), Python packages by scripts/install.sh, the same
# pinned install step `make install` runs.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu22.04

# ---- build stage: compilers for youtokentome (no wheel; built from source against cython<3) ----
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
WORKDIR /src
COPY requirements.txt ./requirements.txt
COPY scripts/install.sh ./scripts/install.sh
# The torch build: the defaults are the CUDA 13.0 pair; the Volta variant overrides both (see the top).
ARG TORCH_PIN=torch==2.14.1
ARG TORCHVISION_PIN=torchvision==0.29.1
RUN TORCH_PIN="${TORCH_PIN}" TORCHVISION_PIN="${TORCHVISION_PIN}" bash scripts/install.sh /opt/venv/bin/python

# ---- runtime stage: the interpreter, the venv and the code; no compilers ----
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    HF_HUB_DISABLE_TELEMETRY=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv
# Code and the model.json templates (for `python -m app.tools.weights download` in the weights Job) only;
# .dockerignore keeps weights, tests and local state out of the build context. Owned by root and
# read-only to the server's user.
COPY app/ ./app/
COPY model_store/ ./model_store/
USER 1000:1000
EXPOSE 8080
# Liveness for plain `docker run` (Kubernetes uses the probes in k8s/ instead). The model loads before
# the server listens, so allow a long start.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=5)"]
ENTRYPOINT ["python", "-m", "app"]
