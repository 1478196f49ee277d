"""Fixtures for the integration tests: a real sandbox WalkMe on 127.0.0.1 (in the
test's event loop or on a thread) and ``syncd run`` subprocesses."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from syncd.app import Runtime, open_runtime
from syncd.sandbox import WalkMeSandbox, run_sandbox_in_thread
from syncd.settings import Settings
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, Harness, HarnessFactory
from tests.support.processes import DaemonProcess


@pytest.fixture(autouse=True)
def _no_outer_syncd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNCD_* variables of the shell running the tests must not reach the settings."""
    for name in list(os.environ):
        if name.upper().startswith("SYNCD_"):
            monkeypatch.delenv(name)


@pytest_asyncio.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    """``await make_harness(**WalkMeSandbox kwargs)``: a sandbox in this test's loop."""
    started: list[WalkMeSandbox] = []

    async def make(**kwargs: Any) -> Harness:
        kwargs.setdefault("client_id", CLIENT_ID)
        kwargs.setdefault("client_secret", CLIENT_SECRET)
        sandbox = WalkMeSandbox(**kwargs)
        await sandbox.start()
        started.append(sandbox)
        folder = tmp_path / f"harness{len(started)}"
        folder.mkdir()
        return Harness(sandbox, folder)

    yield make
    for sandbox in started:
        await sandbox.stop()


@pytest_asyncio.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


RuntimeFactory = Callable[[Settings], Awaitable[Runtime]]


@pytest_asyncio.fixture
async def runtime_of() -> AsyncIterator[RuntimeFactory]:
    """``await runtime_of(settings)``: the commands' runtime (state store, WalkMe
    client, engine) for those settings, in this test's loop; closed at the end."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_one(settings: Settings) -> Runtime:
            return await stack.enter_async_context(open_runtime(settings, settings.mappings()))

        yield open_one


# ------------------------------------------------------------ subprocess harness


@pytest.fixture
def live_sandbox() -> Iterator[WalkMeSandbox]:
    """A sandbox on its own thread, reachable by syncd subprocesses."""
    with run_sandbox_in_thread(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as sandbox:
        yield sandbox


@pytest.fixture
def daemons() -> Iterator[Callable[[dict[str, str]], DaemonProcess]]:
    """Start ``syncd run`` processes; any still alive at the end are killed."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str]) -> DaemonProcess:
        daemon = DaemonProcess(env).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill_if_alive()
