"""How the emulated service behaves beyond its faults: implicit caching and logprob reporting.

``ServiceConfig`` holds the switches; ``PrefixCache`` is the implicit-cache model. Gemini 2.5 and
later discount an input prefix that an earlier request of the same model sent shortly before
(reported as ``usageMetadata.cachedContentTokenCount``) once it is long enough. The emulator
reports as cached the longest token prefix (prompt, then prefill) that a request to the same
model sent within ``cache_ttl_s``, when it has at least ``cache_min_tokens`` tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceConfig:
    """The emulated service's behaviour; the defaults are Gemini's as documented."""

    cache_min_tokens: int = 2048
    """Shortest prefix reported as cached: the minimum for implicit caching of Gemini 2.5 Flash
    and Pro in Google's current caching docs (it was 1,024 for Flash at launch in May 2025, and
    4,096 for Pro in between; https://ai.google.dev/gemini-api/docs/caching, as of 2026-12)."""
    cache_ttl_s: float = 300.0
    """How long a prefix stays cached after a request last sent it."""
    scaled_logprobs: bool = False
    """Report the logprobs of the distribution actually sampled from (temperature-scaled; at
    temperature 0 only the chosen token), instead of the temperature-1 ones Gemini reports."""

    def __post_init__(self) -> None:
        if self.cache_min_tokens < 1:
            raise ValueError(f"cache_min_tokens must be >= 1, got {self.cache_min_tokens}")
        if self.cache_ttl_s < 0:
            raise ValueError(f"cache_ttl_s must be >= 0, got {self.cache_ttl_s}")


class PrefixCache:
    """Prefixes of earlier requests' token sequences, per model, with when each was last sent.

    Every prefix of a sent sequence is recorded under a running hash, and sending refreshes all
    of them, so a recorded prefix's shorter prefixes are recorded at least as recently: the
    longest fresh prefix is found by bisection.
    """

    _PURGE_EVERY = 200_000

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._seen: dict[tuple[str, int], float] = {}
        self._purge_at = self._PURGE_EVERY
        self._lock = threading.Lock()

    @staticmethod
    def _hashes(ids: Sequence[int]) -> list[int]:
        hashes, running = [], 0
        for token_id in ids:
            running = hash((running, token_id))
            hashes.append(running)
        return hashes

    def send(self, model: str, ids: Sequence[int], now: float) -> int:
        """Record that a request sent ``ids`` to ``model``; return how many tokens were cached."""
        hashes = self._hashes(ids)
        oldest = now - self.config.cache_ttl_s
        with self._lock:
            seen = self._seen
            lo, hi = 0, len(hashes)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if seen.get((model, hashes[mid - 1]), float("-inf")) >= oldest:
                    lo = mid
                else:
                    hi = mid - 1
            for running in hashes:
                seen[(model, running)] = now
            if len(seen) > self._purge_at:
                self._seen = {key: when for key, when in seen.items() if when >= oldest}
                self._purge_at = max(self._PURGE_EVERY, 2 * len(self._seen))
        return lo if lo >= self.config.cache_min_tokens else 0
