"""The terminal progress line: what it shows, and that it stays silent off a terminal."""

from __future__ import annotations

import pytest

from klstream.backends.transport import CallStats
from klstream.progress import ProgressLine
from klstream.scoring.session import ScoreStats


def stats() -> ScoreStats:
    calls = CallStats(requests=130, retries=12, rate_limited=7)
    calls.started -= 10.0
    return ScoreStats(total=400, already_done=100, scored=95, failed=5, calls=calls)


def test_progress_line_shows_positions_rate_retries_429s_and_eta(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = ProgressLine(enabled=True, interval_s=0.0)
    line.update(stats())
    line.close()
    shown = capsys.readouterr().err
    assert "200/400 positions" in shown
    assert "13.0 req/s" in shown
    assert "retries 12" in shown and "429s 7" in shown and "failed 5" in shown
    assert "ETA 20s" in shown
    assert shown.endswith("\n")


def test_progress_line_is_silent_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    line = ProgressLine(enabled=False)
    line.update(stats())
    line.close()
    assert capsys.readouterr().err == ""
