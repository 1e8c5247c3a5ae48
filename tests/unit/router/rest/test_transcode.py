"""Stream format negotiation and route order of the transcoder, without a router."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from router.rest.app import SERVICES
from router.rest.grpc_client import RouterClient
from router.rest.status import StatusError
from router.rest.transcode import NDJSON, SSE, Transcoder, stream_format


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", NDJSON),
        ("*/*", NDJSON),
        ("application/json", NDJSON),
        ("text/event-stream", SSE),
        ("application/x-ndjson, text/event-stream", NDJSON),
        ("application/x-ndjson;q=0.5, text/event-stream", SSE),
        ("text/html, text/event-stream;q=0.1", SSE),
    ],
)
def test_stream_format(accept: str, expected: str) -> None:
    assert stream_format(Headers({"accept": accept})) == expected


def test_unacceptable_stream_format_is_406() -> None:
    with pytest.raises(StatusError) as info:
        stream_format(Headers({"accept": "image/png, text/event-stream;q=0"}))
    assert info.value.http_status == 406


def test_routes_with_a_verb_come_before_a_bare_variable() -> None:
    transcoder = Transcoder(RouterClient("127.0.0.1:1", 1), SERVICES, 1024)
    scope = {"type": "http", "method": "GET", "path": "/v1beta/collections/docs:search"}
    from starlette.routing import Match

    for route in transcoder.routes():
        match, child = route.matches(scope)
        if match == Match.FULL:
            assert child["irouter.rpc"].binding.method.name == "Search"
            break
    else:
        pytest.fail("no route matched")
    assert transcoder.owns("/v1beta/anything")
    assert not transcoder.owns("/v1/models")
