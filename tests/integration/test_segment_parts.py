"""The engine's segment parts on their own, against the sandbox and a SQLite state
store: which WalkMe segment a mapping writes to (the resolver), and a segment's life
beyond its runs (replica heartbeats, claims, orphans, delete)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import MutableMapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import structlog

from syncd.engine.lifecycle import SegmentInUse, SegmentLifecycle
from syncd.engine.mappings import BrokenMapping, MappingSet
from syncd.engine.resolve import Mode, SegmentResolver, first_batch_mode
from syncd.ids import SkippedIds
from syncd.sandbox import SANDBOX_SYSTEM_GUID
from syncd.settings import SegmentMapping
from syncd.state import SegmentState, StateStore
from syncd.walkme import WalkMeClient
from tests.integration.conftest import RuntimeFactory
from tests.support.harness import Harness, delete_segment, seed_segment
from tests.support.logs import named

GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
OTHER_GUID = "11111111-2222-4333-8444-555555555555"


async def resolve(
    store: StateStore,
    client: WalkMeClient,
    mapping: SegmentMapping,
    configured: Sequence[str] = ("vip",),
    tally: Counter[str] | None = None,
) -> tuple[str | None, Mode]:
    """The resolver's answer for ``mapping`` with ``configured`` mappings."""
    return await SegmentResolver(store, client, configured).resolve(
        mapping, SANDBOX_SYSTEM_GUID, Counter() if tally is None else tally
    )


async def opened(
    harness: Harness, runtime_of: RuntimeFactory, *mappings: dict[str, Any]
) -> tuple[StateStore, WalkMeClient, list[SegmentMapping]]:
    settings = harness.settings(list(mappings) or [harness.mapping("vip")])
    runtime = await runtime_of(settings)
    return runtime.store, runtime.client, settings.mappings()


async def known(store: StateStore, name: str, guid: str | None = None, **run: Any) -> None:
    """A segment the store knows (a run began), optionally with a GUID."""
    await store.begin_run(name, f"run-{name}", SANDBOX_SYSTEM_GUID, run.get("external_id"))
    if guid is not None:
        await store.adopt(name, guid, "created")
        await store.record_batch(name, f"run-{name}", "override", [])  # rebuilt: no override due


def lines(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


def state(**fields: Any) -> SegmentState:
    base = SegmentState("vip", SANDBOX_SYSTEM_GUID, GUID, None, "created", False, 0)
    return replace(base, **fields)


# -- how the first batch goes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "wanted", "mode"),
    [
        (None, None, "create"),
        (state(segment_guid=None), None, "create"),
        (state(segment_guid=None), GUID, "create"),
        (state(), None, "update"),
        (state(), GUID.upper(), "update"),  # the same GUID, spelled otherwise
        (state(), OTHER_GUID, "override"),
        (state(needs_override=True), None, "override"),
        (state(needs_override=True), GUID, "override"),
    ],
)
def test_first_batch_mode(
    harness: Harness, stored: SegmentState | None, wanted: str | None, mode: str
) -> None:
    [mapping] = harness.settings([harness.mapping("vip", segment_guid=wanted)]).mappings()
    assert first_batch_mode(stored, mapping) == mode


# -- the resolver --------------------------------------------------------------------------


