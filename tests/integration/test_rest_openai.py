"""The OpenAI-compatible REST proxy in front of a real in-process router, driven by the official
`openai` SDK (and plain httpx for the bad-input cases the SDK cannot send)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator

import grpc
import httpx
import numpy as np
import openai
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2

from router.rest import create_app
from router.rest.errors import error_from_status
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN
from tests.integration.rest_proxy import MAX_BODY, serve_proxy

QUESTION = "What is the capital of France?"


LONG_CALL = {
    "model": GEN,
    "messages": [{"role": "user", "content": QUESTION}],
    "max_tokens": 900,
    "ignore_eos": True,
}
"""900 tokens without EOS: many seconds here, a call to cancel or run past its deadline."""


@pytest.fixture(scope="module", params=["grpc", "in-process"])
async def base_url(router: RouterServer, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The proxy calling the router over gRPC (`irouter proxy`), and in process (`irouter
    serve --http-port`): every test holds for both."""
    local = router.local_handlers if request.param == "in-process" else None
    async with serve_proxy(f"127.0.0.1:{router.port}", local) as url:
        yield url


@pytest.fixture(scope="module")
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused") as c:
        yield c


@pytest.fixture(scope="module")
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as c:
        yield c


async def test_chat_completion_answers_the_question(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(
        model=GEN, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    assert answer.object == "chat.completion"
    assert answer.id
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


async def test_streamed_chat_joins_to_the_unstreamed_text(client: openai.AsyncOpenAI) -> None:
    messages: list[dict[str, str]] = [{"role": "user", "content": QUESTION}]
    whole = await client.chat.completions.create(
        model=GEN,
        messages=messages,
        temperature=0,
        max_tokens=16,
    )
    stream = await client.chat.completions.create(
        model=GEN,
        messages=messages,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == GEN for c in chunks)  # every chunk names the model, as OpenAI's do
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens


async def test_completions_plain_and_streamed(client: openai.AsyncOpenAI) -> None:
    whole = await client.completions.create(
        model=GEN, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert whole.object == "text_completion"
    assert whole.choices[0].text
    assert whole.choices[0].finish_reason in ("stop", "length")
    stream = await client.completions.create(
        model=GEN, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream])
    assert text == whole.choices[0].text


async def test_embeddings_float_and_base64_agree(client: openai.AsyncOpenAI) -> None:
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    floats = await client.embeddings.create(model=EMB, input=texts, encoding_format="float")
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    decoded = await client.embeddings.create(model=EMB, input=texts)
    assert [d.index for d in floats.data] == [0, 1]
    a = np.array([d.embedding for d in floats.data], dtype=np.float32)
    b = np.array([d.embedding for d in decoded.data], dtype=np.float32)
    assert a.shape == (2, 384)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-4)
    assert floats.usage.prompt_tokens > 0


async def test_embeddings_single_string_base64(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/embeddings", json={"model": EMB, "input": "hello", "encoding_format": "base64"}
    )
    assert r.status_code == 200
    vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,)


async def test_models_lists_both_models(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert {m.id for m in models} >= {GEN, EMB}
    assert all(m.owned_by == "irouter" and m.object == "model" for m in models)


async def test_router_errors_become_openai_errors(client: openai.AsyncOpenAI) -> None:
    messages: list[dict[str, str]] = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="no-such-model", messages=messages)
    assert "no-such-model" in missing.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        await client.chat.completions.create(model=GEN, messages=messages, temperature=5)
    assert "temperature" in hot.value.message
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="no-such-model",
            messages=messages,
            stream=True,
        )


