"""What goes over the wire to a KServe v2 (Open Inference Protocol) gRPC server, as pure
functions: which GenerationRequest fields become which input tensors, the ModelInferRequest for
one request, the reading of one response (text, finish reason, token counts), and gRPC failures
as the backends' RemoteError hierarchy.

Text generation over the v2 protocol is a convention, not part of it. The defaults follow
Triton's TensorRT-LLM ensemble: a BYTES `text_input`, an INT32 `max_tokens`, a BOOL `stream`,
one tensor per sampling field (`temperature`, `top_p`, `top_k`, `random_seed`, ...) and a BYTES
`text_output`; token counts and the finish reason are read when the model returns them (Triton's
vLLM backend names: `num_input_tokens`, `num_output_tokens`, `finish_reason`). A sampling field
set away from its neutral value with no tensor to carry it is refused by name
(UnsupportedParameter) before anything is sent.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import numpy as np

from backends.base import GenerationRequest, UnsupportedParameter
from backends.kserve import grpc_predict_v2_pb2 as pb
from backends.remote import (
    FINISH_REASONS,
    RemoteError,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteTimeout,
    RemoteUnavailable,
)

if TYPE_CHECKING:
    from backends.kserve.config import KServeConfig

SAMPLING_DATATYPES: Mapping[str, str] = MappingProxyType(
    {
        "temperature": "FP32",
        "top_p": "FP32",
        "top_k": "INT32",
        "min_p": "FP32",
        "repetition_penalty": "FP32",
        "presence_penalty": "FP32",
        "frequency_penalty": "FP32",
        "seed": "UINT64",
    }
)
"""GenerationRequest fields that can travel as an input tensor, and that tensor's datatype."""
NEUTRAL: Mapping[str, Any] = MappingProxyType(
    {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop_token_ids": (),
        "ignore_eos": False,
    }
)
"""Fields and the value that leaves sampling unchanged: a field at its neutral value is not
sent. stop_token_ids and ignore_eos have no tensor (the output is text): set, they are refused.
`stop` is not here: the router cuts stop strings from the text itself."""
TRTLLM_SAMPLING_INPUTS: Mapping[str, str] = MappingProxyType(
    {
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "repetition_penalty": "repetition_penalty",
        "presence_penalty": "presence_penalty",
        "frequency_penalty": "frequency_penalty",
        "seed": "random_seed",
    }
)
"""Input tensor names of Triton's TensorRT-LLM ensemble (it has no min_p)."""

RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)
"""Statuses after which the same request may go to another replica (nothing emitted yet)."""
FINAL_RESPONSE_PARAMETER = "triton_final_response"
"""Response parameter by which Triton marks a decoupled model's last response for a request."""


def status_error(url: str, exc: grpc.aio.AioRpcError, *, emitted: bool) -> RemoteError:
    """A failed call as a RemoteError with the server's own message, on one line."""
    code = exc.code()
    details = " ".join((exc.details() or "").split())[:300]
    retryable = not emitted
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RemoteTimeout(
            url, f"no answer in time (DEADLINE_EXCEEDED: {details})", retryable=retryable
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return RemoteUnavailable(url, f"UNAVAILABLE: {details}", retryable=retryable)
    return RemoteStatusError(
        url, f"{code.name}: {details}", code=code, retryable=retryable and code in RETRYABLE_CODES
    )


def sampling_values(request: GenerationRequest, config: KServeConfig) -> dict[str, Any]:
    """The sampling fields to send, by GenerationRequest field name.

    Raises UnsupportedParameter (its field: the first one) naming every field set to a
    non-neutral value that no input tensor carries. The seed travels whenever sampling is
    random and the model has a seed input (the router draws one when the client sets none).
    """
    inputs = config.sampling_inputs
    refused = [
        name
        for name, neutral in NEUTRAL.items()
        if not inputs.get(name) and getattr(request, name) != neutral
    ]
    if refused:
        raise UnsupportedParameter(
            refused[0],
            f"{', '.join(refused)} cannot be honoured by model {config.model!r} at "
            f"{config.url} (no input tensor carries {'it' if len(refused) == 1 else 'them'}); "
            f"leave {'it' if len(refused) == 1 else 'them'} unset or map "
            f"{'it' if len(refused) == 1 else 'them'} in sampling_inputs",
        )
    values = {
        name: getattr(request, name)
        for name, neutral in NEUTRAL.items()
        if name in SAMPLING_DATATYPES and getattr(request, name) != neutral
    }
    if inputs.get("seed") and request.temperature > 0:
        values["seed"] = request.seed
    return values


def _tensor(
    name: str, datatype: str, value: Any, *, batched: bool
) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=[1, 1] if batched else [1]
    )
    contents = tensor.contents
    if datatype == "BYTES":
        contents.bytes_contents.append(value)
    elif datatype == "BOOL":
        contents.bool_contents.append(bool(value))
    elif datatype == "INT32":
        contents.int_contents.append(int(value))
    elif datatype == "UINT64":
        contents.uint64_contents.append(int(value) % 2**64)
    elif datatype == "FP32":
        contents.fp32_contents.append(float(value))
    else:  # pragma: no cover - SAMPLING_DATATYPES holds no other
        raise AssertionError(datatype)
    return tensor


