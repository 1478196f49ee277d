"""Convergence and exact request counts, in process over real sockets."""

from __future__ import annotations

import math
import time

import pytest

from syncd.sandbox import Faults, RequestKind
from tests.support.harness import BATCH, Harness, HarnessFactory, segment_requests
from tests.support.ids import make_ids

SIZES = [0, 1, 25_000, 25_001, 100_000]


def churn(size: int) -> tuple[int, int]:
    """(adds, removes) for a churn cycle on a segment of ``size`` members."""
    removes = math.ceil(size * 0.3)
    return removes + 1, removes


@pytest.mark.parametrize("size", SIZES, ids=[f"n={n}" for n in SIZES])
async def test_convergence_and_exact_request_counts(harness: Harness, size: int) -> None:
    sandbox = harness.sandbox
    source = make_ids(size)
    settings = harness.settings([harness.mapping("Segment", source)])

    # First sync: the segment is created with the first batch, the rest are adds.
    started = time.monotonic()
    first = await harness.sync_one(settings)
    first_s = time.monotonic() - started
    assert first.result == "synced", first.error
    sent = segment_requests(sandbox)
    assert len(sent) == max(1, math.ceil(size / BATCH))
    assert sent[0].kind == "create"
    assert all(r.kind == "update" and r.action == "add" for r in sent[1:])
    assert all(r.status < 300 for r in sent)
    assert all((r.n_ids or 0) <= BATCH for r in sent)
    assert sum(r.n_ids or 0 for r in sent) == size
    guid = harness.guid("Segment")
    assert sandbox.members(guid) == set(source)
    assert first.added == size
    assert first.removed == 0
    first_requests = len(sent)

    # Churn: A adds and R removes -> ceil(A/b) + ceil(R/b) updates, removes first.
    adds, removes = churn(size)
    changed = source[removes:] + make_ids(adds, prefix="new")
    harness.source("Segment", changed)
    sandbox.clear_requests()
    started = time.monotonic()
    second = await harness.sync_one(settings)
    churn_s = time.monotonic() - started
    assert second.result == "synced", second.error
    sent = segment_requests(sandbox)
    remove_batches, add_batches = math.ceil(removes / BATCH), math.ceil(adds / BATCH)
    assert [r.kind for r in sent] == ["update"] * (remove_batches + add_batches)
    assert [r.action for r in sent] == ["remove"] * remove_batches + ["add"] * add_batches
    assert sandbox.members(guid) == set(changed)
    assert (second.added, second.removed) == (adds, removes)
    churn_requests = len(sent)

    # No change: not one segment request.
    sandbox.clear_requests()
    started = time.monotonic()
    third = await harness.sync_one(settings)
    idle_s = time.monotonic() - started
    assert third.result == "synced", third.error
    assert segment_requests(sandbox) == []
    assert (third.added, third.removed) == (0, 0)
    assert sandbox.members(guid) == set(changed)
    assert len(sandbox.state()["segments"]) == 1

    print(
        f"\n[counts] n={size}: first sync {first_requests} segment requests in {first_s:.2f}s;"
        f" churn +{adds}/-{removes}: {churn_requests} requests in {churn_s:.2f}s;"
        f" no change: 0 requests in {idle_s:.2f}s"
    )


async def test_smaller_batch_size_splits_every_phase(harness: Harness) -> None:
    sandbox = harness.sandbox
    source = make_ids(5_500)
    settings = harness.settings([harness.mapping("Small batches", source)], batch_size=1_000)

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    sent = segment_requests(sandbox)
    assert [r.kind for r in sent] == ["create"] + ["update"] * 5
    assert [r.n_ids for r in sent] == [1_000] * 5 + [500]
    guid = harness.guid("Small batches")
    assert sandbox.members(guid) == set(source)

    changed = source[1_200:] + make_ids(2_500, prefix="more")
    outcome = await harness.sync_changed(settings, "Small batches", changed)
    assert outcome.result == "synced", outcome.error
    sent = segment_requests(sandbox)
    assert [r.action for r in sent] == ["remove"] * 2 + ["add"] * 3
    assert [r.n_ids for r in sent] == [1_000, 200, 1_000, 1_000, 500]
    assert sandbox.members(guid) == set(changed)


async def test_emptying_a_segment_sends_only_removes(harness: Harness) -> None:
    sandbox = harness.sandbox
    # The removal guard would hold an emptied source; this mapping turns it off.
    mapping = harness.mapping("Leaving", make_ids(3), max_remove_fraction=1.0)
    settings = harness.settings([mapping])
    assert (await harness.sync_one(settings)).result == "synced"
    guid = harness.guid("Leaving")

    outcome = await harness.sync_changed(settings, "Leaving", [])
    assert outcome.result == "synced", outcome.error
    assert [(r.kind, r.action, r.n_ids) for r in segment_requests(sandbox)] == [
        ("update", "remove", 3)
    ]
    assert sandbox.members(guid) == set()


async def test_emptied_source_is_held_by_default(harness: Harness) -> None:
    sandbox = harness.sandbox
    settings = harness.settings([harness.mapping("Guarded", make_ids(3))])
    assert (await harness.sync_one(settings)).result == "synced"
    guid = harness.guid("Guarded")

    outcome = await harness.sync_changed(settings, "Guarded", [])
    assert outcome.result == "held", outcome.error
    assert segment_requests(sandbox) == []
    assert sandbox.members(guid) == set(make_ids(3))


async def test_many_segments_at_limited_concurrency(harness: Harness) -> None:
    sandbox = harness.sandbox
    sources = {f"Segment {i}": make_ids(1_000 + i, prefix=f"s{i}-") for i in range(6)}
    settings = harness.settings(
        [harness.mapping(name, ids) for name, ids in sources.items()],
        concurrency=2,
        batch_size=400,
    )
    outcomes = await harness.sync(settings)
    assert [o.result for o in outcomes] == ["synced"] * 6, [o.error for o in outcomes]
    for name, ids in sources.items():
        assert sandbox.members(harness.guid(name)) == set(ids)
    assert sandbox.count("create") == 6
    assert sandbox.count("update") == sum(math.ceil(len(ids) / 400) - 1 for ids in sources.values())


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_concurrency_caps_the_segments_syncing_at_once(
    make_harness: HarnessFactory, concurrency: int
) -> None:
    """With SYNCD_CONCURRENCY=N and more segments than that, WalkMe sees exactly N
    segment calls in flight at the peak: the cap is reached and never passed."""
    # Every segment call takes 0.1 s, so syncs that may overlap do.
    harness = await make_harness(faults=Faults(delay=0.1))
    sandbox = harness.sandbox
    arrivals = 0
    in_flight: list[int] = []

    def arrived(kind: RequestKind) -> None:
        # A call is in flight from its arrival until the sandbox records its answer.
        nonlocal arrivals
        arrivals += 1
        answered = sum(1 for r in list(sandbox.requests) if r.kind != "token")
        in_flight.append(arrivals - answered)

    sandbox.on_request(arrived)
    mappings = [harness.mapping(f"Segment {i}", make_ids(5, f"c{i}-")) for i in range(6)]
    settings = harness.settings(mappings, concurrency=concurrency)
    outcomes = await harness.sync(settings)
    assert [o.result for o in outcomes] == ["synced"] * 6, [o.error for o in outcomes]
    assert max(in_flight) == concurrency
