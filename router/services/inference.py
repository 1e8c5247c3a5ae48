"""InferenceService: proto ↔ domain translation only. What answers a call is
router.serving.answer; scheduling is router.scheduler."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from backends.base import SamplingParams, StructuredOutput
from router.errors import InvalidArgument
from router.guard.chain import CallScope, get_scope
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.retrieval.rag import RagRequest
from router.routing.breaker import BreakerState
from router.scheduler.request import Priority, RequestStatus
from router.services import tool_protos, wire_text
from router.services.retrieval import filter_from_proto
from router.serving import embedding
from router.serving.answer import (
    Answerer,
    Answering,
    CacheStatus,
    GenerationCall,
    Piece,
    Prepared,
    UsageSource,
)
from router.serving.catalog import Catalog
from router.serving.model import ServedModel
from router.serving.prompt import check_input_bytes
from router.telemetry import Metrics

Context = grpc.aio.ServicerContext[Any, Any]

_FINISH = {
    RequestStatus.FINISHED_STOPPED: pb.FINISH_REASON_STOP,
    RequestStatus.FINISHED_LENGTH: pb.FINISH_REASON_LENGTH,
    RequestStatus.FINISHED_CANCELLED: pb.FINISH_REASON_CANCELLED,
}
"""How a call ended (a stopped answer that made tool calls ends with FINISH_REASON_TOOL_CALLS)."""
_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    pb.PRIORITY_LOW: Priority.LOW,
    pb.PRIORITY_HIGH: Priority.HIGH,
}
_CACHE_MODES = frozenset(pb.CacheMode.values())
_OPTIONAL_SAMPLING = tuple(
    f.name
    for f in dataclasses.fields(SamplingParams)
    if f.name not in ("stop", "stop_token_ids", "ignore_eos", "structured")
)
"""SamplingParams fields that are `optional` in the proto (unset: the default applies)."""
_USAGE_SOURCE = {
    UsageSource.ROUTER: pb.USAGE_SOURCE_ROUTER,
    UsageSource.SERVER: pb.USAGE_SOURCE_SERVER,
    UsageSource.ESTIMATE: pb.USAGE_SOURCE_ESTIMATE,
}
_CACHE_STATUS = {
    CacheStatus.NONE: pb.CACHE_STATUS_UNSPECIFIED,
    CacheStatus.MISS: pb.CACHE_STATUS_MISS,
    CacheStatus.EXACT_HIT: pb.CACHE_STATUS_EXACT_HIT,
    CacheStatus.SEMANTIC_HIT: pb.CACHE_STATUS_SEMANTIC_HIT,
}


def rag_from_proto(r: pb.RetrievalOptions) -> RagRequest:
    return RagRequest(
        collection=r.collection,
        query=r.query,
        top_k=r.top_k,
        min_score=r.min_score if r.HasField("min_score") else None,
        filter=filter_from_proto(r.filter, "retrieval.filter"),
        max_context_tokens=r.max_context_tokens if r.HasField("max_context_tokens") else None,
    )


def structured_from_proto(s: pb.StructuredOutput) -> StructuredOutput | None:
    """The format the output must have; None when no format is set."""
    which = s.WhichOneof("format")
    if which is None:
        return None
    if which == "json_object":
        if not s.json_object:
            raise InvalidArgument(
                "sampling.structured_output.json_object is false; set it to true or leave "
                "structured_output unset",
                field="sampling.structured_output.json_object",
            )
        return StructuredOutput("json_object")
    return StructuredOutput(which, getattr(s, which))


def sampling_from_proto(s: pb.SamplingParams) -> tuple[SamplingParams, bool]:
    """Proto → SamplingParams with defaults for unset fields; also whether max_tokens was set."""
    kwargs: dict[str, Any] = {}
    for name in _OPTIONAL_SAMPLING:
        if s.HasField(name):  # type: ignore[arg-type]  # checked by a test to be proto fields
            kwargs[name] = getattr(s, name)
    return (
        SamplingParams(
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            structured=structured_from_proto(s.structured_output),
            **kwargs,
        ),
        s.HasField("max_tokens"),
    )


def finish_reason(piece: Piece) -> pb.FinishReason.ValueType:
    if piece.filter_reason:
        return pb.FINISH_REASON_CONTENT_FILTER
    if piece.called and piece.status == RequestStatus.FINISHED_STOPPED:
        return pb.FINISH_REASON_TOOL_CALLS
    return _FINISH.get(piece.status, pb.FINISH_REASON_UNSPECIFIED)


def generation_call(
    message: pb.GenerateRequest | pb.CompleteRequest,
    context: Context,
    *,
    stream: bool,
    routed: bool,
) -> GenerationCall:
    """A Generate or Complete request as the answering pipeline takes it; `routed`: the router
    has deployments, which need the session key and the caller's time left."""
    which = message.WhichOneof("input")
    messages = None
    if which == "chat":
        messages = [
            tool_protos.message_from_proto(m, i) for i, m in enumerate(message.chat.messages)
        ]
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
    return GenerationCall(
        model=message.model,
        task=message.task,
        messages=messages,
        prompt=message.prompt if which == "prompt" else None,
        params=params,
        max_tokens_set=max_tokens_set,
        priority=priority,
        sampling_key=functools.partial(_sampling_key, message),
        stream=stream,
        bypass_cache=message.cache_mode == pb.CACHE_MODE_BYPASS,
        rag=rag_from_proto(message.retrieval) if message.HasField("retrieval") else None,
        session_key=conversation_key(message, context) if routed else None,
        timeout_s=context.time_remaining() if routed else None,
        tools=tool_protos.tools_from_proto(message),
    )


