"""Small validators shared by the network configs (model.json blocks): errors name the key."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


def positive_int(value: Any, name: str) -> int:
    """`value` if it is an int > 0 (a bool is not an int here), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


#: `dataclasses.field(metadata=OPTIONAL_IN_MANIFEST)`: a config field model.json may leave out.
OPTIONAL_IN_MANIFEST: Mapping[str, Any] = MappingProxyType({"manifest": "optional"})


def manifest_keys(cls: Any) -> tuple[str, ...]:
    """The keys model.json must give for config dataclass `cls`: every field not marked optional."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("manifest") != "optional")


def manifest_values(cls: Any, block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields of `cls` found in a model.json block: every required key (else ValueError naming
    `where.key`) and the optional ones present; other keys (``checkpoint``, unknown ones) are left out."""
    required = manifest_keys(cls)
    for key in required:
        if key not in block:
            raise ValueError(f"{where}: missing key {key!r}")
    return {f.name: block[f.name] for f in dataclasses.fields(cls) if f.name in block}
