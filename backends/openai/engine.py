"""A remote OpenAI-compatible HTTP server (vLLM, trtllm-serve, llama.cpp, OpenVINO Model Server)
as engines: `OpenAIHttpEngine` (a RequestEngine) streams /v1/completions or
/v1/chat/completions, `OpenAIHttpEmbedder` calls /v1/embeddings; both share one pool of
keep-alive connections per server (http.py).

A model with a local artifact has its chat template rendered by the router, which sends the
finished prompt text to /completions, so a prompt is identical whichever backend serves it (see
wire.py for what each server kind is sent). A model with none sends the conversation itself to
/chat/completions (chat.py): the server renders it and parses its tool calls.

Failures raise a `RemoteError` (backends/remote.py) whose message names the URL; `retryable` is True
only while nothing was generated and the fault is the server's or the network's, so another
replica may take the same request: connection refused or reset, a connect or read timeout,
HTTP 408/429/502/503/504, a malformed or truncated stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import numpy as np
import orjson

from backends.base import (
    Capabilities,
    FloatArray,
    GenerationChunk,
    GenerationRequest,
    ToolCallDelta,
)
from backends.openai.chat import chat_body, parse_chat_event
from backends.openai.config import OpenAIHttpConfig
from backends.openai.http import (
    ConnectError,
    ConnectTimeout,
    HttpPool,
    ReadTimeout,
    Response,
    TransportError,
)
from backends.openai.sse import SSEDecoder
from backends.openai.wire import (
    DIALECTS,
    CompletionEvent,
    completion_body,
    http_error,
    parse_answer,
    parse_event,
)
from backends.remote import (
    RemoteChunk,
    RemoteError,
    RemoteProtocolError,
    RemoteTimeout,
    RemoteUnavailable,
)

logger = logging.getLogger(__name__)

TRANSPORT_ERRORS = (TransportError, TimeoutError)
"""What an HTTP call may raise besides an answer."""


def transport_error(url: str, exc: BaseException, *, emitted: bool) -> RemoteError:
    """A transport failure as a RemoteError; retryable only if nothing was emitted yet."""
    retryable = not emitted
    if isinstance(exc, ConnectTimeout):
        return RemoteTimeout(
            url, f"no connection within the connect timeout ({exc})", retryable=retryable
        )
    if isinstance(exc, ReadTimeout | TimeoutError):
        return RemoteTimeout(
            url, f"read timeout: the server went silent ({exc!r})", retryable=retryable
        )
    if isinstance(exc, ConnectError):
        return RemoteUnavailable(url, f"cannot connect ({exc})", retryable=retryable)
    return RemoteUnavailable(url, f"connection failed ({exc})", retryable=retryable)


class _HttpRemote:
    """The pooled client and health probe shared by the engine and the embedder.

    Neither httpx nor aiohttp: at 32 calls in flight httpx's client cost 3.6-3.7 ms of CPU per
    call here against aiohttp's 0.27-0.29 ms, and at one in flight aiohttp's 0.30 ms against
    0.08 ms for http.py's (same instant upstream), most of the router's cost as a gateway."""

    def __init__(self, config: OpenAIHttpConfig) -> None:
        self.config = config.validate().require_endpoint()
        self._pool: HttpPool | None = None
        self._closing: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Make the connection pool; sends nothing (ready() probes the server)."""
        if self._pool is not None:
            return
        cfg = self.config
        self._pool = HttpPool(
            cfg.url,
            headers=cfg.headers(),
            # A request beyond max_connections waits for a pooled connection.
            max_connections=cfg.max_connections,
            connect_timeout_s=cfg.connect_timeout_s,
        )

    async def aclose(self) -> None:
        """Close the pool and its connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    def stop(self) -> None:
        """Close the pool: scheduled on the running loop (await aclose() to wait for it)."""
        if self._pool is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._pool = None  # no loop to close the sockets on; they go with the process
            return
        self._closing = loop.create_task(self.aclose())

    @property
    def pool(self) -> HttpPool:
        if self._pool is None:
            self.start()
        assert self._pool is not None
        return self._pool

    async def _post(self, url: str, body: dict[str, Any], timeout: float) -> bytes:
        """A whole JSON answer's bytes, each silence at most `timeout` s; RemoteError naming
        the URL for a failure or an HTTP error (retryable as its status says: nothing was
        passed on yet)."""
        try:
            async with await self.pool.request("POST", url, _json(body), timeout=timeout) as r:
                data = await r.read()
        except TRANSPORT_ERRORS as exc:
            raise transport_error(url, exc, emitted=False) from exc
        if r.status >= 400:
            raise http_error(url, r.status, r.reason, data.decode("utf-8", "replace"))
        return data

    async def ready(self, timeout_s: float | None = None) -> bool:
        """Whether GET /models answers and lists config.model: a health probe that never
        raises and waits at most timeout_s in all (None: connect_timeout_s per phase)."""
        url = self.config.endpoint("/models")
        if not DIALECTS[self.config.dialect].lists_models:
            return True  # judged by its calls (breakers, retries), as the dialect says
        wait = self.config.connect_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(wait):
                async with await self.pool.request("GET", url, timeout=wait) as r:
                    data = await r.read()
            if r.status != 200:
                logger.info("%s answered HTTP %d", url, r.status)
                return False
            models = {m.get("id") for m in orjson.loads(data).get("data", ())}
        except (*TRANSPORT_ERRORS, ValueError, AttributeError, TypeError) as exc:
            logger.info("%s is not ready: %r", url, exc)
            return False
        if self.config.model not in models:
            logger.warning("%s does not list model %r: %s", url, self.config.model, models)
            return False
        return True


MAX_LINE_BYTES = 1 << 20
"""Longest line of a streamed answer (an event's data) that is read."""


def _json(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


async def _reads(url: str, response: Response) -> AsyncIterator[list[str]]:
    """The body's complete lines (without their line endings), as each read brings them."""
    pending = b""
    async for block in response.iter_any():
        parts = (pending + block).split(b"\n")
        pending = parts.pop()
        if len(pending) > MAX_LINE_BYTES:
            raise RemoteProtocolError(
                url, f"a line of the stream is longer than {MAX_LINE_BYTES} bytes", retryable=False
            )
        if parts:
            yield [p.decode("utf-8", "replace").rstrip("\r") for p in parts]
    if pending:
        yield [pending.decode("utf-8", "replace").rstrip("\r")]


def _merged(calls: list[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """Tool-call pieces that arrived together, a call's later pieces joined to its first."""
    out: list[ToolCallDelta] = []
    for piece in calls:
        last = out[-1] if out else None
        if last is not None and piece.index == last.index and not piece.id and not piece.name:
            out[-1] = ToolCallDelta(
                last.index, last.id, last.name, last.arguments + piece.arguments
            )
        else:
            out.append(piece)
    return tuple(out)


ESTIMATE_BYTES_PER_TOKEN = 4
"""A non-streamed answer whose server reports no usage counts ceil(UTF-8 bytes / 4) tokens
(router.serving.passthrough documents the same estimate)."""
DRAIN_S = 1.0
"""How long the end of a body after its [DONE] event is waited for."""


async def _drain(response: Response) -> None:
    """Read a stream's body to its end after [DONE]: a connection whose chunked body was left
    unread is closed instead of pooled, and a new TCP connection per request cost ~2 ms of the
    router's CPU (22%, profiled). A server that keeps the body open past [DONE] is not waited
    for longer than DRAIN_S (its connection is then closed)."""
    try:
        async with asyncio.timeout(DRAIN_S):
            await response.read()
    except TRANSPORT_ERRORS:
        response.close()


class OpenAIHttpEngine(_HttpRemote):
    """RequestEngine on a remote server's streamed /completions.

    Chunks carry text (the OpenAI API streams text, not token ids); the last one, a
    RemoteChunk, carries the finish reason and the server's token counts when it reports them.
    Closing the iterator closes the HTTP stream, which is how OpenAI-compatible servers learn
    to stop generating.
    """

    def __init__(self, config: OpenAIHttpConfig) -> None:
        super().__init__(config)
        cfg = self.config
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=True,
            device=f"remote {cfg.url}",
            max_batch=cfg.max_connections,
            context_length=cfg.context_length,
            text_output=True,
            stop_strings=not DIALECTS[cfg.dialect].router_stops,
            structured_output=bool(DIALECTS[cfg.dialect].structured),
            chat=True,
        )
        self.vocab_size = cfg.vocab_size
        self.max_slots = cfg.max_connections
        self.max_context = cfg.context_length
        self._active = 0
        self._chat_url = cfg.endpoint("/chat/completions")
        self._completions_url = cfg.endpoint("/completions")

    @property
    def num_active(self) -> int:
        """Requests streaming now (or waiting for a pooled connection)."""
        return self._active

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream `request`: a conversation (request.chat) to /chat/completions, a rendered
        prompt to /completions. Its first step, before any I/O, refuses fields the server would
        ignore (UnsupportedParameter)."""
        cfg = self.config
        if request.chat is not None:
            body = chat_body(request, model=cfg.model, dialect=cfg.dialect)
            url, parse = self._chat_url, parse_chat_event
        else:
            body = completion_body(
                request, model=cfg.model, dialect=cfg.dialect, prompt_format=cfg.prompt_format
            )
            url, parse = self._completions_url, parse_event
        request_id = request.request_id
        if not request.stream:
            self._active += 1
            try:
                yield await self._whole(url, body, chat=request.chat is not None)
            except RemoteError as exc:
                logger.warning("request %s failed: %s", request_id, exc)
                raise
            finally:
                self._active -= 1
            return
        emitted = False
        self._active += 1
        try:
            response = await self.pool.request(
                "POST", url, _json(body), timeout=self.config.read_timeout_s
            )
            async with response:
                if response.status >= 400:
                    text = (await response.read()).decode("utf-8", "replace")
                    raise http_error(url, response.status, response.reason, text)
                finish: CompletionEvent | None = None  # the last choice's event
                usage: tuple[int | None, int | None] = (None, None)
                decoder = SSEDecoder()
                done = False
                # What one read brings is passed on as one chunk: events that arrived together
                # cost one trip through the router, not one each (their count rides along).
                async for lines in _reads(url, response):
                    texts: list[str] = []
                    calls: list[ToolCallDelta] = []
                    events = 0
                    for line in lines:
                        data = decoder.feed(line)
                        if data is None:
                            continue
                        if data == "[DONE]":
                            done = True
                            break
                        event = parse(url, data, emitted=emitted)
                        usage = event.usage or usage
                        if event.finish_reason is not None:
                            finish = event  # held back: a usage event may follow it
                        elif event.text or event.tool_calls:
                            texts.append(event.text)
                            calls.extend(event.tool_calls)
                            events += 1
                    if events:
                        emitted = True
                        yield GenerationChunk(
                            (), "".join(texts), tool_calls=_merged(calls), tokens=events
                        )
                    if done:
                        break
                if done:
                    await _drain(response)
                else:
                    data = decoder.flush()  # an event the server did not terminate
                    if data is not None and data != "[DONE]":
                        event = parse(url, data, emitted=emitted)
                        usage = event.usage or usage
                        if event.finish_reason is not None:
                            finish = event
                if finish is None:
                    raise RemoteProtocolError(
                        url, "the stream ended without a finish_reason", retryable=not emitted
                    )
                yield RemoteChunk(
                    token_ids=(),
                    text=finish.text,
                    finish_reason=finish.finish_reason,
                    tool_calls=finish.tool_calls,
                    prompt_tokens=usage[0],
                    completion_tokens=usage[1],
                )
        except TRANSPORT_ERRORS as exc:
            error = transport_error(url, exc, emitted=emitted)
            logger.warning("request %s failed: %s", request_id, error)
            raise error from exc
        except RemoteError as exc:
            logger.warning("request %s failed: %s", request_id, exc)
            raise
        finally:
            self._active -= 1

    async def _whole(self, url: str, body: dict[str, Any], *, chat: bool) -> RemoteChunk:
        """A non-streamed answer as one chunk: one JSON body instead of an SSE event per
        token (about a quarter of the router's CPU per call with 20 events). Its wait is
        bounded by unary_timeout_s (the whole generation is one silence), not read_timeout_s."""
        body["stream"] = False
        body.pop("stream_options", None)
        data = await self._post(url, body, self.config.unary_timeout_s)
        answer = parse_answer(url, data, chat=chat)
        prompt, completion = answer.usage or (None, None)
        if completion is None:  # a server that reports no usage: the documented estimate
            completion = -(-len(answer.text.encode()) // ESTIMATE_BYTES_PER_TOKEN)
        return RemoteChunk(
            token_ids=(),
            text=answer.text,
            finish_reason=answer.finish_reason,
            tool_calls=answer.tool_calls,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )


class OpenAIHttpEmbedder(_HttpRemote):
    """Sentence embeddings from a remote server's /embeddings: float32 [N, dim] rows in the
    order of the texts, as the server computed them (e5 and MiniLM servers L2-normalise)."""

    def __init__(self, config: OpenAIHttpConfig, *, dim: int | None = None) -> None:
        super().__init__(config)
        self.dim = dim
        """Expected width; None learns it from the first answer and checks every later one."""
        self._url = self.config.endpoint("/embeddings")

    async def embed(self, texts: Sequence[str]) -> FloatArray:
        """float32 [len(texts), dim]; raises a RemoteError naming the URL on failure."""
        return (await self.embed_counted(texts))[0]

    async def embed_counted(self, texts: Sequence[str]) -> tuple[FloatArray, int | None]:
        """`embed`, and the answer's usage.prompt_tokens (None when it has none)."""
        if not texts:
            return np.zeros((0, self.dim or 0), np.float32), 0
        url = self._url
        body = {"model": self.config.model, "input": list(texts)}
        data = await self._post(url, body, self.config.read_timeout_s)
        try:
            answer = orjson.loads(data)
            items = sorted(answer["data"], key=lambda item: int(item["index"]))
            out = np.asarray([item["embedding"] for item in items], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteProtocolError(
                url, f"malformed embeddings answer ({exc!r})", retryable=False
            ) from None
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise RemoteProtocolError(
                url, f"{len(texts)} texts gave embeddings of shape {out.shape}", retryable=False
            )
        if self.dim is None:
            self.dim = int(out.shape[1])
        elif out.shape[1] != self.dim:
            raise RemoteProtocolError(
                url, f"embeddings have {out.shape[1]} dimensions, not {self.dim}", retryable=False
            )
        usage = answer.get("usage") if isinstance(answer, dict) else None
        counted = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        # A count that is not a non-negative integer is no count (bool is an int in Python).
        ok = isinstance(counted, int) and not isinstance(counted, bool) and counted >= 0
        return out, counted if ok else None
