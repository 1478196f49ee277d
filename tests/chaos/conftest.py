"""Fixtures for the chaos suite (its harness is ``tests.support.chaos``): the
session-wide transcript and ``make_scenario``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd.sandbox import serve_in_thread
from tests.support.chaos import ChaosSandbox, Scenario, ScenarioFactory, Transcript


@pytest.fixture(scope="session")
def transcript() -> Transcript:
    return Transcript()


@pytest.fixture
def make_scenario(tmp_path: Path, transcript: Transcript) -> Iterator[ScenarioFactory]:
    """``make_scenario(**ChaosSandbox kwargs)``: a running sandbox and a folder.

    Daemons still alive at the end are killed; sandboxes are stopped.
    """
    stack = contextlib.ExitStack()
    made: list[Scenario] = []

    def make(**kwargs: Any) -> Scenario:
        sandbox = ChaosSandbox(**kwargs)
        stack.enter_context(serve_in_thread(sandbox))
        transcript.sandboxes.append(sandbox)
        folder = tmp_path / f"scenario{len(made) + 1}"
        folder.mkdir()
        scenario = Scenario(sandbox, folder, transcript)
        made.append(scenario)
        return scenario

    with stack:
        yield make
        for scenario in made:
            for daemon in scenario.started:
                daemon.kill_if_alive()
