"""Every exception klstream raises on purpose, and the exit status each one maps to.

Messages describe the problem and its cause in terms of the library (no command-line flags):
the CLI adds the flag that fixes it (:data:`klstream.cli.HINTS`). A notebook user catches
:class:`KlstreamError` for all of them, or a subclass for one kind of failure.

Exit statuses (documented in README.md): 1 any other failure, 2 usage (click's own), 3 bad
input, 4 run directory conflict, 5 Model 2 endpoint or model unusable, 6 run incomplete, 7 an
output cannot be written.
"""

from __future__ import annotations


class KlstreamError(Exception):
    """A user-facing failure: the message says what is wrong and why."""

    exit_code = 1


class InputError(KlstreamError):
    """Malformed input, naming the file and the JSON path of the offending field."""

    exit_code = 3

    def __init__(self, source: str, json_path: str, reason: str) -> None:
        self.source = source
        self.json_path = json_path
        self.reason = reason
        super().__init__(f"{source}: {json_path}: {reason}")


class InputSelectionError(KlstreamError):
    """The input directory, file pattern or file names cannot be used."""

    exit_code = 3


class PriceTableError(KlstreamError):
    """A price table (the shipped one or a user's) cannot be read or has a malformed entry."""

    exit_code = 3


class RunDirError(KlstreamError):
    """The run directory is missing, not a run, or cannot be written."""

    exit_code = 4


class NotExploded(RunDirError):
    """A stage that reads positions was pointed at a directory without them."""

    def __init__(self, run_dir: object) -> None:
        self.run_dir = run_dir
        super().__init__(f"{run_dir} is not an exploded run directory (no positions.parquet)")


class PositionsExist(RunDirError):
    """Explode would replace positions that a run already has."""


class RunExists(RunDirError):
    """A whole-pipeline run found an earlier run in its workspace and was not told what to do."""


class ResultsExist(RunDirError):
    """Scoring would mix with, or silently replace, results already saved for a Model 2."""

    def __init__(self, message: str, model2: str) -> None:
        self.model2 = model2
        super().__init__(message)


class RunConfigMismatch(RunDirError):
    """A resumed run's result-changing parameters differ from the ones recorded."""

    def __init__(self, config_path: object, differences: list[str]) -> None:
        self.config_path = config_path
        self.differences = differences
        super().__init__(
            f"this run's configuration differs from the one recorded in {config_path} "
            f"({'; '.join(differences)})"
        )


class RunLocked(RunDirError):
    """Another process is writing the same run directory (and Model 2): one writer at a time."""

    def __init__(self, message: str, holder: str | None) -> None:
        self.holder = holder
        super().__init__(message)


class InputsChanged(RunDirError):
    """The input files differ from those the run's positions were built from."""

    def __init__(
        self, run_dir: object, added: list[str], removed: list[str], changed: list[str]
    ) -> None:
        self.run_dir, self.added, self.removed, self.changed = run_dir, added, removed, changed
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (("added", added), ("removed", removed), ("changed", changed))
            if names
        ]
        super().__init__(
            f"the input files differ from those {run_dir}'s positions were built from "
            f"({'; '.join(parts)})"
        )


class RunDamaged(RunDirError):
    """A file the run's positions come from is damaged: nothing built from it can be trusted."""

    def __init__(
        self, path: object, problem: str, run_dir: object, input_dir: object | None = None
    ) -> None:
        self.path, self.run_dir = path, run_dir
        self.input_dir = input_dir
        """Where the positions were exploded from, when the run's record of its inputs says."""
        super().__init__(f"{path} is damaged ({problem})")


class RunConfigUnknown(RunDirError):
    """The run's recorded configuration is lost (no readable run.json) and its results do not
    say which configuration made them, so a resumed run could mix configurations."""


class NoResults(RunDirError):
    """A stage that needs Model 2 results found none."""


class AmbiguousModel2(RunDirError):
    """The run holds results for several Model 2s and none was chosen."""


class EndpointError(KlstreamError):
    """Model 2's endpoint cannot be used: unreachable, no credentials, or refusing every call."""

    exit_code = 5


class BackendUnavailable(EndpointError):
    """No backend of that name is registered, or the optional package it needs is missing."""


class EndpointUnreachable(EndpointError):
    """No connection to the endpoint at all (refused, unknown host, TLS failure): retrying the
    same address will not help."""


class MissingCredentials(EndpointError):
    """No API key or project where the backend needs one."""


class MissingServerUrl(MissingCredentials):
    """An OpenAI-compatible backend was chosen without the server's address."""


class MethodUnsupported(EndpointError):
    """The scoring method needs what this backend or server does not offer."""


class AuthenticationError(EndpointError):
    """The service rejected the credentials (401/403)."""


class ModelNotFound(EndpointError):
    """The service does not know the model or the endpoint path (404)."""


class ModelCannotScore(EndpointError):
    """The model, as configured, can never give what scoring needs (logprobs after a prefill)."""


