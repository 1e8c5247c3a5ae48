"""Snapshots: one file holding the collection's spec, documents and hnswlib index, written to a
temporary file, fsync'd and renamed over the old one, so a crash leaves the old or the new one.

File = magic | u64 JSON length | JSON {spec, seq, state} | hnswlib index bytes. `seq` is the last
WAL record the snapshot contains; replay skips records up to it (a crash between the rename and
the WAL truncation would otherwise apply them twice, which is harmless but wasteful)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from router.retrieval.index import VectorIndex
from router.retrieval.spec import CollectionSpec

SNAPSHOT = "snapshot"
_MAGIC = b"IRSNAP1\n"
_LEN = struct.Struct("<Q")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(folder: Path, index: VectorIndex, seq: int, *, fsync: bool = True) -> None:
    index_tmp = folder / "index.tmp"
    state = index.save(index_tmp)
    header = json.dumps({"spec": index.spec.to_json(), "seq": seq, "state": state}).encode()
    tmp = folder / (SNAPSHOT + ".tmp")
    with open(tmp, "wb") as out, open(index_tmp, "rb") as blob:
        out.write(_MAGIC + _LEN.pack(len(header)) + header)
        while chunk := blob.read(1 << 20):
            out.write(chunk)
        out.flush()
        if fsync:
            os.fsync(out.fileno())
    index_tmp.unlink()
    os.replace(tmp, folder / SNAPSHOT)
    if fsync:
        fsync_dir(folder)


def read_snapshot(folder: Path) -> tuple[VectorIndex, int]:
    """The index and the last WAL sequence number it contains."""
    data = (folder / SNAPSHOT).read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{folder / SNAPSHOT} is not an irouter snapshot")
    (length,) = _LEN.unpack_from(data, len(_MAGIC))
    start = len(_MAGIC) + _LEN.size
    header = json.loads(data[start : start + length])
    index_tmp = folder / "index.load.tmp"
    index_tmp.write_bytes(data[start + length :])
    try:
        index = VectorIndex.load(
            CollectionSpec.from_json(header["spec"]), index_tmp, header["state"]
        )
    finally:
        index_tmp.unlink()
    return index, int(header["seq"])
