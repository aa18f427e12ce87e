"""The life of a batch job, the same for Gemini batches and Vertex AI batch prediction jobs.

A job is pending for ``BatchConfig.pending_s``, running for ``running_s``, then reaches its end
state: succeeded, unless ``end_states`` names another for it (by creation order, across both
services). The first time its state is read after the end, its output is written once: the toy
model's answers to its lines (all of them; ``partial_fraction`` of them for a job that failed or
expired; those answered by then for a cancelled one), keyed like the input, in random order when
``shuffle_output``, with ``line_error_rate`` of the keys failing the first time they are seen.
Creates may be slow (``create_delay_s``: a client gone by then creates nothing;
``create_reply_delay_s``) or lose their reply (``lost_create_replies``: the job is made but the
reply is a 503).

:class:`JobService` runs all this and the routes both services share (create, get, list, cancel,
delete); each service's subclass says where the routes are, what its JSON looks like and where
output goes.
"""

from __future__ import annotations

import itertools
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from aiohttp import web

from klstream.emulator.batch.common import (
    END_STATES,
    BatchContext,
    EndState,
    Route,
    json_reply,
    now_iso,
)
from klstream.emulator.protocol import (
    ApiError,
    answer_body,
    build_call,
    client_gone,
    parse_contents,
    refuse_prefill,
)


@dataclass
class Job:
    """A job of either service; ``final_state`` and ``output`` are set once, when it ends."""

    number: int
    name: str
    display_name: str
    model: str
    version: str
    lines: list[dict[str, Any]]
    source: dict[str, Any]
    """The job's input as the service echoes it (inputConfig)."""
    destination: str | None
    """Vertex: the gs:// output prefix."""
    inline: bool
    """Gemini: the lines came in the request, and the answers go back in the job."""
    started: float
    create_time: str
    end_state: EndState
    reply_lost: bool
    """The create made this job but its reply is to be dropped (a 503)."""
    cancelled_at: float | None = None
    final_state: EndState | None = None
    end_time: str | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    output_location: str | None = None
    error: str | None = None


class JobStatus(NamedTuple):
    """A job's state now, and its lines succeeded, failed and not done, as the services report
    them (while it runs, the lines done so far count as succeeded)."""

    state: str
    succeeded: int
    failed: int
    pending: int


@dataclass
class JobBook:
    """What the two services' jobs share: one numbering, and the line keys that have failed
    once (a key fails at most once, whichever service its job went to)."""

    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    failed_keys: set[str] = field(default_factory=set)


