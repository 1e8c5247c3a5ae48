"""A GGUF file's metadata and tensor names, read fast and without its weights.

Written by hand because gguf's GGUFReader builds a numpy view per array element: SmolLM2's
49,152 vocabulary entries and 48,900 merges take it 6-18 s of pure Python (GIL held) on these
2-core machines, which the registry would pay on every registration while the router serves.
Here string arrays are decoded in one pass over a memory map (~0.1 s), numeric arrays with
numpy.frombuffer. The result offers what the router's readers use of a GGUFReader: `fields[key]
.contents()` (gguf_weights.field_value) and `tensors[i].name`.

Every count and length is checked against the bytes left, so a corrupt or hostile file raises
ValueError naming the offset instead of allocating or looping without bound.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian, version 2-3).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
           10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_STRING = 8
_ARRAY = 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Field:
    """One metadata value: a scalar, a str, or a list of them."""

    value: Any

    def contents(self) -> Any:
        """The value, as GGUFReader's ReaderField.contents() gives it."""
        return self.value


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header (its data is not read)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int


class _Cursor:
    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        self.at = 0

    def need(self, size: int, what: str) -> None:
        if size < 0 or self.at + size > len(self.data):
            raise ValueError(f"truncated or corrupt at byte {self.at}: {what} needs {size} bytes")

    def u32(self) -> int:
        self.need(4, "a uint32")
        (value,) = _U32.unpack_from(self.data, self.at)
        self.at += 4
        return int(value)

    def u64(self) -> int:
        self.need(8, "a uint64")
        (value,) = _U64.unpack_from(self.data, self.at)
        self.at += 8
        return int(value)

    def string(self) -> str:
        size = self.u64()
        self.need(size, "a string")
        start = self.at
        self.at += size
        return bytes(self.data[start : self.at]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        scalar = _SCALARS.get(kind)
        if scalar is None:
            raise ValueError(f"unknown value type {kind} at byte {self.at}")
        fmt, size = scalar
        self.need(size, "a scalar")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def array(self) -> list[Any]:
        kind = self.u32()
        count = self.u64()
        if kind == _STRING:
            self.need(count * 8, f"an array of {count} strings")  # each has an 8-byte length
            return [self.string() for _ in range(count)]
        if kind == _ARRAY:
            self.need(count * 12, f"an array of {count} arrays")
            return [self.array() for _ in range(count)]
        dtype = _DTYPES.get(kind)
        if dtype is None:
            raise ValueError(f"unknown array element type {kind} at byte {self.at}")
        size = np.dtype(dtype).itemsize * count
        self.need(size, f"an array of {count} values")
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.at)
        self.at += size
        return values.tolist()  # type: ignore[no-any-return]


class GGUFMetadata:
    """`fields` (key → Field) and `tensors` (headers) of one GGUF file."""

    def __init__(self, fields: dict[str, Field], tensors: list[TensorInfo], version: int) -> None:
        self.fields = fields
        self.tensors = tensors
        self.version = version

    @classmethod
    def read(cls, path: Path | str) -> GGUFMetadata:
        """Parse the header, metadata and tensor infos; ValueError if it is not a GGUF file this
        reads (big-endian, an unknown version, or truncated/corrupt), OSError if unreadable."""
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cur = _Cursor(data)
            cur.need(4, "the magic")
            if data[:4] != MAGIC:
                raise ValueError(f"does not start with {MAGIC!r}")
            cur.at = 4
            version = cur.u32()
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (little-endian 2 or 3 is read)")
            n_tensors, n_fields = cur.u64(), cur.u64()
            cur.need(n_fields * 12, f"{n_fields} metadata entries")
            fields: dict[str, Field] = {}
            for _ in range(n_fields):
                key = cur.string()
                fields[key] = Field(cur.value(cur.u32()))
            cur.need(n_tensors * 24, f"{n_tensors} tensor infos")
            tensors: list[TensorInfo] = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = cur.u32()
                if dims > 8:
                    raise ValueError(f"tensor {name!r} has {dims} dimensions")
                shape = tuple(cur.u64() for _ in range(dims))
                ggml_type = cur.u32()
                cur.u64()  # the data's offset: not read here
                tensors.append(TensorInfo(name, shape, ggml_type))
        return cls(fields, tensors, version)
