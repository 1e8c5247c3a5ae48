"""The `cache:` section of the config file."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

MIB = 1024 * 1024


@dataclass(frozen=True)
class ResponseCacheConfig:
    enabled: bool = True
    """Answer repeated deterministic Generate/Complete calls from the cache."""
    nondeterministic: bool = False
    """Also cache sampled requests without a fixed seed (they would differ on a re-run)."""
    max_bytes: int = 64 * MIB
    """Bound of the in-process layer (L1); least recently used answers go first."""
    ttl_s: float = 3600.0
    """How long an answer stays in L1 (0: until evicted)."""
    max_entry_bytes: int = 1 * MIB
    """Answers larger than this are not cached."""
    redis_url: str = ""
    """Shared layer (L2) for all replicas, e.g. redis://127.0.0.1:6379/0; empty: L1 only."""
    redis_ttl_s: float = 86400.0
    """How long an answer stays in Redis."""
    redis_timeout_ms: float = 50.0
    """A Redis call slower than this counts as a failure; the call goes on without L2."""
    redis_retry_s: float = 5.0
    """After a Redis failure, L2 is skipped for this long (the cache degrades to L1)."""

    def validate(self) -> None:
        for key in ("max_bytes", "max_entry_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"cache.response.{key}={getattr(self, key)} must be at least 1")
        for key in ("ttl_s", "redis_ttl_s", "redis_retry_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"cache.response.{key}={getattr(self, key)} must not be negative")
        if self.redis_timeout_ms <= 0:
            raise ValueError(
                f"cache.response.redis_timeout_ms={self.redis_timeout_ms} must be positive"
            )
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ValueError(
                    f"cache.response.redis_url={self.redis_url!r} must look like "
                    "redis://host:port/db"
                )


@dataclass(frozen=True)
class SemanticCacheConfig:
    enabled: bool = False
    """Answer a prompt similar enough to an earlier one with that one's answer."""
    embedding_model: str = "all-minilm-l6-v2"
    """Served embedding model that embeds the prompts."""
    threshold: float = 0.95
    """Cosine similarity at or above which an earlier prompt counts as the same question."""
    max_entries: int = 10_000
    """Prompts remembered per model; the oldest are replaced first."""

    def validate(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"cache.semantic.threshold={self.threshold} must be in (0, 1]")
        if self.max_entries < 1:
            raise ValueError(f"cache.semantic.max_entries={self.max_entries} must be at least 1")
        if self.enabled and not self.embedding_model:
            raise ValueError("cache.semantic.embedding_model is empty")


@dataclass(frozen=True)
class EmbeddingCacheConfig:
    enabled: bool = True
    """Reuse vectors of texts embedded before (Embed, Search by text, retrieval queries)."""
    max_bytes: int = 32 * MIB
    """Bound of the in-process vector cache."""

    def validate(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"cache.embedding.max_bytes={self.max_bytes} must be at least 1")


@dataclass(frozen=True)
class CacheConfig:
    response: ResponseCacheConfig = field(default_factory=ResponseCacheConfig)
    """Exact response cache (L1 memory, optional L2 Redis)."""
    semantic: SemanticCacheConfig = field(default_factory=SemanticCacheConfig)
    """Similar-prompt cache (off by default)."""
    embedding: EmbeddingCacheConfig = field(default_factory=EmbeddingCacheConfig)
    """Embedding vector cache."""

    def validate(self) -> None:
        self.response.validate()
        self.semantic.validate()
        self.embedding.validate()
