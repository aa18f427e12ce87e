"""Per-position divergence estimators from two truncated (top-k) next-token distributions.

Pure, vectorized numpy (no Arrow): every function takes a whole batch of positions at once as padded
``[n, k]`` matrices and never loops over positions in Python. The work per position is O(k):
tokens of the two lists are matched by sorting packed (key, column) integers row by row, never by
comparing every pair, and the KL over the union is assembled from per-row sums (see
:func:`estimate`), so no ``[n, k, k]`` or ``[n, 2k]`` union matrix is built. The capped bound's
root takes a few more passes over the tokens only one list reports.

Tokens are compared by integer *key* (token ids or codes of the token strings; the Arrow columns
become keyed matrices in :mod:`klstream.metrics.columns`). Inside one list a repeated key counts
once, at its first (reported) occurrence.

Estimators, for P = Model 1 and Q = Model 2 at one position:

``kl_floor``
    The spec's algorithm, in the spec's order: take the union of both top-k sets; a token missing
    from one side gets that side's *floor* (its smallest reported logprob); normalize each side
    to sum to 1 over the union; KL(P‖Q) = Σ P·log(P/Q). It is what ``_kl.json`` reports.
``kl_lower``
    The capped bound: a certified lower bound on the true KL(P‖Q) that uses everything the lists
    say. Write I for the tokens both lists report, A for those only P reports, B for those only Q
    reports, p_(k) and q_(k) for each list's smallest probability, and R_p = 1 − Σ(P's list),
    R_q = 1 − Σ(Q's list) for the mass each model puts on tokens it does not list. Full
    distributions that agree with the lists have the reported values on the listed tokens,
    q_a ≤ q_(k) for a in A (else Q would have listed a), p_b ≤ p_(k) for b in B, and the masses
    p_T = R_p − Σ_B p_b ≥ 0, q_T = R_q − Σ_A q_a ≥ 0 on the tokens neither lists. The bound is
    the least KL over all of them. Proof and method:

    1. Merging the tokens neither list reports into one cell never increases KL (log-sum
       inequality), so KL(P‖Q) ≥ F(q_A, p_B) = Σ_I p·log(p/q) + Σ_A p_a·log(p_a/q_a)
       + Σ_B p_b·log(p_b/q_b) + p_T·log(p_T/q_T) at the distributions' own q_A, p_B, which obey
       the caps. Hence KL ≥ min F over the caps: the bound. (With a large enough vocabulary the
       tail can be spread so that the minimum is reached: it is the least KL, not just a bound.)
    2. F is convex (a sum of perspectives of x·log x) and its derivatives are
       ∂F/∂q_a = p_T/q_T − p_a/q_a and ∂F/∂p_b = log(p_b/q_b) − log(p_T/q_T). So at the minimum,
       with ρ = p_T/q_T: q_a = min(q_(k), p_a/ρ), p_b = min(p_(k), ρ·q_b), and ρ solves
       h(ρ) = ρ·q_T(ρ) − p_T(ρ) = 0. As ρ grows q_T(ρ) grows and p_T(ρ) shrinks, so h is
       negative below its root and positive above it wherever the root leaves both cells
       positive; h is piecewise linear in ρ (caps switch at ρ = p_a/q_(k) and ρ = p_(k)/q_b), so
       the root is found exactly, one linear piece at a time, with bisection as a safeguard,
       all positions at once.
    3. If the caps let A take all of R_q and B all of R_p, the minimum may leave the tail empty
       on both sides (p_T = q_T = 0; the root of h then has q_T < 0). The tail term vanishes and
       A and B get their own ratios: q_T(ρ_A) = 0 and p_T(ρ_B) = 0, ρ_B ≤ ρ_A.
    4. It is never below ``kl_bucket``: merging everything outside I into one cell coarsens the
       partition of step 1 further, and that cell holds exactly the bucket's masses.

    Rounding: a remainder at or below ``RESIDUAL_TOLERANCE`` (1e-9, far below what rounded
    logprobs resolve; sums of reported probabilities can exceed 1 by rounding) counts as 0.
    R_p = 0 sets every p_b to 0. R_q = 0 while P has mass outside I (A non-empty or R_p > 0)
    leaves Q's unlisted mass unresolved, the KL anywhere up to +∞, and the bound keeps
    ``kl_bucket`` there. The result is clamped at 0, itself a valid bound.
``kl_bucket``
    The bound ``kl_lower`` used to be, kept for ``kl_estimate`` and the tests: tokens in I each
    in their own cell and one cell holding everything else, with masses m_P = 1 − Σ_I p and
    m_Q = 1 − Σ_I q; by the log-sum inequality Σ_I p·log(p/q) + m_P·log(m_P/m_Q) ≤ KL(P‖Q).
    Edge cases: m_P = 0 contributes 0. m_Q = 0 with m_P > 0 says Q puts all its mass inside I
    while P does not: the true KL would be infinite in exact arithmetic, but reported logprobs
    are rounded, so instead of +inf the cell is merged into the shared token with the largest q
    (ties: the larger p) — a coarser partition, hence still a lower bound up to that rounding,
    and finite. I empty gives 0.
``kl_estimate``
    A model-based point estimate, not a bound: ``kl_bucket`` + m_P·σ̂²/2, the KL inside the
    bucket's cell if r = log p − log q is normally distributed there with variance σ̂², which
    :mod:`klstream.metrics.tailfit` fits once per run and Model 2 (see there for where it reads
    low). :func:`estimate` returns the bucket bound, m_P and the fit's data; the KL pass adds
    the σ̂² term once the fit is done.
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

from klstream.metrics.tailfit import TailObservations

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


def _entries(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and flat indices where a 2-D mask holds, in row order: several times faster than
    ``np.nonzero`` on a 2-D array, and flat indices gather faster than (row, column) pairs."""
    flat = np.flatnonzero(mask)
    return flat // mask.shape[1], flat


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


