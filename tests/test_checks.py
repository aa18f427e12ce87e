"""What counts as an answer to what was asked (klstream.backends.checks)."""

from __future__ import annotations

import math

import pytest

from klstream.backends.base import Answer, Candidate, Generated, PrefillRequest
from klstream.backends.checks import as_asked, list_problem, usable_logprob
from klstream.errors import UnusableAnswer


def listed(*probabilities: float) -> list[Candidate]:
    return [Candidate(f"t{i}", i, math.log(p)) for i, p in enumerate(probabilities)]


def answer(*steps: list[Candidate]) -> Answer:
    return Answer([Generated(top[0], top) for top in steps], "", "MAX_TOKENS")


def test_a_short_list_is_a_result_only_when_it_is_the_whole_distribution() -> None:
    assert list_problem(listed(0.7, 0.2, 0.1), 20) is None
    assert list_problem(listed(0.7, 0.2, 0.0999), 20) is not None
    assert list_problem(listed(0.5, 0.5), 2) is None


def test_a_token_named_twice_is_not_a_list() -> None:
    twice = [Candidate("a", 1, -0.5), Candidate("b", 2, -1.5), Candidate("a2", 1, -2.0)]
    assert "twice" in (list_problem(twice, 3) or "")
    by_text = [Candidate("x", None, -0.5), Candidate("x", None, -1.0)]
    assert "twice" in (list_problem(by_text, 2) or "")


def test_lists_are_cut_to_the_k_asked_and_extra_steps_refused() -> None:
    request = PrefillRequest("p", "", top_logprobs=2, max_tokens=1)
    kept = as_asked(request, answer(listed(0.6, 0.3, 0.1)))
    assert [c.token for c in kept.steps[0].top] == ["t0", "t1"]
    with pytest.raises(UnusableAnswer, match="2 steps where 1 were asked"):
        as_asked(request, answer(listed(0.6, 0.4), listed(0.6, 0.4)))
    with pytest.raises(UnusableAnswer, match="step 0: the top-k list has 1 usable entries"):
        as_asked(request, answer(listed(0.6)))


@pytest.mark.parametrize(
    ("value", "usable"),
    [
        (-0.5, True),
        (0.0, True),
        (-9998.0, True),
        (-9999.0, False),
        (-1.2676506e30, False),
        (float("nan"), False),
        (float("-inf"), False),
        (0.01, False),
        (None, False),
        (True, False),
    ],
)
def test_usable_logprobs(value: object, usable: bool) -> None:
    assert usable_logprob(value) is usable
