"""Lookahead planning without a server: which steps of an answer are results, how responses are
cut into chains, what ``auto`` asks for, how the greedy probe compares, and what the answer
parser keeps of thinking and of answers that report less than they generate."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from google.genai import types
from hypothesis import given
from hypothesis import strategies as st

from klstream.backends import checks
from klstream.backends.base import Candidate
from klstream.backends.gemini import parse_answer
from klstream.scoring import lookahead
from klstream.scoring.lookahead import Acceptance, Token, accept

WORDS = [Token(" the", 5), Token(" cat", 9), Token(" sat", 12), Token(".", 3), Token("\n", 1)]


def texts(*pieces: str) -> list[Token]:
    """Tokens without ids, compared by text."""
    return [Token(piece, None) for piece in pieces]


# --- which steps are results -----------------------------------------------------------------


def test_step_0_is_always_a_result_and_later_steps_follow_matching_tokens() -> None:
    model1 = WORDS
    # The answer generated " the", " cat", " dog": steps 0-2 are results, step 3 is not.
    generated = [WORDS[0], WORDS[1], Token(" dog", 44), WORDS[3]]
    assert accept(4, generated, model1, 0, 4) == Acceptance(3, 2, True)
    # A mismatch at once still leaves step 0.
    assert accept(4, [Token(" a", 7)], model1, 0, 4) == Acceptance(1, 0, True)


def test_ids_decide_when_both_sides_have_them_text_otherwise() -> None:
    model1 = [Token(" the", 5), Token(" cat", 9)]
    assert accept(2, [Token(" the", 6)], model1, 0, 2).steps == 1  # same text, other id
    assert accept(2, [Token("THE", 5)], model1, 0, 2).steps == 2  # same id
    assert accept(2, [Token(" the", None)], model1, 0, 2).steps == 2  # no id: text
    assert accept(2, [Token(" the", 5)], texts(" the", " cat"), 0, 2).steps == 2


def test_the_last_position_and_the_limit_bound_the_steps() -> None:
    # At the last position only step 0 is a result, however many steps the answer has.
    assert accept(8, WORDS, WORDS, len(WORDS) - 1, 8) == Acceptance(1, 0, False)
    # The limit (positions left in the segment) cuts a run that would go on.
    assert accept(8, WORDS, WORDS, 0, 3) == Acceptance(3, 2, False)
    assert accept(8, WORDS[1:], WORDS, 1, 8).steps == len(WORDS) - 1


def test_an_answer_that_stops_before_n_gives_the_steps_it_has() -> None:
    # STOP (or MAX_TOKENS) after 2 steps of the 8 asked for: both are results when the first
    # generated token was Model 1's.
    assert accept(2, WORDS[:2], WORDS, 0, 8) == Acceptance(2, 1, False)
    # The emulator's end-of-sequence step (empty text) differs from any token of Model 1.
    assert accept(3, [WORDS[0], Token("", 0)], WORDS, 0, 8) == Acceptance(2, 1, True)


def test_a_token_that_splits_or_spans_model1_tokens_ends_the_run() -> None:
    model1 = texts(" light", "house", " keeper")
    assert accept(3, texts(" li", "ght"), model1, 0, 3).steps == 1  # a prefix of " light"
    assert accept(3, texts(" lighthouse"), model1, 0, 3).steps == 1  # spans two tokens
    # Partial UTF-8: Model 1's tokens hold the halves of "é" as replacement characters.
    halves = texts(" caf", "\ufffd", "\ufffd", " au")
    assert accept(3, texts(" caf", "é"), halves, 0, 3).steps == 2


def test_a_step_after_an_unreported_chosen_token_is_not_a_result() -> None:
    assert accept(4, [WORDS[0], None, WORDS[2]], WORDS, 0, 4) == Acceptance(2, 1, False)
    assert accept(4, [], WORDS, 0, 4) == Acceptance(1, 0, False)


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=30),
    st.lists(st.integers(0, 3), max_size=30),
    st.integers(0, 29),
    st.integers(1, 40),
)
def test_accepted_steps_are_exactly_the_matching_prefix(
    model1_ids: list[int], generated_ids: list[int], start: int, limit: int
) -> None:
    model1 = [Token(str(i), i) for i in model1_ids]
    generated = [Token(str(i), i) for i in generated_ids]
    result = accept(len(generated), generated, model1, start, limit)
    usable = min(len(generated), limit, len(model1) - start)
    if usable <= 0:
        assert result.steps == 0
        return
    assert 1 <= result.steps <= usable
    assert result.matched == result.steps - 1
    assert generated_ids[: result.steps - 1] == model1_ids[start : start + result.steps - 1]
    if result.steps < usable:
        assert (
            result.broke and generated_ids[result.steps - 1] != model1_ids[start + result.steps - 1]
        )


# --- chains --------------------------------------------------------------------------------------


@given(st.lists(st.booleans(), max_size=80), st.integers(1, 20))
def test_segments_cover_every_pending_position_once_and_nothing_else(
    pending: list[bool], cap: int
) -> None:
    pieces = lookahead.segments(pending, cap)
    covered = [p for start, end in pieces for p in range(start, end)]
    assert covered == [p for p, flag in enumerate(pending) if flag]
    assert all(0 < end - start <= cap for start, end in pieces)


def test_responses_are_cut_only_when_chains_would_leave_slots_idle() -> None:
    assert lookahead.segment_cap(10_000, 16, fixed_one=True) == 1
    assert lookahead.segment_cap(100_000, 16, fixed_one=False) == 6250
    assert lookahead.segment_cap(20, 64, fixed_one=False) == lookahead.MIN_SEGMENT


# --- the greedy probe's comparison ------------------------------------------------------------


def test_deviation_is_the_largest_difference_over_the_reference_top_tokens() -> None:
    reference = [Candidate(WORDS[i].text, WORDS[i].token_id, -0.5 * (i + 1)) for i in range(5)]
    jittered = [replace(c, logprob=c.logprob + 0.01 * i) for i, c in enumerate(reference)]
    assert checks.deviation(jittered, reference) == pytest.approx(0.04)
    assert checks.deviation(reference[:1], reference) == math.inf
    sharpened = [replace(c, logprob=2 * c.logprob) for c in reference]
    assert checks.deviation(sharpened, reference) == pytest.approx(2.5)


# --- what the parser keeps -------------------------------------------------------------------


def candidate_json(token: str, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": token, "tokenId": token_id, "logProbability": logprob}


def answer_of(body: dict[str, Any]) -> types.GenerateContentResponse:
    return types.GenerateContentResponse(
        sdk_http_response=types.HttpResponse(body=json.dumps(body))
    )


def body(
    listed: list[str], chosen: int, usage: dict[str, int], parts: list[dict[str, Any]]
) -> dict[str, Any]:
    steps = [
        {"candidates": [candidate_json(tok, i, -0.1), candidate_json("x", 99, -3.0)]}
        for i, tok in enumerate(listed)
    ]
    chosen_list = [candidate_json(tok, i, -0.1) for i, tok in enumerate(listed)][:chosen]
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": parts},
                "finishReason": "MAX_TOKENS",
                "logprobsResult": {"topCandidates": steps, "chosenCandidates": chosen_list},
            }
        ],
        "usageMetadata": usage,
    }


def test_thought_tokens_are_not_steps_and_thought_parts_not_text() -> None:
    usage = {"promptTokenCount": 9, "candidatesTokenCount": 2, "thoughtsTokenCount": 3}
    parts: list[dict[str, Any]] = [{"text": "hmm ok", "thought": True}, {"text": " the cat"}]
    answer = parse_answer(answer_of(body(["h", "mm", " ok", " the", " cat"], 5, usage, parts)), 3)
    assert [s.chosen.token for s in answer.steps] == [" the", " cat"]
    assert answer.text == " the cat"
    assert (answer.usage.prompt_tokens, answer.usage.thoughts_tokens) == (9, 3)


def test_steps_without_a_reported_chosen_token_are_marked() -> None:
    usage = {"promptTokenCount": 9, "candidatesTokenCount": 3}
    answer = parse_answer(answer_of(body([" the", " cat", " sat"], 1, usage, [])), 0)
    assert [s.chosen_reported for s in answer.steps] == [True, False, False]


def test_an_answer_with_fewer_logprob_steps_than_tokens_keeps_the_steps_it_has() -> None:
    # The text holds three tokens, the logprobs two: only two steps, both with their tokens.
    usage = {"promptTokenCount": 9, "candidatesTokenCount": 3}
    parts = [{"text": " the cat sat"}]
    answer = parse_answer(answer_of(body([" the", " cat"], 2, usage, parts)), 0)
    assert len(answer.steps) == 2
    chosen = [Token(s.chosen.token, s.chosen.token_id) for s in answer.steps]
    assert accept(len(answer.steps), chosen, texts(" the", " cat", " sat"), 0, 8).steps == 2


# --- batch rounds ------------------------------------------------------------------------------


@given(st.floats(0.0, 1.0), st.integers(1, 12), st.integers(1, 5000))
def test_batch_rounds_ask_each_position_once_at_most_and_cover_all(
    rate: float, tokens: int, positions: int
) -> None:
    """Every round's requests cover positions or leave gaps; without a round limit every
    position is covered, with no more requests than positions and no fewer than a request per
    ``tokens`` positions; tokens asked for are the positions plus what the gaps ask again."""
    rounds = lookahead.batch_rounds(rate, tokens, positions, max_rounds=10_000)
    assert rounds.uncovered < 0.5
    assert positions / tokens - 1e-6 <= rounds.requests <= positions + 1e-6
    assert rounds.output_tokens >= positions - 0.5
    assert 1 <= rounds.rounds <= tokens


def test_batch_rounds_at_the_extremes() -> None:
    """Always agreeing: one round of N-token requests. Never agreeing: one request per
    position, in N rounds. A round limit leaves the rest uncovered."""
    sure = lookahead.batch_rounds(1.0, 4, 400, 8)
    assert (sure.rounds, sure.requests, sure.output_tokens) == (1, 100.0, 400.0)
    never = lookahead.batch_rounds(0.0, 4, 400, 8)
    assert (never.rounds, never.requests, never.uncovered) == (4, 400.0, 0.0)
    cut = lookahead.batch_rounds(0.0, 4, 400, 1)
    assert (cut.rounds, cut.requests, cut.uncovered) == (1, 100.0, 300.0)
    assert lookahead.batch_lookahead("auto") == lookahead.BATCH_AUTO_LOOKAHEAD
    assert lookahead.batch_lookahead(1) == 1
