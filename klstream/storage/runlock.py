"""One writer per run directory and Model 2: operating-system file locks that die with the process.

Two ``klstream`` processes scoring the same Model 2 into one run directory would pay for every
request twice and each report the other's work as missing. Every writer therefore holds
``flock`` locks on files the run directory owns
(:meth:`klstream.storage.rundir.RunDir.model2_lock`):

* :func:`positions_writer` (explode, replacing positions): the run-wide lock, exclusively;
* :func:`model2_writer` (score): the run-wide lock shared, and the Model 2's lock exclusively,
  so different Model 2s of one run are scored side by side but never while positions change.

Locks are taken without waiting: a second writer is refused at once with :class:`RunLocked`,
naming the process that holds the lock (its PID and command, written into the lock file). The
kernel drops a lock when its holder exits however it exits, SIGKILL included, so a stale lock
never blocks the next run. Readers (query, export, the KL pass on its own) take no lock: every
file they read is replaced atomically.

A context that already holds a lock as strongly as it asks (``klstream run`` holds the run-wide
lock exclusively, then explodes and scores) takes it again for free; another thread or task of
the same process does not share it, and is refused like another process.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

from klstream.errors import RunLocked
from klstream.storage.rundir import RunDir

_HELD: contextvars.ContextVar[Mapping[Path, bool]] = contextvars.ContextVar(
    "klstream_held_locks", default=MappingProxyType({})
)
"""The lock files this context holds, each mapped to whether it holds it exclusively."""


def _holder_record() -> str:
    """This process, for the message another writer gets: its PID and its command line."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    command = ["klstream" if program == "__main__.py" else program, *sys.argv[1:]]
    return json.dumps({"pid": os.getpid(), "command": command}) + "\n"


def _read_holder(path: Path) -> str | None:
    """``pid N (command)`` from a lock file, or None when it names nobody yet."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    command = record.get("command")
    words = " ".join(map(str, command)) if isinstance(command, list) else "?"
    return f"pid {record['pid']} ({words})"


def _exclusive_holders(paths: list[Path]) -> list[str]:
    """Who holds any of ``paths`` exclusively, found by trying a shared lock on each."""
    holders: dict[str, None] = {}
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holders[_read_holder(path) or "another process"] = None
    return list(holders)


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool, refusal: str, find_holders: list[Path]) -> Iterator[None]:
    """Hold ``path`` locked (exclusively or shared) for the block, or raise :class:`RunLocked`
    naming the holders of ``find_holders`` when someone else holds it incompatibly."""
    held = _HELD.get()
    if path in held and (held[path] or not exclusive):
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _exclusive_holders(find_holders)
            by = f" by {', '.join(holders)}" if holders else ""
            raise RunLocked(f"{refusal}{by}", holders[0] if holders else None) from None
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_record().encode(), 0)
        token = _HELD.set(MappingProxyType({**held, path: exclusive}))
        try:
            yield
        finally:
            _HELD.reset(token)
            if exclusive:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@contextlib.contextmanager
def positions_writer(run: RunDir) -> Iterator[None]:
    """The whole run directory, exclusively: no one scores while positions are replaced."""
    with _locked(
        run.positions_lock,
        exclusive=True,
        refusal=f"{run.root} is in use",
        find_holders=[run.positions_lock, *run.model2_locks()],
    ):
        yield


@contextlib.contextmanager
def model2_writer(run: RunDir, model2: str) -> Iterator[None]:
    """``model2``'s results, exclusively, with the positions they are keyed to held still."""
    with (
        _locked(
            run.positions_lock,
            exclusive=False,
            refusal=f"{run.root}'s positions are being replaced",
            find_holders=[run.positions_lock],
        ),
        _locked(
            run.model2_lock(model2),
            exclusive=True,
            refusal=f"{run.root} is already being scored against {model2!r}",
            find_holders=[run.model2_lock(model2)],
        ),
    ):
        yield