async def test_a_mapping_naming_its_segment_guid_adopts_it_and_rebuilds(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, [mapping] = await opened(
        harness, runtime_of, harness.mapping("vip", segment_guid=OTHER_GUID.upper())
    )
    await known(store, "vip", GUID)
    with structlog.testing.capture_logs() as logs:
        found = await resolve(store, client, mapping)
    assert found == (OTHER_GUID, "override")
    stored = await store.get("vip")
    assert stored is not None
    assert (stored.segment_guid, stored.origin, stored.needs_override) == (
        OTHER_GUID,
        "adopted",
        True,
    )
    assert logs == [
        {
            "event": "segment.adopted",
            "segment_guid": OTHER_GUID,
            "by": "segment_guid",
            "log_level": "info",
        }
    ]
    assert harness.sandbox.requests == []  # nothing asked of WalkMe


@pytest.mark.parametrize("needs_override", [False, True])
async def test_a_known_segment_is_used_as_it_is(
    harness: Harness, runtime_of: RuntimeFactory, needs_override: bool
) -> None:
    store, client, [mapping] = await opened(
        harness, runtime_of, harness.mapping("vip", segment_guid=GUID)
    )
    await known(store, "vip", GUID)
    if needs_override:
        await store.reset("vip")
    found = await resolve(store, client, mapping)
    assert found == (GUID, "override" if needs_override else "update")
    assert harness.sandbox.requests == []


@pytest.mark.parametrize("external_id", [None, "ext-1"])
async def test_a_segment_found_in_walkme_is_adopted_and_rebuilt(
    harness: Harness, runtime_of: RuntimeFactory, external_id: str | None
) -> None:
    guid = await seed_segment(harness.sandbox, "vip", ["a"], external_id=external_id)
    extra = {} if external_id is None else {"external_id": external_id}
    store, client, [mapping] = await opened(harness, runtime_of, harness.mapping("vip", **extra))
    await known(store, "vip", external_id=external_id)
    tally: Counter[str] = Counter()
    with structlog.testing.capture_logs() as logs:
        found = await resolve(store, client, mapping, tally=tally)
    assert found == (guid, "override")
    assert tally == Counter({"token": 1, "list": 1})
    stored = await store.get("vip")
    assert stored is not None
    assert (stored.segment_guid, stored.origin) == (guid, "adopted")
    assert lines(logs, "segment.adopted") == [
        {
            "event": "segment.adopted",
            "segment_guid": guid,
            "by": "name" if external_id is None else "external_id",
            "log_level": "info",
        }
    ]


async def test_a_segment_found_by_external_id_not_by_name(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    await seed_segment(harness.sandbox, "vip", [])
    guid = await seed_segment(harness.sandbox, "renamed", [], external_id="ext-1")
    store, client, [mapping] = await opened(
        harness, runtime_of, harness.mapping("vip", external_id="ext-1")
    )
    await known(store, "vip", external_id="ext-1")
    found = await resolve(store, client, mapping)
    assert found == (guid, "override")


async def test_a_segment_another_mapping_owns_is_never_adopted(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    guid = await seed_segment(harness.sandbox, "vip", [])
    store, client, [mapping] = await opened(harness, runtime_of)
    await known(store, "vip")
    await known(store, "old", guid)  # an orphan that wrote to it
    found = await resolve(store, client, mapping)
    assert found == (None, "create")
    stored = await store.get("vip")
    assert stored is not None
    assert stored.segment_guid is None


async def test_a_segment_walkme_does_not_have_is_created(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, [mapping] = await opened(harness, runtime_of)
    await known(store, "vip")
    found = await resolve(store, client, mapping)
    assert found == (None, "create")


async def test_a_rename_keeping_the_external_id_is_noticed(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, [mapping] = await opened(
        harness, runtime_of, harness.mapping("new name", external_id="ext-1")
    )
    await known(store, "new name", external_id="ext-1")
    await known(store, "old name", OTHER_GUID, external_id="ext-1")
    await known(store, "unrelated", GUID, external_id="ext-2")
    with structlog.testing.capture_logs() as logs:
        await resolve(store, client, mapping, configured=["new name"])
    assert named(logs, "segment.renamed") == [
        {
            "event": "segment.renamed",
            "old_segment": "old name",
            "old_segment_guid": OTHER_GUID,
            "external_id": "ext-1",
            "hint": "WalkMe has no rename: the old segment 'old name' is now an orphan;"
            " `syncd delete --segment 'old name' --yes` (or `syncd prune --yes`) deletes it"
            " and frees its external_id",
            "log_level": "warning",
        }
    ]


@pytest.mark.parametrize("why", ["still configured", "no external id"])
async def test_no_rename_is_noticed_when(
    harness: Harness, runtime_of: RuntimeFactory, why: str
) -> None:
    extra = {} if why == "no external id" else {"external_id": "ext-1"}
    store, client, [mapping] = await opened(harness, runtime_of, harness.mapping("vip", **extra))
    await known(store, "vip", **extra)
    await known(store, "other", OTHER_GUID, external_id="ext-1")
    configured = ["vip", "other"] if why == "still configured" else ["vip"]
    with structlog.testing.capture_logs() as logs:
        await resolve(store, client, mapping, configured=configured)
    assert named(logs, "segment.renamed") == []


# -- the lifecycle --------------------------------------------------------------------------

ME = "this-host:10:aaaaaa"


def lifecycle(
    store: StateStore,
    client: WalkMeClient,
    usable: list[SegmentMapping],
    *,
    broken: tuple[str, ...] = (),
    interval_s: float = 60.0,
) -> SegmentLifecycle:
    mapping_set = MappingSet(
        {m.name: m for m in usable}, {b: BrokenMapping(b, 7, "bad name") for b in broken}
    )

    async def current() -> MappingSet:
        return mapping_set

    return SegmentLifecycle(store, client, ME, 30.0, lambda _name: interval_s, current)


async def test_heartbeats_say_what_this_replica_maps_and_warn_once_per_difference(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, mappings = await opened(
        harness, runtime_of, harness.mapping("b"), harness.mapping("a"), harness.mapping("c")
    )
    await store.heartbeat("that-host:20:bbbbbb", ["a", "d"], 30)
    await store.heartbeat("same-host:30:cccccc", ["a", "b", "c"], 30)
    parts = lifecycle(store, client, mappings)
    with structlog.testing.capture_logs() as logs:
        await parts.heartbeat()
        await parts.heartbeat()  # no change: said once
    live = {r.replica_id: r.mappings for r in await store.live_replicas()}
    assert live[ME] == ["a", "b", "c"]
    assert logs == [
        {
            "event": "replicas.config_differs",
            "replica": "that-host:20",
            "only_here": ["b", "c"],
            "only_there": ["d"],
            "hint": "replicas serve different segment mappings: a rollout under way or a"
            " replica left behind; none of these segments counts as an orphan",
            "log_level": "warning",
        }
    ]
    await store.heartbeat("that-host:20:bbbbbb", ["a"], 30)
    with structlog.testing.capture_logs() as logs:
        await parts.heartbeat()
    assert [(e["only_here"], e["only_there"]) for e in logs] == [(["b", "c"], [])]
    await store.heartbeat("that-host:20:bbbbbb", ["a", "b", "c"], 30)
    with structlog.testing.capture_logs() as logs:
        await parts.heartbeat()  # agreed again
        await store.heartbeat("that-host:20:bbbbbb", ["a"], 30)
        await parts.heartbeat()  # differs again: said again
    assert [(e["only_here"], e["only_there"]) for e in logs] == [(["b", "c"], [])]
    await parts.leave()
    assert ME not in {r.replica_id for r in await store.live_replicas()}


async def test_claims_name_the_live_replicas_and_the_recent_syncs(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, _ = await opened(harness, runtime_of)
    await store.heartbeat("that-host:20:bbbbbb", ["mapped"], 30)
    for name in ("mapped", "synced", "never synced"):
        await known(store, name, GUID if name != "never synced" else None)
    for name in ("mapped", "synced"):
        await store.finish_run(name, f"run-{name}", "synced", None, SkippedIds(), 1, 0)
    claims = await lifecycle(store, client, []).claims()
    assert set(claims) == {"mapped", "synced"}
    assert claims["mapped"].startswith("mapped by live replica that-host:20 (heartbeat ")
    assert claims["mapped"].endswith(" s ago)")
    stored = await store.get("synced")
    assert stored is not None
    synced = stored.last_success_at
    assert synced is not None
    assert claims["synced"] == (
        f"last synced at {synced.isoformat()}, less than 3 schedule intervals (180 s) ago;"
        f" not an orphan before {(synced + timedelta(seconds=180)).isoformat()}"
    )
    await asyncio.sleep(0.05)
    assert set(await lifecycle(store, client, [], interval_s=0.01).claims()) == {"mapped"}


async def test_orphans_are_the_segments_nobody_maps_or_synced_lately(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, mappings = await opened(harness, runtime_of, harness.mapping("vip"))
    for name, guid in [("vip", GUID), ("broken", OTHER_GUID), ("gone", OTHER_GUID)]:
        await known(store, name, guid)
    await asyncio.sleep(0.05)
    parts = lifecycle(store, client, mappings, broken=("broken",), interval_s=0.01)
    with structlog.testing.capture_logs() as logs:
        orphans = await parts.report_orphans()
    assert [o.name for o in orphans] == ["gone"]
    [line] = logs
    since = orphans[0].orphaned_at
    assert since is not None
    assert line == {
        "event": "segment.orphaned",
        "segment": "gone",
        "segment_guid": OTHER_GUID,
        "members": 0,
        "origin": "created",
        "since": since.isoformat(),
        "log_level": "warning",
    }


async def test_a_segment_in_use_is_not_deleted(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    guid = await seed_segment(harness.sandbox, "vip", ["a"])
    store, client, _ = await opened(harness, runtime_of)
    await known(store, "vip", guid)
    assert await store.acquire_lease("vip", "that-host:20:bbbbbb-run1", 30)
    parts = lifecycle(store, client, [])
    assert await parts.in_use("vip") == "being synced now by that-host:20"
    stored = await store.get("vip")
    assert stored is not None
    with pytest.raises(SegmentInUse, match="being synced now by that-host:20"):
        await parts.delete(stored)
    assert harness.sandbox.find(name="vip") is not None
    assert await store.get("vip") is not None


async def test_a_segment_mapped_elsewhere_is_in_use(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, _ = await opened(harness, runtime_of)
    await store.heartbeat("that-host:20:bbbbbb", ["vip"], 30)
    reason = await lifecycle(store, client, []).in_use("vip")
    assert reason is not None
    assert reason.startswith("mapped by live replica that-host:20")
    assert await lifecycle(store, client, []).in_use("other") is None


async def test_delete_removes_the_walkme_segment_and_forgets_it(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    guid = await seed_segment(harness.sandbox, "vip", ["a"])
    store, client, _ = await opened(harness, runtime_of)
    await known(store, "vip", guid)
    stored = await store.get("vip")
    assert stored is not None
    with structlog.testing.capture_logs() as logs:
        assert await lifecycle(store, client, [], interval_s=0.0).delete(stored)
    assert harness.sandbox.find(name="vip") is None
    assert await store.get("vip") is None
    assert lines(logs, "segment.deleted") == [
        {
            "event": "segment.deleted",
            "segment": "vip",
            "segment_guid": guid,
            "already_gone": False,
            "log_level": "info",
        }
    ]


async def test_delete_of_a_segment_already_gone_forgets_it(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    guid = await seed_segment(harness.sandbox, "vip", [])
    await delete_segment(harness.sandbox, guid)
    store, client, _ = await opened(harness, runtime_of)
    await known(store, "vip", guid)
    stored = await store.get("vip")
    assert stored is not None
    with structlog.testing.capture_logs() as logs:
        assert await lifecycle(store, client, [], interval_s=0.0).delete(stored) is False
    assert await store.get("vip") is None
    assert [e["already_gone"] for e in lines(logs, "segment.deleted")] == [True]


async def test_delete_of_a_segment_never_created_sends_nothing(
    harness: Harness, runtime_of: RuntimeFactory
) -> None:
    store, client, _ = await opened(harness, runtime_of)
    await known(store, "vip")
    stored = await store.get("vip")
    assert stored is not None
    harness.sandbox.clear_requests()
    assert await lifecycle(store, client, [], interval_s=0.0).delete(stored)
    assert harness.sandbox.requests == []
    assert await store.get("vip") is None
