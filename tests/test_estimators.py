"""Property tests: the vectorized estimators against the plain-Python statement of the spec."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klstream.metrics import reference
from klstream.metrics.columns import SideColumns, keyed_sides
from klstream.metrics.estimators import (
    Estimates,
    Matches,
    estimate,
    kl_bucket,
    kl_estimate,
    kl_floor,
    model1_only,
)

Entry = tuple[str, int | None, float]

logprobs = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)


def side_columns(lists: list[list[Entry]]) -> SideColumns:
    return SideColumns(
        tokens=pa.array([[e[0] for e in row] for row in lists], pa.list_(pa.string())),
        token_ids=pa.array([[e[1] for e in row] for row in lists], pa.list_(pa.int64())),
        logprobs=pa.array([[e[2] for e in row] for row in lists], pa.list_(pa.float64())),
    )


Row = tuple[list[Entry], list[Entry], Entry]
Result = dict[str, float]


def estimates(rows: list[Row]) -> Estimates:
    """Every estimator for a batch of (p list, q list, chosen token) rows, in one call."""
    m1 = side_columns([r[0] for r in rows])
    m2 = side_columns([r[1] for r in rows])
    chosen_token = pa.array([r[2][0] for r in rows], pa.string())
    chosen_id = pa.array([r[2][1] for r in rows], pa.int64())
    p, q, chosen_key = keyed_sides(m1, m2, chosen_token, chosen_id)
    assert q is not None
    est = estimate(p, q, chosen_key, np.array([r[2][2] for r in rows]))
    h1, c1 = model1_only(p)
    np.testing.assert_allclose(h1, est.entropy1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c1, est.coverage1, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(kl_floor(p, q), est.kl_floor)
    np.testing.assert_array_equal(kl_bucket(p, q), est.kl_bucket)
    return est


def run(rows: list[Row]) -> list[Result]:
    """The estimators of a batch of rows, one dict per row."""
    est = estimates(rows)
    return [
        {
            "kl_floor": est.kl_floor[i],
            "kl_lower": est.kl_lower[i],
            "kl_bucket": est.kl_bucket[i],
            "unshared_mass1": est.unshared_mass1[i],
            "logratio": est.logratio[i],
            "model2_logprob": est.model2_logprob[i],
            "in_topk": bool(est.m1_token_in_m2_topk[i]),
            "top1_agree": bool(est.top1_agree[i]),
            "entropy1": est.entropy1[i],
            "entropy2": est.entropy2[i],
            "coverage1": est.coverage1[i],
            "coverage2": est.coverage2[i],
        }
        for i in range(len(rows))
    ]


def keyed(entries: list[Entry], by_id: bool) -> list[tuple[Hashable, float]]:
    return [((e[1] if by_id else e[0]), e[2]) for e in entries]


def top_list(
    vocab: int, max_size: int = 20, unique: bool = False
) -> st.SearchStrategy[list[Entry]]:
    """Top-k entries over a small vocabulary so that the two sides overlap often."""
    ids = st.integers(0, vocab - 1)
    entry_ids = (
        st.lists(ids, min_size=1, max_size=max_size, unique=True)
        if unique
        else st.lists(ids, min_size=1, max_size=max_size)
    )
    return entry_ids.flatmap(
        lambda chosen: st.lists(logprobs, min_size=len(chosen), max_size=len(chosen)).map(
            lambda lps: [(f"t{i}", i, lp) for i, lp in zip(chosen, lps, strict=True)]
        )
    )


def chosen_entry(vocab: int) -> st.SearchStrategy[Entry]:
    return st.tuples(st.integers(0, vocab - 1), logprobs).map(lambda t: (f"t{t[0]}", t[0], t[1]))


def close(a: float, b: float, abs_tol: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=abs_tol)


def amplified_rounding(p: list[Entry], q: list[Entry], everything_listed: bool) -> float:
    """Rounding moves a remainder r_q by ~1e-15, and r_p·log(r_p/r_q) amplifies that by
    r_p / r_q: remainders outside the shared tokens (bucket) or outside both lists (capped)."""
    p_kept = reference.first_occurrences(keyed(p, True))
    q_kept = reference.first_occurrences(keyed(q, True))
    counted_p = p_kept if everything_listed else [key for key in p_kept if key in q_kept]
    counted_q = q_kept if everything_listed else [key for key in p_kept if key in q_kept]
    rest_p = reference.residual(1.0 - sum(math.exp(p_kept[key]) for key in counted_p))
    rest_q = reference.residual(1.0 - sum(math.exp(q_kept[key]) for key in counted_q))
    return 1e-12 + (1e-14 * rest_p / rest_q if rest_q > 0 else 0.0)


def lower_matches_reference(got: float, p: list[Entry], q: list[Entry]) -> bool:
    """The reference finds ρ by bisection and falls back to the bucket bound where needed."""
    want = reference.kl_lower(keyed(p, True), keyed(q, True))
    tolerance = amplified_rounding(p, q, True) + amplified_rounding(p, q, False)
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=tolerance)


row_strategy = st.tuples(top_list(30), top_list(30), chosen_entry(30))


@settings(max_examples=300, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=12))
def test_matches_plain_python_reference(rows: list[Row]) -> None:
    for (p, q, chosen), got in zip(rows, run(rows), strict=True):
        p_keyed, q_keyed = keyed(p, True), keyed(q, True)
        assert close(got["kl_floor"], reference.kl_floor(p_keyed, q_keyed))
        bucket_tolerance = amplified_rounding(p, q, False)
        assert close(got["kl_bucket"], reference.kl_bucket(p_keyed, q_keyed), bucket_tolerance)
        assert close(got["unshared_mass1"], reference.unshared_mass(p_keyed, q_keyed))
        assert lower_matches_reference(got["kl_lower"], p, q)
        want_lp, want_in = reference.chosen_logprob_in(q_keyed, chosen[1])
        assert got["in_topk"] == want_in
        assert close(got["model2_logprob"], want_lp)
        assert close(got["logratio"], chosen[2] - want_lp)


@settings(max_examples=200, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=8))
def test_kl_is_non_negative_and_zero_against_itself(rows: list[Row]) -> None:
    for got in run(rows):
        assert got["kl_floor"] >= 0.0
        assert got["kl_lower"] >= 0.0
        assert got["kl_bucket"] >= 0.0
    for p, _, chosen in rows:
        (same,) = run([(p, p, chosen)])
        assert same["kl_floor"] <= 1e-13
        assert same["kl_lower"] <= 1e-12
        assert same["kl_bucket"] <= 1e-12
        assert same["top1_agree"]


def truncated(logprobs: np.ndarray, k: int) -> list[Entry]:
    """The top-k list an API reports for a full distribution, most probable first."""
    top = np.argsort(-logprobs, kind="stable")[:k]
    return [(f"t{i}", int(i), float(logprobs[i])) for i in top]


def normalized(logits: list[float]) -> np.ndarray:
    values = np.asarray(logits)
    normal: np.ndarray = values - np.logaddexp.reduce(values)
    return normal


full_distributions = st.integers(2, 40).flatmap(
    lambda v: st.tuples(
        st.lists(st.floats(-8, 8), min_size=v, max_size=v),
        st.lists(st.floats(-8, 8), min_size=v, max_size=v),
        st.integers(1, min(v, 20)),
        st.integers(1, min(v, 20)),
        st.floats(0.1, 3.0),
    )
)


@settings(max_examples=500, deadline=None)
@given(full_distributions)
def test_bounds_never_exceed_the_exact_kl_of_the_full_distributions(
    case: tuple[list[float], list[float], int, int, float],
) -> None:
    """Random full distributions, truncated to top-k1 and top-k2 as the API would report them:
    both bounds stay below the exact KL, and the capped one is never below the bucket one."""
    logits_p, logits_q, k1, k2, spread = case
    lp = normalized(logits_p)
    lq = normalized([a + spread * b for a, b in zip(logits_p, logits_q, strict=True)])
    exact = float(np.sum(np.exp(lp) * (lp - lq)))
    p, q = truncated(lp, k1), truncated(lq, k2)
    (got,) = run([(p, q, p[0])])
    tolerance = (
        1e-9 * max(1.0, exact) + amplified_rounding(p, q, False) + amplified_rounding(p, q, True)
    )
    assert got["kl_lower"] <= exact + tolerance
    assert got["kl_bucket"] <= exact + tolerance
    assert got["kl_lower"] >= got["kl_bucket"] - tolerance
    if k1 == k2 == len(lp):
        assert math.isclose(got["kl_floor"], exact, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(got["kl_lower"], exact, rel_tol=1e-9, abs_tol=1e-12)


def test_capped_bound_is_tighter_than_the_bucket_on_average() -> None:
    """On smooth random pairs truncated to top-10 out of 200, the caps add what they promise."""
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    exact = []
    for _ in range(200):
        lp = normalized(list(rng.normal(size=200) * 1.5))
        lq = normalized(list(lp + rng.normal(size=200) * rng.uniform(0.2, 1.5)))
        p, q = truncated(lp, 10), truncated(lq, 10)
        rows.append((p, q, p[0]))
        exact.append(float(np.sum(np.exp(lp) * (lp - lq))))
    est = estimates(rows)
    assert np.all(est.kl_lower <= np.asarray(exact) + 1e-9)
    assert est.kl_lower.mean() > 1.2 * est.kl_bucket.mean()


@settings(max_examples=200, deadline=None)
@given(top_list(30, unique=True), top_list(30, unique=True), chosen_entry(30), st.randoms())
def test_invariant_to_list_order(
    p: list[Entry], q: list[Entry], chosen: Entry, rnd: random.Random
) -> None:
    shuffled_p, shuffled_q = p[:], q[:]
    rnd.shuffle(shuffled_p)
    rnd.shuffle(shuffled_q)
    original, shuffled = run([(p, q, chosen), (shuffled_p, shuffled_q, chosen)])
    names = ("kl_floor", "kl_lower", "kl_bucket", "logratio", "entropy1", "entropy2", "coverage2")
    for name in names:
        assert math.isclose(original[name], shuffled[name], rel_tol=1e-9, abs_tol=1e-12), name
    assert original["in_topk"] == shuffled["in_topk"]


@settings(max_examples=200, deadline=None)
@given(row_strategy)
def test_string_keys_agree_with_id_keys_when_strings_are_distinct(row: Row) -> None:
    p, q, chosen = row

    def strip(entries: list[Entry]) -> list[Entry]:
        return [(t, None, lp) for t, _, lp in entries]

    without_ids: list[Row] = [(strip(p), strip(q), (chosen[0], None, chosen[2]))]
    by_id, by_string = run([row])[0], run(without_ids)[0]
    for name in by_id:
        assert by_id[name] == pytest.approx(by_string[name], rel=1e-12, abs=1e-12)


def test_ids_distinguish_tokens_whose_strings_collide() -> None:
    """Two byte-fallback tokens that both render as U+FFFD are different tokens to the model."""
    p: list[Entry] = [
        ("\ufffd", 1, math.log(0.6)),
        ("\ufffd", 2, math.log(0.3)),
        ("a", 3, math.log(0.1)),
    ]
    q: list[Entry] = [
        ("\ufffd", 2, math.log(0.6)),
        ("\ufffd", 1, math.log(0.3)),
        ("a", 3, math.log(0.1)),
    ]
    chosen: Entry = ("\ufffd", 1, math.log(0.6))
    by_id = run([(p, q, chosen)])[0]
    assert by_id["kl_floor"] == pytest.approx(
        reference.kl_floor(keyed(p, True), keyed(q, True)), rel=1e-12
    )
    assert by_id["kl_floor"] > 0.1
    assert by_id["model2_logprob"] == pytest.approx(math.log(0.3))

    strings_p: list[Entry] = [(t, None, lp) for t, _, lp in p]
    strings_q: list[Entry] = [(t, None, lp) for t, _, lp in q]
    by_string = run([(strings_p, strings_q, ("\ufffd", None, chosen[2]))])[0]
    assert by_string["kl_floor"] == pytest.approx(
        reference.kl_floor(keyed(strings_p, False), keyed(strings_q, False)), rel=1e-12
    )
    assert by_string["kl_floor"] == pytest.approx(0.0, abs=1e-15)


def test_row_with_partial_ids_falls_back_to_strings() -> None:
    p: list[Entry] = [("a", 1, math.log(0.5)), ("b", None, math.log(0.5))]
    q: list[Entry] = [("a", 7, math.log(0.5)), ("b", 8, math.log(0.5))]
    (got,) = run([(p, q, ("a", 1, math.log(0.5)))])
    assert got["kl_floor"] == pytest.approx(0.0, abs=1e-15)
    assert got["in_topk"]


def test_worked_example_by_hand() -> None:
    """P = {a: .5, b: .3}, Q = {a: .35, c: .45}: union {a, b, c}, floors .3 (P) and .35 (Q).

    The capped bound: both lists leave .2 unlisted, and b (q ≤ .35) can take all of Q's while
    c (p ≤ .3) takes all of P's, so the least KL has nothing left outside {a, b, c}.
    """
    p: list[Entry] = [("a", None, math.log(0.5)), ("b", None, math.log(0.3))]
    q: list[Entry] = [("a", None, math.log(0.35)), ("c", None, math.log(0.45))]
    (got,) = run([(p, q, ("b", None, math.log(0.3)))])
    p_norm = np.array([0.5, 0.3, 0.3]) / 1.1
    q_norm = np.array([0.35, 0.35, 0.45]) / 1.15
    assert got["kl_floor"] == pytest.approx(float(np.sum(p_norm * np.log(p_norm / q_norm))))
    rest_p, rest_q = 0.5, 0.65
    assert got["kl_bucket"] == pytest.approx(
        0.5 * math.log(0.5 / 0.35) + rest_p * math.log(rest_p / rest_q)
    )
    assert got["kl_lower"] == pytest.approx(
        0.5 * math.log(0.5 / 0.35) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.45)
    )
    assert not got["in_topk"]
    assert got["logratio"] == pytest.approx(math.log(0.3) - math.log(0.35))
    assert got["coverage1"] == pytest.approx(0.8)
    assert got["coverage2"] == pytest.approx(0.8)
    assert not got["top1_agree"]


def test_capped_bound_with_mass_left_outside_both_lists_by_hand() -> None:
    """P = {a: .5, b: .1}, Q = {a: .4, c: .1}: at ρ = .8, b is capped at q = .1 (p_b/ρ = .125),
    c gets p = .8 · .1 = .08 below its cap .1, and the unlisted cell holds .32 against .4."""
    p: list[Entry] = [("a", 1, math.log(0.5)), ("b", 2, math.log(0.1))]
    q: list[Entry] = [("a", 1, math.log(0.4)), ("c", 3, math.log(0.1))]
    (got,) = run([(p, q, ("a", 1, math.log(0.5)))])
    assert got["kl_lower"] == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.4 * math.log(0.8))
    assert got["kl_bucket"] == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6))


def test_q_remainder_below_rounding_keeps_the_bucket_bound() -> None:
    """Q's top-3 leave 4.9e-10 unlisted, below RESIDUAL_TOLERANCE: treating it as exactly 0
    made P's remainder land on Q's third token (q = e^-22) and the bound exceed the exact KL."""
    logits_p = np.array([4.0, -3.0, 0.0, -1.0, -3.0, -1.0])
    logits_q = logits_p + 3.0 * np.array([5.0, 0.0, 0.0, -1.0, 0.0, -1.0])
    lp, lq = normalized(list(logits_p)), normalized(list(logits_q))
    p, q = truncated(lp, 2), truncated(lq, 3)
    (got,) = run([(p, q, p[0])])
    assert got["kl_lower"] <= float(np.sum(np.exp(lp) * (lp - lq)))
    assert got["kl_lower"] == pytest.approx(got["kl_bucket"])


def test_lower_bound_merges_remainder_when_q_reports_all_its_mass() -> None:
    """Q's list sums to 1 (rounded logprob 0.0) while P has mass Q cannot place: infinite in
    exact arithmetic, so both bounds merge P's remainder into the shared token instead."""
    p: list[Entry] = [("a", 1, math.log(0.7)), ("b", 2, math.log(0.2))]
    q: list[Entry] = [("a", 1, 0.0)]
    (got,) = run([(p, q, ("a", 1, math.log(0.7)))])
    assert math.isfinite(got["kl_lower"])
    assert got["kl_lower"] == pytest.approx(0.0)
    assert got["kl_lower"] == pytest.approx(reference.kl_lower(keyed(p, True), keyed(q, True)))
    assert got["kl_bucket"] == pytest.approx(got["kl_lower"])


