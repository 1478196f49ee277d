"""SQLite state store: the default, for one container with one volume.

All database work runs on one dedicated thread and each store call's script
(see sql.py) runs whole there, so a call is one transaction that no other
coroutine can interleave with. (aiosqlite offers a thread too, but not a way to run a whole
transaction as one unit.)
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from syncd.state.base import StateError
from syncd.state.schema import SCHEMA_VERSION as SCHEMA_VERSION
from syncd.state.schema import migrations
from syncd.state.sql import Dialect, Query, Result, Script
from syncd.state.store import StateStore

_T = TypeVar("_T")
_HEADER = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
_REBUILD = (
    "stop syncd, restore the file from a backup or move it away, and start syncd again"
    " (with a new file, each segment is found again in WalkMe and rebuilt from its source)"
)


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


DIALECT = Dialect(
    name="sqlite",
    # Functions of this store's connection (see SqliteStore._connect).
    now="syncd_now()",
    now_precise="syncd_now_precise()",
    wall_clock="syncd_wall_clock()",
    run_order="rowid",
    text_order="",  # BINARY: code point order already
    in_ids="{column} IN (SELECT value FROM json_each(?))",
    each_id="value FROM json_each(?) WHERE true",  # WHERE: ON CONFLICT follows
    joined_ids="group_concat(id, char(10))",
    encode_ids=json.dumps,
    # Ids never hold a newline (id rules): one joined string is cheaper than JSON.
    encode_pending="\n".join,
    decode_pending=lambda ids: ids.split("\n") if ids else [],
    encode_names=json.dumps,
    decode_names=json.loads,
    time_arg=lambda moment: moment.astimezone(UTC).isoformat(timespec="seconds"),
    time_value=_time,
)
_MIGRATIONS = migrations(DIALECT)


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


def _refuse_newer(conn: sqlite3.Connection, where: str) -> int:
    """The file's schema version, unless a newer syncd wrote it."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StateError(
            f"{where}: written by a newer syncd (schema {version}, this one knows"
            f" {SCHEMA_VERSION}); upgrade syncd"
        )
    return version


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db`` not."""
    return Path(url.removeprefix("sqlite:///"))


class SqliteStore(StateStore):
    dialect: ClassVar[Dialect] = DIALECT

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-sqlite")
        self._db: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file opened
        # When the current transaction began: its statements' time, as PostgreSQL's now().
        self._began = datetime.now(UTC)

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
            self._began = datetime.now(UTC)  # under the write lock: in commit order
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

    async def _write(self, script: Script[_T]) -> _T:
        return await self._call(self._run_in_transaction, script)

    async def _read(self, script: Script[_T]) -> _T:
        return await self._call(lambda: self._run(self._conn, script))

    def _run_in_transaction(self, script: Script[_T]) -> _T:
        with self._transaction() as conn:
            return self._run(conn, script)

    @staticmethod
    def _run(conn: sqlite3.Connection, script: Script[_T]) -> _T:
        """The whole script, here on the database thread."""
        try:
            query = next(script)
            while True:
                run = conn.executemany if query.many else conn.execute
                cursor = run(query.sql, query.args)
                rows = cursor.fetchall()
                count = cursor.rowcount if cursor.rowcount >= 0 else len(rows)
                query = script.send(Result(rows, count))
        except StopIteration as done:
            result: _T = done.value
            return result

    def _lease_held(self, name: str, holder: str) -> Query:
        # Inside the transaction: its write lock keeps the lease so until commit.
        boot, now = _lease_clock()
        return Query(
            "SELECT 1 FROM leases WHERE segment = ? AND holder = ? AND boot = ?"
            " AND expires_at >= ?",
            (name, holder, boot, now),
        )

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
            conn.row_factory = sqlite3.Row
            conn.create_function("syncd_now", 0, lambda: self._began.isoformat(timespec="seconds"))
            conn.create_function("syncd_now_precise", 0, lambda: self._began.isoformat())
            conn.create_function("syncd_wall_clock", 0, lambda: time.time())
            conn.execute("PRAGMA busy_timeout = 10000")
            # Before anything is written: a file refused is left exactly as it was.
            _refuse_newer(conn, where)
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
            version = _refuse_newer(conn, where)
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

    # -- what only SQLite does: the snapshot read, leases ----------------------------

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
