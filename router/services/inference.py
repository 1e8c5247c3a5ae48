"""InferenceService: proto ↔ domain translation only. Scheduling lives in router.scheduler."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from router.cache.embedding import Embedder, Vectors
from router.cache.response import CachedAnswer, ResponseCache, model_build, request_key
from router.cache.semantic import SemanticCache
from router.errors import InvalidArgument, NotFound
from router.guard.authz import RETRIEVAL_READ
from router.guard.chain import CallScope, get_scope
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.retrieval.rag import Passage, RagRequest, Retriever, require_store
from router.routing.breaker import BreakerState
from router.scheduler.generation import Chunk
from router.scheduler.request import Priority, Request, RequestStatus, SamplingParams
from router.services.retrieval import filter_from_proto
from router.serving import embedding
from router.serving import prompt as prompt_
from router.serving.catalog import Catalog
from router.serving.model import ServedModel
from router.telemetry import Metrics

Context = grpc.aio.ServicerContext[Any, Any]

_FINISH = {
    RequestStatus.FINISHED_STOPPED: pb.FINISH_REASON_STOP,
    RequestStatus.FINISHED_LENGTH: pb.FINISH_REASON_LENGTH,
    RequestStatus.FINISHED_CANCELLED: pb.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk as the client will see it (after output guardrails)."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: pb.FinishReason.ValueType
    filter_reason: str
    tokens: int
    """Tokens it stands for (len(token_ids), or a text-only engine's count)."""


_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    pb.PRIORITY_LOW: Priority.LOW,
    pb.PRIORITY_HIGH: Priority.HIGH,
}


_CACHE_MODES = frozenset(pb.CacheMode.values())
_RAG_OPTION = "the retrieval option"


def rag_from_proto(r: pb.RetrievalOptions) -> RagRequest:
    return RagRequest(
        collection=r.collection,
        query=r.query,
        top_k=r.top_k,
        min_score=r.min_score if r.HasField("min_score") else None,
        filter=filter_from_proto(r.filter, "retrieval.filter"),
        max_context_tokens=r.max_context_tokens if r.HasField("max_context_tokens") else None,
    )


def input_bytes(messages: list[dict[str, str]] | None, prompt: str | None) -> bytes:
    """The input as the exact cache keys it: the prompt, or the chat turns (role and content)."""
    if messages is None:
        return b"p" + (prompt or "").encode("utf-8", "surrogatepass")
    return b"c" + json.dumps([(m["role"], m["content"]) for m in messages]).encode()


def semantic_text(
    messages: list[dict[str, str]] | None, prompt: str | None
) -> tuple[str, bytes] | None:
    """(the question, everything else) for the semantic cache: the prompt and no context, or a
    chat's last message when it is the user's and the earlier turns. None: not comparable."""
    if messages is None:
        return (prompt, b"") if prompt else None
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        return None
    return messages[-1]["content"], json.dumps(messages[:-1]).encode()


def semantic_namespace(
    model_id: str, request: Request, context: bytes, rag: RagRequest | None
) -> bytes:
    """Prompts match semantically only within one namespace: same model build, sampling
    parameters, earlier turns and retrieval option."""
    h = hashlib.blake2b(digest_size=16)
    for part in (model_id.encode(), repr(request.params).encode(), context, repr(rag).encode()):
        h.update(part)
        h.update(b"\0")
    return h.digest()


def sampling_from_proto(s: pb.SamplingParams) -> tuple[SamplingParams, bool]:
    """Proto → SamplingParams with defaults for unset fields; also whether max_tokens was set."""
    kwargs: dict[str, Any] = {}
    for name in (
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
    ):
        if s.HasField(name):
            kwargs[name] = getattr(s, name)
    return (
        SamplingParams(
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            **kwargs,
        ),
        s.HasField("max_tokens"),
    )


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
    cache_status: pb.CacheStatus.ValueType = pb.CACHE_STATUS_UNSPECIFIED
    similarity: float = 0.0
    semantic: tuple[bytes, Vectors] | None = None
    """(namespace, prompt vector) to remember after a miss, when the semantic cache is on."""


@dataclass(frozen=True, slots=True)
class Answering:
    """What answers a call besides the engine; each part is optional (off in config)."""

    embedder: Embedder
    responses: ResponseCache | None = None
    semantic: SemanticCache | None = None
    retriever: Retriever | None = None


