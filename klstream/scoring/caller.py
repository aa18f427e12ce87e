"""One Gemini call with klstream's retry policy and adaptive concurrency, shared by every stage.

tenacity retries 408/429/5xx, time-outs, dropped connections, malformed bodies and answers without
logprobs: after the delay the server asks for (RetryInfo's retryDelay or Retry-After, with a little
jitter) when it gives one, else backing off exponentially with jitter. 400/401/403/404 are not
retried. An endpoint that cannot be reached at all (connection refused, unknown host, TLS failure)
is tried twice more, then ends the run (:class:`~klstream.errors.EndpointUnreachable`). 429s and
503s feed the adaptive concurrency (:mod:`klstream.scoring.throttle`).

A *probe* call (the first requests of a run, before anything has succeeded) spends a short,
bounded budget instead of the full one: a broken endpoint is told apart in well under a minute,
not after each position's full retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import tenacity
from google.genai import errors as genai_errors
from google.genai import types

from klstream.backends.gemini import (
    TRANSIENT_ERRORS,
    Answer,
    Endpoint,
    classify_api_error,
    describe,
    is_rate_limit,
    make_client,
    parse_answer,
    server_retry_delay,
)
from klstream.errors import EndpointUnreachable, KlstreamError
from klstream.scoring.throttle import AdaptiveLimiter


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


OVERLOAD_STATUS = frozenset({429, 503})
"""Answers saying the server is over its quota or its capacity: they feed the adaptive
concurrency."""
UNREACHABLE_RETRIES = 2
"""Retries of a connection that cannot be established at all, before the run stops."""
SERVER_DELAY_JITTER = 0.2
"""A retry the server timed waits up to this fraction longer, so that the many requests it
turned away at once do not all come back at the same instant."""


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
        """The delay before a retry: what the server asked for, when it says, else exponential
        back-off with jitter up to ``backoff_max_s``."""
        backoff = tenacity.wait_exponential_jitter(
            initial=self.backoff_initial_s, max=self.backoff_max_s
        )

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = server_retry_delay(error) if error else None
            if asked is not None:
                return asked * (1.0 + SERVER_DELAY_JITTER * random.random())
            return backoff(state)

        return wait


@dataclass(frozen=True)
class Outcome:
    """A call's end: an answer, or the error text of its last attempt."""

    answer: Answer | None
    error: str | None
    attempts: int
    latency_ms: float


class Caller:
    """Makes calls for one model through one client, counting and throttling them."""

    def __init__(
        self,
        client: Any,
        model: str,
        endpoint: Endpoint,
        policy: RetryPolicy,
        limiter: AdaptiveLimiter,
        thinking_budget: int | None,
        stats: CallStats,
    ) -> None:
        self.client, self.model, self.endpoint = client, model, endpoint
        self.policy, self.limiter, self.stats = policy, limiter, stats
        self.thinking_budget = thinking_budget

    async def _attempt(
        self,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfig,
        timeout_s: float | None,
    ) -> Answer:
        await self.limiter.acquire()
        try:
            self.stats.requests += 1
            async with asyncio.timeout(timeout_s):
                response = await self.client.aio.models.generate_content(
                    model=self.model, contents=contents, config=config
                )
        except genai_errors.APIError as error:
            if is_rate_limit(error):
                self.stats.rate_limited += 1
            if error.code in OVERLOAD_STATUS:
                self.limiter.on_rejected()
                self.stats.concurrency_cuts = self.limiter.decreases
            raise
        finally:
            self.limiter.release()
        answer = parse_answer(response, self.thinking_budget)
        self.limiter.on_success()
        return answer

    def _should_retry(self, state: tenacity.RetryCallState) -> bool:
        """Raises for errors that end the run (see :func:`classify_api_error`)."""
        error = state.outcome.exception() if state.outcome else None
        if error is None:
            return False
        if isinstance(error, genai_errors.APIError):
            return classify_api_error(error, self.thinking_budget) == "retry"
        if isinstance(error, aiohttp.ClientConnectorError):
            return state.attempt_number <= UNREACHABLE_RETRIES
        return isinstance(error, TRANSIENT_ERRORS)

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
            if error is None or is_rate_limit(error):
                return False
            return (
                state.attempt_number >= self.policy.probe_attempts or time.monotonic() >= deadline
            )

        return stop

    async def call(
        self,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfig,
        probe_deadline: float | None = None,
    ) -> Outcome:
        """Retry until an answer or the retry budget is spent; run-ending errors propagate.

        With a ``probe_deadline`` (a :func:`time.monotonic` instant) the call is a probe: at most
        ``probe_attempts`` attempts (429s aside) until the deadline, none outlasting half the
        probe budget.
        """
        started = time.monotonic()
        policy = self.policy
        timeout_s: float | None = None
        stop: Callable[[tenacity.RetryCallState], bool]
        if probe_deadline is None:
            stop = tenacity.stop_after_attempt(policy.max_retries + 1)
        else:
            stop = self._probe_stop(probe_deadline)
            timeout_s = min(self.endpoint.timeout_s, policy.probe_budget_s / 2)
        retrying = tenacity.AsyncRetrying(
            stop=stop,
            wait=policy.wait(),
            retry=self._should_retry,
            before_sleep=self._count_retry,
            reraise=True,
        )
        answer: Answer | None = None
        error: str | None = None
        try:
            answer = await retrying(self._attempt, contents, config, timeout_s)
        except aiohttp.ClientConnectorError as failure:
            raise EndpointUnreachable(
                self.endpoint.redact(f"cannot reach {self.endpoint.url}: {unreachable(failure)}")
            ) from None
        except TRANSIENT_ERRORS + (genai_errors.APIError,) as failure:
            error = self.endpoint.redact(describe(failure))
        except KlstreamError as fatal:
            # Run-ending errors quote the server; the key must not reach the user's terminal.
            fatal.args = (self.endpoint.redact(str(fatal)),)
            raise fatal from None
        attempts = int(retrying.statistics.get("attempt_number", 1))
        return Outcome(answer, error, attempts, (time.monotonic() - started) * 1000)


def unreachable(error: aiohttp.ClientConnectorError) -> str:
    """Why no connection could be made, in words: refused, unknown host, TLS, ..."""
    os_error = error.os_error
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate not accepted ({error.certificate_error})"
    if isinstance(error, aiohttp.ClientSSLError):
        return f"TLS handshake failed ({os_error})"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {error.host} ({os_error.strerror or os_error})"
    # asyncio words a refusal "Connect call failed (...)"; the errno says what happened.
    cause = os.strerror(os_error.errno) if os_error.errno else str(os_error)
    return f"{cause.lower()} ({error.host}:{error.port})"


@contextlib.asynccontextmanager
async def open_caller(
    endpoint: Endpoint,
    model: str,
    policy: RetryPolicy,
    max_concurrent: int,
    thinking_budget: int | None,
    stats: CallStats,
) -> AsyncIterator[Caller]:
    """A :class:`Caller` over one HTTP session whose connection pool matches the concurrency.

    With Vertex the SDK keeps its own session, which carries the Google auth.
    """
    connector = aiohttp.TCPConnector(limit=max_concurrent, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = make_client(endpoint, session if endpoint.backend == "gemini" else None)
        yield Caller(
            client,
            model,
            endpoint,
            policy,
            AdaptiveLimiter(ceiling=max_concurrent),
            thinking_budget,
            stats,
        )
