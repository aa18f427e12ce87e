"""Model 2's backends: Gemini and Vertex AI through google-genai, OpenAI-compatible servers
(vLLM, SGLang, gateways) through the openai SDK.

Each backend module is imported only when its endpoint is used, so the openai SDK — an optional
extra, ``klstream[openai]`` — is needed only with ``backend="openai"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from klstream.backends.base import BackendName, Endpoint, ModelClient
from klstream.errors import EndpointError


@contextlib.contextmanager
def _openai_sdk_needed() -> Iterator[None]:
    """Turns the openai SDK's absence, while importing the backend, into a clear error."""
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name != "openai":
            raise
        raise EndpointError(
            "the openai backend needs the openai package: pip install 'klstream[openai]'"
        ) from None


def endpoint_from_environment(
    backend: BackendName,
    project_id: str | None = None,
    location: str = "global",
    base_url: str | None = None,
    timeout_s: float = 60.0,
) -> Endpoint:
    """Resolve credentials and endpoint from options and the documented environment variables."""
    if backend == "openai":
        with _openai_sdk_needed():
            from klstream.backends.openai import openai_endpoint
        return openai_endpoint(base_url, timeout_s)
    from klstream.backends.gemini import gemini_endpoint

    return gemini_endpoint(backend, project_id, location, base_url, timeout_s)


@contextlib.asynccontextmanager
async def open_client(
    endpoint: Endpoint, model: str, max_concurrent: int, thinking_budget: int | None
) -> AsyncIterator[ModelClient]:
    """The :class:`ModelClient` of ``endpoint``'s backend, with its HTTP connections, for
    ``model``. ``thinking_budget`` is Gemini's; OpenAI-compatible servers take none."""
    if endpoint.backend == "openai":
        with _openai_sdk_needed():
            from klstream.backends.openai import open_openai_client
        async with open_openai_client(endpoint, model) as openai_client:
            yield openai_client
        return
    from klstream.backends.gemini import open_gemini_client

    async with open_gemini_client(endpoint, model, max_concurrent, thinking_budget) as client:
        yield client
