"""How klstream writes a count for people, wherever it prints one: the one owner of the format,
so that "4,315 scored" and "1,540 requests" read alike."""

from __future__ import annotations


def thousands(count: int) -> str:
    """``count`` with thousands separators: 4,315."""
    return f"{count:,}"
