"""What the run directory knows of a run's batch jobs: one manifest per job, saved at every step,
and the job files a planning round writes before anything is sent.

Paths come from :class:`~klstream.storage.rundir.RunDir` (``RUN_DIR/batch/<model2>/``): each
job's JSONL input (until the job exists on the service), its key list (the positions its lines
ask for, with Model 1's tokens each line's steps are compared with), its manifest, and a marker
closing each planning round (a round cut short is discarded and planned again).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from klstream.backends.base import BatchJobs, Endpoint, PrefillRequest
from klstream.scoring import lookahead
from klstream.scoring.work import WorkItem
from klstream.storage import schemas
from klstream.storage.atomic import atomic_path, commit, temporary_sibling, write_text_atomic
from klstream.storage.rundir import RunDir

MANIFEST_FORMAT = 1
JOB_TOKENS = 20_000_000
"""Estimated tokens per batch job by default: some 50,000 lines (the services' own cap) of 400
tokens. A line holds the prompt and Model 1's tokens before its position, so long responses make
long lines, and a job counted in lines alone could hold more tokens than a project may have
waiting in batch jobs, or than one failed job should cost."""
Stage = Literal["planned", "uploaded", "creating", "submitted", "ended", "collected"]


@dataclass
class JobManifest:
    """What the run directory knows of one batch job; saved at every step."""

    job_id: str
    plan: str
    display_name: str
    service: str
    model2: str
    project: str | None
    location: str
    positions: int
    input_bytes: int
    remote_input: str
    remote_output: str | None
    stage: Stage = "planned"
    create_attempted_at: float | None = None
    """Epoch seconds of the last create call, while its outcome is unknown."""
    job_name: str | None = None
    state: str | None = None
    error: str | None = None
    service_succeeded: int | None = None
    service_failed: int | None = None
    service_incomplete: int | None = None
    run_ms: float = 0.0
    scored: int = 0
    failed: int = 0
    cleaned: bool = False
    canary: bool = False
    """A canary job: its lines must come back with logprobs before the bulk is submitted."""
    estimated_tokens: int = 0
    """Its lines' estimated tokens (:func:`line_tokens`)."""
    format: int = MANIFEST_FORMAT

    def save(self, run: RunDir) -> None:
        path = run.batch_manifest(self.model2, self.job_id)
        write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> JobManifest:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    @property
    def active(self) -> bool:
        """Not yet collected: its positions are spoken for."""
        return self.stage != "collected"

    @property
    def live(self) -> bool:
        """Possibly queued or running on the service."""
        return self.stage in ("creating", "submitted")


@dataclass(frozen=True)
class Line:
    """One batch line: its request, and Model 1's tokens at the positions it may cover."""

    item: WorkItem
    model1: list[lookahead.Token]


def line_tokens(item: WorkItem) -> int:
    """A line's estimated tokens, as the dry run estimates them: its input
    (:func:`~klstream.scoring.lookahead.estimated_input_tokens`) and the tokens it asks for."""
    return math.ceil(lookahead.estimated_input_tokens(item.prompt, item.position)) + item.max_tokens


def line_key(item: WorkItem) -> str:
    """A position's key in the JSONL files: readable, and unambiguous with any stem."""
    return f"{item.stem}#{item.response_index}#{item.position}"


def load_manifests(run: RunDir, model2: str) -> list[JobManifest]:
    """The run's manifests for ``model2``, after discarding a planning round cut short (nothing
    of it was uploaded: uploads start once its marker is written)."""
    manifests = [JobManifest.load(path) for path in run.batch_manifests(model2)]
    kept = []
    for manifest in manifests:
        finished_plan = run.batch_plan_marker(model2, manifest.plan).exists()
        if finished_plan or manifest.stage != "planned":
            kept.append(manifest)
            continue
        for path in (
            run.batch_input(model2, manifest.job_id),
            run.batch_keys(model2, manifest.job_id),
            run.batch_manifest(model2, manifest.job_id),
        ):
            path.unlink(missing_ok=True)
    return kept


PLAN_CLOCK_DIGITS = 11
"""A plan's name starts with milliseconds since the epoch in this many hex digits."""


def new_plan_name(run: RunDir, model2: str) -> str:
    """A new planning round's name: its clock is now, in milliseconds, but past every earlier
    round's, so two rounds planned within one millisecond (a canary, then the bulk) still list
    in order."""
    clock = time.time_ns() // 1_000_000
    for path in run.batch_manifests(model2):
        earlier = path.name.removeprefix("job-")[:PLAN_CLOCK_DIGITS]
        if all(digit in "0123456789abcdef" for digit in earlier):
            clock = max(clock, int(earlier, 16) + 1)
    return f"{clock:0{PLAN_CLOCK_DIGITS}x}{secrets.token_hex(2)}"


def job_lines(run: RunDir, model2: str, job_id: str) -> list[Line]:
    """The lines of a job, from its key list, in line order."""
    return [
        Line(
            WorkItem(k["stem"], k["response_index"], k["position"], "", "", k.get("max_tokens", 1)),
            [
                lookahead.Token(text, token_id)
                for text, token_id in zip(
                    k.get("model1_tokens", []), k.get("model1_token_ids", []), strict=True
                )
            ],
        )
        for k in pq.read_table(run.batch_keys(model2, job_id)).to_pylist()
    ]


class JobWriter:
    """Cuts a round's stream of lines into job files within the limits — lines, bytes and
    estimated tokens per job — each closed atomically with its key list and manifest."""

    def __init__(
        self,
        run: RunDir,
        model2: str,
        jobs: BatchJobs,
        endpoint: Endpoint,
        max_requests: int | None,
        max_bytes: int | None,
        max_tokens: int | None,
        canary: bool = False,
    ) -> None:
        self.run, self.model2, self.jobs, self.endpoint = run, model2, jobs, endpoint
        self.max_requests = max_requests or jobs.max_requests
        self.max_bytes = max_bytes or jobs.max_bytes
        self.max_tokens = max_tokens or JOB_TOKENS
        self.canary = canary
        """Its jobs are canaries."""
        self.plan = new_plan_name(run, model2)
        """The planning round: its jobs' names sort in the order rounds were planned."""
        self.manifests: list[JobManifest] = []
        self.handle: IO[bytes] | None = None
        self.keys: list[dict[str, Any]] = []
        self.size = 0
        self.tokens = 0

    @property
    def job_id(self) -> str:
        return f"{self.plan}-{len(self.manifests):04d}"

    def add(self, line: Line, request: PrefillRequest) -> None:
        item = line.item
        data = self.jobs.encode_line(line_key(item), len(self.keys), request)
        tokens = line_tokens(item)
        full = (
            len(self.keys) >= self.max_requests
            or self.size + len(data) > self.max_bytes
            or self.tokens + tokens > self.max_tokens
        )
        if self.keys and full:
            self.close_job()
            data = self.jobs.encode_line(line_key(item), 0, request)
        if self.handle is None:
            path = self.run.batch_input(self.model2, self.job_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = temporary_sibling(path).open("wb")
        self.handle.write(data)
        self.size += len(data)
        self.tokens += tokens
        self.keys.append(
            {
                "stem": item.stem,
                "response_index": item.response_index,
                "position": item.position,
                "max_tokens": item.max_tokens,
                "model1_tokens": [token.text for token in line.model1],
                "model1_token_ids": [token.token_id for token in line.model1],
            }
        )

    def close_job(self) -> None:
        if self.handle is None:
            return
        model2, job_id = self.model2, self.job_id
        final = self.run.batch_input(model2, job_id)
        self.handle.close()
        commit(temporary_sibling(final), final)
        keys = pa.Table.from_pylist(self.keys, schema=schemas.BATCH_KEYS)
        with atomic_path(self.run.batch_keys(model2, job_id)) as tmp:
            pq.write_table(keys, tmp)
        display_name = f"klstream-{job_id}"
        remote_input, remote_output = self.jobs.remote_names(job_id, display_name)
        manifest = JobManifest(
            job_id=job_id,
            plan=self.plan,
            display_name=display_name,
            service=self.jobs.service,
            model2=model2,
            project=self.endpoint.project,
            location=self.endpoint.location,
            positions=len(self.keys),
            input_bytes=self.size,
            remote_input=remote_input,
            remote_output=remote_output,
            canary=self.canary,
            estimated_tokens=self.tokens,
        )
        manifest.save(self.run)
        self.manifests.append(manifest)
        self.handle, self.keys, self.size, self.tokens = None, [], 0, 0

    def finish(self) -> list[JobManifest]:
        self.close_job()
        if self.manifests:
            write_text_atomic(self.run.batch_plan_marker(self.model2, self.plan), "")
        return self.manifests
