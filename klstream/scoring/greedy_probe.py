"""The greedy consistency probe's answers, kept on disk until the probe decides.

The probe (:class:`~klstream.scoring.prefill.PrefillScheduler`) pays for a few greedy requests
that are never stored as results; a run killed while probing would pay for them again. So each
greedy answer is appended to ``scores/<model2>/greedy-probe.jsonl`` the moment it arrives, and
each comparison with a one-token answer after it; a resumed run takes the sites up where they
were, and the log goes once the outcome is in ``run.json``. Lines are flushed one at a time; a
torn last line (a kill inside a write) is ignored.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from klstream.backends.base import Candidate
from klstream.backends.prices import Usage


@dataclass
class ProbeSite:
    """One greedy answer at ``position`` of a response, and its comparisons so far."""

    stem: str
    response_index: int
    position: int
    greedy: list[list[tuple[str, int | None, float]]]
    """The top lists of the greedy answer's accepted steps."""
    attempts: int
    usage: dict[str, int]
    deviations: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int]:
        return self.stem, self.response_index, self.position

    @property
    def next_position(self) -> int:
        """The position whose one-token answer is compared next."""
        return self.position + len(self.deviations)

    def top(self, step: int) -> list[Candidate]:
        return [Candidate(*entry) for entry in self.greedy[step]]


class GreedyProbeLog:
    """The probe's sites so far, as a killed run left them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sites: dict[tuple[str, int, int], ProbeSite] = {}
        for record in self._records():
            if record.get("kind") == "site":
                site = ProbeSite(**record["site"])
                self.sites[site.key] = site
            elif record.get("kind") == "deviation":
                found = self.sites.get(
                    (record["stem"], record["response_index"], record["position"])
                )
                if found is not None:
                    found.deviations.append(float(record["deviation"]))

    def _records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")

    def add_site(self, site: ProbeSite) -> None:
        self.sites[site.key] = site
        self._append({"kind": "site", "site": asdict(site)})

    def add_deviation(self, site: ProbeSite, deviation: float) -> None:
        site.deviations.append(deviation)
        self._append(
            {
                "kind": "deviation",
                "stem": site.stem,
                "response_index": site.response_index,
                "position": site.position,
                "deviation": deviation,
            }
        )

    def continued_at(self, stem: str, response_index: int, position: int) -> ProbeSite | None:
        """The site whose next comparison is at this position of this response, if any."""
        for site in self.sites.values():
            if (site.stem, site.response_index, site.next_position) == (
                stem,
                response_index,
                position,
            ):
                return site
        return None

    def usage(self) -> Usage:
        total = Usage()
        for site in self.sites.values():
            total.add(Usage(**site.usage))
        return total

    def clear(self) -> None:
        """The probe has decided (its outcome is in ``run.json``)."""
        self.path.unlink(missing_ok=True)
