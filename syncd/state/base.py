"""What the state stores hold and answer with, and how they fail (the contract
itself, by part, is ``syncd.state.store.StateStore``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Action = Literal["create", "override", "add", "remove"]
Origin = Literal["created", "adopted"]
RunResult = Literal["synced", "failed", "held", "running"]
# What a person was last told about a segment (SYNCD_NOTIFY_URL): all is well, it is
# failing, or the removal guard holds it.
Standing = Literal["ok", "failing", "held"]


class StateError(Exception):
    """The state store cannot be used; never answered by starting afresh."""


class LeaseLost(StateError):
    """This run no longer holds the segment's lease: another replica may be running
    it, so nothing may be sent or written for it any more."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"segment {name!r}: this run no longer holds its lease (another replica"
            " carries on); nothing more is sent or recorded"
        )


class StateRecreated(StateError):
    """The store had lost its tables (its database dropped and created again) and made
    them again, empty: the call failed, the next one works on the new schema."""


@dataclass(frozen=True)
class SegmentState:
    name: str
    system_guid: str
    segment_guid: str | None
    external_id: str | None
    origin: Origin | None
    needs_override: bool
    members: int
    last_run_at: datetime | None = None
    last_result: RunResult | None = None
    last_error: str | None = None
    last_success_at: datetime | None = None
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    orphaned_at: datetime | None = None
    quarantined: int = 0
    # The source's fingerprint at the last successful run (sources that have one).
    source_fingerprint: str | None = None
    # The digest of the id set it read (syncd.diff.SourceDigest); holds its seeds.
    source_digest: str | None = field(default=None, repr=False)
    collapsed: int = 0  # source ids sent as one with another (equal after the transform)
    # The id transform's steps at the last successful run (IdTransform.stored).
    id_transform: str | None = None


@dataclass(frozen=True)
class Delivered:
    """A member of the snapshot: the run that delivered it (None: before syncd
    recorded it) and when that run started (None: its record was pruned)."""

    run_id: str | None
    run_started_at: datetime | None


@dataclass(frozen=True)
class QuarantineEntry:
    """An id WalkMe rejected for one action, with its answer."""

    action: Literal["add", "remove"]
    reason: str
    since: datetime | None


@dataclass(frozen=True)
class NoticeState:
    """A segment's standing as last notified, and its failed runs in a row since its
    last finished one; ``version`` counts the writes: a write is claimed on it."""

    standing: Standing = "ok"
    failures: int = 0
    version: int = 0  # 0: never written


@dataclass(frozen=True)
class PendingBatch:
    """A batch sent to WalkMe whose answer was never recorded: it may or may not
    have been applied, so the next run sends it again before diffing."""

    action: Action
    ids: list[str]


@dataclass(frozen=True)
class HeapPage:
    """One page of a Heap Segments Sync call, already verified and parsed."""

    heap_segment_id: int
    segment_name: str
    sync_task_id: str
    page_number: int
    total_pages: int
    add: list[str]
    remove: list[str]


@dataclass(frozen=True)
class PageReceipt:
    duplicate: bool  # seen before: nothing changed
    task_complete: bool  # this page was the task's last outstanding one
    mapping_name: str  # the syncd segment this Heap segment feeds when auto-mapped


@dataclass(frozen=True)
class HeapSegment:
    heap_segment_id: int
    name: str  # Heap's current name
    mapping_name: str  # the name first seen: WalkMe has no rename, so it stays
    members: int
    complete_tasks: int


@dataclass(frozen=True)
class ReplicaPresence:
    """A ``syncd run`` process whose heartbeat has not lapsed, and what it maps."""

    replica_id: str  # host:pid:nonce, the same as its lease holder name
    mappings: list[str]  # the segment names it serves, sorted
    seen_s_ago: float  # since its last heartbeat, by the store's clock
    # When it next runs each segment on schedule (Unix time, by its own clock).
    next_runs: dict[str, float] = field(default_factory=dict)

    @property
    def host_pid(self) -> str:
        return self.replica_id.rsplit(":", 1)[0]


@dataclass(frozen=True)
class RunRecord:
    """One segment run, kept for ``syncd history`` (pruned by age)."""

    run_id: str
    segment: str
    started_at: datetime | None
    ended_at: datetime | None
    result: str
    added: int
    removed: int
    requests: int
    skipped: int
    quarantined: int
    error: str | None
