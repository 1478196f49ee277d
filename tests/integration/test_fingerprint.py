"""A file source whose bytes did not change since the last successful run is not
read again; anything that could make that shortcut wrong turns it off."""

from __future__ import annotations

from syncd.state import open_store
from tests.integration.conftest import Harness, make_ids, segment_requests


async def test_unchanged_file_is_not_read_and_sends_nothing(harness: Harness) -> None:
    ids = make_ids(3_000)
    settings = harness.settings([harness.mapping("Fp", ids)])
    first = await harness.sync_one(settings)
    assert (first.result, first.unchanged, first.added) == ("synced", False, 3_000)
    harness.sandbox.clear_requests()

    again = await harness.sync_one(settings)
    assert (again.result, again.unchanged, again.requests) == ("synced", True, 0)
    assert harness.sandbox.requests == []

    # Same ids, new order: new bytes, so a full diff, which finds nothing to send.
    harness.source("Fp", list(reversed(ids)))
    reordered = await harness.sync_one(settings)
    assert (reordered.result, reordered.unchanged) == ("synced", False)
    assert segment_requests(harness.sandbox) == []


async def test_a_run_that_did_not_finish_turns_the_shortcut_off(harness: Harness) -> None:
    ids = make_ids(2_000)
    settings = harness.settings([harness.mapping("Fp", ids)])
    await harness.sync_one(settings)
    # A run starts (and dies before finishing, as under SIGKILL): WalkMe may have
    # changed, so the file's unchanged bytes no longer vouch for the snapshot.
    store = await open_store(settings.state_url)
    try:
        await store.begin_run("Fp", "killed-run", settings.walkme_system_guid, None)
    finally:
        await store.close()
    after = await harness.sync_one(settings)
    assert (after.result, after.unchanged) == ("synced", False)
    assert harness.sandbox.members(harness.guid("Fp")) == set(ids)
    # Synced again: the shortcut is back.
    assert (await harness.sync_one(settings)).unchanged is True


async def test_reset_and_a_held_run_are_never_skipped(harness: Harness) -> None:
    ids = make_ids(1_000)
    settings = harness.settings([harness.mapping("Fp", ids)])
    await harness.sync_one(settings)
    store = await open_store(settings.state_url)
    try:
        await store.reset("Fp")
    finally:
        await store.close()
    rebuilt = await harness.sync_one(settings)
    assert (rebuilt.unchanged, rebuilt.added) == (False, 1_000)
    assert [r.action for r in segment_requests(harness.sandbox)][-1] == "override"

    harness.source("Fp", ids[:10])  # the guard holds this
    assert (await harness.sync_one(settings)).result == "held"
    held_again = await harness.sync_one(settings)
    assert (held_again.result, held_again.unchanged) == ("held", False)
