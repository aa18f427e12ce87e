"""Append-only checkpoint parts of Model 2 results
(:meth:`klstream.storage.rundir.RunDir.new_part`).

Each part is written whole to a temporary name, fsynced and renamed, so a crash loses at most
the batch being written and never leaves a corrupt part. Part names sort in write order. Every
scheduler buffers its rows in one :class:`Checkpointer`, which writes a part every N rows or T
seconds.
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
from klstream.storage.rundir import RunDir


def write_scores_part(run: RunDir, model2: str, rows: pa.Table) -> Path:
    """Durably add ``rows`` (schema ``SCORES``) as a new part file and return its path."""
    table = rows.cast(schemas.SCORES)
    final = run.new_part(model2)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return final


class Checkpointer:
    """Buffers result rows and writes them as a part every N rows or T seconds."""

    def __init__(self, run: RunDir, model2: str, rows: int, seconds: float) -> None:
        self.run, self.model2, self.rows, self.seconds = run, model2, rows, seconds
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.lock = asyncio.Lock()
        self.writes: set[asyncio.Future[Path]] = set()

    async def add(self, rows: list[dict[str, Any]]) -> None:
        """Buffer one answer's rows at once, so no part holds only some of them."""
        self.buffer.extend(rows)
        if len(self.buffer) >= self.rows or time.monotonic() - self.last_flush >= self.seconds:
            await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            rows, self.buffer = self.buffer, []
            self.last_flush = time.monotonic()
            if rows:
                table = pa.Table.from_pylist(rows, schema=schemas.SCORES)
                # The rows have left the buffer: a cancelled caller (a stop, SIGINT) must not
                # cancel their write, which close() waits for instead.
                write = asyncio.get_running_loop().run_in_executor(
                    None, write_scores_part, self.run, self.model2, table
                )
                self.writes.add(write)
                write.add_done_callback(self.writes.discard)
                await asyncio.shield(write)

    async def close(self) -> None:
        """Write what is buffered and wait for every write, cancelled callers' included."""
        await self.flush()
        await asyncio.gather(*self.writes)
