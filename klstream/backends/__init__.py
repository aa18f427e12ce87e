"""Model 2's backends, by name: what ``--backend`` offers and how each is loaded.

A backend is a module that defines a :class:`~klstream.backends.base.Backend` (its endpoint
resolution and the capabilities it offers), registered here by one :class:`BackendSpec` line.
Modules are imported only when their backend is used, so an SDK that is an optional extra
(the openai SDK, ``klstream[openai]``) is needed only by the backend that uses it, and
``klstream --help`` lists every backend without importing any SDK.

To add a backend: write ``klstream/backends/<name>.py`` with a ``Backend`` whose calls raise
the typed faults of :mod:`klstream.errors`, and add its ``BackendSpec`` to :data:`BACKENDS`.
The toy backend (:mod:`klstream.backends.toy`) is registered exactly this way.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from klstream.errors import BackendUnavailable, MethodUnsupported

if TYPE_CHECKING:
    from klstream.backends.base import (
        Backend,
        BatchJobs,
        ClientSettings,
        Endpoint,
        Prefill,
        PromptScoring,
    )

PREFILL = "prefill"
"""The method that asks for each position with Model 1's tokens so far as the model's own turn
(the :class:`~klstream.backends.base.Prefill` capability)."""
PROMPT_LOGPROBS = "prompt-logprobs"
"""The method that scores a whole response from one request's prompt logprobs (the
:class:`~klstream.backends.base.PromptScoring` capability)."""


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: its name, one line for ``--help``, what it can do, and where its
    module is (imported only when the backend is used)."""

    name: str
    summary: str
    module: str
    attribute: str
    """The module's :class:`~klstream.backends.base.Backend` object."""
    methods: tuple[str, ...] = (PREFILL,)
    """The online methods its capabilities serve."""
    batch: bool = False
    """Whether it runs batch jobs (the :class:`~klstream.backends.base.BatchJobs` capability)."""
    requires: str | None = None
    """The optional package the module imports, installed by the extra ``klstream[<extra>]``."""
    extra: str | None = None
    dialects: tuple[str, ...] = ()
    """The ways its servers may be asked for prompt logprobs (``--dialect``), ``auto`` (the
    backend finds out) first; empty when there is only one."""
    thinking: bool = False
    """Whether its requests carry a thinking budget (Gemini's ``thinkingConfig``): elsewhere
    the budget is not sent, and a check has nothing to find out about it."""


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "gemini",
            "the Gemini Developer API",
            "klstream.backends.google",
            "GEMINI",
            batch=True,
            thinking=True,
        ),
        BackendSpec(
            "vertex", "Vertex AI", "klstream.backends.google", "VERTEX", batch=True, thinking=True
        ),
        BackendSpec(
            "openai",
            "an OpenAI-compatible server (vLLM, SGLang, TGI; needs klstream[openai])",
            "klstream.backends.openai",
            "OPENAI",
            methods=(PREFILL, PROMPT_LOGPROBS),
            requires="openai",
            extra="openai",
            dialects=("auto", "vllm", "echo", "sglang", "tgi"),
        ),
        BackendSpec(
            "toy",
            "the emulator's toy models in this process: no server, no key",
            "klstream.backends.toy",
            "TOY",
            methods=(PREFILL, PROMPT_LOGPROBS),
            batch=True,
            thinking=True,
        ),
    )
}
"""Every backend, in the order ``--help`` lists them."""


def online_methods() -> list[str]:
    """Every online method some registered backend serves, in registration order."""
    return list(dict.fromkeys(method for spec in BACKENDS.values() for method in spec.methods))


def load_backend(name: str) -> Backend:
    """The backend registered as ``name``, importing its module."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise BackendUnavailable(
            f"no backend is called {name!r}; the backends are {', '.join(BACKENDS)}"
        )
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as error:
        if spec.requires is None or error.name != spec.requires:
            raise
        raise BackendUnavailable(
            f"the {name} backend needs the {spec.requires} package: "
            f"pip install 'klstream[{spec.extra}]'"
        ) from None
    backend: Backend = getattr(module, spec.attribute)
    return backend


def dialect_names() -> list[str]:
    """Every dialect some registered backend speaks, ``auto`` first."""
    return list(dict.fromkeys(d for spec in BACKENDS.values() for d in spec.dialects))


def endpoint_from_environment(
    backend: str,
    project_id: str | None = None,
    location: str = "global",
    base_url: str | None = None,
    timeout_s: float = 60.0,
    dialect: str = "auto",
) -> Endpoint:
    """Resolve credentials and endpoint from options and the documented environment variables."""
    spec = BACKENDS.get(backend)
    if spec is not None and dialect != "auto" and dialect not in spec.dialects:
        speakers = [name for name, s in BACKENDS.items() if dialect in s.dialects]
        raise BackendUnavailable(
            f"the {backend} backend has no dialect {dialect!r}; dialects are the ways of asking "
            f"{' or '.join(speakers) or 'no backend'}'s servers for prompt logprobs"
        )
    from klstream.backends.base import Where

    where = Where(project_id, location, base_url, timeout_s, dialect)
    return load_backend(backend).endpoint(where)


def open_prefill(
    endpoint: Endpoint, settings: ClientSettings
) -> AbstractAsyncContextManager[Prefill]:
    """The endpoint's backend generating with logprobs, with its connections, for one model;
    with ``settings.find_thinking_budget``, behind the search for a thinking budget the model
    accepts (:func:`klstream.backends.thinking.thinking_choice` says what it found)."""
    opener = load_backend(endpoint.backend).prefill
    if opener is None:
        raise MethodUnsupported(f"the {endpoint.backend} backend cannot generate with logprobs")
    if not settings.find_thinking_budget:
        return opener(endpoint, settings)
    from klstream.backends.thinking import searching

    def open_with(budget: int | None) -> AbstractAsyncContextManager[Prefill]:
        tried = replace(settings, thinking_budget=budget, find_thinking_budget=False)
        return opener(endpoint, tried)

    return searching(open_with, settings.model)


def open_prompt_scoring(
    endpoint: Endpoint, settings: ClientSettings
) -> AbstractAsyncContextManager[PromptScoring]:
    """The endpoint's backend scoring prompts' own tokens (prompt logprobs)."""
    opener = load_backend(endpoint.backend).prompt_scoring
    if opener is None:
        raise MethodUnsupported(
            f"prompt logprobs come from OpenAI-compatible servers such as vLLM, not from the "
            f"{endpoint.backend} backend"
        )
    return opener(endpoint, settings)


def batch_jobs(endpoint: Endpoint, settings: ClientSettings, bucket: str | None) -> BatchJobs:
    """The endpoint's backend submitting batch jobs."""
    make = load_backend(endpoint.backend).batch_jobs
    if make is None:
        raise MethodUnsupported(f"the {endpoint.backend} backend has no batch jobs")
    return make(endpoint, settings, bucket)
