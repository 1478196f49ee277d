"""``syncd.state.sqlite``: the snapshot of what WalkMe acknowledged, and the staged diff."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from syncd.ids import SkippedIds
from syncd.state import StateError, open_store
from syncd.state.sqlite import SqliteStage, SqliteStore

SYSTEM = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
OTHER_GUID = "11111111-2222-4333-8444-555555555555"


def url(path: Path) -> str:
    return "sqlite:///" + str(path)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await open_store(url(tmp_path / "s.db"))
    try:
        yield opened
    finally:
        await opened.close()


async def seed(
    store: SqliteStore, name: str, members: list[str], run_id: str | None = None
) -> None:
    """A segment created in WalkMe with ``members``, as a first run would leave it."""
    run_id = run_id or f"seed-{name}"
    await store.begin_run(name, run_id, SYSTEM, None)
    await store.record_batch(name, run_id, "create", members, GUID)


async def snapshot(store: SqliteStore, name: str) -> list[str]:
    """The snapshot, read through the public API: staging nothing makes all of it pending."""
    async with store.stage(name) as stage:
        return [member async for batch in stage.batches("remove", 1000) for member in batch]


async def collect(
    stage: SqliteStage, action: Literal["add", "remove"], size: int
) -> list[list[str]]:
    return [batch async for batch in stage.batches(action, size)]


# -- staging and the diff ------------------------------------------------------------


async def test_stage_size_counts_distinct(store: SqliteStore) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    async with store.stage("vip") as stage:
        await stage.add(["a", "b", "a"])
        await stage.add(["b", "c"])
        await stage.add([])
        assert await stage.size() == 3
        assert await stage.pending("add") == 3
        assert await stage.pending("remove") == 0


async def test_pending_against_snapshot(store: SqliteStore) -> None:
    await seed(store, "vip", ["a", "b", "c", "d"])
    async with store.stage("vip") as stage:
        await stage.add(["c", "d", "e", "f", "g"])
        assert await stage.pending("add") == 3
        assert await stage.pending("remove") == 2
        assert await stage.examples("add", 2) == ["e", "f"]
        assert await stage.examples("remove", 5) == ["a", "b"]
        assert await collect(stage, "add", 2) == [["e", "f"], ["g"]]
        assert await collect(stage, "remove", 10) == [["a", "b"]]


async def test_batches_cover_the_diff_in_order(store: SqliteStore) -> None:
    old = [f"old{i:03}" for i in range(50)] + [f"keep{i:03}" for i in range(30)]
    new = [f"keep{i:03}" for i in range(30)] + [f"new{i:03}" for i in range(47)]
    await seed(store, "vip", old)
    async with store.stage("vip") as stage:
        await stage.add(list(reversed(new)))
        adds = await collect(stage, "add", 10)
        removes = await collect(stage, "remove", 7)
    assert [len(b) for b in adds] == [10, 10, 10, 10, 7]
    assert [len(b) for b in removes] == [7] * 7 + [1]
    flat_adds = [m for b in adds for m in b]
    flat_removes = [m for b in removes for m in b]
    assert flat_adds == sorted(f"new{i:03}" for i in range(47))
    assert flat_removes == sorted(f"old{i:03}" for i in range(50))


async def test_segments_do_not_share_snapshots(store: SqliteStore) -> None:
    await seed(store, "a", ["x", "y"])
    await seed(store, "b", ["y", "z"])
    async with store.stage("a") as stage:
        await stage.add(["y", "z"])
        assert await collect(stage, "add", 10) == [["z"]]
        assert await collect(stage, "remove", 10) == [["x"]]


async def test_two_stages_at_once(store: SqliteStore) -> None:
    await seed(store, "a", [])
    await seed(store, "b", [])
    async with store.stage("a") as first, store.stage("b") as second:
        await first.add(["1", "2"])
        await second.add(["3"])
        assert await first.size() == 2
        assert await second.size() == 1


async def test_batches_read_lazily_after_record_batch(store: SqliteStore) -> None:
    """Recording each batch before the next is read still yields every id once."""
    old = [f"o{i:02}" for i in range(25)]
    new = [f"n{i:02}" for i in range(23)]
    await seed(store, "vip", old)
    await store.begin_run("vip", "r1", SYSTEM, None)
    async with store.stage("vip") as stage:
        await stage.add(new)
        seen_removes: list[str] = []
        async for batch in stage.batches("remove", 4):
            assert len(batch) <= 4
            seen_removes += batch
            await store.record_batch("vip", "r1", "remove", batch)
        seen_adds: list[str] = []
        async for batch in stage.batches("add", 5):
            assert len(batch) <= 5
            seen_adds += batch
            await store.record_batch("vip", "r1", "add", batch, GUID)
        assert await stage.pending("add") == 0
        assert await stage.pending("remove") == 0
    assert seen_removes == old
    assert seen_adds == new
    state = await store.get("vip")
    assert state is not None
    assert state.members == len(new)
    assert await snapshot(store, "vip") == new


# -- record_batch --------------------------------------------------------------------


async def test_record_create(store: SqliteStore) -> None:
    begun = await store.begin_run("vip", "r1", SYSTEM, "vip-ext")
    assert begun.segment_guid is None
    assert begun.members == 0
    assert begun.origin is None
    await store.record_batch("vip", "r1", "create", ["a", "b", "b"], GUID)
    state = await store.get("vip")
    assert state is not None
    assert state.segment_guid == GUID
    assert state.origin == "created"
    assert state.external_id == "vip-ext"
    assert state.system_guid == SYSTEM
    assert state.members == 2
    assert not state.needs_override
    assert await snapshot(store, "vip") == ["a", "b"]


async def test_record_create_empty(store: SqliteStore) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", [], GUID)
    state = await store.get("vip")
    assert state is not None
    assert state.segment_guid == GUID
    assert state.members == 0


async def test_record_add_and_remove_update_members(store: SqliteStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "add", ["c", "d", "a"])  # "a" already there
    state = await store.get("vip")
    assert state is not None
    assert state.members == 4
    await store.record_batch("vip", "r1", "remove", ["a", "zzz"])  # "zzz" never there
    state = await store.get("vip")
    assert state is not None
    assert state.members == 3
    assert state.segment_guid == GUID  # add/remove keep the GUID
    assert await snapshot(store, "vip") == ["b", "c", "d"]


async def test_record_override_replaces_snapshot(store: SqliteStore) -> None:
    await seed(store, "vip", ["a", "b", "c"])
    await store.adopt("vip", OTHER_GUID, "adopted")
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "override", ["x"], OTHER_GUID)
    state = await store.get("vip")
    assert state is not None
    assert state.members == 1
    assert not state.needs_override
    assert state.origin == "adopted"  # override keeps how the segment was found
    assert state.segment_guid == OTHER_GUID
    assert await snapshot(store, "vip") == ["x"]


async def test_record_override_empty_empties(store: SqliteStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await store.reset("vip")
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "override", [], GUID)
    state = await store.get("vip")
    assert state is not None
    assert state.members == 0
    assert not state.needs_override
    assert await snapshot(store, "vip") == []


# -- adopt, reset, forget_guid, finish_run -------------------------------------------


async def test_adopt_clears_snapshot_and_needs_override(store: SqliteStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await store.adopt("vip", OTHER_GUID, "adopted")
    state = await store.get("vip")
    assert state is not None
    assert state.segment_guid == OTHER_GUID
    assert state.origin == "adopted"
    assert state.needs_override
    assert state.members == 0
    assert await snapshot(store, "vip") == []


async def test_reset(store: SqliteStore) -> None:
    await seed(store, "vip", ["a", "b"])
    assert await store.reset("vip") is True
    state = await store.get("vip")
    assert state is not None
    assert state.members == 0
    assert state.needs_override
    assert state.segment_guid == GUID  # still the same WalkMe segment, rebuilt next run
    assert await snapshot(store, "vip") == []


async def test_reset_without_guid_does_not_need_override(store: SqliteStore) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    assert await store.reset("vip") is True
    state = await store.get("vip")
    assert state is not None
    assert not state.needs_override


async def test_reset_unknown(store: SqliteStore) -> None:
    assert await store.reset("nope") is False
    assert await store.get("nope") is None


async def test_forget_guid(store: SqliteStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await store.reset("vip")
    await store.record_batch("vip", "seed-vip", "override", ["a"], GUID)
    await store.forget_guid("vip")
    state = await store.get("vip")
    assert state is not None
    assert state.segment_guid is None
    assert state.origin is None
    assert not state.needs_override
    assert state.members == 0
    assert await snapshot(store, "vip") == []


async def test_finish_run(store: SqliteStore) -> None:
    await seed(store, "vip", ["a"], run_id="r1")
    skipped = SkippedIds()
    skipped.add("x" * 101, "too long")
    await store.finish_run("vip", "r1", "synced", None, skipped, 3, 0)
    state = await store.get("vip")
    assert state is not None
    assert state.last_result == "synced"
    assert state.last_error is None
    assert state.last_run_at is not None
    assert state.last_success_at is not None
    assert state.skipped == 1
    assert state.skipped_examples == skipped.examples
    first_success = state.last_success_at

    await store.begin_run("vip", "r2", SYSTEM, None)
    await store.finish_run("vip", "r2", "failed", "WalkMe answered 500", SkippedIds(), 1, 0)
    state = await store.get("vip")
    assert state is not None
    assert state.last_result == "failed"
    assert state.last_error == "WalkMe answered 500"
    assert state.last_success_at == first_success  # a failure keeps the last success
    assert state.skipped == 0
    assert state.skipped_examples == []


async def test_all_and_get(store: SqliteStore) -> None:
    await seed(store, "b", ["1"])
    await seed(store, "a", [])
    assert [s.name for s in await store.all()] == ["a", "b"]
    assert await store.get("c") is None
    await store.ping()


async def test_reopen_persists(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = await open_store(url(path))
    try:
        await seed(first, "vip", ["a", "b", "c"], run_id="r1")
        await first.finish_run("vip", "r1", "synced", None, SkippedIds(), 0, 0)
    finally:
        await first.close()
    second = await open_store(url(path))
    try:
        state = await second.get("vip")
        assert state is not None
        assert state.members == 3
        assert state.segment_guid == GUID
        assert state.last_result == "synced"
        assert await snapshot(second, "vip") == ["a", "b", "c"]
    finally:
        await second.close()


# -- bad files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [b"this is not a database, it is a note\n" * 200, bytes(range(256)) * 40],
)
async def test_corrupt_file_is_a_state_error(tmp_path: Path, junk: bytes) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(junk)
    with pytest.raises(StateError) as info:
        await open_store(url(path))
    message = str(info.value)
    assert str(path) in message
    assert "state" in message.lower()
    assert path.read_bytes() == junk  # never replaced by a fresh store


async def test_missing_directory_is_a_state_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StateError) as info:
        await open_store(url(missing / "s.db"))
    assert "does not exist" in str(info.value) or "directory" in str(info.value)
    assert not missing.exists()


async def test_newer_schema_is_a_state_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StateError, match="newer"):
        await open_store(url(path))
