"""Small validators shared by the network configs (model.json blocks): errors name the key."""

from __future__ import annotations

from typing import Any


def positive_int(value: Any, name: str) -> int:
    """`value` if it is an int > 0 (a bool is not an int here), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
