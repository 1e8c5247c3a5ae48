"""Embedding with a vector cache: the same text for the same model is embedded once.

Used by Embed, Search by text, retrieval-augmented generation queries and the semantic cache.
The cache is in-process only: a vector is cheaper to recompute (~1 ms per text on a CPU encoder
batch) than its 1.5 KB to fetch over a network round trip under load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from router.cache.config import EmbeddingCacheConfig
from router.cache.lru import ByteLRU
from router.retrieval.chunking import Piece
from router.serving import embedding, tokenize
from router.serving.model import ServedModel
from router.telemetry import Metrics

Vectors = npt.NDArray[np.float32]
LAYER = "embedding"


@dataclass(slots=True)
class EmbedPlan:
    model: ServedModel
    out: Vectors
    """Result rows; cached ones already filled in."""
    keys: list[bytes]
    missing: list[int]
    """Rows still to embed, with their texts and token ids in `pieces`."""
    pieces: list[Piece]
    tokens: int
    """Tokens the texts take: counted here, or estimated for a model with no tokenizer (then
    `run` replaces the estimate with the server's count when every batch had one)."""
    counted: bool = False
    """Whether `tokens` is a count (the router's tokenizer, or the server's after `run`)."""


class Embedder:
    def __init__(self, config: EmbeddingCacheConfig, metrics: Metrics) -> None:
        self._metrics = metrics
        evictions = metrics.cache_evictions.labels(LAYER)
        self._cache: ByteLRU[tuple[Vectors, int]] | None = (
            ByteLRU(config.max_bytes, on_evict=evictions.inc) if config.enabled else None
        )
        self._hits = metrics.cache_lookups.labels(LAYER, "hit")
        self._misses = metrics.cache_lookups.labels(LAYER, "miss")
        self._bytes = metrics.cache_bytes.labels(LAYER)

    async def plan(
        self,
        model: ServedModel,
        texts: Sequence[str],
        *,
        field: str = "texts",
        truncate: bool = False,
    ) -> EmbedPlan:
        """Look the texts up and tokenize the ones not cached (validated as
        `serving.embedding.encode_texts` does). Nothing is embedded yet: the caller may charge
        `plan.tokens` to a quota first. Cached texts count the tokens they took when first
        embedded."""
        out = np.empty((len(texts), model.dimension), dtype=np.float32)
        tokens = 0
        cache = self._cache
        prefix = model.name.encode() + (b"\0t\0" if truncate else b"\0f\0")
        missing: list[int] = []
        keys: list[bytes] = []
        for i, text in enumerate(texts):
            key = prefix + text.encode("utf-8", "surrogatepass")
            keys.append(key)
            hit = cache.get(key) if cache is not None else None
            if hit is None:
                missing.append(i)
            else:
                out[i] = hit[0]
                tokens += hit[1]
        if cache is not None:
            self._hits.inc(len(texts) - len(missing))
            self._misses.inc(len(missing))
        pieces: list[Piece] = []
        if missing:
            todo = [texts[i] for i in missing]
            pieces = await tokenize.off_loop(
                sum(map(len, todo)),
                lambda: embedding.encode_texts(
                    model, todo, positions=missing, field=field, truncate=truncate
                ),
            )
            tokens += sum(piece.num_tokens for piece in pieces)
        return EmbedPlan(model, out, keys, missing, pieces, tokens, model.tokenizer is not None)

    async def run(self, plan: EmbedPlan) -> Vectors:
        """Embed what the plan found missing (in model batches) and cache it."""
        model, out, cache = plan.model, plan.out, self._cache
        step = model.config.max_batch
        server: list[int] = []  # a remote server's token count of each batch, when it gives one
        for start in range(0, len(plan.pieces), step):
            batch = plan.pieces[start : start + step]
            vectors = await embedding.embed_pieces(model, batch, server)
            rows = plan.missing[start : start + step]
            for row, (i, piece) in enumerate(zip(rows, batch, strict=True)):
                out[i] = vectors[row]
                if cache is not None:
                    vector = out[i].copy()
                    cache.put(plan.keys[i], (vector, piece.num_tokens), vector.nbytes + 64)
        if cache is not None and plan.pieces:
            self._bytes.set(cache.bytes)
        batches = -(-len(plan.pieces) // step)
        if not plan.counted and batches and len(server) == batches:
            # The server counted what was sent; texts from the cache keep their estimate.
            plan.tokens += sum(server) - sum(piece.num_tokens for piece in plan.pieces)
            plan.counted = len(plan.missing) == len(plan.out)
        return out

    async def embed(
        self,
        model: ServedModel,
        texts: Sequence[str],
        *,
        field: str = "texts",
        truncate: bool = False,
    ) -> tuple[Vectors, int]:
        """Vectors (one row per text) and the tokens they took; see `plan`."""
        plan = await self.plan(model, texts, field=field, truncate=truncate)
        return await self.run(plan), plan.tokens
