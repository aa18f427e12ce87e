"""The terminal progress line: what it shows, and that it stays silent off a terminal."""

from __future__ import annotations

import pytest

from klstream.backends.transport import CallStats
from klstream.cli import _report_score
from klstream.progress import ProgressLine
from klstream.scoring.score import ScoreReport
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


def test_every_count_of_a_large_run_is_written_with_thousands_separators(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One format for counts (klstream.numbers.thousands): the end-of-run lines printed
    "4315 scored" beside "1,540 requests"; the progress line and the score line now agree."""
    calls = CallStats(requests=1540, retries=1234, rate_limited=1001, concurrency_cuts=1002)
    big = ScoreStats(total=12_000, already_done=1_200, scored=4_315, failed=1_003, calls=calls)
    line = ProgressLine(enabled=True, interval_s=0.0)
    line.update(big)
    line.close()
    progress = capsys.readouterr().err
    assert "6,518/12,000 positions" in progress
    assert "retries 1,234  429s 1,001  failed 1,003" in progress

    _report_score(ScoreReport(big, big.remaining, None, None), "toy-d0.5")
    printed = capsys.readouterr().out
    assert (
        "score toy-d0.5: 4,315 scored, 1,003 failed, 1,200 already done, of 12,000 positions; "
        "1,540 requests (1,234 retries, 1,001 rate-limited, concurrency lowered 1,002 times)"
    ) in printed
    assert "cost: 1,540 requests" in printed
