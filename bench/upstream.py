"""The published ruDALL-E package (``rudalle==1.1.3``), installed on demand for benchmarks only.

Nothing here is a runtime or CI dependency, and no upstream code is copied into this repository:
``ensure_installed`` runs ``pip install --no-deps --target .venv-bench`` for the exact pins below the
first time a benchmark needs them, and ``load`` imports what the sampling loop of upstream's
``rudalle.pipelines.generate_images`` calls, straight from those installed files:

- ``rudalle/dalle/model.py`` (``DalleModel``, with its ``transformer``, ``image_attention`` and
  ``utils`` siblings). The package ``__init__`` files would pull in the hub client, transformers,
  matplotlib and taming, so ``rudalle`` and ``rudalle.dalle`` are registered as bare packages pointing
  at the installed folders and only the modules ``model.py`` imports are executed;
- ``transformers.top_k_top_p_filtering`` of the transformers version upstream pins (``~=4.10.2``),
  from its own ``generation_utils.py``, with its ``TopKLogitsWarper`` and ``TopPLogitsWarper`` from
  ``generation_logits_process.py``. That version's package needs a tokenizers build that no longer
  installs, so only these two files are executed (``file_utils`` is stubbed with the one docstring
  decorator they use; ``utils/logging.py`` is the real one);
- ``einops`` (``model.py`` imports ``rearrange``), at upstream's pin.

    .venv/bin/python bench/upstream.py          # install (if missing) and print what was loaded
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV_DIR = ROOT / ".venv-bench"
# rudalle 1.1.3's own requirements: transformers~=4.10.2, einops~=0.3.2.
PINS = ("rudalle==1.1.3", "transformers==4.10.2", "einops==0.3.2")


@dataclass
class Upstream:
    dalle_model_cls: Any  # rudalle.dalle.model.DalleModel
    top_k_top_p_filtering: Any  # transformers 4.10.2 generation_utils.top_k_top_p_filtering
    model_file: Path
    filter_file: Path


def installed(env: Path = ENV_DIR) -> bool:
    return all((env / p).is_file() for p in ("rudalle/dalle/model.py", "transformers/generation_utils.py",
                                                "einops/__init__.py"))


def ensure_installed(env: Path = ENV_DIR) -> Path:
    """Install the pinned packages (without dependencies) into ``env`` unless they are already there."""
    if not installed(env):
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(env), *PINS]
        print(f"installing upstream for the benchmark: {' '.join(cmd)}", file=sys.stderr)
        subprocess.run(cmd, check=True)
    return env


def _package(name: str, folder: Path) -> None:
    """Register ``name`` as a package whose submodules come from ``folder``, without its __init__."""
    if name in sys.modules:
        return
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(folder)]
    pkg.__package__ = name
    sys.modules[name] = pkg


def _load_filtering(env: Path) -> Any:
    _package("transformers", env / "transformers")
    _package("transformers.utils", env / "transformers" / "utils")
    if "transformers.file_utils" not in sys.modules:
        stub = types.ModuleType("transformers.file_utils")

        def add_start_docstrings(*docstr: str) -> Any:  # docstrings only, as the real one does
            def deco(fn: Any) -> Any:
                fn.__doc__ = "".join(docstr) + (fn.__doc__ or "")
                return fn
            return deco

        stub.add_start_docstrings = add_start_docstrings  # type: ignore[attr-defined]
        sys.modules["transformers.file_utils"] = stub
    warpers = importlib.import_module("transformers.generation_logits_process")
    # generation_utils.py imports half of the library; execute only its top_k_top_p_filtering definition.
    path = env / "transformers" / "generation_utils.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "top_k_top_p_filtering"]
    namespace: dict[str, Any] = {"torch": importlib.import_module("torch"),
                                 "TopKLogitsWarper": warpers.TopKLogitsWarper,
                                 "TopPLogitsWarper": warpers.TopPLogitsWarper}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["top_k_top_p_filtering"]


def load(env: Path | None = None) -> Upstream:
    """Install if needed, then import upstream's DalleModel and filtering function from their files."""
    env = ensure_installed(env or ENV_DIR)
    if str(env) not in sys.path:
        sys.path.append(str(env))  # for einops only; appended, so nothing of .venv is shadowed
    _package("rudalle", env / "rudalle")
    _package("rudalle.dalle", env / "rudalle" / "dalle")
    model = importlib.import_module("rudalle.dalle.model")
    return Upstream(model.DalleModel, _load_filtering(env), Path(model.__file__ or ""),
                    env / "transformers" / "generation_utils.py")


if __name__ == "__main__":
    up = load()
    print(f"DalleModel from {up.model_file}")
    print(f"top_k_top_p_filtering from {up.filter_file}")
