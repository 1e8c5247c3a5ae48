"""Engines built from configuration: `create_backend(kind, model_dir, **options)` for every kind
in BACKEND_KINDS (naming the accepted kinds for an unknown one), `create_remote_embedder` for an
embedding model served by an OpenAI-compatible server, and the remote sections' config types.

Each engine module is imported only when its kind is built, so serving ONNX Runtime models never
loads openvino, httpx engines or tensorrt_llm. This is the one module of backends/ besides base.py
and remote.py that the router imports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from backends.artifact import read_manifest
from backends.base import (
    BACKEND_KINDS,
    DecoderStepEngine,
    EncoderEngine,
    RemoteEmbedder,
    RequestEngine,
)
from backends.kserve.config import KServeConfig
from backends.openai.config import OpenAIHttpConfig

__all__ = [
    "Engine",
    "KServeConfig",
    "OpenAIHttpConfig",
    "create_backend",
    "create_remote_embedder",
    "create_remote_generator",
    "unloaded_files",
]

Engine = DecoderStepEngine | RequestEngine | EncoderEngine


def unloaded_files(
    kind: str, model_dir: Path, *, prefill_graph: str = "auto", decode_kernel: str = "auto"
) -> list[Path]:
    """Files of a prepared model folder that an engine of `kind` with these options does not
    load (so resources do not count them as its weights): an ONNX Runtime decoder's int8 prompt
    graph where its own graph or the native kernels compute prompts. Empty when the options
    would not load at all."""
    if kind != "onnxruntime":
        return []
    try:
        manifest = read_manifest(model_dir)
    except ValueError:  # no manifest: nothing that would load
        return []
    if manifest.get("kind") != "decoder":
        return []
    from backends.prompt_graphs import unused_files

    try:
        return unused_files(manifest, model_dir, prefill_graph, decode_kernel)
    except ValueError:
        return []


def _onnx_manifest(kind: str, model_dir: Path) -> dict[str, Any] | None:
    """The manifest of an ONNX Runtime engine's folder; None for another kind or no manifest."""
    if kind != "onnxruntime":
        return None
    try:
        return read_manifest(model_dir)
    except ValueError:
        return None


def native_copy_bytes(kind: str, model_dir: Path, *, decode_kernel: str = "auto") -> int:
    """Resident bytes an engine of `kind` holds beyond its folder's files: an ONNX Runtime
    decoder's native decode step keeps its own copy of the int4 graph's weights."""
    manifest = _onnx_manifest(kind, model_dir)
    if manifest is None:
        return 0
    from backends.native_decode import native_copy_bytes as copy_bytes

    return copy_bytes(model_dir, manifest, decode_kernel)


def kv_value_bytes(
    kind: str, model_dir: Path, *, prefill_graph: str = "auto", decode_kernel: str = "auto"
) -> int:
    """Bytes of one key or value element in an engine of `kind`'s KV cache: 2 (float16) where
    an ONNX Runtime decoder's native kernels compute every step, else 4 (float32)."""
    manifest = _onnx_manifest(kind, model_dir)
    if manifest is None:
        return 4
    from backends.native_decode import kv_value_bytes as value_bytes

    return value_bytes(model_dir, manifest, decode_kernel, prefill_graph)


def create_backend(kind: str, model_dir: Path, **options: Any) -> Engine:
    """Build the engine of backend `kind` for the model in model_dir.

    Decoder or encoder is chosen from the manifest's `kind`; options go to its constructor.
    ONNX Runtime decoders are step engines; OpenVINO decoders are request engines.
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; accepted: {', '.join(BACKEND_KINDS)}")
    manifest = read_manifest(model_dir)
    model_kind = manifest.get("kind")
    if model_kind not in ("decoder", "encoder"):
        raise ValueError(
            f"manifest of {model_dir} has kind={model_kind!r}; expected 'decoder' or 'encoder'"
        )
    if kind == "openai_http":
        if model_kind != "decoder":
            raise ValueError("backend 'openai_http' serves generation models only")
        from backends.openai.engine import OpenAIHttpEngine

        remote = options["remote"]
        return OpenAIHttpEngine(
            dataclasses.replace(
                remote,
                context_length=int(options["max_context"]),
                max_connections=max(remote.max_connections, int(options["max_slots"])),
                vocab_size=int(manifest["vocab_size"]),
            )
        )
    if kind == "kserve_grpc":
        if model_kind != "decoder":
            raise ValueError("backend 'kserve_grpc' serves generation models only")
        from backends.kserve.engine import KServeEngine

        return KServeEngine(
            dataclasses.replace(
                options["kserve"],
                context_length=int(options["max_context"]),
                vocab_size=int(manifest["vocab_size"]),
            ),
            max_slots=int(options["max_slots"]),
        )
    if kind == "tensorrt_llm":
        if model_kind != "decoder":
            raise ValueError("backend 'tensorrt_llm' serves generation models only")
        from backends.tensorrt_llm import TensorRTLLMEngine, load_llm

        device = str(options.get("device", "cuda"))
        llm, sampling_params = load_llm(options.get("engine_path") or model_dir)
        return TensorRTLLMEngine(
            llm,
            sampling_params,
            vocab_size=int(manifest["vocab_size"]),
            max_slots=int(options["max_slots"]),
            max_context=int(options["max_context"]),
            device="cuda" if device == "CPU" else device,
        )
    if kind == "openvino":
        # Imported here: the router runs ONNX Runtime models without openvino installed.
        try:
            from backends.openvino.engine import OpenVinoEncoder
            from backends.openvino.pipeline import OpenVinoGenerator
        except ImportError as exc:
            raise ValueError(
                f"backend 'openvino' needs the openvino and openvino-genai packages ({exc}); "
                "pip install openvino openvino-genai"
            ) from exc

        if model_kind == "decoder":
            return OpenVinoGenerator(Path(model_dir), **options)
        return OpenVinoEncoder(Path(model_dir), **options)
    # Imported here so that importing the protocols never loads onnxruntime.
    from backends.onnx_runtime import OnnxDecoder, OnnxEncoder

    if model_kind == "decoder":
        return OnnxDecoder(Path(model_dir), **options)
    return OnnxEncoder(Path(model_dir), **options)


def create_remote_generator(
    config: OpenAIHttpConfig, *, max_slots: int, max_context: int
) -> RequestEngine:
    """A generation model served by the OpenAI-compatible server `config` names, with no local
    artifact: it takes conversations as they are (Capabilities.chat)."""
    from backends.openai.engine import OpenAIHttpEngine

    return OpenAIHttpEngine(
        dataclasses.replace(
            config,
            context_length=max_context,
            max_connections=max(config.max_connections, max_slots),
        )
    )


def create_remote_embedder(config: OpenAIHttpConfig) -> RemoteEmbedder:
    """An embedding model served by the OpenAI-compatible server `config` names."""
    from backends.openai.engine import OpenAIHttpEmbedder

    return OpenAIHttpEmbedder(config)


def openvino_devices() -> list[tuple[str, str]]:
    """(device, its full name) for every device OpenVINO can run on here ('CPU', 'GPU.0',
    'NPU'...). Imports OpenVINO (about half a second the first time)."""
    from backends.openvino.engine import core

    ov = core()
    return [(d, str(ov.get_property(d, "FULL_DEVICE_NAME"))) for d in ov.available_devices]
