"""What a scoring run is asked to do: every option of ``klstream score``, in one place.

Pure data: the schedulers (:mod:`klstream.scoring.prefill`,
:mod:`klstream.scoring.prompt_logprobs`, :mod:`klstream.scoring.batch`) and the run
configuration (:mod:`klstream.scoring.runconfig`) read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from klstream.backends.base import ClientSettings, ThinkingBudget
from klstream.backends.transport import RetryPolicy
from klstream.storage.database import RANGE_POSITIONS

DEFAULT_TEMPERATURE = 1.0
"""Gemini's default sampling temperature: what runs recorded before ``temperature`` was sent."""

Lookahead = int | Literal["auto"]
Decoding = Literal["auto", "greedy", "sample"]


@dataclass(frozen=True)
class BatchOptions:
    """How to run batch jobs; the defaults suit the real services."""

    bucket_name: str | None = None
    """Vertex AI: the Cloud Storage bucket (default ``<project>-klstream-batch``)."""
    wait: bool = True
    """Wait for the jobs and collect their results; False submits and returns."""
    keep_files: bool = False
    """Keep the uploaded inputs and the outputs on the service after collecting them."""
    fallback_online: bool = False
    """Score online whatever the jobs left without an answer."""
    max_requests: int | None = None
    """Requests per job (default: the backend's)."""
    max_bytes: int | None = None
    """Input bytes per job (default: the backend's)."""
    max_tokens: int | None = None
    """Estimated tokens per job (:func:`~klstream.scoring.batch_jobs.line_tokens`; default
    :data:`~klstream.scoring.batch_jobs.JOB_TOKENS`): a job is cut when it or ``max_requests``
    is reached."""
    canary: bool = True
    """Before the bulk of a run is submitted, a canary job of a few lines must bring them back
    with logprobs (:mod:`klstream.scoring.batch`)."""
    poll_initial_s: float = 5.0
    poll_max_s: float = 60.0
    create_settle_s: float = 60.0
    """How long after a create that got no reply the job may still appear in the listing."""
    create_attempts: int = 5
    max_rounds: int = 8
    """With lookahead: rounds of jobs one run submits at most; what they leave uncovered waits
    for a resumed run."""


@dataclass(frozen=True)
class ScoreOptions:
    model2: str
    top_logprobs: int = 20
    max_concurrent: int = 16
    policy: RetryPolicy = RetryPolicy()
    thinking_budget: ThinkingBudget = "auto"
    """Tokens, None (no thinking config) or ``"auto"``: 0 where the model accepts it, else
    the least budget it accepts (:mod:`klstream.backends.thinking`)."""
    checkpoint_rows: int = 256
    checkpoint_seconds: float = 10.0
    resume: bool = False
    overwrite: bool = False
    max_consecutive_failures: int = 50
    range_positions: int = RANGE_POSITIONS
    """Positions of whole responses read from DuckDB at once (bounds its memory)."""
    method: str = "prefill"
    """How Model 2 is asked (a key of :data:`klstream.scoring.score.METHODS`): ``prefill``, one
    request per position (or fewer, with lookahead), the prefix as the model's own turn;
    ``prompt-logprobs`` (vLLM), one request per response, whose prompt logprobs give every
    position at once. Both give the same values where both apply, so a run may mix them: a
    resumed run can fill with one what the other left."""
    batch: BatchOptions | None = None
    """Score through batch jobs (:mod:`klstream.scoring.batch`) instead of online calls."""
    lookahead: Lookahead = "auto"
    """Tokens each request asks for, or ``auto``: per response, the number that minimises the
    estimated billed cost per position from the runs of accepted steps seen so far."""
    decoding: Decoding = "auto"
    """How lookahead tokens are generated: ``sample`` at ``temperature``, ``greedy``
    (temperature 0, refused unless the consistency probe passes), or ``auto`` (greedy when the
    probe passes, else sampling)."""
    temperature: float = DEFAULT_TEMPERATURE
    prices: Path | None = None
    """A price table over the shipped one (the layout of ``klstream/backends/prices.json``)."""
    require_model_version: bool = False
    """Stop the run when the service says another model answered than ``model2`` (an alias
    moved, a retired model rerouted), instead of reporting it at the end."""

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ValueError(
                "resume continues the results there are and overwrite replaces them: choose one"
            )

    @property
    def settings(self) -> ClientSettings:
        """What every request of the run shares, for the backend's client."""
        return ClientSettings.of(self.model2, self.max_concurrent, self.thinking_budget)
