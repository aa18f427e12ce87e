"""The answer journal: exact round-trip, torn and corrupt records, segments, the compaction
protocol at every crash point, threads, and real processes killed with SIGKILL."""

from __future__ import annotations

import errno
import math
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from journalrows import answer

from klstream.errors import RunDirError
from klstream.storage.atomic import atomic_path, temporary_sibling
from klstream.storage.journal import (
    RECORD_HEADER,
    RECORD_MAGIC,
    SEGMENT_HEADER,
    SEGMENT_MAGIC,
    AnswerJournal,
    Segment,
    SegmentReplay,
    encode_answer,
    read_segment,
    replay,
    rows_table,
)
from klstream.storage.rundir import PART_GLOB, RunDir
from klstream.storage.schemas import SCORES

M2 = "models/gemini-2.0-flash"
Rows = list[dict[str, Any]]


def same(a: object, b: object) -> bool:
    """Equality that tells -0.0 from 0.0 (bit for bit) and takes NaN as equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, datetime) and isinstance(b, datetime):
        return a == b and a.utcoffset() is not None and b.utcoffset() is not None
    return type(a) is type(b) and a == b


def compact(journal: AnswerJournal, found: SegmentReplay) -> None:
    """The caller's side of the crash protocol (steps 3 to 5): write the segment's part unless
    it exists, then discard the segment."""
    if found.records and not journal.is_compacted(found.segment):
        with atomic_path(journal.part_path(found.segment)) as tmp:
            pq.write_table(rows_table(found.records), tmp)
    journal.discard(found.segment)


def stored_request_ids(run: RunDir) -> list[str]:
    parts = run.score_parts(M2)
    return [rid for part in parts for rid in pq.read_table(part).column("request_id").to_pylist()]


def answer_ids(answers: list[Rows]) -> list[str]:
    return [row["request_id"] for rows in answers for row in rows]


def current_segment(run: RunDir) -> Path:
    return run.journal_segments(M2)[-1]


# --- Encoding ---------------------------------------------------------------------------------

_FLOATS = st.floats() | st.sampled_from(
    [-0.0, 0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -math.inf]
)
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_INT32 = st.integers(-(2**31), 2**31 - 1)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11, seconds=7))]
)


def _nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


_ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "stem": _TEXT,
            "response_index": _INT32,
            "position": _INT32,
            "model2": _TEXT,
            "status": st.sampled_from(["ok", "error"]),
            "top_tokens": _nullable(st.lists(_nullable(_TEXT), max_size=20)),
            "top_token_ids": _nullable(st.lists(_nullable(_INT64), max_size=20)),
            "top_logprobs": _nullable(st.lists(_nullable(_FLOATS), max_size=20)),
            "chosen_token": _nullable(_TEXT),
            "chosen_token_id": _nullable(_INT64),
            "chosen_logprob": _nullable(_FLOATS),
            "finish_reason": _nullable(_TEXT),
            "attempts": _INT32,
            "latency_ms": _FLOATS,
            "error": _nullable(_TEXT),
            "scored_at": st.datetimes(
                min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=_ZONES
            ),
            "source": _nullable(st.sampled_from(["online", "batch"])),
            "request_id": _nullable(_TEXT),
            "step": _nullable(_INT32),
            "lookahead": _nullable(_INT32),
            "decoding": _nullable(_TEXT),
            "prompt_token_count": _nullable(_INT64),
            "cached_content_token_count": _nullable(_INT64),
            "candidates_token_count": _nullable(_INT64),
            "thoughts_token_count": _nullable(_INT64),
        }
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_ROWS, min_size=1, max_size=4))
def test_rows_round_trip_exactly(answers: list[Rows]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        run = RunDir(Path(directory))
        with AnswerJournal.open(run, M2) as journal:
            for rows in answers:
                journal.append(rows)
            found = replay(run, M2)
    assert found.dropped_bytes == 0
    assert same(found.records, answers)
    for rows in found.records:
        assert all(row["scored_at"].tzinfo is UTC for row in rows)
    # The table a part is built from holds what Arrow makes of the original rows.
    expected = pa.Table.from_pylist([row for rows in answers for row in rows], schema=SCORES)
    table = rows_table(found.records)
    assert table.schema == SCORES
    assert same(table.to_pylist(), expected.to_pylist())


def test_edge_values_round_trip(tmp_path: Path) -> None:
    rows = answer("edge", 0, 2)
    rows[0].update(
        top_tokens=["", "\x00", "\u2028", "🦜", "e\u0301", "中文", None, '"\\'],
        top_token_ids=[-(2**63), 2**63 - 1, None, 0, 1, 2, 3, 4],
        top_logprobs=[-0.0, 5e-324, 1.7976931348623157e308, math.nan, math.inf, -math.inf, 0.1, 0],
        chosen_token=None,
        scored_at=datetime(2025, 3, 1, 12, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=-3))),
    )
    rows[1].update(top_tokens=None, top_token_ids=None, top_logprobs=None, error="boom")
    del rows[1]["thoughts_token_count"]  # an absent key stays absent, and is a null in the table
    with AnswerJournal.open(RunDir(tmp_path), M2) as journal:
        journal.append(rows)
    (found,) = replay(RunDir(tmp_path), M2).records
    assert same(found, rows)
    assert found[0]["scored_at"] == datetime(2025, 3, 1, 15, 0, 0, 999_999, tzinfo=UTC)
    assert found[0]["scored_at"].tzinfo is UTC
    assert rows_table([found]).column("thoughts_token_count").to_pylist() == [0, None]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_tokens": ["fine", "\ud83d"]}, "lone UTF-16 surrogate"),
        ({"chosen_token": "\udc00x"}, "lone UTF-16 surrogate"),
        ({"scored_at": datetime(2025, 1, 1)}, "timezone-aware"),
        ({"scored_at": None}, "timezone-aware"),
    ],
)
def test_rows_scores_cannot_hold_are_refused_before_writing(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    run = RunDir(tmp_path)
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("a", 0, 1))
        size = current_segment(run).stat().st_size
        bad = answer("a", 1, 2)
        bad[1].update(change)
        with pytest.raises((ValueError, TypeError), match=message):
            journal.append(bad)
        assert current_segment(run).stat().st_size == size
        journal.append(answer("a", 2, 1))
        assert answer_ids(replay(run, M2).records) == ["a:0", "a:2"]


def test_an_answer_has_rows(tmp_path: Path) -> None:
    with AnswerJournal.open(RunDir(tmp_path), M2) as journal, pytest.raises(ValueError):
        journal.append([])


# --- Torn and corrupt records -----------------------------------------------------------------


def _segment_of(tmp_path: Path, answers: list[Rows]) -> tuple[bytes, list[int]]:
    """A segment holding ``answers``, and the byte offset where each record ends."""
    run = RunDir(tmp_path / "run")
    ends = [len(SEGMENT_HEADER)]
    with AnswerJournal.open(run, M2) as journal:
        for rows in answers:
            journal.append(rows)
            ends.append(current_segment(run).stat().st_size)
        data = current_segment(run).read_bytes()
    return data, ends


def test_torn_tail_at_every_offset(tmp_path: Path) -> None:
    answers = [answer("t", 0, 1), answer("t", 1, 3), answer("t", 2, 2)]
    data, ends = _segment_of(tmp_path, answers)
    torn = tmp_path / "torn.wal"
    for cut in [*range(len(SEGMENT_HEADER)), *range(ends[-2], len(data) + 1)]:
        torn.write_bytes(data[:cut])
        found = read_segment(torn)
        complete = max((i for i, end in enumerate(ends) if end <= cut), default=0)
        valid = ends[complete] if cut >= len(SEGMENT_HEADER) else 0
        assert found.records == answers[:complete], cut
        assert (found.valid_bytes, found.dropped_bytes) == (valid, cut - valid), cut


@pytest.mark.parametrize(
    ("where", "offset"),
    [("magic", 1), ("length", 4), ("length high byte", 7), ("crc", 9), ("payload", 40)],
)
def test_corrupt_record_in_the_middle_stops_replay(tmp_path: Path, where: str, offset: int) -> None:
    answers = [answer("c", index, 1 + index) for index in range(4)]
    data, ends = _segment_of(tmp_path, answers)
    corrupt = bytearray(data)
    corrupt[ends[2] + offset] ^= 0x41
    path = tmp_path / "corrupt.wal"
    path.write_bytes(corrupt)
    found = read_segment(path)
    assert found.records == answers[:2]
    assert (found.valid_bytes, found.dropped_bytes) == (ends[2], len(data) - ends[2])


def test_unknown_format_version_is_refused_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "future.wal"
    path.write_bytes(SEGMENT_MAGIC + bytes([2]) + b"whatever a later klstream writes")
    with pytest.raises(RunDirError, match="format 2"):
        read_segment(path)


def test_checksum_valid_record_that_is_not_an_answer_is_refused(tmp_path: Path) -> None:
    payload = b'{"not": "a list"}'
    length = len(payload).to_bytes(4, "little")
    record = RECORD_HEADER.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(length)))
    path = tmp_path / "odd.wal"
    path.write_bytes(SEGMENT_HEADER + encode_answer(answer("o", 0, 1)) + record + payload)
    with pytest.raises(RunDirError, match="valid checksum"):
        read_segment(path)


def test_garbage_header_or_empty_file_holds_no_record(tmp_path: Path) -> None:
    path = tmp_path / "garbage.wal"
    for data in [b"", b"KLS", b"\x00" * 64]:
        path.write_bytes(data)
        found = read_segment(path)
        assert (found.records, found.valid_bytes, found.dropped_bytes) == ([], 0, len(data))


def test_reopen_truncates_the_torn_tail_and_appends_after_it(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    first = [answer("r", 0, 2), answer("r", 1, 1)]
    with AnswerJournal.open(run, M2) as journal:
        for rows in first:
            journal.append(rows)
    left_over = current_segment(run)
    valid = left_over.stat().st_size
    with left_over.open("ab") as handle:  # a record cut short by the kill
        handle.write(encode_answer(answer("r", 2, 4))[:1000])

    with AnswerJournal.open(run, M2) as journal:
        (recovered,) = journal.recovered.segments
        assert recovered.segment.path == left_over
        assert recovered.records == first
        assert (recovered.valid_bytes, recovered.dropped_bytes) == (valid, 1000)
        assert left_over.stat().st_size == valid
        journal.append(answer("r", 3, 1))
        found = replay(run, M2)
    assert found.records == [*first, answer("r", 3, 1)]
    assert found.dropped_bytes == 0
    with AnswerJournal.open(run, M2) as journal:  # a second crash recovers the same records
        assert journal.recovered.records == found.records
        assert journal.recovered.dropped_bytes == 0


# --- Segments and the compaction protocol -----------------------------------------------------


def test_rotate_seals_segments_and_discard_deletes_them(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    journal = AnswerJournal.open(run, M2)
    assert journal.rotate() is None  # nothing to compact: the segment stays current
    for index in range(3):
        journal.append(answer("s", index, 2))
    first = journal.rotate()
    assert first is not None
    journal.append(answer("s", 3, 1))
    second = journal.rotate()
    assert second is not None
    assert [first.path, second.path] == run.journal_segments(M2)[:2]
    assert read_segment(first.path).records == [answer("s", i, 2) for i in range(3)]
    assert read_segment(second.path).records == [answer("s", 3, 1)]

    with pytest.raises(ValueError, match="no part holds"):
        journal.discard(first)
    with pytest.raises(ValueError, match="being appended to"):
        journal.discard(Segment(current_segment(run)))
    compact(journal, read_segment(first.path))
    assert not first.path.exists()
    assert journal.is_compacted(first) and not journal.is_compacted(second)
    journal.discard(first)  # again: nothing left to do
    compact(journal, read_segment(second.path))
    assert stored_request_ids(run) == ["s:0"] * 2 + ["s:1"] * 2 + ["s:2"] * 2 + ["s:3"]

    journal.sync()
    journal.close()
    assert run.journal_segments(M2) == []  # the empty current segment is not left behind
    with pytest.raises(ValueError, match="closed"):
        journal.append(answer("s", 4, 1))
    journal.close()


def test_sync_covers_sealed_segments_and_tolerates_discarded_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("y", 0, 1))
        discarded = journal.rotate()
        assert discarded is not None
        compact(journal, read_segment(discarded.path))
        journal.append(answer("y", 1, 1))
        assert journal.rotate() is not None
        journal.append(answer("y", 2, 1))
        synced.clear()
        journal.sync()
        assert len(synced) == 3  # the current segment, the sealed one, the directory
        synced.clear()
        journal.sync()
        assert len(synced) == 2


@pytest.mark.parametrize("crash", ["before the part", "temporary written", "part renamed"])
def test_a_crash_at_any_step_of_compaction_stores_each_answer_once(
    tmp_path: Path, crash: str
) -> None:
    run = RunDir(tmp_path)
    answers = [answer("p", index, 1 + index % 3) for index in range(7)]
    journal = AnswerJournal.open(run, M2)
    for rows in answers[:5]:
        journal.append(rows)
    sealed = journal.rotate()
    assert sealed is not None
    for rows in answers[5:]:
        journal.append(rows)
    part = journal.part_path(sealed)
    if crash == "temporary written":
        temporary_sibling(part).write_bytes(b"PAR1 half a part")
    elif crash == "part renamed":
        with atomic_path(part) as tmp:
            pq.write_table(rows_table(read_segment(sealed.path).records), tmp)
    journal.close()  # on disk as a SIGKILL leaves it: both segments hold records

    with AnswerJournal.open(run, M2) as resumed:
        assert [found.segment for found in resumed.recovered.segments] == [
            sealed,
            Segment(run.journal_segments(M2)[1]),
        ]
        assert resumed.recovered.records == answers
        for found in resumed.recovered.segments:
            compact(resumed, found)
        assert stored_request_ids(run) == answer_ids(answers)
        assert [path.name for path in run.journal_segments(M2)] == [
            run.journal_segments(M2)[0].name
        ]


def test_segment_ids_are_never_reused(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("u", 0, 1))
        old = journal.rotate()
        assert old is not None
        compact(journal, read_segment(old.path))
    assert run.journal_segments(M2) == []
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("u", 1, 1))
        new = journal.rotate()
        assert new is not None
    assert new.path.name[:12] == old.path.name[:12] == "seg-00000000"  # the sequence restarted
    assert new.id != old.id
    assert not journal.is_compacted(new)


def test_parts_named_after_segments_are_ordinary_parts(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("n", 0, 1))
        sealed = journal.rotate()
        assert sealed is not None
        compact(journal, read_segment(sealed.path))
    (part,) = run.score_parts(M2)
    assert part.match(PART_GLOB) and sealed.id in part.name
    assert run.journal_part(M2, sealed.id) == part
    assert run.has_scores(M2)
    assert not list(run.root.glob(RunDir.sql_variables()["scores_files"].replace("part-", "seg-")))
    assert run.journal_dir(M2).parent == run.scores_dir(M2)


# --- Failed writes ----------------------------------------------------------------------------


def _fail_record_writes(
    monkeypatch: pytest.MonkeyPatch, failures: int, outcome: Callable[[int, bytes], int]
) -> None:
    """Make the next ``failures`` record writes do ``outcome`` instead of writing."""
    real_write = os.write
    left = [failures]

    def write(fd: int, data: Any) -> int:
        if left[0] and bytes(data[:4]) == RECORD_MAGIC:
            left[0] -= 1
            return outcome(fd, bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def _half_then_full_disk(fd: int, data: bytes) -> int:
    os.write(fd, data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path)
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("f", 0, 1))
        size = current_segment(run).stat().st_size
        _fail_record_writes(monkeypatch, 1, _half_then_full_disk)
        with pytest.raises(OSError, match="No space"):
            journal.append(answer("f", 1, 3))
        assert current_segment(run).stat().st_size == size
        journal.append(answer("f", 2, 1))
        found = replay(run, M2)
    assert answer_ids(found.records) == ["f:0", "f:2"]
    assert found.dropped_bytes == 0


def test_a_failed_truncation_is_retried_before_the_next_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path)
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("g", 0, 1))
        _fail_record_writes(monkeypatch, 1, _half_then_full_disk)
        real_ftruncate = os.ftruncate
        monkeypatch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError()))
        with pytest.raises(OSError, match="No space"):
            journal.append(answer("g", 1, 3))
        assert replay(run, M2).dropped_bytes > 0  # the torn bytes are still there
        monkeypatch.setattr(os, "ftruncate", real_ftruncate)
        journal.append(answer("g", 2, 1))
        found = replay(run, M2)
    assert answer_ids(found.records) == ["g:0", "g:2"]
    assert found.dropped_bytes == 0


def test_a_short_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    _fail_record_writes(monkeypatch, 1, lambda fd, data: os.write(fd, data[:100]))
    with AnswerJournal.open(run, M2) as journal:
        journal.append(answer("h", 0, 2))
    assert replay(run, M2).records == [answer("h", 0, 2)]


# --- Concurrency and real crashes -------------------------------------------------------------


def test_appends_in_one_thread_while_another_compacts(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    answers = [answer("w", index, 1 + index % 4) for index in range(400)]
    appended = threading.Event()
    with AnswerJournal.open(run, M2) as journal:

        def append_all() -> None:
            for rows in answers:
                journal.append(rows)
            appended.set()

        def compact_until_appended() -> None:
            while True:
                last = appended.is_set()
                sealed = journal.rotate()
                if sealed is not None:
                    compact(journal, read_segment(sealed.path))
                if last:
                    return

        threads = [threading.Thread(target=f) for f in (append_all, compact_until_appended)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert stored_request_ids(run) == answer_ids(answers)
    assert len(run.score_parts(M2)) > 1
    assert run.journal_segments(M2) == []


CHILD = """
import itertools, resource, signal, sys
from pathlib import Path
from journalrows import answer
from klstream.storage.journal import AnswerJournal
from klstream.storage.rundir import RunDir

