"""Per-position acceptance: the chance that Model 2's token at a position is Model 1's token.

A lookahead step is a result only while every token Model 2 generated before it is Model 1's, so
the cost of asking for N tokens turns on these chances one position at a time. Model 1's own
logprobs predict them: where Model 1 took its own most likely token by a wide margin a near
Model 2 usually generates it too (greedy decoding almost always), and under sampling Model 2
draws a token with about the probability Model 1 gave it. :class:`AcceptanceModel` is a small
logistic model on those features (:func:`features`), starting from a prior that says exactly
that and refitted online on every comparison the run's answers make — step 0 of a one-token
answer included, as its chosen token is Model 2's choice at that position.

Pure numpy: the prefill scheduler, the batch rounds, the dry run and the tests share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FEATURE_NAMES = ("bias", "logit_probability", "own_top", "margin")
"""The columns of :func:`features`."""
CLIP = 8.0
"""Bound on the logit and the margin features: beyond it a token is as sure (or as unlikely) as
it gets, and a few extreme positions must not swing the fit."""
PRIORS = {
    "sample": np.array([0.0, 1.0, 0.0, 0.0]),
    "greedy": np.array([-3.0, 0.0, 5.0, 0.5]),
}
"""Starting weights by decoding. Sampling: Model 2 draws Model 1's token with Model 1's
probability of it. Greedy: Model 2's top token is Model 1's where that is Model 1's own top token
(about 0.9 at a margin of one nat), rarely where it is not."""
PRIOR_STRENGTH = np.array([0.1, 4.0, 4.0, 4.0])
"""How many comparisons the prior weighs, per weight (a ridge penalty towards :data:`PRIORS`):
hardly any on the bias, so the run's own rate of acceptance takes over within its first answers
(a far pair must not be asked for long lookaheads on the prior's word), more on how the
features shape it."""
REFIT_GROWTH = 0.25
"""Refit once the comparisons have grown by this share (and by :data:`REFIT_MIN` at least)
since the last fit: early answers move the model at once, later ones in batches."""
REFIT_MIN = 8
MAX_OBSERVATIONS = 50_000
"""The most recent comparisons a fit uses: memory and refit time stay bounded on long runs."""
NEWTON_STEPS = 8
HALVINGS = 20


FEATURE_COLUMNS = ("logprob", "own_top", "margin")
"""The columns :func:`features` reads, as ``sql/pending_positions.sql``,
``sql/calibration_sites.sql`` and ``sql/acceptance_so_far.sql`` name them."""


def row_features(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """:func:`features` of query rows carrying :data:`FEATURE_COLUMNS` (null as NaN)."""
    return features(
        *(np.array([row[name] for row in rows], dtype=np.float64) for name in FEATURE_COLUMNS)
    )


def features(logprob: np.ndarray, own_top: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Rows ``[1, logit p, own top, margin]`` per position, from Model 1's logprob of its token,
    whether it is its own top token, and that logprob minus the best other token's (positive
    exactly when it is the top one). NaN (no top-k list in the input) counts as 0."""
    logprob = np.minimum(np.nan_to_num(np.asarray(logprob, dtype=np.float64), nan=-1.0), -1e-9)
    logit = np.clip(logprob - np.log(-np.expm1(logprob)), -CLIP, CLIP)
    top = np.nan_to_num(np.asarray(own_top, dtype=np.float64), nan=0.0)
    gap = np.clip(np.nan_to_num(np.asarray(margin, dtype=np.float64), nan=0.0), -CLIP, CLIP)
    return np.column_stack([np.ones_like(logit), logit, top, gap])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


class AcceptanceModel:
    """The chance of acceptance at a position given its :func:`features`, for one decoding,
    calibrated on the comparisons of this run's answers (a ridge logistic regression)."""

    def __init__(self, decoding: str) -> None:
        self.prior = PRIORS[decoding]
        self.weights = self.prior.copy()
        self._rows: list[np.ndarray] = []
        self._outcomes: list[np.ndarray] = []
        self.observations = 0
        self.agreed = 0
        self._fitted_at = 0

    def observe(self, rows: np.ndarray, agreed: np.ndarray) -> None:
        """Add comparisons: at positions with feature ``rows``, whether Model 2's generated
        token was Model 1's; refit when enough are new."""
        if len(rows) == 0:
            return
        self._rows.append(np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURE_NAMES)))
        self._outcomes.append(np.asarray(agreed, dtype=np.float64).reshape(-1))
        self.observations += len(rows)
        self.agreed += int(np.sum(agreed))
        new = self.observations - self._fitted_at
        if new >= max(REFIT_MIN, REFIT_GROWTH * self._fitted_at):
            self._refit()

    def _refit(self) -> None:
        x = np.concatenate(self._rows)[-MAX_OBSERVATIONS:]
        y = np.concatenate(self._outcomes)[-MAX_OBSERVATIONS:]
        self._rows, self._outcomes = [x], [y]
        ridge = np.diag(PRIOR_STRENGTH)

        def loss(w: np.ndarray) -> float:
            z = x @ w
            offset = w - self.prior
            return float(np.sum(np.logaddexp(0.0, z) - y * z) + offset @ ridge @ offset / 2)

        w = self.weights.copy()
        current = loss(w)
        for _ in range(NEWTON_STEPS):
            p = _sigmoid(x @ w)
            gradient = x.T @ (p - y) + ridge @ (w - self.prior)
            hessian = (x * (p * (1.0 - p))[:, None]).T @ x + ridge
            step = np.linalg.solve(hessian, gradient)
            # Newton's full step overshoots where the sigmoid is flat: halve it until it helps.
            for _ in range(HALVINGS):
                trial = loss(w - step)
                if trial <= current:
                    break
                step = step / 2
            else:
                break
            w, current = w - step, trial
        self.weights = w
        self._fitted_at = self.observations

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """The chance of acceptance at each row's position."""
        return _sigmoid(np.asarray(rows, dtype=np.float64) @ self.weights)


