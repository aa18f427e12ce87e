"""The acceptance prediction and the lookahead it chooses, without a server: the features, the
prior, the online fit, the expected cost N minimises, the requests a plan expects, and where
responses are cut."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klstream.scoring import acceptance, lookahead
from klstream.scoring.acceptance import AcceptanceModel, best_lookahead, chain_starts, features
from klstream.scoring.lookahead import Token

chances = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12)


# --- features and the prior --------------------------------------------------------------------


def test_features_read_the_margin_as_signed_by_the_top_token_and_nan_as_zero() -> None:
    rows = features(
        np.array([-0.1, -2.0, np.nan]), np.array([1.0, 0.0, np.nan]), np.array([3.0, -1.5, 2.0])
    )
    assert rows[:, 0].tolist() == [1.0, 1.0, 1.0]
    p = np.exp(-0.1)
    assert rows[0, 1] == pytest.approx(np.log(p / (1 - p)))
    assert rows[:, 2].tolist() == [1.0, 0.0, 0.0]
    assert rows[:, 3].tolist() == [3.0, -1.5, 2.0]
    certain = features(np.array([0.0, -1e-300]), np.array([1.0, 1.0]), np.array([50.0, 1.0]))
    assert certain[:, 1].tolist() == [acceptance.CLIP, acceptance.CLIP]
    assert certain[0, 3] == acceptance.CLIP


def test_the_sampling_prior_is_model_1s_own_probability_and_greedy_its_top_token() -> None:
    logprob = np.log(np.array([0.05, 0.3, 0.7, 0.95]))
    rows = features(logprob, np.array([0, 0, 1, 1]), np.array([-1.0, -0.2, 0.5, 3.0]))
    assert AcceptanceModel("sample").predict(rows) == pytest.approx(np.exp(logprob))
    greedy = AcceptanceModel("greedy").predict(rows)
    assert greedy[:2].max() < 0.1 < 0.8 < greedy[2:].min()


# --- the online fit ----------------------------------------------------------------------------


def synthetic(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions whose acceptance follows a known logistic model."""
    rng = np.random.default_rng(seed)
    logprob = -rng.exponential(1.0, size)
    top = (rng.random(size) < np.exp(logprob)).astype(float)
    margin = np.where(top == 1, rng.exponential(1.0, size), -rng.exponential(1.0, size))
    return features(logprob, top, margin), rng.random(size)


def test_the_fit_finds_the_acceptance_the_answers_show() -> None:
    rows, draws = synthetic(6000, 1)
    truth = np.array([-1.0, 0.5, 2.0, 0.3])
    agreed = draws < 1 / (1 + np.exp(-(rows @ truth)))
    model = AcceptanceModel("sample")
    for lo in range(0, len(rows), 40):  # as answers come in
        model.observe(rows[lo : lo + 40], agreed[lo : lo + 40])
    assert model.observations == len(rows) and model.agreed == int(agreed.sum())
    assert model.weights == pytest.approx(truth, abs=0.25)


def test_a_pair_that_never_agrees_is_learned_within_a_few_dozen_comparisons() -> None:
    rows, _ = synthetic(64, 2)
    for decoding in acceptance.PRIORS:
        model = AcceptanceModel(decoding)
        model.observe(rows, np.zeros(len(rows), dtype=bool))
        assert model.predict(rows).max() < 0.15


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(0, 10_000), st.sampled_from(sorted(acceptance.PRIORS)))
def test_the_fit_never_diverges_and_never_fits_worse_than_the_prior(
    size: int, seed: int, decoding: str
) -> None:
    rows, draws = synthetic(size, seed)
    agreed = draws < np.random.default_rng(seed + 1).random()
    model = AcceptanceModel(decoding)
    model.observe(rows, agreed)

    def penalised(weights: np.ndarray) -> float:
        z = rows @ weights
        offset = weights - model.prior
        ridge = offset @ np.diag(acceptance.PRIOR_STRENGTH) @ offset / 2
        return float(np.sum(np.logaddexp(0.0, z) - agreed * z) + ridge)

    assert np.isfinite(model.weights).all()
    assert penalised(model.weights) <= penalised(model.prior) + 1e-9
    predicted = model.predict(rows)
    assert ((predicted >= 0) & (predicted <= 1)).all()


# --- the lookahead a request asks for ----------------------------------------------------------


