"""A write-ahead journal of Model 2 answers, so that a killed run keeps every answer it paid for.

Scoring buffers result rows and writes a Parquet part every N rows or T seconds, so a SIGKILL loses
the buffer: answers already paid for. The journal appends each answer to a file the moment it
arrives, with one ``os.write`` on an ``O_APPEND`` descriptor: once :meth:`AnswerJournal.append`
returns, the answer is in the operating system's page cache and survives the death of the process
(not a power loss: there is no fsync per answer; :meth:`AnswerJournal.sync` gives that when
wanted).

On disk
    One Model 2's journal is a sequence of segments,
    ``scores/<model2>/journal/seg-<seq>-<random>.wal`` (every name comes from
    :class:`~klstream.storage.rundir.RunDir`). A segment is an 8-byte header, ``KLSJWAL`` and
    the format version (1), then records, one per answer::

        b"KLJR"   length: uint32 LE   crc: uint32 LE   payload: length bytes

    ``crc`` is the CRC-32 of the length's four bytes followed by the payload. The payload is the
    answer's SCORES rows (:data:`~klstream.storage.schemas.SCORES`) as one UTF-8 JSON array of
    objects, with every timestamp column (``scored_at``) as integer microseconds since the epoch,
    UTC. An answer's rows are one record, so they are replayed, compacted and lost together.

Why JSON rather than Arrow IPC
    Measured with ``bench/journal_bench.py`` on answers with top-20 lists: JSON encodes in about
    20 µs per row (22 µs for 1 row, 75-110 for 4, 300-350 for 16), Arrow IPC in 120-190 µs per
    record whatever its size (building a 22-column record batch dominates). IPC wins only from
    about 8 rows, and answers are short: a failure is one row, and with a lookahead of 4 the toy
    inputs take 0.57 requests per position, 1.75 rows per answer. The encoding runs on the event
    loop inside ``append`` (25 µs per 1-row answer in all, 80 µs for 4 rows); decoding and
    building the table happen once per compaction, in a worker thread (about 40 µs per row). JSON
    also reads old segments after SCORES gains a column (a missing key is a null), where an IPC
    record batch is tied to the exact schema it was written with.

Exact round-trip
    ``json`` writes floats as their shortest repr, which reads back bit for bit: -0.0, subnormals,
    the largest doubles, and ``NaN``/``Infinity`` (as Python's ``json`` spells them). Integers are
    Python's, so int64 survives. ``scored_at`` must be a timezone-aware datetime (a naive one is
    ambiguous); it comes back as the same instant in UTC, microsecond for microsecond, as a
    ``timestamp[us, tz=UTC]`` column stores it. Nulls and absent keys come back as they were.
    Strings are Python ``str`` from the service's JSON, which can hold a lone UTF-16 surrogate
    (``"\\ud83d"``); Arrow strings are UTF-8 and cannot, so no SCORES row can hold one.
    :meth:`AnswerJournal.append` encodes strictly and refuses such an answer before writing
    anything: the journal never holds a record that compaction could not store. Otherwise the
    rows must be what ``pa.Table.from_pylist(rows, schema=SCORES)`` accepts; the journal does not
    check types, which are the scoring code's contract.

Replay and torn records
    :func:`read_segment` returns every complete record whose magic and CRC are right, in order,
    and stops at the first that is not, reporting the bytes after it as dropped. A process killed
    inside its ``write`` (Linux may end a large write early on SIGKILL) leaves a prefix of its last
    record: replay drops exactly that. A record whose checksum holds but whose payload is not
    JSON was written by a different format and raises :class:`~klstream.errors.RunDirError`
    instead, like a segment header with an unknown version: truncating it would lose answers.

Crash protocol (one segment is compacted into exactly one part, named after it)
    1. :meth:`AnswerJournal.append` writes each answer to the current segment.
       *Crash*: the segment is left over; the next :meth:`AnswerJournal.open` recovers it.
    2. :meth:`AnswerJournal.rotate` seals the current segment (closes it; nothing is written to it
       again) and creates the next one, which takes the following appends.
       *Crash*: both segments are left over and recovered.
    3. The caller reads the sealed segment (:func:`read_segment`), builds its table
       (:func:`rows_table`) and writes it, through :func:`~klstream.storage.atomic.atomic_path`,
       to :meth:`AnswerJournal.part_path` — ``part-<time>-<segment id>.parquet`` — usually in a
       worker thread. *Crash*: at most a hidden temporary exists, which no reader globs
       (:func:`~klstream.storage.atomic.sweep_stale_temporaries` removes it); the segment is
       recovered and has no part yet.
    4. The rename of the part is durable (file and directory fsynced).
       *Crash before* :meth:`AnswerJournal.discard`: the segment is recovered, but
       :meth:`AnswerJournal.is_compacted` finds its part, so the caller discards it without
       writing it again: no row is ever stored twice.
    5. :meth:`AnswerJournal.discard` deletes the segment; it refuses one that has records and no
       part, so a misordered caller gets an error rather than a silent loss.

    On start, :meth:`AnswerJournal.open` truncates each left-over segment after its last valid
    record (so nothing is ever appended after garbage, and a second crash replays the same
    records), hands them over in :attr:`AnswerJournal.recovered`, and starts a new segment. A
    resumed run compacts each recovered segment by steps 3 to 5 *before* it computes the pending
    positions, which are read from the parts. Left-over segments are never appended to: a
    segment that grew after its part was written would look compacted and lose the new records.
    Segment ids carry a random tail, so an id is never reused, even after every segment is
    deleted and the sequence numbers start again.

Threads and asyncio
    :meth:`~AnswerJournal.append`, :meth:`~AnswerJournal.rotate`, :meth:`~AnswerJournal.sync`,
    :meth:`~AnswerJournal.discard` and :meth:`~AnswerJournal.close` are serialized by one lock and
    may be called from any thread. ``append`` is synchronous and never awaits, so on the event
    loop an answer is journaled before its task yields; it blocks the loop for one ``write`` to
    the page cache (microseconds), ``rotate`` for a file creation. ``sync`` fsyncs outside the
    lock (a duplicate of the current descriptor), so a worker thread may call it without stalling
    appends. :func:`read_segment`, :func:`rows_table`, ``is_compacted`` and ``part_path`` touch
    only sealed segments and parts, and are safe in a worker thread while the loop appends. One
    journal per Model 2 and run directory: the Model 2's writer lock
    (:mod:`klstream.storage.runlock`) is the caller's to hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa

from klstream.errors import RunDirError
from klstream.storage.atomic import fsync_path
from klstream.storage.rundir import RunDir
from klstream.storage.schemas import SCORES

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"KLSJWAL"
SEGMENT_HEADER = SEGMENT_MAGIC + bytes([FORMAT_VERSION])
RECORD_MAGIC = b"KLJR"
RECORD_HEADER = struct.Struct("<4sII")
"""Magic, payload length, CRC-32 of the length's bytes and the payload."""
MAX_PAYLOAD = 0xFFFF_FFFF

