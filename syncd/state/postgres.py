"""PostgreSQL state store: the one several ``syncd run`` replicas share.

Same contract as the SQLite store. Ids travel as arrays (``unnest``/``ANY``), so
a 25,000-id batch is one statement. Replicas coordinate through leases (one run
per segment at a time) and row locks (Heap pages for one segment apply in turn).
The schema is created and migrated here, under an advisory lock so replicas
starting together do not race.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar, TypeVar

import asyncpg
import structlog

from syncd.state.base import StateError, StateRecreated
from syncd.state.schema import SCHEMA_VERSION as SCHEMA_VERSION
from syncd.state.schema import migrations
from syncd.state.sql import Dialect, Query, Result, Script, numbered
from syncd.state.store import StateStore
from syncd.urls import describe_url

log = structlog.get_logger("syncd.state")
_T = TypeVar("_T")

_MIGRATION_LOCK = 0x73796E6364  # "syncd": serialises schema changes across replicas

_NOW = "extract(epoch FROM clock_timestamp())"  # the lease clock: the database's

DIALECT = Dialect(
    name="postgresql",
    now="now()",
    now_precise="now()",
    wall_clock=_NOW,
    run_order="seq",
    text_order=' COLLATE "C"',  # code point order, whatever the database's collation
    in_ids="{column} = ANY(?::text[])",
    each_id="unnest(?::text[])",
    joined_ids="string_agg(id, E'\\n')",
    encode_ids=list,
    encode_pending=list,
    decode_pending=list,
    encode_names=list,
    decode_names=list,
    time_arg=lambda moment: moment,
    time_value=lambda moment: moment,
)
_MIGRATIONS = migrations(DIALECT)


def _count(status: str) -> int:
    """Rows affected, from a command tag such as ``INSERT 0 25000`` or ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore(StateStore):
    dialect: ClassVar[Dialect] = DIALECT

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

    # -- scripts ----------------------------------------------------------------------

    async def _write(self, script: Script[_T]) -> _T:
        async with self._conn() as conn, conn.transaction():
            return await _run(conn, script)

    async def _read(self, script: Script[_T]) -> _T:
        async with self._conn() as conn:
            return await _run(conn, script)

    async def _read_in_key_order(self, script: Script[_T]) -> _T:
        # Right after a bulk load the planner's statistics can say "a few rows" and
        # pick a bitmap scan that sorts all the rest of the segment for every page:
        # quadratic (measured: 150 ms a page instead of 17 at 1M members). The
        # primary key's order needs no sort; these settings last one transaction.
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off")
            return await _run(conn, script)

    def _lease_held(self, name: str, holder: str) -> Query:
        # The row lock keeps anyone from taking the lease over until the
        # transaction ends, so what it writes is written under that lease.
        return Query(
            f"SELECT 1 FROM leases WHERE segment = ? AND holder = ? AND expires_at >= {_NOW}"
            " FOR SHARE",
            (name, holder),
        )

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


async def _run(conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], script: Script[_T]) -> _T:
    """The script, one awaited statement at a time."""
    try:
        query = next(script)
        while True:
            sql = numbered(query.sql)
            if query.many:
                await conn.executemany(sql, query.args)
                result = Result([], 0)
            elif _returns_rows(sql):
                rows = await conn.fetch(sql, *query.args)
                result = Result(rows, len(rows))
            else:
                result = Result([], _count(await conn.execute(sql, *query.args)))
            query = script.send(result)
    except StopIteration as done:
        value: _T = done.value
        return value


@lru_cache(maxsize=256)
def _returns_rows(sql: str) -> bool:
    return sql.startswith("SELECT") or " RETURNING " in sql


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
