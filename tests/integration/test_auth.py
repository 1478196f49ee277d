"""Credentials WalkMe refuses."""

from __future__ import annotations

from tests.support.harness import CLIENT_ID, Harness, HarnessFactory, segment_requests
from tests.support.ids import make_ids

WRONG_SECRET = "wrong-secret-3b9d1f0a"


async def test_wrong_secret_fails_naming_the_variable(harness: Harness) -> None:
    sandbox = harness.sandbox
    settings = harness.settings(
        [harness.mapping("Denied", make_ids(10))], walkme_client_secret=WRONG_SECRET
    )
    outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert "SYNCD_WALKME_CLIENT_SECRET" in outcome.error
    assert WRONG_SECRET not in outcome.error
    assert segment_requests(sandbox) == []
    # A refused key is not retried: one token call, one answer.
    assert sandbox.count("token") == 1
    assert sandbox.count("token", status=401) == 1


async def test_forbidden_client_fails_about_the_segments_api(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness(forbidden_clients=[CLIENT_ID])
    sandbox = harness.sandbox
    outcome = await harness.sync_one(harness.settings([harness.mapping("No", make_ids(10))]))
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert "Segments API" in outcome.error
    assert sandbox.count(status=403) == 1
    assert sandbox.count("create") == 0
    assert sandbox.state()["segments"] == []


async def test_unknown_system_fails_without_creating(harness: Harness) -> None:
    sandbox = harness.sandbox
    settings = harness.settings(
        [harness.mapping("Elsewhere", make_ids(10))],
        walkme_system_guid="0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e",
    )
    outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert outcome.error
    assert sandbox.count("create") == 0
    assert sandbox.state()["segments"] == []
