"""Throttling, server errors, dropped connections, tokens."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Callable

import pytest

from syncd.engine import Outcome
from syncd.sandbox import Faults
from syncd.settings import Settings
from tests.support.harness import Harness, HarnessFactory, segment_requests, segments_named
from tests.support.ids import make_ids
from tests.support.waiting import wait_until_async


async def synced_then_changed(
    harness: Harness, **overrides: object
) -> tuple[Settings, str, list[str]]:
    """A segment synced once (1,500 ids), then its source changed: +700 / -300."""
    source = make_ids(1_500)
    settings = await harness.synced("Flaky", source, batch_size=1_000, **overrides)
    changed = source[300:] + make_ids(700, prefix="new")
    harness.source("Flaky", changed)
    harness.sandbox.clear_requests()
    return settings, harness.guid("Flaky"), changed


async def timed_sync(harness: Harness, settings: Settings) -> tuple[Outcome, float]:
    started = time.monotonic()
    outcome = await harness.sync_one(settings)
    return outcome, time.monotonic() - started


async def throttled_sync(
    harness: Harness, retry_max_wait: float, times: int, retry_after: Callable[[], str]
) -> float:
    """The segment of ``synced_then_changed`` synced again through ``times`` 429s, each
    with the Retry-After ``retry_after()`` gives just before: the run must end synced, the
    segment equal to its changed source. Returns the seconds the run took."""
    settings, guid, changed = await synced_then_changed(harness, retry_max_wait=retry_max_wait)
    harness.sandbox.script(429, times=times, retry_after=retry_after())
    outcome, elapsed = await timed_sync(harness, settings)
    assert outcome.result == "synced", outcome.error
    assert harness.sandbox.members(guid) == set(changed)
    return elapsed


async def test_429_retry_after_seconds_is_honoured(harness: Harness) -> None:
    sandbox = harness.sandbox
    elapsed = await throttled_sync(harness, 10.0, times=1, retry_after=lambda: "2")
    assert sandbox.count(status=429) == 1
    assert 1.9 <= elapsed < 6, elapsed
    applied = [r.action for r in segment_requests(sandbox) if r.applied]
    assert applied == ["remove", "add"]


def _in_3_seconds() -> str:
    # HTTP-dates carry whole seconds: this asks for a wait of more than 2 s.
    return email.utils.formatdate(time.time() + 3, usegmt=True)


async def test_429_retry_after_http_date_is_honoured(harness: Harness) -> None:
    elapsed = await throttled_sync(harness, 10.0, times=1, retry_after=_in_3_seconds)
    assert harness.sandbox.count(status=429) == 1
    assert 1.5 <= elapsed < 7, elapsed


async def test_retry_after_is_capped_by_retry_max_wait(harness: Harness) -> None:
    elapsed = await throttled_sync(harness, 0.5, times=2, retry_after=lambda: "3600")
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retried(harness: Harness, status: int) -> None:
    sandbox = harness.sandbox
    settings, guid, changed = await synced_then_changed(harness)
    sandbox.script(status, times=3)

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert sandbox.count(status=status) == 3
    assert sandbox.members(guid) == set(changed)
    applied = [r.action for r in segment_requests(sandbox) if r.applied]
    assert applied == ["remove", "add"]


async def test_server_errors_on_first_sync_list_and_create(harness: Harness) -> None:
    sandbox = harness.sandbox
    source = make_ids(2_200)
    settings = harness.settings([harness.mapping("First", source)], batch_size=1_000)
    # list, list again, then create: each answered with a different failure first.
    sandbox.script(503)
    sandbox.script(502)
    sandbox.script(500)
    sandbox.script(429, retry_after="0")
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert len(segments_named(sandbox, "First")) == 1
    assert sandbox.members(harness.guid("First")) == set(source)
    assert sandbox.count("create", applied=True) == 1


async def test_dropped_connections_after_apply_still_converge(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness(faults=Faults(seed=5, drop_rate=0.3))
    sandbox = harness.sandbox
    source = make_ids(9_000)
    settings = harness.settings([harness.mapping("Dropped", source)], batch_size=1_000)

    assert (await harness.sync_one(settings)).result == "synced"
    guid = harness.guid("Dropped")
    assert sandbox.members(guid) == set(source)
    changed = source[3_000:] + make_ids(2_500, prefix="new")
    harness.source("Dropped", changed)
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert sandbox.members(guid) == set(changed)
    assert len(sandbox.state()["segments"]) == 1
    assert sandbox.request_counts()["dropped"] >= 3

    # The snapshot agrees with WalkMe: nothing left to send.
    sandbox.faults = Faults()
    sandbox.clear_requests()
    assert (await harness.sync_one(settings)).result == "synced"
    assert segment_requests(sandbox) == []


async def test_dropped_create_answer_makes_no_second_segment(harness: Harness) -> None:
    sandbox = harness.sandbox
    source = make_ids(1_500)
    settings = harness.settings([harness.mapping("Once", source)], batch_size=1_000)
    sandbox.script_drop(times=2)  # the list, then the create: applied, never answered
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert len(segments_named(sandbox, "Once")) == 1
    assert sandbox.count("create") == 1
    assert sandbox.members(harness.guid("Once")) == set(source)


async def test_short_token_lifetime_gets_several_tokens(make_harness: HarnessFactory) -> None:
    harness = await make_harness(token_lifetime=1.0, faults=Faults(delay=0.2))
    sandbox = harness.sandbox
    source = make_ids(12_000)
    settings = harness.settings([harness.mapping("Slow", source)], batch_size=1_000)

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert outcome.duration_s >= 2.0
    assert sandbox.tokens_issued >= 2
    assert sandbox.members(harness.guid("Slow")) == set(source)
    assert sandbox.count("create") + sandbox.count("update", applied=True) == 12


async def test_tokens_revoked_mid_run_cost_one_refresh(make_harness: HarnessFactory) -> None:
    harness = await make_harness(faults=Faults(delay=0.1))
    sandbox = harness.sandbox
    source = make_ids(10_000)
    settings = harness.settings([harness.mapping("Revoked", source)], batch_size=1_000)

    run = asyncio.create_task(harness.sync_one(settings))
    await wait_until_async(lambda: sandbox.count("update") >= 3, 20, "three updates")
    sandbox.revoke_tokens()
    outcome = await asyncio.wait_for(run, 30)

    assert outcome.result == "synced", outcome.error
    assert sandbox.tokens_issued == 2
    assert sandbox.count(status=401) == 1
    assert sandbox.members(harness.guid("Revoked")) == set(source)
    assert sandbox.count("create") + sandbox.count("update", applied=True) == 10


async def test_retries_exhausted_fail_then_next_run_resumes_from_snapshot(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness(faults=Faults(delay=0.05))
    sandbox = harness.sandbox
    source = make_ids(6_000)
    settings = harness.settings(
        [harness.mapping("Exhausted", source)], batch_size=1_000, retry_attempts=2
    )
    run = asyncio.create_task(harness.sync_one(settings))
    await wait_until_async(
        lambda: sandbox.count("update", applied=True) >= 2, 20, "two applied updates"
    )
    sandbox.script(500, times=50)
    failed = await asyncio.wait_for(run, 30)
    assert failed.result == "failed"
    assert failed.error
    assert "500" in failed.error
    sandbox.clear_script()

    guid = harness.guid("Exhausted")
    applied = len(sandbox.members(guid))
    assert 0 < applied < len(source)
    assert applied % 1_000 == 0
    # The failed batch was tried exactly retry_attempts times.
    assert sandbox.count(status=500) == 2
    assert failed.added == applied

    sandbox.clear_requests()
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert sandbox.members(guid) == set(source)
    # Only the batches WalkMe never acknowledged are sent again.
    sent = segment_requests(sandbox)
    assert [r.action for r in sent] == ["add"] * math.ceil((len(source) - applied) / 1_000)
    assert outcome.added == len(source) - applied
