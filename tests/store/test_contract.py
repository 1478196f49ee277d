"""The StateStore contract, one suite run against every store (SQLite and PostgreSQL).

Everything is read back through the public API only, so the same assertions
hold for both; what one store does differently from the other is a bug in one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pytest

from syncd.diff import Quarantined
from syncd.ids import IdText, SkippedIds
from syncd.state import SegmentState, StateError, StateStore, open_store
from syncd.state.base import (
    Delivered,
    HeapPage,
    HeapSegment,
    LeaseLost,
    NoticeState,
    PendingBatch,
    RunResult,
)
from tests.store.conftest import GUID, OTHER_GUID, SYSTEM
from tests.support.postgres import drop_database
from tests.support.stores import execute_sql, opened_together

# Ids and names that trip up quoting, CSV, LIKE/format strings, JSON and collations.
TRICKY_IDS = [
    "plain",
    "é-accent",
    "日本語ユーザー",
    "emoji🎉user",
    "Ωmega",
    'double"quote',
    "single'quote",
    "it''s",
    "comma,separated,id",
    "100%",
    "%s",
    "%%d",
    "50% off, 'quoted' \"both\"",
    "back\\slash",
    "semi;colon --",
    "[json]{obj}",
    "tab\there",
    "Z-upper",
    "a-lower",
    "_underscore",
    "x" * 100,
]
TRICKY_NAME = "Seg 'quoted', \"double\" 100% é 日本"


async def collect(chunks: AsyncIterator[IdText]) -> list[list[str]]:
    """Each page of ids, as a list (none empty: an empty page is a bug)."""
    pages = [chunk async for chunk in chunks]
    assert all(pages)
    return [page.ids() for page in pages]


async def members(store: StateStore, name: str) -> list[str]:
    """The snapshot as a flat list (duplicates kept, so they would show)."""
    return [member for chunk in await collect(store.snapshot(name, 1000)) for member in chunk]


async def heap_ids(store: StateStore, heap_segment_id: int) -> list[str]:
    chunks = await collect(store.heap_members(heap_segment_id, 1000))
    return [member for chunk in chunks for member in chunk]


async def state(store: StateStore, name: str) -> SegmentState:
    found = await store.get(name)
    assert found is not None, f"segment {name!r} is not in the store"
    return found


async def seed(
    store: StateStore, name: str, ids: list[str], run_id: str | None = None
) -> SegmentState:
    """A segment created in WalkMe with ``ids``, as a first run leaves it."""
    run_id = run_id or f"seed-{name}"
    await store.begin_run(name, run_id, SYSTEM, None)
    await store.record_batch(name, run_id, "create", ids, GUID)
    return await state(store, name)


def page(
    task: str,
    number: int,
    total: int,
    add: list[str] | None = None,
    remove: list[str] | None = None,
    *,
    segment: int = 42,
    name: str = "Heap users",
) -> HeapPage:
    return HeapPage(
        heap_segment_id=segment,
        segment_name=name,
        sync_task_id=task,
        page_number=number,
        total_pages=total,
        add=add or [],
        remove=remove or [],
    )


async def heap_segment(store: StateStore, heap_segment_id: int) -> HeapSegment:
    found = {s.heap_segment_id: s for s in await store.heap_segments()}
    assert heap_segment_id in found, f"heap segment {heap_segment_id} unknown"
    return found[heap_segment_id]


# -- begin_run, get, all ---------------------------------------------------------------


async def test_begin_run_creates_the_segment(store: StateStore) -> None:
    assert await store.get("vip") is None
    begun = await store.begin_run("vip", "r1", SYSTEM, "ext-1")
    assert begun == SegmentState(
        name="vip",
        system_guid=SYSTEM,
        segment_guid=None,
        external_id="ext-1",
        origin=None,
        needs_override=False,
        members=0,
    )
    assert await store.get("vip") == begun
    [run] = await store.history("vip", 10)
    assert (run.run_id, run.segment, run.result, run.ended_at) == ("r1", "vip", "running", None)
    assert run.started_at is not None
    assert abs(datetime.now(UTC) - run.started_at) < timedelta(minutes=1)


async def test_begin_run_updates_an_existing_segment(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b"])
    begun = await store.begin_run("vip", "r2", SYSTEM, "ext-new")
    assert begun.external_id == "ext-new"
    # The snapshot and the WalkMe side stay as they were.
    assert (begun.segment_guid, begun.origin, begun.members) == (GUID, "created", 2)
    assert begun == await store.get("vip")
    assert await members(store, "vip") == ["a", "b"]
    assert [run.run_id for run in await store.history("vip", 10)] == ["r2", "seed-vip"]


async def test_get_and_all(store: StateStore) -> None:
    assert await store.all() == []
    assert await store.get("nobody") is None
    for name in ["zeta", "alpha", "mid"]:
        await store.begin_run(name, f"run-{name}", SYSTEM, None)
    everything = await store.all()
    assert [s.name for s in everything] == ["alpha", "mid", "zeta"]
    for one in everything:
        assert await store.get(one.name) == one
    assert await store.get("nobody") is None


# -- record_batch ----------------------------------------------------------------------


async def test_record_batch_create_sets_guid_and_origin(store: StateStore) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", ["c", "a", "b"], GUID)
    now = await state(store, "vip")
    assert (now.segment_guid, now.origin, now.needs_override, now.members) == (
        GUID,
        "created",
        False,
        3,
    )
    assert sorted(await members(store, "vip")) == ["a", "b", "c"]
    [run] = await store.history("vip", 1)
    assert (run.added, run.removed, run.requests) == (3, 0, 1)


async def test_record_batch_create_without_ids(store: StateStore) -> None:
    """The engine creates a segment with an empty first batch when nothing is to add."""
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", [], GUID)
    now = await state(store, "vip")
    assert (now.segment_guid, now.origin, now.members) == (GUID, "created", 0)
    assert await members(store, "vip") == []


async def test_record_batch_add_and_remove_keep_the_count(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b", "c"])
    await store.begin_run("vip", "r2", SYSTEM, None)
    # Already there, duplicated within the batch, and new: only the new ones count.
    await store.record_batch("vip", "r2", "add", ["c", "d", "d", "e"])
    assert (await state(store, "vip")).members == 5
    # Absent and duplicated ids remove nothing extra.
    await store.record_batch("vip", "r2", "remove", ["a", "a", "zzz"])
    now = await state(store, "vip")
    assert now.members == 4
    assert sorted(await members(store, "vip")) == ["b", "c", "d", "e"]
    # An add without a GUID keeps the one the segment has.
    assert (now.segment_guid, now.origin) == (GUID, "created")
    await store.record_batch("vip", "r2", "remove", ["b", "c", "d", "e"])
    assert (await state(store, "vip")).members == 0
    assert await members(store, "vip") == []
    run = (await store.history("vip", 1))[0]
    assert (run.run_id, run.added, run.removed, run.requests) == ("r2", 4, 7, 3)


async def test_record_batch_override_replaces_the_snapshot(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b", "c"])
    await store.adopt("vip", OTHER_GUID, "adopted")
    await store.begin_run("vip", "r2", SYSTEM, None)
    await store.record_batch("vip", "r2", "override", ["c", "x", "y"], OTHER_GUID)
    now = await state(store, "vip")
    assert (now.segment_guid, now.origin, now.needs_override, now.members) == (
        OTHER_GUID,
        "adopted",
        False,
        3,
    )
    assert sorted(await members(store, "vip")) == ["c", "x", "y"]
    await store.record_batch("vip", "r2", "add", ["z"])
    assert (await state(store, "vip")).members == 4


async def test_record_batch_override_on_a_reset_segment(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b"])
    assert await store.reset("vip")
    await store.begin_run("vip", "r2", SYSTEM, None)
    await store.record_batch("vip", "r2", "override", ["b", "q"], None)
    now = await state(store, "vip")
    assert (now.segment_guid, now.needs_override, now.members) == (GUID, False, 2)
    assert sorted(await members(store, "vip")) == ["b", "q"]


async def test_segments_do_not_share_members(store: StateStore) -> None:
    await seed(store, "one", ["a", "b", "shared"])
    await seed(store, "two", ["shared", "z"])
    await store.begin_run("one", "r2", SYSTEM, None)
    await store.record_batch("one", "r2", "remove", ["shared", "z"])
    assert sorted(await members(store, "one")) == ["a", "b"]
    assert sorted(await members(store, "two")) == ["shared", "z"]
    assert (await state(store, "one")).members == 2
    assert (await state(store, "two")).members == 2


# -- snapshot ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 1000])
async def test_snapshot_chunks(store: StateStore, size: int) -> None:
    ids = [f"id-{n:03d}" for n in range(37)] + TRICKY_IDS
    await seed(store, "vip", ids)
    chunks = await collect(store.snapshot("vip", size))
    flat = [member for chunk in chunks for member in chunk]
    assert sorted(flat) == sorted(ids)  # each exactly once
    assert all(0 < len(chunk) <= size for chunk in chunks)
    assert len(chunks) == math.ceil(len(ids) / size)


async def test_snapshot_of_unknown_or_empty_segment(store: StateStore) -> None:
    assert await collect(store.snapshot("nobody", 10)) == []
    await store.begin_run("vip", "r1", SYSTEM, None)
    assert await collect(store.snapshot("vip", 10)) == []


async def test_delivered_names_the_run_that_first_delivered_each_member(
    store: StateStore,
) -> None:
    await seed(store, "vip", ["a", "b"], run_id="r1")
    await store.begin_run("vip", "r2", SYSTEM, None)
    await store.record_batch("vip", "r2", "add", ["b", "c"])  # b: already delivered by r1
    [second, first] = await store.history("vip", 10)
    assert first.started_at is not None
    assert await store.delivered("vip", "a") == Delivered("r1", first.started_at)
    assert await store.delivered("vip", "b") == Delivered("r1", first.started_at)
    assert await store.delivered("vip", "c") == Delivered("r2", second.started_at)
    assert await store.delivered("vip", "zzz") is None
    assert await store.delivered("nobody", "a") is None
    await store.record_batch("vip", "r2", "remove", ["a"])
    assert await store.delivered("vip", "a") is None
    # An override delivers every id again: the rebuild is the run they date from.
    await store.begin_run("vip", "r3", SYSTEM, None)
    await store.record_batch("vip", "r3", "override", ["b"])
    [third, *_] = await store.history("vip", 10)
    assert await store.delivered("vip", "b") == Delivered("r3", third.started_at)
    # The run's record pruned: the run id stays, its time is gone.
    await store.finish_run("vip", "r1", "synced", None, SkippedIds(), 1, 0)
    await store.finish_run("vip", "r2", "synced", None, SkippedIds(), 1, 0)
    await store.finish_run("vip", "r3", "synced", None, SkippedIds(), 1, 0)
    await store.prune_history(datetime.now(UTC) + timedelta(minutes=5))
    assert await store.delivered("vip", "b") == Delivered("r3", None)


# -- adopt, forget_guid, reset, forget -----------------------------------------------------


async def test_adopt_clears_snapshot_and_quarantine(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await store.quarantine("vip", "add", [("bad", "400 nope")])
    await store.adopt("vip", OTHER_GUID, "adopted")
    now = await state(store, "vip")
    assert (now.segment_guid, now.origin, now.needs_override, now.members, now.quarantined) == (
        OTHER_GUID,
        "adopted",
        True,
        0,
        0,
    )
    assert await members(store, "vip") == []
    assert await store.quarantined("vip") == Quarantined()


async def test_forget_guid(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await store.quarantine("vip", "remove", [("bad", "400 nope")])
    await store.forget_guid("vip")
    now = await state(store, "vip")
    assert (now.segment_guid, now.origin, now.needs_override, now.members, now.quarantined) == (
        None,
        None,
        False,
        0,
        0,
    )
    assert await members(store, "vip") == []
    assert await store.quarantined("vip") == Quarantined()
    # The next run creates a new WalkMe segment.
    await store.begin_run("vip", "r2", SYSTEM, None)
    await store.record_batch("vip", "r2", "create", ["c"], OTHER_GUID)
    now = await state(store, "vip")
    assert (now.segment_guid, now.origin, now.members) == (OTHER_GUID, "created", 1)


async def test_reset(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await store.quarantine("vip", "add", [("bad", "400 nope")])
    assert await store.reset("vip") is True
    now = await state(store, "vip")
    assert (now.segment_guid, now.needs_override, now.members, now.quarantined) == (
        GUID,
        True,
        0,
        0,
    )
    assert await members(store, "vip") == []
    # Without a WalkMe segment there is nothing to override: the next run creates.
    await store.begin_run("new", "r1", SYSTEM, None)
    assert await store.reset("new") is True
    assert (await state(store, "new")).needs_override is False
    assert await store.reset("nobody") is False
    assert await store.get("nobody") is None


async def test_forget(store: StateStore) -> None:
    await seed(store, "vip", ["a", "b"])
    await seed(store, "other", ["a", "c"])
    await store.quarantine("vip", "add", [("bad", "400 nope")])
    await store.finish_run("vip", "seed-vip", "synced", None, SkippedIds(), 1, 1)
    assert await store.claim_notice("vip", NoticeState(), NoticeState("failing", 2))
    assert await store.claim_notice("other", NoticeState(), NoticeState("held"))
    assert await store.forget("vip") is True
    assert await store.get("vip") is None
    assert await store.notice_state("vip") == NoticeState()
    assert (await store.notice_state("other")).standing == "held"
    assert await store.history("vip", 10) == []
    assert await members(store, "vip") == []
    assert await store.quarantined("vip") == Quarantined()
    assert await store.quarantine_examples("vip", 5) == []
    assert [s.name for s in await store.all()] == ["other"]
    assert sorted(await members(store, "other")) == ["a", "c"]
    assert await store.forget("vip") is False
    # A segment of that name starts from nothing.
    begun = await store.begin_run("vip", "r9", SYSTEM, None)
    assert (begun.segment_guid, begun.members, begun.quarantined) == (None, 0, 0)


# -- what a person was last told ----------------------------------------------------------


async def test_a_segment_never_told_about_is_ok_without_failures(store: StateStore) -> None:
    assert await store.notice_state("vip") == NoticeState("ok", 0, 0)


async def test_each_claim_writes_the_state_and_counts_a_version(store: StateStore) -> None:
    first = NoticeState("ok", 1)
    assert await store.claim_notice("vip", NoticeState(), first) is True
    assert await store.notice_state("vip") == NoticeState("ok", 1, 1)
    assert await store.claim_notice("vip", NoticeState("ok", 1, 1), NoticeState("failing", 2))
    assert await store.notice_state("vip") == NoticeState("failing", 2, 2)
    assert await store.notice_state("other") == NoticeState()  # per segment


async def test_a_claim_on_a_state_that_moved_on_writes_nothing(store: StateStore) -> None:
    assert await store.claim_notice("vip", NoticeState(), NoticeState("failing", 2))
    # A writer that read before that write: no row, or the row as it was.
    assert await store.claim_notice("vip", NoticeState(), NoticeState("held")) is False
    assert await store.claim_notice("vip", NoticeState("failing", 2, 1), NoticeState("ok"))
    assert await store.claim_notice("vip", NoticeState("failing", 2, 1), NoticeState()) is False
    assert await store.notice_state("vip") == NoticeState("ok", 0, 2)


async def test_two_replicas_claiming_the_same_change_only_one_wins(store_url: str) -> None:
    async with opened_together(store_url) as (first, second):
        for seen in (NoticeState(), NoticeState("ok", 1, 1), NoticeState("failing", 2, 2)):
            new = NoticeState("failing" if seen.standing == "ok" else "ok", seen.failures + 1)
            wins = await asyncio.gather(
                first.claim_notice("vip", seen, new), second.claim_notice("vip", seen, new)
            )
            assert sorted(wins) == [False, True], seen
            assert await second.notice_state("vip") == NoticeState(
                new.standing, new.failures, seen.version + 1
            )


async def test_a_claim_needs_the_holders_unexpired_lease(store: StateStore) -> None:
    assert await store.acquire_lease("vip", "replica-a", 30) is True
    with pytest.raises(LeaseLost, match="segment 'vip': this run no longer holds its lease"):
        await store.claim_notice("vip", NoticeState(), NoticeState("failing", 2), "replica-b")
    assert await store.notice_state("vip") == NoticeState()
    assert await store.claim_notice("vip", NoticeState(), NoticeState("held"), "replica-a")


# -- finish_run and history ---------------------------------------------------------------


async def test_finish_run_and_history(store: StateStore) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", ["a", "b"], GUID)
    skipped = SkippedIds()
    skipped.add("x" * 120, "too long")
    skipped.add("bad\x01", "contains a control character")
    await store.finish_run("vip", "r1", "synced", None, skipped, 4, 1)
    first = await state(store, "vip")
    assert (first.last_result, first.last_error, first.skipped) == ("synced", None, 2)
    assert first.skipped_examples == skipped.examples
    assert first.last_run_at is not None
    assert first.last_success_at is not None
    assert abs(datetime.now(UTC) - first.last_success_at) < timedelta(minutes=1)
    [run] = await store.history("vip", 10)
    assert (run.run_id, run.segment, run.result, run.error) == ("r1", "vip", "synced", None)
    assert (run.added, run.removed, run.requests, run.skipped, run.quarantined) == (2, 0, 4, 2, 1)
    assert run.started_at is not None
    assert run.ended_at is not None
    assert run.ended_at >= run.started_at

    await store.begin_run("vip", "r2", SYSTEM, None)
    await store.finish_run("vip", "r2", "failed", "WalkMe said 'no' (100%)", SkippedIds(), 2, 0)
    second = await state(store, "vip")
    assert (second.last_result, second.last_error, second.skipped) == (
        "failed",
        "WalkMe said 'no' (100%)",
        0,
    )
    assert second.skipped_examples == []
    assert second.last_success_at == first.last_success_at  # only a synced run moves it
    assert second.last_run_at is not None
    assert second.last_run_at >= first.last_run_at
    newest, oldest = await store.history("vip", 10)
    assert (newest.run_id, newest.result, newest.error) == (
        "r2",
        "failed",
        "WalkMe said 'no' (100%)",
    )
    assert oldest.run_id == "r1"
    assert [r.run_id for r in await store.history("vip", 1)] == ["r2"]
    assert await store.history("other", 10) == []


async def test_source_fingerprint_is_kept_only_by_a_synced_run(store: StateStore) -> None:
    fingerprint = "sha256:0f1e'2d,3c%4b"
    begun = await store.begin_run("vip", "r1", SYSTEM, None)
    assert begun.source_fingerprint is None
    await store.finish_run("vip", "r1", "synced", None, SkippedIds(), 1, 0, fingerprint)
    assert (await state(store, "vip")).source_fingerprint == fingerprint
    # A new run starts from it (that is how an unchanged source is recognised).
    assert (await store.begin_run("vip", "r2", SYSTEM, None)).source_fingerprint == fingerprint
    await store.finish_run("vip", "r2", "held", "guard", SkippedIds(), 0, 0, fingerprint)
    assert (await state(store, "vip")).source_fingerprint is None
    await store.begin_run("vip", "r3", SYSTEM, None)
    await store.finish_run("vip", "r3", "synced", None, SkippedIds(), 0, 0, "sha256:new")
    assert (await state(store, "vip")).source_fingerprint == "sha256:new"
    await store.begin_run("vip", "r4", SYSTEM, None)
    await store.finish_run("vip", "r4", "failed", "boom", SkippedIds(), 0, 0, "sha256:new")
    assert (await state(store, "vip")).source_fingerprint is None
    await store.begin_run("vip", "r5", SYSTEM, None)
    await store.finish_run("vip", "r5", "synced", None, SkippedIds(), 0, 0)  # no fingerprint
    assert (await state(store, "vip")).source_fingerprint is None


async def test_source_digest_is_kept_only_by_a_synced_run_and_cleared_by_a_new_one(
    store: StateStore,
) -> None:
    """The digest vouches for the snapshot like the fingerprint: a run that begins
    clears it (a crash leaves none), only a synced run stores one."""
    digest = "set1:2.1.0:1:2:3:4:5"
    finish = store.finish_run
    await store.begin_run("vip", "r1", SYSTEM, None)
    await finish("vip", "r1", "synced", None, SkippedIds(), 1, 0, source_digest=digest)
    assert (await state(store, "vip")).source_digest == digest
    assert (await store.begin_run("vip", "r2", SYSTEM, None)).source_digest == digest
    assert (await state(store, "vip")).source_digest is None  # until r2 succeeds
    await finish("vip", "r2", "held", "guard", SkippedIds(), 0, 0, source_digest=digest)
    assert (await state(store, "vip")).source_digest is None
    await store.begin_run("vip", "r3", SYSTEM, None)
    await finish("vip", "r3", "failed", "boom", SkippedIds(), 0, 0, source_digest=digest)
    assert (await state(store, "vip")).source_digest is None
    assert digest not in repr(await state(store, "vip"))


async def test_the_transform_is_recorded_by_a_synced_run_the_collapsed_count_by_any(
    store: StateStore,
) -> None:
    """What the next run compares its transform with: the steps of the last synced run,
    kept through held and failed runs (their snapshot still follows the old steps)."""
    steps = '["lower", "regex:(\\\\d+)\'%"]'
    assert (await store.begin_run("vip", "r1", SYSTEM, None)).id_transform is None
    done = SkippedIds()
    await store.finish_run("vip", "r1", "synced", None, done, 1, 0, collapsed=3, id_transform=steps)
    first = await state(store, "vip")
    assert (first.id_transform, first.collapsed) == (steps, 3)
    failures: list[tuple[str, RunResult]] = [("r2", "held"), ("r3", "failed")]
    for run_id, result in failures:
        await store.begin_run("vip", run_id, SYSTEM, None)
        await store.finish_run(
            "vip", run_id, result, "why", done, 0, 0, collapsed=5, id_transform='["upper"]'
        )
        after = await state(store, "vip")
        assert (after.id_transform, after.collapsed) == (steps, 5)
    await store.begin_run("vip", "r4", SYSTEM, None)
    await store.finish_run("vip", "r4", "synced", None, done, 0, 0)  # no transform any more
    last = await state(store, "vip")
    assert (last.id_transform, last.collapsed) == (None, 0)


async def test_history_is_newest_first_and_limited(store: StateStore) -> None:
    for number in range(6):
        await store.begin_run("vip", f"r{number}", SYSTEM, None)
        result: RunResult = "held" if number % 2 else "synced"
        await store.finish_run("vip", f"r{number}", result, None, SkippedIds(), 0, 0)
    await store.begin_run("other", "o1", SYSTEM, None)
    assert [r.run_id for r in await store.history("vip", 10)] == [
        "r5",
        "r4",
        "r3",
        "r2",
        "r1",
        "r0",
    ]
    assert [r.run_id for r in await store.history("vip", 3)] == ["r5", "r4", "r3"]
    assert [r.result for r in await store.history("vip", 2)] == ["held", "synced"]


async def _start_runs_together(store_url: str) -> None:
    """Every run's start time made the same, as runs begun in one instant have."""
    await execute_sql(store_url, "UPDATE runs SET started_at = (SELECT min(started_at) FROM runs)")


