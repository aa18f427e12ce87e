"""The sole owner of the run directory's layout: every file name, folder and glob in it.

A run directory (``RUN_DIR``) holds::

    positions.parquet                  one row per token position (explode)
    responses.parquet                  one row per response (explode)
    skipped.parquet                    responses explode --skip-invalid left out
    inputs.json                        the input files the positions were built from
    scores/<model2>/part-*.parquet     Model 2 outcomes, append-only checkpoints (score)
    scores/<model2>/run.json           the parameters a resumed run must share
    scores/<model2>/greedy-probe.jsonl the greedy consistency probe's answers until it decides
    scores/<model2>/journal/seg-<seq>-<random>.wal   the answer journal's segments
                                       (:mod:`klstream.storage.journal`)
    scores/<model2>/part-*-seg-<seq>-<random>.parquet   a part compacted from one segment
    kl/<model2>.parquet                per-position estimators (the KL pass)
    replaced/<model2>/scores/, kl.parquet   the results an ``--overwrite`` replaces, kept aside
                                       until the new run's first answer (then deleted)
    quarantine/<model2>/part-*.parquet damaged parts moved out of the scores (their positions
                                       are asked again)
    report.html                        the default place of ``klstream report``
    batch/<model2>/job-<id>.json       a batch job's manifest (score --batch)
    batch/<model2>/job-<id>.keys.parquet   the positions it asks for
    batch/<model2>/job-<id>.jsonl      its requests, until the job exists on the service
    batch/<model2>/plan-<round>.done   marks a planning round complete
    .lock, .lock-<model2>              writers' locks (:mod:`klstream.storage.runlock`)

An export directory holds ``<stem>_kl.json`` per input file, ``summary.json`` and
``report.html``; ``klstream
run`` keeps its run directory inside it, as ``OUTPUT_DIR/run``. Every other module asks this one
for paths; the SQL views get the relative names from :meth:`RunDir.sql_variables`.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from klstream.errors import KlstreamError, NotExploded

POSITIONS_FILE = "positions.parquet"
RESPONSES_FILE = "responses.parquet"
SKIPPED_FILE = "skipped.parquet"
INPUTS_FILE = "inputs.json"
LOCK_FILE = ".lock"
SCORES_DIR = "scores"
KL_DIR = "kl"
BATCH_DIR = "batch"
REPLACED_DIR = "replaced"
QUARANTINE_DIR = "quarantine"
BATCH_MANIFEST_GLOB = "job-*.json"
RUN_CONFIG_FILE = "run.json"
GREEDY_PROBE_FILE = "greedy-probe.jsonl"
PART_GLOB = "part-*.parquet"
JOURNAL_DIR = "journal"
JOURNAL_SEGMENT_GLOB = "seg-*.wal"
WORKSPACE = "run"
"""``klstream run``'s run directory inside its output directory."""
KL_JSON_SUFFIX = "_kl.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_JOURNAL_SEGMENT = re.compile(r"seg-(\d{8})-[0-9a-f]{16}\.wal")
_part_sequence = itertools.count()


