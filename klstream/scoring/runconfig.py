"""The run configuration (``scores/<model2>/run.json``): what a resumed run must share.

It records the parameters that change results (:data:`RESULT_PARAMETERS`), the klstream version
that wrote it (never compared, so a run survives an upgrade), the lookahead settings, the price
entry the run's costs are reckoned with, the greedy consistency probe's outcome (the probe
runs once per Model 2 and run directory), and what the run's first answer showed
(``capabilities``: :class:`~klstream.preflight.Capabilities`). Every part records the result
parameters too, so the configuration is checked against the data, not only against
``run.json``, and a lost ``run.json`` is rebuilt from the parts — or the run is refused when
they cannot tell.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klstream import __version__
from klstream.backends.base import AUTO_THINKING, Endpoint
from klstream.backends.prices import Price
from klstream.errors import ResultsExist, RunConfigMismatch, RunConfigUnknown
from klstream.scoring.options import DEFAULT_TEMPERATURE, ScoreOptions
from klstream.storage.atomic import write_text_atomic
from klstream.storage.health import scan_parts
from klstream.storage.replacement import Replacement, has_results, reconcile
from klstream.storage.rundir import RunDir

RESULTS_FORMAT = 1
"""Version of what a stored result means. It changes only when results written by one release
cannot be mixed with another's; a resumed run compares it, never the package version."""
RESULT_PARAMETERS = (
    "results_format",
    "model2",
    "top_logprobs",
    "backend",
    "thinking_budget",
    "temperature",
)
"""The recorded parameters that change results: a resumed run must share every one. The
lookahead and its decoding do not: a step is stored only when it is the distribution a one-token
request gives (greedy only where the consistency probe found the logprobs independent of the
sampling settings)."""


def recorded(options: ScoreOptions, endpoint: Endpoint, price: Price | None) -> dict[str, Any]:
    """``run.json`` for a run of ``options`` against ``endpoint``, before any probe. A thinking
    budget of ``auto`` becomes the budget found at the first answer (``thinking`` says how)."""
    return {
        "results_format": RESULTS_FORMAT,
        "model2": options.model2,
        "top_logprobs": options.top_logprobs,
        "backend": endpoint.backend,
        "thinking_budget": options.thinking_budget,
        "temperature": options.temperature,
        "written_by": __version__,
        "lookahead": options.lookahead,
        "decoding": options.decoding,
        "prices": price.recorded() if price else None,
        "greedy_probe": None,
        "thinking": None,
        "capabilities": None,
    }


def read_config(path: Path) -> dict[str, Any]:
    """A recorded configuration, with what runs before a parameter was recorded meant by it."""
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    # Runs written before these were recorded stored results of format 1, at the default
    # temperature.
    config.setdefault("results_format", 1)
    config.setdefault("temperature", DEFAULT_TEMPERATURE)
    return config


def _readable_config(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The recorded configuration, or None and why not (missing, or what is wrong with it)."""
    if not path.is_file():
        return None, "missing"
    try:
        config = read_config(path)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"unreadable ({error})"
    if not isinstance(config, dict):
        return None, "unreadable (not a JSON object)"
    return config, None


def result_parameters(config: dict[str, Any]) -> str:
    """The parameters that change results, as canonical JSON: what every part records
    (:data:`~klstream.storage.schemas.PART_CONFIG_KEY`) and what a resumed run must match."""
    return json.dumps({key: config.get(key) for key in RESULT_PARAMETERS}, sort_keys=True)


def save_config(run: RunDir, model2: str, config: dict[str, Any]) -> None:
    write_text_atomic(run.run_config(model2), json.dumps(config, indent=2) + "\n")


@dataclass(frozen=True)
class ConfigCheck:
    """What :func:`check_run_config` found and did."""

    config: dict[str, Any]
    """What ``run.json`` says now."""
    replacement: Replacement | None
    """An overwrite in progress: the old results are aside until the new run's first answer."""
    quarantined: list[Path]
    """Damaged parts moved to quarantine: their positions are pending again."""
    recovered_config: bool
    """``run.json`` was lost and rebuilt from what the parts record."""


def _differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{key}: recorded {recorded.get(key)!r}, now {wanted[key]!r}"
        for key in RESULT_PARAMETERS
        if recorded.get(key) != wanted[key]
    ]


def _carry_probes(earlier: dict[str, Any], wanted: dict[str, Any]) -> None:
    """What earlier runs of the same configuration found out: the greedy probe's outcome, and
    what their first answer showed (until this run's first answer says it again)."""
    for key in ("greedy_probe", "capabilities"):
        wanted[key] = earlier.get(key)


def check_run_config(
    run: RunDir,
    options: ScoreOptions,
    endpoint: Endpoint,
    price: Price | None,
    stale_outputs: Sequence[Path] = (),
) -> ConfigCheck:
    """Refuse to mix results of different configurations under one model2, checking the request
    against ``run.json`` and against the configuration every part records; rebuild a lost
    ``run.json`` from the parts when they agree, else refuse. Under ``overwrite`` the existing
    results are set aside (:mod:`klstream.storage.replacement`), not deleted. Return what
    ``run.json`` now says, with what an earlier run of the same configuration found out kept
    (:func:`_carry_probes`)."""
    model2 = options.model2
    reconcile(run, model2)
    scan = scan_parts(run, model2)
    path = run.run_config(model2)
    wanted = recorded(options, endpoint, price)
    earlier, unreadable = _readable_config(path)
    replacement = None
    results = has_results(run, model2)
    if results and options.overwrite:
        replacement = Replacement(run, model2, stale_outputs)
        replacement.set_aside()
        results, earlier = False, None
    elif results and not options.resume:
        raise ResultsExist(f"{run.scores_dir(model2)} already holds results for {model2!r}", model2)
    recovered_config = False
    made_with = set(scan.configs)
    if results and earlier is None:
        if scan.untagged or len(made_with) != 1:
            raise RunConfigUnknown(
                f"{path} is {unreadable}, and the results in {run.scores_dir(model2)} do not "
                "say which configuration made them, so more results could not be told apart "
                "from them"
            )
        earlier = json.loads(next(iter(made_with)))
        recovered_config = True
    if (
        earlier is not None
        and wanted["thinking_budget"] == AUTO_THINKING
        and (results or earlier.get("thinking"))
    ):
        # The budget the results were made with (or that auto found) is what auto sends now:
        # results never mix budgets, and the search is not paid twice.
        wanted["thinking_budget"] = earlier.get("thinking_budget", AUTO_THINKING)
        wanted["thinking"] = earlier.get("thinking")
    if results:
        assert earlier is not None
        differences = _differences(earlier, wanted)
        if differences:
            raise RunConfigMismatch(path, differences)
        for config in made_with:
            found = _differences(json.loads(config), wanted)
            if found:
                raise RunConfigMismatch(
                    run.scores_dir(model2), [f"the parts record another configuration ({found[0]})"]
                )
        _carry_probes(earlier, wanted)
    elif earlier is not None and not _differences(earlier, wanted):
        _carry_probes(earlier, wanted)
    run.scores_dir(model2).mkdir(parents=True, exist_ok=True)
    save_config(run, model2, wanted)
    return ConfigCheck(wanted, replacement, scan.quarantined, recovered_config)