async def test_history_ties_put_the_run_begun_last_first(
    store_url: str, store: StateStore
) -> None:
    for number in range(5):
        await store.begin_run("vip", f"r{number}", SYSTEM, None)
    await _start_runs_together(store_url)
    assert [r.run_id for r in await store.history("vip", 10)] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r.run_id for r in await store.history("vip", 2)] == ["r4", "r3"]


async def test_prune_history(store: StateStore) -> None:
    await store.begin_run("vip", "done", SYSTEM, None)
    await store.finish_run("vip", "done", "synced", None, SkippedIds(), 0, 0)
    await store.begin_run("vip", "running", SYSTEM, None)
    assert await store.prune_history(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert len(await store.history("vip", 10)) == 2
    # A run still going is never pruned, however old.
    assert await store.prune_history(datetime.now(UTC) + timedelta(minutes=5)) == 1
    assert [r.run_id for r in await store.history("vip", 10)] == ["running"]
    # The segment itself and its state stay.
    assert (await state(store, "vip")).last_result == "synced"


async def test_prune_history_forgets_old_heap_page_receipts(store: StateStore) -> None:
    await store.store_heap_page(page("t1", 1, 2, ["a"]))
    assert (await store.store_heap_page(page("t1", 1, 2, ["a"]))).duplicate is True
    await store.prune_history(datetime.now(UTC) - timedelta(hours=1))
    assert (await store.store_heap_page(page("t1", 1, 2, ["a"]))).duplicate is True
    await store.prune_history(datetime.now(UTC) + timedelta(minutes=5))
    assert (await store.store_heap_page(page("t1", 1, 2, ["a"]))).duplicate is False


async def test_prune_history_cutoff_in_another_time_zone(store: StateStore) -> None:
    """A cutoff is a point in time, whatever zone it is written in."""
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.finish_run("vip", "r1", "synced", None, SkippedIds(), 0, 0)
    ahead = timezone(timedelta(hours=14))
    behind = timezone(timedelta(hours=-12))
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    assert await store.prune_history(an_hour_ago.astimezone(ahead)) == 0
    assert [r.run_id for r in await store.history("vip", 10)] == ["r1"]
    in_five_minutes = datetime.now(UTC) + timedelta(minutes=5)
    assert await store.prune_history(in_five_minutes.astimezone(behind)) == 1
    assert await store.history("vip", 10) == []


# -- orphans ---------------------------------------------------------------------------------


async def test_mark_orphans(store: StateStore) -> None:
    await seed(store, "kept", ["a"])
    await seed(store, "dropped", ["b"])
    await store.begin_run("never-created", "r1", SYSTEM, None)  # no WalkMe GUID
    assert await store.mark_orphans({"kept", "dropped", "never-created"}) == []
    orphans = await store.mark_orphans({"kept"})
    assert [o.name for o in orphans] == ["dropped"]
    since = orphans[0].orphaned_at
    assert since is not None
    assert abs(datetime.now(UTC) - since) < timedelta(minutes=1)
    assert orphans[0] == await store.get("dropped")
    assert (await state(store, "kept")).orphaned_at is None
    assert (await state(store, "never-created")).orphaned_at is None
    # Marked once: a later call, in the next second (SQLite keeps whole seconds),
    # keeps the first time.
    await asyncio.sleep(1.02 - time.time() % 1)
    again = await store.mark_orphans({"kept"})
    assert [(o.name, o.orphaned_at) for o in again] == [("dropped", since)]
    # Configured again: no longer an orphan.
    assert await store.mark_orphans({"kept", "dropped"}) == []
    assert (await state(store, "dropped")).orphaned_at is None


async def test_orphan_without_guid_is_cleared(store: StateStore) -> None:
    await seed(store, "dropped", ["b"])
    [orphan] = await store.mark_orphans(set())
    assert orphan.name == "dropped"
    await store.forget_guid("dropped")  # the WalkMe segment went away
    assert await store.mark_orphans(set()) == []
    assert (await state(store, "dropped")).orphaned_at is None


# -- quarantine ------------------------------------------------------------------------------


async def test_quarantine_round_trip(store: StateStore) -> None:
    await seed(store, "vip", ["r1", "r2"])
    await seed(store, "other", [])
    await store.quarantine("vip", "add", [("a1", "400 bad id"), ("a2", "400 worse")])
    await store.quarantine("vip", "remove", [("r1", "400 cannot remove"), ("a1", "400 too")])
    await store.quarantine("other", "add", [("o1", "400")])
    assert await store.quarantined("vip") == Quarantined(
        add=frozenset({"a1", "a2"}), remove=frozenset({"r1", "a1"})
    )
    assert (await state(store, "vip")).quarantined == 4
    assert (await state(store, "other")).quarantined == 1
    # Quarantined again: the reason is updated, nothing is counted twice.
    await store.quarantine("vip", "add", [("a1", "400 still bad")])
    assert (await state(store, "vip")).quarantined == 4
    examples = await store.quarantine_examples("vip", 10)
    assert sorted(examples) == [
        ("a1", "add", "400 still bad"),
        ("a1", "remove", "400 too"),
        ("a2", "add", "400 worse"),
        ("r1", "remove", "400 cannot remove"),
    ]
    assert len(await store.quarantine_examples("vip", 2)) == 2
    assert await store.quarantine_examples("nobody", 5) == []
    await store.quarantine("vip", "add", [])  # nothing rejected: nothing changes
    assert (await state(store, "vip")).quarantined == 4

    await store.release_quarantine(
        "vip", Quarantined(add=frozenset({"a1", "never"}), remove=frozenset({"r1"}))
    )
    assert await store.quarantined("vip") == Quarantined(
        add=frozenset({"a2"}), remove=frozenset({"a1"})
    )
    assert (await state(store, "vip")).quarantined == 2
    await store.release_quarantine("vip", Quarantined())
    assert (await state(store, "vip")).quarantined == 2
    assert await store.quarantined("other") == Quarantined(add=frozenset({"o1"}))
    assert await store.quarantined("nobody") == Quarantined()
    # The snapshot is not touched by any of this.
    assert sorted(await members(store, "vip")) == ["r1", "r2"]


async def test_quarantine_of_one_id(store: StateStore) -> None:
    await seed(store, "vip", ["r1"])
    await store.quarantine("vip", "remove", [("r1", "400 cannot remove")])
    await store.quarantine("vip", "add", [("r1", "400 cannot add"), ("a2", "400 other")])
    await store.quarantine("other", "add", [("r1", "400 elsewhere")])
    entries = await store.quarantine_of("vip", "r1")
    assert [(e.action, e.reason) for e in entries] == [
        ("add", "400 cannot add"),
        ("remove", "400 cannot remove"),
    ]
    assert all(
        e.since is not None and abs(datetime.now(UTC) - e.since) < timedelta(minutes=1)
        for e in entries
    )
    assert await store.quarantine_of("vip", "a3") == []
    assert await store.quarantine_of("nobody", "r1") == []


async def test_quarantine_examples_newest_first(store: StateStore) -> None:
    await seed(store, "vip", [])
    await store.quarantine("vip", "add", [("aaa-older", "first answer")])
    await store.quarantine("vip", "remove", [("zzz-newer", "second answer")])
    assert await store.quarantine_examples("vip", 5) == [
        ("zzz-newer", "remove", "second answer"),
        ("aaa-older", "add", "first answer"),
    ]
    assert await store.quarantine_examples("vip", 1) == [("zzz-newer", "remove", "second answer")]


@pytest.mark.parametrize("action", ["add", "remove"])
async def test_release_quarantine_of_one_action_alone(
    store: StateStore, action: Literal["add", "remove"]
) -> None:
    """Ids of one action are released even when the other action releases none."""
    await store.quarantine("vip", action, [("a", "400"), ("b", "400")])
    one, rest = frozenset({"a"}), frozenset({"b"})
    released, kept = (
        (Quarantined(add=one), Quarantined(add=rest))
        if action == "add"
        else (Quarantined(remove=one), Quarantined(remove=rest))
    )
    await store.release_quarantine("vip", released)
    assert await store.quarantined("vip") == kept


# -- Heap pages --------------------------------------------------------------------------------


async def test_store_heap_page_and_duplicates(store: StateStore) -> None:
    assert await store.heap_segments() == []
    first = await store.store_heap_page(page("t1", 1, 2, ["a", "b", "b"]))
    assert (first.duplicate, first.task_complete, first.mapping_name) == (
        False,
        False,
        "Heap users",
    )
    assert await store.heap_segments() == [HeapSegment(42, "Heap users", "Heap users", 2, 0)]
    # The same page again (Heap retries), even with other content: nothing changes.
    again = await store.store_heap_page(page("t1", 1, 2, ["zzz"], ["a"]))
    assert (again.duplicate, again.task_complete, again.mapping_name) == (
        True,
        False,
        "Heap users",
    )
    assert await store.heap_segments() == [HeapSegment(42, "Heap users", "Heap users", 2, 0)]
    assert sorted(await heap_ids(store, 42)) == ["a", "b"]
    last = await store.store_heap_page(page("t1", 2, 2, ["c"], ["b", "not-there"]))
    assert (last.duplicate, last.task_complete) == (False, True)
    assert await store.heap_segments() == [HeapSegment(42, "Heap users", "Heap users", 2, 1)]
    assert sorted(await heap_ids(store, 42)) == ["a", "c"]
    # A retried last page does not complete the task a second time.
    retried = await store.store_heap_page(page("t1", 2, 2, ["c"], ["b"]))
    assert (retried.duplicate, retried.task_complete) == (True, False)
    assert (await heap_segment(store, 42)).complete_tasks == 1


async def test_heap_pages_out_of_order(store: StateStore) -> None:
    receipts = [
        await store.store_heap_page(page("t1", 3, 3, ["e", "f"])),
        await store.store_heap_page(page("t1", 1, 3, ["a", "b"])),
        await store.store_heap_page(page("t1", 3, 3, ["e", "f"])),  # a retry meanwhile
        await store.store_heap_page(page("t1", 2, 3, ["c", "d"])),
    ]
    assert [(r.duplicate, r.task_complete) for r in receipts] == [
        (False, False),
        (False, False),
        (True, False),
        (False, True),
    ]
    assert sorted(await heap_ids(store, 42)) == ["a", "b", "c", "d", "e", "f"]
    assert (await heap_segment(store, 42)).members == 6
    # The next sync task: pages out of order again, removes before the adds arrive.
    second = [
        await store.store_heap_page(page("t2", 2, 2, ["g"], ["a", "b"])),
        await store.store_heap_page(page("t2", 1, 2, [], ["c"])),
    ]
    assert [(r.duplicate, r.task_complete) for r in second] == [(False, False), (False, True)]
    assert sorted(await heap_ids(store, 42)) == ["d", "e", "f", "g"]
    assert (await heap_segment(store, 42)).members == 4
    assert (await heap_segment(store, 42)).complete_tasks == 2


async def test_single_page_task_completes_at_once(store: StateStore) -> None:
    receipt = await store.store_heap_page(page("t1", 1, 1, ["a"]))
    assert (receipt.duplicate, receipt.task_complete) == (False, True)
    assert (await heap_segment(store, 42)).complete_tasks == 1


async def test_tasks_interleaved_across_heap_segments(store: StateStore) -> None:
    one = await store.store_heap_page(page("tA", 1, 2, ["a"], segment=1, name="One"))
    two = await store.store_heap_page(page("tB", 1, 2, ["b"], segment=2, name="Two"))
    three = await store.store_heap_page(page("tB", 2, 2, ["bb"], segment=2, name="Two"))
    four = await store.store_heap_page(page("tA", 2, 2, ["aa"], segment=1, name="One"))
    assert [r.task_complete for r in (one, two, three, four)] == [False, False, True, True]
    assert [r.mapping_name for r in (one, two, three, four)] == ["One", "Two", "Two", "One"]
    assert await store.heap_segments() == [
        HeapSegment(1, "One", "One", 2, 1),
        HeapSegment(2, "Two", "Two", 2, 1),
    ]
    assert sorted(await heap_ids(store, 1)) == ["a", "aa"]
    assert sorted(await heap_ids(store, 2)) == ["b", "bb"]


async def test_heap_segments_sharing_a_task_id_are_both_stored(store: StateStore) -> None:
    """A page is one (Heap segment, task, page): another segment's page is no duplicate."""
    one = await store.store_heap_page(page("shared", 1, 2, ["a"], segment=1, name="One"))
    two = await store.store_heap_page(page("shared", 1, 2, ["b"], segment=2, name="Two"))
    assert [(r.duplicate, r.task_complete) for r in (one, two)] == [(False, False)] * 2
    # Each segment's task completes with its own last page, not with the other's.
    last_two = await store.store_heap_page(page("shared", 2, 2, ["bb"], segment=2, name="Two"))
    assert (last_two.duplicate, last_two.task_complete) == (False, True)
    assert (await heap_segment(store, 1)).complete_tasks == 0
    last_one = await store.store_heap_page(page("shared", 2, 2, ["aa"], segment=1, name="One"))
    assert (last_one.duplicate, last_one.task_complete) == (False, True)
    assert sorted(await heap_ids(store, 1)) == ["a", "aa"]
    assert sorted(await heap_ids(store, 2)) == ["b", "bb"]
    retried = await store.store_heap_page(page("shared", 1, 2, ["b"], segment=2, name="Two"))
    assert retried.duplicate is True


async def test_heap_mapping_name_is_fixed_at_first_sight(store: StateStore) -> None:
    await store.store_heap_page(page("t1", 1, 1, ["a"], name="Original"))
    renamed = await store.store_heap_page(page("t2", 1, 1, ["b"], name="Renamed in Heap"))
    assert renamed.mapping_name == "Original"
    assert await store.heap_segments() == [HeapSegment(42, "Renamed in Heap", "Original", 2, 2)]


@pytest.mark.parametrize("size", [1, 2, 1000])
async def test_heap_members_chunks(store: StateStore, size: int) -> None:
    ids = [f"user-{n}" for n in range(23)] + TRICKY_IDS
    await store.store_heap_page(page("t1", 1, 2, ids[:20]))
    await store.store_heap_page(page("t1", 2, 2, ids[20:]))
    await store.store_heap_page(page("t9", 1, 1, ["elsewhere"], segment=7))
    chunks = await collect(store.heap_members(42, size))
    flat = [member for chunk in chunks for member in chunk]
    assert sorted(flat) == sorted(ids)
    assert all(0 < len(chunk) <= size for chunk in chunks)
    assert len(chunks) == math.ceil(len(ids) / size)
    assert await collect(store.heap_members(999, size)) == []


# -- leases ----------------------------------------------------------------------------------


async def test_lease_holder_renews_others_wait(store: StateStore) -> None:
    assert await store.acquire_lease("vip", "replica-a", 30) is True
    assert await store.acquire_lease("vip", "replica-a", 30) is True  # renewed
    assert await store.acquire_lease("vip", "replica-b", 30) is False
    assert await store.acquire_lease("other", "replica-b", 30) is True  # per segment
    await store.release_lease("vip", "replica-b")  # not the holder: no effect
    assert await store.acquire_lease("vip", "replica-b", 30) is False
    await store.release_lease("vip", "replica-a")
    assert await store.acquire_lease("vip", "replica-b", 30) is True
    assert await store.acquire_lease("vip", "replica-a", 30) is False
    await store.release_lease("nobody", "replica-a")  # nothing to release: fine


async def test_lease_expires_after_ttl(store: StateStore) -> None:
    assert await store.acquire_lease("vip", "replica-a", 0.5) is True
    assert await store.acquire_lease("vip", "replica-b", 0.5) is False
    await asyncio.sleep(0.7)
    assert await store.acquire_lease("vip", "replica-b", 0.5) is True
    assert await store.acquire_lease("vip", "replica-a", 0.5) is False


async def test_renewal_extends_the_lease(store: StateStore) -> None:
    assert await store.acquire_lease("vip", "replica-a", 0.8) is True
    await asyncio.sleep(0.5)
    assert await store.acquire_lease("vip", "replica-a", 0.8) is True
    await asyncio.sleep(0.5)  # past the first expiry, well before the renewed one
    assert await store.acquire_lease("vip", "replica-b", 0.8) is False


async def test_a_lapsed_lease_is_never_renewed(store: StateStore) -> None:
    assert await store.acquire_lease("vip", "replica-a", 0.3) is True
    assert await store.renew_lease("vip", "replica-a", 0.3) is True
    assert await store.renew_lease("vip", "replica-b", 30) is False  # not the holder
    await asyncio.sleep(0.5)
    # Nobody took it meanwhile, yet the run that let it lapse may not carry on.
    assert await store.renew_lease("vip", "replica-a", 30) is False
    assert await store.lease_holder("vip") is None
    assert await store.renew_lease("nobody", "replica-a", 30) is False


async def test_batch_writes_need_the_holders_unexpired_lease(store: StateStore) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", ["a", "b"], GUID)
    await store.begin_batch("vip", "add", ["c"])
    assert await store.acquire_lease("vip", "replica-a", 0.4) is True
    for stale in ("replica-b", "replica-a-old-run"):
        with pytest.raises(LeaseLost):
            await store.begin_batch("vip", "remove", ["a"], stale)
        with pytest.raises(LeaseLost):
            await store.record_batch("vip", "r1", "add", ["x"], GUID, stale)
        with pytest.raises(LeaseLost):
            await store.clear_pending("vip", stale)
    await store.finish_run("vip", "r1", "failed", "lost", SkippedIds(), 1, 0, None, holder="b")
    await store.record_batch("vip", "r1", "add", ["c"], GUID, "replica-a")  # the holder may
    await asyncio.sleep(0.6)  # ... until its lease lapses
    with pytest.raises(LeaseLost):
        await store.begin_batch("vip", "add", ["late"], "replica-a")
    with pytest.raises(LeaseLost):
        await store.record_batch("vip", "r1", "add", ["late"], GUID, "replica-a")
    # Nothing the refused writes carried reached the store.
    assert await store.pending_batch("vip") is None
    assert sorted([m async for chunk in store.snapshot("vip", 10) for m in chunk.ids()]) == [
        "a",
        "b",
        "c",
    ]
    state = await store.get("vip")
    assert state is not None
    assert (state.members, state.last_result, state.last_error) == (3, None, None)


async def test_the_lease_holder_may_begin_and_clear_its_batch(store: StateStore) -> None:
    """The fence lets the holder of this segment's unexpired lease through: it
    remembers a batch and, after a 4xx, clears it."""
    await store.begin_run("vip", "r1", SYSTEM, None)
    assert await store.acquire_lease("vip", "replica-a", 30) is True
    await store.begin_batch("vip", "add", ["a"], "replica-a")
    assert await store.pending_batch("vip") == PendingBatch("add", ["a"])
    await store.clear_pending("vip", "replica-a")
    assert await store.pending_batch("vip") is None


async def test_a_due_mark_since_the_read_keeps_the_lease(store: StateStore) -> None:
    assert await store.acquire_lease("vip", "replica-a", 30) is True
    await store.mark_due("vip")  # asked for before the run began reading: served by it
    read_started = await store.clock()
    assert await store.release_lease("vip", "replica-a", read_started) is True
    assert await store.lease_holder("vip") is None

    assert await store.acquire_lease("vip", "replica-a", 30) is True
    read_started = await store.clock()
    await store.mark_due("vip")  # asked for while the run was reading or sending
    assert await store.release_lease("vip", "replica-a", read_started) is False
    assert await store.lease_holder("vip") == "replica-a"
    assert await store.acquire_lease("vip", "replica-b", 30) is False
    rerun_started = await store.clock()  # the rerun reads afresh
    assert await store.release_lease("vip", "replica-a", rerun_started) is True
    assert await store.acquire_lease("vip", "replica-b", 30) is True
    # Not the holder (any more): nothing kept, nothing to run again.
    assert await store.release_lease("vip", "replica-a", read_started) is True
    assert await store.lease_holder("vip") == "replica-b"


@pytest.mark.parametrize("jump_s", [3600.0, -3600.0])
async def test_leases_ignore_a_jump_of_the_wall_clock(
    store: StateStore, monkeypatch: pytest.MonkeyPatch, jump_s: float
) -> None:
    assert await store.acquire_lease("vip", "replica-a", 30) is True
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + jump_s)
    assert await store.acquire_lease("vip", "replica-b", 30) is False
    assert await store.lease_holder("vip") == "replica-a"
    assert await store.renew_lease("vip", "replica-a", 30) is True
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.begin_batch("vip", "create", ["a"], "replica-a")


