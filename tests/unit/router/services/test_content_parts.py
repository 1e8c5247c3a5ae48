"""A chat message's content parts (text and images) from the proto and from OpenAI JSON: text
alone is the message's text; an image keeps the parts, in the OpenAI API's form; bad parts are
refused naming the field."""

from __future__ import annotations

import json

import pytest

from router.errors import InvalidArgument
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.rest import openai_schema
from router.rest.errors import ApiError, openai_param
from router.services.tool_protos import message_from_proto

IMAGE = pb.ImageUrl(url="https://example.com/a.png", detail="high")


def test_text_parts_are_the_messages_text() -> None:
    m = pb.ChatMessage(role="user", parts=[pb.ContentPart(text="Hel"), pb.ContentPart(text="lo")])
    assert message_from_proto(m, 0) == {"role": "user", "content": "Hello"}


def test_an_image_keeps_the_parts_in_the_apis_form() -> None:
    m = pb.ChatMessage(
        role="user", parts=[pb.ContentPart(text="What is it?"), pb.ContentPart(image_url=IMAGE)]
    )
    out = message_from_proto(m, 2)
    assert out["content"] == "What is it?"
    assert json.loads(out["parts"]) == [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": IMAGE.url, "detail": "high"}},
    ]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.ChatMessage(role="user", content="x", parts=[pb.ContentPart(text="y")]),
         "chat.messages[1].parts"),
        (pb.ChatMessage(role="user", parts=[pb.ContentPart(image_url=pb.ImageUrl(url="ftp://a"))]),
         "chat.messages[1].parts[0].image_url.url"),
        (pb.ChatMessage(
            role="user", parts=[pb.ContentPart(image_url=pb.ImageUrl(url="data:,", detail="max"))]),
         "chat.messages[1].parts[0].image_url.detail"),
        (pb.ChatMessage(role="user", parts=[pb.ContentPart()]), "chat.messages[1].parts[0]"),
    ],
)  # fmt: skip
def test_bad_parts_are_refused_naming_the_field(message: pb.ChatMessage, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        message_from_proto(message, 1)
    assert e.value.field == field


def test_openai_json_image_parts_become_proto_parts() -> None:
    content = [
        {"type": "text", "text": "Hi"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    out = openai_schema.chat_messages({"messages": [{"role": "user", "content": content}]})
    [turn] = out.messages
    assert turn.content == ""
    assert [p.WhichOneof("part") for p in turn.parts] == ["text", "image_url"]
    assert turn.parts[1].image_url.url == "data:image/png;base64,AAAA"
    text_only = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    out = openai_schema.chat_messages({"messages": [{"role": "user", "content": text_only}]})
    assert out.messages[0].content == "ab" and not out.messages[0].parts


def test_openai_json_audio_is_refused() -> None:
    content = [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]
    with pytest.raises(ApiError) as e:
        openai_schema.chat_messages({"messages": [{"role": "user", "content": content}]})
    assert e.value.param == "messages[0].content" and "image_url" in e.value.message


def test_a_parts_field_is_named_as_openai_names_content() -> None:
    assert openai_param("chat.messages[3].parts[1].image_url.url") == (
        "messages[3].content[1].image_url.url"
    )
