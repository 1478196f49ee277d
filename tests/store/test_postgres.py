"""What only the PostgreSQL store does: its schema, several replicas, connection errors.

Each test gets an empty database of its own (``pg_url``); see conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import structlog

from syncd.state import StateError, StateStore, open_store
from syncd.state import postgres as postgres_store
from syncd.state.base import HeapPage, StateRecreated
from syncd.state.postgres import SCHEMA_VERSION
from syncd.urls import describe_url
from tests.store.conftest import GUID, SYSTEM
from tests.support.net import free_port
from tests.support.postgres import (
    PostgresUnreachable,
    admin_connection,
    drop_database,
    postgres_url,
    url_for_database,
)
from tests.support.stores import execute_sql, opened_together

pytestmark = pytest.mark.postgres

TABLES = {
    "syncd_schema",
    "segments",
    "members",
    "runs",
    "quarantine",
    "pending",
    "leases",
    "due",
    "heap_segments",
    "heap_members",
    "heap_pages",
    "replicas",
    "notices",
}
ALL_VERSIONS = list(range(1, SCHEMA_VERSION + 1))
SECRET = "s3cr3tXq"  # in every part of every test password: a leak of any part shows


async def tables(url: str) -> set[str]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await conn.close()
    return {row[0] for row in rows}


async def schema_versions(url: str) -> list[int]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version FROM syncd_schema ORDER BY version")
    finally:
        await conn.close()
    return [row[0] for row in rows]


async def connections_to(url: str) -> int:
    """Sessions open on the database, other than this check's own."""
    database = urlsplit(url).path.lstrip("/")
    conn = await admin_connection()
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()
    return count


async def require_postgres() -> None:
    """Fail (never skip) when there is no server to make the test meaningful."""
    try:
        conn = await admin_connection()
    except PostgresUnreachable as exc:
        pytest.fail(str(exc), pytrace=False)
    await conn.close()


@contextlib.asynccontextmanager
async def open_pair(url: str) -> AsyncIterator[tuple[StateStore, StateStore]]:
    """Two replicas' stores on one database (the first one creates the schema)."""
    async with contextlib.AsyncExitStack() as stores:
        first = await open_store(url)
        stores.push_async_callback(first.close)
        second = await open_store(url)
        stores.push_async_callback(second.close)
        yield first, second


def heap_page(task: str, number: int, total: int, segment: int, add: list[str]) -> HeapPage:
    return HeapPage(segment, f"Heap {segment}", task, number, total, add, [])


# -- schema --------------------------------------------------------------------------------


async def test_schema_is_created_on_an_empty_database(pg_url: str) -> None:
    assert await tables(pg_url) == set()
    store = await open_store(pg_url)
    try:
        await store.begin_run("vip", "r1", SYSTEM, None)
        await store.record_batch("vip", "r1", "create", ["a", "b"], GUID)
    finally:
        await store.close()
    assert await tables(pg_url) == TABLES
    assert await schema_versions(pg_url) == ALL_VERSIONS

    again = await open_store(pg_url)  # a second open changes nothing
    try:
        state = await again.get("vip")
        assert state is not None
        assert state.members == 2
        assert [m async for chunk in again.snapshot("vip", 10) for m in chunk.ids()] == ["a", "b"]
    finally:
        await again.close()
    assert await tables(pg_url) == TABLES
    assert await schema_versions(pg_url) == ALL_VERSIONS


