"""Can this model be scored here, and how? A pre-flight of a few tiny requests (``klstream
check``), and the judgement of a real run's first answer by the same functions.

**What one answer shows** (:class:`Capabilities`, from :func:`answer_capabilities` or
:func:`scores_capabilities`): whether the top-k asked for came back (usable entries at every
step, those left out as unusable — a sentinel, NaN, ±inf, a positive value, null — and whether
a shorter list is the whole distribution), whether every entry carries its token id, the model
the service says answered (substituted when it neither is nor extends the name asked for), the
thinking budget sent and the prompt-logprobs dialect. ``score``, ``run`` and ``sample`` judge
their first answer with these functions; a scoring run records the outcome in ``run.json``
under ``"capabilities"``.

**What the check sends** (:func:`check_async`), every request a probe with the short budget of
a run's first requests:

1. *The first answer*: the prompt alone, one token, the top-k asked for, token ids asked for
   (vLLM names tokens by id only when asked), thinking as asked (``auto`` searches as a run
   does, :mod:`klstream.backends.thinking`). It says whether logprobs come back at all (or the
   service's refusal), and gives the :class:`Capabilities` above.
2. *Prefill continues*: the prompt alone again, two tokens greedily (t1, t2), then the prompt
   with t1's text as the model's own turn, one token. The prefill **continues** the turn when
   the top-k after it equals the model's own second step (:func:`~klstream.backends.checks.
   deviation` within :data:`~klstream.backends.checks.JITTER_NATS`), which it does only when
   the service conditions on the prefill as the start of its own answer — not when it drops the
   prefill (the top-k then equals the first step's: *ignored*), nor when it starts a new turn
   after it or re-tokenizes it otherwise (*new turn*). This is exactly what scoring relies on:
   Model 2's distribution after Model 1's tokens, as if it had written them.
3. *Prompt logprobs*, where the backend has them: the chat template of the prompt and a short
   response as token ids, one prompt-logprobs request in the server's dialect (``auto`` finds it
   as a run does), judged as above at every response token.
4. *Batch*, when asked: a canary job of a few lines (the requests above) through the backend's
   batch jobs — upload, create, poll with back-off until it ends or ``batch_timeout_s`` passes
   (then it is cancelled) — whose lines must come back with logprobs; its files are removed.
   A batch run starts with the same kind of canary (:mod:`klstream.scoring.batch`), judged by
   :func:`canary_failure`.
5. *The price*: the entry a run would use, its date, and why it may not hold (old, retired).

The outcome (:class:`CheckReport`) says which methods work here, with the options that select
them, or why none does. Nothing is written anywhere; no key is printed.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any, Literal, TypeVar

from klstream.backends import (
    BACKENDS,
    PREFILL,
    PROMPT_LOGPROBS,
    batch_jobs,
    checks,
    open_prefill,
    open_prompt_scoring,
)
from klstream.backends.base import (
    AUTO_THINKING,
    Answer,
    BatchJobs,
    BatchLine,
    Candidate,
    ClientSettings,
    Endpoint,
    Prefill,
    PrefillRequest,
    PromptScores,
    RemoteJob,
    ThinkingBudget,
)
from klstream.backends.prices import entry_warnings, load_prices, price_for, unpriced
from klstream.backends.thinking import ThinkingChoice, sent_budget, thinking_choice
from klstream.backends.transport import Caller, CallStats, Outcome, RetryPolicy
from klstream.errors import (
    BatchCanaryFailed,
    BatchCreateUnknown,
    EndpointError,
    KlstreamError,
    LogprobsUnavailable,
    PrefillRejected,
    ThinkingNotDisabled,
    ThinkingRejected,
    TopLogprobsShort,
    UnusableAnswer,
)
from klstream.loop import run_blocking

T = TypeVar("T")

CHECK_PROMPT = "Repeat after me: one two three four five six."
"""The check's prompt: its next tokens are near-certain for most models, so the first answers
show how a service lists a near-certain step (Gemini pads it with sentinels)."""
CHECK_RESPONSE = " one two three four five six"
"""The response whose prompt logprobs the check asks for."""
CANARY_LINES = 3
"""Lines of a canary batch job: enough to see logprobs come back, too few to cost anything."""
BATCH_TIMEOUT_S = 600.0
"""How long the check waits for its canary job before cancelling it."""

Status = Literal["ok", "warn", "fail", "skip"]
FINDINGS = (
    "logprobs",
    "k",
    "ids",
    "prefill",
    "thinking",
    "served",
    "prompt-logprobs",
    "batch",
    "price",
)
"""The row's columns, in order."""


