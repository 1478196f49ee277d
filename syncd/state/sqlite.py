"""SQLite state store: the default, for one container with one volume.

All database work runs on one dedicated thread and each store call is one
function there, so a call is one transaction that no other coroutine can
interleave with. (aiosqlite offers a thread too, but not a way to run a whole
transaction as one unit.)
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

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
)

SCHEMA_VERSION = 4
_T = TypeVar("_T")
_HEADER = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
_REBUILD = (
    "stop syncd, restore the file from a backup or move it away, and start syncd again"
    " (with a new file, each segment is found again in WalkMe and rebuilt from its source)"
)

# Each entry migrates from the previous version; index + 1 is the version it makes.
_MIGRATIONS = [
    """
CREATE TABLE segments (
    name TEXT PRIMARY KEY,
    system_guid TEXT NOT NULL,
    segment_guid TEXT,
    external_id TEXT,
    origin TEXT,
    needs_override INTEGER NOT NULL DEFAULT 0,
    members INTEGER NOT NULL DEFAULT 0,
    last_run_at TEXT,
    last_result TEXT,
    last_error TEXT,
    last_success_at TEXT,
    skipped INTEGER NOT NULL DEFAULT 0,
    skipped_examples TEXT NOT NULL DEFAULT '[]',
    orphaned_at TEXT,
    source_fingerprint TEXT
);
CREATE TABLE members (
    segment TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (segment, id)
) WITHOUT ROWID;
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    segment TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    result TEXT NOT NULL,
    added INTEGER NOT NULL DEFAULT 0,
    removed INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX runs_by_segment ON runs (segment, started_at);
