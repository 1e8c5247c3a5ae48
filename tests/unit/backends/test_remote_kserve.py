"""KServeEngine without a real server: its configuration, the v2 request it sends, the reading of
responses and statuses, the router's mapping of its errors, and (contract tests) the
ModelStreamInfer path against an in-test grpc.aio server that behaves as Triton does for a
decoupled model, since no installable server offers that call (KServe's ModelServer answers it
UNIMPLEMENTED; the real-server tests are tests/integration/test_kserve_engine.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from backends.base import (
    Capabilities,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    UnsupportedParameter,
)
from backends.factory import create_backend
from backends.kserve import grpc_predict_v2_pb2 as pb
from backends.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from backends.kserve.config import KServeConfig
from backends.kserve.engine import KServeEngine
from backends.kserve.wire import (
    finish_reason,
    infer_request,
    output_values,
    read_response,
    status_error,
)
from backends.remote import (
    RemoteChunk,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteTimeout,
    RemoteUnavailable,
)
from router.errors import InvalidArgument, Unavailable
from router.scheduler.generation import EngineLimits
from router.scheduler.request import Request
from router.scheduler.request_engine import RequestEngineAdapter

URL = "grpc://127.0.0.1:8001"


def make_request(prompt: str = "hi", **fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {"request_id": "r1", "prompt_ids": (), "prompt": prompt}
    values.update({"max_tokens": 8, "temperature": 0.0, **fields})
    return GenerationRequest(**values)


def inputs_of(message: pb.ModelInferRequest) -> dict[str, tuple[str, list[int], Any]]:
    """name → (datatype, shape, the single value)."""
    out = {}
    for tensor in message.inputs:
        field = {
            "BYTES": "bytes_contents",
            "BOOL": "bool_contents",
            "INT32": "int_contents",
            "UINT64": "uint64_contents",
            "FP32": "fp32_contents",
        }[tensor.datatype]
        (value,) = getattr(tensor.contents, field)
        out[tensor.name] = (tensor.datatype, list(tensor.shape), value)
    return out


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"url": "http://127.0.0.1:8001"}, "url="),
        ({"url": "127.0.0.1"}, "url="),
        ({"url": "127.0.0.1:port"}, "url="),
        ({"url": "grpc://h:1/v2"}, "url="),
        ({"model": ""}, "model is missing"),
        ({"url": ""}, "url is missing"),
        ({"stream": "always"}, "stream="),
        ({"text_input": ""}, "text_input"),
        ({"sampling_inputs": {"beam_width": "beam_width"}}, "sampling_inputs"),
        ({"read_timeout_s": 0.0}, "read_timeout_s="),
        ({"connect_timeout_s": -1.0}, "connect_timeout_s="),
        ({"context_length": 0}, "context_length="),
        ({"vocab_size": -1}, "vocab_size="),
    ],
)
def test_config_names_the_bad_field(changes: dict[str, Any], field: str) -> None:
    config = KServeConfig(**{"url": "127.0.0.1:8001", "model": "m", **changes})
    with pytest.raises(ValueError, match=field):
        config.validate().require_endpoint()


def test_url_takes_host_port_with_or_without_scheme() -> None:
    assert KServeConfig(url="grpc://10.0.0.7:8001", model="m").validate().target == "10.0.0.7:8001"
    assert KServeConfig(url="localhost:8001", model="m").validate().target == "localhost:8001"


# -- the request --------------------------------------------------------------------------------


def test_greedy_request_carries_prompt_max_tokens_stream_and_temperature() -> None:
    config = KServeConfig(url=URL, model="ensemble", model_version="2")
    message = infer_request(make_request("Hé", max_tokens=12), config, stream=False)
    assert (message.model_name, message.model_version, message.id) == ("ensemble", "2", "r1")
    assert inputs_of(message) == {
        "text_input": ("BYTES", [1, 1], "Hé".encode()),
        "max_tokens": ("INT32", [1, 1], 12),
        "stream": ("BOOL", [1, 1], False),
        "temperature": ("FP32", [1, 1], 0.0),
    }  # neutral fields are not sent; a greedy request needs no seed


def test_sampling_fields_go_to_their_tensors_only_when_set() -> None:
    config = KServeConfig(url=URL, model="m", batch_dim=False, stream_input="")
    request = make_request(temperature=0.7, top_p=0.9, top_k=40, seed=2**63 + 5)
    inputs = inputs_of(infer_request(request, config, stream=True))
    assert set(inputs) == {
        "text_input",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "random_seed",
    }
    assert inputs["random_seed"] == ("UINT64", [1], 2**63 + 5)
    assert inputs["top_k"] == ("INT32", [1], 40) and inputs["top_p"][0] == "FP32"


def test_fields_without_a_tensor_are_refused_by_name() -> None:
    config = KServeConfig(url=URL, model="m")
    with pytest.raises(UnsupportedParameter, match="min_p, ignore_eos cannot be honoured") as e:
        infer_request(make_request(min_p=0.1, ignore_eos=True), config, stream=False)
    assert e.value.field == "min_p" and "model 'm'" in str(e.value)
    # Mapped, min_p travels; a field mapped to '' is refused.
    inputs = {"temperature": "temperature", "min_p": "min_p", "top_k": ""}  # replaces the default
    mapped = KServeConfig(url=URL, model="m", sampling_inputs=inputs)
    assert "min_p" in inputs_of(infer_request(make_request(min_p=0.1), mapped, stream=False))
    with pytest.raises(UnsupportedParameter, match="top_k") as e:
        infer_request(make_request(top_k=5), mapped, stream=False)
    assert e.value.field == "top_k"


# -- the response -------------------------------------------------------------------------------


def text_response(text: bytes, **extra: Any) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m")
    out = response.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
    out.contents.bytes_contents.append(text)
    for name, value in extra.items():
        if isinstance(value, bytes):
            tensor = response.outputs.add(name=name, datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(value)
        else:
            tensor = response.outputs.add(name=name, datatype="INT32", shape=[1])
            tensor.contents.int_contents.append(value)
    return response


def test_outputs_are_read_from_contents_and_from_raw_bytes() -> None:
    response = text_response(b"Paris", num_output_tokens=3)
    assert output_values(response, "text_output") == [b"Paris"]
    assert output_values(response, "num_output_tokens") == [3]
    assert output_values(response, "absent") is None
    raw = pb.ModelInferResponse()
    raw.outputs.add(name="text_output", datatype="BYTES", shape=[2])
    raw.outputs.add(name="num_output_tokens", datatype="INT32", shape=[1])
    raw.raw_output_contents.append(b"\x02\x00\x00\x00ab\x01\x00\x00\x00c")
    raw.raw_output_contents.append((7).to_bytes(4, "little"))
    assert output_values(raw, "text_output") == [b"ab", b"c"]
    assert output_values(raw, "num_output_tokens") == [7]


def test_a_response_gives_text_reason_and_counts() -> None:
    config = KServeConfig(url=URL, model="m")
    response = text_response(
        b"Paris.", finish_reason=b"stop", num_input_tokens=9, num_output_tokens=3
    )
    piece = read_response(URL, response, config, emitted=False)
    assert piece == (b"Paris.", "stop", 9, 3, False)


def test_malformed_responses_are_protocol_errors() -> None:
    config = KServeConfig(url=URL, model="m")
    with pytest.raises(RemoteProtocolError, match="no output 'text_output' among"):
        read_response(URL, pb.ModelInferResponse(), config, emitted=False)
    with pytest.raises(RemoteProtocolError, match="finish_reason='abort'"):
        read_response(URL, text_response(b"x", finish_reason=b"abort"), config, emitted=False)
    truncated = pb.ModelInferResponse()
    truncated.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    truncated.raw_output_contents.append(b"\x09\x00\x00\x00ab")
    with pytest.raises(RemoteProtocolError, match="truncated") as e:
        read_response(URL, truncated, config, emitted=True)
    assert not e.value.retryable


def test_finish_reason_falls_back_to_counts() -> None:
    assert finish_reason("stop", 8, 0, 8) == "stop"  # the model's own word wins
    assert finish_reason(None, 8, 0, 8) == "length"
    assert finish_reason(None, 3, 0, 8) == "stop"
    assert finish_reason(None, None, 8, 8) == "length"  # streamed pieces, one token each
    assert finish_reason(None, None, 2, 8) == "stop"


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_statuses_become_remote_errors() -> None:
    refused = status_error(URL, rpc_error(grpc.StatusCode.UNAVAILABLE, "refused"), emitted=False)
    assert isinstance(refused, RemoteUnavailable) and refused.retryable
    late = status_error(URL, rpc_error(grpc.StatusCode.UNAVAILABLE, "reset"), emitted=True)
    assert not late.retryable  # text was already passed on: no replica can take over
    deadline = status_error(URL, rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "x"), emitted=False)
    assert isinstance(deadline, RemoteTimeout) and deadline.retryable
    bad = status_error(URL, rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad\n x"), emitted=False)
    assert isinstance(bad, RemoteStatusError) and bad.request_fault and not bad.retryable
    assert str(bad) == f"{URL}: INVALID_ARGUMENT: bad x"
    busy = status_error(URL, rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "q"), emitted=False)
    assert isinstance(busy, RemoteStatusError) and busy.retryable and not busy.request_fault


# -- the router's view of its errors ------------------------------------------------------------


class FailingEngine:
    def __init__(self, error: Exception) -> None:
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=True,
            device="test",
            max_batch=1,
            context_length=64,
            text_output=True,
        )
        self.vocab_size, self.max_slots, self.max_context = 0, 1, 64
        self.error = error

    @property
    def num_active(self) -> int:
        return 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        raise self.error
        yield GenerationChunk(())  # pragma: no cover - makes this an async generator


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, Unavailable),
        (grpc.StatusCode.INTERNAL, Unavailable),
    ],
)
async def test_the_router_maps_status_errors(code: grpc.StatusCode, expected: type) -> None:
    error = RemoteStatusError(URL, f"{code.name}: x", code=code, retryable=False)
    adapter = RequestEngineAdapter(
        "remote",
        FailingEngine(error),
        None,
        EngineLimits(1, 16, 1, 64),
        stop_ids=[],  # type: ignore[arg-type]
    )
    request = Request("r", 1, [1], SamplingParams(max_tokens=4), seed=1, prompt_text="x")
    with pytest.raises(expected, match=f"model 'remote'.*{code.name}"):
        async for _ in adapter.generate(request):
            pass


def test_create_backend_builds_the_engine(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "decoder", "vocab_size": 49152}))
    remote = KServeConfig(url="127.0.0.1:8001", model="m")
    engine = create_backend("kserve_grpc", tmp_path, kserve=remote, max_slots=3, max_context=512)
    assert isinstance(engine, KServeEngine)
    assert (engine.max_slots, engine.max_context, engine.vocab_size) == (3, 512, 49152)
    assert engine.capabilities.text_output and not engine.capabilities.stop_strings


# -- contract: ModelStreamInfer as Triton streams a decoupled model -----------------------------


def piece(text: bytes, **extra: Any) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=text_response(text, **extra))


class TritonLike(pb_grpc.GRPCInferenceServiceServicer):
    """Streams per prompt: 'deltas' (4 pieces, é split across two, then Triton's empty final
    response), 'counted' (a finish reason and counts, then the stream ends), 'error', 'silent'
    (one piece, then nothing), 'endless' (a piece every 20 ms until cancelled)."""

    def __init__(self) -> None:
        self.received: list[pb.ModelInferRequest] = []
        self.cancelled = asyncio.Event()

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == "llm")

    async def ModelStreamInfer(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            self.received.append(request)
            prompt = request.inputs[0].contents.bytes_contents[0]
            try:
                if prompt == b"deltas":
                    for text in (b"Caf", b"\xc3", b"\xa9", b" ok"):
                        yield piece(text)
                    final = pb.ModelStreamInferResponse()
                    final.infer_response.parameters["triton_final_response"].bool_param = True
                    yield final
                elif prompt == b"counted":
                    yield piece(b"Paris")
                    yield piece(
                        b".", finish_reason=b"stop", num_input_tokens=5, num_output_tokens=2
                    )
                elif prompt == b"error":
                    yield pb.ModelStreamInferResponse(error_message="input 'x' is\nunexpected")
                elif prompt == b"silent":
                    yield piece(b"one")
                    await asyncio.sleep(30)
                else:
                    while True:
                        yield piece(b"tick ")
                        await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise


@pytest.fixture
async def triton() -> AsyncIterator[tuple[TritonLike, str]]:
    servicer = TritonLike()
    async with serving(servicer) as target:
        yield servicer, target


class UnaryOnly(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer and nothing else, as KServe's ModelServer (ModelStreamInfer: UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.received: list[pb.ModelInferRequest] = []

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        self.received.append(request)
        return text_response(b"Paris.", finish_reason=b"length", num_output_tokens=8)


@contextlib.asynccontextmanager
async def serving(servicer: pb_grpc.GRPCInferenceServiceServicer) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_contract_auto_falls_back_to_model_infer_once() -> None:
    servicer = UnaryOnly()
    async with serving(servicer) as target, engine_at(target) as engine:
        for _ in range(3):
            chunks = [c async for c in engine.generate(make_request("q"))]
            assert [(c.text, c.finish_reason) for c in chunks] == [("Paris.", "length")]
        assert engine.streaming is False
    assert [inputs_of(r)["stream"][2] for r in servicer.received] == [False, False, False]


async def test_contract_stream_on_without_the_call_is_named() -> None:
    async with serving(UnaryOnly()) as target, engine_at(target, stream="on") as engine:
        with pytest.raises(RemoteStatusError, match=r"no ModelStreamInfer.*stream='on'") as e:
            [c async for c in engine.generate(make_request("q"))]
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED and not e.value.retryable


@contextlib.asynccontextmanager
async def engine_at(target: str, **changes: Any) -> AsyncIterator[KServeEngine]:
    engine = KServeEngine(KServeConfig(url=target, model="llm", **changes))
    engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


async def test_contract_deltas_stream_as_text_until_the_final_response(
    triton: tuple[TritonLike, str],
) -> None:
    servicer, target = triton
    async with engine_at(target) as engine:
        assert await engine.ready()
        chunks = [c async for c in engine.generate(make_request("deltas", max_tokens=4))]
        assert engine.streaming is True  # 'auto' learned it
    assert [c.text for c in chunks] == ["Caf", "é", " ok", ""]  # é whole though split
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]  # 4 pieces
    assert isinstance(chunks[-1], RemoteChunk) and chunks[-1].completion_tokens is None
    sent = inputs_of(servicer.received[0])
    assert sent["stream"] == ("BOOL", [1, 1], True) and sent["max_tokens"][2] == 4


async def test_contract_reason_and_counts_ride_on_the_last_chunk(
    triton: tuple[TritonLike, str],
) -> None:
    _, target = triton
    async with engine_at(target, stream="on") as engine:
        chunks = [c async for c in engine.generate(make_request("counted"))]
    last = chunks[-1]
    assert "".join(c.text or "" for c in chunks) == "Paris."
    assert isinstance(last, RemoteChunk) and last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (5, 2)


async def test_contract_an_error_message_in_the_stream_is_raised(
    triton: tuple[TritonLike, str],
) -> None:
    _, target = triton
    async with engine_at(target) as engine:
        with pytest.raises(RemoteStatusError, match="error in stream: input 'x' is unexpected"):
            [c async for c in engine.generate(make_request("error"))]
        assert engine.num_active == 0


async def test_contract_silence_after_text_times_out_not_retryable(
    triton: tuple[TritonLike, str],
) -> None:
    _, target = triton
    async with engine_at(target, read_timeout_s=0.3) as engine:
        stream = engine.generate(make_request("silent"))
        assert (await anext(stream)).text == "one"
        with pytest.raises(RemoteTimeout, match=r"read_timeout_s=0\.3") as e:
            await anext(stream)
    assert not e.value.retryable


async def test_contract_closing_the_iterator_cancels_the_call_on_the_server(
    triton: tuple[TritonLike, str],
) -> None:
    servicer, target = triton
    async with engine_at(target) as engine:
        stream = engine.generate(make_request("endless", max_tokens=10_000))
        assert (await anext(stream)).text == "tick "
        await stream.aclose()
        assert engine.num_active == 0
        await asyncio.wait_for(servicer.cancelled.wait(), 5.0)
