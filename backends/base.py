"""Engine protocols shared by the router and every backend; engines never import router/."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

BACKEND_KINDS: tuple[str, ...] = (
    "onnxruntime",
    "openvino",
    "tensorrt_llm",
    "openai_http",
    "kserve_grpc",
)
"""Values accepted by create_backend(kind=...)."""
PRECISIONS: tuple[str, ...] = ("", "f32", "bf16", "f16")
"""OpenVINO inference precisions; '' keeps the device default (bf16 on CPUs that have it)."""


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, so the router can route and size batches without knowing it."""

    generate: bool
    """Produces next-token logits (a decoder)."""
    embed: bool
    """Produces sentence embeddings (an encoder)."""
    stream: bool
    """Tokens can be emitted one step at a time."""
    device: str
    """Where it runs, e.g. 'cpu'."""
    max_batch: int
    """Most sequences one call may carry (decoder: KV slots)."""
    context_length: int
    """Longest sequence in tokens (decoder: prompt + generated; encoder: input)."""
    text_output: bool = False
    """Request engines: chunks carry detokenized text (else the router detokenizes the ids)."""
    stop_strings: bool = False
    """Request engines: GenerationRequest.stop is honoured by the engine (else by the router)."""


@runtime_checkable
class DecoderStepEngine(Protocol):
    """A decoder driven one step at a time over fixed KV slots.

    Synchronous: the caller runs it in a worker thread. A slot holds one sequence's KV cache;
    the caller allocates slots (lowest free first keeps batched decode cheap) and tells the
    engine when one is free.
    """

    capabilities: Capabilities
    vocab_size: int
    max_slots: int
    max_context: int

    def prefill(self, slot: int, token_ids: IntArray, start: int) -> FloatArray:
        """Compute token_ids at positions start.. into slot; logits [V] of the last one.

        May be called several times for one slot (chunked prefill): start = tokens already
        computed in that slot.
        """
        ...

    def decode(self, slots: IntArray, token_ids: IntArray, positions: IntArray) -> FloatArray:
        """One token per row (row i at positions[i] in slots[i]); logits [B, V] in row order."""
        ...

    def release(self, slot: int) -> None:
        """The slot's sequence is finished; the slot may be reused."""
        ...


@runtime_checkable
class EncoderEngine(Protocol):
    """A sentence-embedding model."""

    capabilities: Capabilities
    dim: int
    max_length: int

    def encode(self, input_ids: IntArray, attention_mask: IntArray) -> FloatArray:
        """int64 [B, L] ids and mask → float32 [B, dim], L2-normalised."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    """One whole request for an engine that schedules requests itself (see RequestEngine)."""

    request_id: str
    """The router's request id, for the engine's logs."""
    prompt_ids: tuple[int, ...]
    """The rendered prompt, tokenized by the router (BOS included when the model wants one)."""
    prompt: str
    """The rendered prompt text (chat template applied), for engines that tokenize themselves."""
    max_tokens: int
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 disables."""
    top_k: int = 0
    """0 disables."""
    min_p: float = 0.0
    """0 disables."""
    repetition_penalty: float = 1.0
    """1 disables; over prompt and output tokens."""
    presence_penalty: float = 0.0
    """OpenAI semantics, over output tokens."""
    frequency_penalty: float = 0.0
    """OpenAI semantics, over output tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings; the router applies them when capabilities.stop_strings is False."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the request besides the model's own end tokens (returned as tokens)."""
    seed: int = 0
    """Sampling seed (the router draws one when the client sets none)."""
    ignore_eos: bool = False
    """Keep going past the model's end tokens (stop_token_ids still stop)."""


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """What a request engine produced for one request since its previous chunk."""

    token_ids: tuple[int, ...]
    """New tokens, in order (possibly none, e.g. on a final chunk)."""
    text: str | None = None
    """Their text when the engine detokenizes (capabilities.text_output), else None."""
    finish_reason: str | None = None
    """On the last chunk only: 'stop' (an end or stop token/string) or 'length' (max_tokens)."""


class UnsupportedParameter(ValueError):
    """A GenerationRequest field the engine cannot honour; refused rather than ignored."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        """The GenerationRequest field's name, e.g. 'min_p'."""


class StepObserver(Protocol):
    """Receives one call per engine step (the router's model metrics implement it)."""

    def on_step(self, batch_size: int, waiting: int, running: int, seconds: float) -> None: ...


@runtime_checkable
class RequestEngine(Protocol):
    """A decoder that takes whole requests and batches them itself (OpenVINO GenAI's continuous
    batching; later TensorRT-LLM and remote servers). The router only admits, orders and
    streams; it never sees logits.

    `start()` is called on the event loop that will call `generate`, `stop()` when the router
    shuts down. `generate` validates the request first (UnsupportedParameter or ValueError
    naming the field), then yields chunks until a chunk carries a finish_reason. Closing the
    iterator early cancels the request and frees its resources (KV blocks) within one step.
    """

    capabilities: Capabilities
    vocab_size: int
    max_slots: int
    """Sequences the engine runs together; more wait inside it."""
    max_context: int

    @property
    def num_active(self) -> int:
        """Requests the engine holds now (running or waiting inside it)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]: ...


def encoder_inputs(
    input_ids: IntArray, attention_mask: IntArray, max_length: int
) -> dict[str, IntArray]:
    """A BERT-style encoder's feeds, checked: equal non-empty [B, L] int64 ids and mask, L within
    max_length, token types all zero (one segment)."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(
            f"input_ids and attention_mask must be equal non-empty [B, L] arrays, got "
            f"{ids.shape} and {mask.shape}"
        )
    if ids.shape[1] > max_length:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds max_length={max_length}")
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """Load model_dir/manifest.json (written by the model preparation step)."""
    path = Path(model_dir) / "manifest.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist; prepare the model first (`irouter models prepare`)"
        ) from None
    return data


Engine = DecoderStepEngine | RequestEngine | EncoderEngine


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
        import dataclasses

        from backends.openai_http import OpenAIHttpEngine

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
        import dataclasses

        from backends.remote_kserve import KServeEngine

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
            from backends.openvino_engine import OpenVinoEncoder
            from backends.openvino_pipeline import OpenVinoGenerator
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
