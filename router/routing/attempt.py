"""One attempt of a call on one replica: what the attempt callable is told, and the bookkeeping
around it (the replica's outstanding count, its breaker's verdict, the per-attempt timeout).

The dispatcher takes the replica's probe slot and outstanding count before the attempt runs
(`Attempt`), and gives them back exactly once when it ends, however it ends: an answer, an error
(`record_verdict` says whether the replica is to blame), a timeout, or a cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from router.routing.balancer import Replica
from router.routing.config import ReplicaConfig
from router.routing.retry import Verdict, classify

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AttemptInfo:
    """What the attempt callable needs to know about the replica it is to call."""

    deployment: str
    model: str
    """Model the deployment serves."""
    replica: ReplicaConfig
    """Backend, device or URL of the replica to call."""
    attempt: int
    """1 for the first attempt of a call, then 2, 3 ... across retries, hedges and fallbacks."""
    timeout_s: float | None
    """Time this attempt has (None: unbounded); the dispatcher enforces it, a remote backend may
    forward it as its own deadline."""


UnaryAttempt = Callable[[AttemptInfo], Awaitable[T]]
StreamAttempt = Callable[[AttemptInfo], AsyncIterator[T]]


class AttemptTimedOut(Exception):
    """An attempt ran past its timeout; `blame`: the per-attempt limit (the replica's fault)
    rather than the caller's deadline."""

    def __init__(self, timeout_s: float | None, blame: bool) -> None:
        super().__init__(f"no answer within {timeout_s or 0:.3g}s")
        self.blame = blame


async def run_timed(attempt: UnaryAttempt[T], info: AttemptInfo, blame: bool) -> T:
    """The attempt, cut off at info.timeout_s (None: no limit) with AttemptTimedOut."""
    try:
        async with asyncio.timeout(info.timeout_s):
            return await attempt(info)
    except TimeoutError as error:
        raise AttemptTimedOut(info.timeout_s, blame) from error


class Attempt:
    """An attempt under way: what must be given back, and told to the breaker, when it ends."""

    __slots__ = ("blame", "info", "replica", "ticket")

    def __init__(self, replica: Replica, ticket: int, info: AttemptInfo, blame: bool) -> None:
        self.replica = replica
        self.ticket = ticket
        self.info = info
        self.blame = blame

    def finish(self, error: BaseException | None, *, cancelled: bool = False) -> Verdict | None:
        """The outstanding count back and the breaker's verdict; returns how `error` counts."""
        replica = self.replica
        replica.outstanding -= 1
        if cancelled or (isinstance(error, AttemptTimedOut) and not error.blame):
            replica.breaker.on_abandon(self.ticket)  # cancelled, or the caller's deadline
            return None
        if error is None:
            replica.breaker.on_success(self.ticket)
            return None
        return record_verdict(replica, self.ticket, error)

    def settle(self, task: asyncio.Task[Any]) -> None:
        """Done callback of an attempt run as a task."""
        if task.cancelled():
            self.finish(None, cancelled=True)
        else:
            self.finish(task.exception())


def record_verdict(replica: Replica, ticket: int, error: BaseException) -> Verdict:
    """Tell the replica's breaker about a failed attempt: a failure when the replica is to
    blame, no verdict at all otherwise."""
    verdict = classify(error)
    if verdict is Verdict.REPLICA_FAILED:
        replica.breaker.on_failure(ticket)
    else:
        replica.breaker.on_abandon(ticket)
    return verdict


def describe(error: BaseException) -> str:
    """An error in a line of a message: 'ConnectionResetError: reset by peer'."""
    text = str(error)
    if isinstance(error, AttemptTimedOut):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def close_items(items: AsyncIterator[Any]) -> None:
    """Close a stream attempt's iterator (an async generator runs its finally blocks)."""
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()
