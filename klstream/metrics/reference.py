"""The spec's KL algorithm written plainly, one position at a time, with Python dicts.

It is the executable statement of what :func:`klstream.metrics.estimators.estimate` must compute:
the property tests check the vectorized code against it, and ``bench/kl_bench.py`` times it as
the baseline a user would script themselves. Nothing on a hot path calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

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


def kl_bucket(p_entries: TopList, q_entries: TopList) -> float:
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


def _bisect(above: Callable[[float], bool], lo: float = -700.0, hi: float = 700.0) -> float:
    """The log ρ where ``above`` turns from false to true."""
    for _ in range(200):
        middle = 0.5 * (lo + hi)
        if above(middle):
            hi = middle
        else:
            lo = middle
    return hi


def kl_lower(p_entries: TopList, q_entries: TopList) -> float:
    """The capped bound: the least KL(P‖Q) of any full distributions that agree with both lists.

    Tokens only P lists get q_a = min(q_(k), p_a/ρ_A), tokens only Q lists get
    p_b = min(p_(k), ρ_B·q_b), the unlisted masses form one cell (p_T, q_T). Either that cell
    holds mass and ρ_A = ρ_B = p_T/q_T, or it is empty on both sides, ρ_A making q_T = 0 and
    ρ_B making p_T = 0 with ρ_B ≤ ρ_A (see klstream.metrics.estimators). Plain bisection.
    """
    p = first_occurrences(p_entries)
    q = first_occurrences(q_entries)
    p_only = [math.exp(lp) for key, lp in p.items() if key not in q]
    q_only = [math.exp(lq) for key, lq in q.items() if key not in p]
    cap_p = math.exp(min(lp for _, lp in p_entries))
    cap_q = math.exp(min(lq for _, lq in q_entries))
    rest_p = residual(1.0 - sum(math.exp(lp) for lp in p.values()))
    rest_q = residual(1.0 - sum(math.exp(lq) for lq in q.values()))
    if rest_p == 0.0:
        q_only = []
    shared = sum(math.exp(lp) * (lp - q[key]) for key, lp in p.items() if key in q)

    def q_cells(log_rho: float) -> list[float]:
        return [min(cap_q, p_a / math.exp(log_rho)) for p_a in p_only]

    def p_cells(log_rho: float) -> list[float]:
        return [min(cap_p, math.exp(log_rho) * q_b) for q_b in q_only]

    def q_tail(log_rho: float) -> float:
        return rest_q - sum(q_cells(log_rho))

    def p_tail(log_rho: float) -> float:
        return rest_p - sum(p_cells(log_rho))

    def total(log_rho_a: float, log_rho_b: float, with_tail: bool) -> float:
        q_a, p_b = q_cells(log_rho_a), p_cells(log_rho_b)
        kl = shared + sum(p_a * math.log(p_a / x) for p_a, x in zip(p_only, q_a, strict=True))
        kl += sum(x * math.log(x / q_b) for x, q_b in zip(p_b, q_only, strict=True) if x > 0.0)
        tail_p, tail_q = rest_p - sum(p_b), rest_q - sum(q_a)
        if with_tail and tail_p > 0.0:
            kl += tail_p * math.log(tail_p / tail_q)
        return max(kl, 0.0)

    rho_a = _bisect(lambda x: q_tail(x) > 0.0) if len(p_only) * cap_q > rest_q else None
    p_fits = bool(q_only) and rest_p > 0.0 and len(q_only) * cap_p >= rest_p
    rho_b = _bisect(lambda x: p_tail(x) < 0.0) if p_fits else None
    if rest_q == 0.0 and (p_only or rest_p > 0.0):
        return kl_bucket(p_entries, q_entries)  # Q's unlisted mass unresolved, KL up to +inf
    if rho_a is not None and rho_b is not None and rho_b <= rho_a:
        return total(rho_a, rho_b, with_tail=False)
    if rest_p == 0.0:
        return total(-700.0 if rho_a is None else rho_a, 0.0, with_tail=False)
    rho = _bisect(
        lambda x: math.exp(x) * q_tail(x) > p_tail(x),
        -700.0 if rho_a is None else rho_a,
        700.0 if rho_b is None else rho_b,
    )
    return total(rho, rho, with_tail=True)


def unshared_mass(p_entries: TopList, q_entries: TopList) -> float:
    """m_P: P's mass outside the shared tokens, 0 where the bucket bound merges it away."""
    p = first_occurrences(p_entries)
    q = first_occurrences(q_entries)
    rest_p = residual(1.0 - sum(math.exp(lp) for key, lp in p.items() if key in q))
    rest_q = residual(1.0 - sum(math.exp(q[key]) for key in p if key in q))
    return 0.0 if rest_q == 0.0 < rest_p else rest_p


def kl_estimate(p_entries: TopList, q_entries: TopList, sigma2: float) -> float:
    """The bucket bound plus the KL of a normal log-ratio with variance σ² in its cell."""
    return kl_bucket(p_entries, q_entries) + 0.5 * sigma2 * unshared_mass(p_entries, q_entries)


def tail_observations(
    p_entries: TopList, q_entries: TopList, chosen: Hashable, chosen_logprob: float
) -> tuple[list[float], list[float]]:
    """What the σ̂² fit sees at one position: exact values of r = log p − log q, and lower limits
    of censored ones, for P's tokens but its most probable and for an unlisted chosen token."""
    p = first_occurrences(p_entries)
    q = first_occurrences(q_entries)
    floor_q = min(lq for _, lq in q_entries)
    top = max(p, key=lambda key: p[key])
    values = [(lp, q.get(key)) for key, lp in p.items() if key != top]
    if chosen not in p:
        values.append((chosen_logprob, q.get(chosen)))
    exact = [lp - lq for lp, lq in values if lq is not None]
    censored = [lp - floor_q for lp, lq in values if lq is None]
    return exact, censored


def chosen_logprob_in(q_entries: TopList, chosen: Hashable) -> tuple[float, bool]:
    """Model 2's logprob for Model 1's token, or its floor when the token is not listed."""
    q = first_occurrences(q_entries)
    if chosen in q:
        return q[chosen], True
    return min(lp for _, lp in q_entries), False
