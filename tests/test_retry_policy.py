"""The retry wait is what the server asks for (RetryInfo, Retry-After, carried by the backend's
fault as ``retry_after``), and backs off otherwise."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import tenacity
from google.genai import errors as genai_errors

from klstream.backends.gemini import api_fault
from klstream.backends.transport import SERVER_DELAY_JITTER, RetryPolicy
from klstream.errors import CallFault


def state_after(error: BaseException, attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    outcome = tenacity.Future(attempt)
    outcome.set_exception(error)
    state.outcome = outcome
    return state


def rate_limited(details: list[dict[str, Any]], headers: dict[str, str] | None = None) -> CallFault:
    """The fault the Gemini backend raises for a 429 with these details and headers."""
    body = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "slow down",
            "details": details,
        }
    }
    return api_fault(genai_errors.ClientError(429, body, SimpleNamespace(headers=headers or {})), 0)


RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def test_wait_is_never_shorter_than_the_retry_info_delay() -> None:
    wait = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05).wait()
    info = [{"@type": RETRY_INFO, "retryDelay": "7.5s"}]
    assert wait(state_after(rate_limited(info), attempt=1)) >= 7.5


def test_wait_honours_retry_after_when_there_is_no_retry_info() -> None:
    wait = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05).wait()
    assert wait(state_after(rate_limited([], {"Retry-After": "3"}), attempt=1)) >= 3.0


def test_a_server_given_delay_is_not_outgrown_by_the_back_off() -> None:
    """Late retries of a 429 wait what the server said, not a back-off grown past it."""
    wait = RetryPolicy(backoff_initial_s=1.0, backoff_max_s=60.0).wait()
    info = [{"@type": RETRY_INFO, "retryDelay": "1.5s"}]
    for attempt in (1, 4, 8, 12):
        waited = wait(state_after(rate_limited(info), attempt))
        assert 1.5 <= waited <= 1.5 * (1 + SERVER_DELAY_JITTER)


def test_wait_backs_off_exponentially_with_jitter_up_to_the_cap() -> None:
    wait = RetryPolicy(backoff_initial_s=1.0, backoff_max_s=8.0).wait()
    timeout = TimeoutError()
    first, third = wait(state_after(timeout, 1)), wait(state_after(timeout, 3))
    assert 1.0 <= first <= 2.0
    assert 4.0 <= third <= 5.0
    assert wait(state_after(timeout, 30)) <= 8.0
