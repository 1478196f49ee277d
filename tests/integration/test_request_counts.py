"""Each run reports the WalkMe requests it sent, whatever runs beside it."""

from __future__ import annotations

from tests.support.harness import Harness
from tests.support.ids import make_ids


async def test_runs_side_by_side_each_count_only_their_own_requests(harness: Harness) -> None:
    """Three new segments synced at once: each run counts its list, its create and its
    two adds; the one token request counts for the run that sent it, so together
    the runs account for every request WalkMe saw, none twice."""
    mappings = [harness.mapping(f"seg{i}", make_ids(30, f"s{i}-")) for i in range(3)]
    settings = harness.settings(mappings, batch_size=10, concurrency=3)

    outcomes = await harness.sync(settings)

    assert [outcome.result for outcome in outcomes] == ["synced"] * 3
    kinds = [record.kind for record in harness.sandbox.requests]
    assert sorted(kinds) == sorted(["token"] + ["list", "create", "update", "update"] * 3)
    assert sorted(outcome.requests for outcome in outcomes) == [4, 4, 5]


async def test_a_run_that_sends_nothing_counts_no_requests(harness: Harness) -> None:
    """An unchanged source: the second run reads nothing and asks WalkMe nothing."""
    settings = harness.settings([harness.mapping("seg", make_ids(5))])
    first = await harness.sync_one(settings)
    second = await harness.sync_one(settings)

    assert first.requests == 3  # token, list, and the create that carried the ids
    assert (second.unchanged, second.requests) == (True, 0)
