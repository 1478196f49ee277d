"""State stores for the store tests: as the previous syncd (schema 1) wrote them,
and opened by two replicas at once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from syncd.state import StateStore, open_store
from syncd.state import postgres as postgres_store
from syncd.state import sqlite as sqlite_store


def write_schema_1_sqlite(path: Path, fill: Callable[[sqlite3.Connection], object]) -> None:
    """A schema-1 SQLite file at ``path`` holding the rows ``fill`` inserts."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(sqlite_store._MIGRATIONS[0])
        fill(conn)
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    finally:
        conn.close()


async def write_schema_1_postgres(
    url: str, fill: Callable[[asyncpg.Connection[Any]], Awaitable[object]]
) -> None:
    """A schema-1 PostgreSQL database at ``url`` holding the rows ``fill`` inserts."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(url)
    try:
        await conn.execute(postgres_store._MIGRATIONS[0])
        await conn.execute("CREATE TABLE syncd_schema (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO syncd_schema (version) VALUES (1)")
        await fill(conn)
    finally:
        await conn.close()


async def create_store(url: str) -> None:
    """A store at ``url`` holding syncd's schema and nothing else."""
    store = await open_store(url)
    await store.close()


async def execute_sql(url: str, sql: str) -> None:
    """Run one statement on the store's database directly, behind the store's back
    (what no store call can do: make an instant shared, a clock step)."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(sqlite_store.sqlite_path(url))
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return
    pg: asyncpg.Connection[Any] = await asyncpg.connect(url)
    try:
        await pg.execute(sql)
    finally:
        await pg.close()


async def with_store(url: str, action: Callable[[StateStore], Awaitable[object]]) -> None:
    """Open (and so migrate) the store at ``url``, run ``action`` on it, close it."""
    store = await open_store(url)
    try:
        await action(store)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def opened_together(url: str) -> AsyncIterator[tuple[StateStore, StateStore]]:
    """Two stores on ``url`` opened at the same moment, as replicas starting together
    do; both must open. Closed on leaving."""
    opened = await asyncio.gather(open_store(url), open_store(url), return_exceptions=True)
    stores = [one for one in opened if not isinstance(one, BaseException)]
    try:
        assert len(stores) == 2, f"an open failed: {opened}"
        yield stores[0], stores[1]
    finally:
        for one in stores:
            await one.close()
