"""The run configuration (``scores/<model2>/run.json``): what a resumed run must share.

It records the parameters that change results (:data:`RESULT_PARAMETERS`), the klstream version
that wrote it (never compared, so a run survives an upgrade), the lookahead settings, the price
entry the run's costs are reckoned with, and the greedy consistency probe's outcome (the probe
runs once per Model 2 and run directory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from klstream import __version__
from klstream.backends.base import Endpoint
from klstream.backends.prices import Price
from klstream.errors import ResultsExist, RunConfigMismatch
from klstream.scoring.options import DEFAULT_TEMPERATURE, ScoreOptions
from klstream.storage.atomic import write_text_atomic
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
    """``run.json`` for a run of ``options`` against ``endpoint``, before any probe."""
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
    }


def read_config(path: Path) -> dict[str, Any]:
    """A recorded configuration, with what runs before a parameter was recorded meant by it."""
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    # Runs written before these were recorded stored results of format 1, at the default
    # temperature.
    config.setdefault("results_format", 1)
    config.setdefault("temperature", DEFAULT_TEMPERATURE)
    return config


def save_config(run: RunDir, model2: str, config: dict[str, Any]) -> None:
    write_text_atomic(run.run_config(model2), json.dumps(config, indent=2) + "\n")


def check_run_config(
    run: RunDir, options: ScoreOptions, endpoint: Endpoint, price: Price | None
) -> dict[str, Any]:
    """Refuse to mix results of different configurations under one model2; return what
    ``run.json`` now says, with the greedy probe's outcome of an earlier run of the same
    configuration kept."""
    scores_dir = run.scores_dir(options.model2)
    has_parts = run.has_scores(options.model2)
    config_path = run.run_config(options.model2)
    wanted = recorded(options, endpoint, price)
    if config_path.is_file() and not options.overwrite:
        earlier = read_config(config_path)
        if all(earlier.get(key) == wanted[key] for key in RESULT_PARAMETERS):
            wanted["greedy_probe"] = earlier.get("greedy_probe")
    if has_parts and options.overwrite:
        shutil.rmtree(scores_dir)
        run.kl_path(options.model2).unlink(missing_ok=True)
    elif has_parts and not options.resume:
        raise ResultsExist(
            f"{scores_dir} already holds results for {options.model2!r}", options.model2
        )
    elif has_parts and config_path.is_file():
        earlier = read_config(config_path)
        differences = [
            f"{key}: recorded {earlier.get(key)!r}, now {wanted[key]!r}"
            for key in RESULT_PARAMETERS
            if earlier.get(key) != wanted[key]
        ]
        if differences:
            raise RunConfigMismatch(config_path, differences)
    scores_dir.mkdir(parents=True, exist_ok=True)
    save_config(run, options.model2, wanted)
    return wanted
