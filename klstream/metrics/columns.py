"""Arrow columns → the padded, keyed matrices the estimators work on.

The KL pass reads top-k lists as Arrow ``list<...>`` columns; :mod:`klstream.metrics.estimators`
wants dense ``[n, k]`` numpy matrices with integer keys. This module does that conversion once per
batch, without a Python loop over positions.

Tokens are compared by *key*. A position uses token ids as keys when Model 1's list, Model 2's list
and Model 1's chosen token all carry ids; otherwise it uses codes of the token strings, shared
across the batch so that equal strings get equal codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from klstream.metrics.estimators import TopK, make_topk

NO_ID = -1


def pad_list_array(lists: pa.Array, fill: float | int) -> tuple[np.ndarray, np.ndarray]:
    """A list array as a dense ``[n, width]`` matrix plus a presence mask.

    The matrix is float64 for a float ``fill`` and int64 otherwise; null elements become
    ``fill`` and are not present. Lists of one common length (the usual top-k) are reshaped
    without a scatter. Works on sliced arrays.
    """
    offsets = lists.offsets.to_numpy()
    start, stop = int(offsets[0]), int(offsets[-1])
    offsets = offsets - start
    lengths = np.diff(offsets)
    n = len(lists)
    width = int(lengths.max()) if n else 0
    values = lists.values.slice(start, stop - start)
    dtype = np.float64 if isinstance(fill, float) else np.int64
    flat = pc.fill_null(values, fill).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    flat_present = (
        np.ones(len(values), dtype=bool)
        if values.null_count == 0
        else values.is_valid().to_numpy(zero_copy_only=False)
    )
    if n and int(lengths.min()) == width:
        return flat.reshape(n, width), flat_present.reshape(n, width)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(stop - start) - np.repeat(offsets[:-1], lengths)
    dense = np.full((n, width), fill, dtype=dtype)
    present = np.zeros((n, width), dtype=bool)
    dense[rows, cols] = flat
    present[rows, cols] = flat_present
    return dense, present


@dataclass(frozen=True)
class SideColumns:
    """Arrow columns describing one model's top-k lists at a batch of positions."""

    tokens: pa.Array  # list<string>
    token_ids: pa.Array  # list<int64>, null elements where unknown
    logprobs: pa.Array  # list<float64>


def keyed_sides(
    m1: SideColumns, m2: SideColumns | None, chosen_token: pa.Array, chosen_id: pa.Array
) -> tuple[TopK, TopK | None, np.ndarray]:
    """Turn Arrow columns into keyed :class:`TopK` matrices (ids where complete, else strings).

    A row uses ids when Model 1's list, Model 2's list (if given) and the chosen token all
    carry them; otherwise its keys are codes of the token strings, shared across the batch.
    """
    lp1, present1 = pad_list_array(m1.logprobs, np.nan)
    ids1, has_id1 = pad_list_array(m1.token_ids, NO_ID)
    chosen_ids = pc.fill_null(chosen_id, NO_ID).to_numpy(zero_copy_only=False).astype(np.int64)
    use_ids = _complete_ids(has_id1, present1) & chosen_id.is_valid().to_numpy(zero_copy_only=False)
    sides = [(m1, lp1, present1, ids1)]
    if m2 is not None:
        lp2, present2 = pad_list_array(m2.logprobs, np.nan)
        ids2, has_id2 = pad_list_array(m2.token_ids, NO_ID)
        use_ids &= _complete_ids(has_id2, present2)
        sides.append((m2, lp2, present2, ids2))

    chosen_keys = chosen_ids
    string_keys: list[np.ndarray] = []
    if not use_ids.all():
        string_keys, chosen_codes = _string_codes([side[0].tokens for side in sides], chosen_token)
        chosen_keys = np.where(use_ids, chosen_ids, chosen_codes)

    built = []
    for index, (_, lp, present, ids) in enumerate(sides):
        keys = np.where(use_ids[:, None], ids, string_keys[index]) if string_keys else ids
        built.append(make_topk(keys, lp, present))
    return built[0], (built[1] if m2 is not None else None), chosen_keys


def _complete_ids(has_id: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rows whose every reported entry carries an id."""
    if has_id.all():
        return np.ones(len(has_id), dtype=bool)
    complete: np.ndarray = (has_id | ~present).all(axis=1)
    return complete


def _string_codes(
    token_lists: list[pa.Array], chosen_token: pa.Array
) -> tuple[list[np.ndarray], np.ndarray]:
    """Integer codes for token strings, shared across the given lists and the chosen tokens."""
    flats = [lists.flatten().cast(pa.string()) for lists in token_lists]
    encoded = pc.dictionary_encode(pa.concat_arrays([*flats, chosen_token.cast(pa.string())]))
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    padded = []
    start = 0
    for lists, flat in zip(token_lists, flats, strict=True):
        offsets = lists.offsets.to_numpy()
        code_lists = pa.ListArray.from_arrays(
            pa.array(offsets - offsets[0], pa.int32()), pa.array(codes[start : start + len(flat)])
        )
        padded.append(pad_list_array(code_lists, NO_ID)[0])
        start += len(flat)
    return padded, codes[start:]
