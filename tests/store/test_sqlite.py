"""What only the SQLite store does: the file it lives in, and its lease clock.

Each test gets a new state file of its own (``tmp_path``).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from syncd.state import StateError, StateStore, open_store
from syncd.state import sqlite as sqlite_store
from tests.store.conftest import SYSTEM
from tests.support.stores import execute_sql

# What every message about a damaged or vanished file ends with.
REBUILD = (
    "stop syncd, restore the file from a backup or move it away, and start syncd again"
    " (with a new file, each segment is found again in WalkMe and rebuilt from its source)"
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest_asyncio.fixture
async def store(path: Path) -> AsyncIterator[StateStore]:
    """A SQLite store on ``path`` holding a few segments, closed afterwards."""
    opened = await open_store(f"sqlite:///{path}")
    try:
        for number in range(20):
            await opened.begin_run(f"segment-{number}", f"run-{number}", SYSTEM, None)
        yield opened
    finally:
        await opened.close()


def _delete(path: Path) -> None:
    path.unlink()


def _replace(path: Path) -> None:
    other = path.with_name("other.db")
    shutil.copyfile(path, other)  # the same content, in another file
    other.replace(path)


def _overwrite(path: Path, start: int) -> None:
    """Junk over the file from byte ``start`` on."""
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.seek(start)
        file.write(b"\xa5" * (size - start))


def _overwrite_header(path: Path) -> None:
    _overwrite(path, 0)


def _make_a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    ("damage", "told"),
    [
        (
            _delete,
            " was deleted while syncd ran; what syncd writes now is lost at exit: " + REBUILD,
        ),
        (
            _replace,
            " was replaced by another file while syncd ran: restart syncd to use the new file",
        ),
        (_overwrite_header, " is damaged (not SQLite): " + REBUILD),
        (_make_a_directory, ": Is a directory"),
    ],
    ids=["deleted", "replaced", "overwritten", "a-directory"],
)
async def test_ping_says_what_happened_to_the_file_and_what_to_do(
    store: StateStore, path: Path, damage: Callable[[Path], None], told: str
) -> None:
    """The open connection would go on working on a ghost, so ``ping`` (what /readyz
    asks) looks at the file itself and says what became of it, naming it."""
    await store.ping()
    damage(path)
    with pytest.raises(StateError) as raised:
        await store.ping()
    assert str(raised.value) == f"state store {path}{told}"


@pytest.mark.parametrize(
    ("start", "says"),
    [(0, "file is not a database"), (4096, "database disk image is malformed")],
    ids=["header", "pages"],
)
async def test_a_file_damaged_under_the_store_fails_its_calls_saying_so(
    store: StateStore, path: Path, start: int, says: str
) -> None:
    """A state file damaged while syncd runs (its header, or the pages after it):
    reads and writes fail with a StateError that names the file, what SQLite found,
    and what to do."""
    await execute_sql(f"sqlite:///{path}", "PRAGMA wal_checkpoint(TRUNCATE)")  # all in the file
    _overwrite(path, start)
    expected = f"state store {path} is damaged ({says}): {REBUILD}"
    with pytest.raises(StateError) as read:
        await store.get("segment-3")
    with pytest.raises(StateError) as write:
        await store.begin_run("new", "run-new", SYSTEM, None)
    assert [str(read.value), str(write.value)] == [expected, expected]


async def test_without_a_boot_id_the_lease_clock_is_the_wall_clock(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off Linux (no kernel boot id) leases and due marks run on the wall clock."""
    monkeypatch.setattr(sqlite_store, "_BOOT_ID", "")
    monkeypatch.setattr(time, "time", lambda: 1234.5)
    assert await store.clock() == 1234.5


def _newer_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE kept (x)")
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
    finally:
        conn.close()


def _contents(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"segment,member\n" * 400)


@pytest.mark.parametrize(
    ("make", "told"),
    [
        (
            _newer_schema,
            ": written by a newer syncd (schema 99, this one knows"
            f" {sqlite_store.SCHEMA_VERSION}); upgrade syncd",
        ),
        (_not_sqlite, ": file is not a database (is it a syncd state file?)"),
        (Path.mkdir, ": unable to open database file"),
    ],
    ids=["newer-schema", "not-sqlite", "a-directory"],
)
async def test_a_file_syncd_cannot_use_is_refused_saying_why(
    path: Path, make: Callable[[Path], None], told: str
) -> None:
    """A state file written by a newer syncd, not a SQLite file, or not a file at all
    is refused with a StateError naming the file and why, and left as it was."""
    make(path)
    before = _contents(path)
    with pytest.raises(StateError) as raised:
        await open_store(f"sqlite:///{path}")
    assert str(raised.value) == f"state store {path}{told}"
    assert _contents(path) == before


async def test_a_store_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    """A state file whose directory does not exist is refused, naming both, and
    nothing is created."""
    path = tmp_path / "missing" / "state.db"
    with pytest.raises(StateError) as raised:
        await open_store(f"sqlite:///{path}")
    assert str(raised.value) == f"state store {path}: directory {path.parent} does not exist"
    assert not path.parent.exists()