def chat_body(**extra: object) -> bytes:
    return json.dumps(
        {"model": GEN, "messages": [{"role": "user", "content": "x"}], **extra}
    ).encode()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"temperature": NaN}', "not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "'model'"),
        (json.dumps({"model": GEN, "messages": "hi"}).encode(), "'messages'"),
        (chat_body(n=2), "'n'"),
        (chat_body(max_tokens="9"), "'max_tokens'"),
        (chat_body(max_tokens=-1), "'max_tokens'"),
        (chat_body(stop=[1]), "'stop'"),
        (
            json.dumps({"model": GEN, "messages": [{"role": "function", "content": "x"}]}).encode(),
            "role",
        ),
        (
            json.dumps(
                {"model": GEN, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
            ).encode(),
            "image_url",
        ),
    ],
)
async def test_bad_bodies_get_400_naming_the_problem(
    http: httpx.AsyncClient, body: bytes, needle: str
) -> None:
    r = await http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("route", "extra", "param"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
        ("/v1/chat/completions", {"logit_bias": {"42": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools[0].function"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
        ("/v1/chat/completions", {"no_such_option": 1}, "no_such_option"),
        ("/v1/chat/completions", {"stream_options": {"bogus": True}}, "stream_options.bogus"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"logprobs": 1}, "logprobs"),
        ("/v1/completions", {"suffix": "x"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/embeddings", {"dimensions": 64}, "dimensions"),
    ],
)
async def test_parameters_not_honoured_are_refused_by_name(
    http: httpx.AsyncClient, route: str, extra: dict[str, object], param: str
) -> None:
    base: dict[str, object] = {
        "/v1/chat/completions": {
            "model": GEN,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 1,
        },
        "/v1/completions": {"model": GEN, "prompt": "x", "max_tokens": 1},
        "/v1/embeddings": {"model": EMB, "input": "x"},
    }[route]
    r = await http.post(route, json={**base, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert param in error["message"]


async def test_parameters_that_ask_for_nothing_are_accepted(http: httpx.AsyncClient) -> None:
    body = {
        "model": GEN,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 1,
        "n": 1,
        "logprobs": False,
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "logit_bias": {},
        "store": False,
        "service_tier": "auto",
        "user": "someone",
    }
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


async def test_oversized_body_gets_413(http: httpx.AsyncClient) -> None:
    body = {"model": GEN, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 413
    assert str(MAX_BODY) in r.json()["error"]["message"]


async def test_unknown_route_and_wrong_method(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert "/v1/nothing-here" in r.json()["error"]["message"]
    r = await http.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["message"]
    assert "POST" in r.headers["allow"]


def test_status_mapping_carries_retry_after_and_param() -> None:
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=1)))
    error = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", [retry])
    assert (error.status, error.headers["Retry-After"], error.type) == (
        429,
        "3",
        "rate_limit_error",
    )
    bad = any_pb2.Any()
    violation = error_details_pb2.BadRequest.FieldViolation(field="sampling.top_p")
    bad.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "top_p=3 ...", [bad])
    assert (error.status, error.param) == (400, "top_p")
    expected = {
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.INTERNAL: 500,
    }
    for code, status in expected.items():
        assert error_from_status(code, "m").status == status
    internal = error_from_status(grpc.StatusCode.INTERNAL, "Traceback (most recent call last)")
    assert "Traceback" not in internal.message


async def test_router_down_gives_503() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    app = create_app(f"127.0.0.1:{dead}", timeout_s=5)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.app.router.lifespan_context(app.app),
        httpx.AsyncClient(transport=transport, base_url="http://proxy") as c,
    ):
        r = await c.get("/v1/models")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable_error"


async def _slots_freed(router: RouterServer) -> bool:
    engine = next(m.engine for m in router.models if m.name == GEN)
    assert engine is not None
    for _ in range(60):
        if engine.num_unfinished == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_client_that_goes_away_cancels_its_call(
    router: RouterServer, http: httpx.AsyncClient, client: openai.AsyncOpenAI
) -> None:
    # 900 tokens without EOS take many seconds here; only a cancelled call frees its slot in 3 s.
    long = LONG_CALL
    async with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    assert await _slots_freed(router)
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v1/chat/completions", json=long, timeout=0.3)
    assert await _slots_freed(router)
    assert [m async for m in client.models.list()]


async def test_a_client_deadline_ends_the_call_with_504_and_frees_its_slot(
    router: RouterServer, http: httpx.AsyncClient
) -> None:
    long = LONG_CALL
    answer = await http.post(
        "/v1/chat/completions", json=long, headers={"x-request-timeout": "0.5"}
    )
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "deadline_exceeded"
    assert await _slots_freed(router)


async def test_a_client_deadline_ends_a_stream_with_an_error_event(
    router: RouterServer, http: httpx.AsyncClient
) -> None:
    long = {**LONG_CALL, "stream": True}
    events = []
    async with http.stream(
        "POST", "/v1/chat/completions", json=long, headers={"x-request-timeout": "1"}
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    assert len(events) > 3  # it streamed before the deadline
    assert await _slots_freed(router)
