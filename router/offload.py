"""The one worker thread for per-call work heavy enough to stall the event loop: tokenizing
long texts (router.serving.tokenize) and parsing big request messages (router.services.rpc).

One thread, shared by the process: big jobs queue behind each other there, which bounds their
memory and CPU, while the loop keeps serving every other call. A job that holds the GIL in one
C call (protobuf's parse) still blocks the loop for that call, but no longer for a burst of them
back to back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="irouter-offload")


async def run(fn: Callable[[], T]) -> T:
    """`fn()` on the worker thread, the loop free meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_worker, fn)
