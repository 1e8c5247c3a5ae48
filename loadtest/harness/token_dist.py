"""max_tokens of a load test's requests: fixed, uniform or a clipped normal, and its parsing from
YAML or the CLI's flag forms."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from loadtest.harness.fields import ScenarioError, mapping, positive_float, positive_int


@dataclass(frozen=True)
class TokenDist:
    """max_tokens per request: fixed, uniform in [low, high], or normal(mean, std) clipped."""

    kind: Literal["fixed", "uniform", "normal"]
    """Which distribution."""
    low: int
    """Smallest value (the value itself when fixed)."""
    high: int
    """Largest value."""
    mean: float = 0.0
    """Mean of the normal distribution."""
    std: float = 0.0
    """Standard deviation of the normal distribution."""

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        return min(self.high, max(self.low, round(rng.gauss(self.mean, self.std))))

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.low)
        if self.kind == "uniform":
            return f"uniform {self.low}..{self.high}"
        return f"normal mean {self.mean:g} std {self.std:g} clipped {self.low}..{self.high}"


def parse_max_tokens(value: object, name: str = "max_tokens") -> TokenDist:
    """An int, a mapping {dist: uniform, min, max} / {dist: normal, mean, std, min, max}, or the
    flag forms 'N', 'uniform:MIN:MAX', 'normal:MEAN:STD[:MIN:MAX]'."""
    if isinstance(value, str):
        value = _max_tokens_flag(value, name)
    if isinstance(value, int) and not isinstance(value, bool):
        n = positive_int(name, value)
        return TokenDist("fixed", n, n)
    spec = mapping(name, value, frozenset({"dist", "min", "max", "mean", "std", "value"}))
    dist = spec.get("dist", "fixed")
    if dist == "fixed":
        n = positive_int(f"{name}.value", spec.get("value"))
        return TokenDist("fixed", n, n)
    if dist == "uniform":
        low = positive_int(f"{name}.min", spec.get("min"))
        high = positive_int(f"{name}.max", spec.get("max"))
        if high < low:
            raise ScenarioError(f"{name}.max: {high} is below {name}.min={low}")
        return TokenDist("uniform", low, high)
    if dist == "normal":
        mean = positive_float(f"{name}.mean", spec.get("mean"))
        std = spec.get("std")
        if isinstance(std, bool) or not isinstance(std, int | float) or std < 0:
            raise ScenarioError(f"{name}.std: must be a number >= 0, got {std!r}")
        low = positive_int(f"{name}.min", spec.get("min", 1))
        high = positive_int(f"{name}.max", spec.get("max", max(low, round(mean + 4 * std))))
        if high < low:
            raise ScenarioError(f"{name}.max: {high} is below {name}.min={low}")
        return TokenDist("normal", low, high, mean=mean, std=float(std))
    raise ScenarioError(f"{name}.dist: {dist!r} is not one of fixed, uniform, normal")


def _max_tokens_flag(text: str, name: str) -> object:
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return int(parts[0])
        if parts[0] == "uniform" and len(parts) == 3:
            return {"dist": "uniform", "min": int(parts[1]), "max": int(parts[2])}
        if parts[0] == "normal" and len(parts) in (3, 5):
            spec: dict[str, object] = {
                "dist": "normal",
                "mean": float(parts[1]),
                "std": float(parts[2]),
            }
            if len(parts) == 5:
                spec["min"], spec["max"] = int(parts[3]), int(parts[4])
            return spec
    except ValueError:
        pass
    raise ScenarioError(f"{name}: {text!r} is not N, uniform:MIN:MAX or normal:MEAN:STD[:MIN:MAX]")
