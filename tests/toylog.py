"""The toy service's request log, counted as tests count the HTTP emulator's ``stats()``."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from klstream.backends.toy import ToyService


def tally(service: ToyService, field: Literal["kind", "fault", "outcome"]) -> Counter[str | None]:
    """The requests by one field of their log record: ``tally(toy, "fault")["429"]`` counts the
    429s injected, ``tally(toy, "outcome")["ok"]`` the requests answered."""
    return Counter(getattr(request, field) for request in service.requests)