def infer_request(
    request: GenerationRequest, config: KServeConfig, *, stream: bool
) -> pb.ModelInferRequest:
    """The ModelInferRequest for `request`: prompt text, max_tokens, the stream flag and the
    sampling tensors that are set. Raises UnsupportedParameter first (see sampling_values)."""
    batched = config.batch_dim
    sampling = sampling_values(request, config)
    inputs = [
        _tensor(config.text_input, "BYTES", request.prompt.encode(), batched=batched),
        _tensor(config.max_tokens_input, "INT32", request.max_tokens, batched=batched),
    ]
    if config.stream_input:
        inputs.append(_tensor(config.stream_input, "BOOL", stream, batched=batched))
    for name, value in sampling.items():
        inputs.append(
            _tensor(config.sampling_inputs[name], SAMPLING_DATATYPES[name], value, batched=batched)
        )
    return pb.ModelInferRequest(
        model_name=config.model,
        model_version=config.model_version,
        id=request.request_id,
        inputs=inputs,
    )


def _decode_bytes(raw: bytes) -> list[bytes]:
    """BYTES elements in raw form: each a 4-byte little-endian length, then its bytes."""
    out: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError("truncated BYTES element length")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(raw):
            raise ValueError("truncated BYTES element")
        out.append(raw[offset : offset + size])
        offset += size
    return out


_RAW_DTYPES: Mapping[str, str] = MappingProxyType(
    {
        "BOOL": "?",
        "INT8": "<i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "UINT8": "<u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "FP32": "<f4",
        "FP64": "<f8",
    }
)
_CONTENT_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "BOOL": "bool_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }
)


def output_values(response: pb.ModelInferResponse, name: str) -> list[Any] | None:
    """The flattened elements of output `name` (from `contents` or `raw_output_contents`), or
    None when the response has no such output. Raises ValueError for a malformed tensor."""
    for index, output in enumerate(response.outputs):
        if output.name != name:
            continue
        datatype = output.datatype
        if response.raw_output_contents:
            if index >= len(response.raw_output_contents):
                raise ValueError(f"output {name!r} has no raw contents")
            raw = response.raw_output_contents[index]
            if datatype == "BYTES":
                return list(_decode_bytes(raw))
            if datatype not in _RAW_DTYPES:
                raise ValueError(f"output {name!r} has datatype {datatype!r}")
            values: list[Any] = np.frombuffer(raw, dtype=_RAW_DTYPES[datatype]).tolist()
            return values
        field = _CONTENT_FIELDS.get(datatype)
        if field is None:
            raise ValueError(f"output {name!r} has datatype {datatype!r}")
        return list(getattr(output.contents, field))
    return None


class ResponsePiece(NamedTuple):
    """What one ModelInferResponse says about a generation."""

    text: bytes
    """text_output's bytes (a delta when streaming); UTF-8 may be split between pieces."""
    finish_reason: str | None
    """'stop' or 'length' when the model returned a finish reason."""
    prompt_tokens: int | None
    completion_tokens: int | None
    final: bool
    """Triton marked it as the request's last response."""


def _first_int(values: Sequence[Any] | None) -> int | None:
    return int(values[0]) if values else None


def read_response(
    url: str, response: pb.ModelInferResponse, config: KServeConfig, *, emitted: bool
) -> ResponsePiece:
    """Read one response. Raises RemoteProtocolError when it lacks text_output (unless it is
    Triton's empty final response) or carries a malformed or unknown tensor value."""
    param = response.parameters.get(FINAL_RESPONSE_PARAMETER)
    final = param is not None and param.bool_param
    try:
        texts = output_values(response, config.text_output)
        if texts is None and not (final and not response.outputs):
            names = [o.name for o in response.outputs]
            raise ValueError(f"no output {config.text_output!r} among {names}")
        text = b"".join(t if isinstance(t, bytes) else str(t).encode() for t in texts or ())
        reasons = (
            output_values(response, config.finish_reason_output)
            if config.finish_reason_output
            else None
        )
        reason: str | None = None
        if reasons:
            value = reasons[0]
            reason = (value.decode() if isinstance(value, bytes) else str(value)) or None
        prompt_tokens = (
            _first_int(output_values(response, config.prompt_tokens_output))
            if config.prompt_tokens_output
            else None
        )
        completion_tokens = (
            _first_int(output_values(response, config.completion_tokens_output))
            if config.completion_tokens_output
            else None
        )
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(
            url, f"malformed inference response ({exc})", retryable=not emitted
        ) from None
    if reason is not None and reason not in FINISH_REASONS:
        # vLLM's other reasons ('abort') and TRT-LLM's mean the request did not end normally.
        raise RemoteProtocolError(
            url, f"finish_reason={reason!r} is not 'stop' or 'length'", retryable=False
        )
    return ResponsePiece(text, reason, prompt_tokens, completion_tokens, final)


def finish_reason(
    reported: str | None, completion_tokens: int | None, pieces: int, max_tokens: int
) -> str:
    """The model's own finish reason, else 'length' when it produced max_tokens tokens (by its
    count, else by the number of streamed pieces, one token each), else 'stop'."""
    if reported is not None:
        return reported
    produced = completion_tokens if completion_tokens is not None else pieces
    return "length" if produced >= max_tokens else "stop"


def utf8_decoder() -> codecs.IncrementalDecoder:
    """Decodes streamed text whose characters may be split between responses."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
