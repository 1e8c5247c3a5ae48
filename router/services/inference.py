"""InferenceService: proto ↔ domain translation only. Scheduling lives in router.scheduler."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from router.errors import InvalidArgument
from router.guard.chain import CallScope, get_scope
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.routing.registry import ServedModel, ServedModels
from router.scheduler.request import Priority, Request, RequestStatus, SamplingParams
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


_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    pb.PRIORITY_LOW: Priority.LOW,
    pb.PRIORITY_HIGH: Priority.HIGH,
}


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


class InferenceServicer:
    def __init__(self, models: ServedModels, metrics: Metrics) -> None:
        self._models = models
        self._metrics = metrics
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}"
        self._listed: tuple[tuple[bool, ...], pb.ListModelsResponse] | None = None

    async def _request(
        self, message: pb.GenerateRequest | pb.CompleteRequest, scope: CallScope, *, stream: bool
    ) -> tuple[ServedModel, Request]:
        model = self._models.get(message.model, "generate")
        scope.use_model(model.name)
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
        request = self._models.build_request(
            model,
            scope.request_id or f"gen-{self._id_prefix}-{next(self._ids)}",
            prompt=prompt,
            messages=messages,
            params=params,
            max_tokens_set=max_tokens_set,
            priority=priority,
        )
        await scope.admit(
            prompt_tokens=request.num_prompt,
            reserve_tokens=request.num_prompt + request.params.max_tokens,
            stream=stream,
        )
        self._metrics.prompt_tokens.labels(model.name).inc(request.num_prompt)
        return model, request

    async def _pieces(
        self, model: ServedModel, request: Request, scope: CallScope
    ) -> AsyncIterator[Piece]:
        """The engine's chunks, timed, counted and passed through the output guardrails."""
        assert model.engine is not None
        ttft = self._metrics.ttft.labels(model.name)
        itl = self._metrics.itl.labels(model.name)
        output = scope.output_filter()
        started = last = time.perf_counter()
        first = True
        tokens = 0
        try:
            async for chunk in model.engine.generate(request):
                now = time.perf_counter()
                if first:
                    ttft.observe(now - started)
                    first = False
                else:
                    itl.observe(now - last)
                last = now
                tokens += len(chunk.token_ids)
                finished = chunk.status.is_finished
                text = chunk.text
                if output is not None:
                    text, stopped = output.feed(text)
                    if finished and stopped is None:
                        tail, stopped = output.finish()
                        text += tail
                    if stopped is not None:
                        # Leaving the loop closes the engine's iterator, which frees the slot.
                        yield Piece(chunk.token_ids, text, pb.FINISH_REASON_CONTENT_FILTER, stopped)
                        return
                reason = _FINISH[chunk.status] if finished else pb.FINISH_REASON_UNSPECIFIED
                yield Piece(chunk.token_ids, text, reason, "")
        finally:
            scope.record_usage(tokens)
            self._metrics.completion_tokens.labels(model.name).inc(tokens)

    async def Generate(
        self, message: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        scope = get_scope()
        model, request = await self._request(message, scope, stream=True)
        with_ids = message.return_token_ids
        completion = 0
        async for piece in self._pieces(model, request, scope):
            completion += len(piece.token_ids)
            response = pb.GenerateResponse(id=request.request_id, text=piece.text)
            if with_ids:
                response.token_ids.extend(piece.token_ids)
            if piece.finish_reason:
                response.model = model.name
                response.finish_reason = piece.finish_reason
                response.filter_reason = piece.filter_reason
                response.usage.CopyFrom(_usage(request.num_prompt, completion))
            yield response

    async def Complete(self, message: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        scope = get_scope()
        model, request = await self._request(message, scope, stream=False)
        parts: list[str] = []
        ids: list[int] = []
        last = Piece((), "", pb.FINISH_REASON_CANCELLED, "")
        async for piece in self._pieces(model, request, scope):
            parts.append(piece.text)
            ids.extend(piece.token_ids)
            last = piece
        response = pb.CompleteResponse(
            id=request.request_id,
            text="".join(parts),
            finish_reason=last.finish_reason,
            filter_reason=last.filter_reason,
            usage=_usage(request.num_prompt, len(ids)),
            model=model.name,
        )
        if message.return_token_ids:
            response.token_ids.extend(ids)
        return response

    async def Embed(self, message: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        scope = get_scope()
        model = self._models.get(message.model, "embed")
        scope.use_model(model.name)
        assert model.batcher is not None
        texts = [scope.check_input(text) for text in message.texts]
        ids = self._models.tokenize_texts(model, texts)
        prompt_tokens = sum(len(row) for row in ids)
        await scope.admit(prompt_tokens=prompt_tokens, reserve_tokens=prompt_tokens, stream=False)
        vectors = await model.batcher.embed(ids)
        self._metrics.prompt_tokens.labels(model.name).inc(prompt_tokens)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in vectors.tolist()],
            model=model.name,
            usage=_usage(prompt_tokens, 0),
        )

    async def ListModels(
        self, message: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        # Built once per change of readiness, not per call: load balancers and dashboards
        # poll this, and it is the router's cheapest call (benchmarked against a bare echo).
        state = tuple(m.ready for m in self._models)
        if self._listed is None or self._listed[0] != state:
            self._listed = (
                state,
                pb.ListModelsResponse(models=[model_info(m) for m in self._models]),
            )
        return self._listed[1]


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
