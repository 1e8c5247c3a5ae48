"""The pooled HTTP/1.1 client of the remote engines (backends/openai/http.py) against scripted
servers on loopback: keep-alive, the connection limit, a stale pooled connection, timeouts,
truncated and close-delimited answers, cancellation, and uvloop's transports."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from cryptography import x509

from backends.openai.config import OpenAIHttpConfig
from backends.openai.http import ConnectError, HttpPool, ReadTimeout, TransportError
from loadtest.processes import free_port
from tests.pki import issue, make_ca

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's body (Content-Length only, as the pool sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


def answer(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """(url, [connections accepted, connections open now, most open at once])."""
    stats = [0, 0, 0]
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats[0] += 1
        stats[1] += 1
        stats[2] = max(stats[2], stats[1])
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer, stats[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            stats[1] -= 1
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with srv:
            yield f"http://127.0.0.1:{port}", stats
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while True:
        body = await read_request(reader)
        writer.write(answer(b"echo:" + body))


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds (AssertionError past `timeout`)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


def pool(url: str, limit: int = 4) -> HttpPool:
    return HttpPool(url, headers={"Authorization": "Bearer k"}, max_connections=limit,
                    connect_timeout_s=2.0)  # fmt: skip


async def post(p: HttpPool, url: str, body: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    async with await p.request("POST", url, body, timeout=timeout) as r:
        return r.status, await r.read()


async def keep_alive_scenario() -> None:
    async with server(echo) as (url, stats):
        p = pool(url)
        for i in range(5):
            assert await post(p, f"{url}/v1/x?q=1", b"%d" % i) == (200, b"echo:%d" % i)
        assert stats[0] == 1  # one connection for five requests
        await p.aclose()


async def test_sequential_requests_share_one_connection() -> None:
    await keep_alive_scenario()


def test_uvloops_transports_work_too() -> None:
    uvloop.run(keep_alive_scenario())


async def test_the_request_carries_the_pools_headers_and_its_target() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(answer(b"{}"))
        await asyncio.Event().wait()

    async with server(record) as (url, _):
        p = pool(url)
        async with await p.request("GET", f"{url}/v1/models?api-version=1", timeout=5) as r:
            assert (r.status, await r.read()) == (200, b"{}")
        await p.aclose()
    lines = seen[0].split(b"\r\n")
    assert lines[0] == b"GET /v1/models?api-version=1 HTTP/1.1"
    assert b"Authorization: Bearer k" in lines and f"Host: {url[7:]}".encode() in lines
    with pytest.raises(ValueError, match="line break"):
        HttpPool(url, headers={"api-key": "k\r\nX: y"}, max_connections=1, connect_timeout_s=1)
    with pytest.raises(ValueError, match="not on this pool's server"):
        await HttpPool(url, headers={}, max_connections=1, connect_timeout_s=1).request(
            "GET", "http://elsewhere:1/v1", timeout=1
        )


async def test_requests_beyond_the_limit_wait_for_a_connection() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(reader)
            await release.wait()
            writer.write(answer(body))

    async with server(slow) as (url, stats):
        p = pool(url, limit=2)
        calls = [asyncio.create_task(post(p, url, b"%d" % i)) for i in range(6)]
        await until(lambda: stats[1] == 2)
        assert not any(c.done() for c in calls)
        release.set()
        assert [await c for c in calls] == [(200, b"%d" % i) for i in range(6)]
        assert stats[2] == 2
        await p.aclose()


async def test_a_pooled_connection_closed_by_the_server_is_retried_once_on_a_new_one() -> None:
    async def closes_idle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await read_request(reader)
        writer.write(answer(b"first"))
        if n == 1:
            await read_request(reader)  # closed as the next request arrives: never answered
            return
        while True:
            await read_request(reader)
            writer.write(answer(b"again"))

    async with server(closes_idle) as (url, stats):
        p = pool(url)
        assert await post(p, url, b"a") == (200, b"first")
        assert await post(p, url, b"b") == (200, b"first")  # sent again on connection 2
        assert stats[0] == 2
        await p.aclose()


async def test_a_new_connection_closed_before_an_answer_is_an_error() -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async with server(hangs_up) as (url, stats):
        p = pool(url)
        with pytest.raises(TransportError, match="closed the connection"):
            await post(p, url, b"x")
        assert stats[0] == 1  # not retried: the request may have been taken
        await p.aclose()


async def test_silence_is_a_read_timeout_and_a_refused_port_a_connect_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await asyncio.Event().wait()

    async with server(silent) as (url, _):
        p = pool(url)
        with pytest.raises(ReadTimeout, match=r"silent for 0\.2 s"):
            await post(p, url, b"x", timeout=0.2)
        await p.aclose()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError, match=r"127\.0\.0\.1"):
        await post(pool(dead), dead, b"x")


async def test_a_chunked_stream_arrives_piece_by_piece_and_a_cut_one_fails() -> None:
    async def chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"one ", b"two "):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.05)
        if n == 1:
            writer.write(b"0\r\n\r\n")
            await read_request(reader)
            writer.write(answer(b"reused"))
            await asyncio.Event().wait()
        # n == 2: the server goes away mid-body

    async with server(chunks) as (url, stats):
        p = pool(url)
        async with await p.request("POST", url, b"s", timeout=5) as r:
            assert [piece async for piece in r.iter_any()] == [b"one ", b"two "]
        assert await post(p, url, b"t") == (200, b"reused")  # read to its end: pooled
        assert stats[0] == 1
        p2 = pool(url)  # a second connection (n == 2): cut short
        got: list[bytes] = []
        with pytest.raises(TransportError, match="closed the connection"):
            async with await p2.request("POST", url, b"s", timeout=5) as r:
                async for piece in r.iter_any():
                    got.append(piece)
        assert got == [b"one ", b"two "]
        await p.aclose()
        await p2.aclose()


async def test_an_answer_ended_by_the_close_is_whole_and_the_connection_not_kept() -> None:
    async def close_delimited(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\r\nbusy, ")
        await writer.drain()
        writer.write(b"try later")

    async with server(close_delimited) as (url, stats):
        p = pool(url)
        async with await p.request("POST", url, b"x", timeout=5) as r:
            assert (r.status, r.reason, await r.read()) == (
                503,
                "Service Unavailable",
                b"busy, try later",
            )
        assert await post(p, url, b"y") == (503, b"busy, try later")
        assert stats[0] == 2
        await p.aclose()


async def test_leaving_a_stream_early_closes_its_connection_and_frees_the_slot() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"2\r\nok\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with server(endless) as (url, stats):
        p = pool(url, limit=1)
        async with await p.request("POST", url, b"x", timeout=5) as r:
            async for _ in r.iter_any():
                break
        task = asyncio.create_task(post(p, url, b"y", timeout=0.5))
        await until(lambda: stats[0] == 2)
        task.cancel()  # waiting for its head on connection 2: cancelled, its slot freed
        with pytest.raises(asyncio.CancelledError):
            await task
        async with await p.request("POST", url, b"z", timeout=5) as r:
            assert r.status == 200
        await until(lambda: stats[1] <= 1)  # the abandoned ones were closed
        assert stats[0] == 3
        await p.aclose()


async def test_a_malformed_answer_is_a_transport_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await asyncio.Event().wait()

    async with server(garbage) as (url, _):
        p = pool(url)
        with pytest.raises(TransportError, match="malformed HTTP answer"):
            await post(p, url, b"x")
        await p.aclose()


async def test_https_checks_the_servers_certificate(tmp_path: Path) -> None:
    ca, ca_key, ca_cert = make_ca("test ca")
    issued = issue(ca_key, ca_cert, "localhost", x509.DNSName("localhost"))
    (tmp_path / "cert.pem").write_bytes(issued.cert)
    (tmp_path / "key.pem").write_bytes(issued.key)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    trusting = ssl.create_default_context(cadata=ca.cert.decode())
    srv = await asyncio.start_server(lambda r, w: echo(r, w, 1), "127.0.0.1", 0, ssl=served)
    url = f"https://localhost:{srv.sockets[0].getsockname()[1]}"
    async with srv:
        p = HttpPool(url, headers={}, max_connections=1, connect_timeout_s=2, ssl_context=trusting)
        assert await post(p, f"{url}/v1", b"tls") == (200, b"echo:tls")
        await p.aclose()
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(pool(url), url, b"x")  # the system's CAs do not know this one


async def test_an_informational_answer_is_skipped_for_the_answer_that_follows() -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        k = 0
        while True:
            await read_request(reader)
            k += 1
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # arrives on its own, before the answer
            writer.write(answer(b"answer-%d" % k))

    async with server(hints) as (url, stats):
        p = pool(url)
        for k in (1, 2, 3):
            assert await post(p, url, b"x") == (200, b"answer-%d" % k)
        assert stats[0] == 1
        await p.aclose()


async def test_bytes_no_request_asked_for_close_the_connection() -> None:
    async def stray(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(reader)
            writer.write(answer(body))
            await writer.drain()
            await asyncio.sleep(0.05)  # then, on the idle connection, an answer to nothing
            writer.write(answer(b"timeout", status=b"408 Request Timeout"))

    async with server(stray) as (url, stats):
        p = pool(url)
        assert await post(p, url, b"one") == (200, b"one")
        await until(lambda: p._idle[0].lost is not None)  # the 408 arrived
        assert await post(p, url, b"two") == (200, b"two")  # not b"timeout..."
        assert stats[0] == 2  # the first connection was dropped
        await p.aclose()


async def test_a_request_the_server_held_before_closing_is_not_sent_again() -> None:
    async def slow_then_gone(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await read_request(reader)
        writer.write(answer(b"first"))
        await read_request(reader)  # taken, worked on past STALE_RETRY_S, then dropped
        await asyncio.sleep(1.2)

    async with server(slow_then_gone) as (url, stats):
        p = pool(url)
        assert await post(p, url, b"a") == (200, b"first")
        with pytest.raises(TransportError, match="closed the connection"):
            await post(p, url, b"b")
        assert stats[0] == 1  # not sent again on a new connection
        await p.aclose()
    with pytest.raises(ValueError, match="credentials"):
        OpenAIHttpConfig(url="http://user:secret@127.0.0.1:1", model="m").validate()