def _argmax_column(side: TopK, valid: np.ndarray) -> np.ndarray:
    """Each row's most probable entry (the first of equals)."""
    best: np.ndarray = np.where(valid, side.logprobs, -np.inf).argmax(axis=1)
    return best


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
    """Mass left outside some tokens; below RESIDUAL_TOLERANCE it is rounding noise: 0."""
    return np.where(mass > RESIDUAL_TOLERANCE, mass, 0.0)


@dataclass(frozen=True)
class Bucket:
    """The bucket bound and the P mass of its one coarse cell (after the merge edge case)."""

    bound: np.ndarray
    unshared_p: np.ndarray


@dataclass(frozen=True)
class _Shared:
    """The tokens both lists report: their probabilities, and per row their KL terms and masses."""

    p: np.ndarray  # per pair
    q: np.ndarray
    kl: np.ndarray  # per row: Σ p·log(p/q)
    mass_p: np.ndarray  # per row: Σ p
    mass_q: np.ndarray

    @classmethod
    def of(cls, m: Matches, lp_m: np.ndarray, lq_m: np.ndarray) -> _Shared:
        p, q = np.exp(lp_m), np.exp(lq_m)
        return cls(p, q, m.per_row(p * (lp_m - lq_m)), m.per_row(p), m.per_row(q))


def _kl_bucket(m: Matches, lp_m: np.ndarray, lq_m: np.ndarray, shared: _Shared) -> Bucket:
    """The bucket bound documented in the module docstring."""
    rest_p = _residual(1.0 - shared.mass_p)
    rest_q = _residual(1.0 - shared.mass_q)
    merge = (rest_q == 0.0) & (rest_p > 0.0)
    kl = shared.kl
    pairs = np.flatnonzero(merge[m.rows])
    if pairs.size:
        # Largest q, ties to the larger p (so list order cannot matter); first pair per row.
        p_m, q_m = shared.p, shared.q
        ordered = pairs[np.lexsort((-p_m[pairs], -q_m[pairs], m.rows[pairs]))]
        _, first = np.unique(m.rows[ordered], return_index=True)
        target = ordered[first]
        target_rows = m.rows[target]
        merged_p = p_m[target] + rest_p[target_rows]
        kl = kl.copy()
        kl[target_rows] += merged_p * (np.log(merged_p) - lq_m[target]) - p_m[target] * (
            lp_m[target] - lq_m[target]
        )
        rest_p = np.where(merge, 0.0, rest_p)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(rest_p > 0.0, rest_p * (np.log(rest_p) - np.log(rest_q)), 0.0)
    return Bucket(np.maximum(kl + rest, 0.0), rest_p)


