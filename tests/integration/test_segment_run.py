"""One segment run (``SegmentRun``) in this process, against the sandbox and a SQLite
state store: the dry run's plan; what a run reports and stores (transform examples,
collapsed and skipped ids, the shortcuts' counts, requests, duration, gauges, the
notices); the removal guard's limits and ``--force``; pending batches, quarantine
and a segment deleted or moved in WalkMe; spill files; and how a run that goes wrong
ends."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog

from syncd import metrics
from syncd.diff import SPILL_PREFIX, Quarantined
from syncd.engine.control import Interrupted
from syncd.engine.guard import Hold
from syncd.engine.outcome import Outcome, Plan
from syncd.settings import Settings
from syncd.sources import file as file_source
from syncd.sources.base import Chunk, SourceError
from syncd.sources.file import FileSource
from syncd.state import StateStore
from syncd.state.base import LeaseLost, StateError
from syncd.state.runs import RunLog
from tests.integration.conftest import RuntimeFactory
from tests.support.harness import Harness, HarnessFactory, seed_segment, segment_requests
from tests.support.ids import make_ids
from tests.support.logs import named
from tests.support.receiver import NotifyReceiver
from tests.support.waiting import wait_until_async

NAME = "Run"


async def dry_run(harness: Harness, settings: Settings) -> Outcome:
    """``syncd sync --dry-run`` of the one mapping, in this process."""
    [outcome] = await harness.sync(settings, dry_run=True)
    return outcome


async def forced(harness: Harness, settings: Settings) -> Outcome:
    """``syncd sync --segment NAME --force``, in this process."""
    [outcome] = await harness.sync(settings, [NAME], force=True)
    return outcome


async def store_of(runtime_of: RuntimeFactory, settings: Settings) -> StateStore:
    """The state store of ``settings``, opened beside the runs' own."""
    return (await runtime_of(settings)).store


# -- the dry run -------------------------------------------------------------------------


