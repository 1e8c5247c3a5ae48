"""Tools and tool history in the conversation: the documented format for templates without
tools, Hugging Face's structure for templates that take them."""

from __future__ import annotations

import json

import pytest

from router.errors import InvalidArgument
from router.models.chat_template import render_chat
from router.tools import prompt
from router.tools.spec import Tool, Tools

TOOLS = Tools((Tool("get_weather", "Weather in a city", '{"type": "object"}'),), "required")
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": json.dumps(
            [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]
        ),
    },
    {"role": "tool", "content": "3 C, snow", "tool_call_id": "call_1"},
]


def test_the_documented_format_puts_tools_and_history_into_plain_turns() -> None:
    out = prompt.plain(HISTORY, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in out[0]["content"]
    assert "You must call at least one function." in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    response = json.loads(
        out[3]["content"].removeprefix("<tool_response>").removesuffix("</tool_response>")
    )
    assert response == {"tool_call_id": "call_1", "name": "get_weather", "content": "3 C, snow"}
    assert all(set(m) == {"role", "content"} for m in out)


def test_without_tools_offered_only_the_history_is_rewritten() -> None:
    out = prompt.plain(HISTORY, Tools(TOOLS.tools, "none"))
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[3]["role"] == "user"


def test_a_tool_result_for_an_unknown_call_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        prompt.plain([{"role": "tool", "content": "x", "tool_call_id": "call_9"}], None)
    assert caught.value.field == "chat.messages[0].tool_call_id"


TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{{ '\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }}({{ c.function.arguments.city }})]"
    "{% endfor %}{% if m.role == 'tool' %}({{ m.name }}){% endif %}{{ '\\n' }}{% endfor %}"
)


def test_a_template_that_takes_tools_gets_them_and_the_structured_history() -> None:
    assert prompt.takes_tools(TOOLS_TEMPLATE)
    text = render_chat(
        TOOLS_TEMPLATE,
        prompt.structured_history(HISTORY),
        add_generation_prompt=False,
        tools=prompt.template_tools(TOOLS),
    )
    assert text.splitlines() == [
        "TOOLS:get_weather;",
        "system:Be brief.",
        "user:Weather in Oslo?",
        "assistant:[get_weather(Oslo)]",
        "tool:3 C, snow(get_weather)",
    ]
