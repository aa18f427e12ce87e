"""The open-weight servers the emulator plays, each under its own path prefix, and how their
routes are registered (described in :mod:`klstream.emulator.openai_routes` and
:mod:`klstream.emulator.native_routes`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from klstream.emulator.faults import FaultState
from klstream.emulator.native_routes import NativeRoutes
from klstream.emulator.openai_routes import Flavour, OpenAIRoutes, RecordRequest

SERVERS = (
    Flavour(),
    Flavour("/sglang", prompt_logprobs=False, token_ids=False),
    Flavour("/legacy", prompt_logprobs=False, token_ids=False),
)
"""vLLM at the root; SGLang's and a legacy completions server's OpenAI routes (SGLang's
``/generate`` and TGI's are :class:`~klstream.emulator.native_routes.NativeRoutes`)."""


def register_servers(
    app: web.Application,
    state: Callable[[], FaultState],
    sleep: Callable[[float], Awaitable[None]],
    record: RecordRequest,
) -> None:
    """Every open-weight server's routes, sharing the emulator's faults, sleep and log."""
    for flavour in SERVERS:
        OpenAIRoutes(state, sleep, record, flavour).register(app)
    NativeRoutes(state, sleep, record).register(app)
