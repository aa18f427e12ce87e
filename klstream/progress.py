"""A one-line progress display for a terminal: positions, request rate, retries, 429s, ETA."""

from __future__ import annotations

import sys
import time

from klstream.scoring.score import ScoreStats


class ProgressLine:
    """Redraws at most every ``interval_s``; prints nothing when not on a terminal."""

    def __init__(self, enabled: bool, interval_s: float = 0.25, width: int = 30) -> None:
        self.enabled, self.interval_s, self.width = enabled, interval_s, width
        self.last_draw = 0.0
        self.drawn = False

    def update(self, stats: ScoreStats) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last_draw < self.interval_s:
            return
        self.last_draw = now
        fraction = stats.done / stats.total if stats.total else 1.0
        filled = int(self.width * fraction)
        calls = stats.calls
        elapsed = calls.elapsed or float("inf")
        rate = (stats.scored + stats.failed) / elapsed
        left = stats.total - stats.done
        eta = f"{left / rate:,.0f}s" if rate > 0 else "?"
        line = (
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {stats.done:,}/{stats.total:,} "
            f"positions  {calls.requests / elapsed:,.1f} req/s  retries {calls.retries:,}  "
            f"429s {calls.rate_limited:,}  failed {stats.failed:,}  ETA {eta} "
        )
        sys.stderr.write(line)
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
