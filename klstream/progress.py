"""A one-line progress display for a terminal: positions, request rate, retries, 429s, ETA;
for a batch run, jobs by state and the services' own counts instead."""

from __future__ import annotations

import sys
import time

from klstream.numbers import thousands
from klstream.scoring.session import BatchProgress, ScoreStats


class ProgressLine:
    """Redraws at most every ``interval_s``; prints nothing when not on a terminal."""

    def __init__(self, enabled: bool, interval_s: float = 0.25, width: int = 30) -> None:
        self.enabled, self.interval_s, self.width = enabled, interval_s, width
        self.last_draw = 0.0
        self.drawn = False
        self.announced = False

    def update(self, stats: ScoreStats) -> None:
        if not self.announced:
            self.announced = True
            self._announce(stats)
        now = time.monotonic()
        if not self.enabled or now - self.last_draw < self.interval_s:
            return
        self.last_draw = now
        batch = stats.batch
        line = self._line(stats) if batch is None else self._batch_line(stats, batch)
        sys.stderr.write(line)
        sys.stderr.flush()
        self.drawn = True

    @staticmethod
    def _announce(stats: ScoreStats) -> None:
        """Before anything is asked, and whether or not on a terminal: what a killed or
        damaged run left that changes what is pending."""
        if stats.nothing_to_resume is not None:
            sys.stderr.write(stats.nothing_to_resume + "\n")
        found = []
        if stats.recovered:
            found.append(
                f"{thousands(stats.recovered)} answers a killed run had journaled are stored"
            )
        if stats.quarantined:
            names = ", ".join(stats.quarantined)
            found.append(
                f"damaged parts moved to quarantine ({names}): their positions are asked again"
            )
        if found:
            pending = stats.total - stats.already_done
            sys.stderr.write(f"{'; '.join(found)}; {thousands(pending)} positions to score\n")
            sys.stderr.flush()

    def _bar(self, stats: ScoreStats) -> str:
        fraction = stats.done / stats.total if stats.total else 1.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        return f"\r[{bar}] {thousands(stats.done)}/{thousands(stats.total)} "

    def _batch_line(self, stats: ScoreStats, batch: BatchProgress) -> str:
        """Jobs by state, positions done, the services' own counts, time waited."""
        jobs = ", ".join(f"{n} {state.lower()}" for state, n in sorted(batch.jobs.items()))
        service = (
            f"  service {thousands(batch.service_done)}/{thousands(batch.service_total)} lines"
            if batch.service_total
            else ""
        )
        elapsed = stats.calls.elapsed
        return (
            f"{self._bar(stats)}positions  jobs: {jobs or 'none'}{service}  "
            f"{elapsed / 60:,.1f} min "
        )

    def _line(self, stats: ScoreStats) -> str:
        calls = stats.calls
        elapsed = calls.elapsed or float("inf")
        rate = (stats.scored + stats.failed) / elapsed
        left = stats.total - stats.done
        eta = f"{left / rate:,.0f}s" if rate > 0 else "?"
        return (
            f"{self._bar(stats)}positions  {calls.requests / elapsed:,.1f} req/s  "
            f"retries {thousands(calls.retries)}  "
            f"429s {thousands(calls.rate_limited)}  failed {thousands(stats.failed)}  ETA {eta} "
        )

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
