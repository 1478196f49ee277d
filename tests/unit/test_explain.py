"""``syncd explain``'s verdict on the next run, in the cases a synced sandbox does not
reach cheaply (a new or rebuilt segment, an override left pending)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from syncd.engine.explain import NextAction, next_action
from syncd.engine.resolve import Mode
from syncd.state.base import Action, PendingBatch, QuarantineEntry

REJECTED = QuarantineEntry("add", "400 invalid user id", datetime.now(UTC))


@pytest.mark.parametrize(
    ("wanted", "member", "mode", "pending", "expected"),
    [
        # A new or rebuilt segment gets the whole source, the snapshot aside.
        (True, False, "create", None, "add"),
        (False, False, "create", None, "nothing"),
        (True, True, "override", None, "add"),
        (False, True, "override", None, "nothing"),
        # A pending override is sent again first: the snapshot becomes that batch.
        (True, True, "update", ("override", ["other"]), "add"),
        (False, True, "update", ("override", ["other"]), "nothing"),
        (True, False, "update", ("override", ["it"]), "nothing"),
        # A pending add or remove of another id changes nothing for this one.
        (True, False, "update", ("add", ["other"]), "add"),
        (False, True, "update", ("remove", ["other"]), "remove"),
        # A pending remove of this id: sent again, then the diff adds it back.
        (True, True, "update", ("remove", ["it"]), "add"),
    ],
)
def test_next_run(
    wanted: bool,
    member: bool,
    mode: Mode,
    pending: tuple[Action, list[str]] | None,
    expected: NextAction,
) -> None:
    batch = PendingBatch(*pending) if pending is not None else None
    found, why = next_action(
        wanted=wanted,
        member=member,
        mode=mode,
        pending=batch,
        in_pending=batch is not None and "it" in batch.ids,
        quarantine=[],
        held=None,
        error=None,
    )
    assert found == expected, why
    if mode == "create" and wanted:
        assert why == "the next run creates the WalkMe segment with it"
    if batch is not None and ("it" in batch.ids or batch.action == "override"):
        assert f"pending {batch.action} batch" in why  # the replay is told


def quarantined_and_held(mode: Mode) -> tuple[NextAction, str]:
    """The verdict on a wanted id, not a member, that WalkMe once rejected, in a run of
    ``mode`` that the removal guard holds."""
    return next_action(
        wanted=True,
        member=False,
        mode=mode,
        pending=None,
        in_pending=False,
        quarantine=[REJECTED],
        held="1000 of 1000 members would be removed",
        error=None,
    )


def test_a_rebuild_sends_a_quarantined_id_again() -> None:
    """Only an update leaves quarantined ids out; a rebuild sends everything."""
    found, _ = quarantined_and_held("override")
    assert found == "add"


def test_quarantine_comes_before_the_guard() -> None:
    found, why = quarantined_and_held("update")
    assert found == "quarantined"
    assert "400 invalid user id" in why


def test_a_rebuild_held_for_its_empty_source_is_told_as_held() -> None:
    """A rebuild the removal guard holds (its source has no ids) sends nothing: the
    verdict is the hold, not a rebuild without the id."""
    found, why = next_action(
        wanted=False,
        member=True,
        mode="override",
        pending=None,
        in_pending=False,
        quarantine=[],
        held="the source returned no ids",
        error=None,
    )
    assert (found, why) == (
        "held",
        "the removal guard holds the plan that rebuilds the segment: the source returned no ids",
    )
