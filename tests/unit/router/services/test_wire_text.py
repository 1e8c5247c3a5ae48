"""The input's text bytes read from a request's wire form agree with the decoded message."""

from __future__ import annotations

import random

import pytest

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.services.wire_text import input_size

ALPHABET = "aé€𝄞 \n\x00"


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.mark.parametrize("seed", range(20))
def test_bytes_counted_on_the_wire_equal_the_decoded_texts(seed: int) -> None:
    rng = random.Random(seed)
    cls = rng.choice([pb.GenerateRequest, pb.CompleteRequest])
    message = cls(
        model=text(rng, 5),
        sampling=pb.SamplingParams(max_tokens=rng.randrange(1, 10**6), temperature=0.5, seed=7),
        tools=[pb.Tool(name="f", parameters=text(rng, 300))],
        priority=pb.PRIORITY_HIGH,
    )
    if rng.random() < 0.5:
        message.prompt = text(rng, rng.randrange(0, 3000))
        want = ("prompt", len(message.prompt.encode()))
    else:
        for _ in range(rng.randrange(0, 6)):
            message.chat.messages.add(
                role="user",
                content=text(rng, rng.randrange(0, 500)),
                tool_calls=[pb.ToolCall(id="c", name="f", arguments=text(rng, 50))],
            )
        message.chat.SetInParent()
        want = ("chat.messages", sum(len(m.content.encode()) for m in message.chat.messages))
    size = input_size(message.SerializeToString())
    assert size is not None
    assert (size.model, size.task, size.field, size.nbytes) == (message.model, "", *want)


def test_no_input_or_bad_bytes_give_none() -> None:
    assert input_size(pb.GenerateRequest(model="m").SerializeToString()) is None
    assert input_size(b"\x12\x05ab") is None  # a length past the end
    assert input_size(b"\x12") is None
    assert input_size(b"\x0f") is None  # wire type 7
    assert input_size(b"\x0a\x01\xff\x12\x01a") is None  # a model name that is not UTF-8


def test_the_last_input_set_wins_as_in_the_parser() -> None:
    first = pb.GenerateRequest(prompt="x" * 10).SerializeToString()
    second = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="yy")])
    ).SerializeToString()
    task = pb.GenerateRequest(task="code").SerializeToString()
    size = input_size(first + second + task)
    assert size is not None and (size.task, size.field, size.nbytes) == ("code", "chat.messages", 2)
    assert pb.GenerateRequest.FromString(first + second).WhichOneof("input") == "chat"
    size = input_size(second + first)
    assert size is not None and (size.field, size.nbytes) == ("prompt", 10)
