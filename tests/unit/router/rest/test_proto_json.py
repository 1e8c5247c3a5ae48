"""Canonical JSON into request messages: field-named errors, path and query strings."""

from __future__ import annotations

import pytest

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.rest.proto_json import FieldError, merge_json, resolve_path, set_from_strings, to_json


def test_json_and_proto_names_both_parse() -> None:
    message = pb.GenerateRequest()
    merge_json({"sampling": {"maxTokens": 3, "top_k": 2, "seed": "18446744073709551615"}}, message)
    assert (message.sampling.max_tokens, message.sampling.top_k) == (3, 2)
    assert message.sampling.seed == 2**64 - 1


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({"sampling": {"maxToken": 1}}, "sampling.maxToken", "unknown field in SamplingParams"),
        ({"sampling": {"maxTokens": "x"}}, "sampling.maxTokens", ""),
        ({"sampling": {"max_tokens": -1}}, "sampling.max_tokens", "out of range"),
        ({"sampling": {"stop": [1]}}, "sampling.stop[0]", ""),
        ({"sampling": 3}, "sampling", "JSON object"),
        ({"chat": {"messages": [{}, {"role": []}]}}, "chat.messages[1].role", ""),
        ({"prompt": "a", "chat": {}}, "chat", "only one of the 'input' fields"),
        ({"priority": "URGENT"}, "priority", "URGENT"),
        (
            {"retrieval": {"filter": {"ranges": [{"min": "low"}]}}},
            "retrieval.filter.ranges[0].min",
            "",
        ),
    ],
)
def test_errors_name_the_field_as_the_client_wrote_it(
    body: dict[str, object], field: str, needle: str
) -> None:
    with pytest.raises(FieldError) as info:
        merge_json(body, pb.GenerateRequest())
    assert info.value.field == field
    assert needle in info.value.description


def test_map_values_are_checked_by_key() -> None:
    with pytest.raises(FieldError) as info:
        merge_json({"documents": [{"numericMetadata": {"year": "soon"}}]}, rpb.UpsertRequest())
    assert info.value.field == "documents[0].numericMetadata.year"


def test_null_means_default() -> None:
    message = pb.GenerateRequest()
    merge_json({"model": None, "sampling": None}, message)
    assert not message.HasField("sampling")


def test_path_and_query_strings_take_the_field_type() -> None:
    message = rpb.SearchRequest()
    desc = rpb.SearchRequest.DESCRIPTOR
    set_from_strings(message, resolve_path(desc, "topK"), ["7"], "topK")
    set_from_strings(message, resolve_path(desc, "vector.values"), ["0.5", "1e3"], "vector.values")
    set_from_strings(message, resolve_path(desc, "ef"), ["0"], "ef")
    assert message.top_k == 7
    assert list(message.vector.values) == [0.5, 1000.0]
    assert message.HasField("ef")  # an optional field set to zero is set
    g = pb.GenerateRequest()
    gdesc = pb.GenerateRequest.DESCRIPTOR
    set_from_strings(g, resolve_path(gdesc, "return_token_ids"), ["true"], "return_token_ids")
    set_from_strings(g, resolve_path(gdesc, "priority"), ["2"], "priority")
    assert g.return_token_ids and g.priority == pb.PRIORITY_HIGH
    with pytest.raises(FieldError, match="true or false"):
        set_from_strings(g, resolve_path(gdesc, "return_token_ids"), ["yes"], "x")
    with pytest.raises(FieldError, match="2 times"):
        set_from_strings(g, resolve_path(gdesc, "model"), ["a", "b"], "model")
    with pytest.raises(FieldError, match="is a message"):
        set_from_strings(g, resolve_path(gdesc, "sampling"), ["a"], "sampling")
    with pytest.raises(FieldError, match="unknown field"):
        resolve_path(gdesc, "sampling.nope")


def test_a_path_value_must_agree_with_the_body() -> None:
    message = pb.CompleteRequest()
    merge_json({"model": "a"}, message)
    chain = resolve_path(pb.CompleteRequest.DESCRIPTOR, "model")
    set_from_strings(message, chain, ["a"], "model", conflict_check=True)
    with pytest.raises(FieldError, match="in the path"):
        set_from_strings(message, chain, ["b"], "model", conflict_check=True)


def test_canonical_output() -> None:
    info = rpb.CollectionInfo(document_count=3, config=rpb.CollectionConfig(metric=rpb.METRIC_L2))
    assert to_json(info) == {"documentCount": "3", "config": {"metric": "METRIC_L2"}}
