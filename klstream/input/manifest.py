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
from typing import Any

from klstream.errors import InputsChanged
from klstream.storage.atomic import write_text_atomic

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


def _recorded_files(manifest: Path) -> list[InputFile] | None:
    """The files a manifest lists; None when there is none (runs from before manifests)."""
    try:
        document: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return [InputFile(**entry) for entry in document["files"]]


def input_changes(
    manifest: Path, run_dir: Path, input_dir: Path, files: list[Path]
) -> InputsChanged | None:
    """How ``files`` (the input files selected now) differ from those ``manifest`` records, or
    None when they are the same or there is no manifest to compare with."""
    recorded = _recorded_files(manifest)
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
        return InputsChanged(run_dir, added, removed, changed)
    return None
