"""klstream: where, and by how much, two language models' next-token distributions disagree.

The public Python API, the same one the ``klstream`` command line calls::

    import klstream

    endpoint = klstream.endpoint_from_environment("gemini", base_url="http://127.0.0.1:8765")
    klstream.explode(Path("responses"), Path("runs/a"))
    report = klstream.score(Path("runs/a"), klstream.ScoreOptions("toy-d0.5"), endpoint)
    klstream.export(Path("runs/a"), Path("kl_results"))
    print(klstream.check(endpoint, klstream.CheckOptions("toy-d0.5")).row())  # can it be scored?
    with klstream.connect(Path("runs/a")) as con:
        con.sql("SELECT avg(kl_floor) FROM kl").show()

Inside a running event loop (Jupyter) ``await klstream.score_async(...)`` or
``await klstream.run_async(...)``; the blocking forms work there too (in a worker thread).
Names are imported on first use, so ``import klstream`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("klstream")
except PackageNotFoundError:
    __version__ = "0.0.0+source"

_EXPORTS: dict[str, str] = {
    "explode": "klstream.input.explode",
    "ExplodeReport": "klstream.input.explode",
    "sample": "klstream.input.sample",
    "sample_async": "klstream.input.sample",
    "SampleOptions": "klstream.input.sample",
    "SampleReport": "klstream.input.sample",
    "Endpoint": "klstream.backends.base",
    "endpoint_from_environment": "klstream.backends",
    "RetryPolicy": "klstream.backends.transport",
    "score": "klstream.pipeline",
    "score_async": "klstream.pipeline",
    "ScoreOptions": "klstream.scoring.options",
    "ScoreReport": "klstream.scoring.score",
    "ScoreStats": "klstream.scoring.session",
    "BatchOptions": "klstream.scoring.options",
    "batch_status": "klstream.scoring.batch",
    "batch_cancel": "klstream.scoring.batch",
    "dry_run": "klstream.scoring.dryrun",
    "dry_run_async": "klstream.scoring.dryrun",
    "DryRunOptions": "klstream.scoring.dryrun",
    "DryRunReport": "klstream.scoring.dryrun",
    "format_dry_run": "klstream.scoring.dryrun",
    "check": "klstream.preflight",
    "check_async": "klstream.preflight",
    "CheckOptions": "klstream.preflight",
    "CheckReport": "klstream.preflight",
    "Capabilities": "klstream.preflight",
    "Price": "klstream.backends.prices",
    "load_prices": "klstream.backends.prices",
    "compute_kl": "klstream.metrics.kl",
    "KlReport": "klstream.metrics.kl",
    "export": "klstream.output.export",
    "summary": "klstream.output.export",
    "format_summary": "klstream.output.export",
    "ExportReport": "klstream.output.export",
    "run_query": "klstream.output.query",
    "connect": "klstream.storage.database",
    "views_script": "klstream.storage.database",
    "RunDir": "klstream.storage.rundir",
    "run": "klstream.pipeline",
    "run_async": "klstream.pipeline",
    "RunOptions": "klstream.pipeline",
    "RunReport": "klstream.pipeline",
    "dry_run_inputs": "klstream.pipeline",
    "KlstreamError": "klstream.errors",
    "InputError": "klstream.errors",
    "InputSelectionError": "klstream.errors",
    "RunDirError": "klstream.errors",
    "NotExploded": "klstream.errors",
    "PositionsExist": "klstream.errors",
    "RunExists": "klstream.errors",
    "ResultsExist": "klstream.errors",
    "RunConfigMismatch": "klstream.errors",
    "RunLocked": "klstream.errors",
    "InputsChanged": "klstream.errors",
    "NoResults": "klstream.errors",
    "AmbiguousModel2": "klstream.errors",
    "EndpointError": "klstream.errors",
    "EndpointUnreachable": "klstream.errors",
    "BackendUnavailable": "klstream.errors",
    "MissingCredentials": "klstream.errors",
    "MissingServerUrl": "klstream.errors",
    "MethodUnsupported": "klstream.errors",
    "AuthenticationError": "klstream.errors",
    "ModelNotFound": "klstream.errors",
    "ModelCannotScore": "klstream.errors",
    "ModelSubstituted": "klstream.errors",
    "LogprobsUnavailable": "klstream.errors",
    "PrefillRejected": "klstream.errors",
    "ThinkingRejected": "klstream.errors",
    "ThinkingNotDisabled": "klstream.errors",
    "GreedyInconsistent": "klstream.errors",
    "TopLogprobsShort": "klstream.errors",
    "BatchCanaryFailed": "klstream.errors",
    "PriceTableError": "klstream.errors",
    "RunIncomplete": "klstream.errors",
    "QueryError": "klstream.errors",
    "BatchRejected": "klstream.errors",
    "BatchUnavailable": "klstream.errors",
    "BatchServiceError": "klstream.errors",
    "BatchJobsActive": "klstream.errors",
    "OutputError": "klstream.errors",
    "ExportFailed": "klstream.errors",
}

__all__ = [
    "__version__",
    "explode",
    "ExplodeReport",
    "sample",
    "sample_async",
    "SampleOptions",
    "SampleReport",
    "Endpoint",
    "endpoint_from_environment",
    "RetryPolicy",
    "score",
    "score_async",
    "ScoreOptions",
    "ScoreReport",
    "ScoreStats",
    "BatchOptions",
    "batch_status",
    "batch_cancel",
    "dry_run",
    "dry_run_async",
    "DryRunOptions",
    "DryRunReport",
    "format_dry_run",
    "check",
    "check_async",
    "CheckOptions",
    "CheckReport",
    "Capabilities",
    "Price",
    "load_prices",
    "compute_kl",
    "KlReport",
    "export",
    "summary",
    "format_summary",
    "ExportReport",
    "run_query",
    "connect",
    "views_script",
    "RunDir",
    "run",
    "run_async",
    "RunOptions",
    "RunReport",
    "dry_run_inputs",
    "KlstreamError",
    "InputError",
    "InputSelectionError",
    "RunDirError",
    "NotExploded",
    "PositionsExist",
    "RunExists",
    "ResultsExist",
    "RunConfigMismatch",
    "RunLocked",
    "InputsChanged",
    "NoResults",
    "AmbiguousModel2",
    "EndpointError",
    "EndpointUnreachable",
    "BackendUnavailable",
    "MissingCredentials",
    "MissingServerUrl",
    "MethodUnsupported",
    "AuthenticationError",
    "ModelNotFound",
    "ModelCannotScore",
    "ModelSubstituted",
    "LogprobsUnavailable",
    "PrefillRejected",
    "ThinkingRejected",
    "ThinkingNotDisabled",
    "GreedyInconsistent",
    "TopLogprobsShort",
    "BatchCanaryFailed",
    "PriceTableError",
    "RunIncomplete",
    "QueryError",
    "BatchRejected",
    "BatchUnavailable",
    "BatchServiceError",
    "BatchJobsActive",
    "OutputError",
    "ExportFailed",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'klstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from klstream.backends import endpoint_from_environment
    from klstream.backends.base import Endpoint
    from klstream.backends.prices import Price, load_prices
    from klstream.backends.transport import RetryPolicy
    from klstream.errors import (
        AmbiguousModel2,
        AuthenticationError,
        BackendUnavailable,
        BatchCanaryFailed,
        BatchJobsActive,
        BatchRejected,
        BatchServiceError,
        BatchUnavailable,
        EndpointError,
        EndpointUnreachable,
        ExportFailed,
        GreedyInconsistent,
        InputError,
        InputsChanged,
        InputSelectionError,
        KlstreamError,
        LogprobsUnavailable,
        MethodUnsupported,
        MissingCredentials,
        MissingServerUrl,
        ModelCannotScore,
        ModelNotFound,
        ModelSubstituted,
        NoResults,
        NotExploded,
        OutputError,
        PositionsExist,
        PrefillRejected,
        PriceTableError,
        QueryError,
        ResultsExist,
        RunConfigMismatch,
        RunDirError,
        RunExists,
        RunIncomplete,
        RunLocked,
        ThinkingNotDisabled,
        ThinkingRejected,
        TopLogprobsShort,
    )
    from klstream.input.explode import ExplodeReport, explode
    from klstream.input.sample import SampleOptions, SampleReport, sample, sample_async
    from klstream.metrics.kl import KlReport, compute_kl
    from klstream.output.export import ExportReport, export, format_summary, summary
    from klstream.output.query import run_query
    from klstream.pipeline import (
        RunOptions,
        RunReport,
        dry_run_inputs,
        run,
        run_async,
        score,
        score_async,
    )
    from klstream.preflight import (
        Capabilities,
        CheckOptions,
        CheckReport,
        check,
        check_async,
    )
    from klstream.scoring.batch import batch_cancel, batch_status
    from klstream.scoring.dryrun import (
        DryRunOptions,
        DryRunReport,
        dry_run,
        dry_run_async,
        format_dry_run,
    )
    from klstream.scoring.options import BatchOptions, ScoreOptions
    from klstream.scoring.score import ScoreReport
    from klstream.scoring.session import ScoreStats
    from klstream.storage.database import connect, views_script
    from klstream.storage.rundir import RunDir
