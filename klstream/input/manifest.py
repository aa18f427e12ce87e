"""What a run's positions were built from: the input manifest (``inputs.json`` in the run dir).

explode records every input file it read (path relative to the input directory, size,
modification time, SHA-256) with the file pattern and file limit. A later ``run`` over the same
output directory compares the files it would read now with that record, so changed inputs are
never silently answered with old positions. A file counts as unchanged when its size matches and
either its modification time or its content hash does (a ``touch`` is not a change).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from klstream.errors import InputsChanged, RunDamaged
from klstream.storage.atomic import write_text_atomic
from klstream.storage.health import inputs_record
from klstream.storage.rundir import RunDir

MANIFEST_FORMAT = 1
_HASH_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputFile:
    """One input file as explode read it."""

    name: str
    """Path relative to the input directory, with forward slashes."""
    size: int
    mtime_ns: int
    sha256: str

    @classmethod
    def read(cls, input_dir: Path, path: Path) -> InputFile:
        stat = path.stat()
        name = path.relative_to(input_dir).as_posix()
        return cls(name, stat.st_size, stat.st_mtime_ns, _sha256(path))

    def matches(self, input_dir: Path) -> bool:
        """Whether the file of this name in ``input_dir`` still has this content."""
        path = input_dir / self.name
        stat = path.stat()
        if stat.st_size != self.size:
            return False
        return stat.st_mtime_ns == self.mtime_ns or _sha256(path) == self.sha256


def write_manifest(
    destination: Path, input_dir: Path, files: list[Path], pattern: str, max_files: int | None
) -> None:
    document = {
        "format": MANIFEST_FORMAT,
        "input_dir": str(input_dir.resolve()),
        "pattern": pattern,
        "max_files": max_files,
        "files": [InputFile.read(input_dir, path).__dict__ for path in files],
    }
    write_text_atomic(destination, json.dumps(document, indent=1) + "\n")


def _recorded_files(run: RunDir) -> list[InputFile] | None:
    """The files the run's manifest lists; None when there is none (runs from before
    manifests); :class:`~klstream.errors.RunDamaged` when it cannot be read."""
    document = inputs_record(run)
    if document is None:
        return None
    try:
        return [InputFile(**entry) for entry in document["files"]]
    except TypeError as error:
        raise RunDamaged(run.inputs_manifest, str(error), run.root) from None


def input_changes(run: RunDir, input_dir: Path, files: list[Path]) -> InputsChanged | None:
    """How ``files`` (the input files selected now) differ from those the run's manifest
    records, or None when they are the same or there is no manifest to compare with."""
    recorded = _recorded_files(run)
    if recorded is None:
        return None
    current = {path.relative_to(input_dir).as_posix() for path in files}
    before = {entry.name: entry for entry in recorded}
    added = sorted(current - before.keys())
    removed = sorted(before.keys() - current)
    changed = sorted(
        name for name in current & before.keys() if not before[name].matches(input_dir)
    )
    if added or removed or changed:
        return InputsChanged(run.root, added, removed, changed)
    return None
