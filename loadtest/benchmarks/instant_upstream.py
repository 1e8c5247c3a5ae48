"""An OpenAI-compatible upstream that answers instantly, for measuring what a gateway adds: one
uvloop process speaking just enough HTTP/1.1 (keep-alive, Content-Length bodies) to answer

    GET  /v1/models                 the one model, MODEL
    POST /v1/chat/completions       "stream": true → CHUNKS content events, a finish event,
    POST /v1/completions            a usage event when asked, [DONE]; else one JSON answer;
                                    a request whose model name holds "paced" gets its events
                                    PACE_S apart (each arrives in its own read)

with canned bytes, so that its own cost stays far below the gateway's (about 17,000 requests/s
on one core here). Not a test double for behaviour (tests/fake_openai.py is): it reads no field
but `stream` and `stream_options`.

    python -m loadtest.benchmarks.instant_upstream PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop

MODEL = "upstream-model"
CHUNKS = 20
"""Content events in a streamed answer."""
WORDS = [f"w{i} " for i in range(CHUNKS)]
USAGE = {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS}


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunked(events: list[bytes]) -> list[bytes]:
    """An SSE response sent chunked, one HTTP chunk per event (as vLLM and llama.cpp send
    them): the head with the first event, each later event, the last chunk."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    out = [f"{len(event):x}\r\n".encode() + event + b"\r\n" for event in events]
    out[0] = head + out[0]
    out[-1] += b"0\r\n\r\n"
    return out


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _event(kind: str, part: dict[str, object], finish: str | None) -> bytes:
    choice = {"index": 0, **part, "finish_reason": finish}
    return _sse({"id": "up", "object": f"{kind}.chunk", "model": MODEL, "choices": [choice]})


def _event(kind: str, part: dict[str, object], finish: str | None) -> bytes:
    choice = {"index": 0, **part, "finish_reason": finish}
    return _sse({"id": "up", "object": f"{kind}.chunk", "model": MODEL, "choices": [choice]})


PIECES: dict[tuple[bytes, bool], list[bytes]] = {}
"""(path, include_usage) → a streamed response's writes, one per event (paced answers)."""
PACE_S = 0.0005
"""Between two events of a paced answer (a request whose model name holds "paced"): each
arrives on its own, as a real server's tokens do, instead of all in one read."""


def _answers() -> dict[tuple[bytes, bool, bool], bytes]:
    """(path, stream, include_usage) → the whole HTTP response."""
    answers: dict[tuple[bytes, bool, bool], bytes] = {}
    for path, chat in ((b"/v1/chat/completions", True), (b"/v1/completions", False)):
        kind = "chat.completion" if chat else "text_completion"
        text = "".join(WORDS)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if chat
            else {"index": 0, "text": text}
        )
        whole = {"id": "up", "object": kind, "model": MODEL, "usage": USAGE,
                 "choices": [{**choice, "finish_reason": "stop"}]}  # fmt: skip
        answers[path, False, False] = answers[path, False, True] = _response(
            json.dumps(whole).encode()
        )
        for usage in (False, True):
            events = [
                _event(kind, {"delta": {"content": w}} if chat else {"text": w}, None)
                for w in WORDS
            ]
            events.append(_event(kind, {"delta": {}} if chat else {"text": ""}, "stop"))
            if usage:
                events.append(_sse({"id": "up", "choices": [], "usage": USAGE}))
            events.append(b"data: [DONE]\n\n")
            PIECES[path, usage] = _chunked(events)
            answers[path, True, usage] = b"".join(PIECES[path, usage])
    return answers


ANSWERS = _answers()
PACED = f"{MODEL}-paced"
MODELS = _response(
    json.dumps(
        {"object": "list", "data": [{"id": m, "object": "model"} for m in (MODEL, PACED)]}
    ).encode()
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, _, rest = head.partition(b"\r\n")
            method, path, _ = request_line.split(b" ", 2)
            length = 0
            for line in rest.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            if method == b"GET" and path.startswith(b"/v1/models"):
                writer.write(MODELS)
                continue
            stream = b'"stream":true' in body.replace(b" ", b"")
            usage = b'"include_usage":true' in body.replace(b" ", b"")
            if stream and b"paced" in body and (path, usage) in PIECES:
                for piece in PIECES[path, usage]:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(PACE_S)
                continue
            writer.write(ANSWERS.get((path, stream, usage), NOT_FOUND))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
