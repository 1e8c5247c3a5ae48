from __future__ import annotations

import dataclasses

import pytest

from backends.base import SamplingParams
from router.cache.config import CacheConfig, ResponseCacheConfig, SemanticCacheConfig
from router.cache.response import CachedAnswer, ResponseCache, model_build, request_key
from router.scheduler.request import RequestStatus
from router.telemetry import Metrics

MANIFEST = {"source": "m.gguf", "quantization": "int4", "graph": "gqa"}


def greedy(**params: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, **params)  # type: ignore[arg-type]


def test_answers_round_trip_through_their_encoding() -> None:
    answer = CachedAnswer((((1, 2), "Hé"), ((3,), " 🙂")), RequestStatus.FINISHED_LENGTH, 17)
    again = CachedAnswer.decode(answer.encode())
    assert again == answer and again.num_tokens == 3


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b'{"v": 99, "f": 1, "n": 1, "p": []}',
        b'{"v": 2, "f": 0, "n": 1, "p": []}',
        b'{"v": 2, "f": 1, "p": []}',
        b"[]",
    ],
)
def test_anything_else_is_refused_on_decode(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a cached answer"):
        CachedAnswer.decode(data)


def test_the_key_covers_model_build_sampling_and_input() -> None:
    build = model_build("m", MANIFEST)
    base = request_key(build, b"\x10\x08", b"phello")
    assert base == request_key(build, b"\x10\x08", b"phello")
    others = [
        request_key(build, b"\x10\x08", b"phello!"),
        request_key(build, b"\x10\x09", b"phello"),
        request_key(build, b"", b"\x10\x08phello"),  # no ambiguity at the boundary
        request_key(model_build("m", {**MANIFEST, "quantization": "fp32"}), b"\x10\x08", b"phello"),
    ]
    assert len({base, *others}) == 5


def test_only_deterministic_requests_are_cacheable_unless_configured() -> None:
    cache = ResponseCache(ResponseCacheConfig(), Metrics())
    assert cache.cacheable(greedy())
    assert cache.cacheable(SamplingParams(temperature=0.7, seed=5))
    assert not cache.cacheable(SamplingParams(temperature=0.7))
    anything = ResponseCache(ResponseCacheConfig(nondeterministic=True), Metrics())
    assert anything.cacheable(SamplingParams(temperature=0.7))


async def test_l1_stores_whole_answers_only() -> None:
    cache = ResponseCache(ResponseCacheConfig(max_entry_bytes=200), Metrics())
    done = CachedAnswer((((1,), "a"),), RequestStatus.FINISHED_STOPPED, 1)
    cache.put(b"k1", done)
    assert await cache.get(b"k1") == done
    cache.put(b"k2", CachedAnswer((((1,), "a"),), RequestStatus.FINISHED_CANCELLED, 1))
    assert await cache.get(b"k2") is None
    cache.put(b"k3", CachedAnswer((((1,), "x" * 500),), RequestStatus.FINISHED_STOPPED, 1))
    assert await cache.get(b"k3") is None  # larger than max_entry_bytes
    await cache.close()


async def test_an_unreachable_redis_degrades_to_l1() -> None:
    metrics = Metrics()
    # Port 1 on loopback refuses connections at once.
    cache = ResponseCache(
        ResponseCacheConfig(redis_url="redis://127.0.0.1:1/0", redis_retry_s=60), metrics
    )
    answer = CachedAnswer((((1,), "a"),), RequestStatus.FINISHED_STOPPED, 1)
    assert await cache.get(b"missing") is None
    cache.put(b"k", answer)
    assert await cache.get(b"k") == answer
    await cache.close()
    errors = metrics.registry.get_sample_value("irouter_cache_errors_total", {"layer": "l2"})
    assert errors == 1  # then L2 was skipped for redis_retry_s


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ResponseCacheConfig(max_bytes=0), "cache.response.max_bytes=0"),
        (ResponseCacheConfig(redis_url="http://x"), "redis_url='http://x'"),
        (ResponseCacheConfig(redis_timeout_ms=0), "redis_timeout_ms=0"),
        (ResponseCacheConfig(ttl_s=-1), "cache.response.ttl_s=-1"),
    ],
)
def test_bad_response_config_is_named(config: ResponseCacheConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        dataclasses.replace(CacheConfig(), response=config).validate()


def test_bad_semantic_config_is_named() -> None:
    with pytest.raises(ValueError, match=r"threshold=1\.5"):
        SemanticCacheConfig(threshold=1.5).validate()
    with pytest.raises(ValueError, match="max_entries=0"):
        SemanticCacheConfig(max_entries=0).validate()
