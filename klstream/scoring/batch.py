"""Batch mode: the same requests as online scoring, as batch jobs at half the price.

A run goes through durable steps, each recorded in a job manifest under ``RUN_DIR/batch/<model2>/``
(:class:`JobManifest`, paths from :class:`~klstream.storage.rundir.RunDir`) before the next begins:

1. **plan**: the pending positions become JSONL files of at most ``max_requests`` lines and
   ``max_bytes`` bytes, each with its key list and a manifest naming a unique display name and
   the remote input; a marker closes the planning round (a round cut short is planned again).
2. **upload** every input (idempotent: an identical upload already there is kept).
3. **create** each job. The manifest says ``creating`` before the call and holds the job name
   after it. A create whose outcome is unknown (a lost reply, a time-out, a killed process) is
   resolved by listing the service's jobs and matching the display name — and, when no reply
   came, again once ``create_settle_s`` has passed — before it is ever tried again.
4. **wait**: poll every job with back-off until it ends (succeeded, failed, cancelled, expired).
5. **collect**: the output lines, matched by key (never by order), become one part of the scores
   table per job (``source`` = ``batch``); per-line errors and positions without an answer are
   written as failures with the reason. The part is named after the job, so a crash between it
   and the manifest never writes a job's results twice. Then the remote files are deleted.

With a lookahead of N > 1 a run works in rounds: round 1 asks for N tokens at every N-th pending
position of each run of pending positions; a line's steps are kept while the tokens generated
before them are Model 1's (:func:`~klstream.scoring.lookahead.accept`, as online), and each later
round asks, at the first uncovered position of every gap, for the gap's length — until every
position is covered, a round covers nothing, or ``max_rounds`` rounds have run. Lines are sampled
at the run's temperature: greedy decoding needs the online probe (``auto`` is N =
:data:`~klstream.scoring.lookahead.BATCH_AUTO_LOOKAHEAD` here). With N = 1 one round asks for
every pending position, one token each.

Killed at any moment, the next ``--resume`` continues from the manifests and never submits a
position that a job already holds. Positions that end up without an answer are submitted again
by a later ``--resume`` (a new round), or scored online at once with ``fallback_online``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from klstream.backends.base import Answer, Endpoint, RetryableAnswer
from klstream.backends.gemini import (
    parse_answer_body,
    prefill_contents,
    request_template,
)
from klstream.backends.gemini_batch import BatchBackend, GeminiBatch, RemoteJob, parse_line
from klstream.backends.prices import load_prices, price_for
from klstream.backends.vertex_batch import LINE_INDEX_LABEL
from klstream.errors import (
    BatchCreateUnknown,
    BatchJobsActive,
    BatchRejected,
    BatchServiceError,
    ModelCannotScore,
    ResultsExist,
    RunConfigMismatch,
)
from klstream.loop import run_blocking
from klstream.metrics.kl import compute_kl
from klstream.scoring import lookahead
from klstream.scoring.caller import Outcome, open_caller
from klstream.scoring.checkpoint import write_scores_part
from klstream.scoring.score import (
    ScoreOptions,
    ScoreReport,
    ScoreStats,
    WorkItem,
    _check_run_config,
    _count_pending,
    _response_of,
    pending_responses,
    prefill_request,
    result_rows,
    score_async,
)
from klstream.storage import schemas
from klstream.storage.atomic import atomic_path, commit, temporary_sibling, write_text_atomic
from klstream.storage.rundir import RunDir

MANIFEST_FORMAT = 1
Stage = Literal["planned", "uploaded", "creating", "submitted", "ended", "collected"]


@dataclass(frozen=True)
class BatchOptions:
    """How to run batch jobs; the defaults suit the real services."""

    bucket_name: str | None = None
    """Vertex AI: the Cloud Storage bucket (default ``<project>-klstream-batch``)."""
    wait: bool = True
    """Wait for the jobs and collect their results; False submits and returns."""
    keep_files: bool = False
    """Keep the uploaded inputs and the outputs on the service after collecting them."""
    fallback_online: bool = False
    """Score online whatever the jobs left without an answer."""
    max_requests: int | None = None
    """Requests per job (default: the backend's)."""
    max_bytes: int | None = None
    """Input bytes per job (default: the backend's)."""
    poll_initial_s: float = 5.0
    poll_max_s: float = 60.0
    create_settle_s: float = 60.0
    """How long after a create that got no reply the job may still appear in the listing."""
    create_attempts: int = 5
    max_rounds: int = 8
    """With lookahead: rounds of jobs one run submits at most; what they leave uncovered waits
    for a resumed run."""


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


@dataclass
class BatchStats(ScoreStats):
    """:class:`ScoreStats` plus what a batch run waits on, for the progress line."""

    jobs: Counter[str] = field(default_factory=Counter)
    """Jobs by state: the service's state once submitted, else the manifest's stage."""
    service_done: int = 0
    service_total: int = 0
    """Lines the services report done, of the lines of jobs that report counts."""
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchSummary:
    """Where a batch run left its jobs."""

    jobs: dict[str, int]
    live_jobs: int
    positions_in_jobs: int
    """Lines (positions asked at) held by jobs not yet collected."""
    waited: bool
    rounds: int = 1
    """Rounds of jobs this run submitted or continued (more than 1 only with lookahead)."""


@dataclass(frozen=True)
class JobStatus:
    """One job, as ``klstream batch status`` shows it."""

    model2: str
    manifest: JobManifest


class StopRun(Exception):
    """Ends the batch run early with a reason; the manifests say where to continue."""


@dataclass(frozen=True)
class _Line:
    """One batch line: its request, and Model 1's tokens at the positions it may cover."""

    item: WorkItem
    model1: list[lookahead.Token]


async def _round_lines(
    run_dir: Path, model2: str, range_positions: int, tokens: int
) -> AsyncIterator[_Line]:
    """The lines of a round, in key order: every ``tokens``-th position of each run of pending
    positions, asking for ``tokens`` tokens (fewer at the run's end)."""
    async for rows in pending_responses(run_dir, model2, range_positions):
        response = _response_of(rows)
        pending = [row["pending"] for row in rows]
        for start, end in lookahead.segments(pending, len(rows)):
            for position in range(start, end, tokens):
                asked = min(tokens, end - position)
                yield _Line(
                    response.request(position, asked, "sample"),
                    response.tokens[position : position + asked],
                )


def accepted_steps(line: _Line, outcome: Outcome) -> int:
    """How many of an answer's steps are results (1 for a failure: its error row, and for a
    one-token line)."""
    answer = outcome.answer
    if answer is None or line.item.max_tokens == 1:
        return 1
    chosen = [
        lookahead.Token(s.chosen.token, s.chosen.token_id) if s.chosen_reported else None
        for s in answer.steps
    ]
    limit = line.item.max_tokens
    return lookahead.accept(len(answer.steps), chosen, line.model1, 0, limit).steps


def line_key(item: WorkItem) -> str:
    """A position's key in the JSONL files: readable, and unambiguous with any stem."""
    return f"{item.stem}#{item.response_index}#{item.position}"


def _key_tuple(key: str) -> tuple[str, int, int]:
    stem, response_index, position = key.rsplit("#", 2)
    return stem, int(response_index), int(position)


def make_backend(endpoint: Endpoint, model2: str, options: BatchOptions) -> BatchBackend:
    if endpoint.backend == "vertex":
        from klstream.backends.vertex_batch import VertexBatch

        return VertexBatch(endpoint, model2, options.bucket_name)
    return GeminiBatch(endpoint, model2)


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


def _check_batch_dir(run: RunDir, options: ScoreOptions, manifests: list[JobManifest]) -> None:
    """Jobs already planned for this model2 are continued (resume), refused, or discarded
    (overwrite) — never while one may still run, since its results would be lost unpaid-for."""
    if not manifests:
        return
    where = run.batch_dir(options.model2)
    if options.overwrite:
        live = [m.display_name for m in manifests if m.live]
        if live:
            raise BatchJobsActive(
                f"{len(live)} batch jobs of {options.model2!r} may still be queued or running "
                f"({', '.join(live[:3])}); cancel them before discarding the run"
            )
        shutil.rmtree(where)
    elif not options.resume:
        raise ResultsExist(
            f"{where} already holds batch jobs for {options.model2!r}", options.model2
        )


def _check_endpoint(
    run: RunDir, manifests: list[JobManifest], backend: BatchBackend, endpoint: Endpoint
) -> None:
    """Jobs can only be found where they were created."""
    for manifest in manifests:
        if not manifest.active:
            continue
        wanted = {"service": backend.service, "project": endpoint.project}
        if endpoint.backend == "vertex":
            wanted["location"] = endpoint.location
        differences = [
            f"{key}: recorded {getattr(manifest, key)!r}, now {value!r}"
            for key, value in wanted.items()
            if getattr(manifest, key) != value
        ]
        if differences:
            raise RunConfigMismatch(
                run.batch_manifest(manifest.model2, manifest.job_id), differences
            )


class _JobWriter:
    """Cuts the stream of lines into job files within the size limits, each closed atomically
    with its key list and manifest."""

    def __init__(
        self, run: RunDir, options: ScoreOptions, backend: BatchBackend, endpoint: Endpoint
    ) -> None:
        self.run, self.options, self.backend, self.endpoint = run, options, backend, endpoint
        batch = options.batch or BatchOptions()
        self.max_requests = batch.max_requests or backend.max_requests
        self.max_bytes = batch.max_bytes or backend.max_bytes
        self.plan = f"{int(time.time()):08x}{secrets.token_hex(2)}"
        """The planning round: its jobs' names sort by the time they were planned."""
        self.manifests: list[JobManifest] = []
        self.handle: IO[bytes] | None = None
        self.keys: list[dict[str, Any]] = []
        self.size = 0

    @property
    def job_id(self) -> str:
        return f"{self.plan}-{len(self.manifests):04d}"

    def _encode(self, item: WorkItem, index: int, request: dict[str, Any]) -> bytes:
        line = self.backend.line(line_key(item), index, request)
        return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def add(self, line: _Line, request: dict[str, Any]) -> None:
        item = line.item
        data = self._encode(item, len(self.keys), request)
        full = len(self.keys) >= self.max_requests or self.size + len(data) > self.max_bytes
        if self.keys and full:
            self.close_job()
            data = self._encode(item, 0, request)
        if self.handle is None:
            path = self.run.batch_input(self.options.model2, self.job_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = temporary_sibling(path).open("wb")
        self.handle.write(data)
        self.size += len(data)
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
        model2, job_id = self.options.model2, self.job_id
        final = self.run.batch_input(model2, job_id)
        self.handle.close()
        commit(temporary_sibling(final), final)
        keys = pa.Table.from_pylist(self.keys, schema=schemas.BATCH_KEYS)
        with atomic_path(self.run.batch_keys(model2, job_id)) as tmp:
            pq.write_table(keys, tmp)
        display_name = f"klstream-{job_id}"
        remote_input, remote_output = self.backend.remote_names(job_id, display_name)
        manifest = JobManifest(
            job_id=job_id,
            plan=self.plan,
            display_name=display_name,
            service=self.backend.service,
            model2=model2,
            project=self.endpoint.project,
            location=self.endpoint.location,
            positions=len(self.keys),
            input_bytes=self.size,
            remote_input=remote_input,
            remote_output=remote_output,
        )
        manifest.save(self.run)
        self.manifests.append(manifest)
        self.handle, self.keys, self.size = None, [], 0

    def finish(self) -> list[JobManifest]:
        self.close_job()
        if self.manifests:
            write_text_atomic(self.run.batch_plan_marker(self.options.model2, self.plan), "")
        return self.manifests


class _BatchRun:
    def __init__(
        self,
        run: RunDir,
        options: ScoreOptions,
        endpoint: Endpoint,
        backend: BatchBackend,
        stats: BatchStats,
        on_progress: Callable[[ScoreStats], None] | None,
    ) -> None:
        self.run, self.options, self.endpoint, self.backend = run, options, endpoint, backend
        self.batch = options.batch or BatchOptions()
        self.stats, self.on_progress = stats, on_progress
        self.model2 = options.model2

    def progress(self, manifests: list[JobManifest]) -> None:
        stats = self.stats
        stats.jobs = Counter(
            m.state if m.stage in ("submitted", "ended") and m.state else m.stage for m in manifests
        )
        counted = [
            m for m in manifests if m.stage == "submitted" and m.service_succeeded is not None
        ]
        stats.service_done = sum(
            (m.service_succeeded or 0) + (m.service_failed or 0) for m in counted
        )
        stats.service_total = sum(m.positions for m in counted)
        if self.on_progress is not None:
            self.on_progress(stats)

    async def probe(self, lines: AsyncIterator[_Line]) -> _Line | None:
        """One line online before anything is uploaded: a model that cannot score (no
        prefill, wrong key, unknown model) stops the run here, not after a day in a queue. Its
        result is kept like any online result."""
        first = await anext(lines, None)
        if first is None:
            return None
        options = self.options
        async with open_caller(
            self.endpoint, self.model2, options.policy, 1, options.thinking_budget, self.stats.calls
        ) as caller:
            outcome = await caller.call(prefill_request(options, first.item))
        steps = accepted_steps(first, outcome)
        rows = result_rows(first.item, self.model2, outcome, steps)
        table = pa.Table.from_pylist(rows, schema=schemas.SCORES)
        await asyncio.to_thread(write_scores_part, self.run, self.model2, table)
        if outcome.answer:
            self.stats.scored += steps
            return None
        return first

    async def plan(self, probe: bool = True) -> list[JobManifest]:
        """Write the job files and manifests of a round's lines over the pending positions,
        after probing with the first (``probe``)."""
        options = self.options
        tokens = lookahead.batch_lookahead(options.lookahead)
        lines = _round_lines(self.run.root, self.model2, options.range_positions, tokens)
        unanswered = await self.probe(lines) if probe else None
        templates: dict[int, dict[str, Any]] = {}
        writer = _JobWriter(self.run, options, self.backend, self.endpoint)

        def request(item: WorkItem) -> dict[str, Any]:
            if item.max_tokens not in templates:
                templates[item.max_tokens] = request_template(
                    self.endpoint,
                    options.top_logprobs,
                    options.thinking_budget,
                    options.temperature,
                    item.max_tokens,
                )
            contents = prefill_contents(item.prompt, item.prefill)
            return {"contents": contents, **templates[item.max_tokens]}

        if unanswered is not None:
            writer.add(unanswered, request(unanswered.item))
        async for line in lines:
            writer.add(line, request(line.item))
        return writer.finish()

    async def submit(self, manifests: list[JobManifest]) -> None:
        """Upload every input not on the service yet, then create every job not created yet."""
        to_upload = [m for m in manifests if m.stage in ("planned", "uploaded")]
        if to_upload:
            await self.backend.prepare()
        for manifest in to_upload:
            self.progress(manifests)
            local = self.run.batch_input(self.model2, manifest.job_id)
            await self.backend.upload(local, manifest.remote_input, manifest.display_name)
            manifest.stage = "uploaded"
            manifest.save(self.run)
        for manifest in manifests:
            if manifest.stage in ("uploaded", "creating"):
                self.progress(manifests)
                await self.create(manifest)
        self.progress(manifests)

    async def create(self, manifest: JobManifest) -> None:
        if manifest.stage == "creating" and await self.resolve(manifest, replied=False):
            return
        last_error = ""
        for attempt in range(self.batch.create_attempts):
            if attempt:
                await asyncio.sleep(min(2.0**attempt, 60.0))
            manifest.stage = "creating"
            manifest.create_attempted_at = time.time()
            manifest.save(self.run)
            try:
                job = await self.backend.create(
                    manifest.display_name, manifest.remote_input, manifest.remote_output
                )
            except BatchRejected:
                manifest.stage, manifest.create_attempted_at = "uploaded", None
                manifest.save(self.run)
                raise
            except BatchCreateUnknown as unknown:
                if await self.resolve(manifest, unknown.replied):
                    return
                last_error = str(unknown)
                continue
            self.attach(manifest, job)
            return
        raise StopRun(
            f"batch job {manifest.display_name} could not be created in "
            f"{self.batch.create_attempts} attempts; the last said: {last_error}"
        )

    async def resolve(self, manifest: JobManifest, replied: bool) -> bool:
        """Whether a create of unknown outcome made the job (then attach to it)."""
        found = await self.backend.find(manifest.display_name)
        if found is None and not replied:
            settled = (manifest.create_attempted_at or 0.0) + self.batch.create_settle_s
            if settled > time.time():
                await asyncio.sleep(settled - time.time())
                found = await self.backend.find(manifest.display_name)
        if found is None:
            return False
        self.attach(manifest, found)
        return True

    def attach(self, manifest: JobManifest, job: RemoteJob) -> None:
        manifest.job_name = job.name
        manifest.create_attempted_at = None
        manifest.stage = "submitted"
        self.observe(manifest, job)
        self.run.batch_input(self.model2, manifest.job_id).unlink(missing_ok=True)

    def observe(self, manifest: JobManifest, job: RemoteJob | None) -> None:
        observe(self.run, manifest, job)

    async def wait(self, manifests: list[JobManifest]) -> None:
        """Poll with back-off until every job has ended, collecting each as it ends."""
        interval = self.batch.poll_initial_s
        while True:
            for manifest in manifests:
                if manifest.stage == "submitted":
                    assert manifest.job_name is not None
                    job = await self.backend.get(manifest.job_name)
                    self.observe(manifest, job)
                    if job is None or job.ended:
                        await self.collect(manifest, job)
                elif manifest.stage == "ended":
                    await self.collect(manifest, None)
            self.progress(manifests)
            if not any(m.stage == "submitted" for m in manifests):
                return
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self.batch.poll_max_s)

    async def collect(self, manifest: JobManifest, job: RemoteJob | None) -> None:
        """The job's results into the scores table, once; then its remote files away."""
        model2, job_id = self.model2, manifest.job_id
        if job is None and manifest.job_name is not None and manifest.state != "MISSING":
            job = await self.backend.get(manifest.job_name)
        written = self.run.batch_part(model2, job_id)
        if written is None:
            output = self.run.batch_output(model2, job_id)
            has_output = job is not None and await self.backend.download(
                job, manifest.remote_output, output
            )
            table = await asyncio.to_thread(self._results, manifest, output if has_output else None)
            final = self.run.new_batch_part(model2, job_id)
            with atomic_path(final) as tmp:
                pq.write_table(table, tmp, compression="zstd")
            output.unlink(missing_ok=True)
            manifest.scored = pc.sum(pc.equal(table["status"], schemas.SCORE_OK)).as_py() or 0
            manifest.failed = table.num_rows - manifest.scored
            self.stats.scored += manifest.scored
            self.stats.failed += manifest.failed
        else:
            # Written by a process that died before saying so: counted as already done.
            status = pq.read_table(written, columns=["status"])["status"]
            manifest.scored = pc.sum(pc.equal(status, schemas.SCORE_OK)).as_py() or 0
            manifest.failed = len(status) - manifest.scored
        manifest.stage = "collected"
        manifest.save(self.run)
        if not self.batch.keep_files and not manifest.cleaned:
            await self.backend.remove(manifest.remote_input, job, manifest.remote_output)
            manifest.cleaned = True
            manifest.save(self.run)

    def _results(self, manifest: JobManifest, output: Path | None) -> pa.Table:
        """One scores row per position of the job: its answer, its line's error, or why it has
        none."""
        keys = [
            _Line(
                WorkItem(
                    k["stem"], k["response_index"], k["position"], "", "", k.get("max_tokens", 1)
                ),
                [
                    lookahead.Token(text, token_id)
                    for text, token_id in zip(
                        k.get("model1_tokens", []), k.get("model1_token_ids", []), strict=True
                    )
                ],
            )
            for k in pq.read_table(self.run.batch_keys(self.model2, manifest.job_id)).to_pylist()
        ]
        by_key = {line_key(line.item): i for i, line in enumerate(keys)}
        outcomes: list[Outcome | None] = [None] * len(keys)
        latency = manifest.run_ms
        for line in _lines(output):
            parsed = parse_line(line)
            index = by_key.get(parsed.key) if parsed.key is not None else None
            if index is None:
                index = _labelled_index(parsed.request, len(keys))
            if index is None:
                continue
            outcomes[index] = _outcome(
                parsed.body, parsed.error, self.options.thinking_budget, latency
            )
        if manifest.state == "SUCCEEDED":
            missing = f"batch job {manifest.job_name} succeeded without an answer for this position"
        else:
            missing = (
                f"batch job {manifest.job_name or manifest.display_name} ended {manifest.state}"
            )
            missing += f": {manifest.error}" if manifest.error else ""
        rows = []
        for line, outcome in zip(keys, outcomes, strict=True):
            final = outcome or Outcome(None, missing, 1, latency)
            steps = accepted_steps(line, final)
            rows += result_rows(line.item, self.model2, final, steps, schemas.SOURCE_BATCH)
        return pa.Table.from_pylist(rows, schema=schemas.SCORES)


def observe(run: RunDir, manifest: JobManifest, job: RemoteJob | None) -> None:
    """Record what the service says of a job (None: it no longer knows it)."""
    if job is None:
        manifest.state, manifest.error = "MISSING", "the service no longer knows this job"
    else:
        manifest.state, manifest.error = job.state, job.error
        manifest.service_succeeded = job.succeeded
        manifest.service_failed = job.failed
        manifest.service_incomplete = job.incomplete
        manifest.run_ms = job.run_ms
    if manifest.stage == "submitted" and (job is None or job.ended):
        manifest.stage = "ended"
    manifest.save(run)


def _lines(output: Path | None) -> Iterator[Any]:
    if output is None:
        return
    with output.open("rb") as source:
        for raw in source:
            if raw.strip():
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError:
                    yield raw.decode(errors="replace")


def _labelled_index(request: Any, count: int) -> int | None:
    labels = request.get("labels") if isinstance(request, dict) else None
    value = labels.get(LINE_INDEX_LABEL) if isinstance(labels, dict) else None
    if isinstance(value, str) and value.isdigit() and int(value) < count:
        return int(value)
    return None


def _outcome(body: Any, error: str | None, thinking_budget: int | None, latency: float) -> Outcome:
    if error is not None:
        return Outcome(None, error, 1, latency)
    try:
        answer: Answer = parse_answer_body(body, thinking_budget)
    except (RetryableAnswer, ModelCannotScore) as unusable:
        return Outcome(None, str(unusable), 1, latency)
    return Outcome(answer, None, 1, latency)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT/SIGTERM cancel the run (jobs go on on the service; ``--resume`` collects them)."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, current.cancel, f"stopped by {signum.name}")
    try:
        yield
    finally:
        for signum in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)


