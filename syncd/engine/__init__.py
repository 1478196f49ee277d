"""The sync engine: source -> diff against the snapshot -> batches -> WalkMe -> snapshot.

``Engine`` keeps runs apart (one per segment, ``concurrency`` at once, under the
segment's lease) and hands each to a ``SegmentRun`` (``run.py``: the five steps).
Its collaborators: ``leases.py`` (take, renew, prove, release), ``guard.py`` (the
removal guard), ``delivery.py`` (send and record batches, 413 halving, bisection,
quarantine, replay), ``resolve.py`` (which WalkMe segment, adoption, renames),
``mappings.py`` (which segments), ``lifecycle.py`` (replicas, orphans, delete),
``report.py`` (log lines and metrics) and ``notices.py`` (messages for a person).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Sequence

import structlog

from syncd import metrics
from syncd.engine.control import Interrupted, RunControl
from syncd.engine.guard import Hold, force_command, hold_for
from syncd.engine.leases import Lease, LeaseKeeper
from syncd.engine.lifecycle import IN_USE_INTERVALS, SegmentInUse, SegmentLifecycle
from syncd.engine.mappings import (
    BrokenMapping,
    MappingSet,
    all_mappings,
    auto_mapping,
    current_mappings,
)
from syncd.engine.notices import RunNotices
from syncd.engine.outcome import Outcome, Plan
from syncd.engine.report import report, set_segment_gauges
from syncd.engine.resolve import Mode, SegmentResolver
from syncd.engine.run import SegmentRun
from syncd.notify import Notifier
from syncd.schedule import Schedule
from syncd.settings import SegmentMapping, Settings, printable
from syncd.state import StateError, StateStore
from syncd.walkme import WalkMeClient

__all__ = [
    "IN_USE_INTERVALS",
    "BrokenMapping",
    "Engine",
    "Hold",
    "Interrupted",
    "MappingSet",
    "Mode",
    "Outcome",
    "Plan",
    "SegmentInUse",
    "all_mappings",
    "auto_mapping",
    "current_mappings",
    "force_command",
    "hold_for",
    "set_segment_gauges",
]

log = structlog.get_logger("syncd.engine")


class Engine:
    """Runs segment syncs: at most one run per segment, ``concurrency`` at once."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        client: WalkMeClient,
        mappings: Sequence[SegmentMapping],
        notifier: Notifier | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._client = client
        self._configured = {mapping.name: mapping for mapping in mappings}
        self._locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._stopping = False
        # Who holds a segment's lease: unique per process, readable in the database.
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._leases = LeaseKeeper(store, holder, settings.lease_ttl)
        self._resolver = SegmentResolver(store, client, self._configured.keys())
        # Each segment's schedule interval, for how long a past sync keeps it in use;
        # a segment mapped elsewhere (or auto-mapped) gets the longest, to be safe.
        intervals = {s.key: s.typical_interval() for s in self.schedules()}
        by_name = {
            name: intervals[settings.schedule_for(mapping).key]
            for name, mapping in self._configured.items()
        }
        longest = max(intervals.values())
        self._notices = (
            None
            if notifier is None
            else RunNotices(store, notifier, settings.notify_after_failures)
        )
        self._lifecycle = SegmentLifecycle(
            store,
            client,
            holder,
            settings.lease_ttl,
            lambda name: by_name.get(name, longest),
            self.mapping_set,
        )
        # Replicas, orphans and delete: the lifecycle's, offered here for callers.
        self.heartbeat = self._lifecycle.heartbeat
        self.leave = self._lifecycle.leave
        self.claims = self._lifecycle.claims
        self.in_use = self._lifecycle.in_use
        self.report_orphans = self._lifecycle.report_orphans
        self.delete = self._lifecycle.delete

    def stop(self) -> None:
        """Finish the batches in flight, then end every run."""
        self._stopping = True
        self._client.stop()

    def running(self) -> list[str]:
        """Segments with a run in progress in this process."""
        return sorted(name for name, lock in self._locks.items() if lock.locked())

    async def mappings(self) -> dict[str, SegmentMapping]:
        """The configured mappings, plus Heap segments auto-mapped by the webhook."""
        return (await self.mapping_set()).usable

    async def mapping_set(self) -> MappingSet:
        """``mappings()`` plus the stored Heap segments that cannot be mapped."""
        return await all_mappings(self._settings, self._configured.values(), self._store)

    def schedules(self) -> list[Schedule]:
        """Every schedule a segment runs on: ``SYNCD_SCHEDULE`` first (it also takes the
        auto-mapped segments), then each other one a mapping has."""
        return self._settings.schedules(self._configured.values())

    async def schedule_groups(self) -> dict[str, list[str]]:
        """The segments of each schedule (by ``Schedule.key``); segments that cannot be
        mapped are reported on ``SYNCD_SCHEDULE``'s."""
        found = await self.mapping_set()
        groups: dict[str, list[str]] = {schedule.key: [] for schedule in self.schedules()}
        for name, mapping in found.usable.items():
            groups.setdefault(self._settings.schedule_for(mapping).key, []).append(name)
        groups[self._settings.parsed_schedule.key] += found.broken
        return groups

    async def mapping_for_heap_segment(self, heap_segment_id: int) -> SegmentMapping | None:
        found = (await self.mapping_set()).for_heap_segment(heap_segment_id)
        return found if isinstance(found, SegmentMapping) else None

    async def sync_heap_segment(self, heap_segment_id: int) -> Outcome | None:
        """The run a finished Heap sync task triggers; None when nothing maps it."""
        found = (await self.mapping_set()).for_heap_segment(heap_segment_id)
        if isinstance(found, SegmentMapping):
            return await self.sync_segment(found)
        return None if found is None else self.report_broken(found)

    async def sync_all(
        self, names: Sequence[str] | None = None, *, dry_run: bool = False, force: bool = False
    ) -> list[Outcome]:
        found = await self.mapping_set()
        wanted = list(names) if names else [*found.usable, *found.broken]
        chosen = [found.usable[name] for name in wanted if name in found.usable]
        runs = (self.sync_segment(m, dry_run=dry_run, force=force) for m in chosen)
        outcomes = list(await asyncio.gather(*runs))
        broken = [found.broken[name] for name in wanted if name in found.broken]
        return outcomes + [self.report_broken(entry) for entry in broken]

    def report_broken(self, broken: BrokenMapping) -> Outcome:
        """A failed outcome for a segment that cannot be mapped, logged like any run's."""
        return self._failed(broken.name, broken.error)

    async def sync_segment(
        self, mapping: SegmentMapping, *, dry_run: bool = False, force: bool = False
    ) -> Outcome:
        """One run (more while it is asked for again meanwhile); ``force`` applies a
        plan the removal guard would hold.

        Never raises: whatever goes wrong fails this segment's run (logged with
        ``segment.failed``), never the caller and never the other segments."""
        try:
            return await self._sync_segment(mapping, dry_run, force)
        except Exception as exc:
            # A bug outside the run itself (the run catches its own).
            return self._failed(
                mapping.name, f"internal error: {type(exc).__name__}: {exc}", bug=True
            )

    async def _sync_segment(self, mapping: SegmentMapping, dry_run: bool, force: bool) -> Outcome:
        lock = self._locks.setdefault(mapping.name, asyncio.Lock())
        async with self._slots, lock:
            run_id = _run_id()
            with structlog.contextvars.bound_contextvars(
                segment=printable(mapping.name), run_id=run_id
            ):
                if dry_run:
                    run = self._new_run(mapping, run_id)
                    await run.plan()
                    return run.outcome
                try:
                    lease = await self._leases.take(mapping.name, run_id)
                except StateError as exc:
                    # No run was opened, so there is none to close; the failure still shows.
                    error = f"cannot take the segment's lease: {exc}"
                    return self._failed(mapping.name, error, run_id)
                if lease is None:
                    # Several replicas share the work: this one is someone else's now.
                    log.info("segment.skipped", reason="another replica is syncing it")
                    metrics.segment_runs.labels(mapping.name, "skipped").inc()
                    return Outcome(mapping.name, "skipped", run_id)
            keeper = asyncio.create_task(self._leases.keep(lease))
            try:
                while True:
                    run = self._new_run(mapping, lease.run_id, lease)
                    with structlog.contextvars.bound_contextvars(
                        segment=mapping.name, run_id=lease.run_id
                    ):
                        await run.run(force=force)
                        if not await self._due_again(lease, run):
                            return run.outcome
                    lease.run_id = _run_id()  # a rerun keeps the tenure, not the run id
                    force = False  # --force applied the plan it was given, not a new one
            finally:
                keeper.cancel()
                await self._leases.release(lease)

    def _new_run(
        self, mapping: SegmentMapping, run_id: str, lease: Lease | None = None
    ) -> SegmentRun:
        """A run with its own outcome and controls (no lease: a dry run)."""
        control = RunControl(
            self._is_stopping, lease, None if lease is None else self._leases.proof(lease)
        )
        return SegmentRun(
            self._settings,
            self._store,
            self._client,
            self._resolver,
            mapping,
            Outcome(mapping.name, "failed", run_id),
            control,
            self._notices,
        )

    def _is_stopping(self) -> bool:
        return self._stopping

    async def _due_again(self, lease: Lease, run: SegmentRun) -> bool:
        """Whether the segment must run again before its lease is released: only a
        finished run, outside shutdown, keeps it (a failed one waits for the schedule)."""
        if run.outcome.result not in ("synced", "held") or self._stopping:
            return False
        return await self._leases.due_again(lease, run.control.read_started)

    def _failed(
        self, name: str, error: str, run_id: str | None = None, *, bug: bool = False
    ) -> Outcome:
        """A failed outcome for a run that never got going, logged and counted."""
        outcome = Outcome(name, "failed", run_id or _run_id(), error=error)
        with structlog.contextvars.bound_contextvars(
            segment=printable(name), run_id=outcome.run_id
        ):
            if bug:
                log.exception("segment.internal_error")
            report(outcome)
        return outcome


def _run_id() -> str:
    return uuid.uuid4().hex[:12]