class JobService(ABC):
    """One service's jobs: their schedule and output, and the routes that reach them."""

    vertex: ClassVar[bool]
    """Answer lines in Vertex AI's shape rather than the Developer API's."""
    collection: ClassVar[str]
    """The path of the jobs (listed with GET; one job is ``{collection}/{job}``)."""
    create_path: ClassVar[str]
    """Where a POST creates a job."""
    list_field: ClassVar[str]
    """The field of a list reply that holds the jobs."""

    def __init__(self, context: BatchContext, book: JobBook) -> None:
        self._context = context
        self._book = book
        self._jobs: dict[str, Job] = {}

    def routes(self) -> list[Route]:
        job = f"{self.collection}/{{job:[^/:]+}}"
        return [
            ("POST", self.create_path, self._create),
            ("GET", self.collection, self._list),
            ("GET", job, self._get),
            ("POST", f"{job}:cancel", self._cancel),
            ("DELETE", job, self._delete),
        ]

    @abstractmethod
    async def _create(self, request: web.Request) -> web.Response:
        """Read and check a create request, then :meth:`_create_job`."""

    @abstractmethod
    def _new_name(self, request: web.Request, number: int) -> str:
        """The name of the job a create request makes, the ``number``-th of both services."""

    @abstractmethod
    def _name(self, request: web.Request) -> str:
        """The name of the job a get, cancel or delete request is about."""

    @abstractmethod
    def _job_json(self, job: Job) -> dict[str, Any]:
        """The job as the service shows it (the create, get and list replies)."""

    @abstractmethod
    def _deleted(self, job: Job) -> dict[str, Any]:
        """The reply to deleting the job."""

    @abstractmethod
    def _output_line(
        self, job: Job, line: dict[str, Any], answer: dict[str, Any] | ApiError
    ) -> dict[str, Any]:
        """The output line for an input line, given the model's answer or the error instead."""

    @abstractmethod
    def _store_output(self, job: Job, data: bytes) -> str | None:
        """Store the output lines (JSONL) where the service puts them; return where that is."""

    async def _create_job(
        self,
        request: web.Request,
        *,
        display_name: str,
        model: str,
        lines: list[dict[str, Any]],
        source: dict[str, Any],
        destination: str | None = None,
        inline: bool = False,
    ) -> web.Response:
        """Make the job, unless the client leaves during the create delay, and reply."""
        context = self._context
        context.log("create_received", display_name)
        await context.sleep(context.config.create_delay_s)
        if client_gone(request):
            context.log("create_abandoned", display_name)
            return web.Response(status=499)
        with context.lock:
            number = next(self._book.numbers)
            index = context.creates
            context.creates += 1
            states = context.config.end_states
            end_state: EndState = states[index] if index < len(states) else "SUCCEEDED"
            lost = index < context.config.lost_create_replies
        job = Job(
            number=number,
            name=self._new_name(request, number),
            display_name=display_name,
            model=model,
            version=request.match_info["version"],
            lines=lines,
            source=source,
            destination=destination,
            inline=inline,
            started=time.monotonic(),
            create_time=now_iso(),
            end_state=end_state,
            reply_lost=lost,
        )
        with context.lock:
            self._jobs[job.name] = job
        context.log("created", job.display_name, tuple(str(line.get("key")) for line in lines))
        await context.sleep(context.config.create_reply_delay_s)
        if job.reply_lost:
            context.log("create_reply_lost", job.display_name)
            raise ApiError(503, "The service is currently unavailable. (emulated lost reply)")
        return json_reply(self._job_json(job))

    def _find(self, request: web.Request) -> Job:
        name = self._name(request)
        return self._context.lookup(self._jobs, name, f"Batch job {name} not found.")

    async def _get(self, request: web.Request) -> web.Response:
        job = self._find(request)
        self._context.log("job_get", job.display_name)
        return json_reply(self._job_json(job))

    async def _list(self, request: web.Request) -> web.Response:
        """A page of jobs, newest first; the page token is the offset of the next page."""
        size = int(request.query.get("pageSize", "50"))
        start = int(request.query.get("pageToken", "0") or "0")
        with self._context.lock:
            jobs = sorted(self._jobs.values(), key=lambda job: -job.number)
        self._context.log("job_list", "")
        body: dict[str, Any] = {
            self.list_field: [self._job_json(job) for job in jobs[start : start + size]]
        }
        if start + size < len(jobs):
            body["nextPageToken"] = str(start + size)
        return json_reply(body)

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if self._state(job) in END_STATES:
            raise ApiError(400, f"Batch job {job.name} has already finished.")
        job.cancelled_at = time.monotonic()
        self._context.log("cancelled", job.display_name)
        return json_reply({})

    async def _delete(self, request: web.Request) -> web.Response:
        job = self._find(request)
        with self._context.lock:
            self._jobs.pop(job.name, None)
        self._context.log("deleted", job.name)
        return json_reply(self._deleted(job))

    def _state(self, job: Job) -> str:
        """The job's state now; reaching the end writes its output once."""
        config = self._context.config
        now = time.monotonic()
        if job.final_state is None:
            if job.cancelled_at is not None:
                self._finish(job, "CANCELLED", self._progress(job, job.cancelled_at))
            elif now >= job.started + config.pending_s + config.running_s:
                fraction = 1.0 if job.end_state == "SUCCEEDED" else config.partial_fraction
                self._finish(job, job.end_state, fraction)
        if job.final_state is not None:
            return job.final_state
        return "PENDING" if now < job.started + config.pending_s else "RUNNING"

    def _progress(self, job: Job, at: float) -> float:
        config = self._context.config
        running = at - job.started - config.pending_s
        if running <= 0:
            return 0.0
        return min(1.0, running / config.running_s) if config.running_s else 1.0

    def _status(self, job: Job) -> JobStatus:
        state = self._state(job)
        if state not in END_STATES:
            done = int(len(job.lines) * self._progress(job, time.monotonic()))
            return JobStatus(state, done, 0, len(job.lines) - done)
        failed = sum(1 for line in job.output if "error" in line or line.get("status"))
        return JobStatus(state, len(job.output) - failed, failed, len(job.lines) - len(job.output))

    def _finish(self, job: Job, state: EndState, fraction: float) -> None:
        answered = job.lines[: int(len(job.lines) * fraction)]
        output = [self._answer_line(job, line) for line in answered]
        if self._context.config.shuffle_output:
            self._context.rng.shuffle(output)
        job.output = output
        job.final_state = state
        job.end_time = now_iso()
        if state == "FAILED":
            job.error = "The batch job failed. (emulated)"
        elif state == "EXPIRED":
            job.error = "The batch job did not finish in time and expired. (emulated)"
        if output:
            data = "".join(json.dumps(line) + "\n" for line in output).encode()
            job.output_location = self._store_output(job, data)
        self._context.log("finished", job.display_name)

    def _answer_line(self, job: Job, line: dict[str, Any]) -> dict[str, Any]:
        key = str(line.get("key"))
        context = self._context
        with context.lock:
            failed_keys = self._book.failed_keys
            fail = key not in failed_keys and context.rng.random() < context.config.line_error_rate
            if fail:
                failed_keys.add(key)
        answer: dict[str, Any] | ApiError
        if fail:
            answer = ApiError(500, "An internal error has occurred. (emulated line failure)")
        else:
            try:
                answer = self._answer(job, line.get("request"))
            except ApiError as error:
                answer = error
        return self._output_line(job, line, answer)

    def _answer(self, job: Job, request: Any) -> dict[str, Any]:
        """The toy model's answer to one line's request, as generateContent would give it."""
        req, prompt, prefill = parse_contents(json.dumps(request).encode())
        call = build_call(req, prompt, prefill, job.model.rsplit("/", 1)[-1], job.version)
        refuse_prefill(call)
        with_logprobs = not (call.model.nologprobs or self._context.config.without_logprobs)
        return answer_body(call, with_logprobs, self.vertex)
