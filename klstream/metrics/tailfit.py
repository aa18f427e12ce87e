"""σ̂², the spread of the log-ratio r = log p − log q outside the listed tokens, fitted once per run.

``kl_estimate`` adds m_P·σ̂²/2 to the bucket bound: the KL inside the leftover cell if r is
normally distributed there with variance σ̂² (for a lognormal ratio normalized under Q, the KL is
half the variance of its log). σ̂² is learned from the tokens whose r the API half-reveals:

* at every position, P's tokens at ranks 2..k (the top one, shared almost always, is left out) and
  Model 1's sampled token when it is outside P's list;
* r is observed exactly when Q lists the token, and is only known to exceed log p_v − log q_(k)
  when it does not (q_v ≤ q_(k), Q's smallest reported probability): a right-censored value.

The model is r ~ N(μ_i, σ²) with a free mean μ_i per position and one σ for the run and Model 2
(a censored-normal, or Tobit, model; one σ per response was measured worse). It is fitted by
maximum likelihood with Olsen's parametrization θ_i = μ_i/σ, γ = 1/σ, in which the
log-likelihood is jointly concave; its Hessian is an arrowhead (each θ_i couples only with γ),
so every Newton step costs O(observations), solved through the Schur complement of γ.

Fitting a mean per position costs each position a degree of freedom, and the ML variance is
biased low by it: by (N − n)/N for N uncensored values over n positions, a quarter at k = 5.
σ̂² is therefore the ML value times N/(N − n), with N counting exact and censored values — the
usual correction, exact for uncensored values (it makes the pooled within-position variance
unbiased). On the toy pairs of ``bench/estimator_bench.py`` it more than halves the estimate's
low bias at k = 10. A position with a single value says nothing about σ (its μ_i absorbs the
value) and is left out.

The fit is a model, not a bound: it is only as good as the normal shape of r in the tail, and
where Q's list misses most of P's tokens (a heavily damaged tail) most values are censored and the
estimate reads low. Positions with no exactly observed value carry no information about σ either
(their μ_i runs off to +∞) and are left out too.

Fitting needs every position of the run at once, so the KL pass keeps a bounded sample of
positions (:class:`TailSample`), chosen by a hash of each position's ordinal in the run, so the
sample does not depend on how the run is cut into batches or ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

SAMPLE_POSITIONS = 50_000
"""Positions the fit keeps at most. One σ from ~10⁶ values is far past statistical noise, and the
fit over them takes a fraction of a second."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_MAX_NEWTON_STEPS = 100


@dataclass(frozen=True)
class TailObservations:
    """The fit's data for a batch of positions: exact values as per-position sufficient
    statistics, censored ones as flat (position, lower limit) entries."""

    count: np.ndarray  # exactly observed r values per position
    total: np.ndarray  # Σ r
    total_sq: np.ndarray  # Σ r²
    censored_rows: np.ndarray  # the position each censored value belongs to
    censored_at: np.ndarray  # r exceeds this

    def take(self, rows: np.ndarray) -> TailObservations:
        """The positions at ``rows`` (ascending), renumbered 0.. in that order."""
        keep = np.zeros(len(self.count), dtype=bool)
        keep[rows] = True
        entries = keep[self.censored_rows]
        renumber = np.cumsum(keep) - 1
        return TailObservations(
            self.count[rows],
            self.total[rows],
            self.total_sq[rows],
            renumber[self.censored_rows[entries]],
            self.censored_at[entries],
        )


def concat(parts: list[TailObservations]) -> TailObservations:
    """The positions of ``parts`` one after another."""
    offsets = np.cumsum([0, *(len(part.count) for part in parts)])
    return TailObservations(
        np.concatenate([part.count for part in parts]),
        np.concatenate([part.total for part in parts]),
        np.concatenate([part.total_sq for part in parts]),
        np.concatenate([part.censored_rows + o for part, o in zip(parts, offsets, strict=False)]),
        np.concatenate([part.censored_at for part in parts]),
    )


EVERYTHING = np.uint64(2**64 - 1)
"""A cut every priority passes."""


def priority(ordinals: np.ndarray) -> np.ndarray:
    """A position's rank for the sample, from its ordinal in the run: SplitMix64's finalizer, a
    fixed pseudo-random permutation of 64-bit integers."""
    z = ordinals.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class TailSample:
    """A bounded, batch-independent sample of positions for the fit.

    Each position's :func:`priority` is a hash of its ordinal in the run; the sample is the
    ``limit`` informative positions of smallest priority, kept in run order. Dropping early what
    already ranks past ``limit`` never changes which positions those are, and :attr:`cut` says
    which positions can still get in, so the KL pass examines only those.
    """

    def __init__(self, limit: int = SAMPLE_POSITIONS) -> None:
        self.limit = limit
        self.cut = EVERYTHING
        """Positions of larger priority can no longer enter the sample."""
        self._parts: list[TailObservations] = []
        self._priorities: list[np.ndarray] = []
        self._held = 0

    def add(self, observations: TailObservations, ordinals: np.ndarray) -> None:
        """Offer a batch of positions with their (increasing) ordinals in the run."""
        informative = np.flatnonzero(_informative(observations))
        if not informative.size:
            return
        self._parts.append(observations.take(informative))
        self._priorities.append(priority(ordinals[informative]))
        self._held += informative.size
        if self._held > 2 * self.limit:
            self._shrink()

    def _shrink(self) -> None:
        merged = concat(self._parts)
        priorities = np.concatenate(self._priorities)
        if len(priorities) > self.limit:
            self.cut = np.partition(priorities, self.limit - 1)[self.limit - 1]
            chosen = np.flatnonzero(priorities <= self.cut)
            merged, priorities = merged.take(chosen), priorities[chosen]
        self._parts, self._priorities, self._held = [merged], [priorities], len(priorities)

    def observations(self) -> TailObservations:
        """The sample, in run order."""
        if not self._parts:
            return _empty()
        self._shrink()
        return self._parts[0]


