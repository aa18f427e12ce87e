"""Write-to-temporary-then-rename, so a crash or an error never leaves a half-written output."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from klstream.errors import OutputError, describe_os_error

_TEMPORARY_NAME = re.compile(r"\..+\.tmp-(\d+)")


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` that globs such as ``*.parquet`` do not match; it ends with
    the writer's PID so that :func:`sweep_stale_temporaries` can tell an orphan from work in
    progress."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def sweep_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporaries in ``directory`` whose writer is gone (killed mid-write, say).

    A temporary of a live process is left alone: it may be a concurrent reader's or writer's
    work in progress. Returns what was removed.
    """
    removed: list[Path] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for path in directory.iterdir():
            match = _TEMPORARY_NAME.fullmatch(path.name)
            if match and not _process_alive(int(match[1])) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def fsync_path(path: Path) -> None:
    """Make a file's content, or a rename in a directory, durable: without this a power loss
    may forget it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk and rename it onto ``final`` atomically."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_path(final.parent)


def cannot_write(final: Path, tmp: Path, error: OSError) -> OutputError:
    """The error for ``final`` that cannot be written: it names the file asked for, never the
    hidden temporary beside it (a name the user did not give and will not find)."""
    if {str(error.filename), str(error.filename2)} & {str(tmp), str(final)}:
        cause = error.strerror or str(error)
    elif isinstance(error, FileExistsError):  # what mkdir says of a file where a folder goes
        cause = f"{error.filename} is a file, not a directory"
    else:
        cause = describe_os_error(error)
    return OutputError(f"cannot write {final}: {cause}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final``, on error it is removed.

    The temporary is created before the caller writes, so a folder that cannot take ``final``
    (read-only, a file in the way, a full disk) raises :class:`~klstream.errors.OutputError`
    naming ``final``, whatever library the caller writes with."""
    tmp = temporary_sibling(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError as error:
        raise cannot_write(final, tmp, error) from error
    try:
        yield tmp
        commit(tmp, final)
    except OSError as error:
        if str(tmp) in (str(error.filename), str(error.filename2)):
            raise cannot_write(final, tmp, error) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
