"""Adaptive concurrency: additive increase, multiplicative decrease (AIMD) on rate limiting.

A fixed ``--max-concurrent`` above the quota turns most requests into 429s, each retried after a
back-off, so a run spends its time waiting and its quota on rejections. The limiter halves the
number of requests in flight on a 429 (at most once per ``cooldown_s``, so a burst of 429s from
one overload counts once) and adds one slot per window of successes, settling near the quota.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class AdaptiveLimiter:
    ceiling: int
    floor: int = 1
    cooldown_s: float = 1.0
    limit: float = field(init=False)
    in_flight: int = field(default=0, init=False)
    decreases: int = field(default=0, init=False)
    _last_decrease: float = field(default=float("-inf"), init=False)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition, init=False)

    def __post_init__(self) -> None:
        self.limit = float(self.ceiling)

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1

    async def release(self) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def on_success(self) -> None:
        """One more slot after ``limit`` successes: +1 per round trip of the whole window."""
        self.limit = min(float(self.ceiling), self.limit + 1.0 / max(self.limit, 1.0))

    def on_rate_limited(self) -> None:
        now = time.monotonic()
        if now - self._last_decrease >= self.cooldown_s:
            self.limit = max(float(self.floor), self.limit / 2.0)
            self._last_decrease = now
            self.decreases += 1
