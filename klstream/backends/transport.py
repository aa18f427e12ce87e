"""One Model 2 call with klstream's retry policy and adaptive concurrency, shared by every stage
and every backend.

Backends raise typed faults (:mod:`klstream.errors`), and this module acts on their type alone:
tenacity retries a :class:`~klstream.errors.TransientFault` (408/429/5xx, time-outs, dropped
connections, malformed bodies, answers without logprobs) after the delay the server asks for
(its ``retry_after``, with a little jitter) when it gives one, else backing off exponentially
with jitter. A :class:`~klstream.errors.RequestRejected` is not retried: the position is
recorded as failed. A :class:`~klstream.errors.ConnectFailed` (refused, unknown host, TLS) is
tried twice more, then ends the run (:class:`~klstream.errors.EndpointUnreachable`); an
:class:`~klstream.errors.EndpointError` ends it at once. An
:class:`~klstream.errors.Overloaded` answer (429, 503) feeds the adaptive concurrency
(:mod:`klstream.backends.throttle`).

A *probe* call (the first requests of a run, before anything has succeeded) spends a short,
bounded budget instead of the full one: a broken endpoint is told apart in well under a minute,
not after each position's full retries.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import tenacity

from klstream.backends import checks
from klstream.backends.base import Answer, Endpoint, Prefill, PrefillRequest
from klstream.backends.throttle import AdaptiveLimiter
from klstream.errors import (
    TIMED_OUT,
    CallFault,
    ConnectFailed,
    EndpointUnreachable,
    KlstreamError,
    Overloaded,
    RateLimited,
    TransientFault,
)

T = TypeVar("T")

UNREACHABLE_RETRIES = 2
"""Retries of a connection that cannot be established at all, before the run stops."""
SERVER_DELAY_JITTER = 0.2
"""A retry the server timed waits up to this fraction longer, so that the many requests it
turned away at once do not all come back at the same instant."""


@dataclass
class CallStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    concurrency_cuts: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a request.

    Back-offs without a server-given delay are capped low (``backoff_max_s``) and retries are
    many: the adaptive concurrency, not each request's back-off, keeps a run off an overloaded
    server, and in a storm of random rejections a long cap only makes the unlucky last positions
    wait (a 50% 503 storm took 12x a clean run's time with a 60 s cap, 4x with 5 s;
    ``bench/storm_bench.py``).
    """

    max_retries: int = 12
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 5.0
    probe_attempts: int = 6
    """Attempts at most per probe request (never more than ``max_retries + 1``)."""
    probe_budget_s: float = 30.0
    """Time the probe requests of a run may take together before the run stops."""

    def wait(self) -> Callable[[tenacity.RetryCallState], float]:
        """The delay before a retry: what the server asked for (the fault's ``retry_after``),
        when it says, else exponential back-off with jitter up to ``backoff_max_s``."""
        backoff = tenacity.wait_exponential_jitter(
            initial=self.backoff_initial_s, max=self.backoff_max_s
        )

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = error.retry_after if isinstance(error, TransientFault) else None
            if asked is not None:
                return asked * (1.0 + SERVER_DELAY_JITTER * random.random())
            return backoff(state)

        return wait


@dataclass(frozen=True)
class Retried(Generic[T]):
    """A retried operation's end: its value, or the error text of its last attempt."""

    value: T | None
    error: str | None
    attempts: int
    latency_ms: float


Outcome = Retried[Answer]
"""A generation's end: its answer, or why there is none."""


def describe(fault: BaseException) -> str:
    """The error column's text for a fault that ended a call."""
    if isinstance(fault, TimeoutError):
        return TIMED_OUT
    return str(fault)


