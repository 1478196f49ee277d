"""Fixtures for the Heap source tests (their helpers are ``tests.support.heap``): a
receiver, an HTTP session, a sandbox WalkMe, and no SYNCD_* variable from outside."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from syncd.sandbox import WalkMeSandbox
from tests.support.heap import Receiver, start_receiver


@pytest.fixture(autouse=True)
def _clean_syncd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test alone, never from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("SYNCD_") and name != "SYNCD_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)


@pytest_asyncio.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A receiver on a free port of 127.0.0.1: 64 KiB bodies, 60 s tolerance."""
    running = await start_receiver(tmp_path)
    try:
        yield running
    finally:
        await running.stop()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest_asyncio.fixture
async def sandbox() -> AsyncIterator[WalkMeSandbox]:
    async with WalkMeSandbox() as running:
        yield running
