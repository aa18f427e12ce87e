"""Model 2 results on disk: every answer journaled the moment it arrives, compacted into
append-only Parquet parts.

:class:`Checkpointer` appends each answer's rows to the write-ahead journal
(:mod:`klstream.storage.journal`) before anything awaits, so a SIGKILL loses no answer that was
paid for; every N rows or T seconds it seals the journal's segment and writes its rows, in a
worker thread, as a part named after the segment, then deletes the segment. A resumed run first
compacts what a killed one left in the journal (:meth:`Checkpointer.open`), so the pending
positions it computes from the parts include those answers. Parts are written whole to a
temporary name, fsynced and renamed (:func:`write_part`, which a batch job's parts go through
too), with the configuration their results were made with in their footer; part names sort in
write order.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klstream.storage import schemas
from klstream.storage.atomic import atomic_path
from klstream.storage.journal import AnswerJournal, Segment
from klstream.storage.rundir import RunDir


def write_part(final: Path, rows: pa.Table, config: str | None) -> None:
    """Durably write ``rows`` (schema ``SCORES``) as the part ``final``, recording the
    configuration they were made with in its footer
    (:data:`~klstream.storage.schemas.PART_CONFIG_KEY`; None records none, as older releases
    did)."""
    table = rows.cast(schemas.SCORES)
    if config is not None:
        table = table.replace_schema_metadata({schemas.PART_CONFIG_KEY: config})
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class Checkpointer:
    """Journals every answer at once and compacts the journal into a part every N rows or T
    seconds (see the module)."""

    def __init__(self, run: RunDir, model2: str, rows: int, seconds: float) -> None:
        self.run, self.model2, self.rows, self.seconds = run, model2, rows, seconds
        self.config = ""
        """The configuration every part records (set by :meth:`open`)."""
        self.journal: AnswerJournal | None = None
        self.buffer: list[dict[str, Any]] = []
        """The rows of the journal's current segment, compacted from memory when it is sealed."""
        self.last_flush = time.monotonic()
        self.lock = asyncio.Lock()
        self.writes: set[asyncio.Future[None]] = set()

    async def open(self, config: str) -> int:
        """Open the journal and store what a killed run left in it (made with ``config``, which
        the run's configuration check has just confirmed); the answers recovered."""
        self.config = config
        journal = await asyncio.to_thread(AnswerJournal.open, self.run, self.model2)
        self.journal = journal
        for found in journal.recovered.segments:
            rows = [row for record in found.records for row in record]
            await asyncio.to_thread(self._compact, found.segment, rows)
        return len(journal.recovered.records)

    def _compact(self, segment: Segment, rows: list[dict[str, Any]]) -> None:
        """Store a sealed segment's rows as its part (unless a crash left it done), then delete
        the segment. Runs in a worker thread."""
        journal = self._journal()
        if rows and not journal.is_compacted(segment):
            table = pa.Table.from_pylist(rows, schemas.SCORES)
            write_part(journal.part_path(segment), table, self.config)
        journal.discard(segment)

    def _journal(self) -> AnswerJournal:
        if self.journal is None:
            raise RuntimeError("the checkpointer is not open")
        return self.journal

    async def add(self, rows: list[dict[str, Any]]) -> None:
        """Journal one answer's rows at once (one record, so no part holds only some of
        them); compact when enough rows or time have gathered."""
        self._journal().append(rows)
        self.buffer.extend(rows)
        if len(self.buffer) >= self.rows or time.monotonic() - self.last_flush >= self.seconds:
            await self.flush()

    async def flush(self) -> None:
        """Seal the journal's segment and write its rows as a part."""
        async with self.lock:
            self.last_flush = time.monotonic()
            segment = self._journal().rotate()
            rows, self.buffer = self.buffer, []
            if segment is None:
                return
            # The rows are sealed: a cancelled caller (a stop, SIGINT) must not cancel their
            # write, which close() waits for instead.
            write = asyncio.get_running_loop().run_in_executor(None, self._compact, segment, rows)
            self.writes.add(write)
            write.add_done_callback(self.writes.discard)
            await asyncio.shield(write)

    async def close(self) -> None:
        """Compact what is journaled, wait for every write (cancelled callers' included) and
        close the journal."""
        if self.journal is None:
            return
        await self.flush()
        await asyncio.gather(*self.writes)
        self.journal.close()
