"""Fixtures for the state store tests: one contract suite, run against every store.

PostgreSQL tests need a real server (see ``tests.support.postgres``; they are
marked ``postgres``). Every test gets a database of its own, dropped afterwards.

Creating a database takes PostgreSQL a few tenths of a second, so the contract
tests' databases are copies of one that ``open_store`` migrated once, created a
few tests ahead on a thread of their own, and dropped in the background. (The
migration itself is tested in test_postgres.py, on empty databases.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Generator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import pytest_asyncio

from syncd.state import StateStore, open_store
from tests.support.postgres import (
    PostgresUnreachable,
    create_database,
    drop_database,
    url_for_database,
)
from tests.support.postgres import postgres_url as admin_url

SYSTEM = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
OTHER_GUID = "11111111-2222-4333-8444-555555555555"
BACKENDS = ["sqlite", "postgresql"]

_T = TypeVar("_T")
_UNREACHABLE = pytest.StashKey[str]()


async def _migrated_template() -> str:
    name = await create_database()
    store = await open_store(url_for_database(admin_url(), name))
    await store.close()
    return name


class _Databases:
    """Creates migrated databases ahead of the tests and drops used ones, on a thread."""

    AHEAD = 3

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._template: concurrent.futures.Future[str] | None = None
        self._ready: deque[concurrent.futures.Future[str]] = deque()
        self._drops: list[concurrent.futures.Future[None]] = []

    def _submit(self, work: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(
                target=self._loop.run_forever, name="test-databases", daemon=True
            ).start()
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    async def migrated(self) -> str:
        """The name of a fresh database holding syncd's schema."""
        if self._template is None:
            self._template = self._submit(_migrated_template())
        template = await asyncio.wrap_future(self._template)
        while len(self._ready) <= self.AHEAD:
            self._ready.append(self._submit(create_database(template=template)))
        return await asyncio.wrap_future(self._ready.popleft())

    def drop(self, name: str) -> None:
        self._drops.append(self._submit(drop_database(name)))

    def close(self) -> None:
        if self._loop is None:
            return
        leftovers = [*self._ready, *([self._template] if self._template else [])]
        for future in leftovers:
            try:
                self.drop(future.result(timeout=60))
            except Exception:  # noqa: S112 - never created: nothing to drop
                continue
        for done in self._drops:
            done.result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        # Forgotten too: a second session in the same process (mutmut runs pytest
        # several times in one) must not be handed the databases dropped above.
        self._loop = None
        self._template = None
        self._ready.clear()
        self._drops.clear()


_databases = _Databases()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _databases.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test whose PostgreSQL is missing fails here, with the message, before it runs."""
    problem = item.stash.get(_UNREACHABLE, None)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return (yield)


class _Unavailable:
    """Stands in for a store that could not be opened; the test never runs."""


async def _postgres(request: pytest.FixtureRequest, migrated: bool) -> AsyncIterator[str]:
    try:
        name = await (_databases.migrated() if migrated else create_database())
    except PostgresUnreachable as exc:
        request.node.stash[_UNREACHABLE] = str(exc)
        yield "postgresql://unreachable/"
        return
    try:
        yield url_for_database(admin_url(), name)
    finally:
        _databases.drop(name)


@pytest_asyncio.fixture
async def pg_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for this test (no store opened on it)."""
    async for url in _postgres(request, migrated=False):
        yield url


@pytest_asyncio.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Where this test's store lives: a fresh SQLite file or PostgreSQL database."""
    kind: str = request.param
    if kind == "sqlite":
        yield "sqlite:///" + str(tmp_path / "s.db")
        return
    async for url in _postgres(request, migrated=True):
        yield url


@pytest_asyncio.fixture
async def store(request: pytest.FixtureRequest, store_url: str) -> AsyncIterator[StateStore]:
    """The store under test, opened on ``store_url`` and closed afterwards."""
    if _UNREACHABLE in request.node.stash:
        yield cast(StateStore, _Unavailable())
        return
    opened = await open_store(store_url)
    try:
        yield opened
    finally:
        await opened.close()
