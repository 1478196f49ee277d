"""Opening a store written before Heap page receipts were keyed by segment.

The upgrade keeps every receipt: a page that was stored before it is still a
duplicate after it, and what Heap sent is all still there.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import asyncpg

from syncd.state import StateStore
from syncd.state.base import HeapPage, HeapSegment
from tests.support.stores import with_store, write_schema_1_postgres, write_schema_1_sqlite

TASK = "afe74af0-496e-11ec-81d3-0242ac130003"
SEGMENT = 1338065
OTHER = 2_000_000_000_001


def heap_page(segment: int, number: int, add: list[str]) -> HeapPage:
    return HeapPage(segment, f"Heap {segment}", TASK, number, 2, add, [])


async def _check_upgraded(store: StateStore) -> None:
    retried = await store.store_heap_page(heap_page(SEGMENT, 1, ["a"]))
    assert retried.duplicate is True, "a page stored before the upgrade was applied again"
    assert await store.heap_segments() == [HeapSegment(SEGMENT, f"Heap {SEGMENT}", "Free", 1, 0)]
    # The same task id for another segment is now a page of its own.
    other = await store.store_heap_page(heap_page(OTHER, 1, ["b"]))
    assert other.duplicate is False
    last = await store.store_heap_page(heap_page(SEGMENT, 2, ["c"]))
    assert (last.duplicate, last.task_complete) == (False, True)


async def test_sqlite_upgrade_keeps_heap_page_receipts(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    def fill(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO heap_segments (heap_segment_id, name, mapping_name, members,"
            " updated_at) VALUES (?, 'Free', 'Free', 1, '2024-01-01T00:00:00+00:00')",
            (SEGMENT,),
        )
        conn.execute("INSERT INTO heap_members (heap_segment_id, id) VALUES (?, 'a')", (SEGMENT,))
        conn.execute(
            "INSERT INTO heap_pages VALUES (?, 1, ?, 2, '2099-01-01T00:00:00+00:00')",
            (TASK, SEGMENT),
        )

    write_schema_1_sqlite(path, fill)
    await with_store(f"sqlite:///{path}", _check_upgraded)


async def test_postgres_upgrade_keeps_heap_page_receipts(pg_url: str) -> None:
    async def fill(conn: asyncpg.Connection[Any]) -> None:
        await conn.execute(
            "INSERT INTO heap_segments (heap_segment_id, name, mapping_name, members,"
            " updated_at) VALUES ($1, 'Free', 'Free', 1, now())",
            SEGMENT,
        )
        await conn.execute(
            "INSERT INTO heap_members (heap_segment_id, id) VALUES ($1, 'a')", SEGMENT
        )
        await conn.execute("INSERT INTO heap_pages VALUES ($1, 1, $2, 2, now())", TASK, SEGMENT)

    await write_schema_1_postgres(pg_url, fill)
    await with_store(pg_url, _check_upgraded)
