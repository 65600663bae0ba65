"""Lightning training checkpoints: pickled metadata is read inert, never run; the weights stay strict.

The stand-in classes below are pickled under the module paths the real packages use (a fake module in
sys.modules while saving); the real packages are not installed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import store
from app.engine.checkpoints import LIGHTNING_METADATA_KEYS, InertPickled, ModelStoreError, read_state_dict
from app.engine.nets.vqgan import vqgan_decode_tensor_names, vqgan_encode_tensor_names

#: What the real classes' code would do if it ran: every stand-in below records itself here.
CALLS: list[str] = []


def record(what: str) -> None:
    CALLS.append(what)


class ModelCheckpoint:
    __module__ = "pytorch_lightning.callbacks.model_checkpoint"

    def __init__(self) -> None:
        record("ModelCheckpoint.__init__")


class ContainerMetadata:
    __module__ = "omegaconf.base"

    def __init__(self, ref_type: Any, object_type: Any) -> None:
        self.ref_type, self.object_type, self.key_type, self.flags = ref_type, object_type, typing.Any, {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        record("ContainerMetadata.__setstate__")
        self.__dict__.update(state)


class AnyNode:
    __module__ = "omegaconf.nodes"

    def __init__(self, value: Any, parent: Any = None) -> None:
        self._val, self._parent = value, parent
        self._metadata = ContainerMetadata(typing.Any, None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        record("AnyNode.__setstate__")
        self.__dict__.update(state)


class DictConfig:
    """Pickles as OmegaConf's does: its __dict__ (metadata, content nodes, parent) via __getstate__."""

    __module__ = "omegaconf.dictconfig"

    def __init__(self, content: dict[str, Any], parent: Any = None) -> None:
        self._metadata = ContainerMetadata(typing.Any, dict)
        self._parent = parent
        self._content = {
            k: DictConfig(v, self) if isinstance(v, dict) else AnyNode(v, self) for k, v in content.items()
        }

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        record("DictConfig.__setstate__")
        self.__dict__.update(state)


def run_payload(what: str) -> str:
    record(f"payload: {what}")
    return what


run_payload.__module__ = "evil_pkg.hooks"


class Payload:
    """An object whose unpickling calls a function of its package (``__reduce__``)."""

    __module__ = "evil_pkg.hooks"

    def __reduce__(self) -> Any:
        return run_payload, ("unpickled",)


class RunsAShell:
    def __reduce__(self) -> Any:
        return os.system, ("true",)  # posix.system: torch blocks the module before anything else


class AttributeDict(dict):
    __module__ = "pytorch_lightning.utilities.parsing"


FAKE_MODULES: dict[str, dict[str, Any]] = {
    "pytorch_lightning.callbacks.model_checkpoint": {"ModelCheckpoint": ModelCheckpoint},
    "pytorch_lightning.utilities.parsing": {"AttributeDict": AttributeDict},
    "omegaconf.base": {"ContainerMetadata": ContainerMetadata},
    "omegaconf.nodes": {"AnyNode": AnyNode},
    "omegaconf.dictconfig": {"DictConfig": DictConfig},
    "evil_pkg.hooks": {"run_payload": run_payload, "Payload": Payload},
}


@contextlib.contextmanager
def fake_modules() -> Iterator[None]:
    """The stand-ins' modules (and their parent packages) in sys.modules, so pickle can name them."""
    added = []
    for dotted, attrs in FAKE_MODULES.items():
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        for attr, value in attrs.items():
            setattr(sys.modules[dotted], attr, value)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


@pytest.fixture(autouse=True)
def _no_calls() -> Iterator[None]:
    CALLS.clear()
    yield
    CALLS.clear()


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3, generator=g), "quantize.embed.weight":
            torch.randn(8, 4, generator=g), "loss.logvar": torch.zeros(())}


