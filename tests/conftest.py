"""Shared fixtures: a running Gemini emulator, an in-process toy service, and Model 1 inputs
sampled from the toy model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from inputs import Token, make_input, write_input

from klstream.backends.toy import ToyService
from klstream.emulator import EmulatorServer, ToyModel
from klstream.emulator.toymodel import EOS_ID
from klstream.input.explode import explode

Key = tuple[str, int, int]

TOY_FILES = 3
TOY_RESPONSES = 2
TOY_TOKENS = 35


@dataclass(frozen=True)
class ToyPosition:
    """What a position's request is made of, and Model 1's top-k there keyed by token id."""

    prompt: str
    prefill: str
    """Model 1's tokens before this position, concatenated."""
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class ToyInputs:
    directory: Path
    positions: dict[Key, ToyPosition]


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    """A fault-free emulator on a free port; tests switch faults with ``set_faults``."""
    with EmulatorServer() as server:
        yield server


@pytest.fixture
def toy() -> Iterator[ToyService]:
    """A fresh fault-free toy service in this process (``toy.endpoint()``, or ``--backend toy
    --base-url toy.url`` through ``cli.invoke``): the scheduler tests' service, with no HTTP
    and no waiting."""
    with ToyService() as service:
        yield service


def sampled_inputs(directory: Path, temperature: float) -> ToyInputs:
    """Spec-format inputs whose responses are sampled from ``toy`` at ``temperature`` (top-20
    logprobs each, at temperature 1 as a service reports them).

    Every file has its own prompt, so a request's prompt and prefill identify its position
    (up to position 0, which the responses of one file share).
    """
    model = ToyModel.for_name("toy")
    positions: dict[Key, ToyPosition] = {}
    for file_index in range(TOY_FILES):
        stem = f"story-{file_index}"
        prompt = f"Tell story number {file_index} about a lighthouse keeper."
        responses: list[list[Token]] = []
        for response_index in range(TOY_RESPONSES):
            generation = model.sample(
                prompt,
                TOY_TOKENS,
                temperature=temperature,
                seed=10 * file_index + response_index,
                top_k_logprobs=20,
            )
            steps = [s for s in generation.steps if s.chosen.token_id != EOS_ID]
            responses.append(
                [
                    (
                        s.chosen.token,
                        s.chosen.token_id,
                        s.chosen.logprob,
                        [(c.token, c.token_id, c.logprob) for c in s.top],
                    )
                    for s in steps
                ]
            )
            for position, step in enumerate(steps):
                prefill = "".join(s.chosen.token for s in steps[:position])
                top = [(c.token_id, c.logprob) for c in step.top]
                positions[(stem, response_index, position)] = ToyPosition(prompt, prefill, top)
        write_input(directory, stem, make_input(prompt, "toy", responses))
    return ToyInputs(directory, positions)


@pytest.fixture(scope="session")
def toy_inputs(tmp_path_factory: pytest.TempPathFactory) -> ToyInputs:
    """Inputs sampled from ``toy`` at temperature 1 (:func:`sampled_inputs`)."""
    return sampled_inputs(tmp_path_factory.mktemp("toy-inputs"), 1.0)


@pytest.fixture(scope="session")
def hot_toy_inputs(tmp_path_factory: pytest.TempPathFactory) -> ToyInputs:
    """Inputs sampled from ``toy`` at temperature 2: high-entropy responses, where most tokens
    are not Model 1's own top token (like a small model sampled at temperature 1)."""
    return sampled_inputs(tmp_path_factory.mktemp("hot-toy-inputs"), 2.0)


@pytest.fixture
def run_dir(tmp_path: Path, toy_inputs: ToyInputs) -> Path:
    """A fresh run directory exploded from ``toy_inputs``."""
    run = tmp_path / "run"
    explode(toy_inputs.directory, run)
    return run
