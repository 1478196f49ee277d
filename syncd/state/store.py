"""``StateStore``: every part of the state contract, as callers use it.

Each part is its own class, to be read and tested alone: the snapshot
(``snapshots.SnapshotStore``), the quarantine (``snapshots.Quarantine``), run
history (``runs.RunLog``), leases and replicas (``leases``), the Heap page inbox
(``heap.HeapInbox``), what a person was last told (``notices.NoticeBoard``). The
snapshot is the only record of a segment's members on the WalkMe side (WalkMe
offers no call to read them), so every change to it happens in the same
transaction as the run progress that caused it.
"""

from __future__ import annotations

from abc import abstractmethod

from syncd.state.heap import HeapInbox
from syncd.state.leases import LeaseStore, ReplicaRegistry
from syncd.state.notices import NoticeBoard
from syncd.state.runs import RunLog
from syncd.state.snapshots import Quarantine, SnapshotStore


class StateStore(
    SnapshotStore, Quarantine, RunLog, LeaseStore, ReplicaRegistry, HeapInbox, NoticeBoard
):
    @abstractmethod
    async def ping(self) -> None:
        """Raise StateError unless the store answers."""

    @abstractmethod
    async def close(self) -> None: ...
