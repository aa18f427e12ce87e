"""Property tests: the vectorized estimators against the plain-Python statement of the spec."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klstream.metrics import reference
from klstream.metrics.columns import SideColumns, keyed_sides
from klstream.metrics.estimators import Matches, estimate, kl_floor, model1_only

Entry = tuple[str, int | None, float]

logprobs = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)


def side_columns(lists: list[list[Entry]]) -> SideColumns:
    return SideColumns(
        tokens=pa.array([[e[0] for e in row] for row in lists], pa.list_(pa.string())),
        token_ids=pa.array([[e[1] for e in row] for row in lists], pa.list_(pa.int64())),
        logprobs=pa.array([[e[2] for e in row] for row in lists], pa.list_(pa.float64())),
    )


def run(rows: list[tuple[list[Entry], list[Entry], Entry]]) -> list[dict[str, float]]:
    """Estimate a batch of (p list, q list, chosen token) rows in one vectorized call."""
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
    return [
        {
            "kl_floor": est.kl_floor[i],
            "kl_lower": est.kl_lower[i],
            "logratio": est.logratio[i],
            "model2_logprob": est.model2_logprob[i],
            "in_topk": bool(est.m1_token_in_m2_topk[i]),
            "top1_agree": bool(est.top1_agree[i]),
            "entropy1": h1[i],
            "entropy2": est.entropy2[i],
            "coverage1": c1[i],
            "coverage2": est.coverage2[i],
        }
        for i in range(len(rows))
    ]


def keyed(entries: list[Entry], by_id: bool) -> list[tuple[object, float]]:
    return [((e[1] if by_id else e[0]), e[2]) for e in entries]


def top_list(vocab: int, max_size: int = 20, unique: bool = False) -> st.SearchStrategy:
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


def chosen_entry(vocab: int) -> st.SearchStrategy:
    return st.tuples(st.integers(0, vocab - 1), logprobs).map(lambda t: (f"t{t[0]}", t[0], t[1]))


def close(a: float, b: float, abs_tol: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=abs_tol)


def kl_lower_tolerance(p: list[Entry], q: list[Entry]) -> float:
    """Rounding moves r_q by ~1e-15, and r_p·log(r_p/r_q) amplifies that by r_p / r_q."""
    p_kept, q_kept = (
        reference.first_occurrences(keyed(p, True)),
        reference.first_occurrences(keyed(q, True)),
    )
    shared = [key for key in p_kept if key in q_kept]
    rest_p = reference.residual(1.0 - sum(math.exp(p_kept[key]) for key in shared))
    rest_q = reference.residual(1.0 - sum(math.exp(q_kept[key]) for key in shared))
    return 1e-12 + (1e-14 * rest_p / rest_q if rest_q > 0 else 0.0)


row_strategy = st.tuples(top_list(30), top_list(30), chosen_entry(30))


@settings(max_examples=300, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=12))
def test_matches_plain_python_reference(rows):
    for (p, q, chosen), got in zip(rows, run(rows), strict=True):
        assert close(got["kl_floor"], reference.kl_floor(keyed(p, True), keyed(q, True)))
        assert close(
            got["kl_lower"],
            reference.kl_lower(keyed(p, True), keyed(q, True)),
            abs_tol=kl_lower_tolerance(p, q),
        )
        want_lp, want_in = reference.chosen_logprob_in(keyed(q, True), chosen[1])
        assert got["in_topk"] == want_in
        assert close(got["model2_logprob"], want_lp)
        assert close(got["logratio"], chosen[2] - want_lp)


@settings(max_examples=200, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=8))
def test_kl_is_non_negative_and_zero_against_itself(rows):
    for got in run(rows):
        assert got["kl_floor"] >= 0.0
        assert got["kl_lower"] >= 0.0
    for p, _, chosen in rows:
        (same,) = run([(p, p, chosen)])
        assert same["kl_floor"] <= 1e-13
        assert same["kl_lower"] <= 1e-12
        assert same["top1_agree"]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(2, 40).flatmap(
        lambda v: st.tuples(
            st.just(v),
            st.lists(st.floats(-8, 8), min_size=v, max_size=v),
            st.lists(st.floats(-8, 8), min_size=v, max_size=v),
            st.integers(1, min(v, 20)),
            st.integers(1, min(v, 20)),
        )
    )
)
def test_lower_bound_never_exceeds_exact_kl(case):
    vocab, logits_p, logits_q, k1, k2 = case
    lp = np.asarray(logits_p) - np.logaddexp.reduce(logits_p)
    lq = np.asarray(logits_q) - np.logaddexp.reduce(logits_q)
    exact = float(np.sum(np.exp(lp) * (lp - lq)))
    top_p = np.argsort(-lp, kind="stable")[:k1]
    top_q = np.argsort(-lq, kind="stable")[:k2]
    p = [(f"t{i}", int(i), float(lp[i])) for i in top_p]
    q = [(f"t{i}", int(i), float(lq[i])) for i in top_q]
    (got,) = run([(p, q, p[0])])
    assert got["kl_lower"] <= exact + 1e-9
    if k1 == vocab and k2 == vocab:
        assert math.isclose(got["kl_floor"], exact, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(got["kl_lower"], exact, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=200, deadline=None)
@given(top_list(30, unique=True), top_list(30, unique=True), chosen_entry(30), st.randoms())
def test_invariant_to_list_order(p, q, chosen, rnd):
    shuffled_p, shuffled_q = p[:], q[:]
    rnd.shuffle(shuffled_p)
    rnd.shuffle(shuffled_q)
    original, shuffled = run([(p, q, chosen), (shuffled_p, shuffled_q, chosen)])
    for name in ("kl_floor", "kl_lower", "logratio", "entropy1", "entropy2", "coverage2"):
        assert math.isclose(original[name], shuffled[name], rel_tol=1e-12, abs_tol=1e-12), name
    assert original["in_topk"] == shuffled["in_topk"]


@settings(max_examples=200, deadline=None)
@given(row_strategy)
def test_string_keys_agree_with_id_keys_when_strings_are_distinct(row):
    p, q, chosen = row

    def strip(entries):
        return [(t, None, lp) for t, _, lp in entries]

    without_ids = [(strip(p), strip(q), (chosen[0], None, chosen[2]))]
    by_id, by_string = run([row])[0], run(without_ids)[0]
    for name in by_id:
        assert by_id[name] == pytest.approx(by_string[name], rel=1e-12, abs=1e-12)


def test_ids_distinguish_tokens_whose_strings_collide():
    """Two byte-fallback tokens that both render as U+FFFD are different tokens to the model."""
    p = [("\ufffd", 1, math.log(0.6)), ("\ufffd", 2, math.log(0.3)), ("a", 3, math.log(0.1))]
    q = [("\ufffd", 2, math.log(0.6)), ("\ufffd", 1, math.log(0.3)), ("a", 3, math.log(0.1))]
    chosen = ("\ufffd", 1, math.log(0.6))
    by_id = run([(p, q, chosen)])[0]
    assert by_id["kl_floor"] == pytest.approx(
        reference.kl_floor(keyed(p, True), keyed(q, True)), rel=1e-12
    )
    assert by_id["kl_floor"] > 0.1
    assert by_id["model2_logprob"] == pytest.approx(math.log(0.3))

    strings_only = [(t, None, lp) for t, _, lp in p], [(t, None, lp) for t, _, lp in q]
    by_string = run([(*strings_only, ("\ufffd", None, chosen[2]))])[0]
    assert by_string["kl_floor"] == pytest.approx(
        reference.kl_floor(keyed(strings_only[0], False), keyed(strings_only[1], False)), rel=1e-12
    )
    assert by_string["kl_floor"] == pytest.approx(0.0, abs=1e-15)


def test_row_with_partial_ids_falls_back_to_strings():
    p = [("a", 1, math.log(0.5)), ("b", None, math.log(0.5))]
    q = [("a", 7, math.log(0.5)), ("b", 8, math.log(0.5))]
    (got,) = run([(p, q, ("a", 1, math.log(0.5)))])
    assert got["kl_floor"] == pytest.approx(0.0, abs=1e-15)
    assert got["in_topk"]


def test_worked_example_by_hand():
    """P = {a: .5, b: .3}, Q = {a: .35, c: .45}: union {a, b, c}, floors .3 (P) and .35 (Q)."""
    p = [("a", None, math.log(0.5)), ("b", None, math.log(0.3))]
    q = [("a", None, math.log(0.35)), ("c", None, math.log(0.45))]
    (got,) = run([(p, q, ("b", None, math.log(0.3)))])
    p_norm = np.array([0.5, 0.3, 0.3]) / 1.1
    q_norm = np.array([0.35, 0.35, 0.45]) / 1.15
    assert got["kl_floor"] == pytest.approx(float(np.sum(p_norm * np.log(p_norm / q_norm))))
    rest_p, rest_q = 0.5, 0.65
    assert got["kl_lower"] == pytest.approx(
        0.5 * math.log(0.5 / 0.35) + rest_p * math.log(rest_p / rest_q)
    )
    assert not got["in_topk"]
    assert got["logratio"] == pytest.approx(math.log(0.3) - math.log(0.35))
    assert got["coverage1"] == pytest.approx(0.8)
    assert got["coverage2"] == pytest.approx(0.8)
    assert not got["top1_agree"]


def test_lower_bound_merges_remainder_when_q_reports_all_its_mass():
    """Q's list sums to 1 (rounded logprob 0.0) while P has mass outside the shared tokens."""
    p = [("a", 1, math.log(0.7)), ("b", 2, math.log(0.2))]
    q = [("a", 1, 0.0)]
    (got,) = run([(p, q, ("a", 1, math.log(0.7)))])
    assert math.isfinite(got["kl_lower"])
    assert got["kl_lower"] == pytest.approx(0.0)
    assert got["kl_lower"] == pytest.approx(reference.kl_lower(keyed(p, True), keyed(q, True)))


