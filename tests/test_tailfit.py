"""The σ̂² fit: the censored-normal maximum likelihood, its correction, and the bounded sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_ndtr

from klstream.metrics.tailfit import (
    TailObservations,
    TailSample,
    concat,
    fit_tail_variance,
)


def observations(exact: list[list[float]], censored: list[list[float]]) -> TailObservations:
    """Per position, the exact r values and the lower limits of the censored ones."""
    rows = [index for index, limits in enumerate(censored) for _ in limits]
    return TailObservations(
        count=np.array([len(values) for values in exact], dtype=np.int64),
        total=np.array([math.fsum(values) for values in exact]),
        total_sq=np.array([math.fsum(v * v for v in values) for values in exact]),
        censored_rows=np.array(rows, dtype=np.intp),
        censored_at=np.array([limit for limits in censored for limit in limits]),
    )


def simulate(
    rng: np.random.Generator, positions: int, per_position: int, sigma: float
) -> tuple[list[list[float]], list[list[float]]]:
    """r ~ N(μ_i, σ²); a value is censored (only its limit kept) when it exceeds a random limit."""
    exact: list[list[float]] = []
    censored: list[list[float]] = []
    for _ in range(positions):
        mean = rng.normal(0.0, 2.0)
        values = rng.normal(mean, sigma, size=per_position)
        limits = mean + rng.normal(0.5, 1.0, size=per_position)
        exact.append([float(v) for v, c in zip(values, limits, strict=True) if v <= c])
        censored.append([float(c) for v, c in zip(values, limits, strict=True) if v > c])
    return exact, censored


def test_fit_is_the_maximum_of_the_censored_normal_likelihood() -> None:
    """The arrowhead Newton solution against a generic optimizer over (μ_1..μ_n, log σ)."""
    rng = np.random.default_rng(3)
    exact, censored = simulate(rng, 25, 6, 1.3)
    kept = [i for i in range(25) if exact[i] and len(exact[i]) + len(censored[i]) >= 2]
    exact, censored = [exact[i] for i in kept], [censored[i] for i in kept]

    def negative_log_likelihood(params: np.ndarray) -> float:
        means, log_sigma = params[:-1], params[-1]
        sigma = math.exp(log_sigma)
        total = 0.0
        for mean, values, limits in zip(means, exact, censored, strict=True):
            z = (np.asarray(values) - mean) / sigma
            total += float(np.sum(-0.5 * z * z - log_sigma))
            total += float(np.sum(log_ndtr((mean - np.asarray(limits)) / sigma)))
        return -total

    start = np.array([*(float(np.mean(v)) for v in exact), 0.0])
    best = minimize(negative_log_likelihood, start, method="BFGS", options={"gtol": 1e-9})
    fit = fit_tail_variance(observations(exact, censored))
    assert fit is not None
    values = fit.observed + fit.censored
    maximum_likelihood = fit.sigma2 * (values - fit.positions) / values
    assert maximum_likelihood == pytest.approx(math.exp(2 * best.x[-1]), rel=1e-5)
    assert (fit.positions, fit.censored) == (len(exact), sum(map(len, censored)))


def test_without_censoring_it_is_the_unbiased_pooled_variance() -> None:
    rng = np.random.default_rng(4)
    exact = [list(rng.normal(rng.normal(), 0.7, size=rng.integers(1, 8))) for _ in range(200)]
    fit = fit_tail_variance(observations(exact, [[] for _ in exact]))
    assert fit is not None
    pooled = [v for values in exact if len(values) >= 2 for v in values - np.mean(values)]
    degrees = sum(len(values) - 1 for values in exact if len(values) >= 2)
    assert fit.sigma2 == pytest.approx(math.fsum(v * v for v in pooled) / degrees, rel=1e-9)


def test_recovers_sigma_through_heavy_censoring() -> None:
    """About 40% of the values censored: σ² still comes back within a few percent."""
    rng = np.random.default_rng(5)
    exact, censored = simulate(rng, 3000, 12, 1.5)
    share = sum(map(len, censored)) / (3000 * 12)
    assert 0.3 < share < 0.5
    fit = fit_tail_variance(observations(exact, censored))
    assert fit is not None
    assert fit.sigma2 == pytest.approx(1.5**2, rel=0.05)


def test_nothing_to_fit_gives_none() -> None:
    """Single values and censored-only positions say nothing about σ."""
    assert fit_tail_variance(observations([[0.5], [], [1.0]], [[], [0.1, 0.2], []])) is None


def test_sample_does_not_depend_on_batches_and_stays_bounded() -> None:
    rng = np.random.default_rng(6)
    exact, censored = simulate(rng, 500, 5, 1.0)
    everything = observations(exact, censored)
    whole = TailSample(limit=120)
    whole.add(everything, np.arange(500))
    pieces = TailSample(limit=120)
    for start in range(0, 500, 37):
        rows = np.arange(start, min(start + 37, 500))
        pieces.add(everything.take(rows), rows)
    a, b = whole.observations(), pieces.observations()
    assert len(a.count) == 120
    for name in ("count", "total", "total_sq", "censored_rows", "censored_at"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    uninformative = observations([[0.3]], [[]])
    whole.add(uninformative, np.array([10_000]))
    assert len(whole.observations().count) == 120


def test_concat_and_take_keep_censored_values_with_their_positions() -> None:
    first = observations([[1.0, 2.0], [3.0]], [[0.5], [0.7, 0.9]])
    second = observations([[4.0]], [[1.5]])
    both = concat([first, second])
    assert both.censored_rows.tolist() == [0, 1, 1, 2]
    picked = both.take(np.array([1, 2]))
    assert picked.count.tolist() == [1, 1]
    assert picked.censored_rows.tolist() == [0, 0, 1]
    assert picked.censored_at.tolist() == [0.7, 0.9, 1.5]
