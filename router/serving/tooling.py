"""A call's tools applied to the served model: offered in its conversation (router.tools.prompt)
and enforced as its structured output (router.tools.grammar), or refused naming the field."""

from __future__ import annotations

import dataclasses

from backends.base import SamplingParams
from router.errors import InvalidArgument
from router.serving import tokenize
from router.serving.model import ServedModel
from router.tools import grammar
from router.tools import prompt as tool_prompt
from router.tools.spec import Tools

Messages = list[dict[str, str]]


def offer_tools(
    model: ServedModel, tools: Tools | None, messages: Messages | None, params: SamplingParams
) -> tuple[Messages | None, SamplingParams]:
    """The conversation the model sees (tools and tool history in the documented format unless
    its template takes them) and the sampling parameters with the tool grammar."""
    if tools is not None and tools.offered:
        assert model.engine is not None
        if model.engine.structured_output != "router":
            raise InvalidArgument(
                f"model {model.name!r} is served by a backend that cannot enforce tools (only "
                "the router's own step loop can)",
                field="tools",
            )
        if messages is None:
            raise InvalidArgument(
                "tools need chat input (chat.messages), not a prompt", field="tools"
            )
        if params.structured is not None:
            raise InvalidArgument(
                "sampling.structured_output cannot be combined with tools unless tool_choice is "
                "NONE: the tools' grammar is the output's format",
                field="sampling.structured_output",
            )
        params = dataclasses.replace(params, structured=grammar.structured(tools))
    if messages is not None and not tool_prompt.takes_tools(model.manifest["chat_template"]):
        messages = tool_prompt.plain(messages, tools)
    return messages, params


def check_room_for_a_call(model: ServedModel, tools: Tools, max_tokens: int) -> None:
    """A call that must be made has to fit in max_tokens."""
    if tools.choice not in ("required", "function"):
        return
    assert model.tokenizer is not None
    shortest = grammar.shortest_call(tools)
    need = len(tokenize.encode_text(model.tokenizer, shortest, add_special_tokens=False).ids)
    if max_tokens < need:
        raise InvalidArgument(
            f"max_tokens={max_tokens} cannot hold the call tool_choice asks for: the shortest "
            f"one, {shortest}, takes {need} tokens",
            field="sampling.max_tokens",
        )
