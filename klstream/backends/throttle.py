"""Adaptive concurrency: additive increase, multiplicative decrease (AIMD) on a sustained rate of
rejections (429 over quota, 503 over capacity).

A fixed ``--max-concurrent`` far above the quota turns most requests into 429s, each retried after
a back-off, so a run spends its time waiting and its quota on rejections. The limiter halves the
number of requests in flight when most of the recent ones were rejected, and adds one slot per
window of successes, settling near the quota.

It reacts to a *rate*, not to single rejections: outcomes are counted in consecutive windows of
``max(min_window, 2 * limit)`` (about two round trips of every slot), and the concurrency halves
at the end of a window in which at least ``threshold`` of them were rejections. Halving on every
429 (even at most once a second) drove a run through a 50% random-429 storm down to one request in
flight, though fewer requests in flight were rejected no less often; a quota exceeded several
times over reaches the threshold, random rejections at that rate seldom do. Each window is decided
on its own outcomes, so a decision rests on what happened at the concurrency of the moment.

Requests wait for a slot in arrival order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field


@dataclass
class AdaptiveLimiter:
    ceiling: int
    floor: int = 1
    threshold: float = 2 / 3
    """Fraction of a window's outcomes that must be rejections for the concurrency to halve."""
    min_window: int = 20
    limit: float = field(init=False)
    in_flight: int = field(default=0, init=False)
    decreases: int = field(default=0, init=False)
    _outcomes: int = field(default=0, init=False)
    """Outcomes in the current window (answers and rejections)."""
    _rejected: int = field(default=0, init=False)
    """Rejections among them."""
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque, init=False)

    def __post_init__(self) -> None:
        self.limit = float(self.ceiling)

    async def acquire(self) -> None:
        """Wait for a slot; slots are handed out first come, first served."""
        if not self._waiters and self.in_flight < int(self.limit):
            self.in_flight += 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # handed a slot in the same instant as the cancellation
            elif granted in self._waiters:
                self._waiters.remove(granted)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.in_flight += 1

    def on_success(self) -> None:
        """One more slot after ``limit`` successes: +1 per round trip of the whole window."""
        self.limit = min(float(self.ceiling), self.limit + 1.0 / max(self.limit, 1.0))
        self._record(rejected=False)
        self._hand_out()

    def on_rejected(self) -> None:
        """A 429 (over quota) or 503 (over capacity)."""
        self._record(rejected=True)

    def _record(self, rejected: bool) -> None:
        """Count an outcome; at the end of a window, halve if enough of it were rejections."""
        self._outcomes += 1
        self._rejected += rejected
        if self._outcomes < max(self.min_window, 2 * int(self.limit)):
            return
        if self._rejected >= self.threshold * self._outcomes:
            self.limit = max(float(self.floor), self.limit / 2.0)
            self.decreases += 1
        self._outcomes = self._rejected = 0
