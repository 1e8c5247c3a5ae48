"""The dispatcher: sends one call to a deployment's replicas under its routing policy.

It never talks to a backend itself. The server hands it an *attempt*: a callable that performs
the call on one replica (`AttemptInfo` says which, and how long it may take). For each call the
dispatcher resolves the name (alias, deployment or task), then walks the deployment's fallback
chain; in each deployment it picks a replica with the deployment's balancer, counts it
outstanding, bounds the attempt by the per-attempt and overall deadlines, records the verdict in
the replica's breaker, and tries another replica while nothing has reached the client, within
max_attempts and the retry budget. A unary call may also be hedged. When no replica of any
deployment in the chain is available it raises `NoReplicaAvailable` at once: nothing is queued.

    dispatcher = Dispatcher(config.routing)
    text = await dispatcher.unary("chat", lambda a: engines[a.replica.name].complete(req))
    async for token in dispatcher.stream("chat", lambda a: engines[a.replica.name].generate(req),
                                         key=conversation_id, timeout_s=ctx.time_remaining()):
        ...
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

from router.errors import DeadlineExceeded, RouterError, Unavailable
from router.routing.attempt import (
    Attempt,
    AttemptInfo,
    StreamAttempt,
    UnaryAttempt,
    close_items,
    describe,
    record_verdict,
    run_timed,
)
from router.routing.balancer import Replica
from router.routing.config import RoutingConfig
from router.routing.retry import Verdict, attempt_timeout, classify, hedge_delay, may_retry
from router.routing.state import (
    CallState,
    DeploymentHealth,
    DeploymentState,
    NoReplicaAvailable,
    ReplicaHealth,
    deadline_error,
    exhausted_error,
)
from router.routing.topology import BreakerListener, Clock, Topology

__all__ = [
    "AttemptInfo",
    "DeploymentHealth",
    "Dispatcher",
    "NoReplicaAvailable",
    "ReplicaHealth",
    "StreamAttempt",
    "UnaryAttempt",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
FailureListener = Callable[[AttemptInfo, str], None]
FirstItemListener = Callable[[AttemptInfo, float], None]
"""Told each streamed attempt's seconds from its start to its first item (its TTFT)."""


class _Miss(enum.Enum):
    MISS = 0


_MISS = _Miss.MISS


