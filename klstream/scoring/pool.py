"""How a scoring run works through its requests, whatever the scheduler: a pool of worker
tasks, the first requests as probes, one way to stop early, and SIGINT/SIGTERM.

- :func:`work_through` hands items to worker tasks while the checkpoint is flushed every few
  seconds; the first failure stops every worker.
- :class:`Probe`: until a first request has succeeded, requests are probes with a short shared
  budget (:meth:`klstream.backends.transport.Caller.retried`), so an endpoint that answers
  nothing usable stops the run in well under a minute.
- :class:`StopRun` ends a run early with a reason; what was answered is kept.
- :func:`stopping_on_signals`: SIGINT and SIGTERM cancel the run, which then saves what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from klstream.backends.transport import CallStats
from klstream.numbers import thousands
from klstream.scoring.checkpoint import Checkpointer

W = TypeVar("W")


class StopRun(Exception):
    """Raised inside a run to end it early with a reason; a resumed run continues it."""


@dataclass
class Probe:
    """The first requests of a run, one at a time: each may spend what is left of one short
    budget (its ``deadline``) until one succeeds, after which every request has the full retry
    budget."""

    url: str
    budget_s: float
    calls: CallStats
    started: float = field(default_factory=time.monotonic)
    succeeded: bool = False
    tried: int = 0
    last_error: str | None = None

    @property
    def deadline(self) -> float | None:
        """The :func:`time.monotonic` instant a probe request must end by; None once one has
        succeeded."""
        return None if self.succeeded else self.started + self.budget_s

    @property
    def spent(self) -> bool:
        return time.monotonic() >= self.started + self.budget_s

    def saw(self, error: str | None) -> None:
        """A probe request ended: with an answer (``error`` None) or with ``error``."""
        self.tried += 1
        if error is None:
            self.succeeded = True
        else:
            self.last_error = error

    def failure(self) -> StopRun:
        """Why the run stops when no probe succeeded."""
        first = (
            "the first request"
            if self.tried == 1
            else f"the first {thousands(self.tried)} requests"
        )
        return StopRun(
            f"{first} to {self.url} failed ({thousands(self.calls.requests)} attempts in "
            f"{time.monotonic() - self.started:.0f} s); the last said: {self.last_error}"
        )


async def work_through(
    items: AsyncIterator[W],
    handle: Callable[[W], Awaitable[None]],
    workers: int,
    checkpoint: Checkpointer,
    flush_seconds: float,
) -> None:
    """Hand ``items``, in order, to ``workers`` tasks running ``handle`` while ``checkpoint`` is
    flushed every ``flush_seconds`` (results that trickle in during long back-offs still reach
    disk); the first failure stops them all."""
    queue: asyncio.Queue[W | None] = asyncio.Queue(maxsize=2 * workers)

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            await handle(item)

    async def feed() -> None:
        async for item in items:
            await queue.put(item)
        for _ in range(workers):
            await queue.put(None)

    async def flush_every_interval() -> None:
        while True:
            await asyncio.sleep(flush_seconds)
            await checkpoint.flush()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    feeding = asyncio.create_task(feed())
    flushing = asyncio.create_task(flush_every_interval())
    try:
        done, _ = await asyncio.wait([feeding, *tasks], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in [feeding, flushing, *tasks]:
            task.cancel()
        await asyncio.gather(feeding, flushing, *tasks, return_exceptions=True)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM cancel the current task with ``stopped by SIGNAL`` (where the loop can
    handle signals: not in a worker thread's loop)."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    for signum in _SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, current.cancel, f"stopped by {signum.name}")
    try:
        yield
    finally:
        for signum in _SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)
