"""Batch delivery on its own, against the sandbox and a SQLite state store: 413
halving, bisection down to the rejected ids, quarantine, adoption after a 409 and
the replay of a pending batch in slices."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import structlog

from syncd.diff import Diff
from syncd.engine import delivery as delivery_module
from syncd.engine.control import Interrupted, RunControl
from syncd.engine.delivery import BatchDelivery
from syncd.engine.leases import Lease
from syncd.engine.outcome import Outcome
from syncd.engine.resolve import Mode
from syncd.sandbox import SANDBOX_SYSTEM_GUID
from syncd.state import StateStore
from syncd.state.base import LeaseLost, PendingBatch
from syncd.walkme import WalkMeError, WalkMeNotFound, WalkMeRejected, create_key
from tests.integration.conftest import RuntimeFactory
from tests.support.harness import Harness, HarnessFactory, seed_segment
from tests.support.ids import make_ids
from tests.support.logs import named

NAME = "vip"
HOLDER = "rig-host:1:aaaaaa-run-1"
OTHER_HOLDER = "another-host:2:bbbbbb-run"  # another replica's run
ID_BYTES = len(make_ids(1)[0]) + 3  # the id, its quotes and a comma in the JSON body
BODY_BYTES = 60  # {"action":"add","userIds":[]} and the request's own framing


@dataclass
class Rig:
    """One run's delivery to segment ``vip``, with its store and sandbox."""

    harness: Harness
    store: StateStore
    delivery: BatchDelivery
    outcome: Outcome
    stop_after: list[int]  # requests the run may start before shutdown (empty: no limit)
    control: RunControl
    proofs: list[int]  # the sandbox's writes received at each proof of the lease

    def requests(self) -> list[tuple[str, str | None, int | None, int]]:
        """(kind, action, ids, status) of each create and update seen."""
        return [
            (r.kind, r.action, r.n_ids, r.status)
            for r in self.harness.sandbox.requests
            if r.kind in ("create", "update")
        ]

    async def members(self) -> set[str]:
        return {member async for chunk in self.store.snapshot(NAME, 1000) for member in chunk.ids()}


RigFactory = Callable[..., Any]


@pytest.fixture
def rig(make_harness: HarnessFactory, runtime_of: RuntimeFactory) -> RigFactory:
    """``await rig(guid=..., **sandbox kwargs)``: a delivery for a run of ``vip``."""

    async def make(
        guid: str | None = None, mapping: dict[str, Any] | None = None, **sandbox: Any
    ) -> Rig:
        harness = await make_harness(**sandbox)
        if guid == "seeded":
            guid = await seed_segment(harness.sandbox, NAME, [])
        settings = harness.settings([harness.mapping(NAME, **(mapping or {}))])
        runtime = await runtime_of(settings)
        store = runtime.store
        await store.begin_run(NAME, "run-1", SANDBOX_SYSTEM_GUID, None)
        if guid is not None:
            await store.adopt(NAME, guid, "created")
        stop_after: list[int] = []

        def stopping() -> bool:
            if not stop_after:
                return False
            stop_after[0] -= 1
            return stop_after[0] < 0

        proofs: list[int] = []

        async def prove() -> None:
            proofs.append(harness.sandbox.writes_received)

        # The run holds the segment's lease, as a real one does.
        assert await store.acquire_lease(NAME, HOLDER, 60)
        control = RunControl(stopping, Lease(NAME, HOLDER, "run-1"), prove)
        outcome = Outcome(NAME, "failed", "run-1")
        delivery = BatchDelivery(
            store,
            runtime.client,
            control,
            outcome,
            settings.mappings()[0],
            SANDBOX_SYSTEM_GUID,
            guid,
        )
        harness.sandbox.clear_requests()
        return Rig(harness, store, delivery, outcome, stop_after, control, proofs)

    return make


def diff_of(folder: Path, adds: list[str], removes: list[str]) -> Diff:
    folder.mkdir(exist_ok=True)
    diff = Diff(folder, adds=len(adds), removes=len(removes))
    diff.path("add").write_text("".join(f"{i}\n" for i in adds), encoding="utf-8")
    diff.path("remove").write_text("".join(f"{i}\n" for i in removes), encoding="utf-8")
    return diff


async def send(rig: Rig, mode: Mode, adds: list[str], removes: list[str], size: int) -> None:
    await rig.delivery.send_diff(diff_of(rig.harness.folder / "diff", adds, removes), mode, size)


# -- the order of batches ------------------------------------------------------------


