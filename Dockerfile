# Kandinsky serving image: the KServe model server (`python -m app`) on Debian bookworm's Python 3.11.
# No weights inside: KServe's storage initializer mounts them from storageUri at /mnt/models (read-only).
# Build: `make docker-build`; build and run it for real, as CI does: `make docker-test` (SPEC section 13).
#
# The defaults build with no image registry and behind a TLS-re-signing proxy:
# - the base is `debian:bookworm-slim` (any registry mirror's, or `make docker-test`'s own, made with
#   debootstrap and `docker import`). The CUDA libraries come with torch's wheels (nvidia-* packages)
#   and the driver from the node, so no CUDA base image is needed; one still fits: BASE_IMAGE, as long
#   as it is Debian-like with a `python3.11` package.
# - pip reads an optional BuildKit secret `pip_ca`, the CA bundle of a re-signing proxy:
#     DOCKER_BUILDKIT=1 docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
#   Without the secret pip uses its own CA bundle (a normal network). No `# syntax=` line: it would pull
#   a frontend image; the builder's own frontend (Docker 20.10's included) has secret mounts and
#   `required=false`.
#
# Volta (V100) variant: CUDA 13 dropped compute capability 7.0, so torch 2.14.1+cu130 has no sm_70
# kernels and every CUDA op fails on a V100. `make docker-build-volta` builds the same Dockerfile with
# the newest torch whose PyPI wheels still ship sm_70 (2.10.0+cu128):
#   docker build -t kandinsky-serving-volta:<version> \
#     --build-arg TORCH_PIN=torch==2.10.0 --build-arg TORCHVISION_PIN=torchvision==0.25.0 .
# k8s/runtime/kandinsky-runtime-volta.yaml serves that image; only the V100 InferenceService names it.
#
# Reproducibility: the base image by tag (pin it by digest in your registry mirror), Python packages by
# scripts/install.sh, the same pinned install step `make install` runs.
ARG BASE_IMAGE=debian:bookworm-slim

# ---- build stage: compilers for youtokentome (no wheel; built from source against cython<3) ----
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# No pip cache and no bytecode in the venv (the install's import check would write __pycache__).
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_COMPILE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian's own packages of the release the base pins: versions are the distribution's, not ours.
# hadolint ignore=DL3008
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
# PIP_CERT only when the pip_ca secret was given: without it, pip keeps its own CA bundle.
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && TORCH_PIN="${TORCH_PIN}" TORCHVISION_PIN="${TORCHVISION_PIN}" bash scripts/install.sh /opt/venv/bin/python \
    && find /opt/venv -depth -type d -name __pycache__ -exec rm -rf {} +

# ---- runtime stage: the interpreter, the code and the venv; no compilers ----
FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    HF_HUB_DISABLE_TELEMETRY=1
# The interpreter (without the bytecode Debian compiles on install: no bytecode caches in the layers),
# the user the server runs as (uid 1000, as the manifests' securityContext), and /mnt/models, where
# KServe mounts the weights read-only; owned by root, so the server cannot write there either.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old \
    && find /usr/lib/python3.11 -depth -type d -name __pycache__ -exec rm -rf {} + \
    && groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && install -d -o root -g root -m 0755 /mnt/models
WORKDIR /srv
# Code and the model.json templates (for `python -m app.tools.weights download` in the weights Job) only;
# .dockerignore keeps weights, tests and local state out of the build context. Owned by root and
# read-only to the server's user. The venv comes last: it is the one large layer.
COPY app/ ./app/
COPY model_store/ ./model_store/
COPY --from=build /opt/venv /opt/venv
# OCI labels; `make docker-build` passes the version, the source (git remote) and the revision it builds.
# The code declares no licence of its own: NOASSERTION (SPDX) until it does (the weights' licence is in
# each model.json).
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG SOURCE_URL=unknown
ARG REVISION=unknown
ARG LICENSES=NOASSERTION
LABEL org.opencontainers.image.title="kandinsky-serving" \
      org.opencontainers.image.description="KServe predictor for ruDALL-E Kandinsky 12B and the ruDALL-E XL family" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="${LICENSES}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
USER 1000:1000
EXPOSE 8080
# Liveness for plain `docker run` (Kubernetes uses the probes in k8s/ instead, on the same path). The
# model loads before the server listens, so allow a long start. HEALTHCHECK_PORT: a server started with
# another --http_port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('HEALTHCHECK_PORT', '8080'), timeout=5)"]
# Exec form: the server is PID 1 and gets SIGTERM itself (it drains and exits 0).
ENTRYPOINT ["python", "-m", "app"]