# -- replica heartbeats ----------------------------------------------------------------------


async def test_heartbeat_makes_a_replica_live_with_its_mappings(store: StateStore) -> None:
    assert await store.live_replicas() == []
    await store.heartbeat("host-b:2:bbb", ["Zeta", TRICKY_NAME, "alpha"], 30)
    await store.heartbeat("host-a:1:aaa", [], 30)
    live = await store.live_replicas()
    assert [(r.replica_id, r.host_pid) for r in live] == [
        ("host-a:1:aaa", "host-a:1"),
        ("host-b:2:bbb", "host-b:2"),
    ]
    assert live[0].mappings == []
    assert live[1].mappings == sorted(["Zeta", TRICKY_NAME, "alpha"])
    assert all(0 <= r.seen_s_ago < 5 for r in live)
    # A later heartbeat replaces what the replica maps.
    await store.heartbeat("host-b:2:bbb", ["alpha"], 30)
    assert [r.mappings for r in await store.live_replicas()] == [[], ["alpha"]]


async def test_heartbeat_carries_the_next_scheduled_runs(store: StateStore) -> None:
    await store.heartbeat("a:1:x", ["alpha", TRICKY_NAME], 30, {"alpha": 1.5, TRICKY_NAME: 2e9})
    [replica] = await store.live_replicas()
    assert replica.next_runs == {"alpha": 1.5, TRICKY_NAME: 2e9}
    await store.heartbeat("a:1:x", ["alpha"], 30, {"alpha": 99.25})  # replaced, not merged
    assert [r.next_runs for r in await store.live_replicas()] == [{"alpha": 99.25}]
    await store.heartbeat("a:1:x", ["alpha"], 30)  # none given: none known
    assert [r.next_runs for r in await store.live_replicas()] == [{}]