async def test_a_dry_run_of_a_new_segment_plans_a_create_and_stores_nothing(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    """A dry run reads the source and says what a run would send (a create, with the
    first ids in order), contacts no segment, leaves the state store without it and
    no spill files behind."""
    ids = make_ids(8)
    work = harness.folder / "work"
    work.mkdir()
    settings = harness.settings([harness.mapping(NAME, [*ids[::-1], ids[0]])], work_dir=str(work))
    outcome = await dry_run(harness, settings)
    assert (outcome.result, outcome.error) == ("planned", None)
    assert outcome.plan == Plan(
        mode="create",
        staged=8,
        adds=8,
        removes=0,
        add_examples=ids[:5],
        remove_examples=[],
        held=None,
    )
    assert outcome.collapsed == 1
    assert segment_requests(harness.sandbox) == []
    assert list(work.iterdir()) == []  # the plan's spill files are gone
    assert await (await store_of(runtime_of, settings)).get(NAME) is None


async def test_a_dry_run_of_an_update_names_the_guards_hold_and_changes_nothing(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    """Against a synced segment, the plan counts adds and removes, shows the first of
    each and the hold the removal guard would put on it; nothing is sent or stored."""
    ids = make_ids(150)
    settings = harness.settings([harness.mapping(NAME, ids)])
    assert (await harness.sync_one(settings)).result == "synced"
    new = make_ids(2, prefix="new")
    harness.source(NAME, [*ids[100:], *new])
    harness.sandbox.clear_requests()

    outcome = await dry_run(harness, settings)
    assert outcome.result == "planned"
    reason = "100 of 150 members would be removed (67%, more than max_remove_fraction 0.5)"
    assert outcome.plan == Plan(
        mode="update",
        staged=52,
        adds=2,
        removes=100,
        add_examples=new,
        remove_examples=ids[:5],
        held=Hold(reason, 100, 150, 52, 0.5),
    )
    assert segment_requests(harness.sandbox) == []
    store = await store_of(runtime_of, settings)
    state = await store.get(NAME)
    assert state is not None
    assert (state.members, state.last_result) == (150, "synced")
    assert len(await store.history(NAME, 10)) == 1


# -- what a run reports ----------------------------------------------------------------------


async def test_transform_examples_are_the_first_source_ids_across_chunks(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome shows the first three source ids before and after the transform,
    however the source cuts its chunks, counts the ids it made one and those it could
    not take."""
    monkeypatch.setattr(file_source, "CHUNK_SIZE", 2)
    path = harness.folder / "people.csv"
    path.write_text("id\nA@x.io\na@x.io\nB@x.io\nC@x.io\nD@x.io\nnot-mail\n", encoding="utf-8")
    source = {"type": "file", "path": str(path), "column": "id"}
    mapping = {"name": NAME, "source": source, "transform": ["lower", r"regex:(.*)@x\.io"]}
    outcome = await harness.sync_one(harness.settings([mapping]))
    assert (outcome.result, outcome.added, outcome.collapsed) == ("synced", 4, 1)
    assert outcome.transform_examples == ["'A@x.io' -> 'a'", "'a@x.io' -> 'a'", "'B@x.io' -> 'b'"]
    assert outcome.skipped.count == 1  # the regex does not take it
    assert outcome.skipped.examples[0].startswith("'not-mail': does not match")


@pytest.mark.parametrize("column", [None, "id"], ids=["plain", "csv"])
async def test_repeated_source_ids_are_counted_as_collapsed_and_stored(
    harness: Harness,
    runtime_of: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
    column: str | None,
) -> None:
    """Without a transform, an id the source gives twice is sent once and counted as
    collapsed (one the id rules refuse is skipped, not collapsed), whether the source
    hands over text or values; the count is stored."""
    monkeypatch.setattr(file_source, "CHUNK_SIZE", 2)  # values: two a chunk
    monkeypatch.setattr(file_source, "BLOCK_BYTES", 16)  # text: a few lines a chunk
    ids = ["a@x.io", "b@x.io", "a@x.io", "c@x.io", "a@x.io", "x" * 101]  # and one too long
    path = harness.source(NAME, ["id", *ids] if column else ids)
    source: dict[str, Any] = {"type": "file", "path": str(path)}
    if column:
        source["column"] = column
    settings = harness.settings([{"name": NAME, "source": source}])
    outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.added, outcome.collapsed) == ("synced", 3, 2)
    assert (outcome.skipped.count, outcome.transform_examples) == (1, [])
    state = await (await store_of(runtime_of, settings)).get(NAME)
    assert state is not None
    assert state.collapsed == 2


async def test_a_changed_transform_is_noted_only_against_a_successful_run(
    harness: Harness,
) -> None:
    """A first run (even one with a transform) has nothing to differ from; after a
    synced run, other steps are noted with the old ones, in the dry run and the run;
    once synced with the new steps, nothing is noted."""
    ids = ["A@x.io", "b@x.io", "Ann Lee@x.io"]
    first = await harness.sync_one(harness.settings([harness.mapping(NAME, ids)]))
    assert (first.result, first.previous_transform) == ("synced", None)
    lowered = harness.settings([harness.mapping(NAME, ids, transform=["lower"])])
    assert (await dry_run(harness, lowered)).previous_transform == []
    with structlog.testing.capture_logs() as logs:
        changed = await harness.sync_one(lowered)
    assert (changed.result, changed.previous_transform) == ("synced", [])
    # The file's text is cut into its lines (not at blanks) for the transform.
    lowered_ids = {"a@x.io", "b@x.io", "ann lee@x.io"}
    assert harness.sandbox.members(harness.guid(NAME)) == lowered_ids
    [line] = named(logs, "segment.transform_changed")
    assert (line["old_transform"], line["transform"]) == ([], ["lower"])
    harness.source(NAME, [*ids, "c@x.io"])  # new bytes: the run reads them
    with structlog.testing.capture_logs() as logs:
        again = await harness.sync_one(lowered)
    assert (again.result, again.unchanged, again.previous_transform) == ("synced", False, None)
    assert named(logs, "segment.transform_changed") == []
    upper = harness.settings([harness.mapping(NAME, ids, transform=["upper"])])
    assert (await dry_run(harness, upper)).previous_transform == ["lower"]

    other = harness.settings([harness.mapping("Other", ids, transform=["lower"])])
    assert (await harness.sync_one(other)).previous_transform is None


async def test_an_empty_source_is_warned_of_only_against_members(harness: Harness) -> None:
    """A source that gives no ids while WalkMe holds members looks like a half-loaded
    table: the run says so. A new segment's empty source is no such sign (here its
    only id is refused by the id rules: skipped, and nothing collapsed)."""
    settings = harness.settings([harness.mapping(NAME, make_ids(1), max_remove_fraction=1.0)])
    with structlog.testing.capture_logs() as logs:
        assert (await harness.sync_one(settings)).result == "synced"
        empty = harness.settings([harness.mapping("Empty", ["x" * 101])])
        created = await harness.sync_one(empty)
    assert (created.result, created.skipped.count, created.collapsed) == ("synced", 1, 0)
    assert named(logs, "segment.source_empty") == []

    harness.source(NAME, [])
    with structlog.testing.capture_logs() as logs:
        outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.removed) == ("synced", 1)
    [line] = named(logs, "segment.source_empty")  # a single member is enough
    path = harness.folder / f"{NAME}.txt"
    assert (line["source"], line["source_ids"], line["snapshot_members"]) == (
        FileSource(path).describe(),
        0,
        1,
    )


async def never_read(self: FileSource) -> AsyncIterator[Chunk]:
    raise AssertionError("the source was read")
    yield ""  # an async generator


@pytest.mark.parametrize("reordered", [False, True], ids=["same-bytes", "same-ids"])
async def test_an_unchanged_source_reports_the_last_runs_counts(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, reordered: bool
) -> None:
    """A run that skips its source (same bytes: not even read) or the snapshot (same
    ids in another order) still reports the ids skipped and collapsed, and keeps the
    fingerprint and digest, so the next run does not read the source either."""
    ids = [*make_ids(5), make_ids(1)[0], "x" * 101]  # one repeated, one too long
    settings = harness.settings([harness.mapping(NAME, ids)])
    first = await harness.sync_one(settings)
    assert (first.result, first.skipped.count, first.collapsed) == ("synced", 1, 1)
    if reordered:
        harness.source(NAME, ids[::-1])
    else:
        monkeypatch.setattr(FileSource, "chunks", never_read)
    harness.sandbox.clear_requests()
    with structlog.testing.capture_logs() as logs:
        again = await harness.sync_one(settings)
    assert (again.result, again.unchanged, again.requests) == ("synced", True, 0)
    assert (again.skipped, again.collapsed) == (first.skipped, 1)
    assert named(logs, "segment.source_empty") == []  # nothing compared: no false alarm
    assert again.source_digest == first.source_digest
    assert again.source_fingerprint is not None
    assert (again.source_fingerprint == first.source_fingerprint) is not reordered

    monkeypatch.setattr(FileSource, "chunks", never_read)
    last = await harness.sync_one(settings)
    assert (last.result, last.unchanged, last.skipped) == ("synced", True, first.skipped)
    assert harness.sandbox.requests == []


async def hangs(self: FileSource) -> str | None:
    await asyncio.Event().wait()
    return None


async def read_hangs(self: FileSource) -> AsyncIterator[Chunk]:
    yield await hangs(self) or ""


@pytest.mark.parametrize(
    ("step", "stuck"), [("fingerprint", hangs), ("chunks", read_hangs)], ids=["check", "read"]
)
async def test_a_source_that_hangs_fails_the_run_naming_the_source(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, step: str, stuck: object
) -> None:
    """The source's cheap check and its read are bounded alike: one that never
    answers fails the run after SYNCD_SOURCE_TIMEOUT, naming the source."""
    mapping = harness.mapping(NAME, make_ids(2))
    assert (await harness.sync_one(harness.settings([mapping]))).result == "synced"
    harness.source(NAME, make_ids(3))  # new bytes: past the check, the file is read
    monkeypatch.setattr(FileSource, step, stuck)
    outcome = await harness.sync_one(harness.settings([mapping], source_timeout=0.3))
    described = FileSource(harness.folder / f"{NAME}.txt").describe()
    assert (outcome.result, outcome.error) == (
        "failed",
        f"{described} did not answer within 0.3 s (SYNCD_SOURCE_TIMEOUT);"
        " the next run reads it again",
    )


async def test_a_run_sets_the_segments_gauges(harness: Harness) -> None:
    """The run's report sets the segment's members and last success as the run left
    them, for ``/metrics``."""
    settings = harness.settings([harness.mapping("Gauged", make_ids(7))])  # its own gauges
    assert (await harness.sync_one(settings)).result == "synced"
    labels = {"segment": "Gauged"}
    assert metrics.REGISTRY.get_sample_value("syncd_segment_members", labels) == 7
    success = metrics.REGISTRY.get_sample_value("syncd_last_success_timestamp_seconds", labels)
    assert success is not None
    assert success > 0


async def test_a_run_stores_its_counts_and_the_steps_it_synced_with(
    make_harness: HarnessFactory, runtime_of: RuntimeFactory
) -> None:
    """The run's record holds what the outcome says (adds, requests, ids skipped and
    quarantined), and the segment its external id, the ids collapsed, the examples
    skipped and the transform the snapshot now follows."""
    harness = await make_harness(rejected_ids=["bad@x.io"])
    ids = ["A@x.io", "a@x.io", "bad@x.io", "b@x.io", "x" * 101]
    mapping = harness.mapping(NAME, ids, transform=["lower"], external_id="crm-vip")
    settings = harness.settings([mapping])
    outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.added, outcome.quarantined) == ("synced", 2, 1)
    store = await store_of(runtime_of, settings)
    [run] = await store.history(NAME, 10)
    assert (run.result, run.error, run.added, run.requests, run.skipped, run.quarantined) == (
        "synced",
        None,
        2,
        outcome.requests,
        1,
        1,
    )
    assert outcome.requests > 0
    state = await store.get(NAME)
    assert state is not None
    assert (state.collapsed, state.skipped, state.id_transform) == (1, 1, '["lower"]')
    assert state.external_id == "crm-vip"
    assert state.skipped_examples == outcome.skipped.examples != []


async def test_a_segment_asked_for_while_its_source_is_read_runs_again(
    harness: Harness, runtime_of: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run notes when it began reading: a sync asked for after that instant may
    not be in what it read, so the segment runs once more before the lease goes."""
    settings = harness.settings([harness.mapping(NAME, make_ids(3))])
    store = await store_of(runtime_of, settings)
    read = FileSource.chunks
    asked: list[bool] = []

    async def asked_for_while_read(self: FileSource) -> AsyncIterator[Chunk]:
        if not asked:
            await store.mark_due(NAME)
            asked.append(True)
        async for chunk in read(self):
            yield chunk

    monkeypatch.setattr(FileSource, "chunks", asked_for_while_read)
    with structlog.testing.capture_logs() as logs:
        assert (await harness.sync_one(settings)).result == "synced"
    assert len(named(logs, "segment.rerun")) == 1
    assert [run.result for run in await store.history(NAME, 10)] == ["synced", "synced"]


async def test_a_run_counts_every_walkme_request_it_made(harness: Harness) -> None:
    """The outcome's request count includes the token and the list that found the
    segment to adopt, as well as the batch: every call WalkMe saw from the run."""
    await seed_segment(harness.sandbox, NAME, ["stale@x.io"])
    settings = harness.settings([harness.mapping(NAME, make_ids(3))])
    harness.sandbox.clear_requests()
    outcome = await harness.sync_one(settings)
    kinds = [r.kind for r in harness.sandbox.requests]
    assert kinds == ["token", "list", "update"]
    assert (outcome.result, outcome.requests) == ("synced", len(kinds))


async def test_a_run_spills_into_the_work_directory_and_clears_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the source is read, its ids are spilled under SYNCD_WORK_DIR (a folder
    named for this process); once the run is done, nothing is left there."""
    work = harness.folder / "work"
    work.mkdir()
    settings = harness.settings([harness.mapping(NAME, make_ids(3))], work_dir=str(work))
    read = FileSource.chunks
    spills: list[list[str]] = []

    async def watched(self: FileSource) -> AsyncIterator[Chunk]:
        spills.append([folder.name for folder in work.iterdir()])
        async for chunk in read(self):
            yield chunk

    monkeypatch.setattr(FileSource, "chunks", watched)
    assert (await harness.sync_one(settings)).result == "synced"
    [[spill]] = spills
    assert spill.startswith(f"{SPILL_PREFIX}{os.getpid()}-")
    assert list(work.iterdir()) == []


async def test_a_run_reports_how_long_it_took(harness: Harness) -> None:
    """The outcome's duration is the run's own, in seconds to the millisecond: within
    the time the caller waited for it."""
    settings = harness.settings([harness.mapping(NAME, make_ids(3))])
    waited = time.monotonic()
    outcome = await harness.sync_one(settings)
    waited = time.monotonic() - waited
    assert isinstance(outcome.duration_s, float)
    assert 0 <= outcome.duration_s <= waited
    assert outcome.duration_s == round(outcome.duration_s, 3)


async def test_the_notices_hear_of_each_run_with_the_segment_it_left(harness: Harness) -> None:
    """After each run the notices decide what to tell: a failing segment once its
    failures reach the limit, then its recovery with the members the run left."""
    async with NotifyReceiver() as receiver:
        settings = harness.settings(
            [harness.mapping(NAME, ["\x00"])],  # a file of NUL bytes fails every run
            notify_url=receiver.url,
            notify_after_failures=1,
        )
        assert (await harness.sync_one(settings)).result == "failed"
        harness.source(NAME, make_ids(4))
        assert (await harness.sync_one(settings)).result == "synced"
        await wait_until_async(lambda: len(receiver.delivered()) == 2, 10, "two messages")
        assert receiver.events() == [(NAME, "failing"), (NAME, "recovered")]
        assert receiver.delivered()[1]["syncd"]["members"] == 4


# -- the removal guard ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mapping_fraction", "overrides", "held_at"),
    [
        (None, {}, None),  # 10 members: below guard_min_members (100)
        (None, {"guard_min_members": 11}, None),
        (None, {"guard_min_members": 10}, 0.5),
        (None, {"guard_min_members": 10, "max_remove_fraction": 0.7}, None),
        (0.7, {"guard_min_members": 10}, None),
        (0.5, {"guard_min_members": 10, "max_remove_fraction": 0.7}, 0.5),  # the mapping's
    ],
)
async def test_the_removal_guard_takes_its_limits_from_the_mapping_then_the_settings(
    harness: Harness,
    mapping_fraction: float | None,
    overrides: dict[str, Any],
    held_at: float | None,
) -> None:
    """Six of ten members removed: held by a limit below 60% once the segment has
    ``guard_min_members``, the mapping's limit before the settings'."""
    ids = make_ids(10)
    extra = {} if mapping_fraction is None else {"max_remove_fraction": mapping_fraction}
    settings = harness.settings([harness.mapping(NAME, ids, **extra)], **overrides)
    assert (await harness.sync_one(settings)).result == "synced"
    outcome = await harness.sync_changed(settings, NAME, ids[6:])
    if held_at is None:
        assert (outcome.result, outcome.hold, outcome.removed) == ("synced", None, 6)
        return
    assert (outcome.result, outcome.removed) == ("held", 0)
    reason = f"6 of 10 members would be removed (60%, more than max_remove_fraction {held_at})"
    assert outcome.hold == Hold(reason, 6, 10, 4, held_at)
    assert outcome.error == reason
    assert segment_requests(harness.sandbox) == []


async def test_force_applies_a_plan_the_guard_holds(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    """A held run is stored as held, its plan's spill files removed; ``--force``
    sends the plan: the emptied source empties the segment."""
    work = harness.folder / "work"
    work.mkdir()
    settings = harness.settings([harness.mapping(NAME, make_ids(3))], work_dir=str(work))
    assert (await harness.sync_one(settings)).result == "synced"
    assert (await harness.sync_changed(settings, NAME, [])).result == "held"
    state = await (await store_of(runtime_of, settings)).get(NAME)
    assert state is not None
    assert (state.last_result, state.members) == ("held", 3)
    assert list(work.iterdir()) == []  # the held plan's spill files are gone
    outcome = await forced(harness, settings)
    assert (outcome.result, outcome.hold, outcome.removed) == ("synced", None, 3)
    assert harness.sandbox.members(harness.guid(NAME)) == set()


# -- pending batches, quarantine, a segment deleted in WalkMe -------------------------------


async def test_a_pending_batch_is_replayed_first_and_says_so(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    """A batch whose answer was lost is sent again before the diff, and the run says
    which action and how many ids it replays."""
    ids = make_ids(4)
    settings = harness.settings([harness.mapping(NAME, ids)])
    assert (await harness.sync_one(settings)).result == "synced"
    await (await store_of(runtime_of, settings)).begin_batch(NAME, "remove", ids[:2])
    harness.sandbox.clear_requests()
    with structlog.testing.capture_logs() as logs:
        outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.added, outcome.removed) == ("synced", 2, 2)
    [line] = named(logs, "segment.replaying")
    assert (line["action"], line["ids"]) == ("remove", 2)
    assert [(r.action, r.n_ids) for r in segment_requests(harness.sandbox)] == [
        ("remove", 2),
        ("add", 2),
    ]


async def test_a_pending_batch_of_a_segment_to_rebuild_is_dropped_not_replayed(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    """After a reset the run rebuilds the segment with ``override``: the batch left
    pending is not sent again, and no longer pending."""
    ids = make_ids(4)
    settings = harness.settings([harness.mapping(NAME, ids)])
    assert (await harness.sync_one(settings)).result == "synced"

    store = await store_of(runtime_of, settings)
    await store.reset(NAME)
    await store.begin_batch(NAME, "add", ["late@x.io"])
    harness.sandbox.clear_requests()
    outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.added) == ("synced", 4)
    assert [(r.action, r.n_ids) for r in segment_requests(harness.sandbox)] == [("override", 4)]
    assert harness.sandbox.members(harness.guid(NAME)) == set(ids)
    assert await store.pending_batch(NAME) is None


async def test_a_mapping_pointed_at_another_segment_rebuilds_it_with_every_id(
    harness: Harness,
) -> None:
    """A segment GUID set in the mapping after syncs to another segment: that one is
    rebuilt with ``override`` and every source id, not the difference against the
    snapshot of the segment synced before."""
    ids = make_ids(4)
    settings = harness.settings([harness.mapping(NAME, ids)])
    assert (await harness.sync_one(settings)).result == "synced"
    other = await seed_segment(harness.sandbox, "Elsewhere", ["stale@x.io"])
    moved = harness.settings([harness.mapping(NAME, [*ids, "new@x.io"], segment_guid=other)])
    harness.sandbox.clear_requests()
    outcome = await harness.sync_one(moved)
    assert (outcome.result, outcome.added) == ("synced", 5)
    assert [(r.action, r.n_ids) for r in segment_requests(harness.sandbox)] == [("override", 5)]
    assert harness.sandbox.members(other) == {*ids, "new@x.io"}


async def test_a_quarantined_id_gone_from_the_source_is_released(
    make_harness: HarnessFactory, runtime_of: RuntimeFactory
) -> None:
    """An id WalkMe refused stays quarantined while the source still has it; once
    the source drops it, the run releases it."""
    harness = await make_harness(rejected_ids=["bad@x.io"])
    settings = harness.settings([harness.mapping(NAME, ["a@x.io", "bad@x.io"])])
    assert (await harness.sync_one(settings)).quarantined == 1
    harness.source(NAME, ["a@x.io", "bad@x.io", "b@x.io"])
    second = await harness.sync_one(settings)
    assert (second.added, second.quarantined) == (1, 0)  # the refused id is not sent again
    store = await store_of(runtime_of, settings)
    assert await store.quarantined(NAME) == Quarantined(add=frozenset({"bad@x.io"}))
    assert (await harness.sync_changed(settings, NAME, ["a@x.io", "b@x.io"])).result == "synced"
    assert await store.quarantined(NAME) == Quarantined()


async def test_a_segment_walkme_keeps_answering_404_for_fails_the_run(harness: Harness) -> None:
    """Deleted behind syncd's back, the segment is written again once (here the
    mapping's own GUID, adopted again); when that answers 404 too, the run fails
    with WalkMe's answer rather than claiming it synced."""
    guid = await seed_segment(harness.sandbox, NAME, [])
    settings = harness.settings([harness.mapping(NAME, make_ids(3), segment_guid=guid)])
    assert (await harness.sync_one(settings)).result == "synced"
    harness.sandbox.script(404, times=2)
    with structlog.testing.capture_logs() as logs:
        outcome = await harness.sync_changed(settings, NAME, make_ids(4))
    assert (outcome.result, outcome.error) == (
        "failed",
        'WalkMe answered 404 for update: {"error": "scripted_404"}',
    )
    assert [(r.kind, r.status) for r in segment_requests(harness.sandbox)] == [("update", 404)] * 2
    assert len(named(logs, "segment.recreating")) == 1


# -- how a run that goes wrong ends -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "error", "interrupted"),
    [
        (SourceError("the table is locked"), "the table is locked", False),
        (SourceError(""), "SourceError", False),
        (StateError("the store is read-only"), "the store is read-only", False),
        (RuntimeError("a bug"), "internal error: RuntimeError: a bug", False),
        (SourceError("sent Bearer abcdef123456"), "sent Bearer [redacted]", False),
        (Interrupted("stopped by shutdown"), "stopped by shutdown", True),
        (LeaseLost(NAME), str(LeaseLost(NAME)), True),
    ],
    ids=["source", "source-no-text", "store", "bug", "secret", "shutdown", "lease"],
)
async def test_a_failure_while_reading_fails_only_that_run_and_is_stored(
    harness: Harness,
    runtime_of: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    error: str,
    interrupted: bool,
) -> None:
    """Whatever the source's read raises ends the run failed with its error (never a
    credential), stored in the history; a shutdown or a lost lease is an interruption,
    and only a bug is logged as an internal error."""

    async def failing(self: FileSource) -> AsyncIterator[Chunk]:
        raise raised
        yield ""  # an async generator

    monkeypatch.setattr(FileSource, "chunks", failing)
    settings = harness.settings([harness.mapping(NAME, make_ids(2))])
    with structlog.testing.capture_logs() as logs:
        outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.error, outcome.interrupted) == ("failed", error, interrupted)
    bug = isinstance(raised, RuntimeError)
    assert len(named(logs, "segment.internal_error")) == int(bug)
    assert segment_requests(harness.sandbox) == []
    [run] = await (await store_of(runtime_of, settings)).history(NAME, 10)
    assert (run.result, run.error) == ("failed", error)


