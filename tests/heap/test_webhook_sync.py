"""From Heap's webhook pages to WalkMe: the engine against the sandbox.

Pages go over real HTTP to a running receiver; the engine then runs through
``syncd.app.open_runtime`` on the same state file, as ``syncd run`` wires it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from syncd.app import open_runtime
from syncd.engine import Outcome
from syncd.sandbox import SANDBOX_SYSTEM_GUID, WalkMeSandbox
from syncd.settings import ConfigError, Settings
from tests.support.heap import (
    FREE_CUSTOMERS,
    WEBHOOK_SECRET,
    Receiver,
    make_settings,
    new_task,
    page,
    post_signed,
    start_receiver,
)

FREE_MAPPING: dict[str, Any] = {
    "name": "Free Customers",
    "source": {"type": "heap_webhook", "heap_segment_id": FREE_CUSTOMERS},
}
NON_ASCII = ["zoë@exämple.com", "用户@例子.中国", "Ünïcödé.Case@Example.com"]


def _settings(
    sandbox: WalkMeSandbox, receiver: Receiver, segments: list[dict[str, Any]] | None, **extra: Any
) -> Settings:
    return make_settings(
        sandbox.url,
        receiver.state_url,
        segments=segments,
        heap_webhook_secret=WEBHOOK_SECRET,
        **extra,
    )


async def _sync(settings: Settings) -> dict[str, Outcome]:
    async with open_runtime(settings, settings.mappings()) as runtime:
        outcomes = await runtime.engine.sync_all()
    return {outcome.segment: outcome for outcome in outcomes}


async def _send_task(
    http: aiohttp.ClientSession,
    receiver: Receiver,
    pages: list[dict[str, list[str]]],
    *,
    segment_id: int = FREE_CUSTOMERS,
    name: str = "Free Customers",
) -> None:
    task = new_task()
    for number, content in enumerate(pages, start=1):
        body = page(
            task=task, number=number, total=len(pages), segment_id=segment_id, name=name,
            add=content.get("add", []), remove=content.get("remove", []),
        )
        answer = await post_signed(http, receiver.url, body)
        assert answer.status == 200, answer.body


def _segment_members(sandbox: WalkMeSandbox, **criteria: str) -> set[str]:
    record = sandbox.find(**criteria)
    assert record is not None, f"no WalkMe segment with {criteria}"
    return sandbox.members(record.guid)


# ------------------------------------------------------------------------ configured mapping


async def test_webhook_membership_is_synced_verbatim_to_walkme(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    first = {f"user{i}@email.com" for i in range(1, 8)}
    await _send_task(
        http,
        receiver,
        [
            {"add": sorted(first)[:4]},
            {"add": sorted(first)[4:] + NON_ASCII[:2]},
            {"add": NON_ASCII[2:]},
        ],
    )
    settings = _settings(sandbox, receiver, [FREE_MAPPING])
    outcomes = await _sync(settings)
    assert outcomes["Free Customers"].result == "synced", outcomes["Free Customers"].error
    assert _segment_members(sandbox, name="Free Customers") == first | set(NON_ASCII)

    # Heap's next sync: some leave, some join. Pages arrive out of order.
    task = new_task()
    second_pages = [
        page(task=task, number=2, total=2, add=["late@email.com"], remove=[NON_ASCII[0]]),
        page(task=task, number=1, total=2, add=["new@email.com"],
             remove=["user1@email.com", "user2@email.com"]),
    ]
    for body in second_pages:
        assert (await post_signed(http, receiver.url, body)).status == 200
    outcomes = await _sync(settings)
    assert outcomes["Free Customers"].result == "synced", outcomes["Free Customers"].error
    expected = (first - {"user1@email.com", "user2@email.com"} | set(NON_ASCII[1:])) | {
        "new@email.com",
        "late@email.com",
    }
    assert _segment_members(sandbox, name="Free Customers") == expected
    assert sandbox.count("create") == 1


async def test_heap_segment_without_a_complete_task_fails_clearly_and_sends_nothing(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    task = new_task()
    body = page(task=task, number=1, total=3, add=["a@x.com"])
    assert (await post_signed(http, receiver.url, body)).status == 200
    settings = _settings(sandbox, receiver, [FREE_MAPPING])

    outcome = (await _sync(settings))["Free Customers"]
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert "no complete sync from Heap yet" in outcome.error
    assert str(FREE_CUSTOMERS) in outcome.error
    assert sandbox.requests == []  # not even a token


async def test_configured_heap_segment_with_no_page_at_all_fails_clearly(
    receiver: Receiver, sandbox: WalkMeSandbox
) -> None:
    settings = _settings(sandbox, receiver, [FREE_MAPPING])
    outcome = (await _sync(settings))["Free Customers"]
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert "no complete sync from Heap yet" in outcome.error
    assert sandbox.requests == []


# ------------------------------------------------------------------------ auto-map


async def test_unknown_heap_segment_is_auto_mapped_and_follows_a_rename(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    heap_id = 4_242_424
    await _send_task(http, receiver, [{"add": ["t1@x.com", "t2@x.com"]}], segment_id=heap_id,
                     name="Trial Users")
    settings = _settings(sandbox, receiver, None)  # no mapping; SYNCD_HEAP_AUTO_MAP default
    assert settings.mappings() == []
    assert settings.auto_map

    async with open_runtime(settings, settings.mappings()) as runtime:
        mappings = await runtime.engine.mappings()
        assert list(mappings) == ["Trial Users"]
        mapping = mappings["Trial Users"]
        assert mapping.external_id == str(heap_id)
        assert mapping.source.type == "heap_webhook"
        first_run = await runtime.engine.sync_all()
    assert [o.result for o in first_run] == ["synced"], [o.error for o in first_run]
    record = sandbox.find(name="Trial Users", external_id=str(heap_id))
    assert record is not None
    guid = record.guid
    assert sandbox.members(guid) == {"t1@x.com", "t2@x.com"}

    # Renamed in Heap: the next sync carries the new name, the WalkMe segment stays.
    await _send_task(
        http, receiver, [{"add": ["t3@x.com"], "remove": ["t1@x.com"]}], segment_id=heap_id,
        name="Trial Users (renamed)",
    )
    outcomes = await _sync(settings)
    assert [o.result for o in outcomes.values()] == ["synced"]
    assert len(sandbox.segments) == 1
    assert sandbox.count("create") == 1
    assert sandbox.members(guid) == {"t2@x.com", "t3@x.com"}
    record = sandbox.find(external_id=str(heap_id))
    assert record is not None
    assert record.guid == guid


async def test_auto_mapped_segment_is_found_again_by_external_id_after_state_loss(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    """The external id (the Heap id) ties the WalkMe segment to the Heap segment."""
    heap_id = 77
    await _send_task(http, receiver, [{"add": ["a@x.com"]}], segment_id=heap_id, name="Seg")
    assert [o.result for o in (await _sync(_settings(sandbox, receiver, None))).values()] == [
        "synced"
    ]
    record = sandbox.find(external_id="77")
    assert record is not None

    # A new state file, fed the same Heap pages again.
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh = await start_receiver(fresh_dir)
    try:
        await _send_task(http, fresh, [{"add": ["a@x.com", "b@x.com"]}], segment_id=heap_id,
                         name="Seg")
        outcomes = await _sync(_settings(sandbox, fresh, None))
    finally:
        await fresh.stop()
    assert [o.result for o in outcomes.values()] == ["synced"], [
        o.error for o in outcomes.values()
    ]
    assert len(sandbox.segments) == 1
    assert sandbox.members(record.guid) == {"a@x.com", "b@x.com"}


async def test_auto_map_off_maps_nothing(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    await _send_task(http, receiver, [{"add": ["a@x.com"]}])
    await _send_task(http, receiver, [{"add": ["o@x.com"]}], segment_id=555, name="Other")
    settings = _settings(sandbox, receiver, [FREE_MAPPING], heap_auto_map=False)
    assert not settings.auto_map

    async with open_runtime(settings, settings.mappings()) as runtime:
        assert list(await runtime.engine.mappings()) == ["Free Customers"]
        assert await runtime.engine.mapping_for_heap_segment(555) is None
        outcomes = await runtime.engine.sync_all()
    assert [(o.segment, o.result) for o in outcomes] == [("Free Customers", "synced")]
    assert sandbox.find(external_id="555") is None
    assert sandbox.find(name="Other") is None
    assert _segment_members(sandbox, name="Free Customers") == {"a@x.com"}


async def test_auto_map_off_and_no_mapping_is_a_configuration_error(
    receiver: Receiver, sandbox: WalkMeSandbox
) -> None:
    settings = _settings(sandbox, receiver, None, heap_auto_map=False)
    with pytest.raises(ConfigError, match="no segments configured"):
        settings.mappings()


async def test_configured_mapping_takes_precedence_over_auto_map(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    """A configured heap_segment_id is never auto-mapped a second time."""
    await _send_task(http, receiver, [{"add": ["a@x.com"]}], name="Heap's own name")
    settings = _settings(
        sandbox,
        receiver,
        [{"name": "Free (configured)", "source": FREE_MAPPING["source"]}],
    )
    outcomes = await _sync(settings)
    assert list(outcomes) == ["Free (configured)"]
    assert outcomes["Free (configured)"].result == "synced"
    assert len(sandbox.segments) == 1


async def test_two_heap_segments_with_the_same_name_are_not_silently_merged(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    """Two Heap segments (e.g. two Heap environments) both called "Trial".

    Each must either sync into its own WalkMe segment (external id = its Heap id),
    or be reported with a ``heap.auto_map_conflict`` warning. Neither may vanish
    silently.
    """
    await _send_task(http, receiver, [{"add": ["one@x.com"]}], segment_id=101, name="Trial")
    await _send_task(http, receiver, [{"add": ["two@x.com"]}], segment_id=202, name="Trial")
    settings = _settings(sandbox, receiver, None)
    with structlog.testing.capture_logs() as logs:
        await _sync(settings)
    conflicts = {
        entry.get("heap_segment_id") for entry in logs if entry["event"] == "heap.auto_map_conflict"
    }
    for heap_id, member in ((101, "one@x.com"), (202, "two@x.com")):
        record = sandbox.find(external_id=str(heap_id))
        synced = record is not None and sandbox.members(record.guid) == {member}
        assert synced or heap_id in conflicts, (
            f"Heap segment {heap_id} was neither synced nor reported as a conflict"
        )


async def test_heap_segment_with_a_very_long_name_does_not_break_other_segments(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    """Heap does not document a limit on segment names; a mapping name allows 200.

    An auto-mapped segment whose name is too long must not make every other
    segment's sync fail (engine.mappings() is called for every run).
    """
    await _send_task(http, receiver, [{"add": ["a@x.com"]}])
    await _send_task(http, receiver, [{"add": ["b@x.com"]}], segment_id=999, name="L" * 260)
    settings = _settings(sandbox, receiver, [FREE_MAPPING])
    outcomes = await _sync(settings)
    assert outcomes["Free Customers"].result == "synced"
    assert _segment_members(sandbox, name="Free Customers") == {"a@x.com"}


async def test_auto_mapped_segment_uses_the_configured_system(
    receiver: Receiver, http: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    await _send_task(http, receiver, [{"add": ["a@x.com"]}], segment_id=31, name="Sys")
    await _sync(_settings(sandbox, receiver, None))
    record = sandbox.find(external_id="31")
    assert record is not None
    assert record.system_guid == SANDBOX_SYSTEM_GUID
