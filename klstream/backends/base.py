"""What every Model 2 backend shares: where it is (:class:`Endpoint`), what it is asked and
answers, and the three capabilities a backend may offer.

- :class:`Prefill` generates with logprobs after a prefill: the prompt, then Model 1's tokens so
  far as the model's own turn. Every way of scoring by request uses it.
- :class:`PromptScoring` scores a prompt's own tokens (vLLM's prompt logprobs): one request
  gives Model 2's top-k at every position of a response.
- :class:`BatchJobs` submits the prefill requests as batch jobs, owning its line format.

A backend (:class:`Backend`, registered in :mod:`klstream.backends`) says which of them it
offers by the factories it fills in. Its calls raise the typed faults of
:mod:`klstream.errors` (:class:`~klstream.errors.TransientFault`,
:class:`~klstream.errors.ConnectFailed`, ...) or a run-ending
:class:`~klstream.errors.EndpointError`, never their SDK's errors, so the transport
(:mod:`klstream.backends.transport`) retries and throttles every backend alike.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Final, Literal, Protocol
from urllib.parse import quote, quote_plus

from klstream.backends.prices import Usage

SECRET_RUN = 8
"""Characters of the key in a row that :meth:`Endpoint.redact` masks wherever they appear."""
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
PLACEHOLDER_KEY = "no-key-needed-for-this-server"
"""What the backends send as the key to local servers that need none: nothing to hide."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach Model 2. ``api_key`` is a secret: it is never printed or saved."""

    backend: str
    """A registered backend's name (:data:`klstream.backends.BACKENDS`)."""
    api_key: str | None = None
    project: str | None = None
    location: str = "global"
    base_url: str | None = None
    timeout_s: float = 60.0
    default_url: str | None = None
    """The service's own address, for messages when no ``base_url`` is given."""
    dialect: str = "auto"
    """How the server is asked for prompt logprobs, where a backend knows several ways (its
    ``BackendSpec.dialects``); ``auto``: the backend finds out."""

    def __repr__(self) -> str:
        key = "set" if self.api_key else "unset"
        return (
            f"Endpoint(backend={self.backend!r}, api_key={key}, project={self.project!r}, "
            f"location={self.location!r}, base_url={self.base_url!r}, dialect={self.dialect!r})"
        )

    @property
    def url(self) -> str:
        """Where requests go, for messages: the base URL, or the service's default address."""
        return self.base_url or self.default_url or f"the {self.backend} service"

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


@dataclass(frozen=True)
class Where:
    """Where a backend's service is, as the user gave it: the rest (keys, projects) comes from
    the environment (:func:`klstream.backends.endpoint_from_environment`)."""

    project_id: str | None = None
    location: str = "global"
    base_url: str | None = None
    timeout_s: float = 60.0
    dialect: str = "auto"


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
    dropped: int = 0
    """Entries of the service's list for this step that carried no usable logprob (a sentinel,
    NaN, ±inf, a positive value, null) and are left out of ``top``."""


@dataclass(frozen=True)
class Answer:
    """The answer's steps (thinking excluded), its text and its token usage."""

    steps: list[Generated]
    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)
    served_model: str | None = None
    """The model the service says answered (``modelVersion``, or ``model``), if it says."""


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
    token_ids: bool = False
    """Model 1's tokens carry ids: a server that can name its tokens by id (vLLM's
    ``return_tokens_as_token_ids``) is asked to, so both sides are matched by id. Such a token's
    text is then the server's name for it (``token_id:1234``)."""


AUTO_THINKING: Final = "auto"
ThinkingBudget = int | None | Literal["auto"]
"""What a run is asked to send as the thinking budget: a number of tokens, None (no thinking
config), or ``"auto"`` (:mod:`klstream.backends.thinking` finds one)."""


@dataclass(frozen=True)
class ClientSettings:
    """How a run talks to one model: the settings every request of it shares."""

    model: str
    max_concurrent: int = 16
    thinking_budget: int | None = 0
    """Gemini's thinking budget (None: no thinking config); servers without thinking ignore it."""
    find_thinking_budget: bool = False
    """Find the budget instead (:mod:`klstream.backends.thinking`): 0 where the model takes it,
    else the smallest it accepts, else no thinking config. Backends never see it set: the
    registry's :func:`~klstream.backends.open_prefill` hands them the budget to try."""

    @classmethod
    def of(cls, model: str, max_concurrent: int, thinking: ThinkingBudget) -> ClientSettings:
        """The settings for a thinking budget as a run is asked for it (``"auto"`` included)."""
        if thinking == AUTO_THINKING:
            return cls(model, max_concurrent, 0, find_thinking_budget=True)
        return cls(model, max_concurrent, thinking)


@dataclass(frozen=True)
class Tokenized:
    """A tokenizer's answer: the token ids, and the server's context length if it says."""

    tokens: list[int]
    max_model_len: int | None


@dataclass(frozen=True)
class PromptToken:
    """What prompt logprobs say at one prompt token: the token itself (its text as the server
    decodes it, its logprob) and Model 2's top-k for that place given the tokens before it."""

    token: Candidate
    top: list[Candidate]
    dropped: int = 0
    """Entries of the server's list here without a usable logprob, left out of ``top`` (as
    :attr:`Generated.dropped`)."""


