"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models, each one translation of a JSON body to an InferenceService call and back."""

from __future__ import annotations

import array
import base64
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.rest import openai_params as params
from router.rest import openai_schema as schema
from router.rest import openai_tools
from router.rest.errors import ApiError
from router.rest.grpc_client import RouterClient
from router.rest.local_client import LocalRouterClient
from router.rest.openai_params import refuse_unhonoured

_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_CANCELLED: "stop",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int


_SOURCES = {pb.USAGE_SOURCE_SERVER: "server", pb.USAGE_SOURCE_ESTIMATE: "estimate"}
"""Usage not counted by the router's own tokenizer says so (`usage.source`, an extension)."""


def _usage(usage: pb.Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    source = _SOURCES.get(usage.source)
    if source is not None:
        out["source"] = source
    return out


def _finish(reason: pb.FinishReason.ValueType) -> str | None:
    return _FINISH.get(reason)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _JSON(JSONResponse):
    """A JSON answer rendered by orjson (~5x faster than the json module's, on every call)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class OpenAIRoutes:
    """Handlers over one RouterClient; `routes()` lists them for the Starlette app."""

    def __init__(self, client: RouterClient | LocalRouterClient, limits: Limits) -> None:
        self._client = client
        self._limits = limits
        self._created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ]

    async def chat_completions(self, request: Request) -> Response:
        body = await schema.read_json(request, self._limits.max_body_bytes)
        refuse_unhonoured(body, params.CHAT)
        model = schema.get_model(body)
        messages = schema.chat_messages(body)
        sampling = schema.sampling(body)
        tools = openai_tools.tool_fields(body)
        stream, include_usage = schema.get_stream(body)
        session = params.session_key(body)
        if stream:
            generate = pb.GenerateRequest(model=model, chat=messages, sampling=sampling, **tools)
            return await self._stream(request, generate, include_usage, _chat_chunk, session)
        call = pb.CompleteRequest(model=model, chat=messages, sampling=sampling, **tools)
        answer = await self._client.complete(request, call, session)
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        if answer.tool_calls:
            message["content"] = answer.text or None
            message["tool_calls"] = openai_tools.message_calls(answer.tool_calls)
        return _JSON(
            {
                "id": answer.id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": answer.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": _finish(answer.finish_reason),
                    }
                ],
                "usage": _usage(answer.usage),
            },
            headers={"x-request-id": answer.id},
        )

    async def completions(self, request: Request) -> Response:
        body = await schema.read_json(request, self._limits.max_body_bytes)
        refuse_unhonoured(body, params.COMPLETIONS)
        model = schema.get_model(body)
        prompt = schema.prompt(body)
        sampling = schema.sampling(body)
        stream, include_usage = schema.get_stream(body)
        session = params.session_key(body)
        if stream:
            generate = pb.GenerateRequest(model=model, prompt=prompt, sampling=sampling)
            return await self._stream(request, generate, include_usage, _text_chunk, session)
        answer = await self._client.complete(
            request, pb.CompleteRequest(model=model, prompt=prompt, sampling=sampling), session
        )
        return _JSON(
            {
                "id": answer.id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": answer.model,
                "choices": [
                    {
                        "index": 0,
                        "text": answer.text,
                        "logprobs": None,
                        "finish_reason": _finish(answer.finish_reason),
                    }
                ],
                "usage": _usage(answer.usage),
            },
            headers={"x-request-id": answer.id},
        )

    async def _stream(
        self,
        request: Request,
        message: pb.GenerateRequest,
        include_usage: bool,
        chunk: Callable[[pb.GenerateResponse, int, bool], dict[str, Any]],
        session: str | None,
    ) -> Response:
        """SSE: one event per router chunk, a usage-only chunk when asked, then [DONE]. The first
        chunk is awaited before answering so that a refused request gets its HTTP error code."""
        chunks = self._client.generate(request, message, session)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise ApiError(
                502, "the router closed the stream without a chunk", "server_error"
            ) from None
        except BaseException:
            await chunks.aclose()
            raise
        created = int(time.time())

        async def events() -> AsyncIterator[bytes]:
            try:
                current: pb.GenerateResponse | None = first
                is_first = True
                while current is not None:
                    payload = chunk(current, created, is_first)
                    # The router names the model on the last chunk; OpenAI on every one.
                    payload["model"] = payload["model"] or message.model
                    if include_usage:
                        payload["usage"] = None
                    yield _sse(payload)
                    is_first = False
                    if current.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        if include_usage:
                            last = chunk(current, created, False)
                            last["choices"] = []
                            last["usage"] = _usage(current.usage)
                            yield _sse(last)
                        break
                    current = await anext(chunks, None)
            except ApiError as exc:
                # Mid-stream failures cannot change the status line; send the error as an event.
                yield _sse(exc.body())
            finally:
                await chunks.aclose()
            yield b"data: [DONE]\n\n"

        headers = dict(_SSE_HEADERS, **{"x-request-id": first.id})
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def embeddings(self, request: Request) -> Response:
        body = await schema.read_json(request, self._limits.max_body_bytes)
        refuse_unhonoured(body, params.EMBEDDINGS)
        model = schema.get_model(body)
        texts = schema.embedding_input(body)
        encoding = schema.encoding_format(body)
        embed = pb.EmbedRequest(model=model, texts=texts)
        answer = await self._client.embed(request, embed, params.session_key(body))
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (_base64(e.values) if encoding == "base64" else list(e.values)),
            }
            for i, e in enumerate(answer.embeddings)
        ]
        return _JSON(
            {
                "object": "list",
                "data": data,
                "model": answer.model,
                "usage": {
                    "prompt_tokens": answer.usage.prompt_tokens,
                    "total_tokens": answer.usage.total_tokens,
                },
            }
        )

    async def models(self, request: Request) -> Response:
        answer = await self._client.list_models(request)
        return _JSON(
            {
                "object": "list",
                "data": [
                    {
                        "id": m.name,
                        "object": "model",
                        "created": self._created,
                        "owned_by": "irouter",
                    }
                    for m in answer.models
                ],
            }
        )


def _base64(values: Any) -> str:
    """Little-endian float32 bytes, base64: what the OpenAI SDKs decode."""
    packed = array.array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _chat_chunk(c: pb.GenerateResponse, created: int, first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if c.text or (first and not c.tool_calls):
        delta["content"] = c.text
    if c.tool_calls:
        delta["tool_calls"] = openai_tools.delta_calls(c.tool_calls)
    return {
        "id": c.id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": c.model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": _finish(c.finish_reason),
            }
        ],
    }


def _text_chunk(c: pb.GenerateResponse, created: int, first: bool) -> dict[str, Any]:
    return {
        "id": c.id,
        "object": "text_completion",
        "created": created,
        "model": c.model,
        "choices": [
            {
                "index": 0,
                "text": c.text,
                "logprobs": None,
                "finish_reason": _finish(c.finish_reason),
            }
        ],
    }
