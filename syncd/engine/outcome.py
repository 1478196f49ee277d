"""What a run reports: its result and counts, and the dry-run plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from syncd.engine.guard import Hold
from syncd.engine.resolve import Mode
from syncd.ids import SkippedIds


@dataclass(frozen=True)
class Plan:
    """What a run would send: the dry-run output."""

    mode: Mode
    staged: int  # distinct source ids after the id rules
    adds: int
    removes: int
    add_examples: list[str]
    remove_examples: list[str]
    held: Hold | None  # set when the removal guard would hold it


@dataclass
class Outcome:
    segment: str
    result: Literal["synced", "failed", "held", "planned", "skipped"]
    run_id: str
    added: int = 0
    removed: int = 0
    skipped: SkippedIds = field(default_factory=SkippedIds)
    requests: int = 0
    duration_s: float = 0.0
    error: str | None = None
    plan: Plan | None = None
    quarantined: int = 0
    hold: Hold | None = None
    interrupted: bool = False  # stopped by a signal or a lost lease, its last batch recorded
    source_fingerprint: str | None = None
    source_digest: str | None = field(default=None, repr=False)  # holds its seeds
    unchanged: bool = False  # the source's fingerprint matched: nothing was read
    # Source ids sent as one with another: equal after the transform (and trimming).
    collapsed: int = 0
    transform_examples: list[str] = field(default_factory=list)  # "'A' -> 'a'", first ids
    # The transform's steps at the last successful run, when they differ from today's.
    previous_transform: list[str] | None = None
