"""Errors that the CLI turns into a clear message and a non-zero exit."""

from __future__ import annotations


class KlstreamError(Exception):
    """A user-facing failure: the message says what is wrong and how to fix it."""


class InputError(KlstreamError):
    """Malformed input, naming the file and the JSON path of the offending field."""

    def __init__(self, source: str, json_path: str, reason: str) -> None:
        self.source = source
        self.json_path = json_path
        self.reason = reason
        super().__init__(f"{source}: {json_path}: {reason}")
