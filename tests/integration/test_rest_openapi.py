"""/openapi.json and /docs of the REST proxy, and schemathesis-generated requests against every
documented operation of a real router: none may get a 5xx, and every answer matches the
schema the document gives it."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.core.failures import FailureGroup

from router.proto.irouter.v1 import inference_service_pb2, retrieval_service_pb2
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN
from tests.integration.rest_proxy import serve_proxy

EXAMPLES = 25
COLLECTION = "fuzz"
# Operations that run the decoder: their bodies get max_tokens=1 so that the run stays short.
GENERATING = {
    "InferenceService_Generate",
    "InferenceService_Complete",
    "openai_chat_completions",
    "openai_completions",
}


@pytest.fixture(scope="module")
async def base_url(router: RouterServer) -> AsyncIterator[str]:
    async with serve_proxy(f"127.0.0.1:{router.port}") as url:
        yield url


async def test_openapi_documents_every_rpc_and_openai_route(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        doc = (await c.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    summaries = {op.get("summary") for item in doc["paths"].values() for op in item.values()}
    for module, service in (
        (inference_service_pb2, "InferenceService"),
        (retrieval_service_pb2, "RetrievalService"),
    ):
        desc = module.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            assert f"irouter.v1.{service}.{method.name}" in summaries, method.name
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert path in doc["paths"]
    generate = doc["paths"]["/v1beta/models/{model}:generate"]["post"]
    assert set(generate["responses"]["200"]["content"]) == {
        "application/x-ndjson",
        "text/event-stream",
    }
    schemas = doc["components"]["schemas"]
    seed = schemas["irouter.v1.SamplingParams"]["properties"]["seed"]
    assert seed["type"] == ["string", "integer"]  # uint64 in canonical JSON
    assert schemas["irouter.v1.Priority"]["enum"][0] == "PRIORITY_UNSPECIFIED"
    put = doc["paths"]["/v1beta/collections/{config.name}"]["put"]
    assert put["parameters"][0]["name"] == "config.name"


async def test_docs_page_works_offline(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        page = await c.get("/docs")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources
        for source in sources:
            assert not source.startswith(("http:", "https:", "//")), source
            asset = await c.get(f"/{source}")
            assert asset.status_code == 200, source
            assert len(asset.content) > 1000


def _steer(case: schemathesis.Case) -> None:
    """Point the generated request at a served model and an existing collection, so that it
    reaches the router's own checks, and cap generation at one token: the fuzzing is about
    input handling, not decoding."""
    operation_id = str(case.operation.definition.raw.get("operationId"))
    params = case.path_parameters or {}
    if "model" in params:
        params["model"] = EMB if operation_id.endswith("Embed") else GEN
    if "collection" in params or operation_id == "RetrievalService_DescribeCollection":
        params["collection" if "collection" in params else "name"] = COLLECTION
    body = case.body
    if not isinstance(body, dict):
        return
    if operation_id.startswith("openai_"):
        body["model"] = EMB if operation_id == "openai_embeddings" else GEN
    if operation_id not in GENERATING:
        return
    if operation_id.startswith("openai_"):
        body["max_tokens"] = 1
        body.pop("max_completion_tokens", None)
        return
    sampling = body.get("sampling")
    if sampling is None or isinstance(sampling, dict):
        body["sampling"] = {**(sampling or {}), "maxTokens": 1}
        body["sampling"].pop("max_tokens", None)


DOTTED_PATHS = {
    "/v1beta/collections/{config.name}",
    "/v1beta/registry/models/{model_version.name}/versions",
    "/v1beta/registry/models/{model_version.name}/versions/{model_version.version}",
}


def _fuzz(base_url: str, statuses: Counter[int]) -> list[str]:
    """Generated requests for every operation; the 5xx answers, described."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    fuzzed = 0
    for result in schema.get_all_operations():
        if isinstance(result, schemathesis.core.result.Err):
            # schemathesis cannot fill a dotted path parameter ({config.name}), valid OpenAPI
            # that names a nested field; the routes' own tests cover them
            # (test_collection_life_cycle, test_model_service's REST tests).
            assert result.err().path in DOTTED_PATHS, result.err()
            continue
        _fuzz_operation(result.ok(), base_url, failures, statuses)
        fuzzed += 1
    assert fuzzed == 30
    return failures


def _fuzz_operation(
    operation: Any, base_url: str, failures: list[str], statuses: Counter[int]
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        _steer(case)
        response = case.call(base_url=base_url, timeout=60)
        statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path} body={case.body!r} query={case.query!r}"
        if response.status_code >= 500:
            failures.append(f"{where} -> {response.status_code} {response.text[:300]}")
        try:
            # The answers, errors included, match the schemas /openapi.json documents.
            case.validate_response(
                response,
                checks=[
                    schemathesis.checks.response_schema_conformance,
                    schemathesis.checks.content_type_conformance,
                ],
            )
        except FailureGroup as exc:
            failures.append(f"{where}: {exc.exceptions[0]!s:.500}")

    run()


async def test_generated_requests_never_get_a_server_error(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        config = {"name": COLLECTION, "embeddingModel": EMB}
        assert (await c.post("/v1beta/collections", json=config)).status_code == 200
    statuses: Counter[int] = Counter()
    failures = await asyncio.to_thread(_fuzz, base_url, statuses)
    assert not failures, "\n".join(failures[:10])
    # The generated requests reach the router, not only the proxy's own checks.
    assert statuses[200] >= 16, statuses
