"""A scripted OpenAI-compatible upstream for tests: the wire format of OpenAI's API (streamed
/v1/chat/completions and /v1/completions, /v1/embeddings, /v1/models) answered instantly by a
Starlette app under uvicorn on a free loopback port, in the test's own event loop. It records
every request (path, headers, JSON body), and answers the next call with what the test scripted,
else with a default answer ("ok", finish "stop", usage when stream_options asks for it).

    async with fake_openai() as fake:
        fake.script(Answer(events=[...]))       # the next generation call's SSE events
        ... router with remote url=fake.url, model=fake.model ...
        assert fake.requests[-1].body["messages"] == [...]

Contract tests against the published wire format, not a real server: tests that use it say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.integration.rest_proxy import QuietServer

MODEL = "upstream-model"


@dataclass(frozen=True)
class Answer:
    """What the fake answers one generation call: SSE events (data strings, '[DONE]' added
    unless `done` is False), or an HTTP error status with a JSON body."""

    events: list[str] = field(default_factory=list)
    status: int = 200
    error: dict[str, Any] | None = None
    done: bool = True


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    query: dict[str, str] = field(default_factory=dict)


def chat_event(
    content: str | None = None,
    *,
    finish: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> str:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return json.dumps(
        {
            "id": "up-1",
            "object": "chat.completion.chunk",
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def usage_event(prompt: int, completion: int) -> str:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return json.dumps({"id": "up-1", "choices": [], "usage": usage})


def whole(events: list[str], chat: bool) -> dict[str, Any]:
    """The non-streamed answer the streamed `events` add up to (what a server answers when the
    request says "stream": false)."""
    text, reason, usage = "", None, None
    calls: dict[int, dict[str, Any]] = {}
    for data in events:
        event = json.loads(data)
        usage = event.get("usage") or usage
        for choice in event.get("choices") or ():
            reason = choice.get("finish_reason") or reason
            delta = choice.get("delta", {}) if chat else {"content": choice.get("text")}
            text += delta.get("content") or ""
            for piece in delta.get("tool_calls") or ():
                call = calls.setdefault(
                    piece["index"],
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = piece.get("id") or call["id"]
                function = piece.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        choice["message"] = message
    else:
        choice["text"] = text
    out: dict[str, Any] = {"id": "up-1", "model": MODEL, "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._script: list[Answer] = []
        self.port = 0
        self.model = MODEL
        self.dimension = 4
        self.embedding_usage = True
        """Whether /v1/embeddings answers carry a usage (3 tokens a text)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *answers: Answer) -> None:
        """The next generation calls' answers, in order."""
        self._script.extend(answers)

    def generations(self) -> list[Recorded]:
        """The generation calls received (warm-up included)."""
        return [r for r in self.requests if r.path.endswith("completions")]

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.json() if request.method == "POST" else {}
        self.requests.append(
            Recorded(request.url.path, dict(request.headers), body, dict(request.query_params))
        )
        return body

    async def models(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0, 0.0]}
            for i, t in enumerate(texts)
        ]
        answer: dict[str, Any] = {"object": "list", "data": data, "model": self.model}
        if self.embedding_usage:
            answer["usage"] = {"prompt_tokens": 3 * len(texts), "total_tokens": 3 * len(texts)}
        return JSONResponse(answer)

    async def generate(self, request: Request) -> Response:
        body = await self._record(request)
        chat = request.url.path.endswith("/chat/completions")
        answer = self._script.pop(0) if self._script else self._default(body, chat)
        if answer.status != 200:
            return JSONResponse({"error": answer.error or {}}, status_code=answer.status)
        if not body.get("stream"):
            return JSONResponse(whole(answer.events, chat))
        events = [*answer.events, *(["[DONE]"] if answer.done else [])]

        async def stream() -> AsyncIterator[bytes]:
            for data in events:
                yield f"data: {data}\n\n".encode()
                await asyncio.sleep(0)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @staticmethod
    def _default(body: dict[str, Any], chat: bool) -> Answer:
        # A whole answer always reports usage; a stream when the request asks for it.
        usage = not body.get("stream") or (body.get("stream_options") or {}).get("include_usage")
        if chat:
            events = [chat_event("ok"), chat_event(finish="stop")]
        else:
            events = [
                json.dumps({"choices": [{"index": 0, "text": "ok", "finish_reason": None}]}),
                json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}),
            ]
        return Answer([*events, *([usage_event(5, 1)] if usage else [])])

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/chat/completions", self.generate, methods=["POST"]),
                Route("/v1/completions", self.generate, methods=["POST"]),
                # Azure OpenAI's deployment routes
                Route(
                    "/openai/deployments/{name}/chat/completions", self.generate, methods=["POST"]
                ),
                Route("/openai/deployments/{name}/embeddings", self.embeddings, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A running FakeOpenAI on a free loopback port, stopped at the end."""
    fake = FakeOpenAI()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    fake.port = sock.getsockname()[1]
    server = QuietServer(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(30):  # poll uvicorn's start, with a deadline
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
            await asyncio.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        await task
