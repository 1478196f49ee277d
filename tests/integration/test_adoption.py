"""Adopting segments that already exist in WalkMe, and `syncd reset`."""

from __future__ import annotations

import pytest

from syncd.sandbox import RequestRecord
from syncd.settings import Settings
from tests.support.harness import (
    SEGMENTS_PATH,
    Harness,
    cli_env,
    raw_call,
    seed_segment,
    segment_requests,
    segments_named,
)
from tests.support.ids import make_ids
from tests.support.processes import run_cli_async
from tests.support.stores import with_store

STALE = ["stale1@example.com", "stale2@example.com", "user0000001@example.com"]
REBUILD_HELD = (
    "the source returned no ids, and rebuilding the segment (adopted or reset;"
    " WalkMe cannot show what it holds) would empty it"
)


async def _sync_rebuilding(harness: Harness, settings: Settings) -> list[RequestRecord]:
    """Sync a source of three batches and check WalkMe was rebuilt: an override with
    the first batch, then two adds. Returns the requests sent, for the test's own checks."""
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    sent = segment_requests(harness.sandbox)
    assert [(r.kind, r.action) for r in sent] == [
        ("update", "override"),
        ("update", "add"),
        ("update", "add"),
    ]
    return sent


async def test_adopts_existing_segment_by_name(harness: Harness) -> None:
    sandbox = harness.sandbox
    guid = await seed_segment(sandbox, "Existing", STALE)
    sandbox.clear_requests()
    source = make_ids(2_500)
    settings = harness.settings([harness.mapping("Existing", source)], batch_size=1_000)

    sent = await _sync_rebuilding(harness, settings)
    assert all(guid in r.path for r in sent)
    assert sandbox.count("create") == 0
    assert len(segments_named(sandbox, "Existing")) == 1
    assert sandbox.members(guid) == set(source)  # stale members are gone

    # Adopted and rebuilt: from now on plain updates.
    changed = [*source[10:], "late@example.com"]
    outcome = await harness.sync_changed(settings, "Existing", changed)
    assert outcome.result == "synced", outcome.error
    assert [r.action for r in segment_requests(sandbox)] == ["remove", "add"]
    assert sandbox.members(guid) == set(changed)


async def test_adopts_by_external_id_when_the_mapping_has_one(harness: Harness) -> None:
    sandbox = harness.sandbox
    # Same name, other external id: must not be taken.
    decoy = await seed_segment(sandbox, "Customers", ["decoy@example.com"], external_id="other")
    # Other name, same external id: this is the one.
    guid = await seed_segment(sandbox, "Old customers name", STALE, external_id="heap-42")
    sandbox.clear_requests()
    source = make_ids(1_500)
    mapping = harness.mapping("Customers", source, external_id="heap-42")
    settings = harness.settings([mapping], batch_size=1_000)

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    sent = segment_requests(sandbox)
    assert [r.action for r in sent] == ["override", "add"]
    assert all(guid in r.path for r in sent)
    assert sandbox.members(guid) == set(source)
    assert sandbox.members(decoy) == {"decoy@example.com"}
    assert len(sandbox.state()["segments"]) == 2


async def test_segment_guid_in_mapping_adopts_that_guid(harness: Harness) -> None:
    sandbox = harness.sandbox
    guid = await seed_segment(sandbox, "Named differently in WalkMe", STALE)
    other = await seed_segment(sandbox, "Pinned", ["other@example.com"])  # same name, wrong one
    sandbox.clear_requests()
    source = make_ids(1_200)
    # Upper case: the GUID is matched and sent in the canonical hyphenated lower form.
    mapping = harness.mapping("Pinned", source, segment_guid=guid.upper())
    settings = harness.settings([mapping], batch_size=1_000)

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    sent = segment_requests(sandbox)
    assert [r.action for r in sent] == ["override", "add"]
    assert all(r.path.endswith(guid) for r in sent)
    assert sandbox.count("create") == 0
    assert sandbox.members(guid) == set(source)
    assert sandbox.members(other) == {"other@example.com"}

    sandbox.clear_requests()
    again = await harness.sync_one(settings)
    assert again.result == "synced", again.error
    assert segment_requests(sandbox) == []