async def test_heartbeat_lapses_unless_renewed(store: StateStore) -> None:
    await store.heartbeat("gone:1:x", ["a"], 0.5)
    await store.heartbeat("kept:2:y", ["b"], 0.5)
    await asyncio.sleep(0.35)
    await store.heartbeat("kept:2:y", ["b"], 0.5)
    await asyncio.sleep(0.35)  # past the first expiry, before the renewed one
    live = await store.live_replicas()
    assert [r.replica_id for r in live] == ["kept:2:y"]
    assert live[0].seen_s_ago >= 0.3


async def test_forget_replica_drops_only_that_one(store: StateStore) -> None:
    await store.heartbeat("a:1:x", ["one"], 30)
    await store.heartbeat("b:2:y", ["two"], 30)
    await store.forget_replica("a:1:x")
    await store.forget_replica("nobody:3:z")  # unknown: fine
    assert [r.replica_id for r in await store.live_replicas()] == ["b:2:y"]


async def test_a_heartbeat_stamped_ahead_of_the_store_clock_was_seen_just_now(
    store_url: str, store: StateStore
) -> None:
    """A heartbeat stamped later than the store's clock now reads (the wall clock
    stepped back since) counts as seen 0 s ago: never negative, never more."""
    await store.heartbeat("a:1:x", ["one"], 30)
    await execute_sql(store_url, "UPDATE replicas SET seen_at = seen_at + 3600")
    assert [r.seen_s_ago for r in await store.live_replicas()] == [0.0]