tag, root, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
journal = AnswerJournal.open(RunDir(root), "models/gemini-2.0-flash")
for index in itertools.count():
    journal.append(answer(tag, index, 1 + index % 16))
    print(index, flush=True)
    if index % 7 == 6:
        journal.rotate()
"""
"""Appends answers, printing each index once it is journaled. With a file size ``limit`` the
kernel cuts short the write that crosses it and kills the process (SIGXFSZ) as it writes the
rest: a record torn at an exact byte by a real death, where a SIGKILL after reading the pipe
almost always lands between writes. The limit is below the first segment's size (37 KB)."""


def test_processes_killed_mid_append_lose_no_reported_answer(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    rng = random.Random(20250101)
    limits = [0, rng.randrange(1, 9), 0, rng.randrange(9, 30_000), 0, rng.randrange(9, 30_000), 0]
    reported: dict[str, int] = {}
    for round_, limit in enumerate(limits):
        tag = f"k{round_}"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, tag, str(tmp_path), str(limit)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None and child.stderr is not None
        if limit:
            reported[tag] = len(child.stdout.readlines())
            assert child.wait() == -signal.SIGXFSZ, child.stderr.read().decode()
            torn = read_segment(current_segment(run))
            assert torn.valid_bytes + torn.dropped_bytes == limit
            assert torn.dropped_bytes > 0  # the next child's open truncates it
        else:
            reported[tag] = rng.randrange(1, 250)
            for expected in range(reported[tag]):
                line = child.stdout.readline()
                assert line == f"{expected}\n".encode(), child.stderr.read().decode()
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    found = replay(run, M2)
    # Each child's open truncated the torn tails before it: only the last segment may have one.
    assert all(segment.dropped_bytes == 0 for segment in found.segments[:-1])
    counts = dict.fromkeys(reported, 0)
    for rows in found.records:
        counts[rows[0]["request_id"].split(":")[0]] += 1
    assert all(counts[tag] >= reported[tag] for tag in reported), (counts, reported)
    assert found.records == [
        answer(tag, index, 1 + index % 16) for tag in reported for index in range(counts[tag])
    ]

    with AnswerJournal.open(run, M2) as journal:
        assert journal.recovered.records == found.records
        for left_over in journal.recovered.segments:
            compact(journal, left_over)
    assert stored_request_ids(run) == answer_ids(found.records)
    assert run.journal_segments(M2) == []
