"""The state store contract: the snapshot of what WalkMe acknowledged, per segment.

The snapshot is the only record of a segment's members on the WalkMe side
(WalkMe offers no call to read them), so every change to it happens in the
same transaction as the run progress that caused it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from syncd.diff import Quarantined
from syncd.ids import SkippedIds

Action = Literal["create", "override", "add", "remove"]
Origin = Literal["created", "adopted"]
RunResult = Literal["synced", "failed", "held", "running"]


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


class StateStore(Protocol):
    async def get(self, name: str) -> SegmentState | None: ...

    async def all(self) -> list[SegmentState]: ...

    async def begin_run(
        self, name: str, run_id: str, system_guid: str, external_id: str | None
    ) -> SegmentState:
        """Create the segment's row if new and open a run record; returns the state
        as it was (the stored source fingerprint is cleared until the run succeeds)."""
        ...

    def snapshot(self, name: str, size: int) -> AsyncIterator[list[str]]:
        """The ids WalkMe acknowledged for this segment, in chunks."""
        ...

    async def adopt(self, name: str, segment_guid: str, origin: Origin) -> None:
        """Point at an existing WalkMe segment whose members are unknown: rebuild it."""
        ...

    async def record_batch(
        self,
        name: str,
        run_id: str,
        action: Action,
        ids: list[str],
        segment_guid: str | None = None,
        holder: str | None = None,
        *,
        still_pending: PendingBatch | None = None,
    ) -> None:
        """WalkMe acknowledged this batch: apply it to the snapshot and clear the
        pending batch (or make it ``still_pending``: the rest of a replay), atomically.
        With ``holder``, only while that holder's lease is unexpired (checked in the
        same transaction); otherwise LeaseLost, nothing written."""
        ...

    async def begin_batch(
        self, name: str, action: Action, ids: list[str], holder: str | None = None
    ) -> None:
        """About to send this batch: remembered until record_batch or clear_pending.
        Fenced by ``holder`` as record_batch is."""
        ...

    async def pending_batch(self, name: str) -> PendingBatch | None: ...

    async def clear_pending(self, name: str, holder: str | None = None) -> None:
        """WalkMe definitely did not apply the batch (it answered 4xx). Fenced by
        ``holder`` as record_batch is."""
        ...

    async def forget_guid(self, name: str) -> None:
        """The WalkMe segment is gone: drop its GUID and snapshot."""
        ...

    async def quarantine(
        self, name: str, action: Literal["add", "remove"], rejected: list[tuple[str, str]]
    ) -> None:
        """Ids WalkMe rejected, with its answer: not sent again until they change."""
        ...

    async def quarantined(self, name: str) -> Quarantined:
        """Every quarantined id of the segment, by action (a handful, normally)."""
        ...

    async def release_quarantine(self, name: str, released: Quarantined) -> None:
        """Their membership changed: try them again."""
        ...

    async def quarantine_examples(self, name: str, limit: int) -> list[tuple[str, str, str]]:
        """Some quarantined (id, action, reason), newest first."""
        ...

    async def mark_orphans(self, configured: set[str]) -> list[SegmentState]:
        """Segments with a WalkMe GUID but no mapping: record since when, return them."""
        ...

    async def forget(self, name: str) -> bool:
        """Drop everything known about a segment (after it was deleted in WalkMe)."""
        ...

    async def reset(self, name: str) -> bool:
        """Forget the snapshot so the next run rebuilds with ``override``."""
        ...

    async def finish_run(
        self,
        name: str,
        run_id: str,
        result: RunResult,
        error: str | None,
        skipped: SkippedIds,
        requests: int,
        quarantined: int,
        source_fingerprint: str | None = None,
        holder: str | None = None,
    ) -> None:
        """Close the run; a synced run keeps the source's fingerprint, others clear it.
        With ``holder``, the segment's own row changes only under that unexpired lease
        (a run that lost it closes its run record and leaves the segment alone)."""
        ...

    async def history(self, name: str, limit: int) -> list[RunRecord]:
        """The segment's runs, newest first."""
        ...

    async def prune_history(self, before: datetime) -> int:
        """Forget runs (and Heap page receipts) older than this; returns runs forgotten."""
        ...

    async def store_heap_page(self, page: HeapPage) -> PageReceipt:
        """Apply a page to the Heap segment's desired membership, once, durably."""
        ...

    async def heap_segments(self) -> list[HeapSegment]: ...

    def heap_members(self, heap_segment_id: int, size: int) -> AsyncIterator[list[str]]:
        """The desired membership Heap pushed, in chunks."""
        ...

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the right to run this segment; False while another holds it.
        A holder that dies loses the lease when ``ttl_s`` passes without a renewal."""
        ...

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease only while this holder still has it unexpired; False once
        it lapsed (even if nobody took it since: a lapsed lease is never resumed)."""
        ...

    async def lease_holder(self, name: str) -> str | None:
        """Who holds the segment's unexpired lease, if anyone."""
        ...

    async def release_lease(
        self, name: str, holder: str, read_started: float | None = None
    ) -> bool:
        """Give the lease up; True once this holder holds it no more. With
        ``read_started`` (a ``clock()`` reading), a due mark made since keeps the
        lease instead and answers False: the holder must run the segment again."""
        ...

    async def mark_due(self, name: str) -> None:
        """Something asked for a run of this segment now (by the store's clock)."""
        ...

    async def clock(self) -> float:
        """The store's lease clock, in seconds: the one leases and due marks use."""
        ...

    async def heartbeat(self, replica_id: str, mappings: list[str], live_s: float) -> None:
        """This replica runs and maps these segments; it counts as live for ``live_s``
        unless renewed. Rows of replicas that lapsed are dropped."""
        ...

    async def live_replicas(self) -> list[ReplicaPresence]:
        """Replicas whose heartbeat has not lapsed (by the store's clock), by id."""
        ...

    async def forget_replica(self, replica_id: str) -> None:
        """The replica stopped: it maps nothing any more."""
        ...

    async def ping(self) -> None:
        """Raise StateError unless the store answers."""
        ...

    async def close(self) -> None: ...
