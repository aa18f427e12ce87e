"""What an answer must be to be stored as a result: exactly what was asked.

Backends leave out of a step's top-k the entries without a usable logprob (:func:`usable_logprob`:
a sentinel such as Gemini's -1.27e30, NaN, ±inf, a positive value, null) and count them. What is
left must then be the list that was asked for: ``top_logprobs`` entries, no token twice, and no
more steps than the request asked for. A list shorter than asked is still a result when it
holds the whole distribution — its probabilities add up to one, as when a tokenizer gives fewer
than k tokens any probability — and is a fault otherwise: an answer that is not what was asked
is retried like any transient fault (:class:`~klstream.errors.UnusableAnswer`) and, if it
persists, recorded as the position's failure with the reason, never as a value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from klstream.backends.base import Answer, Candidate, Generated, PrefillRequest
from klstream.errors import UnusableAnswer

LOWEST_LOGPROB = -9999.0
"""At or below this a logprob is a stand-in for "impossible", not a measurement: servers write
-9999 (vLLM, OpenAI) or a float's most negative value (Gemini's -2**100, SGLang's -3.4e38)
there."""
WHOLE_DISTRIBUTION = 1.0 - 1e-5
"""Probability a shorter list must hold to be the whole distribution: one, but for the rounding
of reported logprobs (float32, under 1e-6 over 20 entries). A list cut short by the service
holds less; where the part it left out is below this, it changes no estimate measurably."""
JITTER_NATS = 0.1
"""Largest deviation (:func:`deviation`, nats) between two answers for the same context that
still counts as the service's call-to-call jitter."""
COMPARED_TOP = 5
"""How many of a reference list's most likely tokens :func:`deviation` compares."""


def usable_logprob(value: object) -> bool:
    """Whether ``value`` is a logprob a distribution can be built from."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and LOWEST_LOGPROB < value <= 0.0
    )


def list_problem(top: list[Candidate], asked: int) -> str | None:
    """Why a top-k list is not what was asked for, or None when it is."""
    keys = [c.token_id if c.token_id is not None else c.token for c in top]
    if len(set(keys)) < len(keys):
        repeated = next(c.token for c, key in zip(top, keys, strict=True) if keys.count(key) > 1)
        return f"the top-k list names the token {repeated!r} twice"
    if len(top) < asked and sum(math.exp(c.logprob) for c in top) < WHOLE_DISTRIBUTION:
        return (
            f"the top-k list has {len(top)} usable entries where {asked} were asked, and they "
            "do not make up the whole distribution"
        )
    return None


def trimmed(step: Generated, asked: int) -> Generated:
    """``step`` with its list cut to the ``asked`` most likely entries (a service may add the
    chosen token to the k it was asked for)."""
    if len(step.top) <= asked:
        return step
    top = sorted(step.top, key=lambda c: -c.logprob)[:asked]
    return Generated(step.chosen, top, step.chosen_reported, step.dropped)


def as_asked(request: PrefillRequest, answer: Answer) -> Answer:
    """``answer`` with every list cut to the top-k asked for; raises
    :class:`~klstream.errors.UnusableAnswer` saying why when it is not what was asked."""
    if len(answer.steps) > request.max_tokens:
        raise UnusableAnswer(
            f"the answer has {len(answer.steps)} steps where {request.max_tokens} were asked"
        )
    steps = [trimmed(step, request.top_logprobs) for step in answer.steps]
    for index, step in enumerate(steps):
        problem = list_problem(step.top, request.top_logprobs)
        if problem is not None:
            raise UnusableAnswer(f"step {index}: {problem}")
    return Answer(steps, answer.text, answer.finish_reason, answer.usage, answer.served_model)


def served_elsewhere(served: str | None, asked: str) -> bool:
    """Whether the model the service says answered (``model``, ``model@fingerprint``) is not the
    one asked for: neither its name nor a numbered version of it (``gemini-2.5-flash-001`` for
    ``gemini-2.5-flash``, not ``gemini-2.5-flash-lite``); the ``models/`` prefix aside. The
    ``served_elsewhere`` SQL macro says the same."""
    if served is None:
        return False
    name = served.split("@", 1)[0].removeprefix("models/")
    wanted = asked.removeprefix("models/")
    suffix = name.removeprefix(f"{wanted}-")
    is_version = suffix != name and suffix.isascii() and suffix.isdigit()
    return name != wanted and not is_version


def same_token(text: str, token_id: int | None, other_text: str, other_id: int | None) -> bool:
    """Two tokens are the same: by id when both carry one, else by exact text."""
    if token_id is not None and other_id is not None:
        return token_id == other_id
    return text == other_text


def deviation(probe: Sequence[Candidate], reference: Sequence[Candidate]) -> float:
    """Largest |logprob difference| over the reference's :data:`COMPARED_TOP` most likely
    tokens; infinite when one of them is missing from ``probe``. Two answers for the same
    context (a greedy step and a one-token request, a prefill and the step it continues) agree
    when it is within :data:`JITTER_NATS`."""
    worst = 0.0
    for wanted in sorted(reference, key=lambda c: -c.logprob)[:COMPARED_TOP]:
        found = [
            c.logprob
            for c in probe
            if same_token(c.token, c.token_id, wanted.token, wanted.token_id)
        ]
        if not found:
            return math.inf
        worst = max(worst, abs(found[0] - wanted.logprob))
    return worst
