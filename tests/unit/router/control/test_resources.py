"""What a local engine is counted as holding (router/control/resources.py: need)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from backends import prompt_graphs
from router.config import ModelConfig
from router.control.resources import need

SIZES = {
    "model.onnx": 100,
    "model.onnx.data": 1_000,
    "prefill.onnx": 10,
    "prefill.onnx.data": 5_000,
    "tokenizer.json": 7,
}


@pytest.fixture
def decoder_dir(tmp_path: Path) -> Path:
    manifest = {
        "kind": "decoder",
        "num_layers": 2,
        "num_kv_heads": 1,
        "head_dim": 4,
        "prefill_graph": {"file": "prefill.onnx", "quantization": "int8", "attention": "packed"},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for name, size in SIZES.items():
        (tmp_path / name).write_bytes(b"x" * size)
    return tmp_path


@pytest.mark.parametrize(
    ("prefill_graph", "cpu_flag", "counted"),
    [
        ("model", "avx512_vnni", False),
        ("auto", None, False),
        ("auto", "avx512_vnni", True),
        ("int8", None, True),
    ],
)
def test_the_prompt_graph_counts_as_weights_only_where_the_engine_loads_it(
    decoder_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    prefill_graph: str,
    cpu_flag: str | None,
    counted: bool,
) -> None:
    monkeypatch.setattr(prompt_graphs, "int8_dot_flag", lambda: cpu_flag)
    config = ModelConfig(name="m", kind="generate", artifact="m", prefill_graph=prefill_graph)
    _, weights = need(config, decoder_dir)
    manifest = (decoder_dir / "manifest.json").stat().st_size
    prompt_graph = SIZES["prefill.onnx"] + SIZES["prefill.onnx.data"]
    assert weights == sum(SIZES.values()) + manifest - (0 if counted else prompt_graph)


@pytest.mark.parametrize(
    ("decode_kernel", "kernel", "quantization", "graph_problem", "counted"),
    [
        ("auto", "avx2", "int4", None, True),
        ("native", "avx512-vnni", "int4", None, True),
        ("onnxruntime", "avx2", "int4", None, False),
        ("auto", "", "int4", None, False),  # no kernel for this CPU: the graph decodes
        ("auto", "avx2", "int8", None, False),  # a graph the native step does not read
        # The graph itself refused at load (its nodes, a missing weight): it decodes, in float32.
        ("auto", "avx2", "int4", "the graph has no l0.ffn_norm", False),
    ],
)
def test_where_the_native_kernels_load_their_copy_counts_instead_of_the_graphs(
    decoder_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    decode_kernel: str,
    kernel: str,
    quantization: str,
    graph_problem: str | None,
    counted: bool,
) -> None:
    from backends import native_decode

    manifest = json.loads((decoder_dir / "manifest.json").read_text())
    manifest |= {"quantization": quantization, "graph": "gqa-shared-kv", "head_dim": 64}
    (decoder_dir / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(native_decode, "q4_best_kernel", lambda: kernel)
    # The folder's graph files are stand-ins: what the graph check finds is given here.
    monkeypatch.setattr(native_decode, "_graph_checks", lambda *_: graph_problem)
    monkeypatch.setattr(prompt_graphs, "int8_dot_flag", lambda: "avx512_vnni")
    config = ModelConfig(name="m", kind="generate", artifact="m", decode_kernel=decode_kernel)
    kv, weights = need(config, decoder_dir)
    files = sum(SIZES.values()) + (decoder_dir / "manifest.json").stat().st_size
    # Loaded, the native kernels compute prompts and decode steps (prefill_graph auto): neither
    # graph is loaded, and the kernels hold a copy of the int4 graph's weights instead.
    graphs = sum(SIZES.values()) - SIZES["tokenizer.json"]
    copy = SIZES["model.onnx"] + SIZES["model.onnx.data"]
    assert weights == files + (copy - graphs if counted else 0)
    # Where they compute every step, the KV cache is float16 (the graphs' float32 otherwise).
    values = 2 * manifest["num_layers"] * manifest["num_kv_heads"] * manifest["head_dim"]
    per_token = values * (2 if counted else 4)
    cache = config.prefix_cache_mb << 20
    assert kv == config.max_slots * config.max_context * per_token + cache
    int8_prompts = dataclasses.replace(config, prefill_graph="int8")
    assert (
        need(int8_prompts, decoder_dir)[0]
        == config.max_slots * config.max_context * (values * 4) + cache
    )