# --- what one answer shows --------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a model's answer shows about scoring it: the check's first answer, or a run's."""

    method: str
    model: str
    """The model asked for."""
    top_logprobs: int
    """The k asked for."""
    usable: int
    """The fewest usable entries at any step, up to k."""
    dropped: int
    """Entries left out as unusable, over every step."""
    problem: str | None
    """Why the lists are not the top-k asked for (fewer entries than k that are not the whole
    distribution, a token twice), or None."""
    token_ids: bool
    """Every entry carries its token id (else tokens are matched by text)."""
    served_model: str | None
    thinking_budget: ThinkingBudget = None
    """The thinking budget the requests send (None: no thinking config)."""
    dialect: str | None = None
    """The prompt-logprobs dialect the server was asked in."""

    @property
    def substituted(self) -> bool:
        """The service says another model answered."""
        return checks.served_elsewhere(self.served_model, self.model)

    def recorded(self) -> dict[str, Any]:
        """As ``run.json`` keeps it."""
        return {**asdict(self), "served_as_asked": not self.substituted}

    def warnings(self) -> list[str]:
        """What a run should say about its first answer."""
        if not self.substituted:
            return []
        return [
            f"the service says {self.served_model} answered, not {self.model}: the results are "
            "that model's (the scores' served_model column records it)"
        ]


def _lists_capabilities(
    lists: Sequence[tuple[list[Candidate], int]],
    method: str,
    model: str,
    top_logprobs: int,
    served_model: str | None,
) -> Capabilities:
    """The capabilities shown by ``lists`` of (top-k, entries dropped) steps."""
    kept = [sorted(top, key=lambda c: -c.logprob)[:top_logprobs] for top, _ in lists]
    problems = (checks.list_problem(top, top_logprobs) for top in kept)
    return Capabilities(
        method=method,
        model=model,
        top_logprobs=top_logprobs,
        usable=min((len(top) for top in kept), default=0),
        dropped=sum(dropped for _, dropped in lists),
        problem=next((problem for problem in problems if problem is not None), None),
        token_ids=all(c.token_id is not None for top in kept for c in top),
        served_model=served_model,
    )


def answer_capabilities(
    answer: Answer, top_logprobs: int, model: str, thinking_budget: ThinkingBudget
) -> Capabilities:
    """What a generated answer (prefill) shows."""
    lists = [(step.top, step.dropped) for step in answer.steps]
    found = _lists_capabilities(lists, PREFILL, model, top_logprobs, answer.served_model)
    return replace(found, thinking_budget=thinking_budget)


def scores_capabilities(
    scores: PromptScores, top_logprobs: int, model: str, dialect: str | None
) -> Capabilities:
    """What a prompt-logprobs answer shows, over every prompt token and the one after."""
    lists = [(token.top, token.dropped) for token in scores.tokens]
    if scores.after is not None:
        lists.append((scores.after, scores.after_dropped))
    found = _lists_capabilities(lists, PROMPT_LOGPROBS, model, top_logprobs, scores.served_model)
    # The list after the prompt comes from the generated token, which some dialects name by
    # text alone; the prompt's tokens are what ids are matched on.
    ids = all(c.token_id is not None for token in scores.tokens for c in token.top)
    return replace(found, token_ids=ids, dialect=dialect)


def topk_error(capabilities: Capabilities) -> TopLogprobsShort | None:
    """Why no answer like this one could be stored as a result, or None."""
    if capabilities.problem is None:
        return None
    return TopLogprobsShort(
        f"{capabilities.model} does not give the top-k asked for: {capabilities.problem}",
        capabilities.usable,
    )


