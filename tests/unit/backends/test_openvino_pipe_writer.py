"""PipeWriter: multiprocessing frames written by the sending thread, never blocking it."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from backends.openvino.pipe_writer import PipeWriter
from backends.openvino.worker import Add


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, PipeWriter]]:
    reader, writer_end = multiprocessing.Pipe(duplex=False)
    writer = PipeWriter(writer_end)
    yield reader, writer
    writer.close()
    reader.close()


def test_a_message_is_in_the_pipe_when_send_returns(
    pipe: tuple[Connection, PipeWriter],
) -> None:
    reader, writer = pipe
    message = Add(7, (1, 2, 3), {"max_new_tokens": 4}, frozenset({2}))
    writer.send(message)
    assert writer.pending == 0
    assert reader.poll(0)  # no other thread had to run first
    assert reader.recv() == message
    writer.send(7)
    writer.send(None)
    assert [reader.recv(), reader.recv()] == [7, None]


def test_what_the_pipe_cannot_hold_waits_in_order_without_blocking_the_sender(
    pipe: tuple[Connection, PipeWriter],
) -> None:
    """Nothing reads while 40 prompts of ~20 KB are sent (a blocking write would hang here);
    the reader then gets every message whole and in order."""
    reader, writer = pipe
    sent = [Add(i, tuple(range(i, i + 4000)), {}, frozenset()) for i in range(40)]
    for i, message in enumerate(sent):
        writer.send(message)
        writer.send(-i)  # small ones between, queued behind the big ones
    assert writer.pending > 0
    got = [reader.recv() for _ in range(2 * len(sent))]
    assert got == [m for i, message in enumerate(sent) for m in (message, -i)]
    assert writer.pending == 0 and not reader.poll(0)


def test_two_threads_sending_keep_each_ones_order(pipe: tuple[Connection, PipeWriter]) -> None:
    reader, writer = pipe
    per_thread = 3000

    def send(tag: int) -> None:
        for i in range(per_thread):
            writer.send((tag, i, b"x" * (i % 97)))

    threads = [threading.Thread(target=send, args=(tag,)) for tag in (0, 1)]
    for thread in threads:
        thread.start()
    got = [reader.recv() for _ in range(2 * per_thread)]
    for thread in threads:
        thread.join()
    for tag in (0, 1):
        assert [i for t, i, _ in got if t == tag] == list(range(per_thread))


def test_a_reader_gone_drops_later_messages_without_raising(
    pipe: tuple[Connection, PipeWriter],
) -> None:
    reader, writer = pipe
    reader.close()
    writer.send(Add(1, (1,), {}, frozenset()))  # EPIPE: the worker exited
    assert writer.broken
    writer.send(2)  # dropped, not raised
    assert writer.pending == 0


def test_close_lets_what_is_pending_reach_a_reader_within_its_drain_time() -> None:
    reader, writer_end = multiprocessing.Pipe(duplex=False)
    writer = PipeWriter(writer_end)
    big = [Add(i, tuple(range(5000)), {}, frozenset()) for i in range(20)]
    for message in big:
        writer.send(message)
    writer.send(None)
    assert writer.pending > 0
    got: list[object] = []
    consumer = threading.Thread(target=lambda: got.extend(reader.recv() for _ in range(21)))
    consumer.start()
    writer.close(drain_s=30)
    consumer.join(30)
    assert got == [*big, None]
    assert writer_end.closed
    writer.send(3)  # after close: dropped
    reader.close()


def test_close_without_a_reader_gives_up_after_its_drain_time() -> None:
    reader, writer_end = multiprocessing.Pipe(duplex=False)
    writer = PipeWriter(writer_end)
    for i in range(20):
        writer.send(Add(i, tuple(range(5000)), {}, frozenset()))
    assert writer.pending > 0
    writer.close(drain_s=0.05)  # returns: the draining thread stopped, the end is closed
    assert writer_end.closed and writer.broken and writer.pending == 0
    reader.close()