async def test_heartbeats_are_seen_by_another_store_on_the_same_state(
    store_url: str, store: StateStore
) -> None:
    """A running daemon and a ``syncd prune`` opened on the same state see each other."""
    await store.heartbeat("daemon:7:abc", ["vip"], 30)
    other = await open_store(store_url)
    try:
        assert [(r.replica_id, r.mappings) for r in await other.live_replicas()] == [
            ("daemon:7:abc", ["vip"])
        ]
        await other.forget_replica("daemon:7:abc")
    finally:
        await other.close()
    assert await store.live_replicas() == []


# -- ping, reopen, close ---------------------------------------------------------------------


async def test_ping_answers_while_the_store_exists_and_fails_once_it_is_gone(
    store_url: str, store: StateStore
) -> None:
    """``ping`` (what /readyz asks) really reaches the store: it fails with a
    StateError once the SQLite file or the PostgreSQL database is gone."""
    await store.ping()
    if store_url.startswith("sqlite:"):
        await asyncio.to_thread(Path(urlsplit(store_url).path).unlink)
    else:
        await drop_database(urlsplit(store_url).path.lstrip("/"))
    with pytest.raises(StateError):
        await store.ping()


async def test_reopen_keeps_everything(store_url: str, store: StateStore) -> None:
    await seed(store, "vip", TRICKY_IDS, run_id="r1")
    skipped = SkippedIds()
    skipped.add("y" * 130, "too long")
    await store.finish_run("vip", "r1", "synced", None, skipped, 3, 1, "sha256:fp")
    await store.quarantine("vip", "add", [("q'1", "400 nope")])
    await seed(store, "gone", ["g"])
    await store.begin_run(TRICKY_NAME, "r2", SYSTEM, "ext,1%")
    await store.adopt(TRICKY_NAME, OTHER_GUID, "adopted")
    await store.store_heap_page(page("t1", 1, 2, ["h1", "h2"], name="Before"))
    await store.store_heap_page(page("t2", 1, 1, ["h3"], name="After"))
    assert await store.acquire_lease("vip", "replica-a", 60)
    assert await store.claim_notice(TRICKY_NAME, NoticeState(), NoticeState("failing", 3))
    before_orphans = await store.mark_orphans({"vip", TRICKY_NAME})
    assert [s.name for s in before_orphans] == ["gone"]
    before = {
        "all": await store.all(),
        "snapshot": sorted(await members(store, "vip")),
        "history": await store.history("vip", 10),
        "quarantined": await store.quarantined("vip"),
        "examples": await store.quarantine_examples("vip", 5),
        "heap": await store.heap_segments(),
        "heap_members": sorted(await heap_ids(store, 42)),
        "notice": await store.notice_state(TRICKY_NAME),
    }
    await store.close()

    reopened = await open_store(store_url)
    try:
        after = {
            "all": await reopened.all(),
            "snapshot": sorted(await members(reopened, "vip")),
            "history": await reopened.history("vip", 10),
            "quarantined": await reopened.quarantined("vip"),
            "examples": await reopened.quarantine_examples("vip", 5),
            "heap": await reopened.heap_segments(),
            "heap_members": sorted(await heap_ids(reopened, 42)),
            "notice": await reopened.notice_state(TRICKY_NAME),
        }
        assert after == before
        assert before["notice"] == NoticeState("failing", 3, 1)
        assert before["snapshot"] == sorted(TRICKY_IDS)
        assert (await state(reopened, "vip")).source_fingerprint == "sha256:fp"
        orphans = await reopened.mark_orphans({"vip", TRICKY_NAME})
        assert [(s.name, s.orphaned_at) for s in orphans] == [
            (s.name, s.orphaned_at) for s in before_orphans
        ]
        # The lease and the Heap page receipts survived too.
        assert await reopened.acquire_lease("vip", "replica-b", 60) is False
        assert (await reopened.store_heap_page(page("t1", 1, 2, ["h1"]))).duplicate is True
        assert (await reopened.store_heap_page(page("t1", 2, 2, ["h4"]))).task_complete is True
    finally:
        await reopened.close()