class Caller:
    """Makes calls to one endpoint, counting them in ``stats`` and throttling them to at most
    ``max_concurrent`` in flight (fewer while the server turns requests away)."""

    def __init__(
        self, endpoint: Endpoint, policy: RetryPolicy, max_concurrent: int, stats: CallStats
    ) -> None:
        self.endpoint, self.policy, self.stats = endpoint, policy, stats
        self.limiter = AdaptiveLimiter(ceiling=max_concurrent)

    async def _attempt(self, operation: Callable[[], Awaitable[T]], timeout_s: float | None) -> T:
        await self.limiter.acquire()
        try:
            self.stats.requests += 1
            async with asyncio.timeout(timeout_s):
                result = await operation()
        except Overloaded as turned_away:
            if isinstance(turned_away, RateLimited):
                self.stats.rate_limited += 1
            self.limiter.on_rejected()
            self.stats.concurrency_cuts = self.limiter.decreases
            raise
        finally:
            self.limiter.release()
        self.limiter.on_success()
        return result

    @staticmethod
    def _should_retry(state: tenacity.RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, ConnectFailed):
            return state.attempt_number <= UNREACHABLE_RETRIES
        return isinstance(error, TransientFault | TimeoutError)

    def _count_retry(self, _: tenacity.RetryCallState) -> None:
        self.stats.retries += 1

    def _probe_stop(self, deadline: float) -> Callable[[tenacity.RetryCallState], bool]:
        """A probe stops after a few attempts or at the deadline; a 429 says the endpoint works
        and is only busy, so it keeps the ordinary budget."""
        ordinary = tenacity.stop_after_attempt(self.policy.max_retries + 1)

        def stop(state: tenacity.RetryCallState) -> bool:
            if ordinary(state):
                return True
            error = state.outcome.exception() if state.outcome else None
            if error is None or isinstance(error, RateLimited):
                return False
            return (
                state.attempt_number >= self.policy.probe_attempts or time.monotonic() >= deadline
            )

        return stop

    async def retried(
        self, operation: Callable[[], Awaitable[T]], probe_deadline: float | None = None
    ) -> Retried[T]:
        """Run ``operation`` (one request) until it succeeds or the retry budget is spent;
        run-ending errors propagate.

        With a ``probe_deadline`` (a :func:`time.monotonic` instant) the call is a probe: at most
        ``probe_attempts`` attempts (429s aside) until the deadline, none outlasting half the
        probe budget.
        """
        started = time.monotonic()
        endpoint, policy = self.endpoint, self.policy
        timeout_s: float | None = None
        stop: Callable[[tenacity.RetryCallState], bool]
        if probe_deadline is None:
            stop = tenacity.stop_after_attempt(policy.max_retries + 1)
        else:
            stop = self._probe_stop(probe_deadline)
            timeout_s = min(endpoint.timeout_s, policy.probe_budget_s / 2)
        retrying = tenacity.AsyncRetrying(
            stop=stop,
            wait=policy.wait(),
            retry=self._should_retry,
            before_sleep=self._count_retry,
            reraise=True,
        )
        value: T | None = None
        error: str | None = None
        try:
            value = await retrying(self._attempt, operation, timeout_s)
        except KlstreamError as fatal:
            # Run-ending errors quote the server; the key must not reach the user's terminal.
            fatal.args = (endpoint.redact(str(fatal)),)
            raise fatal from None
        except ConnectFailed as unreachable:
            raise EndpointUnreachable(
                endpoint.redact(f"cannot reach {endpoint.url}: {unreachable}")
            ) from None
        except (CallFault, TimeoutError) as failure:
            error = endpoint.redact(describe(failure))
        attempts = int(retrying.statistics.get("attempt_number", 1))
        return Retried(value, error, attempts, (time.monotonic() - started) * 1000)

    async def generate(
        self, prefill: Prefill, request: PrefillRequest, probe_deadline: float | None = None
    ) -> Outcome:
        """One generation request, retried (see :meth:`retried`) until its answer is what was
        asked for (:mod:`klstream.backends.checks`)."""

        async def as_asked() -> Answer:
            return checks.as_asked(request, await prefill.generate(request))

        return await self.retried(as_asked, probe_deadline)