class Dispatcher(Topology):
    """A topology that runs calls: unary (optionally hedged) and streamed, each over the
    deployment's fallback chain."""

    def __init__(
        self,
        config: RoutingConfig,
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        on_breaker_change: BreakerListener | None = None,
        on_attempt_failed: FailureListener | None = None,
        on_first_item: FirstItemListener | None = None,
    ) -> None:
        """`config` must be validated. `clock` drives breakers, budgets and deadlines (attempts
        are still timed by the event loop); `on_breaker_change(name, old, new)` sees every
        breaker transition, name being 'deployment/replica'; `on_attempt_failed(info, reason)`
        every failed attempt that the call moved on from (retried, or handed to a fallback)."""
        super().__init__(config, rng=rng, clock=clock, on_breaker_change=on_breaker_change)
        self._on_attempt_failed = on_attempt_failed
        self._on_first_item = on_first_item

    # ---- unary ---------------------------------------------------------------------------

    async def unary(
        self,
        name: str,
        attempt: UnaryAttempt[T],
        *,
        task: str = "",
        key: str | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> T:
        """The first successful answer of `attempt` on a replica of `name`'s deployment chain.

        `key`: affinity key (conversation id or prompt prefix), also the split key of an alias;
        `timeout_s`: the caller's time left (gRPC's context.time_remaining()); `request_id`: for
        log lines. Raises the attempt's own error when the request
        is at fault (INVALID_ARGUMENT ...), DeadlineExceeded, NoReplicaAvailable, or
        Unavailable naming the deployment and what failed.
        """
        call = CallState(request_id, key, timeout_s, self._clock())
        first = self.resolve(name, task=task, key=key)
        for deployment_name in self._chains[first]:
            answer = await self._unary_in(self._deployments[deployment_name], attempt, call)
            if answer is not _MISS:
                return answer
        raise self._exhausted(first, call)

    async def _unary_in(
        self, deployment: DeploymentState, attempt: UnaryAttempt[T], call: CallState
    ) -> T | _Miss:
        """The answer from this deployment, or _MISS when it cannot give one: attempts one after
        the other, each on a replica not tried yet, awaited inline (no task per call)."""
        if call.attempts == 0:
            deployment.budget.on_request()
        if deployment.config.hedging.enabled:
            return await self._hedged(deployment, attempt, call)
        tried: set[Replica] = set()
        for _ in range(deployment.config.retry.max_attempts):
            started = self._start(deployment, call, tried)
            if started is None:
                return _MISS
            try:
                if started.info.timeout_s is None:  # no timer to set: a few µs saved per call
                    answer = await attempt(started.info)
                else:
                    answer = await run_timed(attempt, started.info, started.blame)
            except asyncio.CancelledError:
                started.finish(None, cancelled=True)
                raise
            except Exception as error:
                if started.finish(error) is Verdict.CALLER_ERROR:
                    raise
                self._failed(call, started.info, error)
                continue
            started.finish(None)
            return answer
        return _MISS

    async def _hedged(
        self, deployment: DeploymentState, attempt: UnaryAttempt[T], call: CallState
    ) -> T | _Miss:
        """As _unary_in, with attempts as tasks so that a slow one can race a hedge.

        While no attempt is in flight, start one (the first, or a retry after a failure); while
        one is, wait for it, up to the hedge delay when a hedge may be sent, then send the hedge.
        The first success wins and the others are cancelled (a cancelled attempt leaves its
        breaker alone).
        """
        policy = deployment.config
        max_attempts = policy.retry.max_attempts
        pending: dict[asyncio.Task[T], Attempt] = {}
        tried: set[Replica] = set()
        attempts = hedges = 0
        try:
            while True:
                if not pending:
                    if attempts >= max_attempts:
                        return _MISS
                    if not self._launch(deployment, attempt, call, tried, pending):
                        return _MISS
                    attempts += 1
                delay = hedge_delay(policy.hedging, unary=True, hedges_sent=hedges)
                left = self._left(call)
                hedge_due = (
                    delay is not None and attempts < max_attempts and (left is None or delay < left)
                )
                wait = delay if hedge_due else left
                finished, _ = await asyncio.wait(
                    pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not finished:
                    if not hedge_due:
                        raise self._deadline(call)
                    hedges += 1  # the hedge's moment has come, whether one can be sent or not
                    if self._launch(deployment, attempt, call, tried, pending):
                        attempts += 1
                    continue
                answers: list[T] = []
                errors: list[BaseException] = []
                for task in finished:
                    started = pending.pop(task)
                    error = task.exception()
                    if error is None:
                        answers.append(task.result())
                    elif classify(error) is Verdict.CALLER_ERROR:
                        errors.append(error)
                    else:
                        self._failed(call, started.info, error)
                if answers:
                    return answers[0]
                if errors:
                    raise errors[0]
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                for task in pending:
                    if not task.cancelled():
                        task.exception()  # retrieved: a finished loser is not an error

    def _launch(
        self,
        deployment: DeploymentState,
        attempt: UnaryAttempt[T],
        call: CallState,
        tried: set[Replica],
        pending: dict[asyncio.Task[T], Attempt],
    ) -> bool:
        """Start one unary attempt as a task; False when no replica or no budget is left."""
        started = self._start(deployment, call, tried)
        if started is None:
            return False
        task = asyncio.ensure_future(run_timed(attempt, started.info, started.blame))
        # The done callback gives back the probe slot and outstanding count taken by _start,
        # even when the task is cancelled before it ever ran.
        task.add_done_callback(started.settle)
        pending[task] = started
        return True

    # ---- streams -------------------------------------------------------------------------

    async def stream(
        self,
        name: str,
        attempt: StreamAttempt[T],
        *,
        task: str = "",
        key: str | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> AsyncGenerator[T, None]:
        """The items of `attempt` on a replica of `name`'s deployment chain.

        An attempt that fails, or sends nothing within the per-attempt timeout, is retried on
        another replica (then the fallbacks). Once an item has been yielded the call is bound to
        its replica: a later failure reaches the caller, as Unavailable naming the replica
        unless it already is a RouterError. Streams are never hedged.
        """
        call = CallState(request_id, key, timeout_s, self._clock())
        first = self.resolve(name, task=task, key=key)
        for deployment_name in self._chains[first]:
            deployment = self._deployments[deployment_name]
            if call.attempts == 0:
                deployment.budget.on_request()
            tried: set[Replica] = set()
            for _ in range(deployment.config.retry.max_attempts):
                started = self._start(deployment, call, tried)
                if started is None:
                    break
                replica, ticket, info = started.replica, started.ticket, started.info
                timeout = info.timeout_s
                streamed = 0
                opened = self._clock()
                items: AsyncIterator[T] | None = None
                try:
                    while True:
                        # Until the first item the attempt has its own timeout; after it, only
                        # the caller's deadline is left.
                        limit = timeout if streamed == 0 else self._left(call)
                        try:
                            if items is None:  # inside the try: opening may fail too
                                items = attempt(info)
                            if limit is None:
                                item = await anext(items)
                            else:
                                async with asyncio.timeout(limit):
                                    item = await anext(items)
                        except StopAsyncIteration:
                            if streamed == 0:  # an empty answer is an answer
                                replica.breaker.on_success(ticket)
                            return
                        except asyncio.CancelledError:
                            replica.breaker.on_abandon(ticket)
                            raise
                        except Exception as error:
                            if isinstance(error, TimeoutError) and self._expired(call):
                                replica.breaker.on_abandon(ticket)
                                raise self._deadline(call) from None
                            if record_verdict(replica, ticket, error) is Verdict.CALLER_ERROR:
                                raise
                            if may_retry(streamed):
                                self._failed(call, info, error)
                                break  # to the next attempt
                            if isinstance(error, RouterError) and not isinstance(
                                error, Unavailable
                            ):
                                raise
                            # Tell the client that part of the answer had already arrived.
                            raise Unavailable(
                                f"deployment {info.deployment!r} replica {replica.name!r} failed "
                                f"after {streamed} streamed item(s): {describe(error)}"
                            ) from error
                        if streamed == 0:
                            # The replica answered: that is its breaker's verdict. A later
                            # failure is recorded as well, so a replica that dies mid-stream
                            # still trips its breaker.
                            replica.breaker.on_success(ticket)
                            if self._on_first_item is not None:
                                self._on_first_item(info, self._clock() - opened)
                        streamed += 1
                        yield item
                finally:
                    replica.outstanding -= 1
                    if items is not None:
                        await close_items(items)
        raise self._exhausted(first, call)

    # ---- helpers ---------------------------------------------------------------------------

    def _start(
        self, deployment: DeploymentState, call: CallState, tried: set[Replica]
    ) -> Attempt | None:
        """Everything before an attempt runs: the deadline check, the retry budget (for any
        attempt after a call's first), the replica, its probe slot and outstanding count. None
        when the deployment has no replica or no budget left."""
        timeout, blame = self._attempt_timeout(deployment, call)
        if call.attempts > 0 and not self._spend(deployment, call):
            return None
        replica = self._pick(deployment, call, tried)
        if replica is None:
            return None
        ticket = replica.breaker.on_start()
        replica.outstanding += 1
        return Attempt(replica, ticket, self._info(deployment, replica, call, timeout), blame)

    def _pick(
        self, deployment: DeploymentState, call: CallState, tried: set[Replica]
    ) -> Replica | None:
        replica = deployment.balancer.pick(call.key, tried)
        if replica is None:
            what = "untried replica" if tried else "replica"
            call.failures.append(f"deployment {deployment.config.name!r} has no {what} available")
        else:
            tried.add(replica)
            call.attempts += 1
        return replica

    def _info(
        self, deployment: DeploymentState, replica: Replica, call: CallState, timeout: float | None
    ) -> AttemptInfo:
        config = deployment.config
        return AttemptInfo(config.name, config.model_name, replica.config, call.attempts, timeout)

    def _failed(self, call: CallState, info: AttemptInfo, error: BaseException) -> None:
        """Note a failed attempt that will be retried elsewhere (or end the call)."""
        if isinstance(error, TimeoutError):
            reason = f"nothing within {info.timeout_s or 0:.3g}s"
        else:
            reason = describe(error)
        call.failures.append(f"{info.replica.name}: {reason}")
        if self._on_attempt_failed is not None:
            self._on_attempt_failed(info, reason)
        logger.info(
            "request %s: attempt %d on %s/%s failed: %s",
            call.request_id,
            info.attempt,
            info.deployment,
            info.replica.name,
            reason,
        )

    def _expired(self, call: CallState) -> bool:
        left = self._left(call)
        return left is not None and left <= 0

    def _spend(self, deployment: DeploymentState, call: CallState) -> bool:
        if deployment.budget.try_spend():
            return True
        call.failures.append(f"retry budget of deployment {deployment.config.name!r} is spent")
        return False

    def _left(self, call: CallState) -> float | None:
        return None if call.deadline is None else call.deadline - self._clock()

    def _attempt_timeout(
        self, deployment: DeploymentState, call: CallState
    ) -> tuple[float | None, bool]:
        """(seconds the attempt may run, whether running out is the replica's fault)."""
        per_attempt = deployment.config.retry.attempt_timeout_s
        left = self._left(call)
        timeout = attempt_timeout(self._clock(), call.deadline, per_attempt)
        if timeout is not None and timeout <= 0:
            raise self._deadline(call)
        return timeout, per_attempt > 0 and (left is None or per_attempt < left)

    def _deadline(self, call: CallState) -> DeadlineExceeded:
        return deadline_error(call)

    def _exhausted(self, first: str, call: CallState) -> Unavailable:
        chain = self._chains[first]
        return exhausted_error(first, chain, [self._deployments[n] for n in chain], call)
