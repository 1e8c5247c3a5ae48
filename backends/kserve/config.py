"""Where a remote KServe v2 gRPC server is and how its model's tensors are named (KServeConfig):
the `kserve:` section of a model, and each kserve_grpc replica's url and model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.kserve.wire import SAMPLING_DATATYPES, TRTLLM_SAMPLING_INPUTS

STREAM_MODES = ("auto", "on", "off")
_URL_SCHEME = "grpc://"


@dataclass(frozen=True)
class KServeConfig:
    """One remote KServe v2 gRPC server and the text-generation model it serves."""

    url: str = ""
    """'host:port' of the gRPC endpoint (a 'grpc://' prefix is accepted), e.g. '10.0.0.7:8001'.
    Empty only in a models[] entry behind a deployment whose replicas each give their own url."""
    model: str = ""
    """Model name on the server: sent as model_name, and probed by ready(). Empty only behind a
    deployment (each replica's remote_model, else the router's model name)."""
    model_version: str = ""
    """Model version; empty lets the server choose."""
    stream: str = "auto"
    """'on': ModelStreamInfer; 'off': ModelInfer; 'auto': the stream if the server has it
    (asked once, on the first request)."""
    text_input: str = "text_input"
    """BYTES input holding the rendered prompt."""
    max_tokens_input: str = "max_tokens"
    """INT32 input holding max_tokens."""
    stream_input: str = "stream"
    """BOOL input telling the model to stream (True on ModelStreamInfer); empty: not sent."""
    sampling_inputs: Mapping[str, str] = field(default_factory=lambda: dict(TRTLLM_SAMPLING_INPUTS))
    """Input tensor of each sampling field (keys: temperature, top_p, top_k, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, seed), sent only when the field is
    set away from its neutral value; a set field without a tensor is refused. A mapping given
    replaces the default whole: the names of Triton's TensorRT-LLM ensemble (seed as
    'random_seed', no min_p)."""
    text_output: str = "text_output"
    """BYTES output holding the generated text (without the prompt)."""
    finish_reason_output: str = "finish_reason"
    """BYTES output with 'stop' or 'length', read when present; empty: never read."""
    prompt_tokens_output: str = "num_input_tokens"
    """Integer output with the prompt's token count, read when present; empty: never read."""
    completion_tokens_output: str = "num_output_tokens"
    """Integer output with the generated token count, read when present; empty: never read."""
    batch_dim: bool = True
    """Inputs have shape [1, 1] (a batching model, e.g. TensorRT-LLM's ensemble); False: [1]
    (a non-batching model, e.g. Triton's vLLM backend)."""
    connect_timeout_s: float = 5.0
    """Longest wait for the HTTP/2 connection to the server."""
    read_timeout_s: float = 60.0
    """Longest wait for each streamed response, or for the whole ModelInfer answer."""
    context_length: int = 2048
    """Prompt plus completion tokens the remote model accepts."""
    vocab_size: int = 0
    """Vocabulary size of the remote model, for the router's checks (0: unknown)."""

    def require_endpoint(self) -> KServeConfig:
        """Raise ValueError when url or model is missing (say which and how to set it)."""
        if not self.url:
            raise ValueError(
                "url is missing: set it to the server's 'host:port', e.g. 10.0.0.7:8001"
            )
        if not self.model:
            raise ValueError(f"model is missing: set it to the model's name at {self.url}")
        return self

    def validate(self) -> KServeConfig:
        """Raise ValueError naming the first bad field and what it accepts; returns self. An
        empty url or model is left to require_endpoint()."""
        host, _, port = self.target.rpartition(":")
        if self.url and (not host or not port.isdigit() or "/" in self.target):
            raise ValueError(
                f"url={self.url!r} must be 'host:port' (or 'grpc://host:port'), e.g. "
                "'127.0.0.1:8001'"
            )
        if self.stream not in STREAM_MODES:
            raise ValueError(
                f"stream={self.stream!r} is unknown; accepted: {', '.join(STREAM_MODES)}"
            )
        for name in ("text_input", "max_tokens_input", "text_output"):
            if not getattr(self, name):
                raise ValueError(f"{name} must name a tensor of model {self.model!r}")
        for key, tensor in self.sampling_inputs.items():
            if key not in SAMPLING_DATATYPES:
                raise ValueError(
                    f"sampling_inputs has unknown field {key!r}; accepted: "
                    f"{', '.join(SAMPLING_DATATYPES)}"
                )
            if not isinstance(tensor, str):
                raise ValueError(f"sampling_inputs.{key}={tensor!r} must be a tensor name")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.context_length < 1:
            raise ValueError(f"context_length={self.context_length} must be at least 1")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size={self.vocab_size} must not be negative (0: unknown)")
        return self

    @property
    def target(self) -> str:
        """The channel target, 'host:port'."""
        return self.url.removeprefix(_URL_SCHEME)