async def test_a_postgres_scheme_url_opens_the_postgresql_store(pg_url: str) -> None:
    """``postgres://`` (as Heroku and others spell it) names PostgreSQL too, not a
    SQLite file."""
    store = await open_store(pg_url.replace("postgresql://", "postgres://", 1))
    try:
        await store.begin_run("vip", "r1", SYSTEM, None)
    finally:
        await store.close()
    assert await tables(pg_url) == TABLES


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE TABLE syncd_schema (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO syncd_schema (version) VALUES (1), (99)")
    finally:
        await conn.close()
    with pytest.raises(StateError, match="newer syncd") as raised:
        await open_store(pg_url)
    assert "99" in str(raised.value)
    # Nothing was touched, and the refused store left no connection behind.
    assert await tables(pg_url) == {"syncd_schema"}
    assert await schema_versions(pg_url) == [1, 99]
    for _ in range(40):
        if await connections_to(pg_url) == 0:
            break
        await asyncio.sleep(0.05)
    assert await connections_to(pg_url) == 0


async def test_replicas_opening_together_both_succeed(pg_url: str) -> None:
    async with opened_together(pg_url) as (first, second):
        await first.begin_run("vip", "r1", SYSTEM, None)
        await second.ping()
        state = await second.get("vip")
        assert state is not None
        assert state.name == "vip"
    assert await schema_versions(pg_url) == ALL_VERSIONS
    assert await tables(pg_url) == TABLES


async def test_tables_lost_under_a_running_store_are_created_again(pg_url: str) -> None:
    """The database emptied under a running store (dropped and created again): the
    call fails with StateRecreated, logged as ``state.recreated`` with what happens
    next; the tables are back, empty, and the next call works on them."""
    store = await open_store(pg_url)
    try:
        await store.begin_run("vip", "r1", SYSTEM, None)
        await execute_sql(pg_url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        with structlog.testing.capture_logs() as logs, pytest.raises(StateRecreated) as raised:
            await store.get("vip")
        where = f"state store {describe_url(pg_url)}"
        assert str(raised.value) == (
            f"{where}: the database had lost syncd's tables (dropped and created again?);"
            " created them again: segments are rebuilt from their sources"
        )
        assert logs == [
            {
                "event": "state.recreated",
                "log_level": "error",
                "store": where,
                "hint": "the database lost syncd's tables and they were created again; each"
                " segment is found again in WalkMe and rebuilt from its source with override",
            }
        ]
        assert await tables(pg_url) == TABLES
        assert await store.get("vip") is None
    finally:
        await store.close()


async def test_one_table_lost_under_a_running_store_is_not_made_again(pg_url: str) -> None:
    """One table gone, the schema's record still there: not a database made again,
    so nothing is created; the call fails saying a table is missing and what to do."""
    store = await open_store(pg_url)
    try:
        await execute_sql(pg_url, "DROP TABLE notices")
        with structlog.testing.capture_logs() as logs, pytest.raises(StateError) as raised:
            await store.notice_state("vip")
        assert not isinstance(raised.value, StateRecreated)
        assert str(raised.value) == (
            f"state store {describe_url(pg_url)}: a table is missing; if this repeats, the"
            " database was damaged: restore it, or empty it and restart syncd"
        )
        assert logs == []
        assert await tables(pg_url) == TABLES - {"notices"}
    finally:
        await store.close()


# -- connection errors -----------------------------------------------------------------------



def _bad_url(case: str) -> str:
    server = urlsplit(postgres_url())
    user = server.username or "postgres"
    host = server.hostname or "127.0.0.1"
    where = f"{host}:{server.port or 5432}"
    database = server.path.lstrip("/") or "postgres"
    return {
        "unknown-role": f"postgresql://syncd_no_such_role:{SECRET}@{where}/{database}",
        "unknown-database": f"postgresql://{user}:{SECRET}@{where}/syncd_t_no_such_database",
        "closed-port": f"postgresql://{user}:{SECRET}@127.0.0.1:{free_port()}/{database}",
        "unknown-host": f"postgresql://{user}:{SECRET}@no-such-host.invalid:5432/{database}",
        # Generated passwords hold URL delimiters; unencoded, they end the password early.
        "password-with-hash": f"postgresql://{user}:{SECRET}A#{SECRET}B@{where}/{database}",
        "password-with-slash": f"postgresql://{user}:{SECRET}A/{SECRET}B@{where}/{database}",
        "password-with-question-mark": (
            f"postgresql://{user}:{SECRET}A?{SECRET}B@{where}/{database}"
        ),
        "password-digits-then-slash": f"postgresql://{user}:5432/{SECRET}@{where}/{database}",
        "percent-encoded-password": (
            f"postgresql://syncd_no_such_role:{SECRET}%40%2F%23@{where}/{database}"
        ),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "unknown-role",
        "unknown-database",
        "closed-port",
        "unknown-host",
        "password-with-hash",
        "password-with-slash",
        "password-with-question-mark",
        "password-digits-then-slash",
        "percent-encoded-password",
    ],
)
async def test_connection_errors_never_show_the_password(case: str) -> None:
    await require_postgres()
    url = _bad_url(case)
    try:
        store = await asyncio.wait_for(open_store(url), timeout=30)
    except StateError as exc:
        message = str(exc)
    except Exception as exc:  # must be a StateError, and still never leak the password
        leaked = SECRET in f"{exc} {exc!r}"
        pytest.fail(
            f"open_store raised {type(exc).__name__}, not StateError"
            f"{' (its message holds the password)' if leaked else ''}: {exc}",
            pytrace=False,
        )
    else:
        await store.close()
        pytest.fail(f"{case}: open_store succeeded", pytrace=False)
    assert SECRET not in message, message
    assert "cannot connect" in message, message


@pytest.mark.parametrize(
    ("error", "told"),
    [
        (OSError("  refused\nthe detail below  "), "refused"),
        (TimeoutError(), "TimeoutError"),
        (OSError("x" * 400), "x" * 300),
    ],
    ids=["first-line", "no-text", "long"],
)
def test_a_database_error_is_told_by_its_first_line_or_its_type(
    error: Exception, told: str
) -> None:
    """What a StateError says of the driver's error: its first line, at most 300
    characters; an error without text by its type."""
    assert postgres_store._reason(error) == told


# -- several replicas on one database ----------------------------------------------------------


async def test_last_pages_at_two_replicas_complete_the_task_once(pg_url: str) -> None:
    async with open_pair(pg_url) as (first, second):
        for task in range(6):  # a known segment: the last two of three pages race
            await first.store_heap_page(heap_page(f"t{task}", 1, 3, 1, [f"a{task}"]))
            receipts = await asyncio.gather(
                first.store_heap_page(heap_page(f"t{task}", 2, 3, 1, [f"b{task}"])),
                second.store_heap_page(heap_page(f"t{task}", 3, 3, 1, [f"c{task}"])),
            )
            assert sorted(r.task_complete for r in receipts) == [False, True], task
            assert not any(r.duplicate for r in receipts)
        for segment in range(10, 16):  # a new segment: its first and only two pages race
            receipts = await asyncio.gather(
                first.store_heap_page(heap_page(f"n{segment}", 1, 2, segment, ["x"])),
                second.store_heap_page(heap_page(f"n{segment}", 2, 2, segment, ["y"])),
            )
            assert sorted(r.task_complete for r in receipts) == [False, True], segment
        counts = {
            s.heap_segment_id: (s.members, s.complete_tasks) for s in await first.heap_segments()
        }
        assert counts == {1: (18, 6)} | {segment: (2, 1) for segment in range(10, 16)}


async def test_one_page_delivered_to_two_replicas_is_applied_once(pg_url: str) -> None:
    async with open_pair(pg_url) as (first, second):
        for task in range(6):
            same = heap_page(f"t{task}", 1, 1, 7, [f"u{task}", "shared"])
            receipts = await asyncio.gather(
                first.store_heap_page(same), second.store_heap_page(same)
            )
            assert sorted(r.duplicate for r in receipts) == [False, True], task
            assert sum(r.task_complete for r in receipts) == 1, task
        [segment] = await first.heap_segments()
        assert (segment.members, segment.complete_tasks) == (7, 6)


async def test_one_replica_wins_a_lease(pg_url: str) -> None:
    """Two replicas asking for one lease at once: exactly one gets it, whether it was
    free or had expired."""

    async def one_winner(name: str) -> None:
        won = await asyncio.gather(
            first.acquire_lease(name, "replica-a", 30),
            second.acquire_lease(name, "replica-b", 30),
        )
        assert sorted(won) == [False, True], name

    async with open_pair(pg_url) as (first, second):
        for number in range(10):
            await one_winner(f"segment-{number}")
        expired = [f"expired-{number}" for number in range(5)]
        for name in expired:
            assert await first.acquire_lease(name, "replica-dead", 0.1)
        await asyncio.sleep(0.3)
        for name in expired:
            await one_winner(name)


async def test_lists_are_in_code_point_order_whatever_the_database_collation() -> None:
    """A database sorting text by language rules (ICU en-US: 'a' < 'B') still lists
    segments, replicas and quarantined ids as SQLite does: by code point."""
    name = f"syncd_t_icu_{uuid.uuid4().hex[:12]}"
    conn = await admin_connection()
    try:
        await conn.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0'
            " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    finally:
        await conn.close()
    names = ["b", "B", "a", "A", "_z"]
    try:
        store = await open_store(url_for_database(postgres_url(), name))
        try:
            for segment in names:
                await store.begin_run(segment, f"run-{segment}", SYSTEM, None)
                await store.heartbeat(f"host:1:{segment}", [segment], 30)
            await store.quarantine("a", "add", [(member, "rejected") for member in names])
            assert [s.name for s in await store.all()] == sorted(names)
            assert [r.replica_id for r in await store.live_replicas()] == sorted(
                f"host:1:{segment}" for segment in names
            )
            assert [e[0] for e in await store.quarantine_examples("a", 10)] == sorted(names)
        finally:
            await store.close()
    finally:
        await drop_database(name)