# --- batch lines ------------------------------------------------------------------------------


def line_outcome(decoded: BatchLine, request: PrefillRequest, latency_ms: float) -> Outcome:
    """A batch line's outcome: its answer when it is what ``request`` asked for (the top-k, the
    steps), else why not — judged as an online answer is."""
    if decoded.answer is None:
        return Outcome(None, decoded.error, 1, latency_ms)
    try:
        return Outcome(checks.as_asked(request, decoded.answer), None, 1, latency_ms)
    except UnusableAnswer as unusable:
        return Outcome(None, str(unusable), 1, latency_ms)


def canary_failure(
    job: str, lines: int, answered: bool, first_error: str | None, model: str
) -> BatchCanaryFailed | None:
    """Why a canary job shows that the service's batch jobs cannot score ``model`` — none of
    its ``lines`` came back with logprobs (``answered`` is false) — or None."""
    if answered:
        return None
    return BatchCanaryFailed(
        f"the canary batch job {job} brought none of its {lines} lines back with logprobs "
        f"(the first said: {first_error or 'nothing: the job has no output'}), so the service's "
        f"batch jobs cannot score {model}"
    )


# --- the check --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOptions:
    """What to check, and how long the canary batch job may take."""

    model2: str
    top_logprobs: int = 20
    thinking_budget: ThinkingBudget = AUTO_THINKING
    batch: bool = False
    """Also run a canary batch job (minutes to hours on a real service)."""
    batch_timeout_s: float = BATCH_TIMEOUT_S
    bucket_name: str | None = None
    """Vertex AI: the Cloud Storage bucket of the canary's files (default
    ``<project>-klstream-batch``)."""
    poll_initial_s: float = 1.0
    poll_max_s: float = 30.0
    temperature: float = 1.0
    """The sampling temperature of the first answer and the canary's lines, as a run's."""
    policy: RetryPolicy = RetryPolicy()


@dataclass(frozen=True)
class Finding:
    """One column of the row: its short value, and what it means in a line."""

    name: str
    value: str
    status: Status
    detail: str


@dataclass(frozen=True)
class CheckReport:
    """Whether, and how, a model can be scored at an endpoint."""

    backend: str
    model2: str
    url: str
    findings: tuple[Finding, ...]
    methods: dict[str, dict[str, Any]]
    """The ways of scoring that work here (``prefill``, ``prompt-logprobs``, ``batch``), each
    with the options (:class:`~klstream.scoring.options.ScoreOptions` names) that select it."""
    causes: dict[str, KlstreamError]
    """Why each way the backend offers does not work here."""
    capabilities: Capabilities | None
    """What the first answer showed, as a run records it."""

    @property
    def scorable(self) -> bool:
        return bool(self.methods)

    def finding(self, name: str) -> Finding:
        return next(found for found in self.findings if found.name == name)

    def row(self) -> str:
        """One line: the backend and model, every finding's value, the verdict."""
        cells = [f"{self.backend} {self.model2}"]
        cells += [f"{found.name} {found.value}" for found in self.findings]
        verdict = f"scorable: {', '.join(self.methods)}" if self.methods else "not scorable"
        return " | ".join([*cells, verdict])

    def details(self) -> list[str]:
        """Every finding in one line, with its status where it is not fine."""
        marks = {"ok": "", "warn": "warning: ", "fail": "fails: ", "skip": ""}
        return [f"{f.name}: {marks[f.status]}{f.detail}" for f in self.findings]