class InferenceServicer:
    def __init__(self, models: Catalog, metrics: Metrics, answering: Answering) -> None:
        self._models = models
        self._metrics = metrics
        self._embedder = answering.embedder
        self._responses = answering.responses
        self._semantic = answering.semantic
        self._retriever = answering.retriever
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}"
        self._listed: tuple[tuple[bool, ...], pb.ListModelsResponse] | None = None
        self._builds: dict[str, str] = {}

    async def _request(
        self,
        message: pb.GenerateRequest | pb.CompleteRequest,
        scope: CallScope,
        context: Context,
        *,
        stream: bool,
    ) -> Prepared:
        route_key = None
        if self._models.dispatcher is None:
            if message.task:
                raise NotFound(
                    f"task {message.task!r} has no route: this router routes no tasks",
                )
            model = self._models.get(message.model, "generate")
        else:
            route_key = conversation_key(message, context)
            split_key = route_key
            if scope.identity is not None and scope.identity.subject != "anonymous":
                split_key = scope.identity.subject  # a caller stays on one side of an A/B split
            model = self._models.get(message.model, "generate", task=message.task, key=split_key)
        # Allowlists name what the client named: an alias allows what it splits across.
        scope.use_model(message.model or model.name)
        which = message.WhichOneof("input")
        messages = None
        prompt = None
        if which == "chat":
            messages = [
                {"role": m.role, "content": scope.check_input(m.content)}
                for m in message.chat.messages
            ]
        elif which == "prompt":
            prompt = scope.check_input(message.prompt)
        params, max_tokens_set = sampling_from_proto(message.sampling)
        priority = _PRIORITY.get(message.priority)
        if priority is None:
            raise InvalidArgument(
                f"priority={message.priority} is not a known Priority", field="priority"
            )
        if message.cache_mode not in _CACHE_MODES:
            raise InvalidArgument(
                f"cache_mode={message.cache_mode} is not a known CacheMode", field="cache_mode"
            )
        question = (messages, prompt)
        passages: tuple[Passage, ...] = ()
        rag: RagRequest | None = None
        if message.HasField("retrieval"):
            scope.require(RETRIEVAL_READ, _RAG_OPTION)
            rag = rag_from_proto(message.retrieval)
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
        if (
            responses is not None
            and message.cache_mode != pb.CACHE_MODE_BYPASS
            and responses.cacheable(params)
        ):
            # Keyed on the request as sent (after any retrieved passages went in), so a hit
            # costs neither the chat template nor tokenization.
            key = request_key(
                self._build(model),
                message.sampling.SerializeToString(deterministic=True),
                input_bytes(messages, prompt),
            )
            cached = await responses.get(key)
            if cached is not None:
                # No tokenization on a hit: the answer knows its prompt's token count.
                n = cached.prompt_tokens
                await scope.admit(
                    prompt_tokens=n, reserve_tokens=n + cached.num_tokens, stream=stream
                )
                self._metrics.prompt_tokens.labels(model.name).inc(n)
                return Prepared(
                    model,
                    request_id,
                    n,
                    passages=passages,
                    cached=cached,
                    cache_status=pb.CACHE_STATUS_EXACT_HIT,
                )
        request = prompt_.build_request(
            model,
            request_id,
            engine_id=self._models.next_engine_id(),
            text=prompt_.render(model, prompt=prompt, messages=messages),
            params=params,
            max_tokens_set=max_tokens_set,
            priority=priority,
        )
        if model.deployment is not None:
            request.route_key = route_key
            request.timeout_s = context.time_remaining()
            request.unary = not stream
        await scope.admit(
            prompt_tokens=request.num_prompt,
            reserve_tokens=request.num_prompt + request.params.max_tokens,
            stream=stream,
        )
        self._metrics.prompt_tokens.labels(model.name).inc(request.num_prompt)
        prepared = Prepared(model, request_id, request.num_prompt, request, passages, key)
        if key is not None:
            prepared.cache_status = pb.CACHE_STATUS_MISS
            if self._semantic is not None:
                await self._semantic_look_up(prepared, self._semantic, question, rag)
        return prepared

    def _build(self, model: ServedModel) -> str:
        build = self._builds.get(model.name)
        if build is None:
            build = self._builds[model.name] = model_build(model.name, model.manifest)
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
                prepared.cache_status = pb.CACHE_STATUS_SEMANTIC_HIT
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

    async def _pieces(self, prepared: Prepared, scope: CallScope) -> AsyncIterator[Piece]:
        """The chunks, timed, counted, passed through the output guardrails, and stored in the
        cache when the engine produced a whole answer."""
        model = prepared.model
        engine_run = prepared.cached is None
        ttft = self._metrics.ttft.labels(model.name)
        itl = self._metrics.itl.labels(model.name)
        output = scope.output_filter()
        store = engine_run and prepared.cache_key is not None
        raw: list[tuple[tuple[int, ...], str]] = []
        started = last = time.perf_counter()
        first = True
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
                text = chunk.text
                if output is not None:
                    text, stopped = output.feed(text)
                    if finished and stopped is None:
                        tail, stopped = output.finish()
                        text += tail
                    if stopped is not None:
                        # Leaving the loop closes the engine's iterator, which frees the slot.
                        yield Piece(
                            chunk.token_ids,
                            text,
                            pb.FINISH_REASON_CONTENT_FILTER,
                            stopped,
                            chunk.num_tokens,
                        )
                        return
                if finished and store:
                    answer = CachedAnswer(tuple(raw), chunk.status, prepared.num_prompt, tokens)
                    self._remember(prepared, answer)
                reason = _FINISH[chunk.status] if finished else pb.FINISH_REASON_UNSPECIFIED
                yield Piece(chunk.token_ids, text, reason, "", chunk.num_tokens)
        finally:
            scope.record_usage(tokens)
            if engine_run:
                self._metrics.completion_tokens.labels(model.name).inc(tokens)

    def _remember(self, prepared: Prepared, answer: CachedAnswer) -> None:
        assert self._responses is not None and prepared.cache_key is not None
        self._responses.put(prepared.cache_key, answer)
        if self._semantic is not None and prepared.semantic is not None:
            namespace, vector = prepared.semantic
            self._semantic.add(prepared.model.name, namespace, vector, prepared.cache_key)

    def _final(
        self, prepared: Prepared, response: pb.GenerateResponse | pb.CompleteResponse
    ) -> None:
        """The fields only the last message carries."""
        response.model = prepared.model.name
        response.passages.extend(
            pb.PassageRef(id=p.id, document_id=p.document_id, score=p.score)
            for p in prepared.passages
        )
        response.cache_status = prepared.cache_status
        response.cache_similarity = prepared.similarity

    async def Generate(
        self, message: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        scope = get_scope()
        prepared = await self._request(message, scope, context, stream=True)
        with_ids = message.return_token_ids
        completion = 0
        async for piece in self._pieces(prepared, scope):
            completion += piece.tokens
            response = pb.GenerateResponse(id=prepared.request_id, text=piece.text)
            if with_ids:
                response.token_ids.extend(piece.token_ids)
            if piece.finish_reason:
                self._final(prepared, response)
                response.finish_reason = piece.finish_reason
                response.filter_reason = piece.filter_reason
                response.usage.CopyFrom(_usage(prepared.num_prompt, completion))
            yield response

    async def Complete(self, message: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        scope = get_scope()
        prepared = await self._request(message, scope, context, stream=False)
        cached = prepared.cached
        if cached is not None and scope.output_filter_factory is None:
            # A hit with no output guardrails: the whole answer at once, no piece loop.
            ids = cached.token_ids
            text = cached.text
            completion = cached.num_tokens
            scope.record_usage(completion)
            finish, filter_reason = _FINISH[cached.finish], ""
        else:
            parts: list[str] = []
            collected: list[int] = []
            last = Piece((), "", pb.FINISH_REASON_CANCELLED, "", 0)
            completion = 0
            async for piece in self._pieces(prepared, scope):
                parts.append(piece.text)
                collected.extend(piece.token_ids)
                completion += piece.tokens
                last = piece
            text = "".join(parts)
            ids = tuple(collected)
            finish, filter_reason = last.finish_reason, last.filter_reason
        response = pb.CompleteResponse(
            id=prepared.request_id,
            text=text,
            finish_reason=finish,
            filter_reason=filter_reason,
            usage=_usage(prepared.num_prompt, completion),
        )
        self._final(prepared, response)
        if message.return_token_ids:
            response.token_ids.extend(ids)
        return response

    async def Embed(self, message: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        scope = get_scope()
        model = self._models.get(message.model, "embed")
        scope.use_model(model.name)
        texts = [scope.check_input(text) for text in message.texts]
        embedding.check_batch(model, texts)
        # The quota is charged before embedding: a call over quota must not cost an encoder pass.
        plan = self._embedder.plan(model, texts)
        prompt_tokens = plan.tokens
        await scope.admit(prompt_tokens=prompt_tokens, reserve_tokens=prompt_tokens, stream=False)
        vectors = await self._embedder.run(plan)
        self._metrics.prompt_tokens.labels(model.name).inc(prompt_tokens)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in vectors.tolist()],
            model=model.name,
            usage=_usage(prompt_tokens, 0),
        )

    async def ListModels(
        self, message: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        if self._models.dispatcher is not None:
            # Replica state (breakers, calls in flight) changes all the time: built per call.
            return list_models(self._models)
        # Built once per change of readiness, not per call: load balancers and dashboards
        # poll this, and it is the router's cheapest call (benchmarked against a bare echo).
        state = tuple(m.ready for m in self._models)
        if self._listed is None or self._listed[0] != state:
            self._listed = (state, list_models(self._models))
        return self._listed[1]


def conversation_key(message: pb.GenerateRequest | pb.CompleteRequest, context: Context) -> str:
    """What keeps a conversation on one replica (and a caller on one side of a split): the
    client's `x-session-id` header, else the conversation's opening (system turns and the first
    user turn, which every later turn resends), else the prompt's first 256 characters."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-session-id" and isinstance(value, str) and value:
            return value
    if message.WhichOneof("input") == "chat":
        opening = []
        for m in message.chat.messages:
            opening.append(f"{m.role}\x1f{m.content}")
            if m.role == "user":
                break
        return "\x1e".join(opening)
    return message.prompt[:256]


_CIRCUIT = {
    BreakerState.CLOSED: pb.CIRCUIT_STATE_CLOSED,
    BreakerState.HALF_OPEN: pb.CIRCUIT_STATE_HALF_OPEN,
    BreakerState.OPEN: pb.CIRCUIT_STATE_OPEN,
}


def list_models(models: Catalog) -> pb.ListModelsResponse:
    tasks: dict[str, list[str]] = {}
    for task, target in sorted(models.tasks.items()):
        tasks.setdefault(target, []).append(task)
    health = models.dispatcher.health() if models.dispatcher is not None else {}
    out = []
    for model in models:
        info = model_info(model)
        info.tasks.extend(tasks.get(model.name, ()))
        if model.deployment is not None:
            dc = model.deployment
            info.serves = dc.model_name
            info.backend = ",".join(dict.fromkeys(r.backend for r in dc.replicas))
            states = {r.name: r for r in health[model.name].replicas}
            for served, rc in zip(model.replicas, dc.replicas, strict=True):
                state = states[rc.name]
                info.replicas.append(
                    pb.ReplicaInfo(
                        name=rc.name,
                        backend=rc.backend,
                        device="" if rc.url else served.config.device,
                        url=rc.url,
                        weight=rc.weight,
                        circuit_state=_CIRCUIT[state.breaker.state],
                        healthy=state.healthy,
                        outstanding=state.outstanding,
                        error=served.error,
                    )
                )
        out.append(info)
    for alias, targets in models.aliases.items():
        first = models.routing.deployment(next(iter(targets)))
        ready = any(m.ready for m in models if m.name in targets)
        out.append(
            pb.ModelInfo(
                name=alias,
                kind=pb.MODEL_KIND_GENERATE,
                backend="alias",
                ready=ready,
                serves=first.model_name,
                tasks=tasks.get(alias, ()),
                alias_targets=[pb.AliasTarget(deployment=d, weight=w) for d, w in targets.items()],
            )
        )
    return pb.ListModelsResponse(models=out)


def model_info(model: ServedModel) -> pb.ModelInfo:
    cfg = model.config
    generate = cfg.kind == "generate"
    return pb.ModelInfo(
        name=model.name,
        kind=pb.MODEL_KIND_GENERATE if generate else pb.MODEL_KIND_EMBED,
        context_length=model.context_length,
        dimension=model.dimension,
        backend=cfg.backend,
        ready=model.ready,
        max_batch=cfg.max_slots if generate else cfg.max_batch,
    )


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