async def test_segment_guid_unknown_to_walkme_fails_without_creating(harness: Harness) -> None:
    sandbox = harness.sandbox
    missing = "0a0b0c0d-1111-4222-8333-444455556666"
    mapping = harness.mapping("Ghost", make_ids(10), segment_guid=missing)
    outcome = await harness.sync_one(harness.settings([mapping]))
    assert outcome.result == "failed"
    assert outcome.error
    assert "404" in outcome.error
    assert sandbox.count("create") == 0
    assert sandbox.state()["segments"] == []


async def test_reset_makes_the_next_run_override(harness: Harness) -> None:
    sandbox = harness.sandbox
    source = make_ids(2_100)
    mapping = harness.mapping("Resettable", source)
    settings = harness.settings([mapping], batch_size=1_000)
    assert (await harness.sync_one(settings)).result == "synced"
    guid = harness.guid("Resettable")

    # Someone edits the segment behind syncd's back; a reset repairs it.
    status, _ = await raw_call(
        sandbox, "PUT", f"{SEGMENTS_PATH}/{guid}", {"action": "add", "userIds": ["intruder@x.com"]}
    )
    assert status == 200
    env = cli_env(sandbox.url, harness.folder, [mapping])
    code, out, err = await run_cli_async("reset", "--segment", "Resettable", env=env)
    assert code == 0, err
    assert "Resettable" in out

    sandbox.clear_requests()
    sent = await _sync_rebuilding(harness, settings)
    assert all(r.path.endswith(guid) for r in sent)
    assert sandbox.members(guid) == set(source)

    # After the rebuild: back to plain updates.
    sandbox.clear_requests()
    assert (await harness.sync_one(settings)).result == "synced"
    assert segment_requests(sandbox) == []


async def test_reset_of_unknown_segment_is_a_config_error(harness: Harness) -> None:
    mapping = harness.mapping("Known", make_ids(1))
    env = cli_env(harness.sandbox.url, harness.folder, [mapping])
    code, _out, err = await run_cli_async("reset", "--segment", "Nope", env=env)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["found by name", "segment_guid", "reset"])
async def test_an_empty_source_never_rebuilds_a_segment_into_nothing(
    harness: Harness, how: str
) -> None:
    """Adopting a segment (or rebuilding one after a reset) replaces members WalkMe
    cannot show: from a source with no ids that would empty it. The removal guard
    holds it, the dry run says so, and only ``--force`` sends it."""
    sandbox = harness.sandbox
    guid = await seed_segment(sandbox, "Existing", STALE)
    extra = {"segment_guid": guid} if how == "segment_guid" else {}
    settings = harness.settings([harness.mapping("Existing", [], **extra)])
    held_members = set(STALE)
    if how == "reset":
        synced = await harness.sync_changed(settings, "Existing", ["kept@example.com"])
        assert synced.result == "synced", synced.error
        await with_store(harness.state_url, lambda store: store.reset("Existing"))
        harness.source("Existing", [])
        held_members = {"kept@example.com"}
    sandbox.clear_requests()
    for _ in range(2):  # held, and held again while the source stays empty
        [outcome] = await harness.sync(settings)
        assert (outcome.result, outcome.error) == ("held", REBUILD_HELD)
        assert [r for r in segment_requests(sandbox) if r.kind == "update"] == []
        assert sandbox.members(guid) == held_members
    [planned] = await harness.sync(settings, dry_run=True)
    assert planned.plan is not None
    assert planned.plan.held is not None
    assert planned.plan.held.reason == REBUILD_HELD
    [forced] = await harness.sync(settings, force=True)
    assert forced.result == "synced", forced.error
    assert sandbox.members(guid) == set()
    assert sandbox.count("create") == 0
