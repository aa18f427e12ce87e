"""Fault injection: what to inject (``FaultConfig``) and the state deciding each request's fate."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import Counter, deque
from dataclasses import dataclass

from klstream.emulator.protocol import ApiError

SHORT_TOPK = 3
"""Candidates a ``rate_short_topk`` answer lists at each step."""


ERROR_ANSWERS = {
    "429": (429, "Resource has been exhausted (e.g. check quota). (emulated fault)"),
    "500": (500, "An internal error has occurred. (emulated fault)"),
    "503": (503, "The model is overloaded. Please try again later."),
}
"""The exclusive faults that are error answers: their status and message."""


@dataclass(frozen=True)
class FaultConfig:
    """Which failures to inject; everything is off by default.

    Rates are per-request probabilities. The 429/500/503/hang/malformed/html rates
    are mutually exclusive outcomes of one draw, so they must sum to at most 1.
    All randomness comes from ``random.Random(seed)``.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_429: float = 0.0
    retry_delay_s: float = 1.5
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_hang: float = 0.0
    hang_seconds: float = 60.0
    rate_malformed: float = 0.0
    rate_html: float = 0.0
    """200 answers whose body is an HTML page (a proxy's or gateway's) instead of JSON."""
    rate_no_logprobs: float = 0.0
    rate_short_prompt_logprobs: float = 0.0
    """OpenAI completions answers whose ``prompt_logprobs`` lack their last entries."""
    rate_short_topk: float = 0.0
    """Gemini answers whose top-k lists hold only :data:`SHORT_TOPK` candidates, whatever was
    asked: an answer that is not what was asked."""
    quota_per_minute: int = 0
    """Requests allowed per rolling window; 0 means unlimited."""
    quota_window_s: float = 60.0
    """Length of the quota window (tests shorten it)."""
    fail_first_n: int = 0
    """The first N requests with a given (model, body) get 503."""
    seed: int = 0

    def __post_init__(self) -> None:
        rates = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in rates.items():
            if name.startswith("rate_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
            if name != "seed" and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.exclusive_rate > 1.0 + 1e-9:
            raise ValueError(
                "rate_429 + rate_500 + rate_503 + rate_hang + rate_malformed + rate_html > 1"
            )
        if self.quota_window_s <= 0:
            raise ValueError("quota_window_s must be > 0")

    @property
    def exclusive_rate(self) -> float:
        """Probability of one of the mutually exclusive faults."""
        return (
            self.rate_429
            + self.rate_500
            + self.rate_503
            + self.rate_hang
            + self.rate_malformed
            + self.rate_html
        )


class FaultState:
    """Mutable fault bookkeeping; replaced wholesale when the config changes."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.window: deque[float] = deque()
        self.seen: Counter[bytes] = Counter()

    def latency_s(self) -> float:
        """How long the next answer takes: the latency, plus its jitter drawn."""
        config = self.config
        delay_ms = config.latency_ms
        if config.jitter_ms:
            delay_ms += self.rng.uniform(0.0, config.jitter_ms)
        return delay_ms / 1000.0

    def check_quota(self, now: float) -> None:
        limit, span = self.config.quota_per_minute, self.config.quota_window_s
        if not limit:
            return
        while self.window and self.window[0] <= now - span:
            self.window.popleft()
        if len(self.window) >= limit:
            raise ApiError(
                429,
                f"Quota exceeded: {limit} requests per {span:g} s (emulated quota).",
                fault="quota",
                retry_delay_s=max(0.001, self.window[0] + span - now),
            )
        self.window.append(now)

    def check_fail_first(self, model: str, body: bytes) -> None:
        if not self.config.fail_first_n:
            return
        key = hashlib.blake2b(model.encode() + b"\0" + body).digest()
        self.seen[key] += 1
        if self.seen[key] <= self.config.fail_first_n:
            raise ApiError(
                503, "The model is overloaded. Please try again later.", fault="fail_first_n"
            )

    def draw_exclusive(self) -> str | None:
        """One draw deciding among 429/500/503/hang/malformed/html (or none)."""
        c = self.config
        if not c.exclusive_rate:
            return None
        u = self.rng.random()
        for name, rate in (
            ("429", c.rate_429),
            ("500", c.rate_500),
            ("503", c.rate_503),
            ("hang", c.rate_hang),
            ("malformed", c.rate_malformed),
            ("html", c.rate_html),
        ):
            if u < rate:
                return name
            u -= rate
        return None

    def raise_error_answer(self, fault: str | None) -> None:
        """Raise the error answer ``fault`` (of :meth:`draw_exclusive`) stands for, if it is
        one of :data:`ERROR_ANSWERS`."""
        if fault is None or fault not in ERROR_ANSWERS:
            return
        code, message = ERROR_ANSWERS[fault]
        delay = self.config.retry_delay_s if code == 429 else None
        raise ApiError(code, message, fault=fault, retry_delay_s=delay)

    def draw_no_logprobs(self) -> bool:
        rate = self.config.rate_no_logprobs
        return bool(rate) and self.rng.random() < rate

    def draw_short_topk(self) -> bool:
        rate = self.config.rate_short_topk
        return bool(rate) and self.rng.random() < rate

    def draw_short_prompt_logprobs(self) -> bool:
        rate = self.config.rate_short_prompt_logprobs
        return bool(rate) and self.rng.random() < rate
