"""Every RPC over plain HTTP through the transcoded routes (google.api.http rules) of the REST
proxy, in front of a real in-process router; answers compared with the same calls over gRPC."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import jwt
import numpy as np
import pytest

from router.config import ModelConfig
from router.guard.auth_config import AuthConfig, IssuerConfig
from router.guard.config import AuthSection, GuardConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.rest import create_app
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN, make_config
from tests.integration.rest_proxy import MAX_BODY, serve_proxy

QUESTION = "What is the capital of France?"
SECRET = "a-shared-secret-of-at-least-32-bytes!!"
ISSUER = "https://issuer.test"


@pytest.fixture(scope="module")
async def http(router: RouterServer) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve_proxy(f"127.0.0.1:{router.port}") as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=60) as client,
    ):
        yield client


def field_violations(body: dict[str, object]) -> list[str]:
    details = body["details"]
    assert isinstance(details, list)
    return [
        v["field"]
        for d in details
        if d["@type"].endswith("google.rpc.BadRequest")
        for v in d["fieldViolations"]
    ]


CHAT = {"messages": [{"role": "user", "content": QUESTION}]}


def greedy(max_tokens: int) -> dict[str, object]:
    return {"maxTokens": max_tokens, "temperature": 0}


# --- InferenceService -------------------------------------------------------------------------


async def test_list_models_over_get(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1beta/models")
    assert r.status_code == 200, r.text
    models = {m["name"]: m for m in r.json()["models"]}
    assert models[GEN]["kind"] == "MODEL_KIND_GENERATE"  # enums by name
    assert models[EMB]["kind"] == "MODEL_KIND_EMBED"
    assert models[EMB]["dimension"] == 384
    assert models[GEN]["ready"] is True


async def test_complete_matches_grpc(
    http: httpx.AsyncClient, stub: pb_grpc.InferenceServiceStub
) -> None:
    body = {"chat": {"messages": [{"role": "user", "content": QUESTION}]}, "sampling": greedy(12)}
    r = await http.post(f"/v1beta/models/{GEN}:complete", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    expected = await stub.Complete(
        pb.CompleteRequest(
            model=GEN,
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)]),
            sampling=pb.SamplingParams(max_tokens=12, temperature=0),
        )
    )
    assert answer["text"] == expected.text
    assert "Paris" in answer["text"]
    assert answer["model"] == GEN
    assert answer["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert answer["usage"]["completionTokens"] == expected.usage.completion_tokens
    assert "tokenIds" not in answer  # default values are omitted, as canonical JSON does


async def test_proto_names_numbers_and_64_bit_strings_are_accepted(
    http: httpx.AsyncClient,
) -> None:
    body = {
        "prompt": "The capital of France is",
        # proto field names, an enum by number and a uint64 as a string all parse
        "sampling": {"max_tokens": 4, "temperature": 0, "seed": "18446744073709551615"},
        "return_token_ids": True,
        "priority": 2,
    }
    r = await http.post(f"/v1beta/models/{GEN}:complete", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["tokenIds"]) == answer["usage"]["completionTokens"] >= 1


async def read_ndjson(response: httpx.Response) -> list[dict[str, object]]:
    return [json.loads(line) async for line in response.aiter_lines() if line]


async def read_sse(response: httpx.Response) -> list[tuple[str, dict[str, object]]]:
    events: list[tuple[str, dict[str, object]]] = []
    event = "message"
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((event, json.loads(line.removeprefix("data: "))))
            event = "message"
    return events


async def grpc_generate(stub: pb_grpc.InferenceServiceStub, max_tokens: int) -> str:
    request = pb.GenerateRequest(
        model=GEN,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)]),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0),
    )
    return "".join([c.text async for c in stub.Generate(request)])


async def test_generate_streams_ndjson_by_default(
    http: httpx.AsyncClient, stub: pb_grpc.InferenceServiceStub
) -> None:
    body = {"chat": CHAT, "sampling": greedy(16)}
    async with http.stream("POST", f"/v1beta/models/{GEN}:generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        chunks = await read_ndjson(r)
    assert len(chunks) > 1
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(str(c.get("text", "")) for c in chunks) == await grpc_generate(stub, 16)
    assert all("finishReason" not in c for c in chunks[:-1])
    assert chunks[-1]["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")


async def test_generate_streams_sse_when_asked(
    http: httpx.AsyncClient, stub: pb_grpc.InferenceServiceStub
) -> None:
    body = {"chat": CHAT, "sampling": greedy(16)}
    headers = {"accept": "application/x-ndjson;q=0.5, text/event-stream"}
    async with http.stream(
        "POST", f"/v1beta/models/{GEN}:generate", json=body, headers=headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(r)
    assert {kind for kind, _ in events} == {"message"}
    text = "".join(str(data.get("text", "")) for _, data in events)
    assert text == await grpc_generate(stub, 16)
    usage = events[-1][1]["usage"]
    assert isinstance(usage, dict)
    assert usage["completionTokens"] == 16 or events[-1][1]["finishReason"] == "FINISH_REASON_STOP"


async def test_generate_refusals_keep_their_http_status(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1beta/models/no-such-model:generate", json={"prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-model" in r.json()["message"]
    r = await http.post(
        f"/v1beta/models/{GEN}:generate", json={"prompt": "hi"}, headers={"accept": "image/png"}
    )
    assert r.status_code == 406
    assert "text/event-stream" in r.json()["message"]


async def test_embed_matches_grpc(
    http: httpx.AsyncClient, stub: pb_grpc.InferenceServiceStub
) -> None:
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    r = await http.post(f"/v1beta/models/{EMB}:embed", json={"texts": texts})
    assert r.status_code == 200, r.text
    vectors = np.array([e["values"] for e in r.json()["embeddings"]], dtype=np.float32)
    expected = await stub.Embed(pb.EmbedRequest(model=EMB, texts=texts))
    assert vectors.shape == (2, 384)
    np.testing.assert_array_equal(vectors, [list(e.values) for e in expected.embeddings])


# --- RetrievalService -------------------------------------------------------------------------


async def test_collection_life_cycle(http: httpx.AsyncClient) -> None:
    name = f"rest-{time.monotonic_ns()}"
    # The additional binding PUT /v1beta/collections/{config.name} sets a nested field.
    r = await http.put(f"/v1beta/collections/{name}", json={"embeddingModel": EMB})
    assert r.status_code == 200, r.text
    created = r.json()["collection"]
    assert created["config"]["name"] == name
    assert created["config"]["metric"] == "METRIC_COSINE"
    assert created["config"]["dimension"] == 384
    r = await http.post("/v1beta/collections", json={"name": name, "embeddingModel": EMB})
    assert r.status_code == 409
    assert r.json()["code"] == grpc.StatusCode.ALREADY_EXISTS.value[0]

    documents = [
        {"id": "fr", "text": "Paris is the capital of France.", "metadata": {"lang": "en"}},
        {"id": "de", "text": "Berlin is the capital of Germany.", "numericMetadata": {"y": 1.5}},
        {"id": "cat", "text": "The cat sat on the mat."},
    ]
    r = await http.post(
        f"/v1beta/collections/{name}/documents:upsert", json={"documents": documents}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"upserted": 3}
    r = await http.get(f"/v1beta/collections/{name}")
    assert r.json()["collection"]["documentCount"] == "3"  # uint64: a string in canonical JSON

    r = await http.post(
        f"/v1beta/collections/{name}:search",
        json={"text": "What is the capital of France?", "topK": 2},
    )
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["id"] == "fr"
    assert hits[0]["metadata"] == {"lang": "en"}
    # The GET binding takes the same request from the query string.
    r = await http.get(
        f"/v1beta/collections/{name}:search",
        params={"text": "What is the capital of France?", "top_k": "2"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["hits"] == hits

    r = await http.post(
        f"/v1beta/collections/{name}/documents:delete", json={"ids": ["cat", "nope"]}
    )
    assert r.json() == {"deleted": 1}
    r = await http.get("/v1beta/collections")
    mine = [c for c in r.json()["collections"] if c["config"]["name"] == name]
    assert mine[0]["documentCount"] == "2"

    r = await http.delete(f"/v1beta/collections/{name}")
    assert r.status_code == 200
    assert r.json() == {}
    r = await http.get(f"/v1beta/collections/{name}")
    assert r.status_code == 404
    assert name in r.json()["message"]


async def test_search_by_vector_from_query_parameters(http: httpx.AsyncClient) -> None:
    name = f"vec-{time.monotonic_ns()}"
    r = await http.post("/v1beta/collections", json={"name": name, "dimension": 2})
    assert r.status_code == 200, r.text
    documents = [
        {"id": "x", "vector": {"values": [1, 0]}},
        {"id": "y", "vector": {"values": [0, 1]}},
    ]
    r = await http.post(
        f"/v1beta/collections/{name}/documents:upsert", json={"documents": documents}
    )
    assert r.status_code == 200, r.text
    r = await http.get(
        f"/v1beta/collections/{name}:search",
        params=[("vector.values", "0.1"), ("vector.values", "0.9"), ("topK", "1")],
    )
    assert r.status_code == 200, r.text
    assert [h["id"] for h in r.json()["hits"]] == ["y"]
    await http.delete(f"/v1beta/collections/{name}")


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        (b"{not json", "body", "not valid JSON"),
        (b'{"prompt": NaN}', "body", "NaN"),
        (b"[1, 2]", "body", "JSON object"),
        (json.dumps({"prompt": "x", "sampling": {"maxTokens": "many"}}), "sampling.maxTokens", ""),
        (json.dumps({"prompt": "x", "sampling": {"max_tokens": -1}}), "sampling.max_tokens", ""),
        (json.dumps({"prompt": "x", "sampling": {"maxToken": 3}}), "sampling.maxToken", "unknown"),
        (json.dumps({"prompt": "x", "sampling": {"stop": "."}}), "sampling.stop", "array"),
        (
            json.dumps({"chat": {"messages": [{"role": "user"}, {"role": 1}]}}),
            "chat.messages[1].role",
            "",
        ),
        (json.dumps({"prompt": "x", "chat": {"messages": []}}), "chat", "input"),
        (json.dumps({"prompt": "x", "priority": "PRIORITY_URGENT"}), "priority", "PRIORITY"),
        (json.dumps({"prompt": "x", "model": "other"}), "model", "path"),
    ],
)
async def test_bad_bodies_get_400_naming_the_field(
    http: httpx.AsyncClient, body: bytes | str, field: str, needle: str
) -> None:
    r = await http.post(
        f"/v1beta/models/{GEN}:complete",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field_violations(error) == [field]
    assert error["message"].startswith(field)
    assert needle in error["message"]


async def test_router_validation_errors_keep_their_details(http: httpx.AsyncClient) -> None:
    body = {"prompt": "x", "sampling": {"temperature": 5}}
    r = await http.post(f"/v1beta/models/{GEN}:complete", json=body)
    assert r.status_code == 400
    assert "temperature" in r.json()["message"]
    assert field_violations(r.json()) == ["sampling.temperature"]


async def test_bad_query_parameters(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1beta/models", params={"verbose": "true"})
    assert r.status_code == 400
    assert field_violations(r.json()) == ["verbose"]
    r = await http.get("/v1beta/collections/any:search", params={"topK": "lots"})
    assert r.status_code == 400
    assert field_violations(r.json()) == ["topK"]
    r = await http.get("/v1beta/collections/any:search", params={"collection": "other"})
    assert r.status_code == 400
    assert "path" in r.json()["message"]
    r = await http.post(f"/v1beta/models/{GEN}:complete?prompt=hi", json={})
    assert r.status_code == 400
    assert field_violations(r.json()) == ["prompt"]


async def test_oversized_body_gets_413(http: httpx.AsyncClient) -> None:
    r = await http.post(f"/v1beta/models/{GEN}:complete", json={"prompt": "x" * MAX_BODY})
    assert r.status_code == 413
    assert str(MAX_BODY) in r.json()["message"]
    assert r.json()["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


async def test_unknown_routes_and_methods_get_status_json(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1beta/nothing-here")
    assert r.status_code == 404
    assert r.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "/v1beta/nothing-here" in r.json()["message"]
    r = await http.get(f"/v1beta/models/{GEN}:complete")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    r = await http.patch("/v1beta/collections/abc")
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET, PUT"
    # The OpenAI routes keep their own error shape.
    r = await http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert "error" in r.json()


async def test_percent_encoded_slash_stays_in_its_variable(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1beta/collections/a%2Fb")
    assert r.status_code in (400, 404), r.text  # reaches DescribeCollection with name "a/b"
    assert "a/b" in r.json()["message"]


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
        r = await c.get("/v1beta/models")
        assert r.status_code == 503, r.text
        assert r.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        r = await c.post(f"/v1beta/models/{GEN}:generate", json={"prompt": "hi"})
        assert r.status_code == 503, r.text


async def _slots_freed(router: RouterServer) -> bool:
    engine = next(m.engine for m in router.models if m.name == GEN)
    assert engine is not None
    for _ in range(60):
        if engine.num_unfinished == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_client_that_goes_away_cancels_its_call(
    router: RouterServer, http: httpx.AsyncClient
) -> None:
    # 900 tokens without EOS take many seconds here; only a cancelled call frees its slot in 3 s.
    body = {"prompt": QUESTION, "sampling": {"maxTokens": 900, "ignoreEos": True}}
    async with http.stream("POST", f"/v1beta/models/{GEN}:generate", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line:
                break  # leave after the first message
    assert await _slots_freed(router)
    with pytest.raises(httpx.ReadTimeout):
        await http.post(f"/v1beta/models/{GEN}:complete", json=body, timeout=0.3)
    assert await _slots_freed(router)


# --- credentials ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def guarded_proxy(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    tmp = tmp_path_factory.mktemp("rest-guard")
    guard = GuardConfig(
        audit_log=str(tmp / "audit.jsonl"),
        auth=AuthSection(
            enabled=True,
            registry=tmp / "registry.db",
            config=AuthConfig(
                issuers=(IssuerConfig(issuer=ISSUER, audience="irouter", shared_secret=SECRET),)
            ),
        ),
    )
    config = make_config(
        model_cache, tmp, ModelConfig(name=EMB, kind="embed", artifact=EMB), guard=guard
    )
    server = RouterServer(config)
    await server.start()
    await server.wait_ready()
    try:
        async with serve_proxy(f"127.0.0.1:{server.port}") as base_url:
            yield base_url
    finally:
        await server.stop(0)


def token(scope: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "irouter",
        "sub": "svc-rest",
        "tenant": "globex",
        "scope": scope,
        "exp": now + 300,
        "iat": now,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_credentials_pass_through(guarded_proxy: str) -> None:
    async with httpx.AsyncClient(base_url=guarded_proxy, timeout=30) as c:
        r = await c.post(f"/v1beta/models/{EMB}:embed", json={"texts": ["hi"]})
        assert r.status_code == 401
        assert r.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        wrong_scope = {"authorization": f"Bearer {token('retrieval:read')}"}
        r = await c.post(f"/v1beta/models/{EMB}:embed", json={"texts": ["hi"]}, headers=wrong_scope)
        assert r.status_code == 403
        assert "inference:embed" in r.json()["message"]
        good = {"authorization": f"Bearer {token('inference:embed')}"}
        r = await c.post(f"/v1beta/models/{EMB}:embed", json={"texts": ["hi"]}, headers=good)
        assert r.status_code == 200, r.text
        assert len(r.json()["embeddings"][0]["values"]) == 384
