"""A file source whose bytes did not change since the last successful run is not
read again; anything that could make that shortcut wrong turns it off."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import structlog

from syncd.ids import IdText
from syncd.sources.base import Chunk
from syncd.sources.file import FileSource
from syncd.state.snapshots import SnapshotStore
from tests.support.harness import Harness, segment_requests
from tests.support.ids import make_ids, write_ids
from tests.support.stores import with_store


async def test_unchanged_file_is_not_read_and_sends_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = make_ids(3_000)
    settings = harness.settings([harness.mapping("Fp", ids)])
    first = await harness.sync_one(settings)
    assert (first.result, first.unchanged, first.added) == ("synced", False, 3_000)
    harness.sandbox.clear_requests()

    again = await harness.sync_one(settings)
    assert (again.result, again.unchanged, again.requests) == ("synced", True, 0)
    assert harness.sandbox.requests == []

    # Same ids, new order: new bytes, so the file is read again; its ids are the ones
    # the last run read (the source digest), so the snapshot is not read at all.
    harness.source("Fp", list(reversed(ids)))
    with monkeypatch.context() as patched:
        patched.setattr(SnapshotStore, "snapshot", snapshot_must_not_be_read)
        reordered = await harness.sync_one(settings)
    assert (reordered.result, reordered.unchanged, reordered.error) == ("synced", True, None)
    assert segment_requests(harness.sandbox) == []

    # One id changed: compared in full.
    harness.source("Fp", [*ids[1:], "newcomer"])
    changed = await harness.sync_one(settings)
    assert (changed.unchanged, changed.added, changed.removed) == (False, 1, 1)
    assert harness.sandbox.members(harness.guid("Fp")) == {*ids[1:], "newcomer"}


async def snapshot_must_not_be_read(
    store: SnapshotStore, name: str, size: int
) -> AsyncIterator[IdText]:
    raise AssertionError(f"the snapshot of {name} was read")
    yield IdText()  # an async generator: raises when it is read


async def test_a_run_that_did_not_finish_turns_the_shortcut_off(harness: Harness) -> None:
    ids = make_ids(2_000)
    settings = harness.settings([harness.mapping("Fp", ids)])
    await harness.sync_one(settings)
    # A run starts (and dies before finishing, as under SIGKILL): WalkMe may have
    # changed, so the file's unchanged bytes no longer vouch for the snapshot.
    await with_store(
        settings.state_url,
        lambda store: store.begin_run("Fp", "killed-run", settings.walkme_system_guid, None),
    )
    after = await harness.sync_one(settings)
    assert (after.result, after.unchanged) == ("synced", False)
    assert harness.sandbox.members(harness.guid("Fp")) == set(ids)
    # Synced again: the shortcut is back.
    assert (await harness.sync_one(settings)).unchanged is True


async def test_a_pending_batch_is_replayed_even_when_the_file_is_unchanged(
    harness: Harness,
) -> None:
    """The shortcut never skips a pending batch: a batch remembered as sent whose
    answer was lost is replayed first, whatever the source's fingerprint says."""
    ids = make_ids(500)
    settings = harness.settings([harness.mapping("Fp", ids)])
    await harness.sync_one(settings)
    # Remembered as sent (its answer lost) while the fingerprint still vouches.
    await with_store(settings.state_url, lambda store: store.begin_batch("Fp", "add", ["late"]))
    harness.sandbox.clear_requests()
    after = await harness.sync_one(settings)
    assert after.unchanged is False
    first, *_ = segment_requests(harness.sandbox)
    assert (first.action, first.n_ids) == ("add", 1)
    # The replayed id is not in the file: the diff that follows takes it out again.
    assert harness.sandbox.members(harness.guid("Fp")) == set(ids)


async def test_reset_and_a_held_run_are_never_skipped(harness: Harness) -> None:
    ids = make_ids(1_000)
    settings = harness.settings([harness.mapping("Fp", ids)])
    await harness.sync_one(settings)
    await with_store(settings.state_url, lambda store: store.reset("Fp"))
    rebuilt = await harness.sync_one(settings)
    assert (rebuilt.unchanged, rebuilt.added) == (False, 1_000)
    assert [r.action for r in segment_requests(harness.sandbox)][-1] == "override"

    harness.source("Fp", ids[:10])  # the guard holds this
    assert (await harness.sync_one(settings)).result == "held"
    held_again = await harness.sync_one(settings)
    assert (held_again.result, held_again.unchanged) == ("held", False)


async def test_a_file_replaced_during_a_run_records_the_digest_of_what_was_read(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shortcut never vouches for bytes the run did not diff: here the file the
    cheap check saw is swapped for an older one (atomic rename) before the run reads
    it, then put back. Later runs must still deliver the members of the file."""
    old, new = make_ids(1_000), make_ids(1_200)
    settings = harness.settings([harness.mapping("Fp", old)])
    assert (await harness.sync_one(settings)).added == 1_000
    path = harness.source("Fp", new)

    check = FileSource.fingerprint

    async def check_then_swap(self: FileSource) -> str | None:
        seen = await check(self)
        write_ids(path, old)  # lands between the check and the read
        return seen

    monkeypatch.setattr(FileSource, "fingerprint", check_then_swap)
    swapped = await harness.sync_one(settings)
    assert (swapped.result, swapped.added) == ("synced", 0)
    monkeypatch.undo()

    write_ids(path, new)  # the file the check saw is back
    after = await harness.sync_one(settings)
    assert (after.result, after.unchanged, after.added) == ("synced", False, 200)
    assert harness.sandbox.members(harness.guid("Fp")) == set(new)
    assert (await harness.sync_one(settings)).unchanged is True


async def test_a_file_truncated_while_it_is_read_fails_the_run_and_sends_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer truncating the file mid-read would otherwise remove a third of the
    segment and add the fragment of the cut line."""
    ids = make_ids(200_000)
    settings = harness.settings([harness.mapping("Fp", ids)])
    assert (await harness.sync_one(settings)).added == 200_000
    path = harness.source("Fp", reversed(ids))  # new bytes: the next run reads them
    harness.sandbox.clear_requests()

    chunks = FileSource.chunks

    async def chunks_while_truncated(self: FileSource) -> AsyncIterator[Chunk]:
        first = True
        async for chunk in chunks(self):
            yield chunk
            if first:
                with path.open("r+b") as handle:
                    handle.truncate(path.stat().st_size * 65 // 100 + 7)
                first = False

    monkeypatch.setattr(FileSource, "chunks", chunks_while_truncated)
    with structlog.testing.capture_logs() as logs:
        outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert f"{path} changed while being read; the next run reads it again" in outcome.error
    assert segment_requests(harness.sandbox) == []
    assert not [entry for entry in logs if entry["event"] == "segment.internal_error"]
    monkeypatch.undo()

    harness.source("Fp", reversed(ids))
    again = await harness.sync_one(settings)
    assert (again.result, again.unchanged, again.added, again.removed) == (
        "synced",
        False,
        0,
        0,
    )
    assert harness.sandbox.members(harness.guid("Fp")) == set(ids)
