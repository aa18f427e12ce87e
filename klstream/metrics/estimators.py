"""Per-position divergence estimators from two truncated (top-k) next-token distributions.

Pure, vectorized numpy (no Arrow): every function takes a whole batch of positions at once as padded
``[n, k]`` matrices and never loops over positions in Python. The work per position is O(k):
tokens of the two lists are matched by sorting packed (key, column) integers row by row, never by
comparing every pair, and the KL over the union is assembled from per-row sums (see
:func:`estimate`), so no ``[n, k, k]`` or ``[n, 2k]`` union matrix is built.

Tokens are compared by integer *key* (token ids or codes of the token strings; the Arrow columns
become keyed matrices in :mod:`klstream.metrics.columns`). Inside one list a repeated key counts
once, at its first (reported) occurrence.

Estimators, for P = Model 1 and Q = Model 2 at one position:

``kl_floor``
    The spec's algorithm, in the spec's order: take the union of both top-k sets; a token missing
    from one side gets that side's *floor* (its smallest reported logprob); normalize each side
    to sum to 1 over the union; KL(P‖Q) = Σ P·log(P/Q). It is what ``_kl.json`` reports.
``kl_lower``
    A certified lower bound on the true KL(P‖Q). Partition the vocabulary into the tokens S found
    in both lists (each its own cell) and one cell holding everything else, with masses
    r_p = 1 − Σ_S p and r_q = 1 − Σ_S q. Coarse-graining never increases KL (log-sum
    inequality), so Σ_S p·log(p/q) + r_p·log(r_p/r_q) ≤ KL(P‖Q). Edge cases: a remainder at or
    below ``RESIDUAL_TOLERANCE`` (1e-9, far below what rounded logprobs resolve; sums of reported
    probabilities can exceed 1 by rounding) counts as 0. r_p = 0 contributes 0. r_q = 0 with
    r_p > 0 says Q puts all its mass inside S while P does not: the true KL would be infinite in
    exact arithmetic, but reported logprobs are rounded, so instead of +inf the remainder cell is
    merged into the shared token with the largest q (ties: the larger p) — a coarser partition,
    hence still a lower bound up to that rounding, and finite. S empty gives 0. The result is
    clamped at 0, itself a valid bound.
``logratio``
    log P(chosen) − log Q(chosen) for Model 1's sampled token, with Q's floor when the token is
    outside Q's top-k (``m1_token_in_m2_topk`` is then false). Because the token was sampled from
    P, its sum over a response is the Monte Carlo estimate of the sequence-level KL.
``top1_agree``, ``entropy1``/``entropy2``, ``coverage1``/``coverage2``
    Whether both argmax tokens are the same; the entropy of each normalized top-k list; the
    probability mass each top-k list covers (Σ exp(logprob)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESIDUAL_TOLERANCE = 1e-9
_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class TopK:
    """One side's top-k lists for a batch, padded to ``[n, width]``."""

    keys: np.ndarray  # int64, comparable only within a row
    logprobs: np.ndarray  # float64, 0 where not present
    present: np.ndarray  # bool: a reported entry (padding is not)
    floor: np.ndarray  # [n] smallest reported logprob: the stand-in for unlisted tokens
    peak: np.ndarray  # [n] largest reported logprob, to keep exp() in range

    @property
    def width(self) -> int:
        return int(self.keys.shape[1])


def make_topk(keys: np.ndarray, logprobs: np.ndarray, present: np.ndarray) -> TopK:
    n = len(keys)
    if keys.shape[1] == 0:
        empty = np.full(n, np.nan)
        return TopK(keys, logprobs, present, empty, empty)
    if present.all():
        # The usual case: full lists, as APIs return them, most probable first.
        if (logprobs[:, :-1] >= logprobs[:, 1:]).all():
            return TopK(keys, logprobs, present, logprobs[:, -1].copy(), logprobs[:, 0].copy())
        return TopK(keys, logprobs, present, logprobs.min(axis=1), logprobs.max(axis=1))
    return TopK(
        keys=keys,
        logprobs=np.where(present, logprobs, 0.0),
        present=present,
        floor=np.where(present, logprobs, np.inf).min(axis=1),
        peak=np.where(present, logprobs, -np.inf).max(axis=1),
    )


def _rowsum(values: np.ndarray) -> np.ndarray:
    """Row sums through BLAS: several times faster than ``sum(axis=1)`` on short rows."""
    return values @ np.ones(values.shape[1])


