"""The transformer's parameters must be exactly the published state dicts' tensors (shared lists)."""

import json
from pathlib import Path

import pytest
import torch

from app.engine.nets.dalle import DALLE_PRESETS, MASK_BUFFERS, DalleModel, expected_dalle_tensors

TENSORS = Path(__file__).resolve().parents[4] / "shared" / "tensors"


def _published(name: str) -> dict[str, tuple[int, ...]]:
    path = TENSORS / f"{name}-transformer.json"
    if not path.exists():
        pytest.skip(f"{path} is not available in this checkout")
    return {k: tuple(v) for k, v in json.loads(path.read_text())["tensors"].items()}


@pytest.mark.parametrize("name", ["kandinsky", "malevich"])
def test_meta_model_state_dict_equals_published_tensor_list(name):
    with torch.device("meta"):
        model = DalleModel(DALLE_PRESETS[name])
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert built == _published(name)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", ["kandinsky", "malevich"])
def test_expected_dalle_tensors_equals_published_tensor_list(name):
    assert expected_dalle_tensors(DALLE_PRESETS[name]) == _published(name)


def test_emojich_has_the_malevich_shapes():
    emojich = expected_dalle_tensors(DALLE_PRESETS["emojich"])
    assert emojich == expected_dalle_tensors(DALLE_PRESETS["malevich"])


def test_mask_buffers_are_not_module_state():
    tensors = expected_dalle_tensors(DALLE_PRESETS["malevich"])
    assert not set(MASK_BUFFERS) & set(tensors)
    assert not any("mask" in name for name in tensors)