async def score_batch_async(
    run_dir: Path,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
) -> ScoreReport:
    """Score the pending positions of ``run_dir`` through batch jobs (see the module doc)."""
    batch = options.batch or BatchOptions()
    run = RunDir(run_dir)
    run.require_exploded()
    model2 = options.model2
    manifests = load_manifests(run, model2)
    _check_batch_dir(run, options, manifests)
    if options.overwrite:
        manifests = []
    _check_run_config(run, options, endpoint, price_for(model2, load_prices(options.prices)))
    backend = make_backend(endpoint, model2, batch)
    _check_endpoint(run, manifests, backend, endpoint)
    positions, done = _count_pending(run_dir, model2)
    stats = BatchStats(total=positions, already_done=done)
    runner = _BatchRun(run, options, endpoint, backend, stats, on_progress)
    stopped: str | None = None
    rounds = 0
    tokens = lookahead.batch_lookahead(options.lookahead)
    try:
        with _stopped_by_signals():
            if not any(m.active for m in manifests):
                manifests = manifests + await runner.plan()
            active = [m for m in manifests if m.active]
            while True:
                rounds += 1
                scored_before = stats.scored
                await runner.submit(active)
                if not batch.wait:
                    break
                await runner.wait(active)
                left = stats.total - stats.already_done - stats.scored
                if tokens == 1 or not left or stats.scored == scored_before:
                    break
                if rounds >= batch.max_rounds:
                    stopped = (
                        f"{left} positions still uncovered after {rounds} rounds of batch jobs "
                        "(the most allowed); resuming the run submits them"
                    )
                    break
                active = await runner.plan(probe=False)
                if not active:
                    break
                manifests += active
    except (StopRun, BatchServiceError) as stop:
        stopped = str(stop)
    except asyncio.CancelledError as cancelled:
        stopped = str(cancelled.args[0]) if cancelled.args else "cancelled"
    active = [m for m in manifests if m.active]
    summary = BatchSummary(
        jobs=dict(Counter(m.state or m.stage for m in manifests)),
        live_jobs=sum(m.live for m in manifests),
        positions_in_jobs=sum(m.positions for m in active),
        waited=batch.wait,
        rounds=rounds,
    )
    remaining = stats.total - stats.already_done - stats.scored
    if remaining and batch.wait and batch.fallback_online and stopped is None and not active:
        online = replace(options, batch=None, resume=True, overwrite=False)
        report = await score_async(run_dir, online, endpoint, on_progress)
        stats.scored += report.stats.scored
        stats.failed += report.stats.failed
        return replace(report, stats=stats, batch=summary)
    kl = await asyncio.to_thread(compute_kl, run_dir, model2) if stats.done else None
    return ScoreReport(
        stats=stats, remaining=remaining, kl=kl, stopped_because=stopped, batch=summary
    )


