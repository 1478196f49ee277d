"""PostgreSQL state store: the one several ``syncd run`` replicas share.

Same contract as the SQLite store. Ids travel as arrays (``unnest``/``ANY``), so
a 25,000-id batch is one statement. Replicas coordinate through leases (one run
per segment at a time) and row locks (Heap pages for one segment apply in turn).
The schema is created and migrated here, under an advisory lock so replicas
starting together do not race.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

import asyncpg
import structlog

from syncd.diff import Quarantined
from syncd.ids import SkippedIds
from syncd.state.base import (
    Action,
    HeapPage,
    HeapSegment,
    LeaseLost,
    Origin,
    PageReceipt,
    PendingBatch,
    ReplicaPresence,
    RunRecord,
    RunResult,
    SegmentState,
    StateError,
    StateRecreated,
)
from syncd.urls import describe_url

log = structlog.get_logger("syncd.state")

SCHEMA_VERSION = 4
_MIGRATION_LOCK = 0x73796E6364  # "syncd": serialises schema changes across replicas

# Each entry migrates from the previous version; index + 1 is the version it makes.
_MIGRATIONS = [
    """
    CREATE TABLE segments (
        name TEXT PRIMARY KEY,
        system_guid TEXT NOT NULL,
        segment_guid TEXT,
        external_id TEXT,
        origin TEXT,
        needs_override BOOLEAN NOT NULL DEFAULT FALSE,
        members BIGINT NOT NULL DEFAULT 0,
        last_run_at TIMESTAMPTZ,
        last_result TEXT,
        last_error TEXT,
        last_success_at TIMESTAMPTZ,
        skipped BIGINT NOT NULL DEFAULT 0,
        skipped_examples TEXT NOT NULL DEFAULT '[]',
        orphaned_at TIMESTAMPTZ,
        source_fingerprint TEXT
    );
    CREATE TABLE members (
        segment TEXT NOT NULL,
        id TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (segment, id)
    );
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        segment TEXT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        ended_at TIMESTAMPTZ,
        result TEXT NOT NULL,
        added BIGINT NOT NULL DEFAULT 0,
        removed BIGINT NOT NULL DEFAULT 0,
        requests BIGINT NOT NULL DEFAULT 0,
        skipped BIGINT NOT NULL DEFAULT 0,
        quarantined BIGINT NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX runs_by_segment ON runs (segment, started_at);
    CREATE TABLE quarantine (
        segment TEXT NOT NULL,
        action TEXT NOT NULL,
        id TEXT NOT NULL,
        reason TEXT NOT NULL,
        since TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (segment, action, id)
    );
    CREATE TABLE pending (
        segment TEXT PRIMARY KEY,
        action TEXT NOT NULL,
        ids TEXT[] NOT NULL
    );
    CREATE TABLE leases (
        segment TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE heap_segments (
        heap_segment_id BIGINT PRIMARY KEY,
        name TEXT NOT NULL,
        mapping_name TEXT NOT NULL,
        members BIGINT NOT NULL DEFAULT 0,
        complete_tasks BIGINT NOT NULL DEFAULT 0,
        updated_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE heap_members (
        heap_segment_id BIGINT NOT NULL,
        id TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (heap_segment_id, id)
    );
    CREATE TABLE heap_pages (
        sync_task_id TEXT NOT NULL,
        page_number INTEGER NOT NULL,
        heap_segment_id BIGINT NOT NULL,
        total_pages INTEGER NOT NULL,
        received_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (sync_task_id, page_number)
    );
    """,
    # Due marks: a run asked for while another replica held the lease.
    """
    CREATE TABLE due (
        segment TEXT PRIMARY KEY,
        due_at DOUBLE PRECISION NOT NULL
    );
    """,
    # Replica heartbeats: which live replica maps which segments.
    """
    CREATE TABLE replicas (
        replica_id TEXT PRIMARY KEY,
        mappings TEXT[] NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    """,
    # Page receipts keyed by Heap segment too: two segments' tasks may share an id.
    """
    ALTER TABLE heap_pages DROP CONSTRAINT heap_pages_pkey;
    ALTER TABLE heap_pages ADD PRIMARY KEY (heap_segment_id, sync_task_id, page_number);
    """,
]
assert len(_MIGRATIONS) == SCHEMA_VERSION

_NOW = "extract(epoch FROM clock_timestamp())"  # the lease clock: the database's


async def _fence(
    conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], name: str, holder: str | None
) -> None:
    """Inside a transaction: raise LeaseLost unless ``holder`` (when given) holds the
    segment's unexpired lease. The row lock keeps anyone from taking the lease over
    until this transaction ends, so what it writes is written under that lease."""
    if holder is None:
        return
    held = await conn.fetchval(
        f"SELECT 1 FROM leases WHERE segment = $1 AND holder = $2 AND expires_at >= {_NOW}"
        " FOR SHARE",
        name,
        holder,
    )
    if held is None:
        raise LeaseLost(name)


_COLUMNS = (
    "name, system_guid, segment_guid, external_id, origin, needs_override, members,"
    " last_run_at, last_result, last_error, last_success_at, skipped, skipped_examples,"
    " orphaned_at, (SELECT count(*) FROM quarantine q WHERE q.segment = segments.name),"
    " source_fingerprint"
)


async def _forget_members(
    conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], name: str
) -> None:
    """What syncd knows of the segment's members in WalkMe: the snapshot, the
    quarantine and the batch in flight."""
    for table in ("members", "quarantine", "pending"):
        await conn.execute(f"DELETE FROM {table} WHERE segment = $1", name)


def _count(status: str) -> int:
    """Rows affected, from a command tag such as ``INSERT 0 25000`` or ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])


def _state(row: asyncpg.Record) -> SegmentState:
    return SegmentState(
        name=row[0],
        system_guid=row[1],
        segment_guid=row[2],
        external_id=row[3],
        origin=row[4],
        needs_override=row[5],
        members=row[6],
        last_run_at=row[7],
        last_result=row[8],
        last_error=row[9],
        last_success_at=row[10],
        skipped=row[11],
        skipped_examples=json.loads(row[12]),
        orphaned_at=row[13],
        quarantined=row[14],
        source_fingerprint=row[15],
    )


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, where: str) -> None:
        self._pool = pool
        self._where = where

    def __repr__(self) -> str:
        return f"<PostgresStore {self._where}>"

    @classmethod
    async def open(cls, url: str, pool_size: int = 8) -> PostgresStore:
        where = f"state store {describe_url(url)}"
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size, timeout=30)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StateError(f"{where}: cannot connect: {_reason(exc)}") from None
        except ValueError:
            # The driver's parse errors quote the URL, password included.
            raise StateError(
                f"{where}: cannot connect: SYNCD_STATE_URL is not a valid PostgreSQL URL"
                " (percent-encode special characters in the password)"
            ) from None
        store = cls(pool, where)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self) -> int:
        """Bring the schema up to date; returns how many migrations ran."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS syncd_schema (version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM syncd_schema") or 0
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self._where}: written by a newer syncd (schema {version}, this one"
                    f" knows {SCHEMA_VERSION}); upgrade syncd"
                )
            for number in range(version, SCHEMA_VERSION):
                await conn.execute(_MIGRATIONS[number])
                await conn.execute("INSERT INTO syncd_schema (version) VALUES ($1)", number + 1)
        return SCHEMA_VERSION - version

    async def _recreate(self) -> StateError:
        """A table is missing under a running syncd: the database was dropped and
        created again empty (a restore gone wrong, a wiped test server). Create the
        schema again; what WalkMe holds is then rebuilt from the sources."""
        if not await self._migrate():
            # Another call (or replica) made the schema already, or only some
            # tables went: the first case heals itself, the second needs a person.
            return StateError(
                f"{self._where}: a table is missing; if this repeats, the database was"
                " damaged: restore it, or empty it and restart syncd"
            )
        log.error(
            "state.recreated",
            store=self._where,
            hint="the database lost syncd's tables and they were created again; each"
            " segment is found again in WalkMe and rebuilt from its source with override",
        )
        return StateRecreated(
            f"{self._where}: the database had lost syncd's tables (dropped and created"
            " again?); created them again: segments are rebuilt from their sources"
        )

    def _conn(self) -> _Connection:
        return _Connection(self)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # -- segments ------------------------------------------------------------------

    async def get(self, name: str) -> SegmentState | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM segments WHERE name = $1", name)
        return _state(row) if row else None

    async def all(self) -> list[SegmentState]:
        async with self._conn() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM segments ORDER BY name")
        return [_state(row) for row in rows]

    async def begin_run(
        self, name: str, run_id: str, system_guid: str, external_id: str | None
    ) -> SegmentState:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO segments (name, system_guid, external_id) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO UPDATE SET external_id = excluded.external_id",
                name,
                system_guid,
                external_id,
            )
            await conn.execute(
                "INSERT INTO runs (run_id, segment, started_at, result)"
                " VALUES ($1, $2, now(), 'running')",
                run_id,
                name,
            )
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM segments WHERE name = $1", name)
            # A run that dies from here on leaves WalkMe changed: until one
            # succeeds again, no fingerprint may vouch for the snapshot.
            await conn.execute(
                "UPDATE segments SET source_fingerprint = NULL WHERE name = $1", name
            )
        assert row is not None  # inserted just above
        return _state(row)

    async def adopt(self, name: str, segment_guid: str, origin: Origin) -> None:
        async with self._conn() as conn, conn.transaction():
            await _forget_members(conn, name)
            await conn.execute(
                "UPDATE segments SET segment_guid = $1, origin = $2, needs_override = TRUE,"
                " members = 0 WHERE name = $3",
                segment_guid,
                origin,
                name,
            )

    async def record_batch(
        self,
        name: str,
        run_id: str,
        action: Action,
        ids: list[str],
        segment_guid: str | None = None,
        holder: str | None = None,
        *,
        still_pending: PendingBatch | None = None,
    ) -> None:
        async with self._conn() as conn, conn.transaction():
            await _fence(conn, name, holder)
            await conn.execute("DELETE FROM pending WHERE segment = $1", name)
            if still_pending is not None and still_pending.ids:
                await conn.execute(
                    "INSERT INTO pending (segment, action, ids) VALUES ($1, $2, $3)",
                    name,
                    still_pending.action,
                    still_pending.ids,
                )
            if action == "remove":
                changed = -_count(
                    await conn.execute(
                        "DELETE FROM members WHERE segment = $1 AND id = ANY($2::text[])",
                        name,
                        ids,
                    )
                )
            else:
                if action in ("create", "override"):
                    await conn.execute("DELETE FROM members WHERE segment = $1", name)
                    await conn.execute(
                        "UPDATE segments SET members = 0, needs_override = FALSE,"
                        " segment_guid = coalesce($1, segment_guid),"
                        " origin = coalesce(origin, 'created') WHERE name = $2",
                        segment_guid,
                        name,
                    )
                changed = _count(
                    await conn.execute(
                        "INSERT INTO members (segment, id) SELECT $1, unnest($2::text[])"
                        " ON CONFLICT DO NOTHING",
                        name,
                        ids,
                    )
                )
            await conn.execute(
                "UPDATE segments SET members = members + $1 WHERE name = $2", changed, name
            )
            column = "removed" if action == "remove" else "added"
            await conn.execute(
                f"UPDATE runs SET requests = requests + 1, {column} = {column} + $1"
                " WHERE run_id = $2",
                len(ids),
                run_id,
            )

    async def forget_guid(self, name: str) -> None:
        async with self._conn() as conn, conn.transaction():
            await _forget_members(conn, name)
            await conn.execute(
                "UPDATE segments SET segment_guid = NULL, origin = NULL,"
                " needs_override = FALSE, members = 0 WHERE name = $1",
                name,
            )

    async def reset(self, name: str) -> bool:
        async with self._conn() as conn, conn.transaction():
            await _forget_members(conn, name)
            status = await conn.execute(
                "UPDATE segments SET members = 0,"
                " needs_override = (segment_guid IS NOT NULL) WHERE name = $1",
                name,
            )
        return _count(status) > 0

    async def forget(self, name: str) -> bool:
        async with self._conn() as conn, conn.transaction():
            for table in ("members", "runs", "quarantine", "pending", "leases", "due"):
                await conn.execute(f"DELETE FROM {table} WHERE segment = $1", name)
            status = await conn.execute("DELETE FROM segments WHERE name = $1", name)
        return _count(status) > 0

    async def finish_run(
        self,
        name: str,
        run_id: str,
        result: RunResult,
        error: str | None,
        skipped: SkippedIds,
        requests: int,
        quarantined: int,
        source_fingerprint: str | None = None,
        holder: str | None = None,
    ) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "UPDATE runs SET ended_at = now(), result = $1, error = $2, skipped = $3,"
                " requests = $4, quarantined = $5 WHERE run_id = $6",
                result,
                error,
                skipped.count,
                requests,
                quarantined,
                run_id,
            )
            try:
                await _fence(conn, name, holder)
            except LeaseLost:
                return  # the run's own record is closed; the segment is the new holder's
            await conn.execute(
                "UPDATE segments SET last_run_at = now(), last_result = $1, last_error = $2,"
                " skipped = $3, skipped_examples = $4, source_fingerprint = $6,"
                " last_success_at = CASE WHEN $1 = 'synced' THEN now() ELSE last_success_at END"
                " WHERE name = $5",
                result,
                error,
                skipped.count,
                json.dumps(skipped.examples),
                name,
                source_fingerprint if result == "synced" else None,
            )

    async def mark_orphans(self, configured: set[str]) -> list[SegmentState]:
        names = sorted(configured)
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "UPDATE segments SET orphaned_at = now() WHERE orphaned_at IS NULL"
                " AND segment_guid IS NOT NULL AND NOT (name = ANY($1::text[]))",
                names,
            )
            await conn.execute(
                "UPDATE segments SET orphaned_at = NULL WHERE orphaned_at IS NOT NULL"
                " AND (segment_guid IS NULL OR name = ANY($1::text[]))",
                names,
            )
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM segments WHERE orphaned_at IS NOT NULL ORDER BY name"
            )
        return [_state(row) for row in rows]

    async def history(self, name: str, limit: int) -> list[RunRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT run_id, segment, started_at, ended_at, result, added, removed,"
                " requests, skipped, quarantined, error FROM runs WHERE segment = $1"
                " ORDER BY started_at DESC LIMIT $2",
                name,
                limit,
            )
        return [RunRecord(*row) for row in rows]

    async def prune_history(self, before: datetime) -> int:
        async with self._conn() as conn, conn.transaction():
            await conn.execute("DELETE FROM heap_pages WHERE received_at < $1", before)
            status = await conn.execute(
                "DELETE FROM runs WHERE started_at < $1 AND result != 'running'", before
            )
        return _count(status)

    # -- snapshot and quarantine ---------------------------------------------------

    def snapshot(self, name: str, size: int) -> AsyncIterator[list[str]]:
        return self._pages("members", "segment", name, size)

    async def begin_batch(
        self, name: str, action: Action, ids: list[str], holder: str | None = None
    ) -> None:
        async with self._conn() as conn, conn.transaction():
            await _fence(conn, name, holder)
            await conn.execute(
                "INSERT INTO pending (segment, action, ids) VALUES ($1, $2, $3)"
                " ON CONFLICT (segment) DO UPDATE SET action = excluded.action,"
                " ids = excluded.ids",
                name,
                action,
                ids,
            )

    async def pending_batch(self, name: str) -> PendingBatch | None:
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT action, ids FROM pending WHERE segment = $1", name)
        return PendingBatch(row[0], list(row[1])) if row else None

    async def clear_pending(self, name: str, holder: str | None = None) -> None:
        async with self._conn() as conn, conn.transaction():
            await _fence(conn, name, holder)
            await conn.execute("DELETE FROM pending WHERE segment = $1", name)

    async def quarantine(
        self, name: str, action: Literal["add", "remove"], rejected: list[tuple[str, str]]
    ) -> None:
        async with self._conn() as conn:
            await conn.executemany(
                "INSERT INTO quarantine (segment, action, id, reason, since)"
                " VALUES ($1, $2, $3, $4, now()) ON CONFLICT (segment, action, id)"
                " DO UPDATE SET reason = excluded.reason, since = excluded.since",
                [(name, action, member, reason) for member, reason in rejected],
            )

    async def quarantined(self, name: str) -> Quarantined:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT action, id FROM quarantine WHERE segment = $1", name)
        return Quarantined(
            add=frozenset(row[1] for row in rows if row[0] == "add"),
            remove=frozenset(row[1] for row in rows if row[0] == "remove"),
        )

    async def release_quarantine(self, name: str, released: Quarantined) -> None:
        if not released.add and not released.remove:
            return
        async with self._conn() as conn, conn.transaction():
            for action, ids in (("add", released.add), ("remove", released.remove)):
                await conn.execute(
                    "DELETE FROM quarantine WHERE segment = $1 AND action = $2"
                    " AND id = ANY($3::text[])",
                    name,
                    action,
                    sorted(ids),
                )

    async def quarantine_examples(self, name: str, limit: int) -> list[tuple[str, str, str]]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT id, action, reason FROM quarantine WHERE segment = $1"
                " ORDER BY since DESC, id LIMIT $2",
                name,
                limit,
            )
        return [(row[0], row[1], row[2]) for row in rows]

    # -- leases ----------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        # The database's clock decides expiry, so replicas' clocks need not agree.
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "INSERT INTO leases (segment, holder, expires_at)"
                f" VALUES ($1, $2, {_NOW} + $3)"
                " ON CONFLICT (segment) DO UPDATE SET holder = excluded.holder,"
                " expires_at = excluded.expires_at"
                " WHERE leases.holder = excluded.holder"
                f" OR leases.expires_at < {_NOW}"
                " RETURNING holder",
                name,
                holder,
                ttl_s,
            )
        return row is not None

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"UPDATE leases SET expires_at = {_NOW} + $3"
                f" WHERE segment = $1 AND holder = $2 AND expires_at >= {_NOW}"
                " RETURNING holder",
                name,
                holder,
                ttl_s,
            )
        return row is not None

    async def lease_holder(self, name: str) -> str | None:
        async with self._conn() as conn:
            holder: str | None = await conn.fetchval(
                f"SELECT holder FROM leases WHERE segment = $1 AND expires_at >= {_NOW}",
                name,
            )
        return holder

    async def release_lease(
        self, name: str, holder: str, read_started: float | None = None
    ) -> bool:
        async with self._conn() as conn:
            # One statement: a due mark committed before it is seen and keeps the
            # lease; one committed after finds the lease free and takes it.
            status = await conn.execute(
                "DELETE FROM leases WHERE segment = $1 AND holder = $2 AND ($3::float8 IS NULL"
                " OR NOT EXISTS (SELECT 1 FROM due WHERE due.segment = $1 AND due_at >= $3))",
                name,
                holder,
                read_started,
            )
            if _count(status) or read_started is None:
                return True
            kept = await conn.fetchval(
                f"SELECT 1 FROM leases WHERE segment = $1 AND holder = $2 AND expires_at >= {_NOW}",
                name,
                holder,
            )
        return kept is None

    async def mark_due(self, name: str) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO due (segment, due_at) VALUES ($1, {_NOW})"
                " ON CONFLICT (segment) DO UPDATE SET due_at = excluded.due_at",
                name,
            )

    async def clock(self) -> float:
        async with self._conn() as conn:
            now: float = await conn.fetchval(f"SELECT {_NOW}::float8")
        return now
    # -- replicas ----------------------------------------------------------------------
    # The database's clock again: replicas on different hosts judge liveness alike.

    async def heartbeat(self, replica_id: str, mappings: list[str], live_s: float) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM replicas WHERE expires_at < extract(epoch FROM clock_timestamp())"
            )
            await conn.execute(
                "INSERT INTO replicas (replica_id, mappings, seen_at, expires_at)"
                " VALUES ($1, $2, extract(epoch FROM clock_timestamp()),"
                " extract(epoch FROM clock_timestamp()) + $3)"
                " ON CONFLICT (replica_id) DO UPDATE SET mappings = excluded.mappings,"
                " seen_at = excluded.seen_at, expires_at = excluded.expires_at",
                replica_id,
                sorted(mappings),
                live_s,
            )

    async def live_replicas(self) -> list[ReplicaPresence]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT replica_id, mappings,"
                " greatest(0, extract(epoch FROM clock_timestamp()) - seen_at)"
                " FROM replicas WHERE expires_at >= extract(epoch FROM clock_timestamp())"
                " ORDER BY replica_id"
            )
        return [ReplicaPresence(row[0], list(row[1]), float(row[2])) for row in rows]

    async def forget_replica(self, replica_id: str) -> None:
        async with self._conn() as conn:
            await conn.execute("DELETE FROM replicas WHERE replica_id = $1", replica_id)

    # -- Heap webhook pages ------------------------------------------------------------

    async def store_heap_page(self, page: HeapPage) -> PageReceipt:
        segment = page.heap_segment_id
        async with self._conn() as conn, conn.transaction():
            # The upsert locks the segment's row: pages of one segment arriving at
            # several replicas apply one after another, and exactly one of them
            # sees its task complete.
            mapping_name = await conn.fetchval(
                "INSERT INTO heap_segments (heap_segment_id, name, mapping_name, updated_at)"
                " VALUES ($1, $2, $2, now()) ON CONFLICT (heap_segment_id) DO UPDATE"
                " SET name = excluded.name, updated_at = excluded.updated_at"
                " RETURNING mapping_name",
                segment,
                page.segment_name,
            )
            inserted = _count(
                await conn.execute(
                    "INSERT INTO heap_pages (sync_task_id, page_number, heap_segment_id,"
                    " total_pages, received_at) VALUES ($1, $2, $3, $4, now())"
                    " ON CONFLICT DO NOTHING",
                    page.sync_task_id,
                    page.page_number,
                    segment,
                    page.total_pages,
                )
            )
            if not inserted:
                return PageReceipt(True, False, mapping_name)
            removed = _count(
                await conn.execute(
                    "DELETE FROM heap_members WHERE heap_segment_id = $1 AND id = ANY($2::text[])",
                    segment,
                    page.remove,
                )
            )
            added = _count(
                await conn.execute(
                    "INSERT INTO heap_members (heap_segment_id, id)"
                    " SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                    segment,
                    page.add,
                )
            )
            received = await conn.fetchval(
                "SELECT count(*) FROM heap_pages WHERE heap_segment_id = $1 AND sync_task_id = $2",
                segment,
                page.sync_task_id,
            )
            complete = received >= page.total_pages
            await conn.execute(
                "UPDATE heap_segments SET members = members + $1 - $2,"
                " complete_tasks = complete_tasks + $3 WHERE heap_segment_id = $4",
                added,
                removed,
                int(complete),
                segment,
            )
        return PageReceipt(False, complete, mapping_name)

    async def heap_segments(self) -> list[HeapSegment]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT heap_segment_id, name, mapping_name, members, complete_tasks"
                " FROM heap_segments ORDER BY heap_segment_id"
            )
        return [HeapSegment(*row) for row in rows]

    def heap_members(self, heap_segment_id: int, size: int) -> AsyncIterator[list[str]]:
        return self._pages("heap_members", "heap_segment_id", heap_segment_id, size)

    async def _pages(
        self, table: str, key: str, value: object, size: int
    ) -> AsyncIterator[list[str]]:
        """A table's ids for one key, in id order, ``size`` at a time (keyset paging:
        each page is its own short query, so no cursor holds a connection)."""
        after = ""
        while True:
            async with self._conn() as conn:
                rows = await conn.fetch(
                    f"SELECT id FROM {table} WHERE {key} = $1 AND id > $2 ORDER BY id LIMIT $3",
                    value,
                    after,
                    size,
                )
            if not rows:
                return
            chunk = [row[0] for row in rows]
            after = chunk[-1]
            yield chunk


class _Connection:
    """A pooled connection whose database errors become StateErrors."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record] | None = None

    async def __aenter__(self) -> asyncpg.pool.PoolConnectionProxy[asyncpg.Record]:
        try:
            self._conn = await self._store._pool.acquire(timeout=30)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StateError(f"{self._store._where}: {_reason(exc)}") from None
        return self._conn

    async def __aexit__(self, kind: type[BaseException] | None, exc: Any, _: Any) -> None:
        if self._conn is not None:
            await self._store._pool.release(self._conn)
        if isinstance(exc, asyncpg.UndefinedTableError):
            raise await self._store._recreate() from None
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
            raise StateError(f"{self._store._where}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
