"""The sync engine: source -> diff against the snapshot -> batches -> WalkMe -> snapshot.

One segment run:
1. read the source's ids and apply the id rules;
2. diff them against the snapshot of what WalkMe acknowledged (``syncd.diff``,
   streamed, in bounded memory);
3. send ``remove`` batches, then ``add`` batches (a new segment is created with
   its first batch; an adopted or reset one is rebuilt with ``override``);
4. record each acknowledged batch in the snapshot before sending the next, so a
   crash re-sends at most the one batch that was in flight (remembered as the
   pending batch, and sent again first by the next run).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Literal

import structlog
from pydantic import ValidationError

from syncd import metrics
from syncd.diff import Diff, Quarantined, compute_diff
from syncd.ids import NotAnId, SkippedIds, clean_ids
from syncd.logs import scrub
from syncd.processes import alive
from syncd.settings import HeapWebhookSourceConfig, SegmentMapping, Settings, printable
from syncd.sources import Source, SourceError, build_source
from syncd.sources.base import bounded, bounded_chunks
from syncd.state import Action, SegmentState, StateError, StateStore
from syncd.state.base import HeapSegment, LeaseLost, PendingBatch, RunResult, StateRecreated
from syncd.walkme import (
    BeforeAttempt,
    WalkMeAuthError,
    WalkMeClient,
    WalkMeConflict,
    WalkMeError,
    WalkMeNotFound,
    WalkMeRejected,
    WalkMeStopped,
    WalkMeTooLarge,
    normalize_guid,
    request_tally,
)

log = structlog.get_logger("syncd.engine")

EXAMPLES_SHOWN = 5
SNAPSHOT_CHUNK = 50_000  # larger chunks measured no faster, and cost peak memory
MAX_QUARANTINED_PER_BATCH = 1000  # more than this is not "a few bad ids": give up
# A segment synced within this many schedule intervals is in use, mapped or not: a
# replica that maps it may be restarting mid-rollout. No orphan, never deleted.
IN_USE_INTERVALS = 3
Mode = Literal["create", "override", "update"]


class Interrupted(Exception):
    """Shutdown was requested; the batch in flight finished and was recorded."""


class SegmentInUse(Exception):
    """A delete refused: a replica maps, syncs or recently synced the segment."""


@dataclass(frozen=True)
class Hold:
    """Why the removal guard held a segment, with the numbers."""

    reason: str
    removes: int
    snapshot_members: int
    source_ids: int
    max_remove_fraction: float


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
class Lease:
    """One tenure of a segment's lease. The holder token is unique per tenure, so a
    lease this process takes again later is never mistaken for this one."""

    name: str
    holder: str  # host:pid:nonce-run_id (``_dead_here`` reads host and pid)
    run_id: str  # the run holding it now (a rerun keeps the tenure)
    renewed_at: float  # monotonic time the store last confirmed it
    lost: bool = False
    released: bool = False


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
    interrupted: bool = False  # stopped by a signal after recording its last batch
    lease_lost: bool = False  # another replica may have taken over: stop sending
    lease: Lease | None = None  # None: a dry run, which takes no lease
    read_started: float | None = None  # store clock when the run began reading its source
    source_fingerprint: str | None = None
    unchanged: bool = False  # the source's fingerprint matched: nothing was read


@dataclass(frozen=True)
class BrokenMapping:
    """A segment stored by the webhook that cannot be synced as it is (its name breaks
    the mapping rules): each cycle reports it failed, and the other segments run."""

    name: str  # as stored, possibly unprintable: show it through printable()
    heap_segment_id: int
    error: str  # what is wrong and what to do


@dataclass(frozen=True)
class MappingSet:
    usable: dict[str, SegmentMapping]
    broken: dict[str, BrokenMapping]

    @property
    def names(self) -> set[str]:
        """Every segment syncd is asked to keep, usable or not (none of them an orphan)."""
        return set(self.usable) | set(self.broken)


@dataclass
class _Target:
    """Where one run's batches go; ``guid`` is set once a create is acknowledged."""

    mapping: SegmentMapping
    system: str
    guid: str | None
    outcome: Outcome
    # After a 413: the most ids one request may carry for the rest of this run.
    max_ids: int | None = None
    # While replaying a pending batch: its ids not yet acknowledged. They stay the
    # pending batch (an earlier, lost request may have applied any of them) until
    # each is recorded, so a crash mid-replay leaves none of them unaccounted for.
    unsettled: dict[str, None] | None = None