def survival(accept: np.ndarray) -> np.ndarray:
    """``S[k]`` for k = 0..len(accept): the chance that the first k generated tokens of a
    request are all Model 1's (``S[0]`` = 1), when the k-th is with chance ``accept[k-1]``."""
    return np.concatenate(([1.0], np.cumprod(np.clip(accept, 0.0, 1.0))))


def best_lookahead(
    accept: np.ndarray, request_cost: float, token_cost: float, left: int, hurdle: float = 0.0
) -> int:
    """Tokens a request should ask for, given the chances ``accept`` of acceptance at the
    positions from its own on (at least ``left - 1`` of them, or all up to the longest
    lookahead considered), what a request costs beyond its output (input, thoughts) and what
    one output token costs.

    Every position needs its token billed once whatever the lookahead, so asking for N costs
    the tokens past the first disagreement (``N - sum(S[:N])`` expected) and, if all N are
    accepted before the piece's ``left`` positions end, one more request than a request that
    would have asked for enough (chance ``S[N]``): N is the least of the two's sum. A request
    never asks past the piece, and N = 1 costs no waste, so the choice is never dearer than one
    token per request under the model. With a ``hurdle`` more than one token is asked for only
    where that is expected to save at least ``hurdle`` over one token.
    """
    most = min(left, len(accept))
    if most <= 1:
        return 1
    s = survival(accept[:most])
    asked = np.arange(1, most + 1)
    wasted = asked - np.cumsum(s[:most])
    cut = np.where(asked < left, s[1 : most + 1], 0.0)
    cost = token_cost * wasted + request_cost * cut
    best = int(np.argmin(cost))
    return int(asked[best]) if cost[0] - cost[best] >= hurdle else 1


def auto_lookaheads(
    accept: np.ndarray, request_costs: np.ndarray, token_cost: float, most: int
) -> np.ndarray:
    """:func:`best_lookahead` at every position of one piece of a response, as a request there
    would choose it, looking at most ``most`` positions ahead."""
    size = len(accept)
    return np.array(
        [
            best_lookahead(accept[s : s + most], float(request_costs[s]), token_cost, size - s)
            for s in range(size)
        ],
        dtype=np.int64,
    )


def chain_starts(accept: np.ndarray, asked: np.ndarray) -> np.ndarray:
    """The chance that a request starts at each position of one piece of a response, when the
    first starts at its first position, a request at s asks for ``asked[s]`` tokens and covers
    k < N of them with chance ``S[k-1] (1 - accept[s+k-1])``, all N with ``S[N-1]``, and the next
    starts where it stopped covering. Its sum is the expected number of requests."""
    size = len(accept)
    starts = np.zeros(size + 1)
    if size:
        starts[0] = 1.0
    for s in range(size):
        if starts[s] == 0.0:
            continue
        n = int(min(asked[s], size - s))
        ahead = np.clip(accept[s : s + n], 0.0, 1.0)
        alive = survival(ahead[: n - 1])
        covered = np.append(alive[: n - 1] * (1.0 - ahead[: n - 1]), alive[n - 1])
        starts[s + 1 : s + n + 1] += starts[s] * covered
    return starts[:size]