def test_per_row_sums_handle_rows_without_pairs_anywhere():
    """Rows without shared tokens, in the middle and at the end, sum to 0 and cut no segment."""
    rows = np.array([0, 1, 1, 3, 3, 3])
    matches = Matches.of(rows, rows, rows, 6)
    assert matches.per_row(np.array([1.0, 2, 3, 4, 5, 6])).tolist() == [1, 5, 0, 15, 0, 0]
    empty = np.array([], dtype=np.intp)
    assert Matches.of(empty, empty, empty, 3).per_row(np.array([])).tolist() == [0, 0, 0]


def test_lower_bound_merge_does_not_depend_on_list_order():
    """Q's shared tokens tie at probability 1: the merge target must not follow P's order."""
    p = [("a", 1, math.log(0.1)), ("b", 2, math.log(0.3)), ("c", 3, math.log(0.2))]
    q = [("a", 1, 0.0), ("b", 2, 0.0)]
    chosen = ("a", 1, math.log(0.1))
    forward, backward = run([(p, q, chosen), (p[::-1], q[::-1], chosen)])
    assert forward["kl_lower"] == pytest.approx(backward["kl_lower"], abs=1e-15)
    assert forward["kl_lower"] == pytest.approx(reference.kl_lower(keyed(p, True), keyed(q, True)))
