"""Checks of one scenario field each: a bad value raises `ScenarioError` naming the field, the
value and what would be accepted."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class ScenarioError(ValueError):
    """A scenario field is missing or wrong; the message names the field."""


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScenarioError(f"{name}: must be a positive integer, got {value!r}")
    return value


def positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{name}: must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ScenarioError(f"{name}: must be a positive number, got {value!r}")
    return float(value)


def string(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"{name}: must be a non-empty string, got {value!r}")
    return value


def mapping(name: str, value: object, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{name}: must be a mapping, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        where = f"{name}." if name else ""
        raise ScenarioError(
            f"{where}{unknown[0]}: unknown key (accepted: {', '.join(sorted(allowed))})"
        )
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(f"{name}: must be true or false, got {value!r}")
    return value
