"""RetrievalService: proto ↔ domain translation only. Indexing and durability live in
router.retrieval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from router.cache.embedding import Embedder
from router.config import RetrievalConfig
from router.errors import FailedPrecondition, InvalidArgument, quote
from router.proto.irouter.v1 import retrieval_service_pb2 as pb
from router.retrieval import chunking
from router.retrieval.collection import Collection
from router.retrieval.index import Vectors
from router.retrieval.spec import (
    CollectionSpec,
    Document,
    Filter,
    Hit,
    Metric,
    Range,
    vector_fault,
)
from router.retrieval.store import CollectionStore
from router.serving import embedding, passthrough, tokenize
from router.serving.catalog import Catalog
from router.serving.model import ServedModel

Context = grpc.aio.ServicerContext[Any, Any]

MAX_TOP_K = 1000
_METRIC = {
    pb.METRIC_UNSPECIFIED: Metric.COSINE,
    pb.METRIC_COSINE: Metric.COSINE,
    pb.METRIC_L2: Metric.L2,
    pb.METRIC_INNER_PRODUCT: Metric.INNER_PRODUCT,
}
_METRIC_PB = {
    Metric.COSINE: pb.METRIC_COSINE,
    Metric.L2: pb.METRIC_L2,
    Metric.INNER_PRODUCT: pb.METRIC_INNER_PRODUCT,
}


class RetrievalServicer:
    def __init__(
        self,
        store: CollectionStore,
        models: Catalog,
        embedder: Embedder,
        *,
        max_text_bytes: int = RetrievalConfig.max_text_bytes,
    ) -> None:
        self._store = store
        self._models = models
        self._embedder = embedder
        self._max_text_bytes = max_text_bytes

    def _embedding_model(self, name: str) -> ServedModel:
        """A collection's embedding model. A collection embeds for every caller of it, so a
        deployment with its own authentication or limits (for its callers) cannot be one."""
        model = self._models.get(name, "embed")
        if name in self._models.access:
            raise FailedPrecondition(
                f"embedding_model {quote(name)} is a deployment with its own authentication or "
                "limits, which apply to its callers; a collection embeds on behalf of all of its "
                "own: use an embedding model or deployment without them"
            )
        return model

    async def _embed_pieces(self, model_name: str, pieces: list[chunking.Piece]) -> Vectors:
        """Embed texts whose token ids already fit the model's window (see chunking.split).
        One batch at a time, on purpose: the encoder runs one batch at a time, and calls that
        arrive meanwhile (a RAG query's embedding) go in the next batch instead of waiting
        behind every chunk of a long document."""
        model = self._embedding_model(model_name)
        step = model.config.max_batch
        parts = [
            await embedding.embed_pieces(model, pieces[i : i + step])
            for i in range(0, len(pieces), step)
        ]
        return np.concatenate(parts).astype(np.float32)

    async def _chunk(self, model_name: str, texts: list[str]) -> list[list[chunking.Piece]]:
        """Each text's pieces: by the model's tokens, or by the documented estimate for a model
        with no local tokenizer (chunking.split_estimated)."""
        model = self._embedding_model(model_name)
        tokenizer = model.tokenizer
        window = model.context_length
        if tokenizer is None:
            return await tokenize.off_loop(
                sum(map(len, texts)),
                lambda: chunking.split_estimated(
                    texts, window, bytes_per_token=passthrough.BYTES_PER_TOKEN
                ),
            )
        return await tokenize.off_loop(
            sum(map(len, texts)), lambda: chunking.split(tokenizer, texts, window)
        )

    async def _query_vector(self, collection: Collection, text: str) -> Vectors:
        """A text query's vector, from the embedding cache when it was seen before. A query
        longer than the model's window is cut to it (documents are chunked instead)."""
        spec = collection.spec
        if not spec.embedding_model:
            raise InvalidArgument(
                f"collection {spec.name!r} has no embedding_model, so it takes vector queries only",
                field="text",
            )
        model = self._embedding_model(spec.embedding_model)
        vectors, _ = await self._embedder.embed(model, [text], field="text", truncate=True)
        return vectors

    def _check_size(self, text: str, where: str, doc_id: str) -> None:
        limit = self._max_text_bytes
        size = len(text.encode("utf-8", "replace"))
        if size > limit:
            raise InvalidArgument(
                f"{where} (id {quote(doc_id)}) has {size} bytes; this router takes at most "
                f"{limit} per document (retrieval.max_text_bytes): split it into several "
                "documents, or raise the limit",
                field=where,
            )

    @staticmethod
    def _check_vector(
        spec: CollectionSpec, values: Sequence[float], where: str, label: str
    ) -> None:
        """InvalidArgument naming `where` (the field; `label` says whose it is) unless `values`
        fit the collection: its dimension, finite, and (cosine) not all zeros."""
        if len(values) != spec.dimension:
            raise InvalidArgument(
                f"{where} ({label}) has dimension {len(values)}; collection {spec.name!r} "
                f"expects {spec.dimension}",
                field=where,
            )
        fault = vector_fault(values, spec.metric)
        if fault is not None:
            raise InvalidArgument(f"{where} ({label}) {fault}", field=where)

    async def CreateCollection(
        self, message: pb.CreateCollectionRequest, context: Context
    ) -> pb.CreateCollectionResponse:
        c = message.config
        metric = _METRIC.get(c.metric)
        if metric is None:
            raise InvalidArgument(f"metric={c.metric} is not a known Metric", field="config.metric")
        dimension = c.dimension
        if c.embedding_model:
            model = self._embedding_model(c.embedding_model)
            if dimension and dimension != model.dimension:
                raise InvalidArgument(
                    f"dimension={dimension} but embedding_model {model.name!r} gives "
                    f"{model.dimension}-dimensional vectors; leave dimension 0 or set it to "
                    f"{model.dimension}",
                    field="config.dimension",
                )
            dimension = model.dimension
        spec = CollectionSpec(
            name=c.name,
            dimension=dimension,
            metric=metric,
            m=c.m or 16,
            ef_construction=c.ef_construction or 200,
            ef=c.ef or 64,
            embedding_model=c.embedding_model,
        )
        collection = await self._store.create(spec)
        return pb.CreateCollectionResponse(collection=_info(collection))

    async def ListCollections(
        self, message: pb.ListCollectionsRequest, context: Context
    ) -> pb.ListCollectionsResponse:
        return pb.ListCollectionsResponse(
            collections=[_info(self._store.get(n)) for n in self._store.names()]
        )

    async def DescribeCollection(
        self, message: pb.DescribeCollectionRequest, context: Context
    ) -> pb.DescribeCollectionResponse:
        return pb.DescribeCollectionResponse(collection=_info(self._store.get(message.name)))

    async def DropCollection(
        self, message: pb.DropCollectionRequest, context: Context
    ) -> pb.DropCollectionResponse:
        await self._store.drop(message.name)
        return pb.DropCollectionResponse()

    async def Upsert(self, message: pb.UpsertRequest, context: Context) -> pb.UpsertResponse:
        collection = self._store.get(message.collection)
        if not message.documents:
            raise InvalidArgument("documents is empty: give at least one", field="documents")
        spec = collection.spec
        latest = {d.id: i for i, d in enumerate(message.documents)}  # a later duplicate wins
        docs: list[Document] = []
        texts: dict[int, str] = {}  # row of `docs` -> text
        given: dict[int, list[float]] = {}
        for i, d in enumerate(message.documents):
            where = f"documents[{i}]"
            if not d.id or len(d.id.encode()) > 512:
                raise InvalidArgument(f"{where}.id must be 1 to 512 bytes", field=f"{where}.id")
            which = d.WhichOneof("content")
            if which == "text":
                if not d.text:
                    raise InvalidArgument(f"{where}.text is empty", field=f"{where}.text")
                self._check_size(d.text, f"{where}.text", d.id)
                if not spec.embedding_model:
                    raise InvalidArgument(
                        f"collection {spec.name!r} has no embedding_model, so it takes vectors "
                        "only; send vectors or create the collection with an embedding_model",
                        field=f"{where}.text",
                    )
            elif which == "vector":
                self._check_vector(spec, d.vector.values, f"{where}.vector", f"id {d.id!r}")
            else:
                raise InvalidArgument(
                    f"{where} (id {d.id!r}) has neither text nor vector",
                    field=f"{where}.content",
                )
            for key, value in d.numeric_metadata.items():
                if math.isnan(value):
                    field = f"{where}.numeric_metadata[{quote(key)}]"
                    raise InvalidArgument(f"{field} (id {d.id!r}) is NaN", field=field)
            if latest[d.id] != i:
                continue
            if which == "text":
                texts[len(docs)] = d.text
            else:
                given[len(docs)] = list(d.vector.values)
            docs.append(Document(d.id, d.text, dict(d.metadata), dict(d.numeric_metadata)))
        stored, vectors = await self._chunked(collection, docs, texts, given)
        await collection.upsert(stored, vectors)
        return pb.UpsertResponse(upserted=len(message.documents))

    async def _chunked(
        self,
        collection: Collection,
        docs: list[Document],
        texts: dict[int, str],
        given: dict[int, list[float]],
    ) -> tuple[list[Document], Vectors]:
        """The documents to store, a text longer than the model's window becoming its chunks
        (ids `<id>#<n>`, metadata parent_id=<id>), and their vectors."""
        spec = collection.spec
        pieces = (
            dict(
                zip(
                    texts,
                    await self._chunk(spec.embedding_model, list(texts.values())),
                    strict=True,
                )
            )
            if texts
            else {}
        )
        stored: list[Document] = []
        to_embed: list[chunking.Piece] = []  # in order of the text rows of `stored`
        text_rows: list[int] = []
        given_rows: dict[int, list[float]] = {}
        for row, doc in enumerate(docs):
            if row in given:
                given_rows[len(stored)] = given[row]
                stored.append(doc)
                continue
            parts = pieces[row]
            if len(parts) == 1:
                text_rows.append(len(stored))
                to_embed.append(parts[0])
                stored.append(doc)
                continue
            for n, piece in enumerate(parts):
                text_rows.append(len(stored))
                to_embed.append(piece)
                stored.append(
                    Document(
                        chunking.chunk_id(doc.id, n),
                        piece.text,
                        {**doc.metadata, chunking.PARENT_KEY: doc.id},
                        dict(doc.numeric),
                        parent=doc.id,
                    )
                )
        vectors = np.empty((len(stored), spec.dimension), dtype=np.float32)
        for row, values in given_rows.items():
            vectors[row] = values
        if to_embed:
            vectors[text_rows] = await self._embed_pieces(spec.embedding_model, to_embed)
        return stored, vectors

    async def Delete(self, message: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        collection = self._store.get(message.collection)
        if not message.ids:
            raise InvalidArgument("ids is empty: give at least one", field="ids")
        return pb.DeleteResponse(deleted=await collection.delete(list(message.ids)))

    async def Search(self, message: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        collection = self._store.get(message.collection)
        if not 1 <= message.top_k <= MAX_TOP_K:
            raise InvalidArgument(
                f"top_k={message.top_k} must be in [1, {MAX_TOP_K}]", field="top_k"
            )
        ef = message.ef if message.HasField("ef") else None
        if ef is not None and not 1 <= ef <= 4096:
            raise InvalidArgument(f"ef={ef} must be in [1, 4096]", field="ef")
        flt = filter_from_proto(message.filter)
        which = message.WhichOneof("query")
        if which == "text":
            query = await self._query_vector(collection, message.text)
        elif which == "vector":
            values = message.vector.values
            self._check_vector(collection.spec, values, "vector", "the query")
            query = np.asarray([values], dtype=np.float32)
        else:
            raise InvalidArgument("query is empty: give text or vector", field="query")
        hits = await collection.search(query[0], message.top_k, ef, flt)
        return pb.SearchResponse(hits=[_hit(h) for h in hits])


def _hit(h: Hit) -> pb.SearchHit:
    # Map fields only when there is something in them: initialising a proto map from an empty
    # dict still costs a generic Mapping update per field, a third of building a hit.
    doc = h.document
    hit = pb.SearchHit(id=doc.id, score=h.score, text=doc.text)
    if doc.metadata:
        hit.metadata.update(doc.metadata)
    if doc.numeric:
        hit.numeric_metadata.update(doc.numeric)
    return hit


def filter_from_proto(f: pb.Filter, where: str = "filter") -> Filter:
    flt = Filter(
        strings=tuple((c.field, frozenset(c.values)) for c in f.strings),
        ranges=tuple(
            Range(
                r.field,
                r.min if r.HasField("min") else None,
                r.max if r.HasField("max") else None,
            )
            for r in f.ranges
        ),
    )
    flt.validate(where)
    return flt


def _info(collection: Collection) -> pb.CollectionInfo:
    s = collection.spec
    return pb.CollectionInfo(
        config=pb.CollectionConfig(
            name=s.name,
            dimension=s.dimension,
            metric=_METRIC_PB[s.metric],
            m=s.m,
            ef_construction=s.ef_construction,
            ef=s.ef,
            embedding_model=s.embedding_model,
        ),
        document_count=len(collection),
    )
