"""PipeWriter: multiprocessing frames written by the sending thread, never blocking it."""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from backends.openvino.pipe_writer import PipeWriter
from backends.openvino.worker import Add


def receive(reader: Connection, count: int) -> list[object]:
    """`count` messages, failing (not hanging) when they do not all come whole: a reading
    thread, since recv() waits forever for the rest of a frame cut short."""
    got: list[object] = []

    def read() -> None:
        for _ in range(count):
            got.append(reader.recv())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{len(got)} of {count} messages came whole"
    return got


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
    got = receive(reader, 2 * len(sent))
    assert got == [m for i, message in enumerate(sent) for m in (message, -i)]
    assert writer.pending == 0 and not reader.poll(0)


def test_two_threads_sending_keep_each_ones_order(pipe: tuple[Connection, PipeWriter]) -> None:
    """Frames of 5-70 KB (beyond the pipe's atomic writes) from two threads at once, nothing
    reading until both are done: every frame arrives whole, each thread's in its order."""
    reader, writer = pipe
    per_thread = 40

    def send(tag: int) -> None:
        for i in range(per_thread):
            writer.send((tag, i, bytes([i]) * (5_000 + 1_637 * i)))

    threads = [threading.Thread(target=send, args=(tag,)) for tag in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = receive(reader, 2 * per_thread)
    for tag in (0, 1):
        mine = [(i, data) for t, i, data in got if t == tag]  # type: ignore[misc]
        assert [i for i, _ in mine] == list(range(per_thread))
        assert all(data == bytes([i]) * (5_000 + 1_637 * i) for i, data in mine)


def test_a_pipe_past_descriptor_1023_still_drains() -> None:
    """select.select refuses descriptors past 1023; a busy router can hand the pipe such one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard if hard != resource.RLIM_INFINITY else 4096) < 1200:
        pytest.skip(f"this process may open {hard} files, too few to pass descriptor 1023")
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = []
    try:
        while len(fillers) < 1100 and (not fillers or fillers[-1] < 1030):
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        reader, writer_end = multiprocessing.Pipe(duplex=False)
        assert writer_end.fileno() > 1023
        writer = PipeWriter(writer_end)
        sent = [Add(i, tuple(range(5000)), {}, frozenset()) for i in range(20)]
        for message in sent:
            writer.send(message)
        assert writer.pending > 0  # the draining thread has to finish these
        assert receive(reader, len(sent)) == sent
        writer.close()
        reader.close()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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
    consumer = threading.Thread(target=lambda: got.extend(receive(reader, 21)), daemon=True)
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
