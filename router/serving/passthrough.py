"""Calls to a model served with no local artifact (ModelConfig.passthrough): a remote
OpenAI-compatible server that renders the conversation with its own chat template, parses tool
calls with its own parser, enforces `response_format` itself and counts the tokens.

The router never holds the model's tokenizer, so what needs tokens is estimated before the call
and settled with the server's count after it:

    estimate_tokens   ceil(UTF-8 bytes / 4) per text, plus 4 per chat message (its role and
                      the template's markers): OpenAI's rule of thumb of about four characters
                      per token of English text. It reserves a quota and fits retrieved
                      passages; the call's usage is the server's own count when it reports one
                      (UsageSource SERVER), else this estimate for the prompt and one token per
                      streamed event for the completion (UsageSource ESTIMATE).

A conversation goes to /chat/completions as the OpenAI chat API has it (build_request's
ChatRequest); a raw prompt to /completions as it is, with no template.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from typing import Any

from backends.base import ChatRequest, SamplingParams
from router.errors import InvalidArgument
from router.scheduler.request import Priority, Request, validate_sampling
from router.serving.model import ServedModel
from router.serving.prompt import check_messages
from router.tools import prompt as tool_prompt
from router.tools.spec import Tools

BYTES_PER_TOKEN = 4
"""The estimate's UTF-8 bytes per token."""
TOKENS_PER_MESSAGE = 4
"""The estimate's tokens per chat message beyond its text (role and template markers)."""
IMAGE_TOKENS = 85
"""The estimate's tokens per image (OpenAI's price of a low-detail image)."""
UNKNOWN_VOCAB = 2**31 - 1
"""top_k's bound when the server's vocabulary size is not configured."""


def estimate_tokens(*, prompt: str | None, messages: list[dict[str, str]] | None) -> int:
    """The documented estimate of an input's tokens (see the module docstring); at least 1."""
    if messages is None:
        return max(1, -(-len((prompt or "").encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN))
    total = 0
    for m in messages:
        text = m["content"] + m.get("tool_calls", "")
        total += -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)
        total += TOKENS_PER_MESSAGE
        if "parts" in m:
            parts = json.loads(m["parts"])
            total += IMAGE_TOKENS * sum(p["type"] == "image_url" for p in parts)
    return max(1, total)


def guarded(message: dict[str, str], check: Callable[[str], str]) -> dict[str, str]:
    """A chat turn with its text through `check` (the input guardrails), its parts' included."""
    out = {**message, "content": check(message["content"])}
    if "parts" in message:
        parts = json.loads(message["parts"])
        for part in parts:
            if part["type"] == "text":
                part["text"] = check(part["text"])
        out["parts"] = json.dumps(parts)
    return out


def refuse_images(model: ServedModel, messages: list[dict[str, str]]) -> None:
    """Images are read by the server of a model with no local artifact; the router renders
    every other model's chat with its template, which takes text."""
    for i, m in enumerate(messages):
        if "parts" in m and not model.config.passthrough:
            raise InvalidArgument(
                f"chat.messages[{i}] holds an image; model {model.name!r} takes text only (images "
                "go to models served with no local artifact, whose server reads them)",
                field=f"chat.messages[{i}].parts",
            )


def chat_request(messages: list[dict[str, str]], tools: Tools | None) -> ChatRequest:
    """The conversation and tools in the OpenAI chat API's form."""
    check_messages(messages)
    tool_prompt.check_history(messages)
    turns: list[dict[str, Any]] = []
    for m in messages:
        content = json.loads(m["parts"]) if "parts" in m else m["content"]
        turn: dict[str, Any] = {"role": m["role"], "content": content}
        if m.get("tool_calls"):
            turn["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in json.loads(m["tool_calls"])
            ]
            turn["content"] = m["content"] or None
        if m["role"] == "tool":
            turn["tool_call_id"] = m["tool_call_id"]
        turns.append(turn)
    if tools is None:
        return ChatRequest(tuple(turns))
    choice: str | dict[str, Any] = tools.choice
    if tools.choice == "function":
        choice = {"type": "function", "function": {"name": tools.function}}
    return ChatRequest(
        tuple(turns),
        tools=tuple(tool_prompt.signatures(tools)),
        tool_choice=choice,
        parallel_tool_calls=None if tools.parallel else False,
    )


def build_request(
    model: ServedModel,
    request_id: str,
    *,
    engine_id: int,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    tools: Tools | None,
    params: SamplingParams,
    max_tokens_set: bool,
    priority: Priority,
) -> tuple[Request, int]:
    """The engine request for a passthrough model and its input's estimated tokens; raise
    InvalidArgument naming what is wrong. max_tokens left unset is the model's
    default_max_tokens, within the room the estimate leaves (as for every model)."""
    if messages is None:
        if tools is not None:
            raise InvalidArgument(
                "tools need chat input (chat.messages), not a prompt", field="tools"
            )
        if not prompt:
            raise InvalidArgument(
                "prompt is empty" if prompt is not None else "set one of prompt or chat",
                field="prompt" if prompt is not None else "input",
            )
    estimate = estimate_tokens(prompt=prompt, messages=messages)
    context = model.context_length
    if max_tokens_set:
        if params.max_tokens >= context:
            raise InvalidArgument(
                f"max_tokens={params.max_tokens} exceeds the context limit of model "
                f"{model.name!r} ({context} tokens including the prompt)",
                field="sampling.max_tokens",
            )
    else:
        room = max(1, context - estimate)
        params = dataclasses.replace(params, max_tokens=min(model.config.default_max_tokens, room))
    remote = model.config.remote
    validate_sampling(params, remote.vocab_size if remote and remote.vocab_size else UNKNOWN_VOCAB)
    request = Request(
        request_id=request_id,
        engine_id=engine_id,
        prompt_ids=[],
        params=params,
        priority=priority,
        seed=params.seed if params.seed is not None else random.getrandbits(63),
        prompt_text=prompt or "",
        chat=chat_request(messages, tools) if messages is not None else None,
    )
    return request, estimate


def build_id(model: ServedModel) -> str:
    """What the response cache keys a passthrough model's answers under: its name and the
    remote model's (replicas of a deployment name theirs)."""
    remote = model.config.remote
    return f"{model.name}|remote|{remote.model if remote else ''}"
