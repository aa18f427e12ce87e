"""The spec's KL algorithm written plainly, one position at a time, with Python dicts.

It is the executable statement of what :func:`klstream.metrics.estimators.estimate` must compute:
the property tests check the vectorized code against it, and ``bench/kl_bench.py`` times it as
the baseline a user would script themselves. Nothing on a hot path calls it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from klstream.metrics.estimators import RESIDUAL_TOLERANCE

TopList = Sequence[tuple[Hashable, float]]


def first_occurrences(entries: TopList) -> dict[Hashable, float]:
    """Key → logprob, keeping the first occurrence of a repeated key."""
    kept: dict[Hashable, float] = {}
    for key, logprob in entries:
        kept.setdefault(key, logprob)
    return kept


def kl_floor(p_entries: TopList, q_entries: TopList) -> float:
    """Union of both top-k sets, floors for missing tokens, normalize, then Σ P·log(P/Q)."""
    p = first_occurrences(p_entries)
    q = first_occurrences(q_entries)
    floor_p = min(lp for _, lp in p_entries)
    floor_q = min(lp for _, lp in q_entries)
    union = list(p) + [key for key in q if key not in p]
    p_probs = {key: math.exp(p.get(key, floor_p)) for key in union}
    q_probs = {key: math.exp(q.get(key, floor_q)) for key in union}
    p_total = sum(p_probs.values())
    q_total = sum(q_probs.values())
    kl = 0.0
    for key in union:
        p_norm = p_probs[key] / p_total
        q_norm = q_probs[key] / q_total
        kl += p_norm * math.log(p_norm / q_norm)
    return kl


def residual(mass: float) -> float:
    return mass if mass > RESIDUAL_TOLERANCE else 0.0


def kl_lower(p_entries: TopList, q_entries: TopList) -> float:
    """Shared tokens each on their own plus one remainder cell (see klstream.metrics.estimators)."""
    p = first_occurrences(p_entries)
    q = first_occurrences(q_entries)
    shared = [key for key in p if key in q]
    if not shared:
        return 0.0
    p_shared = {key: math.exp(p[key]) for key in shared}
    q_shared = {key: math.exp(q[key]) for key in shared}
    rest_p = residual(1.0 - sum(p_shared.values()))
    rest_q = residual(1.0 - sum(q_shared.values()))
    if rest_q == 0.0 < rest_p:
        target = max(shared, key=lambda key: (q_shared[key], p_shared[key]))
        p_shared[target] += rest_p
        rest_p = 0.0
    total = sum(p_shared[key] * math.log(p_shared[key] / q_shared[key]) for key in shared)
    if rest_p > 0.0:
        total += rest_p * math.log(rest_p / rest_q)
    return max(total, 0.0)


def chosen_logprob_in(q_entries: TopList, chosen: Hashable) -> tuple[float, bool]:
    """Model 2's logprob for Model 1's token, or its floor when the token is not listed."""
    q = first_occurrences(q_entries)
    if chosen in q:
        return q[chosen], True
    return min(lp for _, lp in q_entries), False
