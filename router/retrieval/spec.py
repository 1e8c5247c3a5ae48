"""Plain data of retrieval: a collection's configuration, documents, filters and hits."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from router.errors import InvalidArgument, quote

NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
MAX_ID_BYTES = 512
MAX_DIMENSION = 65_536


class Metric(StrEnum):
    """The hnswlib space names."""

    COSINE = "cosine"
    L2 = "l2"
    INNER_PRODUCT = "ip"


def vector_fault(values: Sequence[float], metric: Metric) -> str | None:
    """Why a vector cannot be stored or searched, or None. A NaN or infinite component makes
    every distance to it NaN, which corrupts the graph's neighbour lists (and, logged, survives
    a restart); under cosine a zero vector has no direction to normalise to."""
    # Per Search and per upserted vector: the sum (a C loop, ~7x faster than checking each
    # component) is finite exactly when every component is (float32 values cannot overflow
    # a float64 sum); only a bad vector is scanned for the position to name.
    if math.isfinite(sum(values)) and (metric is not Metric.COSINE or any(values)):
        return None
    for i, value in enumerate(values):
        if not math.isfinite(value):
            return f"component [{i}] is {'NaN' if math.isnan(value) else 'infinite'}"
    if metric is Metric.COSINE and not any(values):
        return "is all zeros: a cosine collection cannot normalise it"
    return None


@dataclass(frozen=True, slots=True)
class CollectionSpec:
    """What a collection is created with (defaults already filled in)."""

    name: str
    dimension: int
    metric: Metric = Metric.COSINE
    m: int = 16
    ef_construction: int = 200
    ef: int = 64
    embedding_model: str = ""

    def validate(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise InvalidArgument(
                f"name={self.name!r} is not 1 to 64 characters of [a-z0-9_-]", field="config.name"
            )
        if not 1 <= self.dimension <= MAX_DIMENSION:
            raise InvalidArgument(
                f"dimension={self.dimension} must be in [1, {MAX_DIMENSION}] (or 0 with an "
                "embedding_model, which takes the model's dimension)",
                field="config.dimension",
            )
        for name, low, high in (("m", 2, 100), ("ef_construction", 1, 4096), ("ef", 1, 4096)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise InvalidArgument(
                    f"{name}={value} must be in [{low}, {high}]", field=f"config.{name}"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dimension": self.dimension,
            "metric": self.metric.value,
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef": self.ef,
            "embedding_model": self.embedding_model,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CollectionSpec:
        return cls(**{**data, "metric": Metric(data["metric"])})


@dataclass(slots=True)
class Document:
    """A stored document; `text` is empty when it was upserted as a vector. `parent` is set on
    the chunks of a text too long for the embedding model's window (see router.retrieval.chunking):
    the id the caller upserted, which Delete and a later Upsert of that id act on."""

    id: str
    text: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    numeric: dict[str, float] = field(default_factory=dict)
    parent: str = ""

    def to_json(self) -> dict[str, Any]:
        data = {"id": self.id, "text": self.text, "meta": self.metadata, "num": self.numeric}
        if self.parent:
            data["parent"] = self.parent
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Document:
        return cls(data["id"], data["text"], data["meta"], data["num"], data.get("parent", ""))


@dataclass(frozen=True, slots=True)
class Hit:
    document: Document
    score: float


@dataclass(frozen=True, slots=True)
class Range:
    field: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class Filter:
    """Every condition must hold; a document without the field does not match."""

    strings: tuple[tuple[str, frozenset[str]], ...] = ()
    ranges: tuple[Range, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.strings or self.ranges)

    def validate(self, prefix: str = "filter") -> None:
        """Raise InvalidArgument naming the bad condition, e.g. `{prefix}.ranges[0]`."""
        for i, (key, values) in enumerate(self.strings):
            where = f"{prefix}.strings[{i}]"
            if not key:
                raise InvalidArgument(f"{where}.field is empty", field=f"{where}.field")
            if not values:
                raise InvalidArgument(
                    f"{where} (field {quote(key)}) has no values: give one for equality or several "
                    "for membership",
                    field=f"{where}.values",
                )
        for i, r in enumerate(self.ranges):
            where = f"{prefix}.ranges[{i}]"
            if not r.field:
                raise InvalidArgument(f"{where}.field is empty", field=f"{where}.field")
            for bound in ("min", "max"):
                value = getattr(r, bound)
                if value is not None and math.isnan(value):
                    raise InvalidArgument(
                        f"{where}.{bound} (field {quote(r.field)}) is NaN", field=f"{where}.{bound}"
                    )
            if r.min is None and r.max is None:
                raise InvalidArgument(
                    f"{where} (field {quote(r.field)}) sets neither min nor max", field=where
                )
            if r.min is not None and r.max is not None and r.min > r.max:
                raise InvalidArgument(
                    f"{where} (field {quote(r.field)}) has min={r.min} > max={r.max}", field=where
                )

    def matches(self, doc: Document) -> bool:
        for key, values in self.strings:
            if doc.metadata.get(key) not in values:
                return False
        for r in self.ranges:
            value = doc.numeric.get(r.field)
            if value is None:
                return False
            if (r.min is not None and value < r.min) or (r.max is not None and value > r.max):
                return False
        return True
