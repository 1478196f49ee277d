"""Fixtures for the state store tests: one contract suite, run against every store.

PostgreSQL tests need a real server: ``SYNCD_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``) names a database on it whose user
may create databases. Every test gets a database of its own, dropped afterwards.
Without a server the PostgreSQL tests fail (never skip) and say how to get one.

Creating a database takes PostgreSQL a few tenths of a second, so the contract
tests' databases are copies of one that ``open_store`` migrated once, created a
few tests ahead on a thread of their own, and dropped in the background. (The
migration itself is tested in test_postgres.py, on empty databases.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Generator
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from syncd.settings import describe_url
from syncd.state import StateStore, open_store

PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
SYSTEM = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
OTHER_GUID = "11111111-2222-4333-8444-555555555555"
BACKENDS = ["sqlite", "postgresql"]
DATABASE_PREFIX = "syncd_t_"

_T = TypeVar("_T")
_UNREACHABLE = pytest.StashKey[str]()
_problem: str | None = None  # remembered, so an unreachable server costs one timeout


class PostgresUnreachable(Exception):
    """No PostgreSQL server to test against."""


def admin_url() -> str:
    return os.environ.get("SYNCD_TEST_POSTGRES_URL", PG_DEFAULT_URL)


def url_for_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


async def admin_connection() -> asyncpg.Connection[Any]:
    """A connection to the admin database, or PostgresUnreachable saying what to do."""
    global _problem
    if _problem is not None:
        raise PostgresUnreachable(_problem)
    url = admin_url()
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        _problem = (
            f"PostgreSQL is not reachable at {describe_url(url)} ({type(exc).__name__}:"
            f" {exc}). The PostgreSQL state store tests need a real server whose user may"
            " create databases: start one, or set"
            " SYNCD_TEST_POSTGRES_URL=postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
        raise PostgresUnreachable(_problem) from None
    return conn


async def create_database(template: str | None = None) -> str:
    """A new database (empty, or a copy of ``template``); returns its name."""
    name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:16]}"
    conn = await admin_connection()
    try:
        source = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{source}')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    """Drop it, closing whatever connections a test left open."""
    conn = await admin_connection()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


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
            self._ready.append(self._submit(create_database(template)))
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
        self._loop = None


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
