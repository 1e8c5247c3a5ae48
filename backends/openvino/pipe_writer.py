"""Messages to the worker process, written by the thread that sends them, never blocking it.

Why not a sender thread for every message (as before): a thread woken to write must first
take the GIL, and while the event loop runs Python it waits out the interpreter's switch
interval (5 ms). 16 calls arriving at once keep the loop busy for ~6 ms; their messages
reached the worker in clumps 4-5 ms apart, and the worker, gathering a burst until a gap, took
a clump for the whole burst (Intel Xeon, 2 cores). Written here, each message is in the pipe
when send() returns, ~0.3-0.5 ms after the last.

The pipe's write end is non-blocking. What does not fit in it (the worker reads between its
steps; 64 KiB of prompts can wait there) is kept in order and written by a thread of this
writer's once the pipe drains: only then does a message wait for another thread.

The frames are multiprocessing.connection's (a 4-byte big-endian length, then the pickle), so
the worker reads them with Connection.recv. Hand-written because neither multiprocessing
(blocking writes) nor asyncio's pipe transports (the loop's thread only, while the receiving
thread sends cancellations too) write from any thread without blocking.
"""

from __future__ import annotations

import logging
import os
import selectors
import struct
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

logger = logging.getLogger(__name__)

WAIT_WRITABLE_S = 0.1
"""The draining thread's longest wait for room in the pipe before it looks again."""


class PipeWriter:
    """Frames to one Connection's write end, in order, from any thread."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._fd = connection.fileno()
        os.set_blocking(self._fd, False)
        self._pending = bytearray()
        """Frames (or the rest of one) the pipe had no room for, oldest first."""
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._closed = False
        self._deadline = 0.0
        self.broken = False
        """The reading end is gone (the worker exited): later messages are dropped; whoever
        reads from the worker notices the exit and says why."""
        self._thread = threading.Thread(target=self._drain, name="openvino-send", daemon=True)
        self._thread.start()

    def send(self, message: object) -> None:
        payload = ForkingPickler.dumps(message)
        frame = struct.pack("!i", len(payload)) + payload
        with self._lock:
            if self._closed or self.broken:
                return
            if not self._pending:
                written = self._write(frame)
                if written == len(frame):
                    return
                frame = frame[written:]
            self._pending += frame
            self._more.notify()

    @property
    def pending(self) -> int:
        """Bytes sent but not yet in the pipe."""
        with self._lock:
            return len(self._pending)

    def close(self, drain_s: float = 0.0) -> None:
        """Stop, after up to `drain_s` for what is pending to reach the pipe, then close the
        connection (only once the draining thread is done: its descriptor could be reused)."""
        with self._lock:
            self._closed = True
            self._deadline = time.monotonic() + drain_s
            self._more.notify()
        self._thread.join()
        self._connection.close()

    def _write(self, data: bytes | bytearray) -> int:
        """Bytes of `data` the pipe took now (the lock held)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE: nobody reads any more
            self._pending.clear()
            self.broken = True
            return len(data)

    def _drain(self) -> None:
        try:
            self._drain_until_closed()
        except Exception:  # a crash must not leave sends piling up behind a dead thread
            logger.exception("writing to the OpenVINO GenAI worker failed")
            with self._lock:
                self._pending.clear()
                self.broken = True

    def _drain_until_closed(self) -> None:
        # A selector, not select.select: that refuses descriptors past 1023, which a busy
        # router's pipe to a restarted worker can get.
        with selectors.DefaultSelector() as room:
            room.register(self._fd, selectors.EVENT_WRITE)
            while True:
                with self._lock:
                    while not self._pending and not self._closed:
                        self._more.wait()
                    if self._closed and (not self._pending or time.monotonic() > self._deadline):
                        self._pending.clear()
                        self.broken = True  # sends after close() are dropped
                        return
                    written = self._write(self._pending)
                    del self._pending[:written]
                    if not self._pending:
                        continue
                # Outside the lock: sends meanwhile append behind what is pending.
                room.select(WAIT_WRITABLE_S)
