"""What the Google services' error answers mean for a run, whatever client read them.

The Gemini backends (:mod:`klstream.backends.gemini`) read them from google-genai's errors, the
in-process toy backend (:mod:`klstream.backends.toy`) from the emulator's, which speaks the same
protocol: both hand a :class:`ServiceError` to :func:`status_fault`, so a status means the same
fault on every path. The texts matched are the services' own (sources and dates in the README,
"Gemini as of 2026-12-07").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from klstream.backends.prices import price_for, shipped_prices
from klstream.errors import (
    AuthenticationError,
    CallFault,
    LogprobsUnavailable,
    ModelNotFound,
    Overloaded,
    PrefillRejected,
    RateLimited,
    RequestRejected,
    ThinkingRejected,
    TransientFault,
)

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
SERVICES = {"gemini": "the Gemini Developer API", "vertex": "Vertex AI"}
_LOGPROBS_OFF = re.compile(r"logprobs is not (?:enabled|supported)", re.IGNORECASE)
"""How both services say a model gives no logprobs: the Developer API "Logprobs is not enabled
for models/<id>" (also "... for this model", and "Logprobs is not supported for the current
model."), Vertex AI "Unable to submit request because Logprobs is not supported for this model"."""
_PREFILL_REJECTED = re.compile(r"model turn|prefill|last turn|ending with", re.IGNORECASE)
_THINKING_REJECTED = re.compile(r"thinking|budget", re.IGNORECASE)


@dataclass(frozen=True)
class ServiceError:
    """An error answer: its status code and name, the service's message, the one-line text of
    the error column, and the wait the service asked for."""

    code: int
    status: str | None
    message: str
    text: str
    retry_after: float | None = None


def status_fault(
    error: ServiceError, thinking_budget: int | None, model: str = "", backend: str = "gemini"
) -> CallFault:
    """The fault an error answer stands for; raises an :class:`~klstream.errors.EndpointError`
    when no request can succeed (bad key, unknown model, no logprobs, no prefill, thinking config
    refused)."""
    code, message, text = error.code, error.message, error.text
    if code == 429:
        return RateLimited(text, error.retry_after)
    if code == 503:
        return Overloaded(text, error.retry_after)
    if code in RETRIED_STATUS:
        return TransientFault(text, error.retry_after)
    if code == 400 and _LOGPROBS_OFF.search(message):
        raise LogprobsUnavailable(no_logprobs_message(backend, model, text), backend, model)
    if code == 400 and _PREFILL_REJECTED.search(message):
        raise PrefillRejected(
            f"the model rejects a trailing model turn ({code}: {message}). Scoring needs "
            "prefill: the prompt, then Model 1's tokens so far as the model's own turn. "
            "Choose a Model 2 that accepts it."
        )
    if code == 400 and thinking_budget is not None and _THINKING_REJECTED.search(message):
        raise ThinkingRejected(
            f"the model rejects a thinking budget of {thinking_budget} ({code}: {message})",
            thinking_budget,
            message,
        )
    if code in (401, 403):
        what = "authentication failed" if code == 401 else "permission denied"
        raise AuthenticationError(
            f"{what} ({code} {error.status}: {message}); no request can succeed"
        )
    if code == 404:
        raise ModelNotFound(
            f"model or endpoint not found ({code} {error.status}: {message}); "
            f"no request can succeed{retired_note(model)}"
        )
    return RequestRejected(text)


def no_logprobs_message(backend: str, model: str, reply: str) -> str:
    """Why a model whose service gives no logprobs cannot be Model 2, and what can."""
    instead = [
        "another model family",
        "an open-weight model on a vLLM server, scored from its prompt logprobs",
    ]
    if not (backend == "vertex" and model.removeprefix("models/").startswith("gemini-2.5")):
        instead.insert(0, "a Gemini 2.5 model on Vertex AI, where projects still got logprobs")
    return (
        f"{SERVICES.get(backend, backend)} returns no logprobs for {model or 'this model'} "
        f"({reply}): Google has switched them off for it, and scoring needs Model 2's top-k "
        f"logprobs. What works instead (as of 2026-12): {'; '.join(instead)}"
    )


def retired_note(model: str) -> str:
    """``; <model> was retired on <date>`` where the shipped price table knows it was."""
    price = price_for(model, shipped_prices()) if model else None
    if price is None or price.retired is None:
        return ""
    return f"; {price.model} was retired on {price.retired} (klstream's price table)"
