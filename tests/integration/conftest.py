from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import openai
import pytest

from router.config import ModelConfig, RetrievalConfig, RouterConfig, ServerConfig
from router.models.prepare import smollm2_gguf_path
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.registry.config import RegistryConfig
from router.server import RouterServer
from tests.integration.rest_proxy import serve_proxy
from tests.openai_servers import OpenAIServer, llama_cpp_missing, running_llama_server
from tests.postgres_server import PostgresServer, postgres_path, running_postgres

T = TypeVar("T")

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"


TEST_MODELS = (
    ModelConfig(
        name=GEN,
        kind="generate",
        artifact=GEN,
        max_slots=8,
        max_waiting=8,
        max_context=1024,
        token_budget=256,
    ),
    ModelConfig(name=EMB, kind="embed", artifact=EMB, max_batch=16),
)
"""The two built-in models, sized for tests."""


def make_config(
    model_cache: Path,
    data_dir: Path,
    *models: ModelConfig,
    retrieval: bool = True,
    fsync: bool = True,
    server: Mapping[str, Any] | None = None,
    **sections: Any,
) -> RouterConfig:
    """An in-process router for a test: free ports, no metrics port, no grace period (`server`
    overrides), collections under `data_dir` (`retrieval=False` turns them off, `fsync=False`
    skips the write-ahead log's fsync), the registry a SQLite file there too, `models`
    (default TEST_MODELS), and any other section (guard=, routing=, cache=, registry=).
    Validated."""
    sections.setdefault("registry", RegistryConfig(data_dir=data_dir))
    return RouterConfig(
        server=ServerConfig(**{"port": 0, "metrics_port": 0, "grace_seconds": 0, **(server or {})}),
        model_cache=model_cache,
        retrieval=RetrievalConfig(enabled=retrieval, data_dir=data_dir, fsync=fsync),
        models=models or TEST_MODELS,
        **sections,
    ).validate()


@contextlib.asynccontextmanager
async def running(config: RouterConfig) -> AsyncIterator[RouterServer]:
    """The router started and done loading; stopped (no grace) on the way out."""
    server = RouterServer(config)
    await server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.stop(0)


@pytest.fixture(scope="session")
async def router(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    data_dir = tmp_path_factory.mktemp("collections")
    config = make_config(
        model_cache, data_dir, server={"grace_seconds": 5.0, "max_message_bytes": 64 * 1024}
    )
    server = RouterServer(config)
    await server.start()
    await server.wait_ready()
    assert all(m.ready for m in server.models), [m.error for m in server.models]
    yield server
    await server.stop(0)


@pytest.fixture(scope="session")
async def channel(router: RouterServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
def llama() -> Iterator[OpenAIServer]:
    """llama-cpp-python's OpenAI server on the SmolLM2 GGUF, shared by the remote-engine tests.
    One thread: llama.cpp's threads wait for each other at every layer, so two threads on a
    machine whose other core is busy crawl (tens of seconds for 48 tokens)."""
    reason = llama_cpp_missing()
    if reason:
        pytest.skip(reason)
    with running_llama_server(smollm2_gguf_path(), threads=1, threads_batch=1) as server:
        yield server


@pytest.fixture(scope="module")
async def openai_client(router: RouterServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK through the OpenAI proxy in front of the session router."""
    async with (
        serve_proxy(f"127.0.0.1:{router.port}") as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as c,
    ):
        yield c


async def in_waves(n: int, call: Callable[[int], Awaitable[T]]) -> list[T]:
    """`call(0..n-1)`, at most the session router's slots at a time (more would be shed)."""
    gate = asyncio.Semaphore(TEST_MODELS[0].max_slots)

    async def one(i: int) -> T:
        async with gate:
            return await call(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def wait_drained(router: RouterServer, name: str = GEN, seconds: float = 10.0) -> None:
    """Wait until the model's engine holds no request and no call waits on it. The engine thread
    drops a cancelled or shed request at its next step, so a test that ends its calls and then
    reads the counts at once can read them a step early."""
    engine = router.models.get(name, "generate").engine
    assert engine is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (engine.num_active or engine.num_unfinished) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert engine.num_active == 0 and engine.num_unfinished == 0


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the module's tests (skipped where none is installed)."""
    if postgres_path() is None:
        pytest.skip("needs PostgreSQL's initdb and postgres ($PG_BIN or Debian's package)")
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server
