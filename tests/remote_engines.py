"""What the remote-engine tests share (OpenAI HTTP and KServe v2): a SmolLM2 chat prompt, request
building, collecting a stream, and an engine started for a block."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

from backends.base import GenerationChunk, GenerationRequest

STORY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nTell me a story about a dragon.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""A rendered SmolLM2 chat prompt (remote engines take the router's rendered text)."""


class RemoteEngine(Protocol):
    def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...


E = TypeVar("E", bound=RemoteEngine)


def make_request(prompt: str = STORY, **fields: Any) -> GenerationRequest:
    """A greedy request for 32 tokens of `prompt`, with `fields` changed."""
    values: dict[str, Any] = {"request_id": "t", "prompt_ids": (), "prompt": prompt}
    values.update({"max_tokens": 32, "temperature": 0.0, **fields})
    return GenerationRequest(**values)


async def collect(engine: RemoteEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


def joined(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text or "" for c in chunks)


@contextlib.asynccontextmanager
async def running(engine: E) -> AsyncIterator[E]:
    """The engine started for the block, its connections closed after it."""
    engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()