def _sort_packed(keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Sort each row of ``key << bits | column``; invalid entries get a key above every real one.

    Returns the sorted packed values, ``bits`` and that sentinel key. Packing lets numpy's fast
    row sort carry the column along; int32 is used whenever the values fit.
    """
    width = keys.shape[1]
    bits = max(1, (width - 1).bit_length())
    if not valid.any():
        return np.zeros(keys.shape, dtype=np.int32), bits, 0
    full = valid.all()
    if full:
        low, high = int(keys.min()), int(keys.max())
    else:
        low = int(np.min(keys, where=valid, initial=np.iinfo(np.int64).max))
        high = int(np.max(keys, where=valid, initial=low))
    sentinel = high - low + 1
    if sentinel < 1 << (62 - bits):
        shifted = (keys - low if low else keys) if full else np.where(valid, keys - low, sentinel)
    else:
        ranks = np.unique(np.where(valid, keys, low), return_inverse=True)[1].reshape(keys.shape)
        sentinel = int(ranks.max()) + 1
        shifted = np.where(valid, ranks, sentinel)
    dtype = np.int32 if ((sentinel << bits) | (width - 1)) <= _INT32_LIMIT else np.int64
    packed = (shifted.astype(dtype) << bits) | np.arange(width, dtype=dtype)
    packed.sort(axis=1)
    return packed, bits, sentinel


def first_occurrences(side: TopK, rows: np.ndarray | None = None) -> np.ndarray:
    """Which entries count: reported, and the first of their key in the row.

    With ``rows``, only those rows are examined (others are taken as free of repeats).
    """
    valid = side.present.copy()
    keys = side.keys if rows is None else side.keys[rows]
    present = side.present if rows is None else side.present[rows]
    packed, bits, sentinel = _sort_packed(keys, present)
    key = packed >> bits
    repeat = (key[:, 1:] == key[:, :-1]) & (key[:, 1:] != sentinel)
    local_rows, slots = np.nonzero(repeat)
    later = (packed[local_rows, slots + 1] & ((1 << bits) - 1)).astype(np.intp)
    valid[local_rows if rows is None else rows[local_rows], later] = False
    return valid


@dataclass(frozen=True)
class Matches:
    """The pairs (row, P column, Q column) of tokens present in both lists, in row order."""

    rows: np.ndarray
    p_cols: np.ndarray
    q_cols: np.ndarray
    counts: np.ndarray  # pairs per row

    @classmethod
    def of(cls, rows: np.ndarray, p_cols: np.ndarray, q_cols: np.ndarray, n: int) -> Matches:
        return cls(rows, p_cols, q_cols, np.bincount(rows, minlength=n))

    def per_row(self, values: np.ndarray) -> np.ndarray:
        """Σ of ``values`` (one per pair) for each row: a segmented sum, 0 for rows without."""
        starts = np.cumsum(self.counts) - self.counts
        # A trailing 0 gives rows that start past the last pair a valid index; reduceat returns
        # a lone element for an empty segment, which the where() zeroes.
        sums = np.add.reduceat(np.append(values, 0.0), starts)
        return np.where(self.counts > 0, sums, 0.0)


def _match_or_find_repeats(
    p: TopK, q: TopK, p_valid: np.ndarray, q_valid: np.ndarray
) -> tuple[Matches, np.ndarray]:
    """Sort each row's packed keys of both lists together; return the shared pairs and the
    rows in which a list repeats a key (their pairs are not to be trusted)."""
    valid = np.concatenate([p_valid, q_valid], axis=1)
    packed, bits, sentinel = _sort_packed(np.concatenate([p.keys, q.keys], axis=1), valid)
    key = packed >> bits
    same = key[:, 1:] == key[:, :-1]
    if not valid.all():
        same &= key[:, 1:] != sentinel
    n = len(packed)
    counts = np.count_nonzero(same, axis=1)
    rows = np.repeat(np.arange(n), counts)
    left_at = np.flatnonzero(same) + rows  # same[r, s] compares packed[r, s] and packed[r, s + 1]
    column_mask = (1 << bits) - 1
    flat_packed = packed.reshape(-1)
    left = flat_packed[left_at] & column_mask
    right = flat_packed[left_at + 1] & column_mask
    pair = (left < p.width) & (right >= p.width)
    if pair.all():
        return Matches(rows, left, right - p.width, counts), np.empty(0, dtype=np.intp)
    return (
        Matches.of(rows[pair], left[pair], right[pair] - p.width, n),
        np.unique(rows[~pair]),
    )


def match(p: TopK, q: TopK) -> tuple[Matches, np.ndarray, np.ndarray]:
    """Tokens present in both lists, found by sorting, not by comparing every pair.

    After a row sort of both lists' packed keys, a shared token is two neighbours with one key,
    the P entry first (its column is smaller). A list that repeats a key breaks that pattern;
    such rows (rare) are cleaned with :func:`first_occurrences` and matched again.
    Returns the matches and the valid masks of P and Q.
    """
    p_valid, q_valid = p.present, q.present
    matches, repeat_rows = _match_or_find_repeats(p, q, p_valid, q_valid)
    if repeat_rows.size:
        p_valid = first_occurrences(p, repeat_rows)
        q_valid = first_occurrences(q, repeat_rows)
        matches, _ = _match_or_find_repeats(p, q, p_valid, q_valid)
    return matches, p_valid, q_valid


@dataclass(frozen=True)
class SideSums:
    """Per-row sums over one side's valid entries, with exp() taken relative to the peak."""

    count: np.ndarray
    scaled_mass: np.ndarray  # Σ exp(lp - peak)
    scaled_mass_logprob: np.ndarray  # Σ exp(lp - peak) · lp
    logprob_sum: np.ndarray  # Σ lp


def side_sums(side: TopK, valid: np.ndarray) -> SideSums:
    scaled = np.exp(side.logprobs - side.peak[:, None])
    if valid.all():
        logprobs = side.logprobs
        count = np.full(len(valid), float(side.width))
    else:
        weight = valid.astype(np.float64)
        scaled *= weight
        logprobs = side.logprobs * weight
        count = _rowsum(weight)
    return SideSums(
        count=count,
        scaled_mass=_rowsum(scaled),
        scaled_mass_logprob=_rowsum(scaled * logprobs),
        logprob_sum=_rowsum(logprobs),
    )


def entropy(side: TopK, sums: SideSums) -> np.ndarray:
    """Entropy (nats) of each row's top-k list renormalized to sum to 1."""
    log_z = side.peak + np.log(sums.scaled_mass)
    entropies: np.ndarray = np.maximum(log_z - sums.scaled_mass_logprob / sums.scaled_mass, 0.0)
    return entropies


def coverage(side: TopK, sums: SideSums) -> np.ndarray:
    """Probability mass each row's top-k list reports."""
    mass: np.ndarray = np.exp(side.peak) * sums.scaled_mass
    return mass


def _argmax_key(side: TopK, valid: np.ndarray) -> np.ndarray:
    best = np.where(valid, side.logprobs, -np.inf).argmax(axis=1)
    return np.take_along_axis(side.keys, best[:, None], axis=1)[:, 0]


def _kl_floor(
    p: TopK, q: TopK, ps: SideSums, qs: SideSums, m: Matches, lp_m: np.ndarray, lq_m: np.ndarray
) -> np.ndarray:
    """The spec's union-with-floors KL, from per-row sums instead of a union matrix.

    Over the union U, with p_u = exp(lp_u - peak_p) (P's floor for tokens P lacks) and likewise
    q: KL = Σ_U p_u (lp_u - lq_u) / Z_p - log Z_p + log Z_q, where the Z are the normalizers of
    the unscaled values. Σ_U splits into P's entries (shared or not) and Q's entries alone.
    """
    shared = m.counts
    pe_m = np.exp(lp_m - p.peak[m.rows])
    shared_mass = m.per_row(pe_m)
    shared_mass_lq = m.per_row(pe_m * lq_m)
    shared_lq = m.per_row(lq_m)
    q_only = qs.count - shared
    floor_p_scaled = np.exp(p.floor - p.peak)
    z_p = ps.scaled_mass + q_only * floor_p_scaled
    z_q = qs.scaled_mass + (ps.count - shared) * np.exp(q.floor - q.peak)
    numerator = (
        ps.scaled_mass_logprob
        - shared_mass_lq
        - q.floor * (ps.scaled_mass - shared_mass)
        + floor_p_scaled * (q_only * p.floor - (qs.logprob_sum - shared_lq))
    )
    kl = numerator / z_p - (p.peak + np.log(z_p)) + (q.peak + np.log(z_q))
    clamped: np.ndarray = np.maximum(kl, 0.0)
    return clamped


def _residual(mass: np.ndarray) -> np.ndarray:
    """Mass left outside the shared tokens; below RESIDUAL_TOLERANCE it is rounding noise: 0."""
    return np.where(mass > RESIDUAL_TOLERANCE, mass, 0.0)


def _kl_lower(m: Matches, lp_m: np.ndarray, lq_m: np.ndarray) -> np.ndarray:
    """The coarse-grained bound documented in the module docstring."""
    p_m, q_m = np.exp(lp_m), np.exp(lq_m)
    terms = p_m * (lp_m - lq_m)
    rest_p = _residual(1.0 - m.per_row(p_m))
    rest_q = _residual(1.0 - m.per_row(q_m))
    merge = (rest_q == 0.0) & (rest_p > 0.0)
    pairs = np.flatnonzero(merge[m.rows])
    if pairs.size:
        # Largest q, ties to the larger p (so list order cannot matter); first pair per row.
        ordered = pairs[np.lexsort((-p_m[pairs], -q_m[pairs], m.rows[pairs]))]
        _, first = np.unique(m.rows[ordered], return_index=True)
        target = ordered[first]
        merged_p = p_m[target] + rest_p[m.rows[target]]
        terms[target] = merged_p * (np.log(merged_p) - lq_m[target])
        rest_p = np.where(merge, 0.0, rest_p)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(rest_p > 0.0, rest_p * (np.log(rest_p) - np.log(rest_q)), 0.0)
    bound: np.ndarray = np.maximum(m.per_row(terms) + rest, 0.0)
    return bound


@dataclass(frozen=True)
class Estimates:
    kl_floor: np.ndarray
    kl_lower: np.ndarray
    logratio: np.ndarray
    model2_logprob: np.ndarray
    m1_token_in_m2_topk: np.ndarray
    top1_agree: np.ndarray
    entropy1: np.ndarray
    entropy2: np.ndarray
    coverage1: np.ndarray
    coverage2: np.ndarray


def _matched_logprobs(p: TopK, q: TopK, m: Matches) -> tuple[np.ndarray, np.ndarray]:
    return (
        p.logprobs.reshape(-1)[m.rows * p.width + m.p_cols],
        q.logprobs.reshape(-1)[m.rows * q.width + m.q_cols],
    )


def model1_only(p: TopK) -> tuple[np.ndarray, np.ndarray]:
    """Entropy and coverage of Model 1's lists, for positions without a Model 2 result."""
    sums = side_sums(p, first_occurrences(p))
    return entropy(p, sums), coverage(p, sums)


def kl_floor(p: TopK, q: TopK) -> np.ndarray:
    """Just the spec's KL, for a batch; every row must have non-empty lists on both sides."""
    m, p_valid, q_valid = match(p, q)
    lp_m, lq_m = _matched_logprobs(p, q, m)
    return _kl_floor(p, q, side_sums(p, p_valid), side_sums(q, q_valid), m, lp_m, lq_m)


def estimate(p: TopK, q: TopK, chosen_key: np.ndarray, chosen_logprob: np.ndarray) -> Estimates:
    """Every estimator for a batch; every row must have non-empty lists on both sides."""
    if len(chosen_key) == 0:
        nothing, no = np.empty(0), np.empty(0, dtype=bool)
        return Estimates(
            nothing, nothing, nothing, nothing, no, no, nothing, nothing, nothing, nothing
        )
    m, p_valid, q_valid = match(p, q)
    lp_m, lq_m = _matched_logprobs(p, q, m)
    ps, qs = side_sums(p, p_valid), side_sums(q, q_valid)

    chosen_matches = (q.keys == chosen_key[:, None]) & q_valid
    chosen_in_q = chosen_matches.any(axis=1)
    first_match = chosen_matches.argmax(axis=1)[:, None]
    chosen_q = np.take_along_axis(q.logprobs, first_match, axis=1)[:, 0]
    model2_logprob = np.where(chosen_in_q, chosen_q, q.floor)

    return Estimates(
        kl_floor=_kl_floor(p, q, ps, qs, m, lp_m, lq_m),
        kl_lower=_kl_lower(m, lp_m, lq_m),
        logratio=chosen_logprob - model2_logprob,
        model2_logprob=model2_logprob,
        m1_token_in_m2_topk=chosen_in_q,
        top1_agree=_argmax_key(p, p_valid) == _argmax_key(q, q_valid),
        entropy1=entropy(p, ps),
        entropy2=entropy(q, qs),
        coverage1=coverage(p, ps),
        coverage2=coverage(q, qs),
    )
