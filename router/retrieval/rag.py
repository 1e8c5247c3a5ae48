"""Retrieval-augmented generation: search a collection for the caller's question and put the best
passages into the prompt, within the model's context window.

The fit is exact, not estimated: the budget is checked on the tokens of the prompt as the model
will see it (chat template applied). Passages go in best first; when they do not all fit, the
lowest-scoring ones are dropped first. The caller's own text is never cut: with no room left the
input goes to the model unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.cache.embedding import Embedder
from router.errors import FailedPrecondition, InvalidArgument
from router.retrieval.config import MAX_TOP_K, RagConfig
from router.retrieval.spec import Filter, Hit
from router.retrieval.store import CollectionStore
from router.serving import tokenize
from router.serving.catalog import Catalog
from router.serving.model import ServedModel
from router.serving.passthrough import estimate_tokens
from router.serving.prompt import prompt_ids

Messages = list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class RagRequest:
    """The retrieval option of one Generate/Complete call."""

    collection: str
    query: str = ""
    top_k: int = 0
    min_score: float | None = None
    filter: Filter = field(default_factory=Filter)
    max_context_tokens: int | None = None

    def validate(self, config: RagConfig) -> RagRequest:
        if not self.collection:
            raise InvalidArgument("retrieval.collection is empty", field="retrieval.collection")
        top_k = self.top_k or config.default_top_k
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidArgument(
                f"retrieval.top_k={self.top_k} must be in [1, {MAX_TOP_K}]",
                field="retrieval.top_k",
            )
        if self.max_context_tokens is not None and self.max_context_tokens < 1:
            raise InvalidArgument(
                f"retrieval.max_context_tokens={self.max_context_tokens} must be at least 1",
                field="retrieval.max_context_tokens",
            )
        if self.min_score is not None and math.isnan(self.min_score):
            raise InvalidArgument(
                "retrieval.min_score is NaN: set a number, or leave it unset to keep every passage",
                field="retrieval.min_score",
            )
        self.filter.validate("retrieval.filter")
        if top_k == self.top_k:
            return self
        return RagRequest(
            self.collection,
            self.query,
            top_k,
            self.min_score,
            self.filter,
            self.max_context_tokens,
        )


@dataclass(frozen=True, slots=True)
class Passage:
    id: str
    document_id: str
    score: float
    text: str


def question_of(messages: Messages | None, prompt: str | None) -> str:
    """What to search for when the request gives no query: the last user message or the prompt."""
    if messages is None:
        return prompt or ""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    raise InvalidArgument(
        "retrieval.query is empty and chat has no user message to search for",
        field="retrieval.query",
    )


def inject(
    config: RagConfig, messages: Messages | None, prompt: str | None, passages: Sequence[Passage]
) -> tuple[Messages | None, str | None]:
    """The input with `passages` put in by the template (unchanged when there are none)."""
    if not passages:
        return messages, prompt
    block = config.separator.join(
        config.passage_template.format(
            n=n, text=p.text, id=p.id, document_id=p.document_id, score=p.score
        )
        for n, p in enumerate(passages, 1)
    )
    if messages is None:
        return messages, config.template.format(passages=block, question=prompt or "")
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = list(messages)
    out[last] = {
        "role": "user",
        "content": config.template.format(passages=block, question=messages[last]["content"]),
    }
    return out, prompt


def fit(
    config: RagConfig,
    messages: Messages | None,
    prompt: str | None,
    passages: Sequence[Passage],
    count: Callable[[Messages | None, str | None], int],
    *,
    limit: int,
    max_passage_tokens: int | None,
) -> tuple[Messages | None, str | None, tuple[Passage, ...]]:
    """The input with the longest best-first prefix of `passages` whose prompt has at most
    `limit` tokens and whose passages (template included) add at most `max_passage_tokens`.
    `count` gives the prompt tokens of an input. With nothing fitting, the input unchanged."""
    base = count(messages, prompt)
    n = len(passages)
    while n > 0:
        m, p = inject(config, messages, prompt, passages[:n])
        tokens = count(m, p)
        fits = tokens <= limit and (
            max_passage_tokens is None or tokens - base <= max_passage_tokens
        )
        if fits:
            return m, p, tuple(passages[:n])
        n -= 1
    return messages, prompt, ()


def passages_from_hits(hits: Sequence[Hit], min_score: float | None) -> list[Passage]:
    """Search hits → passages, best first; hits without text (stored as vectors) or below
    `min_score` are left out."""
    out = []
    for hit in hits:
        doc = hit.document
        if not doc.text or (min_score is not None and hit.score < min_score):
            continue
        out.append(Passage(doc.id, doc.parent or doc.id, hit.score, doc.text))
    return out


def require_store(store: object | None) -> None:
    if store is None:
        raise FailedPrecondition(
            "this router serves no collections (retrieval.enabled is false, or it runs with "
            "--workers > 1), so the retrieval option cannot be used"
        )


class Retriever:
    """Runs the retrieval option of a call: search, then fit the passages into the prompt."""

    def __init__(
        self,
        config: RagConfig,
        store: CollectionStore | None,
        models: Catalog,
        embedder: Embedder,
    ) -> None:
        self.config = config
        self._store = store
        self._models = models
        self._embedder = embedder

    async def augment(
        self,
        model: ServedModel,
        rag: RagRequest,
        messages: Messages | None,
        prompt: str | None,
        *,
        reserve: int,
    ) -> tuple[Messages | None, str | None, tuple[Passage, ...]]:
        """The input with the passages that fit (see `fit`), leaving `reserve` tokens of the
        window for the answer, and the passages used."""
        require_store(self._store)
        assert self._store is not None
        rag = rag.validate(self.config)
        collection = self._store.get(rag.collection)
        spec = collection.spec
        if not spec.embedding_model:
            raise InvalidArgument(
                f"collection {spec.name!r} has no embedding_model (it stores vectors only), so "
                "the router cannot embed a query for it",
                field="retrieval.collection",
            )
        question = question_of(messages, prompt)  # also: a chat must have a user turn
        query = rag.query or question
        if not query:
            raise InvalidArgument("retrieval.query is empty", field="retrieval.query")
        encoder = self._models.get(spec.embedding_model, "embed")
        vectors, _ = await self._embedder.embed(
            encoder, [query], field="retrieval.query", truncate=True
        )
        hits = await collection.search(vectors[0], rag.top_k, None, rag.filter)
        passages = passages_from_hits(hits, rag.min_score)

        def count(m: Messages | None, p: str | None) -> int:
            if model.config.passthrough:  # no tokenizer here: the documented estimate
                return estimate_tokens(prompt=p, messages=m)
            return len(prompt_ids(model, prompt=p, messages=m))

        # Fitting renders and tokenizes the input once per candidate number of passages: on
        # the tokenizing worker when that is long, not on the loop.
        chars = (
            len(prompt or "")
            + sum(len(m.get("content", "")) for m in messages or ())
            + sum(len(p.text) for p in passages)
        )
        return await tokenize.off_loop(
            chars * (len(passages) + 1),
            lambda: fit(
                self.config,
                messages,
                prompt,
                passages,
                count,
                limit=model.context_length - reserve,
                max_passage_tokens=rag.max_context_tokens,
            ),
        )
