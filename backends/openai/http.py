"""A pooled HTTP/1.1 client for one remote server: keep-alive connections, a request of bytes, an
answer read whole or as it arrives.

Written here on purpose, over httptools (llhttp, the C parser uvicorn uses): per call at one in
flight against an instant upstream, aiohttp's client cost ~0.30 ms of CPU on this project's AMD
EPYC machines and this one ~0.08 ms (httpx's 3.6 ms), while the whole gateway path has a 1 ms goal
(loadtest/benchmarks/gateway_bench.py). It does only what the engines need: one origin per pool,
Content-Length, chunked and close-delimited answers, TLS, a connect timeout and a bound on every
silence. No redirects (a 3xx is an answer like any), proxies, cookies or compression (none is
asked for).

A request on a pooled connection that the server closes before answering a byte (it closed the
idle connection as the request went out) is sent once more on a new connection; any other failure
is the caller's (a TransportError).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

STALE_RETRY_S = 1.0
"""A pooled connection closed this soon after a request went out, before any answer, is taken
for one the server closed while idle, and the request is sent again on a new one; later, the
server may have taken the request (a POST is not sent twice)."""
PAUSE_BYTES = 1 << 20
"""Unread bytes of a streamed answer past which the socket is not read until they are taken."""


class TransportError(Exception):
    """No answer, or part of one: the connection failed."""


class ConnectError(TransportError):
    """The server could not be reached (refused, no such host, TLS handshake)."""


class ConnectTimeout(TransportError, TimeoutError):
    """No connection within the pool's connect timeout."""


