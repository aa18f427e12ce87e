"""Batch mode: the same requests as online scoring, as batch jobs at half the price.

A run goes through durable steps, each recorded in a job manifest under
``RUN_DIR/batch/<model2>/`` (:mod:`klstream.scoring.batch_jobs`) before the next begins:

1. **plan**: the pending positions become JSONL files of at most ``max_requests`` lines,
   ``max_bytes`` bytes and ``max_tokens`` estimated tokens (a line's input estimated from its
   characters as the dry run does, plus the tokens it asks for), each with its key list and a
   manifest naming a unique display name and the remote input; a marker closes the planning
   round (a round cut short is planned again).
2. **upload** every input (idempotent: an identical upload already there is kept).
3. **create** each job. The manifest says ``creating`` before the call and holds the job name
   after it. A create whose outcome is unknown (a lost reply, a time-out, a killed process) is
   resolved by listing the service's jobs and matching the display name — and, when no reply
   came, again once ``create_settle_s`` has passed — before it is ever tried again.
   The backend (:class:`~klstream.backends.base.BatchJobs`) owns the lines' format.
4. **wait**: poll every job with back-off until it ends (succeeded, failed, cancelled, expired).
5. **collect**: the output lines, matched by key (never by order), become one part of the scores
   table per job (``source`` = ``batch``); per-line errors and positions without an answer are
   written as failures with the reason. The part is named after the job, so a crash between it
   and the manifest never writes a job's results twice. Then the remote files are deleted.

With a lookahead of N > 1 a run works in rounds: round 1 asks for N tokens at every N-th pending
position of each run of pending positions (under ``auto``, each line asks for what the online
scheduler would, from the same acceptance prediction at batch prices, and the next line starts
where it stops: at the predicted breaks); a line's steps are kept while the tokens generated
before them are Model 1's (:func:`~klstream.scoring.lookahead.accept`, as online), and each later
round asks, at the first uncovered position of every gap, for the gap's length — until every
position is covered, a round covers nothing, or ``max_rounds`` rounds have run. Lines are sampled
at the run's temperature: greedy decoding needs the online probe. With N = 1 one round asks for
every pending position, one token each.

Before anything is uploaded, the first lines are asked online, as the run's probe (until one
with a prefill has been asked): a model that cannot score stops the run there, not after a day
in a queue. Then, until a job of the run has brought lines back with logprobs, the next few
lines go alone as a **canary** job — planned, recorded and collected like any other, its good
results kept — and the bulk is planned only once it has: a canary none of whose lines came back
with logprobs (a service whose batch jobs drop them, a prefill its batch side refuses) ends the
run with the cause (:class:`~klstream.errors.BatchCanaryFailed`), nothing more sent. A resumed
run finishes a canary it finds before anything else. ``canary=False`` skips it.

Killed at any moment, the next ``--resume`` continues from the manifests and never submits a
position that a job already holds. Positions that end up without an answer are submitted again
by a later ``--resume`` (a new round), or scored online at once with ``fallback_online``.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from klstream.backends import batch_jobs, open_prefill
from klstream.backends.base import (
    BatchJobs,
    ClientSettings,
    Endpoint,
    PrefillRequest,
    RemoteJob,
)
from klstream.backends.prices import Price
from klstream.backends.transport import Outcome
from klstream.errors import (
    BatchCreateUnknown,
    BatchJobsActive,
    BatchRejected,
    BatchServiceError,
    ResultsExist,
    RunConfigMismatch,
)
from klstream.loop import run_blocking
from klstream.numbers import thousands
from klstream.preflight import CANARY_LINES, canary_failure, line_outcome
from klstream.scoring import acceptance, lookahead
from klstream.scoring.acceptance import AcceptanceModel
from klstream.scoring.batch_jobs import (
    JobManifest,
    JobWriter,
    Line,
    job_lines,
    line_key,
    load_manifests,
)
from klstream.scoring.checkpoint import write_part
from klstream.scoring.options import BatchOptions
from klstream.scoring.pool import StopRun
from klstream.scoring.prefill import AUTO_PRICES_FALLBACK, FIRST_PROBES, PrefillScheduler
from klstream.scoring.session import BatchProgress, BatchSummary, Scheduler, Session
from klstream.scoring.work import (
    Response,
    acceptance_so_far,
    chosen_tokens,
    pending_responses,
    prefill_request,
    result_rows,
)
from klstream.storage import schemas
from klstream.storage.rundir import RunDir

Lengths = Callable[[Response, int, int], Iterator[tuple[int, int]]]
"""Where a round's lines go in the pending run ``[start, end)`` of a response, and how many
tokens each asks for."""


def every_nth(tokens: int) -> Lengths:
    """Lines at every ``tokens``-th position, asking for ``tokens`` (fewer at the run's end)."""

    def lengths(response: Response, start: int, end: int) -> Iterator[tuple[int, int]]:
        for position in range(start, end, tokens):
            yield position, min(tokens, end - position)

    return lengths


def at_predicted_breaks(model: AcceptanceModel, price: Price) -> Lengths:
    """Lines for ``auto``: each asks for what the online scheduler would
    (:func:`~klstream.scoring.acceptance.best_lookahead`, from ``model``'s prediction and
    ``price``'s batch prices), and the next starts where it stops, after the position where a
    disagreement is likely: a round's lines break where they are predicted to, and leave few
    gaps to the next round."""

    def lengths(response: Response, start: int, end: int) -> Iterator[tuple[int, int]]:
        accept = model.predict(response.features[start:end])
        position = start
        while position < end:
            ahead = accept[position - start : position - start + lookahead.AUTO_MAX_LOOKAHEAD]
            request_cost = response.input_tokens(position) * price.batch_input
            asked = acceptance.best_lookahead(
                ahead, request_cost, price.batch_output, end - position
            )
            yield position, asked
            position += asked

    return lengths


async def _round_lines(
    run_dir: Path, model2: str, range_positions: int, lengths: Lengths
) -> AsyncGenerator[Line, None]:
    """The lines of a round, in key order, over each run of pending positions where
    ``lengths`` puts them."""
    async for response in pending_responses(run_dir, model2, range_positions):
        for start, end in lookahead.segments(response.pending, len(response.pending)):
            for position, asked in lengths(response, start, end):
                yield Line(
                    response.request(position, asked, "sample"),
                    response.tokens[position : position + asked],
                )


def accepted_steps(line: Line, outcome: Outcome) -> int:
    """How many of an answer's steps are results (1 for a failure: its error row, and for a
    one-token line)."""
    answer = outcome.value
    if answer is None or line.item.max_tokens == 1:
        return 1
    limit = line.item.max_tokens
    return lookahead.accept(len(answer.steps), chosen_tokens(answer), line.model1, 0, limit).steps


def _check_endpoint(
    run: RunDir, manifests: list[JobManifest], jobs: BatchJobs, endpoint: Endpoint
) -> None:
    """Jobs can only be found where they were created."""
    for manifest in manifests:
        if not manifest.active:
            continue
        wanted: dict[str, str | None] = {"service": jobs.service, "project": endpoint.project}
        if jobs.regional:
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


def _output_lines(output: Path | None) -> Iterator[bytes]:
    if output is None:
        return
    with output.open("rb") as source:
        for raw in source:
            if raw.strip():
                yield raw


class BatchScheduler(Scheduler):
    """The session's pending positions through batch jobs (see the module doc)."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        options = session.options
        self.batch = options.batch or BatchOptions()
        self.model2 = options.model2
        self.run_dir = session.run
        self.jobs = batch_jobs(session.endpoint, options.settings, self.batch.bucket_name)
        self.manifests = self._continued_manifests()
        self.rounds = 0
        session.stats.batch = BatchProgress()

    def _continued_manifests(self) -> list[JobManifest]:
        """Jobs already planned for this model2 are continued (resume), refused, or discarded
        (overwrite) — never while one may still run, since its results would be lost unpaid-for."""
        run, options = self.run_dir, self.session.options
        manifests = load_manifests(run, self.model2)
        if manifests and options.overwrite:
            live = [m.display_name for m in manifests if m.live]
            if live:
                raise BatchJobsActive(
                    f"{len(live)} batch jobs of {self.model2!r} may still be queued or running "
                    f"({', '.join(live[:3])}); cancel them before discarding the run"
                )
            shutil.rmtree(run.batch_dir(self.model2))
            manifests = []
        elif manifests and not options.resume:
            raise ResultsExist(
                f"{run.batch_dir(self.model2)} already holds batch jobs for {self.model2!r}",
                self.model2,
            )
        _check_endpoint(run, manifests, self.jobs, self.session.endpoint)
        return manifests

    def batch_summary(self) -> BatchSummary:
        manifests = self.manifests
        return BatchSummary(
            jobs=dict(Counter(m.state or m.stage for m in manifests)),
            live_jobs=sum(m.live for m in manifests),
            positions_in_jobs=sum(m.positions for m in manifests if m.active),
            waited=self.batch.wait,
            rounds=self.rounds,
        )

    async def run(self) -> None:
        try:
            await self._rounds()
        except BatchServiceError as failing:
            # The jobs are where the manifests say: a resumed run continues.
            raise StopRun(str(failing)) from None

    async def _rounds(self) -> None:
        """Continue the jobs an earlier run left — a canary first, which decides whether
        anything more is sent — (and then plan for what they did not answer, so a resume after
        a cancel needs no second one), or plan a round; then, with lookahead, a round over each
        round's gaps."""
        stats = self.session.stats
        tokens = lookahead.batch_lookahead(self.session.options.lookahead)
        active = [m for m in self.manifests if m.active]
        canaries = [m for m in active if m.canary]
        if canaries:
            await self.prove(canaries)
            active = [m for m in active if not m.canary]
        continuing = bool(active)
        if not continuing:
            active = await self.plan()
        while True:
            self.rounds += 1
            scored_before = stats.scored
            await self.submit(active)
            if not self.batch.wait:
                return
            await self.wait(active)
            left = stats.remaining
            if not left:
                break
            if not continuing and (tokens == 1 or stats.scored == scored_before):
                break
            if self.rounds >= self.batch.max_rounds:
                raise StopRun(
                    f"{thousands(left)} positions still uncovered after {self.rounds} rounds of "
                    "batch jobs (the most allowed); resuming the run submits them"
                )
            active = await self.plan(probe=continuing)
            continuing = False
            if not active:
                break
        if stats.remaining and self.batch.fallback_online:
            await PrefillScheduler(self.session).run()

    def progress(self, manifests: list[JobManifest]) -> None:
        stats = self.session.stats
        counted = [
            m for m in manifests if m.stage == "submitted" and m.service_succeeded is not None
        ]
        stats.batch = BatchProgress(
            jobs=Counter(
                m.state if m.stage in ("submitted", "ended") and m.state else m.stage
                for m in manifests
            ),
            service_done=sum((m.service_succeeded or 0) + (m.service_failed or 0) for m in counted),
            service_total=sum(m.positions for m in counted),
        )
        if self.session.on_progress is not None:
            self.session.on_progress(stats)

    async def probe(self, lines: AsyncIterator[Line]) -> None:
        """Lines online, one at a time, before anything is uploaded, as an online run probes:
        until one with a prefill has been asked, or :data:`~klstream.scoring.prefill.
        FIRST_PROBES` have. A model that cannot score (no
        prefill, no logprobs, wrong key or model) stops the run here, not after a day in a
        queue. Their results are kept like any online result."""
        session = self.session
        probe = session.probe
        settings = replace(session.settings, max_concurrent=1)
        tried = False
        async with open_prefill(session.endpoint, settings) as prefill:
            for _ in range(FIRST_PROBES):
                line = await anext(lines, None)
                if line is None:
                    break
                tried = True
                request = prefill_request(session.options, line.item)
                outcome = await session.caller(1).generate(prefill, request, probe.deadline)
                answer = outcome.value
                if answer is not None:
                    session.answered(prefill, answer)
                rows = result_rows(line.item, self.model2, outcome, accepted_steps(line, outcome))
                await session.record(
                    rows, answered=answer is not None, usage=answer.usage if answer else None
                )
                probe.saw(outcome.error if answer is None else None)
                if line.item.prefill:
                    break
        await session.checkpoint.flush()
        if tried and not probe.succeeded:
            raise probe.failure()

    @property
    def proven(self) -> bool:
        """Whether batch lines are known to come back with logprobs: a job of this run has
        brought some back (or the canary is off)."""
        collected = (m for m in self.manifests if m.stage == "collected")
        return not self.batch.canary or any(m.scored for m in collected)

    async def plan(self, probe: bool = True) -> list[JobManifest]:
        """Write the job files and manifests of a round's lines over the pending positions,
        after probing online with the first (``probe``). Until a job has brought lines back
        with logprobs, the first few lines go alone as a canary job (:meth:`prove`) and the
        rest is planned after it. Returns the jobs planned for the round's bulk."""
        options = self.session.options
        lengths = await self._lengths()
        lines = _round_lines(self.run_dir.root, self.model2, options.range_positions, lengths)
        if probe:
            await self.probe(lines)
        # Lines send the thinking budget the probe settled on.
        self.jobs = batch_jobs(self.session.endpoint, self.session.settings, self.batch.bucket_name)
        if not self.proven:
            canary = await self.write(lines, CANARY_LINES)
            await lines.aclose()
            await self.prove(canary)
            lines = _round_lines(self.run_dir.root, self.model2, options.range_positions, lengths)
        return await self.write(lines)

    async def _lengths(self) -> Lengths:
        """Where a round's lines go: under ``auto`` (with a price to weigh tokens by) at the
        predicted breaks, the prediction calibrated on every answer stored so far (the earlier
        rounds', the probe's); else at every N-th position."""
        options, session = self.session.options, self.session
        price = session.price or session.prices.get(AUTO_PRICES_FALLBACK)
        if options.lookahead != "auto" or price is None:
            return every_nth(lookahead.batch_lookahead(options.lookahead))
        models = await asyncio.to_thread(acceptance_so_far, self.run_dir.root, self.model2)
        return at_predicted_breaks(models["sample"], price)

    async def write(self, lines: AsyncIterator[Line], canary: int = 0) -> list[JobManifest]:
        """Plan ``lines`` into jobs — or, with ``canary`` lines, their first ones into a canary
        job — and add them to the run's."""
        batch = self.batch
        writer = JobWriter(
            self.run_dir,
            self.model2,
            self.jobs,
            self.session.endpoint,
            canary or batch.max_requests,
            batch.max_bytes,
            batch.max_tokens,
            canary=bool(canary),
        )
        written = 0
        async for line in lines:
            writer.add(line, prefill_request(self.session.options, line.item))
            written += 1
            if written == canary:
                break
        planned = writer.finish()
        self.manifests += planned
        return planned

    async def prove(self, canaries: list[JobManifest]) -> None:
        """Submit a canary job, wait for it — even when the bulk will not be waited for — and
        collect it: a canary none of whose lines came back with logprobs ends the run
        (:class:`~klstream.errors.BatchCanaryFailed`), with nothing more sent."""
        await self.submit(canaries)
        await self.wait(canaries)

    async def submit(self, manifests: list[JobManifest]) -> None:
        """Upload every input not on the service yet, then create every job not created yet."""
        to_upload = [m for m in manifests if m.stage in ("planned", "uploaded")]
        if to_upload:
            await self.jobs.prepare()
        for manifest in to_upload:
            self.progress(manifests)
            local = self.run_dir.batch_input(self.model2, manifest.job_id)
            await self.jobs.upload(local, manifest.remote_input, manifest.display_name)
            manifest.stage = "uploaded"
            manifest.save(self.run_dir)
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
            manifest.save(self.run_dir)
            try:
                job = await self.jobs.create(
                    manifest.display_name, manifest.remote_input, manifest.remote_output
                )
            except BatchRejected:
                manifest.stage, manifest.create_attempted_at = "uploaded", None
                manifest.save(self.run_dir)
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
        found = await self.jobs.find(manifest.display_name)
        if found is None and not replied:
            settled = (manifest.create_attempted_at or 0.0) + self.batch.create_settle_s
            if settled > time.time():
                await asyncio.sleep(settled - time.time())
                found = await self.jobs.find(manifest.display_name)
        if found is None:
            return False
        self.attach(manifest, found)
        return True

    def attach(self, manifest: JobManifest, job: RemoteJob) -> None:
        manifest.job_name = job.name
        manifest.create_attempted_at = None
        manifest.stage = "submitted"
        observe(self.run_dir, manifest, job)
        self.run_dir.batch_input(self.model2, manifest.job_id).unlink(missing_ok=True)

    async def wait(self, manifests: list[JobManifest]) -> None:
        """Poll with back-off until every job has ended, collecting each as it ends."""
        interval = self.batch.poll_initial_s
        while True:
            for manifest in manifests:
                if manifest.stage == "submitted":
                    assert manifest.job_name is not None
                    job = await self.jobs.get(manifest.job_name)
                    observe(self.run_dir, manifest, job)
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
        """The job's results into the scores table, once; then its remote files away. A
        canary that brought no line back with logprobs then ends the run."""
        run, model2, job_id = self.run_dir, self.model2, manifest.job_id
        stats = self.session.stats
        if job is None and manifest.job_name is not None and manifest.state != "MISSING":
            job = await self.jobs.get(manifest.job_name)
        written = run.batch_part(model2, job_id)
        if written is None:
            output = run.batch_output(model2, job_id)
            has_output = job is not None and await self.jobs.download(
                job, manifest.remote_output, output
            )
            table = await asyncio.to_thread(self._results, manifest, output if has_output else None)
            write_part(run.new_batch_part(model2, job_id), table, self.session.checkpoint.config)
            output.unlink(missing_ok=True)
            outcomes = table.select(["status", "error"])
        else:
            # Written by a process that died before saying so: counted as already done.
            outcomes = pq.read_table(written, columns=["status", "error"])
        manifest.scored = pc.sum(pc.equal(outcomes["status"], schemas.SCORE_OK)).as_py() or 0
        manifest.failed = outcomes.num_rows - manifest.scored
        if written is None:
            stats.scored += manifest.scored
            stats.failed += manifest.failed
        manifest.stage = "collected"
        manifest.save(run)
        if not self.batch.keep_files and not manifest.cleaned:
            await self.jobs.remove(manifest.remote_input, job, manifest.remote_output)
            manifest.cleaned = True
            manifest.save(run)
        if manifest.canary:
            errors = outcomes["error"].drop_null()
            first_error = errors[0].as_py() if len(errors) else None
            name = manifest.job_name or manifest.display_name
            lines, answered = manifest.positions, manifest.scored > 0
            failure = canary_failure(name, lines, answered, first_error, model2)
            if failure is not None:
                raise failure

    def _results(self, manifest: JobManifest, output: Path | None) -> pa.Table:
        """One scores row per position of the job: its answer, its line's error, or why it has
        none."""
        lines = job_lines(self.run_dir, self.model2, manifest.job_id)
        top_logprobs = self.session.options.top_logprobs
        by_key = {line_key(line.item): i for i, line in enumerate(lines)}
        outcomes: list[Outcome | None] = [None] * len(lines)
        latency = manifest.run_ms
        for raw in _output_lines(output):
            decoded = self.jobs.decode_line(raw)
            index = by_key.get(decoded.key) if decoded.key is not None else None
            if index is None and decoded.index is not None and decoded.index < len(lines):
                index = decoded.index
            if index is None:
                continue
            item = lines[index].item
            request = PrefillRequest(item.prompt, "", top_logprobs, item.max_tokens)
            outcomes[index] = line_outcome(decoded, request, latency)
        if manifest.state == "SUCCEEDED":
            missing = f"batch job {manifest.job_name} succeeded without an answer for this position"
        else:
            missing = (
                f"batch job {manifest.job_name or manifest.display_name} ended {manifest.state}"
            )
            missing += f": {manifest.error}" if manifest.error else ""
        rows = []
        for line, outcome in zip(lines, outcomes, strict=True):
            final = outcome or Outcome(None, missing, 1, latency)
            steps = accepted_steps(line, final)
            rows += result_rows(line.item, self.model2, final, steps, schemas.SOURCE_BATCH)
        return pa.Table.from_pylist(rows, schema=schemas.SCORES)


@dataclass(frozen=True)
class JobStatus:
    """One job, as ``klstream batch status`` shows it."""

    model2: str
    manifest: JobManifest


def _jobs_of(endpoint: Endpoint, manifest: JobManifest) -> BatchJobs:
    return batch_jobs(endpoint, ClientSettings(manifest.model2), None)


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
            observe(run, manifest, await _jobs_of(endpoint, manifest).get(manifest.job_name))
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
        jobs = _jobs_of(endpoint, manifest)
        if manifest.stage == "creating":
            found = await jobs.find(manifest.display_name)
            if found is not None:
                manifest.job_name, manifest.stage = found.name, "submitted"
        if manifest.stage == "submitted" and manifest.job_name:
            job = await jobs.get(manifest.job_name)
            if job is None or job.ended:
                observe(run, manifest, job)
                continue
            await jobs.cancel(manifest.job_name)
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