def test_per_row_sums_handle_rows_without_pairs_anywhere() -> None:
    """Rows without shared tokens, in the middle and at the end, sum to 0 and cut no segment."""
    rows = np.array([0, 1, 1, 3, 3, 3])
    matches = Matches.of(rows, rows, rows, 6)
    assert matches.per_row(np.array([1.0, 2, 3, 4, 5, 6])).tolist() == [1, 5, 0, 15, 0, 0]
    empty = np.array([], dtype=np.intp)
    assert Matches.of(empty, empty, empty, 3).per_row(np.array([])).tolist() == [0, 0, 0]


def test_lower_bound_merge_does_not_depend_on_list_order() -> None:
    """Q's shared tokens tie at probability 1: the merge target must not follow P's order."""
    p: list[Entry] = [("a", 1, math.log(0.1)), ("b", 2, math.log(0.3)), ("c", 3, math.log(0.2))]
    q: list[Entry] = [("a", 1, 0.0), ("b", 2, 0.0)]
    chosen: Entry = ("a", 1, math.log(0.1))
    forward, backward = run([(p, q, chosen), (p[::-1], q[::-1], chosen)])
    assert forward["kl_lower"] == pytest.approx(backward["kl_lower"], abs=1e-15)
    assert forward["kl_lower"] == pytest.approx(reference.kl_lower(keyed(p, True), keyed(q, True)))