def model2_dirname(model2: str) -> str:
    """A file-system-safe name for a Model 2 id such as ``models/gemini-2.0-flash``."""
    name = _UNSAFE.sub("_", model2.removeprefix("models/")).strip("._")
    if not name:
        raise KlstreamError(f"model2 name {model2!r} has no usable characters")
    return name


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def positions(self) -> Path:
        return self.root / POSITIONS_FILE

    @property
    def responses(self) -> Path:
        return self.root / RESPONSES_FILE

    @property
    def skipped(self) -> Path:
        return self.root / SKIPPED_FILE

    @property
    def inputs_manifest(self) -> Path:
        return self.root / INPUTS_FILE

    @property
    def positions_lock(self) -> Path:
        """Locked shared by every writer, exclusively by whoever replaces the positions."""
        return self.root / LOCK_FILE

    def model2_lock(self, model2: str) -> Path:
        """Locked exclusively by the one process writing ``model2``'s results. It sits outside
        ``scores/<model2>/``, which an overwrite deletes."""
        return self.root / f"{LOCK_FILE}-{model2_dirname(model2)}"

    def model2_locks(self) -> list[Path]:
        return sorted(self.root.glob(f"{LOCK_FILE}-*"))

    @property
    def stage_dirs(self) -> list[Path]:
        """Folders of results keyed to the current positions."""
        return [
            self.root / SCORES_DIR,
            self.root / KL_DIR,
            self.root / REPLACED_DIR,
            self.root / QUARANTINE_DIR,
        ]

    def replaced_dir(self, model2: str) -> Path:
        """Where an ``--overwrite`` keeps the results it replaces until the new run has a first
        answer: outside ``scores/`` and ``kl/``, so no view reads them."""
        return self.root / REPLACED_DIR / model2_dirname(model2)

    def replaced_scores(self, model2: str) -> Path:
        return self.replaced_dir(model2) / SCORES_DIR

    def replaced_kl(self, model2: str) -> Path:
        return self.replaced_dir(model2) / f"{KL_DIR}.parquet"

    def quarantine_dir(self, model2: str) -> Path:
        """Where damaged parts go, out of the views' reach."""
        return self.root / QUARANTINE_DIR / model2_dirname(model2)

    def scores_dir(self, model2: str) -> Path:
        return self.root / SCORES_DIR / model2_dirname(model2)

    def run_config(self, model2: str) -> Path:
        return self.scores_dir(model2) / RUN_CONFIG_FILE

    def greedy_probe_log(self, model2: str) -> Path:
        return self.scores_dir(model2) / GREEDY_PROBE_FILE

    def score_parts(self, model2: str) -> list[Path]:
        """Checkpoint parts in write order (their names sort by creation time)."""
        return sorted(self.scores_dir(model2).glob(PART_GLOB))

    def parts_by_model2(self) -> list[list[Path]]:
        """Each Model 2's parts, one list per Model 2 with a scores folder."""
        scores = self.root / SCORES_DIR
        folders = (
            sorted(path for path in scores.iterdir() if path.is_dir()) if scores.is_dir() else []
        )
        return [sorted(folder.glob(PART_GLOB)) for folder in folders]

    def kl_tables(self) -> list[Path]:
        return sorted((self.root / KL_DIR).glob("*.parquet"))

    def has_scores(self, model2: str | None = None) -> bool:
        """Whether any checkpoint part exists, for ``model2`` or for any Model 2."""
        if model2 is not None:
            return any(self.scores_dir(model2).glob(PART_GLOB))
        return any((self.root / SCORES_DIR).glob(f"*/{PART_GLOB}"))

    def new_part(self, model2: str) -> Path:
        """A unique part name that sorts by creation time across processes and restarts."""
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{next(_part_sequence):06d}.parquet"
        return self.scores_dir(model2) / name

    def journal_dir(self, model2: str) -> Path:
        """The answer journal: inside ``scores/<model2>/``, so an overwrite deletes it with the
        parts, and outside the parts' glob, so no reader of the scores sees it."""
        return self.scores_dir(model2) / JOURNAL_DIR

    def journal_segments(self, model2: str) -> list[Path]:
        """The journal's segments in write order (their names sort by sequence number)."""
        return sorted(
            path
            for path in self.journal_dir(model2).glob(JOURNAL_SEGMENT_GLOB)
            if _JOURNAL_SEGMENT.fullmatch(path.name)
        )

    def new_journal_segment(self, model2: str) -> Path:
        """The segment after the newest one. Its random tail makes its id
        (:meth:`journal_segment_id`) unique for ever, even when the sequence starts again from 0
        once every segment is deleted: a part named after an old segment must never pass for a
        new one's."""
        segments = self.journal_segments(model2)
        match = _JOURNAL_SEGMENT.fullmatch(segments[-1].name) if segments else None
        sequence = int(match[1]) + 1 if match else 0
        return self.journal_dir(model2) / f"seg-{sequence:08d}-{secrets.token_hex(8)}.wal"

    @staticmethod
    def journal_segment_id(segment: Path) -> str:
        """What names a segment's part; letters, digits and dashes only (safe in a glob)."""
        return segment.stem

    def new_journal_part(self, model2: str, segment_id: str) -> Path:
        """The part holding one segment's records: named after the segment, so that a crash
        between writing the part and deleting the segment is seen (:meth:`journal_part`)."""
        return self.scores_dir(model2) / f"part-{time.time_ns():020d}-{segment_id}.parquet"

    def journal_part(self, model2: str, segment_id: str) -> Path | None:
        return next(iter(self.scores_dir(model2).glob(f"part-*-{segment_id}.parquet")), None)

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    def batch_dir(self, model2: str) -> Path:
        return self.root / BATCH_DIR / model2_dirname(model2)

    def batch_manifests(self, model2: str | None = None) -> list[Path]:
        """The batch job manifests of ``model2`` (or of every Model 2), in job order."""
        if model2 is not None:
            return sorted(self.batch_dir(model2).glob(BATCH_MANIFEST_GLOB))
        return sorted((self.root / BATCH_DIR).glob(f"*/{BATCH_MANIFEST_GLOB}"))

    def batch_manifest(self, model2: str, job_id: str) -> Path:
        return self.batch_dir(model2) / f"job-{job_id}.json"

    def batch_keys(self, model2: str, job_id: str) -> Path:
        return self.batch_dir(model2) / f"job-{job_id}.keys.parquet"

    def batch_input(self, model2: str, job_id: str) -> Path:
        return self.batch_dir(model2) / f"job-{job_id}.jsonl"

    def batch_output(self, model2: str, job_id: str) -> Path:
        return self.batch_dir(model2) / f"job-{job_id}.output.jsonl"

    def batch_plan_marker(self, model2: str, plan: str) -> Path:
        return self.batch_dir(model2) / f"plan-{plan}.done"

    def new_batch_part(self, model2: str, job_id: str) -> Path:
        """The part holding one batch job's results: named after the job, so that writing it
        twice (a crash between the part and the manifest) is seen and avoided."""
        return self.scores_dir(model2) / f"part-{time.time_ns():020d}-batch-{job_id}.parquet"

    def batch_part(self, model2: str, job_id: str) -> Path | None:
        return next(iter(self.scores_dir(model2).glob(f"part-*-batch-{job_id}.parquet")), None)

    def kl_path(self, model2: str) -> Path:
        return self.root / KL_DIR / f"{model2_dirname(model2)}.parquet"

    def is_exploded(self) -> bool:
        return self.positions.is_file() and self.responses.is_file()

    def require_exploded(self) -> None:
        if not self.is_exploded():
            raise NotExploded(self.root)

    def has_files(self, pattern: str) -> bool:
        """Whether any file matches ``pattern`` (a name or glob of :meth:`sql_variables`)."""
        return any(self.root.glob(pattern))

    @staticmethod
    def sql_variables() -> dict[str, str]:
        """The relative paths and globs that ``sql/views.sql`` reads, as DuckDB variables."""
        return {
            "positions_file": POSITIONS_FILE,
            "responses_file": RESPONSES_FILE,
            "skipped_file": SKIPPED_FILE,
            "scores_files": f"{SCORES_DIR}/*/{PART_GLOB}",
            "run_config_files": f"{SCORES_DIR}/*/{RUN_CONFIG_FILE}",
            "kl_files": f"{KL_DIR}/*.parquet",  # as kl_tables() globs
        }


@dataclass(frozen=True)
class ExportDir:
    """Paths of the spec's output files."""

    root: Path

    def kl_json(self, stem: str) -> Path:
        return self.root / f"{stem}{KL_JSON_SUFFIX}"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    def outputs(self) -> list[Path]:
        """What an export wrote here, the summary first (an export without one is partial)."""
        return [
            self.summary,
            *sorted(self.root.glob(f"*{KL_JSON_SUFFIX}")),
            self.report,
        ]

    @property
    def workspace(self) -> RunDir:
        """The run directory ``klstream run`` keeps beside its exports."""
        return RunDir(self.root / WORKSPACE)
