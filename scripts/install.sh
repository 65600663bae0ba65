#!/usr/bin/env bash
# The one pinned install step, shared by the Makefile and the Dockerfile.
# Usage: [TORCH_PIN=... TORCHVISION_PIN=...] scripts/install.sh PYTHON [--dev]
# TORCH_PIN / TORCHVISION_PIN pick the torch build (defaults: torch==2.14.1, torchvision==0.29.1, the
# CUDA 13.0 build). CUDA 13 dropped Volta, so the V100 image (`make docker-build-volta`) overrides them
# with the newest pair whose wheels still carry sm_70 kernels (torch 2.10.0+cu128).
# Order matters:
#  1. torch and torchvision as a matching pair (the CUDA build; it runs on the CPU too, and unlike the
#     CPU-only wheel it can load torchvision's operators, which ruclip's preprocessing imports).
#  2. youtokentome has no wheel: it builds from source against cython<3, without build isolation.
#  3. our pinned runtime requirements.
#  4. ruclip with --no-deps: it pins huggingface-hub==0.2.1, which conflicts with accelerate; we pin
#     huggingface_hub<0.26 instead, which still has the cached_download that `import ruclip` needs.
set -euo pipefail
PY="${1:?usage: scripts/install.sh PYTHON [--dev]}"
DEV="${2:-}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PIP=("$PY" -m pip install --disable-pip-version-check --no-input)
TORCH_PIN="${TORCH_PIN:-torch==2.14.1}"
TORCHVISION_PIN="${TORCHVISION_PIN:-torchvision==0.29.1}"
"${PIP[@]}" -q "$TORCH_PIN" "$TORCHVISION_PIN"
"${PIP[@]}" -q "cython<3" wheel
"${PIP[@]}" -q --no-build-isolation "youtokentome==1.0.6"
"${PIP[@]}" -q -r "$HERE/requirements.txt"
"${PIP[@]}" -q --no-deps "ruclip==0.0.2"
if [ "$DEV" = "--dev" ]; then
  "${PIP[@]}" -q -r "$HERE/requirements-dev.txt"
fi
TORCH_PIN="$TORCH_PIN" TORCHVISION_PIN="$TORCHVISION_PIN" "$PY" - <<'PYCHECK'
import os
import torch, torchvision, youtokentome, ruclip, kserve, accelerate  # noqa: F401
import torchvision.ops  # fails on a torch/torchvision mismatch
# A later requirement must not have moved torch off its pin (the Volta image depends on the old build).
for mod, pin in ((torch, os.environ["TORCH_PIN"]), (torchvision, os.environ["TORCHVISION_PIN"])):
    want = pin.partition("==")[2]
    if want and mod.__version__.split("+")[0] != want:
        raise SystemExit(f"{mod.__name__} {mod.__version__} installed, but the pin is {pin}")
PYCHECK
