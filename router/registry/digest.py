"""Content digests (sha256) of model files and folders, as the registry records them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

CHUNK_BYTES = 1 << 20
"""Bytes read at a time while hashing."""


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size in bytes of one file, read in CHUNK_BYTES chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def folder_digest(folder: Path, *, skip: tuple[str, ...] = ()) -> tuple[str, int]:
    """sha256 hex digest and total size in bytes of the regular files under `folder`.

    The digest is a sha256 over one record per file, in the byte order of the files' relative
    paths ('/'-separated, as the file system encodes them): the relative path, a NUL byte (no
    path holds one), the file's own sha256 in hex, and a newline. A renamed, added, removed or
    edited file therefore changes it; timestamps and permissions do not. Left out: every file or
    folder whose name starts with '.' (dot-files, and the staging folders that `irouter models
    prepare` writes), the top-level folders named in `skip`, and symbolic links to folders
    (not followed).
    """
    digest = hashlib.sha256()
    size = 0
    for relative, path in sorted(_files(folder, skip)):
        file_hex, file_size = file_digest(path)
        digest.update(relative + b"\0" + file_hex.encode("ascii") + b"\n")
        size += file_size
    return digest.hexdigest(), size


def _files(folder: Path, skip: tuple[str, ...]) -> Iterator[tuple[bytes, Path]]:
    """(relative path as bytes, path) of each regular file folder_digest covers."""
    for root, dirs, names in os.walk(folder, onerror=_raise):
        top = Path(root) == folder
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (top and d in skip)]
        for name in names:
            path = Path(root, name)
            if name.startswith(".") or not path.is_file():
                continue
            yield os.fsencode(path.relative_to(folder).as_posix()), path


def _raise(error: OSError) -> None:
    """os.walk passes over a folder it cannot list; a digest must not."""
    raise error
