"""The OpenAI REST routes (irouter's proxy, or any OpenAI-compatible server) as a load-test target:
/v1/chat/completions and /v1/completions, streamed (SSE) and not, and /v1/embeddings, over one
httpx connection pool per client process."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from loadtest.harness.record import RequestRecord
from loadtest.harness.scenario import Scenario
from loadtest.harness.targets.call import Call

_PATHS = {
    "chat": "/v1/chat/completions",
    "chat-stream": "/v1/chat/completions",
    "completions": "/v1/completions",
    "completions-stream": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


def _error_message(body: bytes) -> str:
    try:
        payload = json.loads(body)
        return str(payload["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


class OpenAIHttpTarget:
    def __init__(self, scenario: Scenario, concurrency_hint: int) -> None:
        self._s = scenario
        self._pool = max(1, concurrency_hint)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self._pool, max_keepalive_connections=self._pool)
        self._client = httpx.AsyncClient(
            base_url=self._s.address, limits=limits, timeout=self._s.timeout_s
        )
        await self._client.get("/v1/models")  # opens the first connection

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _body(self, call: Call) -> dict[str, Any]:
        if call.method == "embeddings":
            return {"model": self._s.embed_model, "input": [call.prompt.text]}
        body: dict[str, Any] = {
            "model": self._s.model,
            "max_tokens": call.max_tokens,
            "temperature": self._s.temperature,
        }
        if self._s.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension, which irouter's proxy accepts
        if call.method.startswith("chat"):
            body["messages"] = [{"role": r, "content": c} for r, c in call.prompt.messages]
        else:
            body["prompt"] = call.prompt.text
        if call.method.endswith("-stream"):
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def call(self, call: Call) -> RequestRecord:
        assert self._client is not None, "start() first"
        record = RequestRecord(call.method, time.perf_counter())
        try:
            if call.method.endswith("-stream"):
                await self._stream(call, record)
            else:
                answer = await self._client.post(_PATHS[call.method], json=self._body(call))
                record.end = time.perf_counter()
                if answer.status_code != 200:
                    record.status = f"http:{answer.status_code}"
                    record.error = _error_message(answer.content)
                    record.retry_after = _retry_after(answer.headers)
                else:
                    usage = answer.json().get("usage") or {}
                    record.input_tokens = int(usage.get("prompt_tokens", 0))
                    record.output_tokens = int(usage.get("completion_tokens", 0))
                    if call.method != "embeddings":
                        record.ttft = record.end - record.start
        except httpx.TimeoutException as exc:
            record.status = "client:Timeout"
            record.error = str(exc)[:200]
        except Exception as exc:
            record.status = f"client:{type(exc).__name__}"
            record.error = str(exc)[:200]
        if not record.end:
            record.end = time.perf_counter()
        return record

    async def _stream(self, call: Call, record: RequestRecord) -> None:
        assert self._client is not None
        chat = call.method.startswith("chat")
        chunks = 0
        last = 0.0
        async with self._client.stream("POST", _PATHS[call.method], json=self._body(call)) as r:
            if r.status_code != 200:
                record.status = f"http:{r.status_code}"
                record.error = _error_message(await r.aread())
                record.retry_after = _retry_after(r.headers)
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    record.status = "stream:error"
                    record.error = str(event["error"].get("message", ""))[:200]
                    continue
                if event.get("usage"):
                    record.input_tokens = int(event["usage"].get("prompt_tokens", 0))
                    record.output_tokens = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices") or ():
                    text = choice["delta"].get("content") if chat else choice.get("text")
                    if text:
                        if record.ttft is None:
                            record.ttft = now - record.start
                        else:
                            record.itl.append(now - last)
                        last = now
                        chunks += 1
        record.end = time.perf_counter()
        if not record.output_tokens:
            record.output_tokens = chunks


def _retry_after(headers: httpx.Headers) -> float | None:
    """The Retry-After of a refused call, in seconds (the proxy sends RetryInfo's delay)."""
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: not what the router's proxy sends