async def test_two_stores_opening_a_new_store_together(store_url: str) -> None:
    """A daemon starting while an operator runs ``syncd status``: both must open.

    (A race, so SQLite tries it on several new files; the PostgreSQL database is
    already migrated here: test_postgres.py races on empty databases.)
    """
    urls = [store_url]
    if store_url.startswith("sqlite:"):
        urls = [store_url.replace("s.db", f"new-{n}.db") for n in range(8)]
    for url in urls:
        async with opened_together(url) as (first, second):
            await first.begin_run("vip", "r1", SYSTEM, None)
            assert [s.name for s in await second.all()] == ["vip"]


async def test_closed_store_raises_state_error(store: StateStore) -> None:
    """A call on a closed store fails with a StateError saying it is closed."""
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.close()
    with pytest.raises(StateError, match=r"\bis clos(ed|ing)\b"):
        await store.ping()
    with pytest.raises(StateError, match=r"\bis clos(ed|ing)\b"):
        await store.get("vip")


async def test_calls_made_at_once_on_one_store_each_apply_whole(store: StateStore) -> None:
    """Calls made at once on one store (a daemon runs segments concurrently) are each
    one transaction of their own: none fails, none is lost or mixed with another."""
    names = [f"segment-{number}" for number in range(100)]
    await asyncio.gather(*(seed(store, name, [f"{name}-a", f"{name}-b"]) for name in names))
    assert {s.name: s.members for s in await store.all()} == dict.fromkeys(names, 2)
    snapshots = await asyncio.gather(*(members(store, name) for name in names))
    assert [sorted(ids) for ids in snapshots] == [[f"{name}-a", f"{name}-b"] for name in names]