Row = dict[str, Any]
Answer = list[Row]
"""One answer's SCORES rows: 1..N rows (one per step) that are stored together."""

_TIMESTAMP_FIELDS = tuple(field.name for field in SCORES if pa.types.is_timestamp(field.type))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _microseconds(name: str, value: object) -> int:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise TypeError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return (value - _EPOCH) // _MICROSECOND


def encode_answer(rows: Answer) -> bytes:
    """One answer as a framed record (header and JSON payload), ready for one ``write``."""
    if not rows:
        raise ValueError("an answer has at least one row")
    converted = [
        {**row, **{name: _microseconds(name, row.get(name)) for name in _TIMESTAMP_FIELDS}}
        for row in rows
    ]
    text = json.dumps(converted, ensure_ascii=False, separators=(",", ":"))
    try:
        payload = text.encode()
    except UnicodeEncodeError as error:
        raise ValueError(
            "the answer holds a string with a lone UTF-16 surrogate, which SCORES (UTF-8) cannot "
            f"store: {text[max(error.start - 20, 0) : error.end + 20]!r}"
        ) from error
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"an answer of {len(payload)} bytes exceeds the record limit")
    length = len(payload).to_bytes(4, "little")
    crc = zlib.crc32(payload, zlib.crc32(length))
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload), crc) + payload


