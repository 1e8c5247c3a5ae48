"""KServeEngine against a real KServe v2 gRPC server: KServe's own ModelServer (the `kserve`
package, in build/kserve-venv) serving llama.cpp on the SmolLM2 GGUF (tests/kserve_model.py).
KServe implements ModelInfer but not Triton's ModelStreamInfer, so 'auto' learns to use the
unary call; the streaming path is contract-tested in tests/unit/backends/test_remote_kserve.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from backends.base import RequestEngine, UnsupportedParameter
from backends.kserve.config import KServeConfig
from backends.kserve.engine import KServeEngine
from backends.remote import RemoteChunk, RemoteStatusError, RemoteTimeout, RemoteUnavailable
from router.models.prepare import smollm2_gguf_path
from tests.kserve_server import ROOT, KServeServer, kserve_missing, running_kserve_server
from tests.openai_servers import free_port, llama_cpp_missing
from tests.remote_engines import STORY, collect, joined, make_request, running

COUNT = (
    "<|im_start|>user\nCount from 1 to 1000, separated by commas.<|im_end|>\n"
    "<|im_start|>assistant\n1, 2, 3, 4, 5,"
)
"""Greedy SmolLM2 keeps counting far past 1,000 tokens: a long generation to interrupt."""


@pytest.fixture(scope="module")
def kserve() -> Iterator[KServeServer]:
    reason = kserve_missing()
    if reason:
        pytest.skip(reason)
    with running_kserve_server(smollm2_gguf_path()) as server:
        yield server


def started(config: KServeConfig) -> contextlib.AbstractAsyncContextManager[KServeEngine]:
    return running(KServeEngine(config))


@pytest.fixture
async def engine(kserve: KServeServer) -> AsyncIterator[KServeEngine]:
    async with started(KServeConfig(url=kserve.target, model=kserve.model)) as engine:
        yield engine


_REFERENCE = """
import json, sys
from llama_cpp import Llama
from tests.kserve_model import completion_kwargs
gguf, prompt, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = Llama(model_path=gguf, n_ctx=2048, n_threads=1, verbose=False)
print(json.dumps(llm.create_completion(prompt, **completion_kwargs(inputs))))
"""


def llama_cpp_completion(prompt: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What llama.cpp itself completes for `prompt` with the test model's settings for
    `inputs`, computed in a child process of this venv (its llama-cpp-python)."""
    reason = llama_cpp_missing()
    if reason:
        pytest.skip(reason)
    args = [sys.executable, "-c", _REFERENCE, str(smollm2_gguf_path()), prompt, json.dumps(inputs)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def wait_for_output(
    server: KServeServer, pattern: str, timeout: float = 30.0
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, server.output())
        if match:
            return match
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server never printed {pattern!r}:\n{server.output()}")


# -- generation ---------------------------------------------------------------------------------


async def test_greedy_text_is_what_llama_cpp_generates(engine: KServeEngine) -> None:
    assert isinstance(engine, RequestEngine) and engine.capabilities.text_output
    chunks = await collect(engine, make_request(max_tokens=48))
    assert engine.streaming is False, "KServe has no ModelStreamInfer: 'auto' must learn it"
    assert engine.num_active == 0
    last = chunks[-1]
    assert isinstance(last, RemoteChunk) and last.finish_reason in ("stop", "length")
    assert all(c.token_ids == () for c in chunks)
    direct = llama_cpp_completion(STORY, {"max_tokens": 48, "temperature": 0.0})
    assert joined(chunks) == direct["choices"][0]["text"] and joined(chunks).strip()
    assert last.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert last.completion_tokens == direct["usage"]["completion_tokens"]
    assert last.finish_reason == direct["choices"][0]["finish_reason"]


async def test_max_tokens_is_honoured_and_counted(engine: KServeEngine) -> None:
    short = await collect(engine, make_request(COUNT, max_tokens=5))
    longer = await collect(engine, make_request(COUNT, max_tokens=20))
    assert short[-1].finish_reason == "length" and longer[-1].finish_reason == "length"
    assert isinstance(short[-1], RemoteChunk) and short[-1].completion_tokens == 5
    assert joined(longer).startswith(joined(short)) and len(joined(longer)) > len(joined(short))


async def test_seed_temperature_and_top_k_reach_the_server(engine: KServeEngine) -> None:
    greedy = joined(await collect(engine, make_request(max_tokens=24)))
    sampled = [
        joined(await collect(engine, make_request(max_tokens=24, temperature=1.5, seed=s)))
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1], "same seed, same text"
    assert sampled[0] != sampled[2] and sampled[0] != greedy
    top1 = await collect(engine, make_request(max_tokens=24, temperature=1.5, seed=2, top_k=1))
    assert joined(top1) == greedy


async def test_cancelling_stops_the_generation_on_the_server(
    engine: KServeEngine, kserve: KServeServer
) -> None:
    stream = engine.generate(make_request(COUNT, request_id="long-1", max_tokens=1500))
    pending = asyncio.ensure_future(anext(stream))
    await wait_for_output(kserve, r"request long-1 generating")
    await asyncio.sleep(0.3)  # some tokens in
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert engine.num_active == 0
    match = await wait_for_output(kserve, r"request long-1 cancelled after (\d+) tokens")
    assert 0 < int(match.group(1)) < 1500
    # The server is free again: the next request is served at once, not after ~1,500 tokens.
    t0 = time.monotonic()
    chunks = await collect(engine, make_request(max_tokens=8))
    assert chunks[-1].finish_reason == "length"
    assert time.monotonic() - t0 < 10.0


# -- readiness and failures ---------------------------------------------------------------------


async def test_ready_probes_server_and_model(kserve: KServeServer) -> None:
    async with started(KServeConfig(url=f"grpc://{kserve.target}", model=kserve.model)) as e:
        assert await e.ready()
    async with started(KServeConfig(url=kserve.target, model="other")) as e:
        assert not await e.ready()
    async with started(KServeConfig(url=f"127.0.0.1:{free_port()}", model="m")) as e:
        t0 = time.monotonic()
        assert not await e.ready()
        assert time.monotonic() - t0 < 5.0


async def test_an_unknown_model_is_a_clear_non_retryable_error(kserve: KServeServer) -> None:
    async with started(KServeConfig(url=kserve.target, model="nope")) as engine:
        with pytest.raises(RemoteStatusError, match=r"NOT_FOUND: .*nope") as info:
            await collect(engine, make_request())
    assert info.value.code == grpc.StatusCode.NOT_FOUND and not info.value.retryable
    assert kserve.target in str(info.value) and not info.value.request_fault


async def test_a_request_the_server_refuses_is_a_request_fault(engine: KServeEngine) -> None:
    with pytest.raises(RemoteStatusError, match=r"INVALID_ARGUMENT: .*max_tokens=0") as info:
        await collect(engine, make_request(max_tokens=0))
    assert info.value.request_fault and not info.value.retryable


async def test_a_server_that_is_down_is_retryable_unavailable() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with started(KServeConfig(url=target, model="m")) as engine:
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable, match=rf"^grpc://{target}: UNAVAILABLE") as info:
            await collect(engine, make_request())
        assert time.monotonic() - t0 < 5.0
    assert info.value.retryable and engine.num_active == 0


