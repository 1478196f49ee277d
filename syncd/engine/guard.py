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
) -> Hold | None:
    """A Hold when an update plan must not be sent unasked, else None."""
    fraction, snapshot = max_remove_fraction, snapshot_members
    if fraction >= 1.0:
        return None
    if source_ids == 0 and snapshot > 0:
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