def _decode_payload(path: Path, offset: int, payload: bytes) -> Answer:
    try:
        rows = json.loads(payload)
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise ValueError("not a non-empty array of objects")
        for row in rows:
            for name in _TIMESTAMP_FIELDS:
                row[name] = _EPOCH + timedelta(microseconds=row[name])
    except (ValueError, KeyError, TypeError, OverflowError) as error:
        raise RunDirError(
            f"{path}: the record at byte {offset} has a valid checksum but is not an answer "
            f"this klstream can read ({error})"
        ) from error
    return rows


@dataclass(frozen=True)
class Segment:
    """A segment file of the journal; a sealed one is never written again."""

    path: Path

    @property
    def id(self) -> str:
        """Unique for ever; the name of the part its records are compacted into."""
        return RunDir.journal_segment_id(self.path)


@dataclass(frozen=True)
class SegmentReplay:
    """What a segment holds: its complete, valid records, and the bytes after them."""

    segment: Segment
    records: list[Answer]
    valid_bytes: int
    """Header and complete records; a truncation to this length loses no answer."""
    dropped_bytes: int
    """A torn (or corrupt) tail: what replay ignored."""


@dataclass(frozen=True)
class Replay:
    """The records of several segments, in write order."""

    segments: list[SegmentReplay]

    @property
    def records(self) -> list[Answer]:
        return [record for segment in self.segments for record in segment.records]

    @property
    def dropped_bytes(self) -> int:
        return sum(segment.dropped_bytes for segment in self.segments)


def read_segment(path: Path) -> SegmentReplay:
    """Every complete record of a segment, up to the first torn or corrupt one."""
    data = path.read_bytes()
    segment = Segment(path)
    if not data.startswith(SEGMENT_HEADER):
        if len(data) >= len(SEGMENT_HEADER) and data.startswith(SEGMENT_MAGIC):
            raise RunDirError(
                f"{path} is a journal segment of format {data[len(SEGMENT_MAGIC)]}; this "
                f"klstream reads format {FORMAT_VERSION}"
            )
        return SegmentReplay(segment, [], 0, len(data))
    view = memoryview(data)
    records: list[Answer] = []
    offset = len(SEGMENT_HEADER)
    while offset + RECORD_HEADER.size <= len(data):
        magic, length, crc = RECORD_HEADER.unpack_from(data, offset)
        start = offset + RECORD_HEADER.size
        end = start + length
        if (
            magic != RECORD_MAGIC
            or end > len(data)
            or zlib.crc32(view[start:end], zlib.crc32(view[offset + 4 : offset + 8])) != crc
        ):
            break
        records.append(_decode_payload(path, offset, data[start:end]))
        offset = end
    return SegmentReplay(segment, records, offset, len(data) - offset)


def replay(run: RunDir, model2: str) -> Replay:
    """The journal's segments as they are on disk, without changing them. For inspection: a
    writer takes the left-overs from :attr:`AnswerJournal.recovered`, which never includes the
    segment it is appending to."""
    return Replay([read_segment(path) for path in run.journal_segments(model2)])


def rows_table(records: Iterable[Answer]) -> pa.Table:
    """The records' rows as one table of schema SCORES, for a part."""
    return pa.Table.from_pylist([row for record in records for row in record], schema=SCORES)