# -- awkward ids and names ---------------------------------------------------------------------


async def test_awkward_ids_and_names_round_trip(store: StateStore) -> None:
    name = TRICKY_NAME
    await store.begin_run(name, "run'1,%", SYSTEM, 'ext "1", 100%')
    await store.record_batch(name, "run'1,%", "create", TRICKY_IDS[:10], GUID)
    await store.record_batch(name, "run'1,%", "add", TRICKY_IDS[10:])
    assert sorted(await members(store, name)) == sorted(TRICKY_IDS)
    assert sorted(m for c in await collect(store.snapshot(name, 1)) for m in c) == sorted(
        TRICKY_IDS
    )
    await store.record_batch(name, "run'1,%", "remove", TRICKY_IDS[::2])
    assert sorted(await members(store, name)) == sorted(TRICKY_IDS[1::2])
    now = await state(store, name)
    assert (now.name, now.external_id, now.members) == (
        name,
        'ext "1", 100%',
        len(TRICKY_IDS[1::2]),
    )
    assert [s.name for s in await store.all()] == [name]

    rejected = [(member, f"400: {member!r} refused") for member in TRICKY_IDS]
    await store.quarantine(name, "add", rejected)
    assert await store.quarantined(name) == Quarantined(add=frozenset(TRICKY_IDS))
    examples = await store.quarantine_examples(name, len(TRICKY_IDS))
    assert sorted(examples) == sorted((m, "add", r) for m, r in rejected)
    await store.release_quarantine(name, Quarantined(add=frozenset(TRICKY_IDS[:5])))
    assert await store.quarantined(name) == Quarantined(add=frozenset(TRICKY_IDS[5:]))

    await store.store_heap_page(page("task'1,%", 1, 1, TRICKY_IDS, name=name))
    assert sorted(await heap_ids(store, 42)) == sorted(TRICKY_IDS)
    assert (await heap_segment(store, 42)).mapping_name == name
    await store.store_heap_page(page("task'2,%", 1, 1, [], TRICKY_IDS[:3], name=name))
    assert sorted(await heap_ids(store, 42)) == sorted(TRICKY_IDS[3:])

    await store.finish_run(name, "run'1,%", "synced", None, SkippedIds(), 3, 0)
    assert [r.run_id for r in await store.history(name, 5)] == ["run'1,%"]
    assert await store.acquire_lease(name, "holder 'x', 100%", 30) is True
    assert await store.acquire_lease(name, "holder 'y'", 30) is False
    assert [o.name for o in await store.mark_orphans(set())] == [name]
    assert await store.mark_orphans({name}) == []
    assert await store.reset(name) is True
    assert await store.forget(name) is True
    assert await store.all() == []


