"""Write-ahead log: length-prefixed, checksummed JSON records, fsync'd before an acknowledgement.

Record = u32 length | u32 crc32 | JSON. A torn or corrupt tail (a crash mid-append) ends the log:
reading stops there and opening truncates it, so every complete record before it survives."""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from router.retrieval.index import Vectors

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")


def encode_vectors(vectors: Vectors) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode()


def decode_vectors(text: str, dimension: int) -> Vectors:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(-1, dimension).copy()


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records and the byte length they span."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[dict[str, Any]] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        records.append(json.loads(body))
        pos += _HEADER.size + length
    if pos < len(data):
        logger.warning("%s: dropping %d bytes of torn tail", path, len(data) - pos)
    return records, pos


class Wal:
    """Append-only; not thread-safe (the collection's write lock serialises appends)."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self._fsync = fsync
        records, good = read_records(path)
        self.records = len(records)
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the collection's life
        if self._file.tell() != good:
            self._file.truncate(good)
            self._sync()

    def append(self, record: dict[str, Any]) -> None:
        body = json.dumps(record, separators=(",", ":")).encode()
        self._file.write(_HEADER.pack(len(body), zlib.crc32(body)) + body)
        self._sync()
        self.records += 1

    def truncate(self) -> None:
        self._file.truncate(0)
        self._file.seek(0)
        self._sync()
        self.records = 0

    def close(self) -> None:
        self._file.close()

    def _sync(self) -> None:
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
