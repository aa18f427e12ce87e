"""Finding a thinking budget the model accepts (``--thinking-budget auto``).

Scoring wants Model 2's plain next-token distribution, so thinking is best off (budget 0). Some
models cannot switch it off — Gemini 2.5 Pro answers a budget of 0 with "Budget 0 is invalid.
This model only works in thinking mode." — and for them the smallest budget they accept costs
least and changes the distribution least. The search sends the run's first request with a budget
of 0; when the service refuses it, the minimum the refusal names (where it names one), else the
documented minimum of the model's family (:data:`FAMILY_MINIMUMS`), else the documented minimums
of every family, smallest first; when the service asks for no thinking config, or every budget
is refused, the request goes without one. The first accepted budget is kept for the whole run
and described by :class:`ThinkingChoice` (for ``run.json``). Each try is a real request, so an
accepted first try costs nothing extra, and the search ends after a handful.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from klstream.backends.base import Answer, ClientSettings, Prefill, PrefillRequest
from klstream.errors import ThinkingNotDisabled, ThinkingRejected

THINKING_DOC = "https://ai.google.dev/gemini-api/docs/thinking, as of 2026-12-07"


@dataclass(frozen=True)
class FamilyMinimum:
    """The smallest thinking budget a model family accepts, where it cannot think less."""

    family: str
    """A model name; names that extend it with a dash belong to the family."""
    budget: int
    source: str


FAMILY_MINIMUMS = (
    FamilyMinimum(
        "gemini-2.5-pro", 128, f"{THINKING_DOC}: 128 to 32768, thinking cannot be turned off"
    ),
    FamilyMinimum(
        "gemini-2.5-flash-lite", 512, f"{THINKING_DOC}: 512 to 24576, or 0 to turn thinking off"
    ),
)
"""Documented minimum budgets. Gemini 2.5 Flash takes 0 to 24576; Gemini 3 models take thinking
levels and, in practice, the legacy budget, with no documented minimum."""
DOCUMENTED_MINIMUMS = tuple(sorted({entry.budget for entry in FAMILY_MINIMUMS}))
"""What the search tries, smallest first, for a model outside :data:`FAMILY_MINIMUMS`."""

_NAMED_MINIMUM = re.compile(
    r"(?:\brange(?: of)?|\bbetween|\bfrom|\bminimum(?: budget)?(?: is| of)?|\bat least)"
    r"\s*\[?\s*(\d+)",
    re.IGNORECASE,
)
_NO_CONFIG = re.compile(
    r"remove 'thinking_config|thinking is not (?:supported|enabled)|does not support thinking",
    re.IGNORECASE,
)
"""Refusals that ask for no thinking config at all (Vertex's "Thinking can't be disabled for
this model. Remove 'thinking_config.thinking_budget' from your request")."""


@dataclass(frozen=True)
class Refusal:
    """A budget the service refused (None: no thinking config), in its own words."""

    budget: int | None
    reply: str


@dataclass(frozen=True)
class ThinkingChoice:
    """What the search settled on: the budget every request of the run sends (None: no
    thinking config), why, and what the service refused before it."""

    budget: int | None
    reason: str
    refused: tuple[Refusal, ...] = ()

    def recorded(self) -> dict[str, Any]:
        """The choice as ``run.json`` keeps it."""
        return {**asdict(self), "refused": [asdict(refusal) for refusal in self.refused]}


def family_minimum(model: str) -> FamilyMinimum | None:
    """The documented minimum of ``model``'s family: the longest family name it is or extends."""
    name = model.rsplit("/", 1)[-1]
    matches = [e for e in FAMILY_MINIMUMS if name == e.family or name.startswith(f"{e.family}-")]
    return max(matches, key=lambda e: len(e.family), default=None)


def next_budget(model: str, refusal: Refusal) -> tuple[int | None, str] | None:
    """The budget to try after ``refusal``, and why; None when nothing is left to try."""
    sent = refusal.budget
    if sent is None:
        return None
    if _NO_CONFIG.search(refusal.reply):
        return None, f"the service refused a budget of {sent} and asked for no thinking config"
    named = [int(n) for n in _NAMED_MINIMUM.findall(refusal.reply) if int(n) > sent]
    if named:
        return min(named), f"the service's refusal of {sent} names {min(named)} as the least"
    family = family_minimum(model)
    if family is not None and family.budget > sent:
        return family.budget, f"{family.family}'s documented minimum; {family.source}"
    for budget in DOCUMENTED_MINIMUMS:
        if budget > sent:
            return budget, (
                f"the smallest documented minimum of a Gemini family above {sent}; {THINKING_DOC}"
            )
    return None, "every documented minimum was refused: no thinking config"


class ThinkingSearch:
    """A :class:`~klstream.backends.base.Prefill` that finds the budget with the run's first
    requests, then sends every request with it. ``choice`` is None until a budget is found."""

    def __init__(
        self, open_with: Callable[[int | None], AbstractAsyncContextManager[Prefill]], model: str
    ) -> None:
        self._open_with, self.model = open_with, model
        self.choice: ThinkingChoice | None = None
        self._budget: int | None = 0
        self._reason = "the model accepts 0: thinking off"
        self._refused: list[Refusal] = []
        self._failure: ThinkingRejected | None = None
        self._lock = asyncio.Lock()
        self._stack = AsyncExitStack()
        self._current: Prefill | None = None
        self._found: Prefill | None = None

    async def generate(self, request: PrefillRequest) -> Answer:
        while self._found is None:
            async with self._lock:
                if self._found is None:
                    return await self._search(request)
        return await self._generate(self._found, request)

    async def _generate(self, prefill: Prefill, request: PrefillRequest) -> Answer:
        try:
            return await prefill.generate(request)
        except ThinkingNotDisabled as thinking:
            raise ThinkingNotDisabled(
                f"{thinking} (the budget the search found: {self._reason})",
                thinking.thinking_budget,
                searched=True,
            ) from None

    async def _search(self, request: PrefillRequest) -> Answer:
        """Answer ``request`` with the budget being tried, moving on while it is refused.
        Faults other than a refusal leave the search where it is, for the next call."""
        while self._failure is None:
            if self._current is None:
                self._current = await self._stack.enter_async_context(self._open_with(self._budget))
            try:
                answer = await self._generate(self._current, request)
            except ThinkingRejected as refused:
                await self._refuse(Refusal(self._budget, refused.reply))
                continue
            self._found = self._current
            self.choice = ThinkingChoice(self._budget, self._reason, tuple(self._refused))
            return answer
        raise self._failure

    async def _refuse(self, refusal: Refusal) -> None:
        """Close the refused client and move on to the next budget, or give up."""
        self._refused.append(refusal)
        await self._stack.aclose()
        self._stack, self._current = AsyncExitStack(), None
        step = next_budget(self.model, refusal)
        if step is None:
            tried = "; ".join(
                f"{'no thinking config' if r.budget is None else r.budget}: {r.reply}"
                for r in self._refused
            )
            self._failure = ThinkingRejected(
                f"{self.model} accepts no thinking configuration klstream can send (tried {tried})",
                refusal.budget,
                refusal.reply,
                searched=True,
            )
            return
        self._budget, self._reason = step

    async def open(self) -> None:
        """Open the client of the first budget now, so that no request's time goes to it."""
        self._current = await self._stack.enter_async_context(self._open_with(self._budget))

    async def aclose(self) -> None:
        await self._stack.aclose()


@asynccontextmanager
async def searching(
    open_with: Callable[[int | None], AbstractAsyncContextManager[Prefill]], model: str
) -> AsyncIterator[ThinkingSearch]:
    """A :class:`ThinkingSearch` whose clients (one per budget tried) close on exit."""
    search = ThinkingSearch(open_with, model)
    try:
        await search.open()
        yield search
    finally:
        await search.aclose()


def thinking_choice(prefill: Prefill) -> ThinkingChoice | None:
    """The budget a searching prefill found (None before its first answer, and for a run that
    was given its budget)."""
    return prefill.choice if isinstance(prefill, ThinkingSearch) else None


def sent_budget(prefill: Prefill, settings: ClientSettings) -> int | None:
    """The thinking budget ``prefill``'s requests send: the one its search found, else the
    settings' (``auto`` sends 0 until its search says otherwise)."""
    choice = thinking_choice(prefill)
    return choice.budget if choice is not None else settings.thinking_budget
