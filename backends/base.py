"""Engine protocols shared by the router and every backend; engines never import router/."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
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
PREFILL_GRAPHS: tuple[str, ...] = ("auto", "int8", "model", "native")
"""ONNX Runtime decoders: what computes prompts ('model': the decoder's own graph; 'native':
the native decode step's kernels, backends.native_decode)."""
DECODE_KERNELS: tuple[str, ...] = (
    "auto",
    "native",
    "onnxruntime",
    "avx2",
    "avx512-vnni",
    "amx-int8",
)
"""ONNX Runtime decoders: what computes decode steps ('native': backends.native_decode on the
CPU's best int4 matmul tile; 'avx2', 'avx512-vnni' or 'amx-int8': native on that tile, the same
bits; on an AVX-512 host 'avx2' measures the decode step an AVX2-only host runs, on an AMX host
'avx512-vnni' the one without AMX)."""
BURST_GAP_S = 0.003
"""Woken from idle, an engine (the OpenVINO worker too) waits this long for another call
before its first step..."""
BURST_WINDOW_S = 0.025
"""...and at most this long in all (gather_burst)."""


def gather_burst(arrived: Callable[[float], bool]) -> None:
    """Woken from idle by a call, let the rest of a burst arrive before the first step: calls
    that come together reach an engine a millisecond or two apart (each is parsed and tokenized
    first), and stepping at once prefilled the first alone while the others waited out its step
    or came in a few at a time beside its decode steps (16 calls at once, AMD EPYC: OpenVINO's
    worker TTFT median 2.0 s, 0.70 s gathered; the router's engine TTFT max 645 ms, 343 ms).
    `arrived(timeout)` waits up to `timeout` seconds for the next call and says whether one
    came; gathering ends at the first gap of BURST_GAP_S or after BURST_WINDOW_S."""
    deadline = time.monotonic() + BURST_WINDOW_S
    while (left := deadline - time.monotonic()) > 0 and arrived(min(BURST_GAP_S, left)):
        pass


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
    structured_output: bool = False
    """Request engines: GenerationRequest.structured is enforced by the engine (else a request
    with one is refused: only the router's own step loop can enforce it)."""
    chat: bool = False
    """Request engines: takes a conversation as it is (GenerationRequest.chat) and renders it
    itself, with its own chat template and tool-call parser (remote OpenAI-compatible servers)."""


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
class BatchedPrefill(Protocol):
    """A step engine that computes the prompt chunks of several slots in one call (optional)."""

    def prefill_batch(
        self, slots: Sequence[int], chunks: Sequence[IntArray], starts: Sequence[int]
    ) -> FloatArray:
        """prefill(slots[i], chunks[i], starts[i]) for every row at once; logits [B, V] in row
        order, each row's the same as prefill alone would give."""
        ...


@runtime_checkable
class PrefixBorrowing(Protocol):
    """A step engine whose prompt chunks can read their first positions from another slot
    (optional): a prompt sharing a prefix with one computed in the same call reads it there
    instead of waiting for it to be cached (router.scheduler.shared_prefix)."""

    borrows_prefixes: bool
    """Whether prefill_batch takes `prefixes` (False: it refuses them)."""

    def prefill_batch(
        self,
        slots: Sequence[int],
        chunks: Sequence[IntArray],
        starts: Sequence[int],
        prefixes: Sequence[tuple[int, int] | None] | None = None,
    ) -> FloatArray:
        """BatchedPrefill's call; row i with prefixes[i] = (slot, n) reads positions 0..n-1
        from that slot (computed there before, or by its rows of this call; n = starts[i]),
        the same bits as if its own slot held them. The engine copies them into its slot
        before anything else reads or writes either slot (`settle`)."""
        ...

    def settle(self) -> None:
        """Copy now the prefixes read from other slots into the slots that read them (the
        runner calls this once a step's tokens are delivered, off their first tokens' path)."""
        ...


@runtime_checkable
class PrefixKVStore(Protocol):
    """A step engine that can keep KV aside for prefix caching (optional): a pool of numbered
    blocks, each `block_size` consecutive positions of one slot's KV, copied out of a slot and
    back into any slot at the same positions (keys carry their rotary position)."""

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV one token holds (all layers, keys and values)."""
        ...

    def open_pool(self, num_blocks: int, block_size: int) -> None:
        """Allocate (and touch, so resident memory is what it will be) the block pool."""
        ...

    def save_blocks(self, blocks: Sequence[int], slot: int, start: int) -> None:
        """Copy positions start..start+len(blocks)*block_size of `slot` (computed) into pool
        `blocks`, in order."""
        ...

    def load_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        """Copy `blocks` into `slot` at positions 0..len(blocks)*block_size, which become its
        computed tokens (a prefill then continues from there)."""
        ...

    def slot_length(self, slot: int) -> int:
        """Tokens computed so far in `slot`."""
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


class RemoteEmbedder(Protocol):
    """An embedding model on another server (OpenAI-compatible /v1/embeddings); asynchronous,
    called on the event loop."""

    def start(self) -> None:
        """Open the connection pool (on the loop that will call embed)."""
        ...

    async def aclose(self) -> None: ...

    async def embed(self, texts: Sequence[str]) -> FloatArray:
        """float32 [len(texts), dim]; raises a RemoteError naming the server on failure."""
        ...

    async def embed_counted(self, texts: Sequence[str]) -> tuple[FloatArray, int | None]:
        """`embed`, and the server's count of the texts' tokens (None when it gives none)."""
        ...


STRUCTURED_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "grammar")
"""What a StructuredOutput may constrain the output to."""


@dataclass(frozen=True)
class StructuredOutput:
    """The format an output must have (see SamplingParams.structured). Engines that batch
    themselves honour it only when their capabilities say structured_output; the router enforces
    it for step engines, token by token."""

    kind: str
    """One of STRUCTURED_KINDS."""
    text: str = ""
    """The JSON schema (JSON text), regex or Lark grammar; empty for json_object."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: every field a client may set, with the value that leaves sampling as the
    model has it. Shared by the router's requests and the engines' (GenerationRequest)."""

    max_tokens: int = 256
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
    """1 disables; applies to prompt and output tokens."""
    presence_penalty: float = 0.0
    """OpenAI semantics, over output tokens."""
    frequency_penalty: float = 0.0
    """OpenAI semantics, over output tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings (not returned); request engines honour them when capabilities.stop_strings,
    else the router applies them."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop token ids (returned as tokens, not as text)."""
    seed: int | None = None
    """None draws a random seed."""
    ignore_eos: bool = False
    """Keep going past end tokens."""
    structured: StructuredOutput | None = None
    """Only outputs of this format may be generated (None: any)."""


@dataclass(frozen=True)
class ChatRequest:
    """A conversation for an engine that renders it itself (Capabilities.chat): a model served
    with no local artifact, whose server holds the chat template and the tool-call parser. In
    the OpenAI chat API's form, which every such server takes."""

    messages: tuple[Mapping[str, Any], ...]
    """OpenAI chat messages (role, content as a string or a list of parts, tool_calls,
    tool_call_id), sent as they are."""
    tools: tuple[Mapping[str, Any], ...] = ()
    """OpenAI tool definitions ({"type": "function", "function": {...}})."""
    tool_choice: str | Mapping[str, Any] | None = None
    """"auto", "none", "required" or {"type": "function", "function": {"name": ...}}; None:
    not sent."""
    parallel_tool_calls: bool | None = None
    """None: not sent (the server's default)."""


@dataclass(frozen=True, kw_only=True)
class GenerationRequest(SamplingParams):
    """One whole request for an engine that schedules requests itself (see RequestEngine): the
    sampling parameters (declared once, in SamplingParams) plus what the engine needs to run it.
    max_tokens is final (the router fitted it to the context) and seed is drawn."""

    request_id: str
    """The router's request id, for the engine's logs."""
    prompt_ids: tuple[int, ...]
    """The rendered prompt, tokenized by the router (BOS included when the model wants one)."""
    prompt: str
    """The rendered prompt text (chat template applied), for engines that tokenize themselves."""
    seed: int = 0
    """Sampling seed (the router draws one when the client sets none)."""
    chat: ChatRequest | None = None
    """The conversation itself, for an engine that renders it (prompt and prompt_ids are then
    empty); None: the router rendered and tokenized the input."""
    stream: bool = True
    """False: the caller takes the answer whole (a unary call), so an engine may fetch it in
    one piece (a remote server's non-streamed answer) and yield it as one chunk."""


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A streamed piece of tool call number `index`: its first piece has the id and name, later
    pieces append to its arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """What a request engine produced for one request since its previous chunk."""

    token_ids: tuple[int, ...]
    """New tokens, in order (possibly none, e.g. on a final chunk)."""
    text: str | None = None
    """Their text when the engine detokenizes (capabilities.text_output), else None."""
    finish_reason: str | None = None
    """On the last chunk only: 'stop' (an end or stop token/string), 'length' (max_tokens),
    'tool_calls' (a chat engine's answer is tool calls) or 'content_filter' (the server's own
    filter ended it)."""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    """Chat engines: pieces of the tool calls the server parsed from the output."""
    tokens: int = -1
    """Engines that stream text only: the tokens it stands for when more than its one event
    (a remote server's events that arrived together); -1: one if it holds output."""


class UnsupportedParameter(ValueError):
    """A GenerationRequest field the engine cannot honour; refused rather than ignored."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        """The GenerationRequest field's name, e.g. 'min_p'."""


class StepObserver(Protocol):
    """Receives one call per engine step (the router's model metrics implement it)."""

    def on_step(self, batch_size: int, waiting: int, running: int, seconds: float) -> None: ...

    def on_prefix_cache(self, hit_tokens: int, prompt_tokens: int) -> None:
        """Prompt tokens looked up in the prefix cache since the last call, and those found."""
        ...

    def on_reply_fill(self, tokens: int) -> None:
        """Tokens of finished replies computed again into the prefix cache while idle."""
        ...


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