@pytest.mark.parametrize("transform", [[], ["lower"]], ids=["plain", "transformed"])
async def test_a_value_that_is_no_id_fails_the_run_naming_the_source(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, transform: list[str]
) -> None:
    """A source value that is neither text nor an integer is a source error that
    names the source, not a bug, with or without a transform."""

    async def with_a_float(self: FileSource) -> AsyncIterator[Chunk]:
        yield ["a@x.io", 1.5]

    monkeypatch.setattr(FileSource, "chunks", with_a_float)
    settings = harness.settings([harness.mapping(NAME, ["a@x.io"], transform=transform)])
    with structlog.testing.capture_logs() as logs:
        outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith(FileSource(harness.folder / f"{NAME}.txt").describe() + ": ")
    assert named(logs, "segment.internal_error") == []


async def test_a_store_that_cannot_close_the_run_fails_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synced run whose result the store cannot record is failed, with the store's
    error; a run that failed already keeps its own error."""

    async def cannot_finish(self: RunLog, *args: object, **kwargs: object) -> None:
        raise StateError("disk full")

    monkeypatch.setattr(RunLog, "finish_run", cannot_finish)
    settings = harness.settings([harness.mapping(NAME, make_ids(2))])
    outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.error, outcome.added) == ("failed", "disk full", 2)

    async def failing(self: FileSource) -> AsyncIterator[Chunk]:
        raise SourceError("unreadable")
        yield ""  # an async generator

    monkeypatch.setattr(FileSource, "chunks", failing)
    outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.error) == ("failed", "unreadable")
