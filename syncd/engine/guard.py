"""The removal guard: a source hiccup must never empty a segment."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Hold:
    """Why the removal guard held a segment, with the numbers."""

    reason: str
    removes: int
    snapshot_members: int
    source_ids: int
    max_remove_fraction: float


def hold_for(
    *,
    removes: int,
    snapshot_members: int,
    source_ids: int,
    max_remove_fraction: float,
    guard_min_members: int,
    rebuild: bool = False,
) -> Hold | None:
    """A Hold when a plan must not be sent unasked, else None. A ``rebuild`` (an
    adopted or reset segment, sent with override) replaces members WalkMe cannot
    show: only an empty source is known to remove them all."""
    fraction, snapshot = max_remove_fraction, snapshot_members
    if fraction >= 1.0:
        return None
    if rebuild:
        if source_ids > 0:
            return None
        reason = (
            "the source returned no ids, and rebuilding the segment (adopted or reset;"
            " WalkMe cannot show what it holds) would empty it"
        )
    elif source_ids == 0 and snapshot > 0:
        reason = f"the source returned no ids while WalkMe holds {snapshot} members"
    elif snapshot >= guard_min_members and removes > fraction * snapshot:
        reason = (
            f"{removes} of {snapshot} members would be removed"
            f" ({removes / snapshot:.0%}, more than max_remove_fraction {fraction})"
        )
    else:
        return None
    return Hold(reason, removes, snapshot, source_ids, fraction)


def force_command(segment: str) -> str:
    """The command that applies a plan the removal guard holds, once, on purpose."""
    return f"syncd sync --segment {shlex.quote(segment)} --force"
