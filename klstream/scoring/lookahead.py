"""Speculative lookahead: which positions one request covers, and how many tokens to ask for.

A request at position i with ``maxOutputTokens`` N returns one top-k list per generated token.
Step 0 is Model 2's distribution at i given Model 1's prefix, like a one-token request. Step s is
Model 2's distribution at i + s given the prefix and the s tokens it generated, so it is Model 2's
distribution given Model 1's prefix at i + s exactly when each of those s tokens is Model 1's
token at its position: compared by token id when both sides carry one, else by exact text. A
generated token that spans or splits one of Model 1's tokens differs from it and ends the run.

Everything here is pure: the scheduler (:mod:`klstream.scoring.score`) and the dry run
(:mod:`klstream.scoring.dryrun`) call it, and the tests check it without any server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from klstream.backends import checks

CHARS_PER_TOKEN = 4.0
"""Characters per token where no tokenizer is at hand (Google's rule of thumb for English): what
input tokens are estimated from before the service has counted them."""
AUTO_MAX_LOOKAHEAD = 64
"""The longest lookahead ``auto`` considers: where the prediction expects a run of agreements
longer than this (a near pair's greedy decoding through Model 1's confident tokens), a request
cut short costs one more request; past it, such runs are too rare to matter."""
MIN_SEGMENT = 16
"""Shortest piece a response is cut into to keep every request slot busy: shorter pieces cut the
runs of accepted steps too often."""
WARM_UP_TOKENS = 16
"""Generated tokens compared before ``auto`` trusts its acceptance prediction beyond
:data:`WARM_UP_LOOKAHEAD` tokens: the first wave of requests starts before any answer has
calibrated it."""
WARM_UP_LOOKAHEAD = 8
"""The most ``auto`` asks for before :data:`WARM_UP_TOKENS` comparisons, on the prior's word: a
pair that never agrees wastes at most 7 tokens per chain of the first wave (a few hundredths of
a request each at usual prices), a near pair's first requests are seldom cut short."""
LOSING_HURDLE = 0.25
"""While a run's lookahead has cost more than one token per position would have, ``auto`` asks
for more than one token only where that is expected to save at least this share of a request:
on a pair that rarely agrees, bets whose expected gain is thin (and lost so far) stop, while the
one-token answers keep teaching the prediction and a likely long run is still taken."""
BATCH_AUTO_LOOKAHEAD = 4
"""The lookahead a batch run uses for ``auto`` without a price to weigh tokens by (with one, its
lines go where the acceptance prediction says a run breaks), and what the dry run estimates its
rounds with: a fixed N that pays off from an acceptance of about one half on."""


def batch_lookahead(setting: int | str) -> int:
    """Tokens each batch line asks for under the lookahead ``setting`` (an int, or ``auto``)."""
    return BATCH_AUTO_LOOKAHEAD if setting == "auto" else int(setting)


def estimated_input_tokens(prompt: str, position: int) -> float:
    """Input tokens of a request at ``position`` before the service has counted any: the
    prompt's characters over :data:`CHARS_PER_TOKEN`, then Model 1's tokens before the
    position, one each."""
    return len(prompt) / CHARS_PER_TOKEN + position


@dataclass(frozen=True)
class Token:
    """A token as both sides report it; ``token_id`` is None when the side carries no ids."""

    text: str
    token_id: int | None


def same_token(generated: Token, model1: Token) -> bool:
    """Equal by id when both sides have one, else by exact text."""
    return checks.same_token(generated.text, generated.token_id, model1.text, model1.token_id)


@dataclass(frozen=True)
class Acceptance:
    """What one answer contributes: ``steps`` results, after ``matched`` generated tokens equal
    to Model 1's, and whether a generated token was seen to differ (``broke``)."""

    steps: int
    matched: int
    broke: bool


def accept(
    step_count: int,
    chosen: Sequence[Token | None],
    model1: Sequence[Token],
    start: int,
    limit: int,
) -> Acceptance:
    """The steps of an answer at ``start`` that are results: step 0, then step s while every
    generated token before it is Model 1's at its position.

    ``chosen[s]`` is the token generated at step s, None where the answer did not report it (a
    step whose predecessor is unknown cannot be accepted). At most ``limit`` steps are taken
    (the positions left before the end of the response or of its segment).
    """
    usable = min(step_count, limit, len(model1) - start)
    if usable <= 0:
        return Acceptance(0, 0, False)
    steps = 1
    while steps < usable:
        generated = chosen[steps - 1] if steps - 1 < len(chosen) else None
        if generated is None:
            return Acceptance(steps, steps - 1, False)
        if not same_token(generated, model1[start + steps - 1]):
            return Acceptance(steps, steps - 1, True)
        steps += 1
    return Acceptance(steps, steps - 1, False)


def compared(chosen: Sequence[Token | None], model1: Sequence[Token], start: int) -> np.ndarray:
    """Whether each generated token of an answer at ``start`` is Model 1's at its position, up
    to the first one the answer did not report or past the response's end: what the answer
    says of acceptance there (:class:`~klstream.scoring.acceptance.AcceptanceModel`), the
    chosen token of a one-token answer included."""
    agreed: list[bool] = []
    for offset, generated in enumerate(chosen[: max(len(model1) - start, 0)]):
        if generated is None:
            break
        agreed.append(same_token(generated, model1[start + offset]))
    return np.array(agreed, dtype=bool)


def segment_cap(pending: int, slots: int, fixed_one: bool) -> int:
    """Longest piece of one response a chain of requests covers. Chains run their requests one
    after another, so no chain may hold much more than a request slot's share of the pending
    positions: with fewer responses than slots, long responses are cut into pieces that start
    independently and fill the slots; with many, a long response does not finish last alone.
    With a lookahead of 1 every position is its own chain, as every request is independent."""
    if fixed_one:
        return 1
    return max(MIN_SEGMENT, math.ceil(pending / max(slots, 1)))


CUT_WINDOW = 4
"""A piece of a response ends within the last ``1 / CUT_WINDOW`` of ``cap`` positions, after
the position whose acceptance is least likely (:func:`segments`)."""


def segments(
    pending: Sequence[bool], cap: int, accept: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """The ``[start, end)`` pieces of the runs of pending positions, each at most ``cap`` long.

    With ``accept`` (the predicted chance of acceptance at each position), a run longer than
    ``cap`` is cut after the position least likely to be accepted among the last
    ``cap / CUT_WINDOW`` a piece may reach: the run of accepted steps is likely to break there
    anyway, so the cut rarely costs a request of its own.
    """
    flags = np.asarray(pending, dtype=bool)
    if not flags.any():
        return []
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    pieces: list[tuple[int, int]] = []
    window = max(cap // CUT_WINDOW, 1)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if accept is None:
            pieces.extend((lo, min(lo + cap, end)) for lo in range(start, end, cap))
            continue
        lo = start
        while end - lo > cap:
            first = lo + cap - window
            cut = first + 1 + int(np.argmin(accept[first : lo + cap]))
            pieces.append((lo, cut))
            lo = cut
        pieces.append((lo, end))
    return pieces


@dataclass(frozen=True)
class BatchRounds:
    """What a batch run in rounds is expected to take (:func:`batch_rounds`)."""

    rounds: int
    requests: float
    output_tokens: float
    """Tokens asked for, all of them billed."""
    uncovered: float
    """Positions expected to be left after the last round allowed."""


def batch_rounds(rate: float, lookahead: int, positions: float, max_rounds: int) -> BatchRounds:
    """Rounds, requests and tokens asked for when round 1 asks for ``lookahead`` tokens at every
    ``lookahead``-th of ``positions`` positions and each later round asks, at the start of every
    gap the previous one left, for the gap's length; each generated token is Model 1's with
    probability ``rate``. A request asking for m tokens covers k < m steps with probability
    rate^(k-1) (1 - rate), all m with rate^(m-1), and leaves a gap of m - k."""
    size = max(lookahead, 1)
    kept = np.clip(rate, 0.0, 1.0) ** np.arange(size)
    moves = np.zeros((size + 1, size + 1))
    for asked in range(1, size + 1):
        covered = kept[:asked] * np.append(np.full(asked - 1, 1.0 - rate), 1.0)
        moves[asked, asked - np.arange(1, asked + 1)] = covered
    gaps = np.zeros(size + 1)
    gaps[size] = positions / size
    rounds, requests, tokens = 0, 0.0, 0.0
    asked_tokens = np.arange(size + 1, dtype=np.float64)
    while rounds < max_rounds and float(gaps @ asked_tokens) >= 0.5:
        rounds += 1
        requests += float(gaps.sum())
        tokens += float(gaps @ asked_tokens)
        gaps = gaps @ moves
        gaps[0] = 0.0
    return BatchRounds(rounds, requests, tokens, float(gaps @ asked_tokens))