def expected_cost(
    accept: list[float], asked: int, request: float, token: float, left: int
) -> float:
    """A request's billed cost beyond one token per position, by enumerating its outcomes: it
    covers k < N steps when k - 1 generated tokens matched and the k-th did not, all N when
    N - 1 matched; it wastes N - k tokens, and it leaves a position it could have covered to one
    more request when all N generated tokens matched before the piece's end."""
    cost, alive = 0.0, 1.0
    for k in range(1, asked + 1):
        if k < asked:
            cost += alive * (1 - accept[k - 1]) * token * (asked - k)
            alive *= accept[k - 1]
        else:
            through = accept[k - 1] if k - 1 < len(accept) and asked < left else 0.0
            cost += alive * through * request
    return cost


@given(chances, st.floats(0.0, 100.0), st.floats(0.01, 10.0), st.integers(1, 14))
def test_the_lookahead_asked_for_has_the_least_expected_cost(
    accept: list[float], request: float, token: float, left: int
) -> None:
    asked = best_lookahead(np.array(accept), request, token, left)
    most = min(left, len(accept))
    assert 1 <= asked <= max(most, 1)
    costs = [expected_cost(accept, n, request, token, left) for n in range(1, max(most, 1) + 1)]
    assert costs[asked - 1] == pytest.approx(min(costs), abs=1e-9)
    assert costs[asked - 1] <= costs[0] + 1e-9  # never dearer than one token per request


@given(chances, st.floats(0.0, 100.0), st.floats(0.01, 10.0), st.floats(0.0, 50.0))
def test_a_hurdle_keeps_one_token_unless_more_saves_at_least_that(
    accept: list[float], request: float, token: float, hurdle: float
) -> None:
    left = len(accept) + 1
    asked = best_lookahead(np.array(accept), request, token, left, hurdle)
    if asked > 1:
        saving = expected_cost(accept, 1, request, token, left) - expected_cost(
            accept, asked, request, token, left
        )
        assert saving >= hurdle - 1e-9


def test_the_lookahead_stops_where_a_disagreement_is_likely() -> None:
    ahead = np.array([0.99, 0.99, 0.99, 0.02, 0.99, 0.99])
    assert best_lookahead(ahead, 30.0, 1.0, 10) == 4  # covers up to the likely break
    assert best_lookahead(np.zeros(6), 30.0, 1.0, 10) == 1
    assert best_lookahead(np.ones(6), 30.0, 1.0, 6) == 6  # the rest of the piece, no more
    assert best_lookahead(np.ones(6), 30.0, 1.0, 1) == 1


# --- what a plan expects -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(chances, st.integers(1, 6))
def test_the_expected_requests_are_what_simulated_chains_send(accept: list[float], n: int) -> None:
    """chain_starts against the chains themselves, enumerated over every outcome."""
    size = len(accept)
    asked = np.minimum(n, size - np.arange(size))
    starts = chain_starts(np.array(accept), asked)
    assert starts[0] == 1.0 and ((starts >= -1e-12) & (starts <= 1 + 1e-12)).all()
    expected = 0.0
    for outcome in itertools.product([True, False], repeat=size):
        chance = float(np.prod([a if o else 1 - a for a, o in zip(accept, outcome, strict=True)]))
        position, requests = 0, 0
        while position < size:
            requests += 1
            k = 1
            while k < asked[position] and outcome[position + k - 1]:
                k += 1
            position += k
        expected += chance * requests
    assert starts.sum() == pytest.approx(expected, abs=1e-9)


# --- where responses are cut -------------------------------------------------------------------


@given(st.lists(st.booleans(), max_size=80), st.integers(1, 20), st.integers(0, 1000))
def test_cuts_at_likely_breaks_still_cover_every_pending_position_once(
    pending: list[bool], cap: int, seed: int
) -> None:
    accept = np.random.default_rng(seed).random(len(pending))
    pieces = lookahead.segments(pending, cap, accept)
    covered = [p for start, end in pieces for p in range(start, end)]
    assert covered == [p for p, flag in enumerate(pending) if flag]
    assert all(0 < end - start <= cap for start, end in pieces)


def test_a_response_is_cut_after_its_least_likely_position_near_the_cap() -> None:
    accept = np.full(40, 0.9)
    accept[13] = 0.01  # within the last quarter of a 16-long piece
    accept[20] = 0.0  # too early for the second piece's cut
    assert lookahead.segments([True] * 40, 16, accept)[0] == (0, 14)


def test_a_one_token_answer_is_one_comparison() -> None:
    model1 = [Token(" the", 5), Token(" cat", 9), Token(" sat", 12)]
    assert lookahead.compared([Token(" the", 5)], model1, 0).tolist() == [True]
    assert lookahead.compared([Token(" dog", 7)], model1, 1).tolist() == [False]
    assert lookahead.compared([Token(" cat", 9), None, Token(".", 3)], model1, 1).tolist() == [True]
    assert lookahead.compared([Token(" sat", 12), Token(".", 3)], model1, 2).tolist() == [True]
