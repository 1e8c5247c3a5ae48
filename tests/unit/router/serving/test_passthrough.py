"""What the router does for a model with no local artifact before the call: the documented token
estimate, and the conversation in the OpenAI chat API's form."""

from __future__ import annotations

import json

import pytest

from router.errors import InvalidArgument
from router.serving import passthrough
from router.tools.spec import Tool, Tools


def test_the_estimate_is_bytes_over_four_plus_four_per_message() -> None:
    assert passthrough.estimate_tokens(prompt="abcde", messages=None) == 2
    assert passthrough.estimate_tokens(prompt="é" * 4, messages=None) == 2  # 8 bytes
    messages = [{"role": "system", "content": "x" * 8}, {"role": "user", "content": "y"}]
    assert passthrough.estimate_tokens(prompt=None, messages=messages) == (2 + 4) + (1 + 4)
    image = json.dumps([{"type": "image_url", "image_url": {"url": "https://a/b.png"}}])
    with_image = [{"role": "user", "content": "", "parts": image}]
    assert passthrough.estimate_tokens(prompt=None, messages=with_image) == 4 + 85


def test_guardrails_see_every_text_part() -> None:
    parts = json.dumps(
        [{"type": "text", "text": "secret"}, {"type": "image_url", "image_url": {"url": "x"}}]
    )
    out = passthrough.guarded(
        {"role": "user", "content": "secret", "parts": parts}, lambda t: t.upper()
    )
    assert out["content"] == "SECRET"
    assert json.loads(out["parts"])[0] == {"type": "text", "text": "SECRET"}


def test_the_chat_request_has_tools_choice_and_parallel_as_the_api_spells_them() -> None:
    tools = Tools((Tool("f", "does f", '{"type": "object"}'),), choice="function", function="f")
    chat = passthrough.chat_request([{"role": "user", "content": "go"}], tools)
    assert chat.messages == ({"role": "user", "content": "go"},)
    assert chat.tools == (
        {
            "type": "function",
            "function": {"name": "f", "description": "does f", "parameters": {"type": "object"}},
        },
    )
    assert chat.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert chat.parallel_tool_calls is None  # the server's default (parallel) is OpenAI's


def test_a_role_the_api_lacks_is_refused() -> None:
    with pytest.raises(InvalidArgument) as e:
        passthrough.chat_request([{"role": "developer", "content": "x"}], None)
    assert e.value.field == "chat.messages[0].role"
