"""What answers a generation call, free of protos: the exact and semantic caches, retrieval,
admission, the engine, and the output guardrails, in that order.

    prepare(call, scope)   resolve the model, apply input guardrails, retrieve passages, look
                           the answer up in the caches, or build the engine request; admit it
                           against the caller's limits and quotas
    pieces(prepared, scope) the engine's chunks (or the cached answer's) timed, counted, passed
                           through the output guardrails, and stored in the caches when whole

The InferenceService turns protos into a GenerationCall and Pieces back into responses.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from backends.base import SamplingParams
from router.cache.embedding import Embedder, Vectors
from router.cache.keys import input_bytes, semantic_namespace, semantic_text
from router.cache.response import CachedAnswer, ResponseCache, model_build, request_key
from router.cache.semantic import SemanticCache
from router.errors import InvalidArgument
from router.guard.authz import RETRIEVAL_READ
from router.guard.chain import CallScope
from router.retrieval.rag import Passage, RagRequest, Retriever, require_store
from router.scheduler.generation import Chunk
from router.scheduler.request import Priority, Request, RequestStatus
from router.serving import passthrough as passthrough_
from router.serving import prompt as prompt_
from router.serving.catalog import Catalog
from router.serving.model import ServedModel
from router.serving.tooling import check_room_for_a_call, offer_tools
from router.telemetry import Metrics
from router.tools.parser import ToolCallParser
from router.tools.prompt import has_tool_history
from router.tools.spec import ToolCallDelta, Tools

_RAG_OPTION = "the retrieval option"


class UsageSource(enum.Enum):
    ROUTER = 1
    """Counted by the router with the model's own tokenizer."""
    SERVER = 2
    """Reported by the remote server (a model served with no local artifact)."""
    ESTIMATE = 3
    """Estimated (router.serving.passthrough): the server reported no count."""


class CacheStatus(enum.Enum):
    NONE = 0
    """Not looked up (cache off, bypassed, or a nondeterministic request)."""
    MISS = 1
    EXACT_HIT = 2
    SEMANTIC_HIT = 3