class _SegmentWriter:
    """The segment being appended to, and how far its valid records reach."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC)
        self.size = 0
        self.records = 0
        self.torn = False
        """A failed write left bytes after ``size`` that could not be truncated yet."""
        try:
            self._write(SEGMENT_HEADER)
        except BaseException:
            os.close(self.fd)
            path.unlink(missing_ok=True)
            raise

    def append(self, record: bytes) -> None:
        self._write(record)
        self.records += 1

    def _write(self, data: bytes) -> None:
        """Append ``data`` whole, or raise with the segment as it was before."""
        if self.torn:
            self._truncate()
        try:
            written = os.write(self.fd, data)
            while written < len(data):  # a short write (a full disk): finish it or fail
                written += os.write(self.fd, memoryview(data)[written:])
        except BaseException:
            self.torn = True
            with contextlib.suppress(OSError):
                self._truncate()
            raise
        self.size += len(data)

    def _truncate(self) -> None:
        os.ftruncate(self.fd, self.size)
        self.torn = False

    def close(self) -> None:
        """Close the file; a tail a failed write left and that still cannot be truncated is
        left to replay, which drops it."""
        if self.torn:
            with contextlib.suppress(OSError):
                self._truncate()
        os.close(self.fd)


class AnswerJournal:
    """The write-ahead journal of one Model 2's answers in a run directory (see the module)."""

    def __init__(self, run: RunDir, model2: str, recovered: Replay) -> None:
        """Use :meth:`open`."""
        self.run, self.model2 = run, model2
        self.recovered = recovered
        """The segments a previous process left, torn tails truncated: compact them first."""
        self._lock = threading.Lock()
        self._current: _SegmentWriter | None = _SegmentWriter(run.new_journal_segment(model2))
        self._unsynced: list[Path] = []
        """Sealed segments written since the last :meth:`sync`."""

    @classmethod
    def open(cls, run: RunDir, model2: str) -> AnswerJournal:
        """Recover the segments left over, truncated after their last valid record, and start
        a new segment after them."""
        run.journal_dir(model2).mkdir(parents=True, exist_ok=True)
        recovered = Replay([_truncate_torn_tail(path) for path in run.journal_segments(model2)])
        return cls(run, model2, recovered)

    def __enter__(self) -> AnswerJournal:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _writer(self) -> _SegmentWriter:
        if self._current is None:
            raise ValueError(f"the answer journal of {self.model2!r} is closed")
        return self._current

    def append(self, rows: Answer) -> None:
        """Journal one answer's rows as one record; when this returns, a SIGKILL cannot lose
        them. If it raises, the bytes written are truncated away (a failed truncation is retried
        before the next append), so the answer is not journaled."""
        record = encode_answer(rows)
        with self._lock:
            self._writer().append(record)

    def rotate(self) -> Segment | None:
        """Seal the current segment and start the next; ``None`` (and nothing changes) when the
        current one has no record. The sealed segment is to be compacted, then discarded."""
        with self._lock:
            current = self._writer()
            if current.records == 0:
                return None
            following = _SegmentWriter(self.run.new_journal_segment(self.model2))
            self._current = following
            self._unsynced.append(current.path)
            current.close()
        return Segment(current.path)

    def sync(self) -> None:
        """Make every answer appended so far survive a power loss too (fsync)."""
        with self._lock:
            current = self._writer()
            descriptor = os.dup(current.fd)
            sealed, self._unsynced = self._unsynced, []
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        for path in sealed:
            with contextlib.suppress(FileNotFoundError):  # discarded: its part is durable
                fsync_path(path)
        fsync_path(current.path.parent)

    def is_compacted(self, segment: Segment) -> bool:
        """Whether the segment's part exists, so its records are stored and it can go."""
        return self.run.journal_part(self.model2, segment.id) is not None

    def part_path(self, segment: Segment) -> Path:
        """Where the segment's records go: a part named after it (see :meth:`is_compacted`)."""
        return self.run.new_journal_part(self.model2, segment.id)

    def discard(self, segment: Segment) -> None:
        """Delete a sealed segment once its part is durably in place (or it has no record)."""
        with self._lock:
            if self._current is not None and segment.path == self._current.path:
                raise ValueError(f"{segment.path} is being appended to; rotate() seals it")
        if not self.is_compacted(segment):
            with contextlib.suppress(FileNotFoundError):
                if read_segment(segment.path).records:
                    raise ValueError(f"{segment.path} holds answers that no part holds yet")
        segment.path.unlink(missing_ok=True)
        with self._lock:
            if segment.path in self._unsynced:
                self._unsynced.remove(segment.path)

    def close(self) -> None:
        """Stop appending. An empty current segment is deleted; one with records stays for the
        next :meth:`open` (compact it first with :meth:`rotate` for a clean end)."""
        with self._lock:
            current, self._current = self._current, None
        if current is not None:
            current.close()
            if current.records == 0:
                current.path.unlink()


def _truncate_torn_tail(path: Path) -> SegmentReplay:
    found = read_segment(path)
    if found.dropped_bytes:
        os.truncate(path, found.valid_bytes)
    return found


def holds_records(run: RunDir, model2: str) -> bool:
    """Whether any journal segment of ``model2`` holds more than its header: answers a killed
    run left (or bytes to look at), which count as results."""
    return any(path.stat().st_size > len(SEGMENT_HEADER) for path in run.journal_segments(model2))
