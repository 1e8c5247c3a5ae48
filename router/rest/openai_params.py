"""Which OpenAI request parameters each route honours; every other one is refused by name.

Ignoring a parameter is worse than refusing it: a client that asked for JSON output, token
log-probabilities or a logit bias, and got a plain answer with status 200, cannot tell. So a
body field is accepted only when the router honours it, or when its value asks for nothing
(`logprobs: false`, `n: 1`, `tools: []`), which is how many
clients send their defaults. Anything else, unknown fields included, is a 400 whose `param`
names the field (OpenAI answers unknown fields so too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from router.rest.errors import bad_request

SAMPLING = frozenset(
    {
        "n",  # 1 only: openai_schema.sampling refuses others by name
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "ignore_eos",
        "response_format",  # openai_schema.structured_output
    }
)
"""Sampling fields both completion routes honour (top_k, min_p, repetition_penalty and
ignore_eos are vLLM's extensions)."""

SESSION_KEYS = ("prompt_cache_key", "safety_identifier", "user")
"""Fields that name the caller or conversation, first present wins: the routing session key
(a conversation stays on one replica, where its prefix is warm)."""

_GENERATING = SAMPLING | {"model", "stream", "stream_options", *SESSION_KEYS}
CHAT = _GENERATING | {"messages", "tools", "tool_choice", "parallel_tool_calls"}
COMPLETIONS = _GENERATING | {"prompt"}
EMBEDDINGS = frozenset({"model", "input", "encoding_format", *SESSION_KEYS})
STREAM_OPTIONS = frozenset({"include_usage"})


def _absent(value: Any) -> bool:
    return value is None


def _off(value: Any) -> bool:
    return value is None or value is False


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def _one_of(*neutral: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == n for n in neutral)


NEUTRAL: Mapping[str, Callable[[Any], bool]] = {
    "logprobs": _off,
    "top_logprobs": _absent,
    "logit_bias": _empty,
    "tools": _empty,
    "functions": _empty,
    "tool_choice": _one_of("none"),
    "function_call": _one_of("none"),
    "parallel_tool_calls": _absent,
    "store": _off,
    "metadata": _empty,
    "modalities": _one_of(["text"]),
    "audio": _absent,
    "prediction": _absent,
    "reasoning_effort": _absent,
    "verbosity": _absent,
    "web_search_options": _absent,
    "service_tier": _one_of("auto", "default"),
    "echo": _off,
    "best_of": _one_of(1),
    "suffix": _absent,
    "dimensions": _absent,
    "include_obfuscation": _off,
}
"""Parameters the router does not honour, each with the values that ask for nothing."""


def refuse_unhonoured(body: Mapping[str, Any], honoured: frozenset[str], where: str = "") -> None:
    """Raise a 400 naming the first field of `body` that is neither honoured nor neutral."""
    for name, value in body.items():
        if name in honoured:
            continue
        param = f"{where}{name}"
        neutral = NEUTRAL.get(name)
        if neutral is None:
            raise bad_request(
                f"unrecognized request argument '{param}'", param=param, code="unknown_parameter"
            )
        if not neutral(value):
            shown = json.dumps(value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            raise bad_request(
                f"'{param}'={shown} is not supported by this router; leave it out",
                param=param,
                code="unsupported_parameter",
            )


def session_key(body: Mapping[str, Any]) -> str | None:
    """The routing session key a body names, if any (see SESSION_KEYS)."""
    for name in SESSION_KEYS:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise bad_request(
                    f"'{name}' must be a string, got {json.dumps(value)[:80]}",
                    param=name,
                    code="invalid_type",
                )
            return value
    return None
