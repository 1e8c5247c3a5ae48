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

from router.errors import DeadlineExceeded, InvalidArgument, NotFound, RouterError, Unavailable
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
from router.routing.balancer import Replica, WeightedSplit, make_balancer
from router.routing.breaker import BreakerState, CircuitBreaker
from router.routing.config import RoutingConfig
from router.routing.retry import (
    RetryBudget,
    Verdict,
    attempt_timeout,
    classify,
    fallback_chain,
    hedge_delay,
    may_retry,
)
from router.routing.state import (
    CallState,
    DeploymentHealth,
    DeploymentState,
    NoReplicaAvailable,
    ReplicaHealth,
    deadline_error,
    exhausted_error,
)

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
Clock = Callable[[], float]
BreakerListener = Callable[[str, BreakerState, BreakerState], None]
FailureListener = Callable[[AttemptInfo, str], None]


class _Miss(enum.Enum):
    MISS = 0


_MISS = _Miss.MISS


class Dispatcher:
    def __init__(
        self,
        config: RoutingConfig,
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        on_breaker_change: BreakerListener | None = None,
        on_attempt_failed: FailureListener | None = None,
    ) -> None:
        """`config` must be validated. `clock` drives breakers, budgets and deadlines (attempts
        are still timed by the event loop); `on_breaker_change(name, old, new)` sees every
        breaker transition, name being 'deployment/replica'; `on_attempt_failed(info, reason)`
        every failed attempt that the call moved on from (retried, or handed to a fallback)."""
        self._rng = rng or random.Random()
        self._clock = clock
        self._on_breaker_change = on_breaker_change
        self._on_attempt_failed = on_attempt_failed
        self._deployments: dict[str, DeploymentState] = {}
        self._splits: dict[str, WeightedSplit] = {}
        self._tasks: dict[str, str] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self.reconfigure(config)

    def reconfigure(self, config: RoutingConfig) -> None:
        """Take a new routing config (a deployment scaled or added). A replica that keeps its
        deployment and name keeps its rotation state (`healthy`); one that also keeps its
        settings keeps its breaker and outstanding count, a deployment that
        keeps its retry settings keeps its budget; calls in flight finish where they are. The
        config must be validated."""
        old_replicas = {
            (r.deployment, r.name): r for d in self._deployments.values() for r in d.replicas
        }
        deployments: dict[str, DeploymentState] = {}
        for dc in config.deployments:
            replicas = []
            for rc in dc.replicas:
                old = old_replicas.get((dc.name, rc.name))
                if old is not None and old.config == rc and old.breaker.config == dc.breaker:
                    replica = old  # the same object: attempts in flight give back to it
                else:
                    breaker = CircuitBreaker(
                        dc.breaker,
                        name=f"{dc.name}/{rc.name}",
                        clock=self._clock,
                        on_change=self._on_breaker_change,
                    )
                    replica = Replica(rc, dc.name, breaker)
                    if old is not None:
                        replica.healthy = old.healthy  # health checks judged the same engine
                replicas.append(replica)
            previous = self._deployments.get(dc.name)
            budget = (
                previous.budget
                if previous is not None and previous.config.retry == dc.retry
                else RetryBudget(dc.retry, clock=self._clock)
            )
            balancer = make_balancer(dc.balancer, replicas, self._rng)
            deployments[dc.name] = DeploymentState(dc, tuple(replicas), balancer, budget)
        self._deployments = deployments
        self._splits = {alias: WeightedSplit(w) for alias, w in config.aliases.items()}
        self._tasks = dict(config.tasks)
        graph = {d.name: d.fallbacks for d in config.deployments}
        self._chains = {name: fallback_chain(graph, name) for name in graph}

    # ---- names ---------------------------------------------------------------------------

    def knows(self, name: str) -> bool:
        """Whether `name` is a deployment or an alias of this dispatcher."""
        return name in self._deployments or name in self._splits

    def resolve(self, name: str = "", *, task: str = "", key: str | None = None) -> str:
        """The deployment a call goes to first: `name` (alias or deployment) or, when empty, the
        route of `task`. An alias splits by weight: by `key` when given (a caller stays on one
        side of an A/B test), at random otherwise."""
        target = name
        if not target:
            if not task:
                raise InvalidArgument("set a model, or a task to route by", field="model")
            routed = self._tasks.get(task)
            if routed is None:
                raise NotFound(f"task {task!r} has no route; tasks routed: {sorted(self._tasks)}")
            target = routed
        split = self._splits.get(target)
        if split is not None:
            return split.pick_for_key(key) if key is not None else split.pick(self._rng)
        if target in self._deployments:
            return target
        known = sorted([*self._deployments, *self._splits])
        raise NotFound(f"model {target!r} is neither a deployment nor an alias; known: {known}")

    def replica(self, deployment: str, name: str) -> Replica:
        """The run-time state of one replica (KeyError when unknown)."""
        for replica in self._deployments[deployment].replicas:
            if replica.name == name:
                return replica
        raise KeyError(f"{deployment}/{name}")

    def set_healthy(self, deployment: str, name: str, healthy: bool) -> bool:
        """Take a replica out of rotation or put it back; True when that changed something."""
        replica = self.replica(deployment, name)
        changed = replica.healthy != healthy
        replica.healthy = healthy
        return changed

    def chain(self, deployment: str) -> tuple[str, ...]:
        """The deployment then its fallbacks, in the order they are tried."""
        return self._chains[deployment]

    def health(self) -> dict[str, DeploymentHealth]:
        """Breaker state and load of every replica, for health checks, metrics and ListModels."""
        out = {}
        for name, deployment in self._deployments.items():
            replicas = tuple(
                ReplicaHealth(r.name, r.outstanding, r.breaker.snapshot(), r.healthy)
                for r in deployment.replicas
            )
            serving = any(r.healthy and r.breaker.allow() for r in deployment.replicas)
            out[name] = DeploymentHealth(serving, replicas)
        return out

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