@dataclass(frozen=True)
class PromptScores:
    """One prompt-logprobs answer: the prompt tokens from the first asked for on, and the top-k
    for the token after the whole prompt (the one generated), or None if the server gave none."""

    tokens: list[PromptToken]
    after: list[Candidate] | None
    usage: Usage = field(default_factory=Usage)
    after_dropped: int = 0
    """Entries of ``after``'s list without a usable logprob, left out of it."""
    served_model: str | None = None
    """The model the server says answered, as :attr:`Answer.served_model`."""


class Prefill(Protocol):
    """Generate with logprobs: the capability every request-per-position method needs."""

    async def generate(self, request: PrefillRequest) -> Answer: ...


class PromptScoring(Protocol):
    """Score a prompt's own tokens: Model 2's top-k at every token of a prompt given the ones
    before it, from one request (vLLM's ``prompt_logprobs``, or another server's dialect)."""

    @property
    def dialect(self) -> str | None:
        """The way the server is asked (one of its backend's ``BackendSpec.dialects``) once
        known, for ``run.json``; None where a backend has one way only."""
        ...

    async def template_tokens(self, prompt: str) -> Tokenized:
        """The chat template's tokens for ``prompt``, up to where the answer starts."""
        ...

    async def text_tokens(self, text: str) -> Tokenized:
        """``text``'s tokens as they would continue a prompt (no special tokens added)."""
        ...

    async def prompt_logprobs(
        self, prompt_ids: list[int], top_logprobs: int, start: int
    ) -> PromptScores:
        """Model 2's top-k at every prompt token from ``start`` on, and after the last."""
        ...


@dataclass(frozen=True)
class RemoteJob:
    """A batch job as the service last described it."""

    name: str
    display_name: str | None
    state: str
    """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``CANCELLED``, ``EXPIRED``, ...: the
    service's state without any ``JOB_STATE_`` prefix."""
    error: str | None
    output: str | None
    """Where the results are: a file name, or a storage directory."""
    succeeded: int | None = None
    failed: int | None = None
    incomplete: int | None = None
    """The service's own completion counts, where it gives them."""
    run_ms: float = 0.0
    """From creation to end (or to now), by the service's clock."""

    @property
    def ended(self) -> bool:
        return self.state in END_STATES


END_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED", "PARTIALLY_SUCCEEDED"})
"""Job states after which a job does nothing more."""


@dataclass(frozen=True)
class BatchLine:
    """One line of a job's output, decoded: the key it carries back (or, where the service
    echoes the request instead, the line's index in its job) and its answer or error."""

    key: str | None
    index: int | None
    answer: Answer | None
    error: str | None


class BatchJobs(Protocol):
    """Submit prefill requests as batch jobs. Only operations that are safe to repeat are
    retried inside; a create whose outcome is unknown raises
    :class:`~klstream.errors.BatchCreateUnknown` and is resolved with :meth:`find`."""

    service: str
    """Which service holds the jobs: a resumed run must find them there."""
    regional: bool
    """Whether jobs live in one region, so that a resumed run must name the same location."""
    max_requests: int
    """Requests per job: bounds each job's output download and what one failed job costs."""
    max_bytes: int
    """Input bytes per job, under the service's file limit."""

    def encode_line(self, key: str, index: int, request: PrefillRequest) -> bytes:
        """The ``index``-th input line of a job (a JSON line ending in a newline)."""
        ...

    def decode_line(self, raw: bytes) -> BatchLine:
        """One output line, whatever it holds (a malformed line is an error, not a raise)."""
        ...

    def remote_names(self, job_id: str, display_name: str) -> tuple[str, str | None]:
        """Where a job's input goes and its output comes, chosen before anything is sent."""
        ...

    async def prepare(self) -> None:
        """Whatever must exist before the first upload (a bucket)."""
        ...

    async def upload(self, local: Path, remote_input: str, display_name: str) -> None:
        """Put ``local`` at ``remote_input`` unless an identical upload is already there."""
        ...

    async def create(
        self, display_name: str, remote_input: str, remote_output: str | None
    ) -> RemoteJob: ...

    async def find(self, display_name: str) -> RemoteJob | None:
        """The job created under ``display_name``, if any: how a lost create is resolved."""
        ...

    async def get(self, name: str) -> RemoteJob | None:
        """The job now, or None when the service no longer knows it."""
        ...

    async def cancel(self, name: str) -> None: ...

    async def download(self, job: RemoteJob, remote_output: str | None, into: Path) -> bool:
        """Write the job's output lines into ``into``; False when it has none."""
        ...

    async def remove(
        self, remote_input: str, job: RemoteJob | None, remote_output: str | None
    ) -> None:
        """Delete the uploaded input and the job's output, where they exist."""
        ...


OpenPrefill = Callable[[Endpoint, ClientSettings], AbstractAsyncContextManager[Prefill]]
OpenPromptScoring = Callable[[Endpoint, ClientSettings], AbstractAsyncContextManager[PromptScoring]]
MakeBatchJobs = Callable[[Endpoint, ClientSettings, str | None], BatchJobs]
"""A backend's batch jobs for an endpoint, the model's settings and a storage bucket (where the
service keeps files in one)."""


@dataclass(frozen=True)
class Backend:
    """One backend: how to find its service, and the capabilities it offers (None: not
    offered). Registered by name in :data:`klstream.backends.BACKENDS`."""

    name: str
    endpoint: Callable[[Where], Endpoint]
    """The endpoint from the user's options and the environment (keys, projects)."""
    prefill: OpenPrefill | None = None
    prompt_scoring: OpenPromptScoring | None = None
    batch_jobs: MakeBatchJobs | None = None