@settings(max_examples=200, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=8), st.floats(0.0, 10.0))
def test_tail_observations_and_estimate_match_plain_python(rows: list[Row], sigma2: float) -> None:
    est = estimates(rows)
    tail = est.tail
    got_estimates = kl_estimate(est.kl_bucket, est.unshared_mass1, sigma2)
    for index, (p, q, chosen) in enumerate(rows):
        p_keyed, q_keyed = keyed(p, True), keyed(q, True)
        exact, censored = reference.tail_observations(p_keyed, q_keyed, chosen[1], chosen[2])
        assert tail.count[index] == len(exact)
        assert close(tail.total[index], math.fsum(exact), 1e-9)
        assert close(tail.total_sq[index], math.fsum(r * r for r in exact), 1e-9)
        got_censored = tail.censored_at[tail.censored_rows == index]
        assert sorted(got_censored.tolist()) == pytest.approx(sorted(censored), abs=1e-12)
        want = reference.kl_estimate(p_keyed, q_keyed, sigma2)
        assert close(got_estimates[index], want, amplified_rounding(p, q, False) + 1e-12)
    assert np.all(np.diff(tail.censored_rows) >= 0)


def test_tail_observations_by_hand() -> None:
    """P lists a (top), b, c; Q lists a, b, x. b is exact, c censored at log p_c − log q_x; the
    sampled d is outside P's list and inside Q's: exact too."""
    p: list[Entry] = [("a", 1, math.log(0.5)), ("b", 2, math.log(0.2)), ("c", 3, math.log(0.1))]
    q: list[Entry] = [
        ("a", 1, math.log(0.4)),
        ("b", 2, math.log(0.1)),
        ("d", 4, math.log(0.08)),
        ("x", 9, math.log(0.05)),
    ]
    tail = estimates([(p, q, ("d", 4, math.log(0.02)))]).tail
    exact = [math.log(0.2 / 0.1), math.log(0.02 / 0.08)]
    assert tail.count.tolist() == [2]
    assert tail.total[0] == pytest.approx(sum(exact))
    assert tail.total_sq[0] == pytest.approx(sum(r * r for r in exact))
    assert tail.censored_at.tolist() == pytest.approx([math.log(0.1 / 0.05)])
