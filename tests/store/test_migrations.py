"""A state store written by the previous syncd (schema 1) opens, migrates, and keeps
everything: the replica-presence table is added beside what was stored."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import asyncpg

from syncd.state import StateStore, open_store
from syncd.state import postgres as postgres_store
from syncd.state import sqlite as sqlite_store
from tests.store.conftest import GUID, SYSTEM


async def _kept_and_heartbeats(store: StateStore) -> None:
    state = await store.get("vip")
    assert state is not None
    assert (state.segment_guid, state.members) == (GUID, 2)
    assert [m async for chunk in store.snapshot("vip", 10) for m in chunk] == ["a", "b"]
    await store.heartbeat("host:1:abc", ["vip"], 30)
    assert [r.mappings for r in await store.live_replicas()] == [["vip"]]


async def test_a_schema_1_sqlite_file_is_migrated_keeping_its_segments(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    try:
        conn.executescript(sqlite_store._MIGRATIONS[0])
        conn.execute(
            "INSERT INTO segments (name, system_guid, segment_guid, members) VALUES (?, ?, ?, 2)",
            ("vip", SYSTEM, GUID),
        )
        conn.executemany("INSERT INTO members VALUES ('vip', ?)", [("a",), ("b",)])
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    finally:
        conn.close()
    store = await open_store(f"sqlite:///{path}")
    try:
        await _kept_and_heartbeats(store)
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    finally:
        conn.close()


async def test_a_schema_1_postgres_database_is_migrated_keeping_its_segments(pg_url: str) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(pg_url)
    try:
        await conn.execute(postgres_store._MIGRATIONS[0])
        await conn.execute("CREATE TABLE syncd_schema (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO syncd_schema (version) VALUES (1)")
        await conn.execute(
            "INSERT INTO segments (name, system_guid, segment_guid, members)"
            " VALUES ('vip', $1, $2, 2)",
            SYSTEM,
            GUID,
        )
        await conn.execute("INSERT INTO members VALUES ('vip', 'a'), ('vip', 'b')")
    finally:
        await conn.close()
    store = await open_store(pg_url)
    try:
        await _kept_and_heartbeats(store)
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        versions = [row[0] for row in await conn.fetch("SELECT version FROM syncd_schema")]
    finally:
        await conn.close()
    assert sorted(versions) == list(range(1, postgres_store.SCHEMA_VERSION + 1))
