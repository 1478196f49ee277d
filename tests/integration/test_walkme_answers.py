"""Undocumented answer shapes and segments deleted behind syncd's back."""

from __future__ import annotations

import pytest

from syncd.sandbox import ListShape
from tests.support.harness import (
    Harness,
    HarnessFactory,
    delete_segment,
    segment_requests,
    segments_named,
)
from tests.support.ids import make_ids

SHAPES: list[ListShape] = ["bare", "data", "segments"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_create_without_guid_is_found_by_listing(
    make_harness: HarnessFactory, shape: ListShape
) -> None:
    harness = await make_harness(create_returns_guid=False, list_shape=shape)
    sandbox = harness.sandbox
    source = make_ids(2_500)
    settings = harness.settings([harness.mapping("No GUID", source)], batch_size=1_000)

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    guid = harness.guid("No GUID")
    sent = segment_requests(sandbox)
    assert [r.kind for r in sent] == ["create", "update", "update"]
    assert all(r.path.endswith(guid) for r in sent[1:])
    assert sandbox.members(guid) == set(source)
    assert len(segments_named(sandbox, "No GUID")) == 1

    # The GUID found by listing is remembered: the next change goes to the same segment.
    changed = [*source[1:], "new@example.com"]
    outcome = await harness.sync_changed(settings, "No GUID", changed)
    assert outcome.result == "synced", outcome.error
    assert [r.action for r in segment_requests(sandbox)] == ["remove", "add"]
    assert sandbox.count("list") == 0
    assert sandbox.members(guid) == set(changed)


@pytest.mark.parametrize("shape", SHAPES)
async def test_adoption_by_name_reads_every_list_shape(
    make_harness: HarnessFactory, shape: ListShape
) -> None:
    harness = await make_harness(list_shape=shape)
    sandbox = harness.sandbox
    settings = harness.settings([harness.mapping("Listed", ["a@example.com"])])
    first = await harness.sync_one(settings)
    assert first.result == "synced", first.error
    guid = harness.guid("Listed")

    # A second state store (a fresh install) must find the segment, not make another.
    other = harness.folder / "fresh"
    other.mkdir()
    fresh = harness.settings(
        [harness.mapping("Listed", ["a@example.com", "b@example.com"])],
        state_url="sqlite:///" + str(other / "state.db"),
    )
    sandbox.clear_requests()
    outcome = await harness.sync_one(fresh)
    assert outcome.result == "synced", outcome.error
    assert [(r.kind, r.action) for r in segment_requests(sandbox)] == [("update", "override")]
    assert len(segments_named(sandbox, "Listed")) == 1
    assert sandbox.members(guid) == {"a@example.com", "b@example.com"}


async def test_segment_deleted_in_walkme_is_recreated_with_full_membership(
    harness: Harness,
) -> None:
    sandbox = harness.sandbox
    source = make_ids(2_500)
    settings = await harness.synced("Deleted", source, batch_size=1_000)
    old_guid = harness.guid("Deleted")

    await delete_segment(sandbox, old_guid)
    changed = [*source[5:], "new1@example.com", "new2@example.com"]
    outcome = await harness.sync_changed(settings, "Deleted", changed)
    assert outcome.result == "synced", outcome.error

    assert sandbox.count("update", status=404) == 1
    new = segments_named(sandbox, "Deleted")
    assert len(new) == 1
    assert new[0]["guid"] != old_guid
    new_guid = new[0]["guid"]
    assert sandbox.members(new_guid) == set(changed)  # everyone, not only the change
    created = [r for r in segment_requests(sandbox) if r.status < 300]
    assert [r.kind for r in created] == ["create", "update", "update"]

    # And the new GUID sticks.
    sandbox.clear_requests()
    harness.source("Deleted", changed[:-1])
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert [(r.action, r.status) for r in segment_requests(sandbox)] == [("remove", 200)]
    assert sandbox.members(new_guid) == set(changed[:-1])


async def test_segment_deleted_in_walkme_before_an_add_only_change(harness: Harness) -> None:
    sandbox = harness.sandbox
    source = make_ids(30)
    settings = await harness.synced("Gone", source)
    await delete_segment(sandbox, harness.guid("Gone"))

    harness.source("Gone", [*source, "extra@example.com"])
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert sandbox.members(harness.guid("Gone")) == {*source, "extra@example.com"}
    assert len(segments_named(sandbox, "Gone")) == 1