def _informative(observations: TailObservations) -> np.ndarray:
    """Positions that say something about σ: an exact value and at least one more value."""
    censored = np.bincount(observations.censored_rows, minlength=len(observations.count))
    informative: np.ndarray = (observations.count > 0) & (observations.count + censored >= 2)
    return informative


def _empty() -> TailObservations:
    nothing = np.empty(0)
    return TailObservations(nothing, nothing, nothing, np.empty(0, dtype=np.intp), nothing)


@dataclass(frozen=True)
class TailFit:
    """The fitted σ̂² and what it was fitted on."""

    sigma2: float  # the ML value times the degrees-of-freedom correction
    positions: int
    observed: int
    censored: int


class _Likelihood:
    """The censored-normal log-likelihood in (θ, γ), with its gradient and arrowhead Hessian."""

    def __init__(self, data: TailObservations) -> None:
        self.data = data
        self.n = len(data.count)

    def value(self, theta: np.ndarray, gamma: float) -> float:
        d = self.data
        exact = (
            d.count * math.log(gamma)
            - 0.5 * (gamma * gamma * d.total_sq - 2.0 * gamma * theta * d.total)
            - 0.5 * d.count * theta * theta
        )
        z = theta[d.censored_rows] - gamma * d.censored_at
        return float(exact.sum() + log_ndtr(z).sum())

    def newton_step(self, theta: np.ndarray, gamma: float) -> tuple[np.ndarray, float]:
        """The Newton step (Δθ, Δγ), solved through the Schur complement of γ."""
        d = self.data
        z = theta[d.censored_rows] - gamma * d.censored_at
        mills = np.exp(-0.5 * z * z - _LOG_SQRT_2PI - log_ndtr(z))  # φ(z)/Φ(z)
        weight = mills * (z + mills)  # −(d²/dz²) log Φ(z), in (0, 1)
        c = d.censored_at

        def per_row(values: np.ndarray) -> np.ndarray:
            return np.bincount(d.censored_rows, values, self.n)

        grad_theta = gamma * d.total - d.count * theta + per_row(mills)
        grad_gamma = float(
            (d.count / gamma - gamma * d.total_sq + theta * d.total).sum() - (c * mills).sum()
        )
        h_theta = -d.count - per_row(weight)  # < 0: every kept row has an exact value
        h_cross = d.total + per_row(c * weight)
        h_gamma = float((-d.count / (gamma * gamma) - d.total_sq).sum() - (c * c * weight).sum())
        schur = h_gamma - float((h_cross * h_cross / h_theta).sum())
        step_gamma = (-grad_gamma + float((h_cross * grad_theta / h_theta).sum())) / schur
        step_theta = (-grad_theta - h_cross * step_gamma) / h_theta
        return step_theta, step_gamma


def fit_tail_variance(data: TailObservations) -> TailFit | None:
    """σ̂² by maximum likelihood of the censored-normal model in the module docstring, with the
    degrees-of-freedom correction; None when no position says anything about σ."""
    data = data.take(np.flatnonzero(_informative(data)))
    positions, observed = len(data.count), int(data.count.sum())
    if not positions:
        return None
    within = float((data.total_sq - data.total * data.total / data.count).sum())
    pooled = float(data.total_sq.sum() / observed - (data.total.sum() / observed) ** 2)
    start = within / observed if within > 0.0 else pooled
    gamma = 1.0 / math.sqrt(start) if start > 0.0 else 1.0
    theta = gamma * data.total / data.count
    likelihood = _Likelihood(data)
    current = likelihood.value(theta, gamma)
    for _ in range(_MAX_NEWTON_STEPS):
        step_theta, step_gamma = likelihood.newton_step(theta, gamma)
        scale = 1.0
        while True:
            trial_gamma = gamma + scale * step_gamma
            if trial_gamma > 0.0:
                trial_theta = theta + scale * step_theta
                trial = likelihood.value(trial_theta, trial_gamma)
                if trial >= current - 1e-12 * abs(current) or scale < 1e-10:
                    break
            scale *= 0.5
        theta, gamma, current = trial_theta, trial_gamma, trial
        if abs(scale * step_gamma) <= 1e-12 * gamma and float(
            np.max(np.abs(scale * step_theta))
        ) <= 1e-9 * (1.0 + float(np.max(np.abs(theta)))):
            break
    values = observed + len(data.censored_at)
    correction = values / (values - positions)
    return TailFit(correction / (gamma * gamma), positions, observed, len(data.censored_at))
