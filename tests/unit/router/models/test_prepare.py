from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor
from tokenizers import Tokenizer

from router.models.decoder_onnx import INT8_SCHEME, INT8_WEIGHT_MAX, PREFILL_GRAPH
from router.models.prepare import FORMAT_VERSION, _is_current, prepare_encoder


def _manifest(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "manifest.json").read_text())
    return data


def test_decoder_manifest_holds_what_the_server_needs(prepared_models: dict[str, Path]) -> None:
    m = _manifest(prepared_models["smollm2-135m-instruct"])
    assert m["format_version"] == FORMAT_VERSION
    assert m["kind"] == "decoder"
    assert m["quantization"] == "int4"
    assert m["context_length"] == 8192
    assert (m["vocab_size"], m["num_layers"], m["num_kv_heads"], m["head_dim"]) == (
        49152,
        30,
        3,
        64,
    )
    assert m["bos_token_id"] == 1
    assert m["eos_token_id"] == 2
    assert 2 in m["stop_token_ids"]  # type: ignore[operator]
    assert "<|im_start|>" in str(m["chat_template"])
    assert _manifest(prepared_models["smollm2-135m-instruct-fp32"])["quantization"] == "fp32"


def test_decoder_folder_is_complete(prepared_models: dict[str, Path]) -> None:
    folder = prepared_models["smollm2-135m-instruct"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "manifest.json"} <= names
    # No staging folders are left next to the published ones.
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_int4_decoder_carries_an_int8_prefill_graph(prepared_models: dict[str, Path]) -> None:
    folder = prepared_models["smollm2-135m-instruct"]
    assert _manifest(folder)["prefill_graph"] == {
        "file": PREFILL_GRAPH,
        "quantization": "int8",
        "attention": "packed",
        "int8_scheme": INT8_SCHEME,
    }
    assert "prefill_graph" not in _manifest(prepared_models["smollm2-135m-instruct-fp32"])
    graph = onnx.load(str(folder / PREFILL_GRAPH), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # Every projection (30 layers x 4) in int8; in float the head and the attention's two
    # matmuls a layer (queries x keys, weights x values), no GroupQueryAttention.
    assert ops.count("MatMulIntegerToFloat") == 120 and "MatMulNBits" not in ops
    assert ops.count("MatMul") == 31 and ops.count("FusedMatMul") == 30
    assert "GroupQueryAttention" not in ops
    tensor = next(t for t in graph.initializer if t.name == "l0.qkv_proj.weight.q8")
    load_external_data_for_tensor(tensor, str(folder))
    codes = numpy_helper.to_array(tensor)
    assert codes.dtype == np.int8 and codes.shape == (576, 960)
    assert np.abs(codes).max() == INT8_WEIGHT_MAX  # 7 bits: no u8 x s8 pair sum saturates


def test_an_int4_folder_without_its_prefill_graph_is_prepared_again(
    prepared_models: dict[str, Path], tmp_path: Path
) -> None:
    manifest = _manifest(prepared_models["smollm2-135m-instruct"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "model.onnx").write_bytes(b"")
    assert not _is_current(tmp_path, "int4")
    (tmp_path / PREFILL_GRAPH).write_bytes(b"")
    assert _is_current(tmp_path, "int4")
    # A prefill graph of the first kind (GroupQueryAttention, one prompt a call) or of an older
    # int8 scheme is built again too; so is a whole-int8 folder of an older scheme.
    first_kind = {"file": PREFILL_GRAPH, "quantization": "int8"}
    for entry in (first_kind, {**manifest["prefill_graph"], "int8_scheme": 1}):
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "prefill_graph": entry}))
        assert not _is_current(tmp_path, "int4")
    int8 = {**manifest, "quantization": "int8", "int8_scheme": INT8_SCHEME}
    (tmp_path / "manifest.json").write_text(json.dumps(int8))
    assert _is_current(tmp_path, "int8")
    (tmp_path / "manifest.json").write_text(json.dumps({**int8, "int8_scheme": 1}))
    assert not _is_current(tmp_path, "int8")


def test_encoder_manifest_and_tokenizer(prepared_models: dict[str, Path]) -> None:
    folder = prepared_models["all-minilm-l6-v2"]
    m = _manifest(folder)
    assert (m["kind"], m["embedding_dim"], m["max_length"]) == ("encoder", 384, 256)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.padding is None  # the engine pads per batch
    assert len(tok.encode("word " * 600).ids) == 256


def test_prepare_reuses_a_current_folder(prepared_models: dict[str, Path]) -> None:
    folder = prepared_models["all-minilm-l6-v2"]
    before = (folder / "model.onnx").stat().st_mtime_ns
    assert prepare_encoder(folder.parent, progress=False) == folder
    assert (folder / "model.onnx").stat().st_mtime_ns == before


def test_prepare_rebuilds_an_outdated_folder(tmp_path: Path) -> None:
    first = prepare_encoder(tmp_path, progress=False)
    manifest = _manifest(first)
    manifest["format_version"] = -1
    (first / "manifest.json").write_text(json.dumps(manifest))
    again = prepare_encoder(tmp_path, progress=False)
    assert _manifest(again)["format_version"] == FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-minilm-l6-v2"]
