"""The PostgreSQL server the ``postgres``-marked tests use, and databases on it.

``SYNCD_TEST_POSTGRES_URL`` (default ``DEFAULT_POSTGRES_URL``) names a database on
it whose user may create databases. Without a reachable server the marked tests
skip with the reason, unless ``SYNCD_TEST_REQUIRE_POSTGRES=1`` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from syncd.urls import describe_url

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
URL_VARIABLE = "SYNCD_TEST_POSTGRES_URL"
REQUIRE_VARIABLE = "SYNCD_TEST_REQUIRE_POSTGRES"

_problem: str | None = None  # remembered, so an unreachable server costs one timeout


class PostgresUnreachable(Exception):
    """No PostgreSQL server to test against."""


def postgres_url() -> str:
    return os.environ.get(URL_VARIABLE, DEFAULT_POSTGRES_URL)


def postgres_required() -> bool:
    """Whether a missing server fails the marked tests instead of skipping them."""
    return os.environ.get(REQUIRE_VARIABLE, "") not in ("", "0")


def url_for_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


async def admin_connection() -> asyncpg.Connection[Any]:
    """A connection to ``postgres_url()``, or PostgresUnreachable saying what to do."""
    global _problem
    if _problem is not None:
        raise PostgresUnreachable(_problem)
    url = postgres_url()
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        _problem = (
            f"PostgreSQL is not reachable at {describe_url(url)} ({type(exc).__name__}:"
            f" {exc}). Start a server whose user may create databases, or point"
            f" {URL_VARIABLE}=postgresql://USER:PASSWORD@HOST:PORT/DATABASE at one"
        )
        raise PostgresUnreachable(_problem) from None
    return conn


def unreachable_reason() -> str | None:
    """Why the marked tests cannot run (None: the server answers). Sync, for hooks."""

    async def probe() -> None:
        conn = await admin_connection()
        await conn.close()

    try:
        asyncio.run(probe())
    except PostgresUnreachable as exc:
        return str(exc)
    return None


async def create_database(*, prefix: str = "syncd_t_", template: str | None = None) -> str:
    """A new database (empty, or a copy of ``template``); returns its name. Names are
    random, so xdist workers sharing one server never collide."""
    name = f"{prefix}{uuid.uuid4().hex[:16]}"
    conn = await admin_connection()
    try:
        source = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{source}')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    """Drop it, closing whatever connections a test (or a SIGKILLed replica) left open."""
    conn = await admin_connection()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
