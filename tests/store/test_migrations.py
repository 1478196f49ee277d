"""A state store written by the previous syncd (schema 1) opens, migrates, and keeps
everything: the replica-presence table is added beside what was stored."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from syncd.state import StateStore
from syncd.state import postgres as postgres_store
from syncd.state import sqlite as sqlite_store
from syncd.state.schema import migrations
from syncd.state.sql import Dialect
from tests.store.conftest import GUID, SYSTEM
from tests.support.stores import with_store, write_schema_1_postgres, write_schema_1_sqlite


async def _kept_and_heartbeats(store: StateStore) -> None:
    state = await store.get("vip")
    assert state is not None
    assert (state.segment_guid, state.members) == (GUID, 2)
    assert [m async for chunk in store.snapshot("vip", 10) for m in chunk.ids()] == ["a", "b"]
    await store.heartbeat("host:1:abc", ["vip"], 30)
    assert [r.mappings for r in await store.live_replicas()] == [["vip"]]


async def test_a_schema_1_sqlite_file_is_migrated_keeping_its_segments(tmp_path: Path) -> None:
    path = tmp_path / "old.db"

    def fill(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO segments (name, system_guid, segment_guid, members) VALUES (?, ?, ?, 2)",
            ("vip", SYSTEM, GUID),
        )
        conn.executemany("INSERT INTO members VALUES ('vip', ?)", [("a",), ("b",)])

    write_schema_1_sqlite(path, fill)
    await with_store(f"sqlite:///{path}", _kept_and_heartbeats)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    finally:
        conn.close()


async def test_a_schema_1_postgres_database_is_migrated_keeping_its_segments(pg_url: str) -> None:
    async def fill(conn: asyncpg.Connection[Any]) -> None:
        await conn.execute(
            "INSERT INTO segments (name, system_guid, segment_guid, members)"
            " VALUES ('vip', $1, $2, 2)",
            SYSTEM,
            GUID,
        )
        await conn.execute("INSERT INTO members VALUES ('vip', 'a'), ('vip', 'b')")

    await write_schema_1_postgres(pg_url, fill)
    await with_store(pg_url, _kept_and_heartbeats)
    conn = await asyncpg.connect(pg_url)
    try:
        versions = [row[0] for row in await conn.fetch("SELECT version FROM syncd_schema")]
    finally:
        await conn.close()
    assert sorted(versions) == list(range(1, postgres_store.SCHEMA_VERSION + 1))



# What one dialect's rendering holds and the other's must not.
_SQLITE_ONLY = ["WITHOUT ROWID", "ADD COLUMN boot"]
_POSTGRES_ONLY = [
    'id TEXT COLLATE "C" NOT NULL',
    "started_at TIMESTAMPTZ NOT NULL",
    "ADD COLUMN seq BIGINT",
]


@pytest.mark.parametrize(
    ("dialect", "own", "other"),
    [
        (sqlite_store.DIALECT, _SQLITE_ONLY, _POSTGRES_ONLY),
        (postgres_store.DIALECT, _POSTGRES_ONLY, _SQLITE_ONLY),
    ],
    ids=["sqlite", "postgresql"],
)
def test_each_dialect_renders_the_schema_in_its_own_spelling(
    dialect: Dialect, own: list[str], other: list[str]
) -> None:
    """One schema, two spellings: SQLite gets its own types, rowid-less tables and its
    own steps (the leases' boot column); PostgreSQL its types (ids sorted by code
    point, times with a zone) and its own steps (runs.seq); no type name is left
    unfilled."""
    sql = "\n".join(migrations(dialect))
    assert [text for text in own if text not in sql] == []
    assert [text for text in other if text in sql] == []
    assert re.search(r"\{[A-Z_]+\}", sql) is None
