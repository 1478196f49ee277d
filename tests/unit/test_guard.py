"""The removal guard as a pure function: which update plans it holds, with the numbers."""

from __future__ import annotations

import pytest

from syncd.engine import Hold, hold_for


def held(removes: int, snapshot: int, source_ids: int, fraction: float = 0.5) -> Hold | None:
    return hold_for(
        removes=removes,
        snapshot_members=snapshot,
        source_ids=source_ids,
        max_remove_fraction=fraction,
        guard_min_members=100,
    )


def test_an_empty_source_against_members_is_held_whatever_the_size() -> None:
    hold = held(removes=3, snapshot=3, source_ids=0)
    assert hold == Hold("the source returned no ids while WalkMe holds 3 members", 3, 3, 0, 0.5)


def test_removing_more_than_the_fraction_is_held_with_its_share() -> None:
    hold = held(removes=600, snapshot=1000, source_ids=400)
    assert hold is not None
    assert hold.reason == (
        "600 of 1000 members would be removed (60%, more than max_remove_fraction 0.5)"
    )


@pytest.mark.parametrize(
    ("removes", "snapshot", "source_ids", "fraction"),
    [
        (500, 1000, 500, 0.5),  # exactly the fraction is allowed
        (60, 99, 39, 0.5),  # below guard_min_members: small segments churn freely
        (0, 0, 0, 0.5),  # nothing held and nothing in the source
        (1000, 1000, 0, 1.0),  # a fraction of 1 switches the guard off
    ],
)
def test_plans_the_guard_lets_through(
    removes: int, snapshot: int, source_ids: int, fraction: float
) -> None:
    assert held(removes, snapshot, source_ids, fraction) is None


def test_an_empty_source_against_one_member_is_held() -> None:
    assert held(removes=1, snapshot=1, source_ids=0) is not None


def test_a_segment_of_exactly_guard_min_members_is_guarded() -> None:
    assert held(removes=51, snapshot=100, source_ids=49) is not None


@pytest.mark.parametrize(
    ("source_ids", "fraction", "is_held"),
    [(0, 0.5, True), (1, 0.5, False), (0, 1.0, False)],
    ids=["empty source", "one id", "guard off"],
)
def test_a_rebuild_is_held_only_from_an_empty_source(
    source_ids: int, fraction: float, is_held: bool
) -> None:
    """A rebuild (override of an adopted or reset segment) replaces members WalkMe
    cannot show: only an empty source is known to empty it, and a fraction of 1 still
    switches the guard off."""
    hold = hold_for(
        removes=0,
        snapshot_members=0,
        source_ids=source_ids,
        max_remove_fraction=fraction,
        guard_min_members=100,
        rebuild=True,
    )
    assert (hold is not None) == is_held
    if hold is not None:
        assert hold == Hold(
            "the source returned no ids, and rebuilding the segment (adopted or reset;"
            " WalkMe cannot show what it holds) would empty it",
            0,
            0,
            0,
            0.5,
        )
