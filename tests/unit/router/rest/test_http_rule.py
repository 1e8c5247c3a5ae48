"""HttpRule path templates: parsing, matching raw paths, and the bindings read from the protos."""

from __future__ import annotations

import pytest

from router.proto.irouter.v1 import inference_service_pb2, retrieval_service_pb2
from router.rest.http_rule import TemplateError, Variable, bindings, parse_template

RETRIEVAL = retrieval_service_pb2.DESCRIPTOR.services_by_name["RetrievalService"]
INFERENCE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]


def test_literal_variables_and_verb() -> None:
    t = parse_template("/v1beta/models/{model}:generate")
    assert t.segments == ("v1beta", "models", Variable(("model",), ("*",)))
    assert t.verb == "generate"
    assert t.match("/v1beta/models/smollm2:generate") == {"model": "smollm2"}
    assert t.match("/v1beta/models/smollm2:complete") is None
    assert t.match("/v1beta/models/a/b:generate") is None
    assert t.match("/v1beta/models/:generate") is None


def test_nested_field_path() -> None:
    t = parse_template("/v1beta/collections/{config.name}")
    assert t.variables == (Variable(("config", "name"), ("*",)),)
    assert t.match("/v1beta/collections/docs") == {"config.name": "docs"}
    assert t.openapi_path() == "/v1beta/collections/{config.name}"


def test_percent_decoding_keeps_encoded_slashes_inside_one_segment() -> None:
    t = parse_template("/v1/{name}")
    assert t.match("/v1/a%2Fb%20c") == {"name": "a/b c"}
    assert t.match("/v1/a/b") is None


def test_multi_segment_variables() -> None:
    t = parse_template("/v1/{name=shelves/*/books/**}:get")
    assert t.match("/v1/shelves/1/books/x/y:get") == {"name": "shelves/1/books/x/y"}
    assert t.match("/v1/shelves/1/cds/x:get") is None
    t = parse_template("/files/**")
    assert t.match("/files/a/b/c") == {}


def test_the_verb_is_not_swallowed_by_a_greedy_variable() -> None:
    t = parse_template("/v1/{name}:search")
    assert t.match("/v1/a:b:search") == {"name": "a:b"}


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("v1/models", "starts with '/'"),
        ("/v1/{model", "expected '}'"),
        ("/v1/{1x}", "field name"),
        ("/v1/{a={b}}", "cannot nest"),
        ("/v1/**/x", "last segment"),
        ("/v1/{a}/{a}", "twice"),
        ("/v1/x:", "literal"),
        ("/v1//x", "literal"),
    ],
)
def test_malformed_templates_name_the_problem(source: str, needle: str) -> None:
    with pytest.raises(TemplateError, match=needle.replace("*", r"\*")):
        parse_template(source)


def test_every_rpc_has_a_binding() -> None:
    for service in (INFERENCE, RETRIEVAL):
        for method in service.methods:
            assert bindings(method), method.full_name


def test_additional_bindings_follow_the_primary_one() -> None:
    create = bindings(RETRIEVAL.methods_by_name["CreateCollection"])
    assert [(b.http_method, b.template.source, b.body) for b in create] == [
        ("POST", "/v1beta/collections", "config"),
        ("PUT", "/v1beta/collections/{config.name}", "config"),
    ]
    search = bindings(RETRIEVAL.methods_by_name["Search"])
    assert [(b.http_method, b.body) for b in search] == [("POST", "*"), ("GET", "")]


def test_shapes_group_templates_that_match_the_same_paths() -> None:
    a = parse_template("/v1beta/collections/{name}")
    b = parse_template("/v1beta/collections/{config.name}")
    c = parse_template("/v1beta/collections/{name}:search")
    assert a.shape == b.shape != c.shape
