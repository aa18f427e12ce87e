"""What every Model 2 backend shares: the endpoint, the answer's shape, and the one interface
the retry policy drives (:class:`ModelClient`).

:mod:`klstream.scoring.caller` retries, throttles and counts calls without knowing the wire
format; a backend module (:mod:`klstream.backends.gemini`, :mod:`klstream.backends.openai`) turns
a :class:`PrefillRequest` into an HTTP request and its answer into an :class:`Answer`, and says
which of its errors are worth another attempt.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass, field
from itertools import groupby
from typing import Literal, Protocol
from urllib.parse import quote, quote_plus

from klstream.backends.prices import Usage

BackendName = Literal["gemini", "vertex", "openai"]
SECRET_RUN = 8
"""Characters of the key in a row that :meth:`Endpoint.redact` masks wherever they appear."""
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
PLACEHOLDER_KEY = "no-key-needed-for-this-server"
"""What the backends send as the key to local servers that need none: nothing to hide."""


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

    @property
    def url(self) -> str:
        """Where requests go, for messages: the base URL, or the service's default host."""
        if self.base_url:
            return self.base_url
        if self.backend == "vertex":
            region = "" if self.location == "global" else f"{self.location}-"
            return f"https://{region}aiplatform.googleapis.com"
        if self.backend == "openai":
            return "https://api.openai.com/v1"
        return "https://generativelanguage.googleapis.com"

    @functools.cached_property
    def _key_pieces(self) -> frozenset[str]:
        """Every ``SECRET_RUN`` characters in a row of the key, as sent or URL-encoded (a
        server may echo it encoded, or cut short), in ASCII lower case; empty when nothing is
        secret."""
        key = self.api_key
        if not key or key == PLACEHOLDER_KEY:
            return frozenset()
        every_symbol_encoded = "".join(
            char
            if char.isascii() and char.isalnum()
            else "".join(f"%{b:02X}" for b in char.encode())
            for char in key
        )
        forms = {key, quote(key), quote(key, safe=""), quote_plus(key), every_symbol_encoded}
        return frozenset(
            form[start : start + SECRET_RUN].translate(_ASCII_LOWER)
            for form in forms
            for start in range(max(len(form) - SECRET_RUN, 0) + 1)
        )

    def redact(self, text: str) -> str:
        """``text`` with every run of ``SECRET_RUN`` or more characters of the API key (whole,
        cut short or URL-encoded) replaced by ``***``, should an error message ever echo it."""
        pieces = self._key_pieces
        if not pieces:
            return text
        lowered = text.translate(_ASCII_LOWER)  # same length, unlike str.lower()
        masked = [False] * len(text)
        for width in {len(piece) for piece in pieces}:
            for start in range(len(text) - width + 1):
                if lowered[start : start + width] in pieces:
                    masked[start : start + width] = [True] * width
        runs = groupby(zip(masked, text, strict=True), key=lambda pair: pair[0])
        return "".join("***" if hidden else "".join(c for _, c in run) for hidden, run in runs)


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

    def is_overloaded(self, error: BaseException) -> bool:
        """Whether the server turned the request away for load (429 quota, 503 capacity)."""
        ...

    def unreachable(self, error: BaseException) -> str | None:
        """Why no connection could be made at all (refused, unknown host, TLS), or None."""
        ...

    def retry_delay(self, error: BaseException) -> float | None:
        """Seconds the server asked to wait before the next attempt, if it said."""
        ...

    def describe(self, error: BaseException) -> str:
        """A one-line description for the error column."""
        ...