async def test_streaming_demanded_from_a_server_without_it_is_named(
    kserve: KServeServer,
) -> None:
    async with started(KServeConfig(url=kserve.target, model=kserve.model, stream="on")) as e:
        with pytest.raises(RemoteStatusError, match="UNIMPLEMENTED") as info:
            await collect(e, make_request())
    assert not info.value.retryable


async def test_a_hung_server_times_out(kserve: KServeServer) -> None:
    # ModelInfer only (what KServe offers), so no request waits on an 'auto' probe.
    config = KServeConfig(
        url=kserve.target,
        model=kserve.model,
        stream="off",
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
    )
    async with started(config) as connected, started(config) as fresh:
        assert await connected.ready()  # its connection is up before the server stops
        with kserve.paused():
            t0 = time.monotonic()
            with pytest.raises(RemoteTimeout, match="DEADLINE_EXCEEDED") as read:
                await collect(connected, make_request(max_tokens=4))
            with pytest.raises(RemoteTimeout, match="no connection within") as connect:
                await collect(fresh, make_request(max_tokens=4))
            assert not await fresh.ready()
            assert time.monotonic() - t0 < 10.0  # three bounded waits of ~1 s, not a hang
        assert read.value.retryable and connect.value.retryable
        # Resumed, the same engines reconnect and serve again.
        for engine in (connected, fresh):
            for _ in range(20):
                if await engine.ready():
                    break
            assert (await collect(engine, make_request(max_tokens=4)))[-1].finish_reason


async def test_unsupported_fields_are_refused_before_sending() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens: any I/O would fail differently
    async with started(KServeConfig(url=target, model="m")) as engine:
        with pytest.raises(UnsupportedParameter, match="min_p cannot be honoured") as info:
            await anext(engine.generate(make_request(min_p=0.1)))
        assert info.value.field == "min_p"
        with pytest.raises(UnsupportedParameter) as info:
            await anext(engine.generate(make_request(stop_token_ids=(2,))))
        assert info.value.field == "stop_token_ids" and engine.num_active == 0