async def batch_status_async(
    run_dir: Path, model2: str | None = None, endpoint: Endpoint | None = None
) -> list[JobStatus]:
    """Every batch job of the run (of ``model2``, or of every Model 2); with an endpoint, the
    state of each live job is asked of the service first (and saved)."""
    run = RunDir(run_dir)
    statuses = []
    for path in run.batch_manifests(model2):
        manifest = JobManifest.load(path)
        if endpoint is not None and manifest.stage == "submitted" and manifest.job_name:
            backend = make_backend(endpoint, manifest.model2, BatchOptions())
            observe(run, manifest, await backend.get(manifest.job_name))
        statuses.append(JobStatus(manifest.model2, manifest))
    return statuses


async def batch_cancel_async(
    run_dir: Path, endpoint: Endpoint, model2: str | None = None
) -> list[JobStatus]:
    """Cancel every job of the run that may be queued or running; jobs not created yet are
    marked cancelled so that none is created later. A later ``--resume`` collects what the
    cancelled jobs answered and submits the rest again."""
    run = RunDir(run_dir)
    cancelled = []
    for path in run.batch_manifests(model2):
        manifest = JobManifest.load(path)
        backend = make_backend(endpoint, manifest.model2, BatchOptions())
        if manifest.stage == "creating":
            found = await backend.find(manifest.display_name)
            if found is not None:
                manifest.job_name, manifest.stage = found.name, "submitted"
        if manifest.stage == "submitted" and manifest.job_name:
            job = await backend.get(manifest.job_name)
            if job is None or job.ended:
                observe(run, manifest, job)
                continue
            await backend.cancel(manifest.job_name)
        elif manifest.stage in ("planned", "uploaded", "creating"):
            manifest.stage, manifest.state = "ended", "CANCELLED"
            manifest.error = "cancelled before it was submitted"
        else:
            continue
        manifest.save(run)
        cancelled.append(JobStatus(manifest.model2, manifest))
    return cancelled


def batch_status(
    run_dir: Path, model2: str | None = None, endpoint: Endpoint | None = None
) -> list[JobStatus]:
    """:func:`batch_status_async`, blocking."""
    return run_blocking(batch_status_async(run_dir, model2, endpoint))


def batch_cancel(run_dir: Path, endpoint: Endpoint, model2: str | None = None) -> list[JobStatus]:
    """:func:`batch_cancel_async`, blocking."""
    return run_blocking(batch_cancel_async(run_dir, endpoint, model2))
