"""Tool calling end to end: the real SmolLM2 model (whose template knows nothing of tools, so the
documented format) in an in-process router, through the OpenAI proxy with the official `openai`
SDK and over gRPC. Forced calls sampled at temperature 1.0 must always parse and validate."""

from __future__ import annotations

import json
from typing import Any

import grpc
import jsonschema_rs
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from tests.integration.conftest import GEN, in_waves

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name} somewhere", "parameters": schema},
    }
    for name, schema in SCHEMAS.items()
]
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def validate(name: str, arguments: str) -> None:
    jsonschema_rs.validate(SCHEMAS[name], json.loads(arguments))


async def test_fifty_forced_calls_at_temperature_one_all_validate(
    openai_client: openai.AsyncOpenAI,
) -> None:
    choices: list[Any] = [
        {"type": "function", "function": {"name": "get_weather"}},
        {"type": "function", "function": {"name": "get_time"}},
        "required",
    ]

    async def call(i: int) -> Any:
        return await openai_client.chat.completions.create(
            model=GEN,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choices[i % 3],
            parallel_tool_calls=False,
            temperature=1.0,
            max_tokens=120,
            seed=2000 + i,
        )

    answers = await in_waves(50, call)
    for i, answer in enumerate(answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls
        assert calls is not None and len(calls) == 1
        call = calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if i % 3 < 2:
            assert call.function.name == choices[i % 3]["function"]["name"]
        validate(call.function.name, call.function.arguments)
    assert len({a.choices[0].message.tool_calls[0].id for a in answers}) == 50


async def test_streamed_tool_call_deltas_as_the_sdk_assembles_them(
    openai_client: openai.AsyncOpenAI,
) -> None:
    kwargs: dict[str, Any] = dict(
        model=GEN,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        max_tokens=120,
    )
    for seed in (5, 6):
        whole = await openai_client.chat.completions.create(**kwargs, seed=seed)
        async with openai_client.chat.completions.stream(**kwargs, seed=seed) as stream:
            final = await stream.get_final_completion()
        streamed = final.choices[0]
        assert streamed.finish_reason == "tool_calls"
        expected = whole.choices[0].message.tool_calls
        got = streamed.message.tool_calls
        assert expected is not None and got is not None and len(got) == 1
        assert got[0].function.name == "get_weather"
        assert got[0].function.arguments == expected[0].function.arguments
        validate("get_weather", got[0].function.arguments)


async def test_raw_stream_chunks_carry_indexed_deltas(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model=GEN,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
        stream=True,
    )
    deltas = []
    finish = None
    async for chunk in stream:
        choice = chunk.choices[0]
        deltas.extend(choice.delta.tool_calls or [])
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas[0].id and deltas[0].function and deltas[0].function.name in SCHEMAS
    assert all(d.index == 0 and not d.id for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    validate(deltas[0].function.name, arguments)


async def test_auto_answers_in_text_or_calls_and_a_result_goes_back_in(
    openai_client: openai.AsyncOpenAI,
) -> None:
    auto = await openai_client.chat.completions.create(
        model=GEN, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120
    )
    choice = auto.choices[0]
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            validate(call.function.name, call.function.arguments)
    else:
        assert not (choice.message.content or "").startswith("<tool_call>")
    history: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21, "sky": "clear"}'},
    ]
    after = await openai_client.chat.completions.create(
        model=GEN, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    assert after.choices[0].message.tool_calls is None
    assert after.choices[0].message.content


async def test_tools_are_part_of_the_cache_key(stub: pb_grpc.InferenceServiceStub) -> None:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=ASK[0]["content"])])
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=60)
    plain = await stub.Complete(pb.CompleteRequest(model=GEN, chat=chat, sampling=sampling))
    tools = [pb.Tool(name="get_weather", parameters=json.dumps(WEATHER))]
    forced = await stub.Complete(
        pb.CompleteRequest(
            model=GEN,
            chat=chat,
            sampling=sampling,
            tools=tools,
            tool_choice=pb.ToolChoice(function="get_weather"),
        )
    )
    assert not plain.tool_calls
    assert forced.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [c.name for c in forced.tool_calls] == ["get_weather"]
    validate("get_weather", forced.tool_calls[0].arguments)


async def _grpc_error(stub: pb_grpc.InferenceServiceStub, **fields: Any) -> tuple[str, str]:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    if "prompt" not in fields:
        fields.setdefault("chat", chat)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(
            pb.CompleteRequest(model=GEN, sampling=pb.SamplingParams(max_tokens=64), **fields)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field, caught.value.details() or ""


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"tools": [pb.Tool(name="f"), pb.Tool(name="f")]}, "tools[1].name", "unique"),
        ({"tools": [pb.Tool(name="9lives")]}, "tools[0].name", "not a function name"),
        ({"tools": [pb.Tool(name="a b")]}, "tools[0].name", "not a function name"),
        ({"tools": [pb.Tool(name="f", parameters="[1]")]}, "tools[0].parameters", "object"),
        ({"tools": [pb.Tool(name="f", parameters="{x")]}, "tools[0].parameters", "valid JSON"),
        (
            {"tools": [pb.Tool(name="f", parameters='{"type": "string"}')]},
            "tools[0].parameters",
            "must describe an object",
        ),
        (
            {"tools": [pb.Tool(name="f", parameters='{"type": "object", "not": {}}')]},
            "tools[0].parameters",
            "not",
        ),
        (
            {"tools": [pb.Tool(name="f")], "tool_choice": pb.ToolChoice(function="g")},
            "tool_choice.function",
            "not among the tools",
        ),
        (
            {"tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)},
            "tool_choice",
            "no tools are given",
        ),
        ({"tools": [pb.Tool(name="f")], "prompt": "hi"}, "tools", "chat input"),
        (
            {
                "chat": pb.ChatMessages(
                    messages=[pb.ChatMessage(role="tool", tool_call_id="call_x", content="1")]
                )
            },
            "chat.messages[0].tool_call_id",
            "no earlier assistant turn made",
        ),
        (
            {
                "chat": pb.ChatMessages(
                    messages=[
                        pb.ChatMessage(
                            role="assistant",
                            tool_calls=[pb.ToolCall(id="c", name="f", arguments="{oops")],
                        )
                    ]
                )
            },
            "chat.messages[0].tool_calls[0].arguments",
            "not valid JSON",
        ),
    ],
)
async def test_bad_tools_are_invalid_argument_naming_the_field(
    stub: pb_grpc.InferenceServiceStub, fields: dict[str, Any], field: str, needle: str
) -> None:
    got, message = await _grpc_error(stub, **fields)
    assert got == field
    assert needle in message


async def test_a_required_call_that_max_tokens_cannot_hold_is_refused(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                chat=chat,
                sampling=pb.SamplingParams(max_tokens=5),
                tools=[pb.Tool(name="get_weather")],
                tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens=5 cannot hold the call" in (caught.value.details() or "")


async def test_tools_with_a_structured_output_are_refused(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    sampling = pb.SamplingParams(structured_output=pb.StructuredOutput(json_object=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(
            pb.CompleteRequest(model=GEN, chat=chat, sampling=sampling, tools=[pb.Tool(name="f")])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be combined with tools" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "tool_call_id": "call_9", "content": "1"},
                ]
            },
            "messages[1].tool_call_id",
        ),
    ],
)
async def test_bad_openai_tool_fields_are_400_naming_the_param(
    openai_client: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": GEN, "messages": ASK, "max_tokens": 16, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.chat.completions.create(**body)
    error: Any = caught.value.body
    assert error["param"] == param, error