CREATE TABLE quarantine (
    segment TEXT NOT NULL,
    action TEXT NOT NULL,
    id TEXT NOT NULL,
    reason TEXT NOT NULL,
    since TEXT NOT NULL,
    PRIMARY KEY (segment, action, id)
) WITHOUT ROWID;
CREATE TABLE pending (
    segment TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    ids TEXT NOT NULL
);
CREATE TABLE leases (
    segment TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE heap_segments (
    heap_segment_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    mapping_name TEXT NOT NULL,
    members INTEGER NOT NULL DEFAULT 0,
    complete_tasks INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
);
CREATE TABLE heap_members (
    heap_segment_id INTEGER NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (heap_segment_id, id)
) WITHOUT ROWID;
CREATE TABLE heap_pages (
    sync_task_id TEXT NOT NULL,
    page_number INTEGER NOT NULL,
    heap_segment_id INTEGER NOT NULL,
    total_pages INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (sync_task_id, page_number)
);
""",
    # Leases move to the boot clock (see _lease_clock): a lease stamped by another
    # boot, or by the wall clock before this version (boot ''), counts as expired.
    # Due marks: a run asked for while another process held the lease.
    """
ALTER TABLE leases ADD COLUMN boot TEXT NOT NULL DEFAULT '';
CREATE TABLE due (
    segment TEXT PRIMARY KEY,
    boot TEXT NOT NULL,
    due_at REAL NOT NULL
);
""",
    # Replica heartbeats: which live replica maps which segments.
    """
CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY,
    mappings TEXT NOT NULL,
    seen_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
""",
    # Page receipts keyed by Heap segment too: two segments' tasks may share an id.
    """
CREATE TABLE heap_pages_by_segment (
    heap_segment_id INTEGER NOT NULL,
    sync_task_id TEXT NOT NULL,
    page_number INTEGER NOT NULL,
    total_pages INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (heap_segment_id, sync_task_id, page_number)
);
INSERT INTO heap_pages_by_segment
    SELECT heap_segment_id, sync_task_id, page_number, total_pages, received_at FROM heap_pages;
DROP TABLE heap_pages;
ALTER TABLE heap_pages_by_segment RENAME TO heap_pages;
""",
]
assert len(_MIGRATIONS) == SCHEMA_VERSION


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


_BOOT_ID = _boot_id()


def _lease_clock() -> tuple[str, float]:
    """(boot, seconds) for leases and due marks: the processes sharing a SQLite file
    run on one host, so its boot-time clock orders them all, and it never jumps
    (the wall clock does: NTP steps, an operator's date). Without Linux's boot id
    the wall clock it is, under the boot name "wall"."""
    if _BOOT_ID and hasattr(time, "CLOCK_BOOTTIME"):
        return _BOOT_ID, time.clock_gettime(time.CLOCK_BOOTTIME)
    return "wall", time.time()


def _fence(conn: sqlite3.Connection, name: str, holder: str | None) -> None:
    """Inside a transaction: raise LeaseLost unless ``holder`` (when given) holds the
    segment's unexpired lease (the transaction's write lock keeps it so until commit)."""
    if holder is None:
        return
    boot, now = _lease_clock()
    held = conn.execute(
        "SELECT 1 FROM leases WHERE segment = ? AND holder = ? AND boot = ? AND expires_at >= ?",
        (name, holder, boot, now),
    ).fetchone()
    if held is None:
        raise LeaseLost(name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL; another process creating the same new file may hold it a moment,
    and SQLite does not wait (busy_timeout) for a journal-mode change."""
    deadline = time.monotonic() + 10
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _forget_members(conn: sqlite3.Connection, name: str) -> None:
    """What syncd knows of the segment's members in WalkMe: the snapshot, the
    quarantine and the batch in flight."""
    for table in ("members", "quarantine", "pending"):
        conn.execute(f"DELETE FROM {table} WHERE segment = ?", (name,))


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db`` not."""
    return Path(url.removeprefix("sqlite:///"))


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-sqlite")
        self._db: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file opened

    @classmethod
    async def open(cls, url: str) -> SqliteStore:
        store = cls(sqlite_path(url))
        try:
            await store._call(store._connect)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    # -- plumbing ----------------------------------------------------------------

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except RuntimeError as exc:  # the executor was shut down
            raise StateError(f"state store {self.path} is closed") from exc
        except sqlite3.Error as exc:  # a read outside a transaction
            raise StateError(self._describe(exc)) from None

    def _describe(self, exc: sqlite3.Error) -> str:
        text = str(exc)
        if "malformed" in text or "not a database" in text:
            return f"state store {self.path} is damaged ({text}): {_REBUILD}"
        return f"state store {self.path}: {text}"

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError("state store is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StateError(self._describe(exc)) from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _connect(self) -> None:
        where = f"state store {self.path}"
        folder = self.path.parent
        if not folder.exists():
            raise StateError(f"{where}: directory {folder} does not exist")
        if not self.path.exists():
            try:  # os.access says yes to root: only a real write tells
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as exc:
                raise StateError(
                    f"{where}: directory {folder} is not writable ({exc.strerror})"
                ) from None
        conn = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            # WAL: readers (syncd status) never block the daemon; NORMAL sync is
            # durable across process crashes, which is what the snapshot needs.
            _set_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA temp_store = FILE")
            # 16 MiB page caches: big diffs stay fast, memory stays bounded.
            conn.execute("PRAGMA cache_size = -16384")
            conn.execute("PRAGMA temp.cache_size = -16384")
            self._migrate(conn, where)
            stat = os.stat(self.path)
            self._file_id = (stat.st_dev, stat.st_ino)
            self._db = conn
        except (sqlite3.DatabaseError, OSError, StateError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, StateError):
                raise
            if isinstance(exc, OSError):
                reason = str(exc.strerror)
            elif "not a database" in str(exc):
                reason = f"{exc} (is it a syncd state file?)"
            else:
                reason = str(exc)
            raise StateError(f"{where}: {reason}") from None

    @staticmethod
    def _migrate(conn: sqlite3.Connection, where: str) -> None:
        # The write lock first, then the version: two processes opening a new file
        # together must not both create the tables.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{where}: written by a newer syncd (schema {version}, this one knows"
                    f" {SCHEMA_VERSION}); upgrade syncd"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in filter(str.strip, _MIGRATIONS[number].split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    # -- segments ------------------------------------------------------------------

    def _row(self, row: sqlite3.Row | tuple[Any, ...]) -> SegmentState:
        (
            name,
            system_guid,
            segment_guid,
            external_id,
            origin,
            needs_override,
            members,
            last_run_at,
            last_result,
            last_error,
            last_success_at,
            skipped,
            examples,
            orphaned_at,
            source_fingerprint,
            quarantined,
        ) = row
        return SegmentState(
            name=name,
            system_guid=system_guid,
            segment_guid=segment_guid,
            external_id=external_id,
            origin=origin,
            needs_override=bool(needs_override),
            members=members,
            last_run_at=_time(last_run_at),
            last_result=last_result,
            last_error=last_error,
            last_success_at=_time(last_success_at),
            skipped=skipped,
            skipped_examples=json.loads(examples),
            orphaned_at=_time(orphaned_at),
            quarantined=quarantined,
            source_fingerprint=source_fingerprint,
        )

    _COLUMNS = (
        "name, system_guid, segment_guid, external_id, origin, needs_override, members,"
        " last_run_at, last_result, last_error, last_success_at, skipped, skipped_examples,"
        " orphaned_at, source_fingerprint,"
        " (SELECT count(*) FROM quarantine q WHERE q.segment = segments.name)"
    )

    async def get(self, name: str) -> SegmentState | None:
        def read() -> SegmentState | None:
            row = self._conn.execute(
                f"SELECT {self._COLUMNS} FROM segments WHERE name = ?", (name,)
            ).fetchone()
            return self._row(row) if row else None

        return await self._call(read)

    async def all(self) -> list[SegmentState]:
        def read() -> list[SegmentState]:
            rows = self._conn.execute(
                f"SELECT {self._COLUMNS} FROM segments ORDER BY name"
            ).fetchall()
            return [self._row(row) for row in rows]

        return await self._call(read)

    async def begin_run(
        self, name: str, run_id: str, system_guid: str, external_id: str | None
    ) -> SegmentState:
        def write() -> SegmentState:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO segments (name, system_guid, external_id) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET external_id = excluded.external_id",
                    (name, system_guid, external_id),
                )
                conn.execute(
                    "INSERT INTO runs (run_id, segment, started_at, result)"
                    " VALUES (?, ?, ?, 'running')",
                    (run_id, name, _now()),
                )
                row = conn.execute(
                    f"SELECT {self._COLUMNS} FROM segments WHERE name = ?", (name,)
                ).fetchone()
                # A run that dies from here on leaves WalkMe changed: until one
                # succeeds again, no fingerprint may vouch for the snapshot.
                conn.execute(
                    "UPDATE segments SET source_fingerprint = NULL WHERE name = ?", (name,)
                )
            return self._row(row)

        return await self._call(write)

    async def adopt(self, name: str, segment_guid: str, origin: Origin) -> None:
        def write() -> None:
            with self._transaction() as conn:
                _forget_members(conn, name)
                conn.execute(
                    "UPDATE segments SET segment_guid = ?, origin = ?, needs_override = 1,"
                    " members = 0 WHERE name = ?",
                    (segment_guid, origin, name),
                )

        await self._call(write)

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
        payload = json.dumps(ids)

        def write() -> None:
            with self._transaction() as conn:
                _fence(conn, name, holder)
                conn.execute("DELETE FROM pending WHERE segment = ?", (name,))
                if still_pending is not None and still_pending.ids:
                    conn.execute(
                        "INSERT INTO pending (segment, action, ids) VALUES (?, ?, ?)",
                        (name, still_pending.action, "\n".join(still_pending.ids)),
                    )
                if action == "remove":
                    cursor = conn.execute(
                        "DELETE FROM members WHERE segment = ? AND id IN"
                        " (SELECT value FROM json_each(?))",
                        (name, payload),
                    )
                    conn.execute(
                        "UPDATE segments SET members = members - ? WHERE name = ?",
                        (cursor.rowcount, name),
                    )
                else:
                    if action in ("create", "override"):
                        conn.execute("DELETE FROM members WHERE segment = ?", (name,))
                        conn.execute(
                            "UPDATE segments SET members = 0, needs_override = 0,"
                            " segment_guid = coalesce(?, segment_guid),"
                            " origin = coalesce(origin, 'created') WHERE name = ?",
                            (segment_guid, name),
                        )
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO members (segment, id)"
                        " SELECT ?, value FROM json_each(?)",
                        (name, payload),
                    )
                    conn.execute(
                        "UPDATE segments SET members = members + ? WHERE name = ?",
                        (cursor.rowcount, name),
                    )
                column = "removed" if action == "remove" else "added"
                conn.execute(
                    f"UPDATE runs SET requests = requests + 1, {column} = {column} + ?"
                    " WHERE run_id = ?",
                    (len(ids), run_id),
                )

        await self._call(write)

    async def forget_guid(self, name: str) -> None:
        def write() -> None:
            with self._transaction() as conn:
                _forget_members(conn, name)
                conn.execute(
                    "UPDATE segments SET segment_guid = NULL, origin = NULL,"
                    " needs_override = 0, members = 0 WHERE name = ?",
                    (name,),
                )

        await self._call(write)

    async def begin_batch(
        self, name: str, action: Action, ids: list[str], holder: str | None = None
    ) -> None:
        payload = "\n".join(ids)  # ids never hold a newline (id rules); cheaper than JSON

        def write() -> None:
            with self._transaction() as conn:
                _fence(conn, name, holder)
                conn.execute(
                    "INSERT OR REPLACE INTO pending (segment, action, ids) VALUES (?, ?, ?)",
                    (name, action, payload),
                )

        await self._call(write)

    async def pending_batch(self, name: str) -> PendingBatch | None:
        def read() -> PendingBatch | None:
            row = self._conn.execute(
                "SELECT action, ids FROM pending WHERE segment = ?", (name,)
            ).fetchone()
            if row is None:
                return None
            return PendingBatch(row[0], row[1].split("\n") if row[1] else [])

        return await self._call(read)

    async def clear_pending(self, name: str, holder: str | None = None) -> None:
        def write() -> None:
            with self._transaction() as conn:
                _fence(conn, name, holder)
                conn.execute("DELETE FROM pending WHERE segment = ?", (name,))

        await self._call(write)

    async def quarantine(
        self, name: str, action: Literal["add", "remove"], rejected: list[tuple[str, str]]
    ) -> None:
        def write() -> None:
            now = datetime.now(UTC).isoformat()  # microseconds: "newest first" must hold
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO quarantine (segment, action, id, reason, since)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(name, action, member, reason, now) for member, reason in rejected],
                )

        await self._call(write)

    async def quarantined(self, name: str) -> Quarantined:
        def read() -> Quarantined:
            rows = self._conn.execute(
                "SELECT action, id FROM quarantine WHERE segment = ?", (name,)
            ).fetchall()
            return Quarantined(
                add=frozenset(member for action, member in rows if action == "add"),
                remove=frozenset(member for action, member in rows if action == "remove"),
            )

        return await self._call(read)

    async def release_quarantine(self, name: str, released: Quarantined) -> None:
        if not released.add and not released.remove:
            return
        rows = [(name, "add", m) for m in released.add]
        rows += [(name, "remove", m) for m in released.remove]

        def write() -> None:
            with self._transaction() as conn:
                conn.executemany(
                    "DELETE FROM quarantine WHERE segment = ? AND action = ? AND id = ?", rows
                )

        await self._call(write)

    async def snapshot(self, name: str, size: int) -> AsyncIterator[list[str]]:
        def read(after: str) -> tuple[list[str], str | None]:
            # One newline-joined string per chunk: ids never hold a newline (id rules).
            ids, last = self._conn.execute(
                "SELECT group_concat(id, char(10)), max(id) FROM (SELECT id FROM members"
                " WHERE segment = ? AND id > ? ORDER BY id LIMIT ?)",
                (name, after, size),
            ).fetchone()
            return (ids.split("\n") if ids else []), last

        after: str | None = ""
        while after is not None:
            chunk, after = await self._call(read, after)
            if chunk:
                yield chunk

    async def quarantine_examples(self, name: str, limit: int) -> list[tuple[str, str, str]]:
        def read() -> list[tuple[str, str, str]]:
            rows = self._conn.execute(
                "SELECT id, action, reason FROM quarantine WHERE segment = ?"
                " ORDER BY since DESC, id LIMIT ?",
                (name, limit),
            )
            return [(row[0], row[1], row[2]) for row in rows]

        return await self._call(read)

    async def mark_orphans(self, configured: set[str]) -> list[SegmentState]:
        def write() -> list[SegmentState]:
            now = _now()
            with self._transaction() as conn:
                rows = conn.execute(
                    f"SELECT {self._COLUMNS} FROM segments ORDER BY name"
                ).fetchall()
                for row in rows:
                    name, guid, since = row[0], row[2], row[13]
                    orphan = name not in configured and guid is not None
                    if orphan and since is None:
                        conn.execute(
                            "UPDATE segments SET orphaned_at = ? WHERE name = ?", (now, name)
                        )
                    elif not orphan and since is not None:
                        conn.execute(
                            "UPDATE segments SET orphaned_at = NULL WHERE name = ?", (name,)
                        )
                rows = conn.execute(
                    f"SELECT {self._COLUMNS} FROM segments"
                    " WHERE orphaned_at IS NOT NULL ORDER BY name"
                ).fetchall()
            return [self._row(row) for row in rows]

        return await self._call(write)

    async def forget(self, name: str) -> bool:
        def write() -> bool:
            with self._transaction() as conn:
                conn.execute("DELETE FROM members WHERE segment = ?", (name,))
                conn.execute("DELETE FROM runs WHERE segment = ?", (name,))
                conn.execute("DELETE FROM quarantine WHERE segment = ?", (name,))
                conn.execute("DELETE FROM pending WHERE segment = ?", (name,))
                conn.execute("DELETE FROM leases WHERE segment = ?", (name,))
                conn.execute("DELETE FROM due WHERE segment = ?", (name,))
                return conn.execute("DELETE FROM segments WHERE name = ?", (name,)).rowcount > 0

        return await self._call(write)

    async def reset(self, name: str) -> bool:
        def write() -> bool:
            with self._transaction() as conn:
                _forget_members(conn, name)
                cursor = conn.execute(
                    "UPDATE segments SET members = 0,"
                    " needs_override = (segment_guid IS NOT NULL) WHERE name = ?",
                    (name,),
                )
                return cursor.rowcount > 0

        return await self._call(write)

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
        def write() -> None:
            now = _now()
            with self._transaction() as conn:
                conn.execute(
                    "UPDATE runs SET ended_at = ?, result = ?, error = ?, skipped = ?,"
                    " requests = ?, quarantined = ? WHERE run_id = ?",
                    (now, result, error, skipped.count, requests, quarantined, run_id),
                )
                try:
                    _fence(conn, name, holder)
                except LeaseLost:
                    return  # the run's own record is closed; the segment is the new holder's
                conn.execute(
                    "UPDATE segments SET last_run_at = ?, last_result = ?, last_error = ?,"
                    " skipped = ?, skipped_examples = ?, source_fingerprint = ?,"
                    " last_success_at = CASE WHEN ? = 'synced' THEN ? ELSE last_success_at END"
                    " WHERE name = ?",
                    (
                        now,
                        result,
                        error,
                        skipped.count,
                        json.dumps(skipped.examples),
                        source_fingerprint if result == "synced" else None,
                        result,
                        now,
                        name,
                    ),
                )

        await self._call(write)

    # -- Heap webhook pages ------------------------------------------------------------

    async def store_heap_page(self, page: HeapPage) -> PageReceipt:
        segment = page.heap_segment_id

        def write() -> PageReceipt:
            now = _now()
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO heap_segments (heap_segment_id, name, mapping_name, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (heap_segment_id) DO UPDATE"
                    " SET name = excluded.name, updated_at = excluded.updated_at",
                    (segment, page.segment_name, page.segment_name, now),
                )
                mapping_name = conn.execute(
                    "SELECT mapping_name FROM heap_segments WHERE heap_segment_id = ?", (segment,)
                ).fetchone()[0]
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO heap_pages (sync_task_id, page_number,"
                    " heap_segment_id, total_pages, received_at) VALUES (?, ?, ?, ?, ?)",
                    (page.sync_task_id, page.page_number, segment, page.total_pages, now),
                ).rowcount
                if not inserted:
                    return PageReceipt(True, False, mapping_name)
                removed = conn.executemany(
                    "DELETE FROM heap_members WHERE heap_segment_id = ? AND id = ?",
                    ((segment, member) for member in page.remove),
                ).rowcount
                added = conn.executemany(
                    "INSERT OR IGNORE INTO heap_members (heap_segment_id, id) VALUES (?, ?)",
                    ((segment, member) for member in page.add),
                ).rowcount
                received = conn.execute(
                    "SELECT count(*) FROM heap_pages"
                    " WHERE heap_segment_id = ? AND sync_task_id = ?",
                    (segment, page.sync_task_id),
                ).fetchone()[0]
                complete = received >= page.total_pages
                conn.execute(
                    "UPDATE heap_segments SET members = members + ? - ?,"
                    " complete_tasks = complete_tasks + ? WHERE heap_segment_id = ?",
                    (max(added, 0), max(removed, 0), int(complete), segment),
                )
            return PageReceipt(False, complete, mapping_name)

        return await self._call(write)

    async def heap_segments(self) -> list[HeapSegment]:
        def read() -> list[HeapSegment]:
            rows = self._conn.execute(
                "SELECT heap_segment_id, name, mapping_name, members, complete_tasks"
                " FROM heap_segments ORDER BY heap_segment_id"
            ).fetchall()
            return [HeapSegment(*row) for row in rows]

        return await self._call(read)

    async def heap_members(self, heap_segment_id: int, size: int) -> AsyncIterator[list[str]]:
        def read(after: str) -> list[str]:
            rows = self._conn.execute(
                "SELECT id FROM heap_members WHERE heap_segment_id = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (heap_segment_id, after, size),
            )
            return [row[0] for row in rows]

        after = ""
        while chunk := await self._call(read, after):
            yield chunk
            after = chunk[-1]

    async def history(self, name: str, limit: int) -> list[RunRecord]:
        def read() -> list[RunRecord]:
            rows = self._conn.execute(
                "SELECT run_id, segment, started_at, ended_at, result, added, removed,"
                " requests, skipped, quarantined, error FROM runs WHERE segment = ?"
                " ORDER BY started_at DESC, rowid DESC LIMIT ?",
                (name, limit),
            ).fetchall()
            return [RunRecord(r[0], r[1], _time(r[2]), _time(r[3]), *r[4:]) for r in rows]

        return await self._call(read)

    async def prune_history(self, before: datetime) -> int:
        cutoff = before.astimezone(UTC).isoformat(timespec="seconds")

        def write() -> int:
            with self._transaction() as conn:
                # Heap retries a page within hours; older page receipts only take room.
                conn.execute("DELETE FROM heap_pages WHERE received_at < ?", (cutoff,))
                return conn.execute(
                    "DELETE FROM runs WHERE started_at < ? AND result != 'running'", (cutoff,)
                ).rowcount

        return await self._call(write)

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        def write() -> bool:
            with self._transaction() as conn:
                boot, now = _lease_clock()  # read under the write lock: processes agree
                return (
                    conn.execute(
                        "INSERT INTO leases (segment, holder, expires_at, boot) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (segment) DO UPDATE SET holder = excluded.holder,"
                        " expires_at = excluded.expires_at, boot = excluded.boot"
                        " WHERE leases.holder = excluded.holder OR leases.boot != excluded.boot"
                        " OR leases.expires_at < ?",
                        (name, holder, now + ttl_s, boot, now),
                    ).rowcount
                    > 0
                )

        return await self._call(write)

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        def write() -> bool:
            with self._transaction() as conn:
                boot, now = _lease_clock()
                return (
                    conn.execute(
                        "UPDATE leases SET expires_at = ? WHERE segment = ? AND holder = ?"
                        " AND boot = ? AND expires_at >= ?",
                        (now + ttl_s, name, holder, boot, now),
                    ).rowcount
                    > 0
                )

        return await self._call(write)

    async def lease_holder(self, name: str) -> str | None:
        def read() -> str | None:
            boot, now = _lease_clock()
            row = self._conn.execute(
                "SELECT holder FROM leases WHERE segment = ? AND boot = ? AND expires_at >= ?",
                (name, boot, now),
            ).fetchone()
            return str(row[0]) if row else None

        return await self._call(read)

    async def release_lease(
        self, name: str, holder: str, read_started: float | None = None
    ) -> bool:
        def write() -> bool:
            with self._transaction() as conn:
                boot, now = _lease_clock()
                due = (
                    read_started is not None
                    and conn.execute(
                        "SELECT 1 FROM due WHERE segment = ? AND boot = ? AND due_at >= ?",
                        (name, boot, read_started),
                    ).fetchone()
                )
                if not due:
                    conn.execute(
                        "DELETE FROM leases WHERE segment = ? AND holder = ?", (name, holder)
                    )
                    return True
                kept = conn.execute(
                    "SELECT 1 FROM leases WHERE segment = ? AND holder = ? AND boot = ?"
                    " AND expires_at >= ?",
                    (name, holder, boot, now),
                ).fetchone()
                return kept is None

        return await self._call(write)

    async def mark_due(self, name: str) -> None:
        def write() -> None:
            with self._transaction() as conn:
                boot, now = _lease_clock()
                conn.execute(
                    "INSERT OR REPLACE INTO due (segment, boot, due_at) VALUES (?, ?, ?)",
                    (name, boot, now),
                )

        await self._call(write)

    async def clock(self) -> float:
        return _lease_clock()[1]
    # -- replicas ----------------------------------------------------------------------

    async def heartbeat(self, replica_id: str, mappings: list[str], live_s: float) -> None:
        def write() -> None:
            now = time.time()
            with self._transaction() as conn:
                conn.execute("DELETE FROM replicas WHERE expires_at < ?", (now,))
                conn.execute(
                    "INSERT INTO replicas (replica_id, mappings, seen_at, expires_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (replica_id) DO UPDATE SET"
                    " mappings = excluded.mappings, seen_at = excluded.seen_at,"
                    " expires_at = excluded.expires_at",
                    (replica_id, json.dumps(sorted(mappings)), now, now + live_s),
                )

        await self._call(write)

    async def live_replicas(self) -> list[ReplicaPresence]:
        def read() -> list[ReplicaPresence]:
            now = time.time()
            rows = self._conn.execute(
                "SELECT replica_id, mappings, seen_at FROM replicas WHERE expires_at >= ?"
                " ORDER BY replica_id",
                (now,),
            ).fetchall()
            return [
                ReplicaPresence(row[0], json.loads(row[1]), max(0.0, now - row[2])) for row in rows
            ]

        return await self._call(read)

    async def forget_replica(self, replica_id: str) -> None:
        def write() -> None:
            with self._transaction() as conn:
                conn.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

        await self._call(write)

    async def ping(self) -> None:
        def read() -> None:
            # The open connection goes on working on a deleted or overwritten file,
            # so the file itself is looked at: what syncd writes must survive a restart.
            try:
                stat = os.stat(self.path)
                with self.path.open("rb") as file:
                    header = file.read(len(_HEADER))
            except FileNotFoundError:
                raise StateError(
                    f"state store {self.path} was deleted while syncd ran; what syncd writes"
                    f" now is lost at exit: {_REBUILD}"
                ) from None
            except OSError as exc:
                raise StateError(f"state store {self.path}: {exc.strerror}") from None
            if (stat.st_dev, stat.st_ino) != self._file_id:
                raise StateError(
                    f"state store {self.path} was replaced by another file while syncd ran:"
                    " restart syncd to use the new file"
                )
            if header != _HEADER:
                raise StateError(f"state store {self.path} is damaged (not SQLite): {_REBUILD}")
            self._conn.execute("SELECT 1 FROM segments LIMIT 1").fetchall()

        await self._call(read)