class Engine:
    """Runs segment syncs: at most one run per segment, ``concurrency`` at once."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        client: WalkMeClient,
        mappings: Sequence[SegmentMapping],
    ) -> None:
        self._settings = settings
        self._store = store
        self._client = client
        self._configured = {mapping.name: mapping for mapping in mappings}
        self._locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._stopping = False
        # Who holds a segment's lease: unique per process, readable in the database.
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._ttl = settings.lease_ttl
        self._in_use_s = IN_USE_INTERVALS * settings.parsed_schedule.typical_interval()
        # Mapping-set differences with other replicas already warned about, by replica.
        self._differences: dict[str, tuple[list[str], list[str]]] = {}

    def stop(self) -> None:
        """Finish the batches in flight, then end every run."""
        self._stopping = True
        self._client.stop()

    async def mappings(self) -> dict[str, SegmentMapping]:
        """The configured mappings, plus Heap segments auto-mapped by the webhook."""
        return (await self.mapping_set()).usable

    async def mapping_set(self) -> MappingSet:
        """``mappings()`` plus the stored Heap segments that cannot be mapped."""
        return await all_mappings(self._settings, self._configured.values(), self._store)

    async def mapping_for_heap_segment(self, heap_segment_id: int) -> SegmentMapping | None:
        for mapping in (await self.mappings()).values():
            source = mapping.source
            if (
                isinstance(source, HeapWebhookSourceConfig)
                and source.heap_segment_id == heap_segment_id
            ):
                return mapping
        return None

    async def sync_heap_segment(self, heap_segment_id: int) -> Outcome | None:
        """The run a finished Heap sync task triggers; None when nothing maps it."""
        found = await self.mapping_set()
        for mapping in found.usable.values():
            source = mapping.source
            if (
                isinstance(source, HeapWebhookSourceConfig)
                and source.heap_segment_id == heap_segment_id
            ):
                return await self.sync_segment(mapping)
        for broken in found.broken.values():
            if broken.heap_segment_id == heap_segment_id:
                return self.report_broken(broken)
        return None

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
        outcome = Outcome(broken.name, "failed", uuid.uuid4().hex[:12], error=broken.error)
        with structlog.contextvars.bound_contextvars(
            segment=printable(broken.name), run_id=outcome.run_id
        ):
            record_run_metrics(outcome, None)
            self._log_outcome(outcome)
        return outcome

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
            outcome = Outcome(mapping.name, "failed", uuid.uuid4().hex[:12])
            outcome.error = f"internal error: {type(exc).__name__}: {exc}"
            with structlog.contextvars.bound_contextvars(
                segment=printable(mapping.name), run_id=outcome.run_id
            ):
                log.exception("segment.internal_error")
                record_run_metrics(outcome, None)
                self._log_outcome(outcome)
            return outcome

    async def _sync_segment(self, mapping: SegmentMapping, dry_run: bool, force: bool) -> Outcome:
        lock = self._locks.setdefault(mapping.name, asyncio.Lock())
        async with self._slots, lock:
            outcome = _new_outcome(mapping.name)
            with structlog.contextvars.bound_contextvars(
                segment=printable(mapping.name), run_id=outcome.run_id
            ):
                if dry_run:
                    await self._run(mapping, outcome, dry_run, force)
                    return outcome
                try:
                    lease = await self._take_lease(mapping.name, outcome.run_id)
                except StateError as exc:
                    # No run was opened, so there is none to close; the failure still shows.
                    outcome.error = f"cannot take the segment's lease: {exc}"
                    record_run_metrics(outcome, None)
                    self._log_outcome(outcome)
                    return outcome
                if lease is None:
                    # Several replicas share the work: this one is someone else's now.
                    log.info("segment.skipped", reason="another replica is syncing it")
                    outcome.result = "skipped"
                    metrics.segment_runs.labels(mapping.name, "skipped").inc()
                    return outcome
            keeper = asyncio.create_task(self._keep_lease(lease))
            try:
                while True:
                    outcome.lease = lease
                    with structlog.contextvars.bound_contextvars(
                        segment=mapping.name, run_id=outcome.run_id
                    ):
                        await self._run_leased(mapping, outcome, force)
                        if not await self._due_again(lease, outcome):
                            return outcome
                    outcome = _new_outcome(mapping.name)
                    lease.run_id = outcome.run_id
                    force = False  # --force applied the plan it was given, not a new one
            finally:
                keeper.cancel()
                if not lease.released:
                    await self._release_lease(lease)

    async def _run_leased(self, mapping: SegmentMapping, outcome: Outcome, force: bool) -> None:
        tally = request_tally.get()
        started = time.monotonic()
        try:
            await self._run(mapping, outcome, False, force)
        finally:
            outcome.duration_s = round(time.monotonic() - started, 3)
            outcome.requests = sum(tally.values()) if tally is not None else 0
            await self._finish(outcome)
            self._log_outcome(outcome)

    async def _take_lease(self, name: str, run_id: str) -> Lease | None:
        """The segment's lease for a new tenure, or None while another holds it. A
        trigger that finds it taken leaves a due mark first, so the holder runs the
        segment again before releasing: the run asked for here is never lost."""
        lease = Lease(name, f"{self._holder}-{run_id}", run_id, time.monotonic())
        if await self._acquire(lease):
            return lease
        await self._store.mark_due(name)
        # The holder may have released between our try and the mark.
        return lease if await self._acquire(lease) else None

    async def _acquire(self, lease: Lease) -> bool:
        try:
            taken = await self._store.acquire_lease(lease.name, lease.holder, self._ttl)
        except StateRecreated:
            # The store just made its lost tables again: this run starts the segment
            # afresh (found again in WalkMe and rebuilt), no need to wait a cycle.
            taken = await self._store.acquire_lease(lease.name, lease.holder, self._ttl)
        if taken:
            return True
        holder = await self._store.lease_holder(lease.name)
        if holder is None or not _dead_here(holder):
            return False
        # A process of this host that no longer runs (a restart after a crash):
        # waiting out its lease would only delay the run.
        log.info("segment.lease_broken", holder=holder)
        await self._store.release_lease(lease.name, holder)
        return await self._store.acquire_lease(lease.name, lease.holder, self._ttl)

    async def _keep_lease(self, lease: Lease) -> None:
        """Renew the lease while it is still ours; once it lapsed it is never resumed."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                renewed = await self._store.renew_lease(lease.name, lease.holder, self._ttl)
            except StateError:
                renewed = False
            if not renewed:
                self._lose(lease)
                return
            lease.renewed_at = time.monotonic()

    def _lease_proof(self, outcome: Outcome) -> BeforeAttempt | None:
        """Before each send (and each retry of one): the lease is still this run's,
        by the store's clock, or LeaseLost and nothing is sent."""
        lease = outcome.lease
        if lease is None:
            return None

        async def prove() -> None:
            if not lease.lost and await self._store.renew_lease(
                lease.name, lease.holder, self._ttl
            ):
                lease.renewed_at = time.monotonic()
                return
            self._lose(lease)
            raise LeaseLost(lease.name)

        return prove

    def _lose(self, lease: Lease) -> None:
        if not lease.lost:
            lease.lost = True
            log.warning("segment.lease_lost", segment=lease.name, run_id=lease.run_id)

    async def _due_again(self, lease: Lease, outcome: Outcome) -> bool:
        """Release the lease unless the segment was asked for since this run began
        reading (a due mark): then keep it and say so, and the caller runs again."""
        finished = outcome.result in ("synced", "held") and not lease.lost
        if not finished or self._stopping or outcome.read_started is None:
            return False  # released unconditionally; a failed run waits for the schedule
        try:
            released = await self._store.release_lease(
                lease.name, lease.holder, outcome.read_started
            )
        except StateError as exc:  # it expires by itself
            log.warning("state.unavailable", error=str(exc))
            lease.released = True
            return False
        if released:
            lease.released = True
            return False
        log.info(
            "segment.rerun",
            reason="asked for again (webhook, sync command or schedule) after this run"
            " began reading its source",
        )
        return True

    async def _release_lease(self, lease: Lease) -> None:
        try:
            await self._store.release_lease(lease.name, lease.holder)
        except StateError as exc:  # it expires by itself
            log.warning("state.unavailable", error=str(exc))

    async def _run(
        self, mapping: SegmentMapping, outcome: Outcome, dry_run: bool, force: bool
    ) -> None:
        system = self._settings.system_for(mapping)
        try:
            source = build_source(mapping.source, self._settings, self._store)
            if dry_run:
                state = await self._store.get(mapping.name)
            else:
                state = await self._store.begin_run(
                    mapping.name, outcome.run_id, system, mapping.external_id
                )
                # What was asked for after this instant is not in what this run reads.
                outcome.read_started = await self._store.clock()
                check = partial(self._check_stopping, outcome)
                limit_s = self._settings.source_timeout
                fingerprint = await bounded(source.fingerprint(), limit_s, source, check)
                if _unchanged(state, mapping, fingerprint):
                    # The source is byte-for-byte what the last successful run
                    # delivered, so the diff would be empty: skip reading it.
                    assert state is not None
                    outcome.source_fingerprint = fingerprint
                    outcome.skipped = SkippedIds(state.skipped, state.skipped_examples)
                    outcome.unchanged = True
                    outcome.result = "synced"
                    return
                state = await self._replay_pending(mapping, system, state, outcome)
            for attempt in (1, 2):
                mode = _mode(state, mapping)
                outcome.skipped = SkippedIds()
                diff = await self._diff(mapping, source, state, mode, outcome)
                try:
                    if dry_run:
                        outcome.plan = self._plan(mapping, diff, mode, state)
                        outcome.result = "planned"
                        return
                    if mode == "update" and not force:
                        snapshot = state.members if state else 0
                        outcome.hold = self._guard(mapping, snapshot, diff.removes, diff.distinct)
                        if outcome.hold is not None:
                            outcome.result, outcome.error = "held", outcome.hold.reason
                            return
                    await self._store.release_quarantine(mapping.name, diff.released)
                    await self._push(mapping, system, diff, outcome)
                    break
                except WalkMeNotFound:
                    if attempt == 2:
                        raise
                    # Deleted in WalkMe behind our back: start over with a new segment.
                    log.warning("segment.recreating", reason="WalkMe answered 404 on update")
                    await self._store.forget_guid(mapping.name)
                    state = await self._store.get(mapping.name)
                finally:
                    diff.close()
            outcome.result = "synced"
        except (Interrupted, WalkMeStopped, LeaseLost) as exc:
            outcome.error, outcome.interrupted = str(exc), True
            outcome.lease_lost = isinstance(exc, LeaseLost)
        except (SourceError, WalkMeError, StateError) as exc:
            outcome.error = str(exc) or type(exc).__name__
        except Exception as exc:
            # A bug must fail this segment's run, not the daemon.
            log.exception("segment.internal_error")
            outcome.error = f"internal error: {type(exc).__name__}: {exc}"

    async def _replay_pending(
        self, mapping: SegmentMapping, system: str, state: SegmentState, outcome: Outcome
    ) -> SegmentState:
        """A batch whose answer was lost may or may not be in WalkMe; sending it again
        (add, remove and override are idempotent) makes the snapshot exact again, so
        the diff that follows is right even for ids that changed since."""
        pending = await self._store.pending_batch(mapping.name)
        if pending is None:
            return state
        if _mode(state, mapping) != "update":
            await self._store.clear_pending(mapping.name)  # the run rebuilds it anyway
            return state
        log.info("segment.replaying", action=pending.action, ids=len(pending.ids))
        target = _Target(mapping, system, state.segment_guid, outcome)
        target.unsettled = dict.fromkeys(pending.ids)
        # In today's batch size: a batch stored under a larger SYNCD_BATCH_SIZE (or
        # refused as too large) must not be sent whole on every run.
        size = self._settings.batch_size
        await self._deliver_in_slices(target, pending.action, pending.ids, size)
        if target.unsettled:
            await self._store.clear_pending(mapping.name)  # what is left was refused
        refreshed = await self._store.get(mapping.name)
        assert refreshed is not None
        return refreshed

    async def _diff(
        self,
        mapping: SegmentMapping,
        source: Source,
        state: SegmentState | None,
        mode: Mode,
        outcome: Outcome,
    ) -> Diff:
        """Source ids (after the id rules) against the snapshot; a new or rebuilt
        segment is diffed against nothing, as everything must be sent."""
        log.debug("segment.reading", source=source.describe())

        async def cleaned() -> AsyncIterator[list[str]]:
            check = partial(self._check_stopping, outcome)
            async for chunk in bounded_chunks(source, self._settings.source_timeout, check):
                try:
                    ids = clean_ids(chunk, outcome.skipped)
                except NotAnId as exc:
                    raise SourceError(f"{source.describe()}: {exc}") from None
                yield ids

        if mode == "update" and state is not None:
            snapshot = self._store.snapshot(mapping.name, SNAPSHOT_CHUNK)
            snapshot_size = state.members
            quarantined = await self._store.quarantined(mapping.name)
        else:
            snapshot, snapshot_size, quarantined = _nothing(), 0, Quarantined()
        diff = await compute_diff(cleaned(), snapshot, quarantined, self._settings.work_dir)
        # What a successful run records: the digest of exactly the ids just diffed.
        outcome.source_fingerprint = source.read_fingerprint()
        if diff.distinct == 0 and snapshot_size > 0:
            # An empty or half-loaded table looks exactly like this.
            log.warning(
                "segment.source_empty",
                source=source.describe(),
                source_ids=0,
                snapshot_members=snapshot_size,
            )
        return diff

    def _plan(
        self, mapping: SegmentMapping, diff: Diff, mode: Mode, state: SegmentState | None
    ) -> Plan:
        snapshot = state.members if state is not None and mode == "update" else 0
        return Plan(
            mode=mode,
            staged=diff.distinct,
            adds=diff.adds,
            removes=diff.removes,
            add_examples=diff.examples("add", EXAMPLES_SHOWN),
            remove_examples=diff.examples("remove", EXAMPLES_SHOWN),
            held=(
                self._guard(mapping, snapshot, diff.removes, diff.distinct)
                if mode == "update"
                else None
            ),
        )

    def _guard(
        self, mapping: SegmentMapping, snapshot: int, removes: int, source_ids: int
    ) -> Hold | None:
        """A Hold when this plan must not be sent unasked: a source hiccup must
        never empty a segment."""
        fraction = mapping.max_remove_fraction
        if fraction is None:
            fraction = self._settings.max_remove_fraction
        if fraction >= 1.0:
            return None
        if source_ids == 0 and snapshot > 0:
            reason = f"the source returned no ids while WalkMe holds {snapshot} members"
        elif snapshot >= self._settings.guard_min_members and removes > fraction * snapshot:
            reason = (
                f"{removes} of {snapshot} members would be removed"
                f" ({removes / snapshot:.0%}, more than max_remove_fraction {fraction})"
            )
        else:
            return None
        return Hold(reason, removes, snapshot, source_ids, fraction)

    async def _push(
        self, mapping: SegmentMapping, system: str, diff: Diff, outcome: Outcome
    ) -> None:
        guid, mode = await self._resolve(mapping, system)
        target = _Target(mapping, system, guid, outcome)
        size = self._settings.batch_size
        if mode == "update":
            for batch in diff.batches("remove", size):
                self._check_stopping(outcome)
                await self._deliver(target, "remove", batch)
        # A new segment is created with its first batch; an adopted or reset one
        # is rebuilt with override as its first batch.
        first: Action | None = None if mode == "update" else mode
        for batch in diff.batches("add", size):
            self._check_stopping(outcome)
            await self._deliver(target, first or "add", batch)
            first = None
        if first is not None:
            # Nothing to add, yet the segment must exist (create) or be emptied
            # of unknown members (override).
            await self._deliver(target, first, [])

    async def _deliver(self, target: _Target, action: Action, batch: list[str]) -> None:
        """Send one batch and record it; on a 400, find and quarantine the rejected ids;
        on a 413, send it in halves."""
        if target.max_ids is not None and len(batch) > target.max_ids:
            await self._deliver_in_slices(target, action, batch, target.max_ids)
            return
        try:
            await self._send(target, action, batch)
        except (WalkMeRejected, WalkMeTooLarge) as exc:
            if not batch:
                raise
            if isinstance(exc, WalkMeTooLarge) and len(batch) == 1:
                raise _too_large_for_one(exc) from None
            if action in ("create", "override"):
                # Establish (or empty) the segment first, then add the batch piecewise.
                await self._send(target, action, [])
                await self._record(target, action, [])
                action = "add"
            if isinstance(exc, WalkMeTooLarge):
                # Not applied: nothing was wrong but the size. Halve, and keep to
                # that size for the rest of the run.
                half = (len(batch) + 1) // 2
                target.max_ids = min(target.max_ids or half, half)
                await self._deliver_in_slices(target, action, batch, half)
                return
            await self._isolate(target, "remove" if action == "remove" else "add", batch, exc)
            return
        await self._record(target, action, batch)

    async def _deliver_in_slices(
        self, target: _Target, action: Action, batch: list[str], size: int
    ) -> None:
        """A batch as several requests of at most ``size`` ids; after the first,
        a create or override goes on with add (each would replace what came before)."""
        for start in range(0, max(len(batch), 1), size):
            if start:
                self._check_stopping(target.outcome)
            await self._deliver(target, action, batch[start : start + size])
            if action in ("create", "override"):
                action = "add"

    async def _send(self, target: _Target, action: Action, batch: list[str]) -> None:
        mapping = target.mapping
        if action == "create":
            try:
                target.guid = await self._client.create_segment(
                    target.system,
                    mapping.name,
                    mapping.external_id,
                    batch,
                    self._lease_proof(target.outcome),
                )
            except WalkMeConflict as exc:
                if exc.guid is None:
                    raise
                # Our own create key is taken: an earlier create did land. Its
                # members are unknown, so adopt it and rebuild it with this batch.
                await self._store.adopt(mapping.name, exc.guid, "created")
                log.info("segment.adopted", segment_guid=exc.guid, by="create key")
                target.guid = exc.guid
                await self._send(target, "override", batch)
                return
            log.info("segment.created", segment_guid=target.guid)
            return
        assert target.guid is not None
        # Remembered before sending: if the answer is lost (crash, kill, timeout),
        # the next run sends this batch again before it diffs. A replay's ids are
        # remembered already.
        holder = _holder(target.outcome)
        if target.unsettled is None:
            await self._store.begin_batch(mapping.name, action, batch, holder)
        try:
            await self._client.update_segment(
                target.system, target.guid, action, batch, self._lease_proof(target.outcome)
            )
        except WalkMeNotFound:
            await self._store.clear_pending(mapping.name, holder)  # the segment is gone: rebuilt
            raise
        except (WalkMeRejected, WalkMeTooLarge, WalkMeAuthError):
            if target.unsettled is None:
                # Refused: certainly not applied. (A replayed batch may have been
                # applied by the request whose answer was lost: it stays pending.)
                await self._store.clear_pending(mapping.name, holder)
            raise

    async def _record(self, target: _Target, action: Action, batch: list[str]) -> None:
        outcome = target.outcome
        still_pending: PendingBatch | None = None
        if target.unsettled is not None:
            for member in batch:
                target.unsettled.pop(member, None)
            # After an override's first slice, the rest only adds.
            rest: Action = "add" if action in ("create", "override") else action
            still_pending = PendingBatch(rest, list(target.unsettled))
        await self._store.record_batch(
            target.mapping.name,
            outcome.run_id,
            action,
            batch,
            target.guid,
            _holder(outcome),
            still_pending=still_pending,
        )
        if action == "remove":
            outcome.removed += len(batch)
        else:
            outcome.added += len(batch)

    async def _isolate(
        self,
        target: _Target,
        action: Literal["add", "remove"],
        batch: list[str],
        error: WalkMeRejected,
    ) -> None:
        """Bisect a rejected batch down to the single ids WalkMe refuses.

        k bad ids cost about 2·k·log2(len(batch)) extra requests. A 400 that is
        not about ids (every part refused, even an empty request) fails the run
        instead of quarantining good ids.
        """
        pending = [batch[len(batch) // 2 :], batch[: len(batch) // 2]]
        rejected: list[tuple[str, str]] = []
        accepted = 0
        control_done = False
        try:
            while pending:
                part = pending.pop()
                self._check_stopping(target.outcome)
                try:
                    await self._send(target, action, part)
                except WalkMeTooLarge as exc:
                    if len(part) == 1:
                        raise _too_large_for_one(exc) from None
                    pending += [part[len(part) // 2 :], part[: len(part) // 2]]
                    continue
                except WalkMeRejected as exc:
                    if len(part) > 1:
                        pending += [part[len(part) // 2 :], part[: len(part) // 2]]
                        continue
                    if not accepted and not control_done:
                        # Before blaming any id: does WalkMe refuse even no ids?
                        control_done = True
                        await self._control_request(target, action, exc)
                    rejected.append((part[0], exc.body or str(exc)))
                    if len(rejected) > MAX_QUARANTINED_PER_BATCH:
                        raise WalkMeRejected(
                            f"WalkMe rejected more than {MAX_QUARANTINED_PER_BATCH} ids of one"
                            f" batch; giving up on this run. Last answer: {exc.body}",
                            400,
                            exc.body,
                        ) from None
                    continue
                await self._record(target, action, part)
                accepted += len(part)
        finally:
            if rejected:
                rejected = [(member, scrub(answer)) for member, answer in rejected]
                await self._store.quarantine(target.mapping.name, action, rejected)
                target.outcome.quarantined += len(rejected)
                log.warning(
                    "segment.quarantined",
                    action=action,
                    count=len(rejected),
                    ids=[member for member, _ in rejected[:EXAMPLES_SHOWN]],
                    walkme_answer=rejected[0][1][:300],
                    first_answer=error.body[:300],
                )

    async def _control_request(
        self, target: _Target, action: Literal["add", "remove"], exc: WalkMeRejected
    ) -> None:
        """An empty request: if WalkMe refuses even that, the 400 is not about ids."""
        try:
            await self._send(target, action, [])
        except WalkMeRejected as control:
            raise WalkMeRejected(
                "WalkMe answers 400 even to a request without ids: the problem is not"
                f" the ids. WalkMe said: {control.body or exc.body}",
                400,
                control.body,
            ) from None

    async def _resolve(self, mapping: SegmentMapping, system: str) -> tuple[str | None, Mode]:
        """Which WalkMe segment this mapping writes to, and how its first batch goes."""
        state = await self._store.get(mapping.name)
        assert state is not None
        wanted = normalize_guid(mapping.segment_guid) if mapping.segment_guid else None
        if wanted is not None and state.segment_guid != wanted:
            await self._store.adopt(mapping.name, wanted, "adopted")
            log.info("segment.adopted", segment_guid=wanted, by="segment_guid")
            return wanted, "override"
        if state.segment_guid is not None:
            return state.segment_guid, "override" if state.needs_override else "update"
        owned = {s.segment_guid: s for s in await self._store.all() if s.name != mapping.name}
        self._notice_rename(mapping, owned.values())
        found = await self._client.find_segment(system, mapping.name, mapping.external_id)
        if found is None or found.guid in owned:
            # Never write into a segment another (maybe orphaned) mapping owns.
            return None, "create"
        # WalkMe cannot show what it holds, so an adopted segment is rebuilt.
        await self._store.adopt(mapping.name, found.guid, "adopted")
        log.info(
            "segment.adopted",
            segment_guid=found.guid,
            by="external_id" if mapping.external_id else "name",
        )
        return found.guid, "override"

    def _notice_rename(self, mapping: SegmentMapping, others: Iterable[SegmentState]) -> None:
        if mapping.external_id is None:
            return
        for old in others:
            if old.external_id == mapping.external_id and old.name not in self._configured:
                log.warning(
                    "segment.renamed",
                    old_segment=old.name,
                    old_segment_guid=old.segment_guid,
                    external_id=mapping.external_id,
                    hint=f"WalkMe has no rename: the old segment {old.name!r} is now an orphan;"
                    f" `syncd delete --segment {old.name!r} --yes` (or `syncd prune --yes`)"
                    " deletes it and frees its external_id",
                )

    def running(self) -> list[str]:
        """Segments with a run in progress in this process."""
        return sorted(name for name, lock in self._locks.items() if lock.locked())

    async def heartbeat(self) -> None:
        """Tell other replicas (and ``prune``) that this one runs and what it maps;
        warn once per change when another live replica maps a different set."""
        names = sorted(await self.mappings())
        await self._store.heartbeat(self._holder, names, self._ttl)
        differences: dict[str, tuple[list[str], list[str]]] = {}
        for replica in await self._store.live_replicas():
            only_here = sorted(set(names) - set(replica.mappings))
            only_there = sorted(set(replica.mappings) - set(names))
            if replica.replica_id == self._holder or not (only_here or only_there):
                continue
            differences[replica.replica_id] = (only_here, only_there)
            if self._differences.get(replica.replica_id) != (only_here, only_there):
                log.warning(
                    "replicas.config_differs",
                    replica=replica.host_pid,
                    only_here=only_here,
                    only_there=only_there,
                    hint="replicas serve different segment mappings: a rollout under way"
                    " or a replica left behind; none of these segments counts as an orphan",
                )
        self._differences = differences

    async def leave(self) -> None:
        """This replica stops: it no longer keeps any segment in use."""
        await self._store.forget_replica(self._holder)

    async def claims(self) -> dict[str, str]:
        """Segments in use somewhere, whatever this configuration maps, and why: a live
        replica maps it, or it synced within IN_USE_INTERVALS schedule intervals."""
        claims: dict[str, str] = {}
        for replica in await self._store.live_replicas():
            for name in replica.mappings:
                claims.setdefault(
                    name,
                    f"mapped by live replica {replica.host_pid}"
                    f" (heartbeat {replica.seen_s_ago:.0f} s ago)",
                )
        window = timedelta(seconds=self._in_use_s)
        now = datetime.now(UTC)
        for state in await self._store.all():
            synced = state.last_success_at
            if state.name not in claims and synced is not None and now - synced < window:
                claims[state.name] = (
                    f"last synced at {synced.isoformat()}, less than {IN_USE_INTERVALS}"
                    f" schedule intervals ({window.total_seconds():.0f} s) ago; not an orphan"
                    f" before {(synced + window).isoformat()}"
                )
        return claims

    async def in_use(self, name: str) -> str | None:
        """Why this segment must not be deleted now, or None."""
        holder = await self._store.lease_holder(name)
        if holder is not None:
            return f"being synced now by {holder.rsplit(':', 1)[0]}"
        return (await self.claims()).get(name)

    async def report_orphans(self) -> list[SegmentState]:
        """One ``segment.orphaned`` line per segment syncd wrote to that no configuration
        of a live replica maps and that did not sync recently."""
        # A segment that cannot be mapped is still wanted: never an orphan to prune.
        in_use = set((await self.mapping_set()).names) | set(await self.claims())
        orphans = await self._store.mark_orphans(in_use)
        for orphan in orphans:
            log.warning(
                "segment.orphaned",
                segment=printable(orphan.name),
                segment_guid=orphan.segment_guid,
                members=orphan.members,
                origin=orphan.origin,
                since=orphan.orphaned_at.isoformat() if orphan.orphaned_at else None,
            )
        return orphans

    async def delete(self, state: SegmentState) -> bool:
        """Delete the WalkMe segment and forget it; False when WalkMe had it gone already.
        Raises SegmentInUse, deleting nothing, while any replica uses it."""
        reason = await self.in_use(state.name)
        if reason is not None:
            raise SegmentInUse(reason)
        existed = True
        if state.segment_guid is not None:
            try:
                await self._client.delete_segment(state.system_guid, state.segment_guid)
            except WalkMeNotFound:
                existed = False
        await self._store.forget(state.name)
        log.info(
            "segment.deleted",
            segment=state.name,
            segment_guid=state.segment_guid,
            already_gone=not existed,
        )
        return existed

    def _check_stopping(self, outcome: Outcome) -> None:
        if self._stopping:
            raise Interrupted("stopped by shutdown; the next run carries on from the snapshot")
        # Each send proves the lease by the store's clock (_lease_proof); this only
        # saves starting a batch once the keeper found it lost.
        if outcome.lease is not None and outcome.lease.lost:
            raise LeaseLost(outcome.segment)

    async def _finish(self, outcome: Outcome) -> None:
        result: RunResult = outcome.result if outcome.result in ("synced", "held") else "failed"
        if outcome.error is not None:
            # Stored, printed by status/history and logged: never with a secret in it.
            outcome.error = scrub(outcome.error)
        try:
            await self._store.finish_run(
                outcome.segment,
                outcome.run_id,
                result,
                outcome.error,
                outcome.skipped,
                outcome.requests,
                outcome.quarantined,
                outcome.source_fingerprint,
                holder=_holder(outcome),
            )
            state = await self._store.get(outcome.segment)
        except StateError as exc:
            outcome.result = "failed"
            outcome.error = outcome.error or scrub(str(exc))
            state = None
        record_run_metrics(outcome, state)

    def _log_outcome(self, outcome: Outcome) -> None:
        fields: dict[str, object] = {
            "added": outcome.added,
            "removed": outcome.removed,
            "skipped": outcome.skipped.count,
            "requests": outcome.requests,
            "duration_s": outcome.duration_s,
            "quarantined": outcome.quarantined,
        }
        if outcome.skipped.count:
            log.warning(
                "segment.ids_skipped",
                skipped=outcome.skipped.count,
                examples=outcome.skipped.examples,
            )
        if outcome.result == "synced":
            log.info("segment.synced", unchanged=outcome.unchanged, **fields)
        elif outcome.hold is not None:
            hold = outcome.hold
            log.warning(
                "segment.held",
                reason=hold.reason,
                planned_removes=hold.removes,
                snapshot_members=hold.snapshot_members,
                source_ids=hold.source_ids,
                max_remove_fraction=hold.max_remove_fraction,
                hint=f"syncd sync --segment {outcome.segment!r} --force applies it once",
                **fields,
            )
        else:
            fields.update(error=outcome.error, interrupted=outcome.interrupted)
            if outcome.interrupted:
                # A shutdown mid-run is routine (deploys): no error-level line for it.
                log.warning("segment.failed", **fields)
            else:
                log.error("segment.failed", **fields)


def _new_outcome(name: str) -> Outcome:
    # Each run counts its own requests (the tally is task-local).
    request_tally.set(Counter())
    return Outcome(name, "failed", uuid.uuid4().hex[:12])


def _holder(outcome: Outcome) -> str | None:
    """The lease token that fences this run's writes (None: a run without a lease)."""
    return outcome.lease.holder if outcome.lease is not None else None


def _too_large_for_one(exc: WalkMeTooLarge) -> WalkMeError:
    return WalkMeError(
        "WalkMe (or a proxy before it) answers 413 payload too large even to a request"
        " with one id: raise the request body limit of the proxy between syncd and WalkMe."
        f" WalkMe said: {exc.body}",
        413,
        exc.body,
    )


def _dead_here(holder: str) -> bool:
    """Whether a lease holder (``host:pid:nonce``) was a process of this host that is gone."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    # Our own pid with another nonce is a previous run of this container.
    return pid == os.getpid() or not alive(pid)


def _unchanged(
    state: SegmentState | None, mapping: SegmentMapping, fingerprint: str | None
) -> bool:
    """Whether a full run would send nothing, so the source need not be read.

    The invariant that makes this exact: a stored fingerprint is the digest of
    exactly the bytes (with the column and the id rules) whose ids the last run
    diffed and delivered in full (``Source.read_fingerprint``, never the earlier
    cheap check); ``begin_run`` clears it, so a run that crashed, failed or was
    held leaves none; and only a plain update keeps the snapshot (a reset or an
    adoption rebuilds). An equal fingerprint then means the same ids against the
    same snapshot, and the same (empty) diff.
    """
    return (
        fingerprint is not None
        and state is not None
        and state.source_fingerprint == fingerprint
        and state.last_result == "synced"
        and _mode(state, mapping) == "update"
    )


def _mode(state: SegmentState | None, mapping: SegmentMapping) -> Mode:
    """How this run's first batch goes: create, override (rebuild), or plain update."""
    if state is None or state.segment_guid is None:
        return "create"
    wanted = normalize_guid(mapping.segment_guid) if mapping.segment_guid else None
    if state.needs_override or (wanted is not None and wanted != state.segment_guid):
        return "override"
    return "update"


async def _nothing() -> AsyncIterator[list[str]]:
    return
    yield  # an empty async generator


def record_run_metrics(outcome: Outcome, state: SegmentState | None) -> None:
    name = outcome.segment
    metrics.segment_runs.labels(name, outcome.result).inc()
    counts = {
        "added": outcome.added,
        "removed": outcome.removed,
        "skipped": outcome.skipped.count,
        "quarantined": outcome.quarantined,
    }
    for action, count in counts.items():
        if count:
            metrics.segment_ids.labels(name, action).inc(count)
    if state is not None:
        set_segment_gauges(state)


def set_segment_gauges(state: SegmentState) -> None:
    metrics.segment_members.labels(state.name).set(state.members)
    if state.last_success_at is not None:
        metrics.last_success.labels(state.name).set(state.last_success_at.timestamp())


async def current_mappings(
    settings: Settings, configured: Iterable[SegmentMapping], store: StateStore
) -> dict[str, SegmentMapping]:
    """The configured mappings, plus Heap segments auto-mapped by the webhook."""
    return (await all_mappings(settings, configured, store)).usable


async def all_mappings(
    settings: Settings, configured: Iterable[SegmentMapping], store: StateStore
) -> MappingSet:
    """``current_mappings`` plus the stored Heap segments that cannot be auto-mapped:
    one bad row fails its own segment, never the listing."""
    mappings = {mapping.name: mapping for mapping in configured}
    broken: dict[str, BrokenMapping] = {}
    if not settings.auto_map:
        return MappingSet(mappings, broken)
    taken = {
        m.source.heap_segment_id
        for m in mappings.values()
        if isinstance(m.source, HeapWebhookSourceConfig)
    }
    for heap in await store.heap_segments():
        if heap.heap_segment_id in taken:
            continue
        if heap.mapping_name in mappings:
            log.warning(
                "heap.auto_map_conflict",
                heap_segment_id=heap.heap_segment_id,
                name=printable(heap.mapping_name),
                reason="another segment already has this name",
            )
            continue
        try:
            mappings[heap.mapping_name] = auto_mapping(heap.heap_segment_id, heap.mapping_name)
        except ValidationError as exc:
            broken[heap.mapping_name] = _broken_auto_mapping(heap, exc)
    return MappingSet(mappings, broken)


def _broken_auto_mapping(heap: HeapSegment, exc: ValidationError) -> BrokenMapping:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"] if part != "heap_webhook")
    heap_segment_id = heap.heap_segment_id
    return BrokenMapping(
        name=heap.mapping_name,
        heap_segment_id=heap_segment_id,
        error=(
            f"Heap segment {heap_segment_id} cannot be auto-mapped: {field}:"
            f" {error['msg'].removeprefix('Value error, ')};"
            " add a mapping with a valid name and"
            f' "source": {{"type": "heap_webhook", "heap_segment_id": {heap_segment_id}}}'
            " to SYNCD_SEGMENTS"
        ),
    )


def auto_mapping(heap_segment_id: int, name: str) -> SegmentMapping:
    """The mapping a Heap segment gets when it arrives unconfigured (SYNCD_HEAP_AUTO_MAP)."""
    return SegmentMapping(
        name=name,
        external_id=str(heap_segment_id),
        source=HeapWebhookSourceConfig(type="heap_webhook", heap_segment_id=heap_segment_id),
    )
