"""Fixtures for the state store tests: one contract suite, run against every store.

PostgreSQL tests need a real server: ``SYNCD_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``) names a database on it whose user
may create databases. Every test gets a database of its own, dropped afterwards.
Without a server the PostgreSQL tests fail (never skip) and say how to get one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from syncd.state import StateStore, open_store

PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
SYSTEM = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
OTHER_GUID = "11111111-2222-4333-8444-555555555555"
BACKENDS = ["sqlite", "postgresql"]

_UNREACHABLE = pytest.StashKey[str]()
_problem: str | None = None  # remembered, so an unreachable server costs one timeout


class PostgresUnreachable(Exception):
    """No PostgreSQL server to test against."""


def admin_url() -> str:
    return os.environ.get("SYNCD_TEST_POSTGRES_URL", PG_DEFAULT_URL)


def url_for_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def admin_connection() -> asyncpg.Connection[Any]:
    """A connection to the admin database, or PostgresUnreachable with the fix."""
    global _problem
    if _problem is not None:
        raise PostgresUnreachable(_problem)
    url = admin_url()
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        _problem = (
            f"PostgreSQL is not reachable at {url} ({type(exc).__name__}: {exc}). The"
            " PostgreSQL state store tests need a real server whose user may create"
            " databases: start one, or set"
            " SYNCD_TEST_POSTGRES_URL=postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
        raise PostgresUnreachable(_problem) from None
    return conn


async def create_database() -> str:
    """A new, empty database's name; PostgresUnreachable without a server."""
    name = f"syncd_t_{uuid.uuid4().hex[:16]}"
    conn = await admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
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


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    name = await create_database()
    try:
        yield url_for_database(admin_url(), name)
    finally:
        await drop_database(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test whose PostgreSQL is missing fails here, with the message, before it runs."""
    problem = item.stash.get(_UNREACHABLE, None)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return (yield)


class _Unavailable:
    """Stands in for a store that could not be opened; the test never runs."""


async def _postgres(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    try:
        name = await create_database()
    except PostgresUnreachable as exc:
        request.node.stash[_UNREACHABLE] = str(exc)
        yield "postgresql://unreachable/"
        return
    try:
        yield url_for_database(admin_url(), name)
    finally:
        await drop_database(name)


@pytest_asyncio.fixture
async def pg_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test (no store opened on it yet)."""
    async for url in _postgres(request):
        yield url


@pytest_asyncio.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Where this test's store lives: a fresh SQLite file or PostgreSQL database."""
    kind: str = request.param
    if kind == "sqlite":
        yield "sqlite:///" + str(tmp_path / "s.db")
        return
    async for url in _postgres(request):
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