class LogprobsUnavailable(ModelCannotScore):
    """The service does not return logprobs for this model at all (Google has switched them off
    for most Gemini models): no request can be scored, whatever its settings."""

    def __init__(self, message: str, backend: str, model: str) -> None:
        self.backend, self.model = backend, model
        super().__init__(message)


class PrefillRejected(ModelCannotScore):
    """The model refuses a conversation that ends with its own (prefilled) turn."""


class ThinkingRejected(ModelCannotScore):
    """The model refuses the thinking configuration that was sent: ``budget`` (None: the
    config was left out), in the service's words ``reply``. ``searched`` is true when every
    budget a search for one (``--thinking-budget auto``) could try was refused."""

    def __init__(
        self, message: str, budget: int | None, reply: str, searched: bool = False
    ) -> None:
        self.budget, self.reply, self.searched = budget, reply, searched
        super().__init__(message)


class ThinkingNotDisabled(ModelCannotScore):
    """The model spends its output on thinking and returns no logprobs. ``searched`` is true
    when the budget was the one a search found (``--thinking-budget auto``)."""

    def __init__(self, message: str, thinking_budget: int | None, searched: bool = False) -> None:
        self.thinking_budget, self.searched = thinking_budget, searched
        super().__init__(message)


class TopLogprobsShort(ModelCannotScore):
    """The service lists fewer usable logprobs than asked for (``usable`` of them), and they
    are not the whole distribution: no position could be stored as asked."""

    def __init__(self, message: str, usable: int) -> None:
        self.usable = usable
        super().__init__(message)


class BatchCanaryFailed(ModelCannotScore):
    """A batch run's canary job brought none of its lines back with logprobs: the service's
    batch jobs cannot score this model, so nothing more was submitted."""


class ModelSubstituted(EndpointError):
    """The service answered with another model than the one asked for, and the run requires the
    one asked for."""


class BatchRejected(EndpointError):
    """The service refused a batch request outright (400/403/404): nothing was created."""


class BatchUnavailable(BatchRejected):
    """Batch mode cannot be used here: the region does not offer it, or its client library is
    not installed."""


class BatchServiceError(EndpointError):
    """The batch service or its storage kept failing (5xx, time-outs) after retries; the jobs
    are where the manifests say, so a resumed run continues."""


class BatchCreateUnknown(KlstreamError):
    """A batch create ended without saying whether the job exists (a lost reply, a time-out):
    it is resolved by looking the job up by its display name, never by creating it again."""

    def __init__(self, message: str, replied: bool) -> None:
        self.replied = replied
        """Whether the service answered (a 5xx): then the create has run its course."""
        super().__init__(message)


class BatchJobsActive(RunDirError):
    """Batch jobs of this run are still queued or running, so its results cannot be discarded."""


class GreedyInconsistent(ModelCannotScore):
    """Greedy lookahead was asked for, but the service's logprobs change with the sampling
    temperature, so greedy steps would not be the distributions a one-token request gives."""


class CallFault(Exception):
    """One call to Model 2 failed in a way the transport (:mod:`klstream.backends.transport`)
    acts on. Backends raise these instead of their SDK's errors; the message is the text of
    the position's error column. They never reach the user as such: a fault that persists is
    recorded as the position's failure, or becomes an :class:`EndpointError`."""


TIMED_OUT = "timeout: no answer within the request timeout"
"""What the error column says of a request whose timeout passed without an answer."""


class TransientFault(CallFault):
    """Worth another attempt (408, 5xx, a time-out, a dropped connection, a malformed body),
    no sooner than ``retry_after`` seconds when the server says."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class Overloaded(TransientFault):
    """The server turned the request away for load (503 over capacity, 429 over quota): the
    adaptive concurrency counts these."""


class RateLimited(Overloaded):
    """429: over the quota."""


class UnusableAnswer(TransientFault):
    """A 200 answer that cannot be used as it is (no logprobs, a body that is not JSON, an
    empty top-k) but may be fine next time."""


class ConnectFailed(CallFault):
    """No connection could be made at all (refused, unknown host, TLS): retried twice, then
    the run stops (:class:`EndpointUnreachable`)."""


class RequestRejected(CallFault):
    """The service refused this one request (a 400 about its content): another attempt would
    get the same answer, so the position is recorded as failed."""


class RunIncomplete(KlstreamError):
    """Scoring stopped with positions left; a resumed run picks them up."""

    exit_code = 6

    def __init__(self, message: str, remaining: int) -> None:
        self.remaining = remaining
        super().__init__(message)


class QueryError(KlstreamError):
    """An ad-hoc query failed or cannot be written as asked."""


class OutputError(KlstreamError):
    """A file or directory cannot be written (permissions, a file in the way, a full disk)."""

    exit_code = 7


class ExportFailed(OutputError):
    """Scoring finished but its export could not be written; the scores are kept."""

    def __init__(self, message: str, run_dir: object, output_dir: object, model2: str) -> None:
        self.run_dir, self.output_dir, self.model2 = run_dir, output_dir, model2
        super().__init__(message)


def describe_os_error(error: OSError) -> str:
    """``path: cause`` for a file-system error, in one line (both paths of a failed rename)."""
    cause = error.strerror or str(error)
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause
