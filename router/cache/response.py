"""The exact response cache: (model, prompt tokens, sampling parameters) → the engine's output.

Two layers. L1 is a byte-bounded LRU in this process. L2 is Redis, shared by every replica; it
is optional, and any failure there (down, slow, garbage) is counted and the call goes on with L1
alone, skipping L2 for `redis_retry_s` so a dead Redis costs one timeout, not one per call. Writes
to L2 run in the background: the client never waits for them.

L2 talks to Redis with redis-py's asyncio client directly, not through aiocache: aiocache 0.12.3
(its latest release) leaks its connection pool on close() with redis-py >= 5 and writes with the
deprecated SETEX; what it would add here (a get and a set with a TTL) is two calls.

The key is the request as sent: model build, sampling parameters and input (chat turns or prompt,
after any retrieved passages were put in), so a hit costs neither the chat template nor
tokenization; the answer carries its prompt's token count for usage and quotas.

What is stored is the engine's raw output (token ids and text pieces as they streamed, and the
finish reason), below the output guardrails, so a cached answer passes the guardrails in force
when it is served, and a streamed hit is streamed back piece by piece."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis

from backends.base import SamplingParams
from router.cache.config import ResponseCacheConfig
from router.cache.lru import ByteLRU
from router.scheduler.request import RequestStatus
from router.telemetry import Metrics

logger = logging.getLogger(__name__)

NAMESPACE = "irouter:rc:"
FORMAT = 2  # bump when CachedAnswer's encoding changes: old entries then miss
_CACHEABLE = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """The engine's output for one request: (token ids, text) per streamed piece."""

    pieces: tuple[tuple[tuple[int, ...], str], ...]
    finish: RequestStatus
    prompt_tokens: int
    completion_tokens: int = -1
    """Tokens the engine generated; -1: the pieces' ids count them. Engines that stream text only
    (remote servers) send pieces without ids, so their count is kept here for usage on hits."""
    token_ids: tuple[int, ...] = field(init=False, compare=False)
    """All pieces' ids, and `text` all their text: a unary hit is answered from these."""
    text: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(t for ids, _ in self.pieces for t in ids))
        object.__setattr__(self, "text", "".join(text for _, text in self.pieces))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.completion_tokens < 0 else self.completion_tokens

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": FORMAT,
                "f": int(self.finish),
                "n": self.prompt_tokens,
                "p": [[list(i), t] for i, t in self.pieces],
                "c": self.completion_tokens,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> CachedAnswer:
        """Raises ValueError on anything that is not an answer this version wrote."""
        try:
            raw = json.loads(data)
            if raw["v"] != FORMAT:
                raise ValueError(f"format {raw['v']}")
            finish = RequestStatus(raw["f"])
            prompt_tokens = int(raw["n"])
            pieces = tuple((tuple(int(t) for t in ids), str(text)) for ids, text in raw["p"])
            completion_tokens = int(raw.get("c", -1))  # absent in entries written before it
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a cached answer: {exc}") from None
        if finish not in _CACHEABLE:
            raise ValueError(f"not a cached answer: finish {finish!r}")
        return cls(pieces, finish, prompt_tokens, completion_tokens)


def model_build(name: str, manifest: dict[str, Any]) -> str:
    """Names one build of a model: a cache shared by replicas must not mix answers of the same
    name served from different weights or quantizations."""
    parts = (name, *(str(manifest.get(k, "")) for k in ("source", "quantization", "graph")))
    return "|".join(parts)


def request_key(model_id: str, sampling: bytes, request_input: bytes) -> bytes:
    """Same key ⇔ same model build, same sampling parameters as sent (their deterministic proto
    encoding) and the same input (see router.cache.keys.input_bytes)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(model_id.encode())
    h.update(b"\0")
    h.update(len(sampling).to_bytes(4, "little"))
    h.update(sampling)
    h.update(request_input)
    return h.digest()


class ResponseCache:
    def __init__(self, config: ResponseCacheConfig, metrics: Metrics) -> None:
        self.config = config
        self._l1: ByteLRU[CachedAnswer] = ByteLRU(
            config.max_bytes, config.ttl_s, on_evict=metrics.cache_evictions.labels("l1").inc
        )
        self._l2: redis.Redis | None = None
        if config.redis_url:
            timeout = config.redis_timeout_ms / 1000
            self._l2 = redis.Redis.from_url(
                config.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        self._l2_skip_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()
        self._bytes = metrics.cache_bytes.labels("l1")
        self._l1_hit = metrics.cache_lookups.labels("l1", "hit")
        self._l1_miss = metrics.cache_lookups.labels("l1", "miss")
        self._l2_hit = metrics.cache_lookups.labels("l2", "hit")
        self._l2_miss = metrics.cache_lookups.labels("l2", "miss")
        self._l2_errors = metrics.cache_errors.labels("l2")

    def cacheable(self, p: SamplingParams) -> bool:
        return p.temperature == 0 or p.seed is not None or self.config.nondeterministic

    def _l2_usable(self) -> bool:
        return self._l2 is not None and time.monotonic() >= self._l2_skip_until

    def _l2_failed(self, what: str, exc: BaseException) -> None:
        self._l2_errors.inc()
        self._l2_skip_until = time.monotonic() + self.config.redis_retry_s
        logger.warning(
            "response cache: Redis %s failed (%s: %s); L1 only for %.1f s",
            what,
            type(exc).__name__,
            exc,
            self.config.redis_retry_s,
        )

    async def get(self, key: bytes) -> CachedAnswer | None:
        answer = self._l1.get(key)
        if answer is not None:
            self._l1_hit.inc()
            return answer
        self._l1_miss.inc()
        if not self._l2_usable():
            return None
        assert self._l2 is not None
        try:
            data = await self._l2.get(NAMESPACE + key.hex())
        except Exception as exc:  # any Redis trouble degrades to L1, never fails the call
            self._l2_failed("get", exc)
            return None
        if data is None:
            self._l2_miss.inc()
            return None
        try:
            if not isinstance(data, bytes):  # a client configured to decode responses
                raise ValueError(f"got {type(data).__name__}, not bytes")
            answer = CachedAnswer.decode(data)
        except ValueError as exc:
            self._l2_failed("get (bad value)", exc)
            return None
        self._l2_hit.inc()
        self._put_l1(key, answer, len(data))
        return answer

    def _put_l1(self, key: bytes, answer: CachedAnswer, size: int) -> None:
        self._l1.put(key, answer, size)
        self._bytes.set(self._l1.bytes)

    def put(self, key: bytes, answer: CachedAnswer) -> None:
        """Store in L1 now and in L2 in the background."""
        if answer.finish not in _CACHEABLE:
            return
        data = answer.encode()
        if len(data) > self.config.max_entry_bytes:
            return
        # Decoded, an answer takes more memory than its JSON: count it three times over.
        self._put_l1(key, answer, 3 * len(data))
        if self._l2_usable():
            task = asyncio.get_running_loop().create_task(self._write_l2(key, data))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write_l2(self, key: bytes, data: bytes) -> None:
        assert self._l2 is not None
        ttl = self.config.redis_ttl_s
        try:
            await self._l2.set(NAMESPACE + key.hex(), data, px=int(ttl * 1000) if ttl else None)
        except Exception as exc:  # see get()
            self._l2_failed("set", exc)

    async def flush(self) -> None:
        """Wait for the background writes to L2 started so far."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        if self._l2 is not None:
            with contextlib.suppress(Exception):
                await self._l2.aclose()
