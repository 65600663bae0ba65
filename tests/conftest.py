"""Shared fixtures: the tiny seeded model directory in the published file formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The test machine's cores are shared: keep intra-op threads few so parallel runs do not thrash.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model directory, built once per session.

    Set KANDINSKY_TINY_DIR to reuse a directory built by ``python -m app.tools.tiny`` (it must hold
    model.json).
    """
    prebuilt = os.environ.get("KANDINSKY_TINY_DIR")
    if prebuilt:
        path = Path(prebuilt)
        if not (path / "model.json").is_file():
            pytest.fail(f"KANDINSKY_TINY_DIR={prebuilt} has no model.json (python -m app.tools.tiny)")
        return path
    from app.tools.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), seed=0)