_LOG_RATIO_TOLERANCE = 1e-12
_MAX_ROOT_STEPS = 200
"""Far more than needed: the segment steps of :func:`_root` end after a few evaluations, and
every other step halves the bracket, whose ends are differences of log-probabilities."""


@dataclass(frozen=True)
class _OneSided:
    """The tokens only one list reports, one entry per token, for the capped bound.

    ``breaks`` are where a token's cap starts or stops binding, in log ρ: a P-only token's
    q_a = min(q_(k), p_a/ρ) is capped for log ρ < log p_a − log q_(k); a Q-only token's
    p_b = min(p_(k), ρ·q_b) is capped for log ρ > log p_(k) − log q_b. ``capped_kl`` is the
    token's KL term while capped. Entries are flat (a few per row), so an evaluation costs what
    the one-sided tokens cost, not what a full ``[n, k]`` matrix does.
    """

    rows: np.ndarray
    breaks: np.ndarray
    mass: np.ndarray  # p_a for P-only tokens, q_b for Q-only tokens
    capped_kl: np.ndarray
    total: np.ndarray  # Σ mass per row
    count: np.ndarray  # entries per row

    @classmethod
    def of(
        cls, mask: np.ndarray, logprobs: np.ndarray, q_side: bool, other_floor: np.ndarray
    ) -> _OneSided:
        """The entries where ``mask`` holds, from one side's ``[n, k]`` logprobs: P-only tokens
        (break log p_a − log q_(k), capped KL term p_a·break) or Q-only ones (break
        log p_(k) − log q_b, capped KL term p_(k)·break), ``other_floor`` the other side's floor."""
        rows, flat = _entries(mask)
        entry_logprobs = logprobs.reshape(-1)[flat]
        row_floor = other_floor[rows]
        mass = np.exp(entry_logprobs)
        if q_side:
            breaks = row_floor - entry_logprobs
            capped_kl = np.exp(row_floor) * breaks
        else:
            breaks = entry_logprobs - row_floor
            capped_kl = mass * breaks
        n = len(mask)
        return cls(
            rows,
            breaks,
            mass,
            capped_kl,
            np.bincount(rows, mass, n),
            np.bincount(rows, minlength=n).astype(np.float64),
        )

    def without_entries(self) -> _OneSided:
        nothing = np.empty(0)
        zeros = np.zeros(len(self.total))
        return _OneSided(np.empty(0, dtype=np.intp), nothing, nothing, nothing, zeros, zeros)

    def take(self, keep: np.ndarray, renumber: np.ndarray) -> _OneSided:
        """The entries of the rows in ``keep``, rows renumbered as in ``renumber``."""
        entries = keep[self.rows]
        return _OneSided(
            renumber[self.rows[entries]],
            self.breaks[entries],
            self.mass[entries],
            self.capped_kl[entries],
            self.total[keep],
            self.count[keep],
        )

    def capped_sums(self, capped: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: how many entries are capped, their mass and their KL terms."""
        weight = capped.astype(np.float64)
        return (
            np.bincount(self.rows, weight, n),
            np.bincount(self.rows, weight * self.mass, n),
            np.bincount(self.rows, weight * self.capped_kl, n),
        )

    def extreme_break(self, largest: bool) -> np.ndarray:
        """Each row's largest (or smallest) break; ∓inf for rows without entries."""
        extreme = np.full(len(self.total), -np.inf if largest else np.inf)
        (np.maximum if largest else np.minimum).at(extreme, self.rows, self.breaks)
        return extreme


@dataclass(frozen=True)
class _Segment:
    """The piece of h(ρ) = ρ·den − num on which the current caps hold (see :class:`_Unshared`)."""

    capped_p_only: np.ndarray  # how many P-only tokens are capped
    capped_q_only: np.ndarray
    num: np.ndarray  # also the P mass the optimum puts at ratio ρ
    den: np.ndarray
    capped_kl: np.ndarray  # Σ KL terms of the capped tokens
    free_p_only: np.ndarray  # Σ p_a of the P-only tokens not capped

    def take(self, rows: np.ndarray) -> _Segment:
        return _Segment(
            self.capped_p_only[rows],
            self.capped_q_only[rows],
            self.num[rows],
            self.den[rows],
            self.capped_kl[rows],
            self.free_p_only[rows],
        )

    def kl(self, log_rho: np.ndarray) -> np.ndarray:
        """The one-sided tokens' and the tail's KL terms at the optimum on this segment."""
        with np.errstate(invalid="ignore"):
            kl: np.ndarray = self.capped_kl + np.where(self.num > 0.0, self.num * log_rho, 0.0)
        return kl


@dataclass(frozen=True)
class _Unshared:
    """Per row, what the capped bound knows beyond the shared tokens.

    With q_T(ρ) = rest_q − Σ_a min(q_(k), p_a/ρ) and p_T(ρ) = rest_p − Σ_b min(p_(k), ρ·q_b),
    h(ρ) = ρ·q_T − p_T is ρ·den − num on each segment of fixed caps. Dropping the Q-only tokens
    and rest_p leaves h = ρ·q_T, whose root is where q_T reaches 0; dropping the P-only tokens
    and rest_q leaves h = −p_T, whose root is where p_T does.
    """

    p_only: _OneSided
    q_only: _OneSided
    rest_p: np.ndarray  # 1 − Σ of P's whole list: P's mass on tokens it did not list
    rest_q: np.ndarray
    cap_p: np.ndarray  # p_(k), a bound on p for every token P did not list
    cap_q: np.ndarray

    def take(self, keep: np.ndarray) -> _Unshared:
        """The rows where ``keep`` holds."""
        if keep.all():
            return self
        renumber = np.cumsum(keep) - 1
        return _Unshared(
            self.p_only.take(keep, renumber),
            self.q_only.take(keep, renumber),
            self.rest_p[keep],
            self.rest_q[keep],
            self.cap_p[keep],
            self.cap_q[keep],
        )

    def q_side(self) -> _Unshared:
        """Just what decides where q_T reaches 0."""
        zeros = np.zeros(len(self.rest_p))
        return _Unshared(
            self.p_only, self.q_only.without_entries(), zeros, self.rest_q, self.cap_p, self.cap_q
        )

    def p_side(self) -> _Unshared:
        """Just what decides where p_T reaches 0."""
        zeros = np.zeros(len(self.rest_p))
        return _Unshared(
            self.p_only.without_entries(), self.q_only, self.rest_p, zeros, self.cap_p, self.cap_q
        )

    def segment(self, log_rho: np.ndarray) -> _Segment:
        n = len(log_rho)
        a, b = self.p_only, self.q_only
        n_a, capped_mass_a, capped_kl_a = a.capped_sums(a.breaks > log_rho[a.rows], n)
        n_b, capped_mass_b, capped_kl_b = b.capped_sums(b.breaks < log_rho[b.rows], n)
        free_a = a.total - capped_mass_a
        return _Segment(
            n_a,
            n_b,
            num=self.rest_p - n_b * self.cap_p + free_a,
            den=self.rest_q - n_a * self.cap_q + b.total - capped_mass_b,
            capped_kl=capped_kl_a + capped_kl_b,
            free_p_only=free_a,
        )

    def uncapped(self) -> _Segment:
        """The piece of h where no cap binds (its root is the bucket bound's ratio m_P/m_Q)."""
        zeros = np.zeros(len(self.rest_p))
        return _Segment(
            zeros,
            zeros,
            self.rest_p + self.p_only.total,
            self.rest_q + self.q_only.total,
            zeros,
            self.p_only.total,
        )

    def keeps_caps(self, segment: _Segment, log_rho: np.ndarray) -> np.ndarray:
        """Whether ``segment``'s caps still hold at ``log_rho``: cheaper than a new segment."""
        n = len(log_rho)
        a, b = self.p_only, self.q_only
        n_a = np.bincount(a.rows, (a.breaks > log_rho[a.rows]).astype(np.float64), n)
        n_b = np.bincount(b.rows, (b.breaks < log_rho[b.rows]).astype(np.float64), n)
        same: np.ndarray = (n_a == segment.capped_p_only) & (n_b == segment.capped_q_only)
        return same

    def q_tail(self, segment: _Segment, log_rho: np.ndarray) -> np.ndarray:
        """q_T at ``log_rho`` on ``segment``."""
        q_tail: np.ndarray = (
            self.rest_q
            - segment.capped_p_only * self.cap_q
            - segment.free_p_only * np.exp(-log_rho)
        )
        return q_tail


def _root(tail: _Unshared, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, _Segment]:
    """log ρ* with h(ρ*) = 0 and its segment, for rows with h < 0 at ``lo``, h > 0 at ``hi``.

    h is continuous and piecewise linear in ρ. A segment step jumps to the root of the linear
    piece holding the current caps; when the caps still hold there, it is the exact root.
    Otherwise the bracket shrinks and the next point is that step if it lies inside the
    bracket, else the bracket's midpoint. The first piece is the one without caps. Rows step
    together; once at most half of them are left, the finished ones drop out (a finished row
    that stays only repeats its answer).
    """
    n = len(lo)
    log_rho = np.empty(n)
    result = _Segment(*(np.empty(n) for _ in range(6)))
    if not n:
        return log_rho, result
    rows = np.arange(n)
    current = tail.uncapped()
    point: np.ndarray | None = None  # where ``current`` was evaluated; the first piece is given
    for step_index in range(_MAX_ROOT_STEPS):
        if point is not None:
            above = np.exp(point) * current.den > current.num
            hi = np.where(above, point, hi)
            lo = np.where(above, lo, point)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.log(current.num / current.den)
        clipped = np.minimum(np.maximum(step, lo), hi)
        # A root at the bracket's edge may come out a rounding error beyond it.
        from_step = np.isfinite(step) & (
            np.abs(step - clipped) <= _LOG_RATIO_TOLERANCE * (1.0 + np.abs(step))
        )
        done = (from_step & tail.keeps_caps(current, clipped)) | (hi - lo < _LOG_RATIO_TOLERANCE)
        if step_index == _MAX_ROOT_STEPS - 1:
            done[:] = True
        finished = rows[done]
        log_rho[finished] = clipped[done]
        for name in ("capped_p_only", "capped_q_only", "num", "den", "capped_kl", "free_p_only"):
            getattr(result, name)[finished] = getattr(current, name)[done]
        if done.all():
            break
        point = np.where(from_step, clipped, 0.5 * (lo + hi))
        keep = ~done
        if 2 * np.count_nonzero(keep) <= len(keep):
            rows, point, lo, hi = rows[keep], point[keep], lo[keep], hi[keep]
            tail = tail.take(keep)
        current = tail.segment(point)
    return log_rho, result


def _log(values: np.ndarray) -> np.ndarray:
    """log, with log 0 = −inf and no warning."""
    with np.errstate(divide="ignore"):
        logged: np.ndarray = np.log(values)
    return logged


def _kl_capped(
    p: TopK,
    q: TopK,
    ps: SideSums,
    qs: SideSums,
    p_only: np.ndarray,
    q_only: np.ndarray,
    shared: _Shared,
    bucket: np.ndarray,
) -> np.ndarray:
    """The capped bound documented in the module docstring."""
    n = len(p_only)
    rest_p = _residual(1.0 - coverage(p, ps))
    rest_q = _residual(1.0 - coverage(q, qs))
    cap_p = np.exp(p.floor)
    # With no unlisted P mass, every Q-only token must get p_b = 0 and adds nothing: drop them.
    q_only = q_only & (rest_p > 0.0)[:, None]
    a = _OneSided.of(p_only, p.logprobs, q_side=False, other_floor=q.floor)
    b = _OneSided.of(q_only, q.logprobs, q_side=True, other_floor=p.floor)
    unshared = _Unshared(a, b, rest_p, rest_q, cap_p, np.exp(q.floor))
    # Whether q_T (p_T) can reach 0: whether the caps let the one-sided tokens take it all.
    q_can_empty = (a.count > 0) & (a.count * unshared.cap_q > rest_q)
    p_can_empty = (b.count > 0) & (b.count * cap_p >= rest_p)

    outside_shared = np.zeros(n)
    # Both cells hold mass at the optimum: one ratio ρ = p_T/q_T.
    both = (rest_p > 0.0) & (rest_q > 0.0)
    lo = _log(rest_p[both]) - _log(b.total[both] + rest_q[both])
    hi = _log(a.total[both] + rest_p[both]) - _log(rest_q[both])
    log_rho, segment = _root(unshared.take(both), lo, hi)
    outside_shared[both] = segment.kl(log_rho)
    # Unless q_T < 0 there: then the tail is empty at the optimum (p_T = q_T = 0) and the
    # one-sided tokens get separate ratios, where q_T and where p_T reach 0.
    corner = np.zeros(n, dtype=bool)
    corner[both] = unshared.take(both).q_tail(segment, log_rho) < 0.0
    corner &= q_can_empty & p_can_empty
    outside_shared[corner] = 0.0

    q_root = q_can_empty & (rest_q > 0.0) & (corner | (rest_p == 0.0))
    if q_root.any():
        q_tail = unshared.q_side().take(q_root)
        lo = a.extreme_break(largest=False)[q_root]
        hi = _log(a.total[q_root]) - _log(rest_q[q_root])
        log_rho, segment = _root(q_tail, lo, hi)
        outside_shared[q_root] += segment.kl(log_rho)
    # With no P tail, caps that leave room for all of rest_q cap every P-only token.
    all_capped = (rest_p == 0.0) & ~q_can_empty
    if all_capped.any():
        outside_shared[all_capped] = np.bincount(a.rows, a.capped_kl, n)[all_capped]
    if corner.any():
        p_tail = unshared.p_side().take(corner)
        lo = _log(rest_p[corner]) - _log(b.total[corner])
        hi = b.extreme_break(largest=True)[corner]
        log_rho, segment = _root(p_tail, lo, hi)
        outside_shared[corner] += segment.kl(log_rho)

    capped = np.maximum(shared.kl + outside_shared, 0.0)
    # Q's unlisted mass is below what rounding resolves while P needs some: unknown, up to +inf.
    unresolved = (rest_q == 0.0) & ((a.count > 0) | (rest_p > 0.0))
    return np.where(unresolved, bucket, capped)


@dataclass(frozen=True)
class Estimates:
    kl_floor: np.ndarray
    kl_lower: np.ndarray
    kl_bucket: np.ndarray
    unshared_mass1: np.ndarray  # m_P: P's mass outside the shared tokens, the bucket's cell
    logratio: np.ndarray
    model2_logprob: np.ndarray
    m1_token_in_m2_topk: np.ndarray
    top1_agree: np.ndarray
    entropy1: np.ndarray
    entropy2: np.ndarray
    coverage1: np.ndarray
    coverage2: np.ndarray
    tail: TailObservations  # the data kl_estimate's σ̂² is fitted on


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


def kl_bucket(p: TopK, q: TopK) -> np.ndarray:
    """Just the bucket bound (what ``kl_lower`` was before the caps), for a batch."""
    m, _, _ = match(p, q)
    lp_m, lq_m = _matched_logprobs(p, q, m)
    return _kl_bucket(m, lp_m, lq_m, _Shared.of(m, lp_m, lq_m)).bound


def kl_estimate(bucket: np.ndarray, unshared_mass1: np.ndarray, sigma2: float) -> np.ndarray:
    """The model-based point estimate: the bucket bound plus m_P·σ̂²/2 (module docstring)."""
    estimate: np.ndarray = bucket + 0.5 * sigma2 * unshared_mass1
    return estimate


def _tail_observations(
    p: TopK,
    q: TopK,
    m: Matches,
    p_only: np.ndarray,
    p_top: np.ndarray,
    lp_m: np.ndarray,
    lq_m: np.ndarray,
    chosen_in_p: np.ndarray,
    chosen_in_q: np.ndarray,
    chosen_logprob: np.ndarray,
    chosen_q: np.ndarray,
    rows: np.ndarray,
) -> TailObservations:
    """At ``rows``: r = log p − log q of P's tokens but its top one, and of Model 1's token when
    P does not list it; exact where Q lists the token, else known to exceed log p − log q_(k)."""
    n = len(rows)
    local = np.full(len(p_only), -1)
    local[rows] = np.arange(n)
    pair_rows = local[m.rows]
    exact_pairs = (pair_rows >= 0) & (m.p_cols != p_top[m.rows])
    exact_rows, r = pair_rows[exact_pairs], (lp_m - lq_m)[exact_pairs]
    outside_p = ~chosen_in_p[rows]
    chosen_exact = outside_p & chosen_in_q[rows]
    r_chosen = np.where(chosen_exact, chosen_logprob[rows] - chosen_q[rows], 0.0)

    censored = p_only[rows]
    censored[np.arange(n), p_top[rows]] = False
    censored_rows, censored_flat = _entries(censored)
    chosen_censored = np.flatnonzero(outside_p & ~chosen_in_q[rows])
    all_rows = np.concatenate([censored_rows, chosen_censored])
    q_floor = q.floor[rows]
    limits = np.concatenate(
        [
            p.logprobs[rows].reshape(-1)[censored_flat] - q_floor[censored_rows],
            chosen_logprob[rows[chosen_censored]] - q_floor[chosen_censored],
        ]
    )
    order = np.argsort(all_rows, kind="stable")  # row order whatever the batch boundaries
    return TailObservations(
        count=np.bincount(exact_rows, minlength=n) + chosen_exact,
        total=np.bincount(exact_rows, r, n) + r_chosen,
        total_sq=np.bincount(exact_rows, r * r, n) + r_chosen * r_chosen,
        censored_rows=all_rows[order],
        censored_at=limits[order],
    )


def _no_estimates() -> Estimates:
    nothing, no = np.empty(0), np.empty(0, dtype=bool)
    none = np.empty(0, dtype=np.intp)
    return Estimates(
        *(nothing,) * 6,
        no,
        no,
        *(nothing,) * 4,
        tail=TailObservations(nothing, nothing, nothing, none, nothing),
    )


def estimate(
    p: TopK,
    q: TopK,
    chosen_key: np.ndarray,
    chosen_logprob: np.ndarray,
    tail_rows: np.ndarray | None = None,
) -> Estimates:
    """Every estimator for a batch; every row must have non-empty lists on both sides. The σ̂²
    fit's data (``tail``) is for ``tail_rows`` only (all rows by default)."""
    if len(chosen_key) == 0:
        return _no_estimates()
    m, p_valid, q_valid = match(p, q)
    lp_m, lq_m = _matched_logprobs(p, q, m)
    ps, qs = side_sums(p, p_valid), side_sums(q, q_valid)
    p_only, q_only = p_valid.copy(), q_valid.copy()
    p_only.reshape(-1)[m.rows * p.width + m.p_cols] = False
    q_only.reshape(-1)[m.rows * q.width + m.q_cols] = False

    chosen_matches = (q.keys == chosen_key[:, None]) & q_valid
    chosen_in_q = chosen_matches.any(axis=1)
    first_match = chosen_matches.argmax(axis=1)[:, None]
    chosen_q = np.take_along_axis(q.logprobs, first_match, axis=1)[:, 0]
    model2_logprob = np.where(chosen_in_q, chosen_q, q.floor)
    chosen_in_p = ((p.keys == chosen_key[:, None]) & p_valid).any(axis=1)
    p_top, q_top = _argmax_column(p, p_valid), _argmax_column(q, q_valid)
    rows = np.arange(len(p_top))

    shared = _Shared.of(m, lp_m, lq_m)
    bucket = _kl_bucket(m, lp_m, lq_m, shared)
    return Estimates(
        kl_floor=_kl_floor(p, q, ps, qs, m, lp_m, lq_m),
        kl_lower=_kl_capped(p, q, ps, qs, p_only, q_only, shared, bucket.bound),
        kl_bucket=bucket.bound,
        unshared_mass1=bucket.unshared_p,
        logratio=chosen_logprob - model2_logprob,
        model2_logprob=model2_logprob,
        m1_token_in_m2_topk=chosen_in_q,
        top1_agree=p.keys[rows, p_top] == q.keys[rows, q_top],
        entropy1=entropy(p, ps),
        entropy2=entropy(q, qs),
        coverage1=coverage(p, ps),
        coverage2=coverage(q, qs),
        tail=_tail_observations(
            p,
            q,
            m,
            p_only,
            p_top,
            lp_m,
            lq_m,
            chosen_in_p,
            chosen_in_q,
            chosen_logprob,
            chosen_q,
            rows if tail_rows is None else tail_rows,
        ),
    )
