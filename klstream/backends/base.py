"""What every Model 2 backend shares: the endpoint, the answer's shape, and the one interface
the retry policy drives (:class:`ModelClient`).

:mod:`klstream.scoring.caller` retries, throttles and counts calls without knowing the wire
format; a backend module (:mod:`klstream.backends.gemini`, :mod:`klstream.backends.openai`) turns
a :class:`PrefillRequest` into an HTTP request and its answer into an :class:`Answer`, and says
which of its errors are worth another attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from klstream.backends.prices import Usage

BackendName = Literal["gemini", "vertex", "openai"]


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach Model 2. ``api_key`` is a secret: it is never printed or saved."""

    backend: BackendName
    api_key: str | None = None
    project: str | None = None
    location: str = "global"
    base_url: str | None = None
    timeout_s: float = 60.0

    def __repr__(self) -> str:
        key = "set" if self.api_key else "unset"
        return (
            f"Endpoint(backend={self.backend!r}, api_key={key}, project={self.project!r}, "
            f"location={self.location!r}, base_url={self.base_url!r})"
        )

    def redact(self, text: str) -> str:
        """``text`` with the API key, should an error message ever echo it, masked."""
        return text.replace(self.api_key, "***") if self.api_key else text


class RetryableAnswer(Exception):
    """A 200 answer that cannot be used but may be fine next time (no logprobs, say)."""


@dataclass(frozen=True)
class Candidate:
    token: str
    token_id: int | None
    logprob: float


@dataclass(frozen=True)
class Generated:
    """One generated step: the token chosen and the top-k alternatives with logprobs.

    ``chosen_reported`` is false when the answer listed no chosen candidate for the step, so
    ``chosen`` is only the most likely alternative: a guess lookahead must not build on.
    """

    chosen: Candidate
    top: list[Candidate]
    chosen_reported: bool = True


@dataclass(frozen=True)
class Answer:
    """The answer's steps (thinking excluded), its text and its token usage."""

    steps: list[Generated]
    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class PrefillRequest:
    """One generation: the user prompt, then — when ``prefill`` is not empty — Model 1's text so
    far as the model's own turn, which the model continues."""

    prompt: str
    prefill: str
    top_logprobs: int
    max_tokens: int = 1
    temperature: float | None = None
    seed: int | None = None


class ModelClient(Protocol):
    """One model behind one backend, as :class:`klstream.scoring.caller.Caller` drives it.

    Every method about errors sees the exception an attempt raised; ``should_retry`` raises an
    :class:`~klstream.errors.EndpointError` itself when no request can ever succeed.
    """

    @property
    def endpoint(self) -> Endpoint: ...

    @property
    def failures(self) -> tuple[type[BaseException], ...]:
        """Errors that end a call as a recorded failure (after retries, if they are retried)."""
        ...

    async def generate(self, request: PrefillRequest) -> Answer: ...

    def should_retry(self, error: BaseException) -> bool: ...

    def is_rate_limit(self, error: BaseException) -> bool: ...

    def retry_delay(self, error: BaseException) -> float | None:
        """Seconds the server asked to wait before the next attempt, if it said."""
        ...

    def describe(self, error: BaseException) -> str:
        """A one-line description for the error column."""
        ...