def _sampling_key(message: pb.GenerateRequest | pb.CompleteRequest) -> bytes:
    """The sampling fields and tools as the exact cache keys them."""
    return message.sampling.SerializeToString(deterministic=True) + tool_protos.key_bytes(message)


class InferenceServicer:
    def __init__(
        self,
        models: Catalog,
        metrics: Metrics,
        answering: Answering,
        *,
        on_finished: Callable[[CallScope], None] | None = None,
    ) -> None:
        self._models = models
        self._metrics = metrics
        self._embedder = answering.embedder
        self._answerer = Answerer(models, metrics, answering)
        self._finished = on_finished or _ignore
        """Called with every call's scope when it ends, its tokens counted (usage metering)."""
        self._listed: tuple[tuple[bool, ...], pb.ListModelsResponse] | None = None

    def _final(
        self, prepared: Prepared, response: pb.GenerateResponse | pb.CompleteResponse
    ) -> None:
        """The fields only the last message carries."""
        response.model = prepared.model.name
        response.passages.extend(
            pb.PassageRef(id=p.id, document_id=p.document_id, score=p.score)
            for p in prepared.passages
        )
        response.cache_status = _CACHE_STATUS[prepared.cache_status]
        response.cache_similarity = prepared.similarity

    def check_Generate_bytes(self, data: bytes) -> None:
        """A big request whose input text alone cannot fit its model is refused from its wire
        form, before it is parsed and before anything decodes the text (wire_text)."""
        size = wire_text.input_size(data)
        if size is not None:
            model = self._models.get(size.model, "generate", task=size.task)
            check_input_bytes(model, size.nbytes, size.field)

    check_Complete_bytes = check_Generate_bytes

    async def Generate(
        self, message: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        scope = get_scope()
        try:
            routed = self._models.dispatcher is not None
            prepared = await self._answerer.prepare(
                generation_call(message, context, stream=True, routed=routed), scope
            )
            with_ids = message.return_token_ids
            completion = 0
            async for piece in self._answerer.pieces(prepared, scope):
                completion += piece.tokens
                response = pb.GenerateResponse(id=prepared.request_id, text=piece.text)
                if piece.tool_calls:
                    response.tool_calls.extend(map(tool_protos.delta_to_proto, piece.tool_calls))
                if with_ids:
                    response.token_ids.extend(piece.token_ids)
                if piece.finished:
                    self._final(prepared, response)
                    response.finish_reason = finish_reason(piece)
                    response.filter_reason = piece.filter_reason
                    response.usage.CopyFrom(
                        _usage(prepared.num_prompt, completion, prepared.usage_source)
                    )
                yield response
        finally:
            self._finished(scope)  # in the same generator: no extra layer per chunk

    async def Complete(self, message: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        scope = get_scope()
        try:
            return await self._complete(message, context, scope)
        finally:
            self._finished(scope)

    async def _complete(
        self, message: pb.CompleteRequest, context: Context, scope: CallScope
    ) -> pb.CompleteResponse:
        routed = self._models.dispatcher is not None
        prepared = await self._answerer.prepare(
            generation_call(message, context, stream=False, routed=routed), scope
        )
        cached = prepared.cached
        calls: list[pb.ToolCall] = []
        if cached is not None and scope.output_filter_factory is None and not prepared.tools:
            # A hit with no output guardrails: the whole answer at once, no piece loop.
            ids = cached.token_ids
            text = cached.text
            completion = cached.num_tokens
            scope.record_usage(completion)
            finish, filter_reason = _FINISH[cached.finish], ""
        else:
            parts: list[str] = []
            collected: list[int] = []
            last = Piece((), "", RequestStatus.FINISHED_CANCELLED, "", 0)
            completion = 0
            async for piece in self._answerer.pieces(prepared, scope):
                parts.append(piece.text)
                collected.extend(piece.token_ids)
                completion += piece.tokens
                for d in piece.tool_calls:
                    if d.id:
                        calls.append(pb.ToolCall(id=d.id, name=d.name))
                    calls[d.index].arguments += d.arguments
                last = piece
            text = "".join(parts)
            ids = tuple(collected)
            finish, filter_reason = finish_reason(last), last.filter_reason
        response = pb.CompleteResponse(
            id=prepared.request_id,
            text=text,
            finish_reason=finish,
            filter_reason=filter_reason,
            usage=_usage(prepared.num_prompt, completion, prepared.usage_source),
            tool_calls=calls,
        )
        self._final(prepared, response)
        if message.return_token_ids:
            response.token_ids.extend(ids)
        return response

    async def Embed(self, message: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        scope = get_scope()
        try:
            return await self._embed(message, scope)
        finally:
            self._finished(scope)

    async def _embed(self, message: pb.EmbedRequest, scope: CallScope) -> pb.EmbedResponse:
        model = self._models.get(message.model, "embed")
        scope.use_model(model.name)
        access = self._models.access.get(model.name)
        if access is not None:
            access.check(scope)  # an embedding deployment's own authentication and limits
        texts = [scope.check_input(text) for text in message.texts]
        embedding.check_batch(model, texts)
        # The quota is charged before embedding: a call over quota must not cost an encoder pass.
        plan = await self._embedder.plan(model, texts)
        prompt_tokens = plan.tokens
        await scope.admit(prompt_tokens=prompt_tokens, reserve_tokens=prompt_tokens, stream=False)
        vectors = await self._embedder.run(plan)
        source = UsageSource.ROUTER
        if model.tokenizer is None:
            # The server's count, where it gave one, replaces the estimate reserved for (the
            # quotas settle with it); an estimate when some texts were not counted by it.
            prompt_tokens = scope.prompt_tokens = plan.tokens
            source = UsageSource.SERVER if plan.counted else UsageSource.ESTIMATE
        self._metrics.prompt_tokens.labels(model.name).inc(prompt_tokens)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in vectors.tolist()],
            model=model.name,
            usage=_usage(prompt_tokens, 0, source),
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


def _ignore(scope: CallScope) -> None:
    pass


def _usage(prompt: int, completion: int, source: UsageSource = UsageSource.ROUTER) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        source=_USAGE_SOURCE[source],
    )
