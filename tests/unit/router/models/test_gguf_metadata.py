"""The fast GGUF metadata reader against gguf's own GGUFReader, and on corrupt files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from router.models.gguf_metadata import GGUFMetadata
from router.models.gguf_weights import field_value


def _write(path: Path) -> Path:
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_context_length(4096)
    writer.add_rope_freq_base(10000.5)
    writer.add_string("general.name", "tiny ü")
    writer.add_token_list(["a", "b", "ab", "<|im_end|>", "é"])
    writer.add_token_types([1, 1, 1, 3, 1])
    writer.add_token_merges(["a b"])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_bool("test.flag", True)
    writer.add_tensor("token_embd.weight", np.zeros((5, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_same_fields_and_tensors_as_gguf_reader(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.gguf")
    fast, reference = GGUFMetadata.read(path), GGUFReader(str(path))
    keys = [k for k in reference.fields if not k.startswith("GGUF.")]
    assert list(fast.fields) == keys
    for key in keys:
        expected = field_value(reference, key)
        assert field_value(fast, key) == (
            list(expected) if isinstance(expected, list) else expected
        )
    assert [(t.name, t.shape) for t in fast.tensors] == [
        (t.name, tuple(int(d) for d in t.shape)) for t in reference.tensors
    ]
    assert field_value(fast, "tokenizer.ggml.tokens")[-1] == "é"


def test_not_gguf_and_corrupt_files_raise_value_error(tmp_path: Path) -> None:
    good = _write(tmp_path / "t.gguf").read_bytes()
    cases = {
        "not.gguf": b"PK\x03\x04" + good[4:],
        "version.gguf": good[:4] + struct.pack("<I", 99) + good[8:],
        "truncated.gguf": good[:200],
        # A metadata count no file could hold: refused before any loop runs.
        "huge.gguf": good[:16] + struct.pack("<Q", 2**60) + good[24:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError):
            GGUFMetadata.read(tmp_path / name)