class ReadTimeout(TransportError, TimeoutError):
    """The server was silent longer than the request's read timeout."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the answer being read on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers_done = False
        self.complete = False
        self.sized = False  # Content-Length or chunked: the body does not end at the close
        self.reusable = False  # both sides keep the connection after this answer
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.streaming = False
        self.paused = False
        self.answered = False  # a byte of the current answer arrived
        self.busy = False  # a request was sent and its answer has not ended
        self.interim = False  # parsing a 1xx answer (103 Early Hints...): not the answer
        self.stray = False  # bytes arrived that no request asked for
        self.sent_at = 0.0
        self.lost: TransportError | None = None
        self._wake: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self.stray |= not self.busy
        if not self.stray:
            try:
                self.parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._drop(TransportError(f"malformed HTTP answer ({exc!r})"))
                return
        if self.stray:  # e.g. a 408 sent on an idle connection: never any request's answer
            self._drop(TransportError("the server sent bytes no request asked for"))

    def connection_lost(self, exc: Exception | None) -> None:
        ended = exc is None and self.headers_done and not self.complete and not self.sized
        if ended and self.lost is None:
            self.complete = True  # a body delimited by a clean close has ended
        reason = f" ({exc!r})" if exc is not None else ""
        self._lose(TransportError(f"the server closed the connection{reason}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.stray |= not self.busy  # a second answer after this request's
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.sized = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational: the answer follows (101 raises Upgrade)
            self.interim = True
            return
        self.status = status
        self.headers_done = True
        self._notify()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.streaming and self.buffered > PAUSE_BYTES and not self.paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused = True
        self._notify()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.busy = False
        self.reusable = self.parser.should_keep_alive()  # reset once the callback returns
        self._notify()

    # the pool's side
    def usable(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.status, self.reason, self.headers_done, self.complete = 0, b"", False, False
        self.sized, self.answered, self.streaming, self.reusable = False, False, False, False
        self.chunks.clear()
        self.buffered = 0
        self.busy = True
        self.sent_at = time.monotonic()
        self.transport.write(data)

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused:
            assert self.transport is not None
            self.transport.resume_reading()
            self.paused = False
        return data

    async def wait(self, timeout: float | None) -> None:
        """Until something arrives (or is lost), bounded by `timeout` of silence; the caller
        checks what it waits for first."""
        if self.lost is not None:
            raise self.lost
        self._wake = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._wake
        except TimeoutError:
            raise ReadTimeout(f"the server was silent for {timeout:g} s") from None
        finally:
            self._wake = None

    def keep_alive(self) -> bool:
        return self.complete and self.reusable and self.usable()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _drop(self, error: TransportError) -> None:
        self._lose(error)
        assert self.transport is not None
        self.transport.close()

    def _lose(self, error: TransportError) -> None:
        if self.lost is None:
            self.lost = error
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class Response:
    """An answer whose head arrived: its status, then its body, read whole (`read`) or as it
    arrives (`iter_any`). Leaving its `async with` without reading to the end closes the
    connection; an answer read to its end returns it to the pool."""

    def __init__(self, pool: HttpPool, connection: _Connection, timeout: float | None) -> None:
        self._pool = pool
        self._conn: _Connection | None = connection
        self._timeout = timeout
        self.status = connection.status
        self.reason = connection.reason.decode("latin-1").strip()

    async def read(self) -> bytes:
        conn = self._live()
        while not conn.complete:
            await conn.wait(self._timeout)
        data = conn.take()
        self._finish()
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body's bytes as each read brings them."""
        conn = self._live()
        conn.streaming = True
        while True:
            if not conn.chunks and not conn.complete:
                await conn.wait(self._timeout)
            if conn.chunks:
                yield conn.take()
            if conn.complete and not conn.chunks:
                self._finish()
                return

    def close(self) -> None:
        """Drop the connection (the rest of the answer is not read)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.discard(conn)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _live(self) -> _Connection:
        if self._conn is None:
            raise TransportError("the answer was closed before it was read")
        return self._conn

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)


class HttpPool:
    """Up to `max_connections` keep-alive connections to the origin of `url`; a request beyond
    them waits for one. Every request carries `headers`. An https origin's certificate is
    checked against `ssl_context` (default: the system's CAs, its host name verified)."""

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str],
        max_connections: int,
        connect_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url={url!r} must be http(s)://host[:port][/path]")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = None
        if parts.scheme == "https":  # the system's CAs unless told otherwise
            self._ssl = ssl_context or ssl.create_default_context()
        for name, value in headers.items():
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break or NUL")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if parts.port:
            host = f"{host}:{parts.port}"
        fixed = {"Host": host, "Accept": "*/*", **headers}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._limit = max_connections
        self._connect_timeout = connect_timeout_s
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._targets: dict[str, bytes] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        timeout: float | None,
    ) -> Response:
        """Send a request and wait for its answer's head (each silence at most `timeout` s)."""
        head = self._head(method, url, body, content_type)
        for attempt in (1, 2):
            conn, reused = await self._acquire()
            try:
                conn.send(head + body)
                while not conn.headers_done:
                    await conn.wait(timeout)
            except TransportError as exc:
                self.discard(conn)
                quick = time.monotonic() - conn.sent_at < STALE_RETRY_S
                stale = reused and quick and not conn.answered and not isinstance(exc, TimeoutError)
                if stale and attempt == 1:
                    continue  # the server closed the idle connection as the request went out
                raise
            except BaseException:
                self.discard(conn)
                raise
            return Response(self, conn, timeout)
        raise AssertionError("unreachable")

    def release(self, conn: _Connection) -> None:
        """A connection whose answer was read to its end: kept for the next request when both
        sides keep it alive, else closed."""
        if self._closed or not conn.keep_alive():
            self.discard(conn)
            return
        self._idle.append(conn)
        self._wake_one()

    def discard(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1
        self._wake_one()

    async def aclose(self) -> None:
        """Close the idle connections now and the others as their answers end."""
        self._closed = True
        while self._idle:
            self.discard(self._idle.pop())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _head(self, method: str, url: str, body: bytes, content_type: str) -> bytes:
        target = self._targets.get(url)
        if target is None:
            if not url.startswith(self._origin):
                raise ValueError(f"{url!r} is not on this pool's server {self._origin}")
            path = url[len(self._origin) :] or "/"
            if any(c.isspace() for c in path):
                raise ValueError(f"{url!r} holds whitespace")
            target = path.encode("ascii")
            self._targets[url] = target
        head = b"%s %s HTTP/1.1\r\n%s" % (method.encode(), target, self._fixed)
        if body:
            head += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (
                content_type.encode(),
                len(body),
            )
        return head + b"\r\n"

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A pooled connection (True: it served a request before) or a new one."""
        while True:
            if self._closed:
                raise TransportError("the client was closed")
            while self._idle:
                conn = self._idle.pop()  # the most recent: the least likely closed by the server
                if conn.usable():
                    return conn, True
                self.discard(conn)
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect(), False
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass on the turn this waiter was given
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection to {self._origin} within {self._connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, no such host, TLS handshake
            raise ConnectError(f"{self._origin}: {exc}") from None
        return conn

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
