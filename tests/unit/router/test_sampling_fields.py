"""The sampling fields are declared once (backends.base.SamplingParams); what reads them from
a proto must agree with it, or a field would be silently dropped."""

from __future__ import annotations

import dataclasses

from backends.base import GenerationRequest, SamplingParams, StructuredOutput
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.services.inference import sampling_from_proto

PROTO_NAMES = {"structured": "structured_output"}
"""Fields whose proto name differs (the proto's is the message's name)."""


def test_every_sampling_field_is_in_the_proto() -> None:
    names = {PROTO_NAMES.get(f.name, f.name) for f in dataclasses.fields(SamplingParams)}
    assert names <= set(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def test_a_proto_with_every_field_set_reaches_sampling_params() -> None:
    message = pb.SamplingParams(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        min_p=0.1,
        repetition_penalty=1.1,
        presence_penalty=0.2,
        frequency_penalty=0.3,
        seed=11,
        stop=["x"],
        stop_token_ids=[5],
        ignore_eos=True,
        structured_output=pb.StructuredOutput(regex="[0-9]+"),
    )
    params, max_tokens_set = sampling_from_proto(message)
    assert max_tokens_set
    for f in dataclasses.fields(SamplingParams):
        if f.name == "structured":
            assert params.structured == StructuredOutput("regex", "[0-9]+")
            continue
        expected = getattr(message, f.name)
        if f.name in ("stop", "stop_token_ids"):
            expected = tuple(expected)
        assert getattr(params, f.name) == expected, f.name


def test_engines_see_the_same_fields() -> None:
    sampling = {f.name for f in dataclasses.fields(SamplingParams)}
    request = {f.name for f in dataclasses.fields(GenerationRequest)}
    assert request - sampling == {"request_id", "prompt_ids", "prompt", "chat", "stream"}