class _Check:
    """One run of the check: its requests, and the findings they make."""

    def __init__(self, endpoint: Endpoint, options: CheckOptions) -> None:
        self.endpoint, self.options = endpoint, options
        self.spec = BACKENDS[endpoint.backend]
        self.caller = Caller(endpoint, options.policy, 1, CallStats())
        self.found: dict[str, Finding] = {}
        self.methods: dict[str, dict[str, Any]] = {}
        self.causes: dict[str, KlstreamError] = {}
        self.capabilities: Capabilities | None = None
        self.budget: int | None = None
        """The thinking budget the online requests settled on, for the canary's lines."""
        self.canary: list[PrefillRequest] = []
        """The online requests that worked, which the canary job sends again."""

    def line(self, prefill: str) -> PrefillRequest:
        """A canary line: the check's prompt after ``prefill``, one token, sampled as a run's
        lines are."""
        options = self.options
        return PrefillRequest(CHECK_PROMPT, prefill, options.top_logprobs, 1, options.temperature)

    def put(self, name: str, value: str, status: Status, detail: str) -> None:
        self.found[name] = Finding(name, value, status, detail)

    def cannot(self, method: str, error: KlstreamError) -> None:
        self.causes.setdefault(method, error)

    async def ask(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """One request as a probe: a few attempts within the probe budget; a run-ending error
        propagates, a failure that persists becomes one."""
        deadline = time.monotonic() + self.options.policy.probe_budget_s
        done = await self.caller.retried(call, deadline)
        if done.value is None:
            raise EndpointError(
                f"{what} to {self.endpoint.url} failed ({done.attempts} attempts): {done.error}"
            )
        return done.value

    def report(self) -> CheckReport:
        absent = {name: Finding(name, "-", "skip", "not checked") for name in FINDINGS}
        findings = tuple(self.found.get(name, absent[name]) for name in FINDINGS)
        return CheckReport(
            self.endpoint.backend,
            self.options.model2,
            self.endpoint.url,
            findings,
            self.methods,
            self.causes,
            self.capabilities,
        )

    # --- prefill ------------------------------------------------------------------------------

    async def prefill(self) -> None:
        options = self.options
        if not self.spec.thinking:
            backend = self.endpoint.backend
            self.put("thinking", "n/a", "skip", f"{backend} requests send no thinking budget")
        settings = ClientSettings.of(options.model2, 1, options.thinking_budget)
        first: Answer | None = None
        try:
            async with open_prefill(self.endpoint, settings) as model:
                request = PrefillRequest(
                    CHECK_PROMPT, "", options.top_logprobs, 1, options.temperature, token_ids=True
                )
                first = await self.ask(lambda: model.generate(request), "the first request")
                self.first_answer(model, first, settings)
                await self.continuation(model)
        except KlstreamError as error:
            self.cannot(PREFILL, error)
            if first is None:
                self.first_failed(error)
            elif isinstance(error, PrefillRejected):
                self.put("prefill", "refused", "fail", str(error))
            elif "prefill" not in self.found:
                self.put("prefill", "?", "fail", f"not tested: {error}")
            return
        if PREFILL not in self.causes:
            self.methods[PREFILL] = {"method": PREFILL, **self.thinking_option()}

    def thinking_option(self) -> dict[str, Any]:
        """The thinking budget a run must be given: none when ``auto`` (the default) finds
        it."""
        budget = self.options.thinking_budget
        return {} if budget == AUTO_THINKING else {"thinking_budget": budget}

    def first_failed(self, error: KlstreamError) -> None:
        """No first answer: whose fault, and what stays unknown."""
        for name in ("k", "ids", "prefill", "thinking", "served"):
            self.found.setdefault(name, Finding(name, "-", "skip", "unknown: no answer came"))
        if isinstance(error, LogprobsUnavailable):
            self.put("logprobs", "no", "fail", str(error))
        else:
            self.put("logprobs", "?", "skip", f"unknown: the first request failed: {error}")
        if isinstance(error, ThinkingRejected | ThinkingNotDisabled):
            self.put("thinking", "refused", "fail", str(error))
        if isinstance(error, PrefillRejected):
            self.put("prefill", "refused", "fail", str(error))

    def first_answer(self, model: Prefill, answer: Answer, settings: ClientSettings) -> None:
        """The first answer's findings: logprobs, k, ids, thinking, served model."""
        options = self.options
        self.budget = sent_budget(model, settings)
        found = answer_capabilities(answer, options.top_logprobs, options.model2, self.budget)
        self.capabilities = found
        self.canary.append(self.line(""))
        self.put("logprobs", "yes", "ok", "returned with the first answer (the prompt alone)")
        self.put_topk(found, "in the first answer")
        self.put_ids(found)
        if self.spec.thinking:
            self.put_thinking(thinking_choice(model))
        if found.served_model is None:
            self.put("served", "?", "warn", "the answer does not say which model answered")
        elif found.substituted:
            self.put("served", found.served_model, "warn", found.warnings()[0])
        else:
            self.put("served", found.served_model, "ok", f"{found.served_model}, as asked")

    def put_thinking(self, choice: ThinkingChoice | None) -> None:
        """The budget the requests send: what ``auto`` found and why, or the one given."""
        if choice is None:
            value = "no config" if self.budget is None else str(self.budget)
            self.put("thinking", value, "ok", f"{value}, as given")
            return
        refused = "; ".join(
            f"refused {r.budget}: {r.reply}" for r in choice.refused if r.budget is not None
        )
        value = {0: "off", None: "no config"}.get(choice.budget, str(choice.budget))
        self.put("thinking", value, "ok", choice.reason + (f" ({refused})" if refused else ""))

    def put_topk(self, found: Capabilities, where: str) -> None:
        asked = found.top_logprobs
        dropped = (
            f"; {found.dropped} entries left out as unusable (sentinels, NaN, ±inf, positive, null)"
            if found.dropped
            else ""
        )
        error = topk_error(found)
        if error is not None:
            self.cannot(found.method, error)
            self.put("k", f"{found.usable}/{asked}", "fail", f"{error}{dropped}")
            return
        whole = " (a shorter list holds the whole distribution)" if found.usable < asked else ""
        detail = f"asked {asked}, got {found.usable} usable {where}{whole}{dropped}"
        self.put("k", f"{found.usable}/{asked}", "ok", detail)

    def put_ids(self, found: Capabilities) -> None:
        if found.token_ids:
            self.put("ids", "yes", "ok", "every entry carries its token id: matched by id")
        else:
            self.put(
                "ids", "texts", "warn", "entries carry texts only: Model 2's tokens are matched "
                "to Model 1's by text, and two ids with one text collapse into one entry"
            )  # fmt: skip

    async def continuation(self, model: Prefill) -> None:
        """Whether a prefill continues the model's own turn (see the module doc, 2)."""
        k, model2 = self.options.top_logprobs, self.options.model2
        two_request = PrefillRequest(CHECK_PROMPT, "", k, 2, 0.0)
        two = await self.ask(lambda: model.generate(two_request), "the two-token request")
        t1 = two.steps[0].chosen.token
        if not t1:
            self.put("prefill", "untested", "warn", "the model ended its answer at once")
            return
        after_request = PrefillRequest(CHECK_PROMPT, t1, k, 1, 0.0)
        after = await self.ask(lambda: model.generate(after_request), "the prefilled request")
        self.canary.append(self.line(t1))
        if len(two.steps) > 1 and two.steps[1].chosen.token:
            self.canary.append(self.line(t1 + two.steps[1].chosen.token))
        top = checks.trimmed(after.steps[0], k).top
        changed = checks.deviation(top, checks.trimmed(two.steps[0], k).top)
        if changed <= checks.JITTER_NATS:
            self.cannot(PREFILL, PrefillRejected(
                f"{model2} ignores a prefill: its top-k after its own first token {t1!r} as "
                "its turn equals its top-k without it, so Model 1's tokens would not be "
                "conditioned on"
            ))  # fmt: skip
            self.put("prefill", "ignored", "fail", str(self.causes[PREFILL]))
            return
        if len(two.steps) < 2:
            self.put("prefill", "accepted", "warn", "accepted; not compared: one step came back")
            return
        continued = checks.deviation(top, checks.trimmed(two.steps[1], k).top)
        if continued > checks.JITTER_NATS:
            self.cannot(PREFILL, PrefillRejected(
                f"{model2} does not continue its own turn after a prefill: its top-k after its "
                f"first token {t1!r} as its turn differs from its own second step (largest "
                f"deviation {continued:.3g} nats, over {checks.JITTER_NATS:g}): the service "
                "starts a new turn after the prefill, or re-tokenizes it"
            ))  # fmt: skip
            self.put("prefill", "new turn", "fail", str(self.causes[PREFILL]))
            return
        self.put(
            "prefill",
            "continues",
            "ok",
            f"after its own first token {t1!r} as its turn, the top-k equals its own second "
            f"step (largest deviation {continued:.2g} nats) and differs from its first",
        )

    # --- prompt logprobs ------------------------------------------------------------------

    async def prompt_logprobs(self) -> None:
        if PROMPT_LOGPROBS not in self.spec.methods:
            self.put(
                "prompt-logprobs", "n/a", "skip", f"the {self.endpoint.backend} backend has none "
                "(an OpenAI-compatible server such as vLLM has them)"
            )  # fmt: skip
            return
        options = self.options
        settings = ClientSettings(options.model2, 1)
        try:
            async with open_prompt_scoring(self.endpoint, settings) as server:
                template = await self.ask(
                    lambda: server.template_tokens(CHECK_PROMPT), "the chat template's /tokenize"
                )
                text = await self.ask(
                    lambda: server.text_tokens(CHECK_RESPONSE), "the response's /tokenize"
                )
                ids, start = template.tokens + text.tokens, len(template.tokens)
                scores = await self.ask(
                    lambda: server.prompt_logprobs(ids, options.top_logprobs, start),
                    "the prompt-logprobs request",
                )
                dialect = server.dialect
        except KlstreamError as error:
            self.cannot(PROMPT_LOGPROBS, error)
            self.put("prompt-logprobs", "no", "fail", str(error))
            return
        found = scores_capabilities(scores, options.top_logprobs, options.model2, dialect)
        short = topk_error(found)
        if short is not None:
            self.cannot(PROMPT_LOGPROBS, short)
            self.put("prompt-logprobs", "no", "fail", str(short))
            return
        if self.capabilities is None:
            self.capabilities = found
            self.put_topk(found, f"at each of {len(scores.tokens)} prompt tokens")
            self.put_ids(found)
        ids_note = "" if found.token_ids else "; texts only, matched by text"
        self.put(
            "prompt-logprobs",
            dialect or "yes",
            "ok",
            f"{dialect + ' dialect: ' if dialect else ''}top-k {found.usable}/"
            f"{found.top_logprobs} at each of {len(scores.tokens)} response tokens{ids_note}",
        )
        chosen = {"method": PROMPT_LOGPROBS}
        self.methods[PROMPT_LOGPROBS] = {**chosen, **({"dialect": dialect} if dialect else {})}

    # --- batch ----------------------------------------------------------------------------

    async def batch(self) -> None:
        backend = self.endpoint.backend
        if not self.spec.batch:
            self.put("batch", "n/a", "skip", f"the {backend} backend runs no batch jobs")
            return
        if not self.options.batch:
            self.put("batch", "untried", "skip", "not asked for (a canary job takes a while)")
            return
        if PREFILL not in self.methods:
            self.put("batch", "-", "skip", "not tried: batch lines ask what the online requests "
                     "asked, and those failed")  # fmt: skip
            return
        options = self.options
        settings = ClientSettings(options.model2, 1, self.budget)
        started = time.monotonic()
        try:
            jobs = batch_jobs(self.endpoint, settings, options.bucket_name)
            outcomes, name = await self.canary_job(jobs)
        except KlstreamError as error:
            self.cannot("batch", error)
            self.put("batch", "no", "fail", str(error))
            return
        answered = [o for o in outcomes if o.value is not None]
        first_error = next((o.error for o in outcomes if o.error), None)
        failure = canary_failure(name, len(outcomes), bool(answered), first_error, options.model2)
        if failure is not None:
            self.cannot("batch", failure)
            self.put("batch", "no", "fail", str(failure))
            return
        self.put(
            "batch",
            f"{len(answered)}/{len(outcomes)}",
            "ok" if len(answered) == len(outcomes) else "warn",
            f"the canary job {name} brought {len(answered)} of its {len(outcomes)} lines back "
            f"with logprobs in {time.monotonic() - started:.0f} s"
            + (f" (the others said: {first_error})" if first_error else "")
            + "; its files are removed",
        )
        self.methods["batch"] = {"batch": True, **self.thinking_option()}

    async def canary_job(self, jobs: BatchJobs) -> tuple[list[Outcome], str]:
        """Run the canary job to its end (or cancel it at the time-out), and judge its lines;
        whatever was uploaded or written is removed."""
        display_name = f"klstream-check-{secrets.token_hex(4)}"
        remote_input, remote_output = jobs.remote_names(display_name, display_name)
        keys = {f"check#{index}": index for index in range(len(self.canary))}
        job: RemoteJob | None = None
        with tempfile.TemporaryDirectory(prefix="klstream-check-") as scratch:
            local, output = Path(scratch) / "input.jsonl", Path(scratch) / "output.jsonl"
            local.write_bytes(
                b"".join(jobs.encode_line(key, i, self.canary[i]) for key, i in keys.items())
            )
            try:
                await jobs.prepare()
                await jobs.upload(local, remote_input, display_name)
                job = await self.create(jobs, display_name, remote_input, remote_output)
                job = await self.wait(jobs, job)
                latency = job.run_ms
                has_output = await jobs.download(job, remote_output, output)
                outcomes: list[Outcome] = [
                    Outcome(None, f"the job ended {job.state} without this line", 1, latency)
                ] * len(keys)
                for raw in output.read_bytes().splitlines() if has_output else []:
                    if not raw.strip():
                        continue
                    decoded = jobs.decode_line(raw)
                    index = keys.get(decoded.key or "", decoded.index)
                    if index is not None and 0 <= index < len(outcomes):
                        request = self.canary[index]
                        outcomes[index] = line_outcome(decoded, request, latency)
            finally:
                await jobs.remove(remote_input, job, remote_output)
        return outcomes, job.name

    async def create(
        self, jobs: BatchJobs, display_name: str, remote_input: str, remote_output: str | None
    ) -> RemoteJob:
        """The job, made once: a create whose outcome is unknown is looked up by its name."""
        try:
            return await jobs.create(display_name, remote_input, remote_output)
        except BatchCreateUnknown as unknown:
            found = await jobs.find(display_name)
            if found is None:
                raise EndpointError(f"the canary job could not be created: {unknown}") from None
            return found

    async def wait(self, jobs: BatchJobs, job: RemoteJob) -> RemoteJob:
        """Poll with back-off until the job ends; past the time-out, cancel it and say so."""
        options = self.options
        deadline = time.monotonic() + options.batch_timeout_s
        interval = options.poll_initial_s
        while not job.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                await jobs.cancel(job.name)
                raise EndpointError(
                    f"the canary job {job.name} was still {job.state} after "
                    f"{options.batch_timeout_s:g} s and was cancelled: the service's queue is "
                    "slow now, so a batch run would wait too"
                )
            await asyncio.sleep(min(interval, left))
            interval = min(interval * 1.5, options.poll_max_s)
            current = await jobs.get(job.name)
            if current is None:
                raise EndpointError(f"the service no longer knows the canary job {job.name}")
            job = current
        return job

    # --- price ----------------------------------------------------------------------------

    def price(self) -> None:
        model2 = self.options.model2
        entry = price_for(model2, load_prices())
        if entry is None:
            self.put("price", "unknown", "warn", unpriced(model2))
            return
        warnings = entry_warnings(entry, date.today())
        value = f"retired {entry.retired}" if entry.retired else entry.date
        detail = f"{entry.model}'s prices of {entry.date} ({entry.source})"
        self.put("price", value, "warn" if warnings else "ok", "; ".join([detail, *warnings]))


async def check_async(endpoint: Endpoint, options: CheckOptions) -> CheckReport:
    """Whether ``options.model2`` can be scored at ``endpoint``, and how (see the module doc)."""
    checking = _Check(endpoint, options)
    await checking.prefill()
    await checking.prompt_logprobs()
    await checking.batch()
    checking.price()
    return checking.report()


def check(endpoint: Endpoint, options: CheckOptions) -> CheckReport:
    """:func:`check_async`, blocking."""
    return run_blocking(check_async(endpoint, options))