@dataclass(frozen=True, slots=True)
class GenerationCall:
    """A Generate or Complete call as the pipeline sees it."""

    model: str
    """What the client named (a model, a deployment or an alias); empty with a task."""
    task: str
    messages: list[dict[str, str]] | None
    """Chat turns (role, content), or None for a raw prompt."""
    prompt: str | None
    params: SamplingParams
    max_tokens_set: bool
    """Whether the client set max_tokens (else the model's default, within the context)."""
    priority: Priority
    sampling_key: Callable[[], bytes]
    """The sampling fields as the exact cache keys them (as the client sent them); called only
    when the answer may be cached."""
    stream: bool
    bypass_cache: bool = False
    rag: RagRequest | None = None
    session_key: str | None = None
    """What keeps a conversation on one replica (routed models)."""
    timeout_s: float | None = None
    """The caller's time left (routed models: attempts and hedges stay within it)."""
    tools: Tools | None = None
    """Functions the model may call, and whether it must (router.tools)."""


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk as the client will see it (after output guardrails)."""

    token_ids: tuple[int, ...]
    text: str
    status: RequestStatus
    """RUNNING, or how the answer ended (on its last piece)."""
    filter_reason: str
    """Set when an output guardrail ended the answer here."""
    tokens: int
    """Tokens it stands for (len(token_ids), or a text-only engine's count)."""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    """Pieces of the tool calls being written (the text then holds none of them)."""
    called: bool = False
    """The answer is tool calls (the last piece says so for the finish reason)."""

    @property
    def finished(self) -> bool:
        return bool(self.filter_reason) or self.status.is_finished


@dataclass(slots=True)
class Prepared:
    """A Generate/Complete call ready to run: admitted, and either answered from the cache or
    tokenized into an engine request."""

    model: ServedModel
    request_id: str
    num_prompt: int
    request: Request | None = None
    """The engine request (None when an exact cache hit answers without tokenizing)."""
    passages: tuple[Passage, ...] = ()
    cache_key: bytes | None = None
    """Exact-cache key when the answer may be stored (cacheable and not bypassed)."""
    cached: CachedAnswer | None = None
    cache_status: CacheStatus = CacheStatus.NONE
    similarity: float = 0.0
    semantic: tuple[bytes, Vectors] | None = None
    """(namespace, prompt vector) to remember after a miss, when the semantic cache is on."""
    tools: bool = False
    """The answer may be tool calls: its text goes through a ToolCallParser."""
    usage_source: UsageSource = UsageSource.ROUTER
    """Who counted num_prompt and the completion's tokens (a passthrough model's server, once
    it reports them)."""


class ModelMetrics(NamedTuple):
    prompt_tokens: Any
    completion_tokens: Any
    ttft: Any
    itl: Any


@dataclass(frozen=True, slots=True)
class Answering:
    """What answers a call besides the engine; each part is optional (off in config)."""

    embedder: Embedder
    responses: ResponseCache | None = None
    semantic: SemanticCache | None = None
    retriever: Retriever | None = None


class Answerer:
    def __init__(self, models: Catalog, metrics: Metrics, answering: Answering) -> None:
        self._models = models
        self._metrics = metrics
        self._embedder = answering.embedder
        self._responses = answering.responses
        self._semantic = answering.semantic
        self._retriever = answering.retriever
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}"
        self._builds: dict[str, str] = {}
        self._metric_children: dict[str, ModelMetrics] = {}

    async def prepare(self, call: GenerationCall, scope: CallScope) -> Prepared:
        """Admit the call and make it ready to run: the model resolved (aliases and tasks by
        the caller's identity or the session key), input guardrails applied, passages
        retrieved, and either a cached answer found or an engine request built."""
        route_key = split_key = None
        if self._models.dispatcher is not None:
            route_key = split_key = call.session_key
            if scope.identity is not None and scope.identity.subject != "anonymous":
                split_key = scope.identity.subject  # a caller stays on one side of an A/B split
        model = self._models.get(call.model, "generate", task=call.task, key=split_key)
        # Allowlists name what the client named: an alias allows what it splits across.
        scope.use_model(call.model or model.name)
        access = self._models.access.get(model.name)
        if access is not None:
            access.check(scope)  # a deployment's own authentication and limits
        prompt_.check_input_size(model, prompt=call.prompt, messages=call.messages)
        messages = None
        prompt = None
        if call.messages is not None:
            passthrough_.refuse_images(model, call.messages)
            messages = [passthrough_.guarded(m, scope.check_input) for m in call.messages]
        elif call.prompt is not None:
            prompt = scope.check_input(call.prompt)
        params, max_tokens_set, priority = call.params, call.max_tokens_set, call.priority
        tools = call.tools
        passthrough = model.config.passthrough
        # A passthrough model's server renders tools and parses its own tool calls (its chunks
        # carry them): tools and their history go to it as they are.
        offered = tools is not None and bool(tools.offered) and not passthrough
        if not passthrough and (
            tools is not None or (messages is not None and has_tool_history(messages))
        ):
            messages, params = offer_tools(model, tools, messages, params)
        stream = call.stream
        question = (messages, prompt)
        passages: tuple[Passage, ...] = ()
        rag = call.rag
        if rag is not None:
            scope.require(RETRIEVAL_READ, _RAG_OPTION)
            if self._retriever is None:
                require_store(None)
            assert self._retriever is not None
            reserve = params.max_tokens if max_tokens_set else model.config.default_max_tokens
            messages, prompt, passages = await self._retriever.augment(
                model, rag, messages, prompt, reserve=reserve
            )
        request_id = scope.request_id or f"gen-{self._id_prefix}-{next(self._ids)}"
        responses = self._responses
        key = None
        if responses is not None and not call.bypass_cache and responses.cacheable(params):
            # Keyed on the request as sent (after any retrieved passages went in), so a hit
            # costs neither the chat template nor tokenization.
            key = request_key(
                self._build(model),
                call.sampling_key(),
                input_bytes(messages, prompt),
            )
            cached = await responses.get(key)
            if cached is not None:
                # No tokenization on a hit: the answer knows its prompt's token count.
                n = cached.prompt_tokens
                await scope.admit(
                    prompt_tokens=n, reserve_tokens=n + cached.num_tokens, stream=stream
                )
                self._children(model.name).prompt_tokens.inc(n)
                return Prepared(
                    model,
                    request_id,
                    n,
                    passages=passages,
                    cached=cached,
                    cache_status=CacheStatus.EXACT_HIT,
                    tools=offered,
                )
        assert model.engine is not None
        model.engine.check_admission(priority)  # a call to be shed is not tokenized first
        if passthrough:
            request, num_prompt = passthrough_.build_request(
                model,
                request_id,
                engine_id=self._models.next_engine_id(),
                prompt=prompt,
                messages=messages,
                tools=tools,
                params=params,
                max_tokens_set=max_tokens_set,
                priority=priority,
            )
        else:
            request = await prompt_.build_request(
                model,
                request_id,
                engine_id=self._models.next_engine_id(),
                text=prompt_.render(model, prompt=prompt, messages=messages, tools=tools),
                params=params,
                max_tokens_set=max_tokens_set,
                priority=priority,
            )
            num_prompt = request.num_prompt
            if tools is not None:
                check_room_for_a_call(model, tools, request.params.max_tokens)
            await prompt_.constrain(model, request)
        request.unary = not stream
        if model.deployment is not None:
            request.route_key = route_key
            request.timeout_s = call.timeout_s
        await scope.admit(
            prompt_tokens=num_prompt,
            reserve_tokens=num_prompt + request.params.max_tokens,
            stream=stream,
        )
        if not passthrough:  # else counted when the server has said how many (pieces)
            self._children(model.name).prompt_tokens.inc(num_prompt)
        prepared = Prepared(model, request_id, num_prompt, request, passages, key)
        prepared.tools = offered
        if passthrough:
            prepared.usage_source = UsageSource.ESTIMATE
        if key is not None:
            prepared.cache_status = CacheStatus.MISS
            if self._semantic is not None:
                await self._semantic_look_up(prepared, self._semantic, question, rag)
        return prepared

    def _children(self, name: str) -> ModelMetrics:
        """The model's metric children (labels() resolved once per model, not per call)."""
        children = self._metric_children.get(name)
        if children is None:
            m = self._metrics
            children = self._metric_children[name] = ModelMetrics(
                m.prompt_tokens.labels(name),
                m.completion_tokens.labels(name),
                m.ttft.labels(name),
                m.itl.labels(name),
            )
        return children

    def _build(self, model: ServedModel) -> str:
        build = self._builds.get(model.name)
        if build is None:
            if model.config.passthrough:
                build = passthrough_.build_id(model)
            else:
                build = model_build(model.name, model.manifest)
            self._builds[model.name] = build
        return build

    async def _semantic_look_up(
        self,
        prepared: Prepared,
        semantic: SemanticCache,
        question: tuple[list[dict[str, str]] | None, str | None],
        rag: RagRequest | None,
    ) -> None:
        """After an exact miss: a similar earlier prompt's answer, or what to remember."""
        assert self._responses is not None and prepared.request is not None
        found = semantic_text(*question)
        if found is None:
            return
        text, context = found
        model = prepared.model
        namespace = semantic_namespace(self._build(model), prepared.request, context, rag)
        encoder = self._models.get(semantic.config.embedding_model, "embed")
        try:
            vectors, _ = await self._embedder.embed(encoder, [text])
        except InvalidArgument:  # longer than the encoder's window: no semantic match
            return
        hit = semantic.lookup(model.name, namespace, vectors[0])
        if hit is not None:
            cached = await self._responses.get(hit.key)
            if cached is not None:
                prepared.cached = cached
                prepared.cache_status = CacheStatus.SEMANTIC_HIT
                prepared.similarity = hit.similarity
                return
        prepared.semantic = (namespace, vectors[0])

    async def _chunks(self, prepared: Prepared) -> AsyncIterator[Chunk]:
        """The engine's chunks, or a cached answer replayed piece by piece."""
        cached = prepared.cached
        if cached is None:
            assert prepared.model.engine is not None and prepared.request is not None
            async for chunk in prepared.model.engine.generate(prepared.request):
                yield chunk
            return
        last = len(cached.pieces) - 1
        # Pieces without ids (text-only engines): the last chunk carries the uncounted tokens.
        uncounted = cached.num_tokens - len(cached.token_ids)
        for i, (ids, text) in enumerate(cached.pieces):
            if i < last:
                yield Chunk(ids, text, RequestStatus.RUNNING)
            else:
                yield Chunk(ids, text, cached.finish, tokens=len(ids) + uncounted)
        if last < 0:
            yield Chunk((), "", cached.finish, tokens=uncounted)

    async def pieces(self, prepared: Prepared, scope: CallScope) -> AsyncIterator[Piece]:
        """The chunks, timed, counted, passed through the output guardrails, and stored in the
        cache when the engine produced a whole answer."""
        model = prepared.model
        engine_run = prepared.cached is None
        children = self._children(model.name)
        ttft, itl = children.ttft, children.itl
        output = scope.output_filter()
        parser = ToolCallParser() if prepared.tools else None
        store = engine_run and prepared.cache_key is not None
        raw: list[tuple[tuple[int, ...], str]] = []
        started = last = time.perf_counter()
        first = True
        called = False
        tokens = 0
        try:
            async for chunk in self._chunks(prepared):
                if engine_run:
                    now = time.perf_counter()
                    if first:
                        ttft.observe(now - started)
                        first = False
                    else:
                        itl.observe(now - last)
                    last = now
                tokens += chunk.num_tokens
                if store:
                    raw.append((chunk.token_ids, chunk.text))
                finished = chunk.status.is_finished
                if chunk.prompt_tokens >= 0:  # the server's own count settles the estimate
                    prepared.num_prompt = scope.prompt_tokens = chunk.prompt_tokens
                    prepared.usage_source = UsageSource.SERVER
                text = chunk.text
                if chunk.tool_calls:  # a passthrough model's server parsed them
                    called = True
                    store = False  # a cached answer replays text only
                if output is not None:
                    text, stopped = output.feed(text)
                    if finished and stopped is None:
                        tail, stopped = output.finish()
                        text += tail
                    if stopped is not None:
                        # Leaving the loop closes the engine's iterator, which frees the slot.
                        yield Piece(chunk.token_ids, text, chunk.status, stopped, chunk.num_tokens)
                        return
                if finished and store:
                    answer = CachedAnswer(tuple(raw), chunk.status, prepared.num_prompt, tokens)
                    self._remember(prepared, answer)
                if parser is None:
                    yield Piece(
                        chunk.token_ids,
                        text,
                        chunk.status,
                        chunk.filter_reason,
                        chunk.num_tokens,
                        chunk.tool_calls,
                        called,
                    )
                    continue
                text, deltas = parser.feed(text)
                if finished:
                    text += parser.finish()
                yield Piece(
                    chunk.token_ids,
                    text,
                    chunk.status,
                    "",
                    chunk.num_tokens,
                    tuple(deltas),
                    parser.called,
                )
        finally:
            if prepared.request is not None:
                scope.served_replica = prepared.request.served_by
            scope.record_usage(tokens)
            if engine_run:
                children.completion_tokens.inc(tokens)
                if prepared.usage_source is not UsageSource.ROUTER:
                    children.prompt_tokens.inc(prepared.num_prompt)

    def _remember(self, prepared: Prepared, answer: CachedAnswer) -> None:
        assert self._responses is not None and prepared.cache_key is not None
        self._responses.put(prepared.cache_key, answer)
        if self._semantic is not None and prepared.semantic is not None:
            namespace, vector = prepared.semantic
            self._semantic.add(prepared.model.name, namespace, vector, prepared.cache_key)