async def test_names_differing_only_in_case_or_accents_are_distinct(store: StateStore) -> None:
    await seed(store, "Vip", ["a"])
    await seed(store, "vip", ["b", "c"])
    await seed(store, "víp", ["d"])
    assert {s.name: s.members for s in await store.all()} == {"Vip": 1, "vip": 2, "víp": 1}
    assert sorted(await members(store, "vip")) == ["b", "c"]
    await seed(store, "ids", ["A", "a", "á", "a "])
    assert (await state(store, "ids")).members == 4
    assert sorted(await members(store, "ids")) == sorted(["A", "a", "á", "a "])


# -- the batch in flight -----------------------------------------------------------


async def test_pending_batch_round_trip_and_record_clears_it(store: StateStore) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", ["a"], GUID)
    assert await store.pending_batch("vip") is None
    await store.begin_batch("vip", "add", ["b", "zoë", "c,d"])
    pending = await store.pending_batch("vip")
    assert pending is not None
    assert (pending.action, pending.ids) == ("add", ["b", "zoë", "c,d"])
    await store.begin_batch("vip", "remove", [])  # replaces: one batch in flight per segment
    pending = await store.pending_batch("vip")
    assert pending is not None
    assert (pending.action, pending.ids) == ("remove", [])
    await store.record_batch("vip", "r1", "add", ["b"])
    assert await store.pending_batch("vip") is None


async def test_record_batch_can_leave_the_rest_of_a_replay_pending(store: StateStore) -> None:
    """A slice of a replayed batch is recorded and the unacknowledged rest becomes
    the pending batch in the same transaction: a crash between them loses nothing."""
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", ["a"], GUID)
    await store.begin_batch("vip", "add", ["b", "c", "d"])
    rest = PendingBatch("add", ["c", "d"])
    await store.record_batch("vip", "r1", "add", ["b"], still_pending=rest)
    pending = await store.pending_batch("vip")
    assert pending is not None
    assert (pending.action, pending.ids) == ("add", ["c", "d"])
    assert sorted(await members(store, "vip")) == ["a", "b"]
    await store.record_batch("vip", "r1", "add", ["c", "d"], still_pending=PendingBatch("add", []))
    assert await store.pending_batch("vip") is None
    assert (await state(store, "vip")).members == 4


async def test_pending_batch_survives_a_reopen(store_url: str) -> None:
    first = await open_store(store_url)
    await first.begin_run("vip", "r1", SYSTEM, None)
    await first.begin_batch("vip", "override", ["x", "y"])
    await first.close()
    second = await open_store(store_url)
    try:
        pending = await second.pending_batch("vip")
        assert pending is not None
        assert (pending.action, pending.ids) == ("override", ["x", "y"])
    finally:
        await second.close()


@pytest.mark.parametrize("how", ["clear_pending", "forget_guid", "reset", "adopt", "forget"])
async def test_pending_batch_is_dropped_when_the_snapshot_is(store: StateStore, how: str) -> None:
    await store.begin_run("vip", "r1", SYSTEM, None)
    await store.record_batch("vip", "r1", "create", ["a"], GUID)
    await store.begin_batch("vip", "add", ["b"])
    if how == "adopt":
        await store.adopt("vip", OTHER_GUID, "adopted")
    else:
        await getattr(store, how)("vip")
    assert await store.pending_batch("vip") is None