async def test_update_removes_then_adds_in_batches(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    await r.store.record_batch(NAME, "run-1", "add", ["x1", "x2", "x3"])
    await send(r, "update", make_ids(3), ["x1", "x2", "x3"], 2)
    assert r.requests() == [
        ("update", "remove", 2, 200),
        ("update", "remove", 1, 200),
        ("update", "add", 2, 200),
        ("update", "add", 1, 200),
    ]
    assert await r.members() == set(make_ids(3))
    assert (r.outcome.added, r.outcome.removed) == (3, 3)


@pytest.mark.parametrize("mode", ["create", "override"])
async def test_a_first_batch_of_nothing_still_creates_or_empties(
    rig: RigFactory, mode: Mode
) -> None:
    r: Rig = await rig(guid=None if mode == "create" else "seeded")
    await send(r, mode, [], ["ignored"], 10)  # a create or override removes nothing
    expected = ("create", None, 0, 201) if mode == "create" else ("update", "override", 0, 200)
    assert r.requests() == [expected]
    assert r.delivery.guid is not None


async def test_a_created_segment_gets_its_first_batch_then_adds(rig: RigFactory) -> None:
    r: Rig = await rig()
    with structlog.testing.capture_logs() as logs:
        await send(r, "create", make_ids(5), [], 2)
    assert r.requests() == [
        ("create", None, 2, 201),
        ("update", "add", 2, 200),
        ("update", "add", 1, 200),
    ]
    guid = r.harness.guid(NAME)
    assert r.delivery.guid == guid
    assert r.harness.sandbox.members(guid) == set(make_ids(5))
    stored = await r.store.get(NAME)
    assert stored is not None
    assert (stored.segment_guid, stored.members, stored.needs_override) == (guid, 5, False)
    [run] = await r.store.history(NAME, 1)
    assert (run.added, run.requests) == (5, 3)
    assert r.proofs == [0, 1, 2]  # before each of the three sends
    assert r.control.tally == Counter({"token": 1, "create": 1, "update": 2})
    assert named(logs, "segment.created") == [
        {"event": "segment.created", "segment_guid": guid, "log_level": "info"}
    ]


async def test_shutdown_is_checked_before_each_batch(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    r.stop_after.append(1)
    with pytest.raises(Interrupted):
        await send(r, "update", make_ids(4), [], 2)
    assert r.requests() == [("update", "add", 2, 200)]
    assert await r.members() == set(make_ids(2))


# -- 413: halves -----------------------------------------------------------------------


async def test_413_halves_the_batch_and_the_run_keeps_to_that_size(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded", max_body_bytes=BODY_BYTES + 4 * ID_BYTES)
    await send(r, "update", make_ids(16), [], 8)
    # The first batch is refused, then sent in halves; the second in halves at once.
    assert [status for _, _, _, status in r.requests()] == [413, 200, 200, 200, 200]
    assert [n for _, _, n, status in r.requests() if status == 200] == [4, 4, 4, 4]
    assert await r.members() == set(make_ids(16))
    assert r.outcome.added == 16
    assert await r.store.pending_batch(NAME) is None


async def test_413_of_an_odd_batch_rounds_the_half_up(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded", max_body_bytes=BODY_BYTES + 4 * ID_BYTES)
    await send(r, "update", make_ids(7), [], 7)
    assert [n for _, _, n, status in r.requests() if status == 200] == [4, 3]


async def test_413_halves_again_until_it_fits(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded", max_body_bytes=BODY_BYTES + 2 * ID_BYTES)
    await send(r, "update", make_ids(8), [], 8)
    assert [n for _, _, n, status in r.requests() if status == 200] == [2, 2, 2, 2]
    assert await r.members() == set(make_ids(8))


async def test_413_on_create_creates_it_empty_then_adds_in_halves(rig: RigFactory) -> None:
    r: Rig = await rig(max_body_bytes=BODY_BYTES + 2 * ID_BYTES)
    await send(r, "create", make_ids(4), [], 4)
    assert [(kind, action, status) for kind, action, _, status in r.requests()] == [
        ("create", None, 413),  # a body too large is not read: no action seen
        ("create", None, 201),
        ("update", "add", 200),
        ("update", "add", 200),
    ]
    assert r.harness.sandbox.members(r.harness.guid(NAME)) == set(make_ids(4))
    assert await r.members() == set(make_ids(4))


async def test_413_to_one_id_fails_saying_what_to_raise(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded", max_body_bytes=BODY_BYTES - ID_BYTES)
    with pytest.raises(WalkMeError) as info:
        await send(r, "update", make_ids(2), [], 2)
    assert str(info.value).startswith(
        "WalkMe (or a proxy before it) answers 413 payload too large even to a request"
        " with one id: raise the request body limit of the proxy between syncd and WalkMe."
        " WalkMe said: "
    )
    assert "payload_too_large" in str(info.value)
    assert info.value.status == 413
    assert info.value.body == str(info.value).rpartition("WalkMe said: ")[2]
    assert await r.store.pending_batch(NAME) is None  # refused: certainly not applied


# -- 400: bisection and quarantine ---------------------------------------------------------


async def test_rejected_ids_are_found_by_bisection_and_quarantined(rig: RigFactory) -> None:
    ids = make_ids(8)
    bad = [ids[2], ids[5]]
    r: Rig = await rig(guid="seeded", rejected_ids=bad)
    with structlog.testing.capture_logs() as logs:
        await send(r, "update", ids, [], 8)
    good = [member for member in ids if member not in bad]
    assert await r.members() == set(good)
    assert r.harness.sandbox.members(r.harness.guid(NAME)) == set(good)
    assert (r.outcome.added, r.outcome.quarantined) == (6, 2)
    quarantined = await r.store.quarantined(NAME)
    assert (quarantined.add, quarantined.remove) == (frozenset(bad), frozenset())
    [line] = named(logs, "segment.quarantined")
    assert line["action"] == "add"
    assert line["count"] == 2
    assert line["ids"] == bad
    assert "some userIds were rejected" in line["walkme_answer"]
    assert "some userIds were rejected" in line["first_answer"]
    examples = await r.store.quarantine_examples(NAME, 10)
    assert sorted(member for member, _, _ in examples) == sorted(bad)
    assert all("some userIds were rejected" in reason for _, _, reason in examples)
    # The first half first, down to single ids; no empty control request, since
    # WalkMe took ids of this batch before refusing one.
    assert [n for _, _, n, _ in r.requests()] == [8, 4, 2, 2, 1, 1, 4, 2, 1, 1, 2]


async def test_a_rejected_remove_is_quarantined_as_a_remove(rig: RigFactory) -> None:
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=[ids[1]])
    await r.store.record_batch(NAME, "run-1", "add", ids)
    await send(r, "update", [], ids, 4)
    quarantined = await r.store.quarantined(NAME)
    assert (quarantined.add, quarantined.remove) == (frozenset(), frozenset([ids[1]]))
    assert await r.members() == {ids[1]}
    assert (r.outcome.removed, r.outcome.quarantined) == (3, 1)


async def test_rejected_ids_of_a_create_are_quarantined_after_creating_it(
    rig: RigFactory,
) -> None:
    ids = make_ids(4)
    r: Rig = await rig(rejected_ids=[ids[0]])
    await send(r, "create", ids, [], 4)
    assert r.requests()[:2] == [("create", None, 4, 400), ("create", None, 0, 201)]
    assert {action for _, action, _, _ in r.requests()[2:]} == {"add"}
    assert await r.members() == set(ids[1:])
    assert (await r.store.quarantined(NAME)).add == frozenset([ids[0]])


async def test_a_400_to_every_request_fails_the_run_and_quarantines_nothing(
    rig: RigFactory,
) -> None:
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(400, times=20, body={"error": "schema changed"})
    with pytest.raises(WalkMeRejected) as info:
        await send(r, "update", make_ids(2), [], 2)
    assert str(info.value) == (
        "WalkMe answers 400 even to a request without ids: the problem is not the ids."
        ' WalkMe said: {"error": "schema changed"}'
    )
    assert (info.value.status, info.value.body) == (400, '{"error": "schema changed"}')
    assert [n for _, _, n, _ in r.requests()] == [None, None, None]  # batch, first id, empty
    assert r.outcome.quarantined == 0
    assert (await r.store.quarantined(NAME)).add == frozenset()


async def test_the_control_request_is_made_once(rig: RigFactory) -> None:
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=ids[:3])
    await send(r, "update", ids, [], 4)
    assert [n for _, _, n, _ in r.requests()].count(0) == 1
    assert (await r.store.quarantined(NAME)).add == frozenset(ids[:3])


async def test_more_rejected_ids_than_the_limit_give_up_but_keep_those_found(
    rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "MAX_QUARANTINED_PER_BATCH", 2)
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=ids[:3])
    with pytest.raises(WalkMeRejected) as info:
        await send(r, "update", ids, [], 4)
    assert str(info.value).startswith(
        "WalkMe rejected more than 2 ids of one batch; giving up on this run. Last answer: "
    )
    assert info.value.status == 400
    assert "some userIds were rejected" in info.value.body
    assert (await r.store.quarantined(NAME)).add == frozenset(ids[:3])
    assert r.outcome.quarantined == 3


async def test_bisection_checks_for_shutdown_before_each_part(rig: RigFactory) -> None:
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=[ids[0]])
    r.stop_after.append(2)  # the batch, then its first half only
    with pytest.raises(Interrupted):
        await send(r, "update", ids, [], 4)
    assert [n for _, _, n, _ in r.requests()] == [4, 2]


# -- refusals and a segment gone -------------------------------------------------------


async def test_a_segment_gone_forgets_the_pending_batch(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(404)
    with pytest.raises(WalkMeNotFound):
        await send(r, "update", make_ids(2), [], 2)
    assert await r.store.pending_batch(NAME) is None


async def test_an_answer_lost_leaves_the_batch_pending(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(503, times=20)
    with pytest.raises(WalkMeError):
        await send(r, "update", make_ids(2), [], 2)
    assert await r.store.pending_batch(NAME) == PendingBatch("add", make_ids(2))


@pytest.mark.parametrize("status", [400, 403, 413])
async def test_a_refused_batch_is_not_pending(rig: RigFactory, status: int) -> None:
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(status, times=20)
    with pytest.raises(WalkMeError):
        await send(r, "update", make_ids(1), [], 1)
    assert await r.store.pending_batch(NAME) is None


# -- 409 on create ----------------------------------------------------------------------


async def test_a_create_whose_key_is_taken_adopts_that_segment_and_rebuilds_it(
    rig: RigFactory,
) -> None:
    r: Rig = await rig()
    key = create_key(SANDBOX_SYSTEM_GUID, NAME)
    guid = await seed_segment(r.harness.sandbox, "earlier create", ["stale"], external_id=key)
    r.harness.sandbox.clear_requests()
    with structlog.testing.capture_logs() as logs:
        await send(r, "create", make_ids(2), [], 2)
    assert r.delivery.guid == guid
    assert r.harness.sandbox.members(guid) == set(make_ids(2))
    assert [(kind, action, status) for kind, action, _, status in r.requests()] == [
        ("create", None, 409),
        ("update", "override", 200),
    ]
    state = await r.store.get(NAME)
    assert state is not None
    assert (state.segment_guid, state.origin, state.members) == (guid, "created", 2)
    assert named(logs, "segment.adopted") == [
        {"event": "segment.adopted", "segment_guid": guid, "by": "create key", "log_level": "info"}
    ]


# -- replaying a pending batch ---------------------------------------------------------------


async def test_a_pending_batch_is_replayed_in_slices_of_todays_size(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    ids = make_ids(5)
    await r.delivery.replay(PendingBatch("override", ids), 2)
    assert r.requests() == [
        ("update", "override", 2, 200),
        ("update", "add", 2, 200),
        ("update", "add", 1, 200),
    ]
    assert await r.members() == set(ids)
    assert await r.store.pending_batch(NAME) is None
    assert r.outcome.added == 5


async def test_a_replay_stopped_midway_keeps_the_rest_pending_as_adds(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    ids = make_ids(5)
    r.stop_after.append(0)
    with pytest.raises(Interrupted):
        await r.delivery.replay(PendingBatch("override", ids), 2)
    assert await r.store.pending_batch(NAME) == PendingBatch("add", ids[2:])


async def test_a_replayed_remove_keeps_the_rest_pending_as_removes(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    ids = make_ids(3)
    await r.store.record_batch(NAME, "run-1", "add", ids)
    r.stop_after.append(0)
    with pytest.raises(Interrupted):
        await r.delivery.replay(PendingBatch("remove", ids), 2)
    assert await r.store.pending_batch(NAME) == PendingBatch("remove", ids[2:])
    assert r.outcome.removed == 2


async def test_what_walkme_refuses_of_a_replay_is_no_longer_pending(rig: RigFactory) -> None:
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=[ids[3]])
    await r.store.begin_batch(NAME, "add", ids)
    await r.delivery.replay(PendingBatch("add", ids), 4)
    assert await r.store.pending_batch(NAME) is None
    assert await r.members() == set(ids[:3])
    assert (await r.store.quarantined(NAME)).add == frozenset([ids[3]])


async def test_a_replay_refused_outright_stays_pending(rig: RigFactory) -> None:
    """A replayed batch may have been applied by the request whose answer was lost."""
    r: Rig = await rig(guid="seeded")
    ids = make_ids(2)
    await r.store.begin_batch(NAME, "add", ids)
    r.harness.sandbox.script(403)
    with pytest.raises(WalkMeError):
        await r.delivery.replay(PendingBatch("add", ids), 2)
    assert await r.store.pending_batch(NAME) == PendingBatch("add", ids)


# -- what mutation testing asked for -------------------------------------------------------


async def test_a_created_segment_carries_the_mappings_external_id(rig: RigFactory) -> None:
    r: Rig = await rig(mapping={"external_id": "ext-9"})
    await send(r, "create", make_ids(1), [], 10)
    record = r.harness.sandbox.find(name=NAME)
    assert record is not None
    assert record.external_id == "ext-9"


async def test_rejected_ids_of_an_override_are_quarantined_after_emptying_it(
    rig: RigFactory,
) -> None:
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=[ids[0]])
    await r.store.record_batch(NAME, "run-1", "add", ["stale"])
    await send(r, "override", ids, [], 4)
    assert r.requests()[:2] == [("update", "override", 4, 400), ("update", "override", 0, 200)]
    assert r.harness.sandbox.members(r.harness.guid(NAME)) == set(ids[1:])
    assert await r.members() == set(ids[1:])  # "stale" went with the override


async def test_quarantined_ids_of_every_batch_are_counted(rig: RigFactory) -> None:
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=[ids[0], ids[2]])
    await send(r, "update", ids, [], 2)
    assert r.outcome.quarantined == 2


async def test_413_of_a_part_while_bisecting_halves_that_part(rig: RigFactory) -> None:
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(400)  # the batch
    r.harness.sandbox.script(413)  # its first half
    await send(r, "update", ids, [], 4)
    assert [n for _, _, n, _ in r.requests()] == [None, None, 1, 1, 2]
    assert await r.members() == set(ids)


async def test_413_of_one_id_while_bisecting_fails_saying_what_to_raise(
    rig: RigFactory,
) -> None:
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(400)
    r.harness.sandbox.script(413, body={"error": "too big"})
    with pytest.raises(WalkMeError) as info:
        await send(r, "update", make_ids(2), [], 2)
    assert str(info.value).startswith("WalkMe (or a proxy before it) answers 413")
    assert info.value.status == 413


async def test_the_control_request_names_its_own_answer(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(400, times=2, body={"error": "first"})
    r.harness.sandbox.script(400, body={"error": "control"})
    with pytest.raises(WalkMeRejected) as info:
        await send(r, "update", make_ids(2), [], 2)
    assert str(info.value).endswith('WalkMe said: {"error": "control"}')


async def test_a_replay_of_one_id_in_slices_of_one_is_one_request(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    await r.delivery.replay(PendingBatch("add", make_ids(1)), 1)
    assert r.requests() == [("update", "add", 1, 200)]


async def test_a_rebuild_that_fails_after_adopting_our_create_is_rebuilt_next_time(
    rig: RigFactory,
) -> None:
    r: Rig = await rig()
    key = create_key(SANDBOX_SYSTEM_GUID, NAME)
    guid = await seed_segment(r.harness.sandbox, "earlier create", [], external_id=key)
    sandbox = r.harness.sandbox

    def fail_updates(kind: str) -> None:
        if kind == "update":  # the rebuild after adopting
            sandbox.faults = replace(sandbox.faults, error_rate=1.0)

    sandbox.on_request(fail_updates)
    with pytest.raises(WalkMeError):
        await send(r, "create", make_ids(2), [], 2)
    stored = await r.store.get(NAME)
    assert stored is not None
    assert (stored.segment_guid, stored.origin, stored.needs_override) == (guid, "created", True)


async def test_a_run_that_lost_its_lease_writes_nothing(rig: RigFactory) -> None:
    r: Rig = await rig(guid="seeded")
    await r.store.record_batch(NAME, "run-1", "add", ["kept"])
    await r.store.release_lease(NAME, HOLDER)
    assert await r.store.acquire_lease(NAME, OTHER_HOLDER, 60)
    r.control.prove_lease = None  # the store's fence alone
    with pytest.raises(LeaseLost):
        await send(r, "update", make_ids(2), [], 2)
    assert r.requests() == []
    assert await r.store.pending_batch(NAME) is None
    assert await r.members() == {"kept"}


# -- a lease lost while a request is on its way ---------------------------------------

def lose_the_lease_after_proof(r: Rig, proof: int = 1) -> None:
    """At the ``proof``-th proof of the lease, let it pass, then hand the lease to
    another replica while the request is on its way (a replica frozen between its
    proof and WalkMe's answer)."""
    proofs = 0

    async def prove_then_lose() -> None:
        nonlocal proofs
        proofs += 1
        if proofs == proof:
            assert await r.store.release_lease(NAME, HOLDER)
            assert await r.store.acquire_lease(NAME, OTHER_HOLDER, 60)

    r.control.prove_lease = prove_then_lose


async def test_a_batch_acknowledged_after_the_lease_was_lost_is_not_recorded(
    rig: RigFactory,
) -> None:
    """WalkMe applied it, but the lease's new holder owns the snapshot now: nothing
    is written, and the batch stays pending for that holder to replay."""
    r: Rig = await rig(guid="seeded")
    ids = make_ids(2)
    lose_the_lease_after_proof(r)
    with pytest.raises(LeaseLost):
        await send(r, "update", ids, [], 2)
    assert r.harness.sandbox.members(r.harness.guid(NAME)) == set(ids)
    assert await r.members() == set()
    assert await r.store.pending_batch(NAME) == PendingBatch("add", ids)
    assert r.outcome.added == 0


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_a_refusal_after_the_lease_was_lost_leaves_the_pending_batch(
    rig: RigFactory, status: int
) -> None:
    """A refused batch is forgotten only under the lease it was sent under: the new
    holder's pending batch is its own."""
    r: Rig = await rig(guid="seeded")
    ids = make_ids(1)
    lose_the_lease_after_proof(r)
    r.harness.sandbox.script(status, times=20)
    with pytest.raises(LeaseLost):
        await send(r, "update", ids, [], 1)
    assert await r.store.pending_batch(NAME) == PendingBatch("add", ids)


async def test_a_replay_that_lost_its_lease_keeps_what_walkme_refused_pending(
    rig: RigFactory,
) -> None:
    """The replay's last id is refused after the lease passed to another replica: the
    replay does not clear the pending batch, which is no longer its own."""
    ids = make_ids(4)
    r: Rig = await rig(guid="seeded", rejected_ids=[ids[3]])
    await r.store.begin_batch(NAME, "add", ids, HOLDER)
    # Sends: the 4 ids (400), the first half, the second half (400), ids[2], ids[3].
    lose_the_lease_after_proof(r, proof=5)
    with pytest.raises(LeaseLost):
        await r.delivery.replay(PendingBatch("add", ids), 4)
    assert [n for _, _, n, _ in r.requests()] == [4, 2, 2, 1, 1]
    assert await r.store.pending_batch(NAME) == PendingBatch("add", [ids[3]])


# -- WalkMe's answer to a refused id, as quarantined and logged ------------------------


async def test_a_refusal_without_a_body_is_quarantined_with_the_status(rig: RigFactory) -> None:
    """A 400 with no body (a proxy's, say) still gives the quarantined id a reason."""
    ids = make_ids(2)
    r: Rig = await rig(guid="seeded")

    calls: list[str] = []

    def refuse_the_second_id_without_a_body(kind: str) -> None:
        calls.append(kind)
        if len(calls) in (1, 3):  # both ids, (the first id,) the second id
            r.harness.sandbox.script(400, body="")

    r.harness.sandbox.on_request(refuse_the_second_id_without_a_body)
    with structlog.testing.capture_logs() as logs:
        await send(r, "update", ids, [], 2)
    [(member, _, reason)] = await r.store.quarantine_examples(NAME, 10)
    assert (member, reason) == (ids[1], "WalkMe answered 400 to update: ")
    [line] = named(logs, "segment.quarantined")
    assert (line["walkme_answer"], line["first_answer"]) == (reason, "")


async def test_the_quarantine_log_line_keeps_300_characters_of_each_answer(
    rig: RigFactory,
) -> None:
    """WalkMe's answers are cut to 300 characters in ``segment.quarantined``."""
    r: Rig = await rig(guid="seeded")
    r.harness.sandbox.script(400, times=2, body="x" * 400)  # both ids, then the first
    with structlog.testing.capture_logs() as logs:
        await send(r, "update", make_ids(2), [], 2)
    [line] = named(logs, "segment.quarantined")
    assert (line["first_answer"], line["walkme_answer"]) == ("x" * 300, "x" * 300)