def lightning_metadata() -> dict[str, Any]:
    """Training state as PyTorch Lightning 1.x saves it beside ``state_dict``."""
    return {
        "epoch": 7,
        "global_step": 120_000,
        "pytorch-lightning_version": "1.2.10",
        "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25),
                                        "best_model_path": "logs/last.ckpt"}},
        "optimizer_states": [{"state": {0: {"step": 3, "exp_avg": torch.ones(2)}},
                              "param_groups": [{"lr": 4.5e-6, "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": DictConfig({"embed_dim": 256, "ddconfig": {"z_channels": 256, "ch": 128}}),
        "hparams_type": DictConfig,
    }


def save(path: Path, obj: dict[str, Any]) -> Path:
    with fake_modules():
        torch.save(obj, path)
    CALLS.clear()  # saving may run the stand-ins' own code; only loading is under test
    return path


def lightning_file(tmp_path: Path, **extra: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = weights()
    return save(tmp_path / "model.ckpt", {"state_dict": sd, **lightning_metadata(), **extra}), sd


# ------------------------------------------------------------------------------------------- tests


def test_plain_weights_only_loading_refuses_the_lightning_file(tmp_path: Path) -> None:
    path, _ = lightning_file(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(ModelStoreError, match="refusing to load .*weights_only=True"):
        read_state_dict(path)  # without metadata keys nothing changes


def test_lightning_metadata_is_read_as_inert_stand_ins_and_the_weights_are_intact(tmp_path: Path) -> None:
    path, sd = lightning_file(tmp_path)
    obj = read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)
    assert obj["state_dict"].keys() == sd.keys()
    assert all(torch.equal(obj["state_dict"][k], sd[k]) for k in sd)
    assert obj["epoch"] == 7 and obj["pytorch-lightning_version"] == "1.2.10"
    (callback_cls, state), = obj["callbacks"].items()
    assert issubclass(callback_cls, InertPickled)
    assert callback_cls.pickled_global == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert torch.equal(state["best_model_score"], torch.tensor(0.25))  # plain state stays as saved
    hparams = obj["hyper_parameters"]
    assert isinstance(hparams, InertPickled) and hparams.pickled_global == "omegaconf.dictconfig.DictConfig"
    assert not hasattr(hparams, "_content")  # nothing of the pickled state was kept on it
    assert obj["hparams_type"].pickled_global == "omegaconf.dictconfig.DictConfig"
    assert CALLS == []


def test_no_code_of_the_real_classes_runs_even_when_they_are_importable(tmp_path: Path) -> None:
    path, sd = lightning_file(tmp_path, loops={"hook": Payload()})
    with fake_modules():  # the real classes (our recording stand-ins) are importable during the load
        obj = read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)
    assert CALLS == []  # no __init__, __setstate__ or __reduce__ target ran
    assert not isinstance(obj["hyper_parameters"], DictConfig)
    assert not any(isinstance(k, type) and issubclass(k, ModelCheckpoint) for k in obj["callbacks"])
    assert obj["loops"]["hook"].pickled_global == "evil_pkg.hooks.run_payload"  # the call gave a stand-in
    assert torch.equal(obj["state_dict"]["quantize.embed.weight"], sd["quantize.embed.weight"])


def test_a_foreign_object_in_the_state_dict_is_refused_naming_its_global(tmp_path: Path) -> None:
    sd: dict[str, Any] = {**weights(), "decoder.hook": Payload()}
    path = save(tmp_path / "model.ckpt", {"state_dict": sd, **lightning_metadata()})
    with pytest.raises(ModelStoreError) as info:
        read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)
    msg = str(info.value)
    assert "refusing to load" in msg and str(path) in msg
    assert "evil_pkg.hooks.run_payload at ['state_dict']['decoder.hook']" in msg
    assert CALLS == []


def test_a_foreign_class_as_a_state_dict_key_is_refused(tmp_path: Path) -> None:
    sd: dict[Any, Any] = {**weights(), ModelCheckpoint: torch.zeros(1)}
    path = save(tmp_path / "model.ckpt", {"state_dict": sd, "epoch": 1})
    where = r"model_checkpoint\.ModelCheckpoint at a key of \['state_dict'\]"
    with pytest.raises(ModelStoreError, match=where):
        read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)


def test_a_foreign_object_under_a_key_that_is_not_metadata_is_refused(tmp_path: Path) -> None:
    path, _ = lightning_file(tmp_path, model_config=DictConfig({"a": 1}))
    with pytest.raises(ModelStoreError, match=r"omegaconf\.dictconfig\.DictConfig at \['model_config'\]"):
        read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)


def test_a_whole_pickled_object_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "model.ckpt", DictConfig({"a": 1}))  # type: ignore[arg-type]
    with pytest.raises(ModelStoreError, match=r"omegaconf\.dictconfig\.DictConfig at the top level"):
        read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)


def test_a_blocked_module_is_refused_even_as_metadata(tmp_path: Path) -> None:
    path, _ = lightning_file(tmp_path, loops={"shell": RunsAShell()})
    with pytest.raises(ModelStoreError, match=r"refusing to load .*GLOBAL (posix|os)\.system"):
        read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)


def test_a_dict_subclass_in_metadata_is_refused_naming_it(tmp_path: Path) -> None:
    # torch's unpickler fills only real dicts; a stand-in cannot take the items, so the file is refused.
    path, _ = lightning_file(tmp_path, hyper_parameters=AttributeDict(lr=1.0))
    with pytest.raises(ModelStoreError, match=r"pytorch_lightning\.utilities\.parsing\.AttributeDict"):
        read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)


def test_torchs_allow_list_is_left_as_it_was(tmp_path: Path) -> None:
    before = list(torch.serialization.get_safe_globals())
    path, _ = lightning_file(tmp_path)
    read_state_dict(path, metadata_keys=LIGHTNING_METADATA_KEYS)
    with pytest.raises(ModelStoreError):
        read_state_dict(tmp_path / "model.ckpt", metadata_keys=("epoch",))  # refused: stand-ins elsewhere
    assert list(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_the_vqgan_loaders_read_a_lightning_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    m = store.load_manifest(root)
    sd = torch.load(m.vqgan_checkpoint, weights_only=True)["state_dict"]
    save(m.vqgan_checkpoint, {"state_dict": sd, **lightning_metadata()})
    with pytest.raises(pickle.UnpicklingError):
        torch.load(m.vqgan_checkpoint, weights_only=True)
    decoder = store.load_vqgan(m, "cpu", torch.float32)
    encoder = store.load_vqgan_encoder(m, "cpu", torch.float32)
    got = {**decoder.state_dict(), **encoder.state_dict()}
    assert set(got) == vqgan_decode_tensor_names(m.vqgan) | vqgan_encode_tensor_names(m.vqgan)
    assert all(torch.equal(got[k], sd[k]) for k in got)
    assert CALLS == []
