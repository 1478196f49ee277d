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
from typing import Literal

import structlog
from pydantic import ValidationError

from syncd import metrics
from syncd.diff import Diff, Quarantined, compute_diff
from syncd.ids import SkippedIds, clean_ids
from syncd.processes import alive
from syncd.settings import HeapWebhookSourceConfig, SegmentMapping, Settings, printable
from syncd.sources import Source, SourceError, build_source
from syncd.state import Action, SegmentState, StateError, StateStore
from syncd.state.base import HeapSegment, RunResult, StateRecreated
from syncd.walkme import (
    WalkMeAuthError,
    WalkMeClient,
    WalkMeConflict,
    WalkMeError,
    WalkMeNotFound,
    WalkMeRejected,
    WalkMeStopped,
    normalize_guid,
    request_tally,
)

log = structlog.get_logger("syncd.engine")

EXAMPLES_SHOWN = 5
SNAPSHOT_CHUNK = 50_000  # larger chunks measured no faster, and cost peak memory
MAX_QUARANTINED_PER_BATCH = 1000  # more than this is not "a few bad ids": give up
Mode = Literal["create", "override", "update"]


class Interrupted(Exception):
    """Shutdown was requested; the batch in flight finished and was recorded."""


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
    lease_renewed_at: float = 0.0  # monotonic time the lease was last confirmed
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
        """One run; ``force`` applies a plan the removal guard would hold.

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
            # Each run counts its own requests (the tally is task-local).
            tally: Counter[str] = Counter()
            request_tally.set(tally)
            outcome = Outcome(mapping.name, "failed", uuid.uuid4().hex[:12])
            with structlog.contextvars.bound_contextvars(
                segment=printable(mapping.name), run_id=outcome.run_id
            ):
                if dry_run:
                    await self._run(mapping, outcome, dry_run, force)
                    return outcome
                try:
                    leased = await self._take_lease(mapping.name)
                except StateError as exc:
                    # No run was opened, so there is none to close; the failure still shows.
                    outcome.error = f"cannot take the segment's lease: {exc}"
                    record_run_metrics(outcome, None)
                    self._log_outcome(outcome)
                    return outcome
                if not leased:
                    # Several replicas share the work: this one is someone else's now.
                    log.info("segment.skipped", reason="another replica is syncing it")
                    outcome.result = "skipped"
                    metrics.segment_runs.labels(mapping.name, "skipped").inc()
                    return outcome
                outcome.lease_renewed_at = time.monotonic()
                keeper = asyncio.create_task(self._keep_lease(mapping.name, outcome))
                started = time.monotonic()
                try:
                    await self._run(mapping, outcome, dry_run, force)
                finally:
                    keeper.cancel()
                    outcome.duration_s = round(time.monotonic() - started, 3)
                    outcome.requests = sum(tally.values())
                    await self._finish(outcome)
                    self._log_outcome(outcome)
                    await self._release_lease(mapping.name)
            return outcome

    async def _take_lease(self, name: str) -> bool:
        try:
            taken = await self._store.acquire_lease(name, self._holder, self._ttl)
        except StateRecreated:
            # The store just made its lost tables again: this run starts the segment
            # afresh (found again in WalkMe and rebuilt), no need to wait a cycle.
            taken = await self._store.acquire_lease(name, self._holder, self._ttl)
        if taken:
            return True
        holder = await self._store.lease_holder(name)
        if holder is None or not _dead_here(holder):
            return False
        # A process of this host that no longer runs (a restart after a crash):
        # waiting out its lease would only delay the run.
        log.info("segment.lease_broken", holder=holder)
        await self._store.release_lease(name, holder)
        return await self._store.acquire_lease(name, self._holder, self._ttl)

    async def _keep_lease(self, name: str, outcome: Outcome) -> None:
        """Renew the run's lease; if it is lost, the run stops after its current batch."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                renewed = await self._store.acquire_lease(name, self._holder, self._ttl)
            except StateError:
                renewed = False
            if not renewed:
                log.warning("segment.lease_lost")
                outcome.lease_lost = True
                return
            outcome.lease_renewed_at = time.monotonic()

    async def _release_lease(self, name: str) -> None:
        try:
            await self._store.release_lease(name, self._holder)
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
                outcome.source_fingerprint = await source.fingerprint()
                if _unchanged(state, mapping, outcome.source_fingerprint):
                    # The source is byte-for-byte what the last successful run
                    # delivered, so the diff would be empty: skip reading it.
                    assert state is not None
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
        except (Interrupted, WalkMeStopped) as exc:
            outcome.error, outcome.interrupted = str(exc), True
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
        await self._deliver(target, pending.action, pending.ids)
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
            async for chunk in source.chunks():
                yield clean_ids(chunk, outcome.skipped)

        if mode == "update" and state is not None:
            snapshot = self._store.snapshot(mapping.name, SNAPSHOT_CHUNK)
            snapshot_size = state.members
            quarantined = await self._store.quarantined(mapping.name)
        else:
            snapshot, snapshot_size, quarantined = _nothing(), 0, Quarantined()
        diff = await compute_diff(cleaned(), snapshot, quarantined, self._settings.work_dir)
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
        """Send one batch and record it; on a 400, find and quarantine the rejected ids."""
        try:
            await self._send(target, action, batch)
        except WalkMeRejected as exc:
            if not batch:
                raise
            if action in ("create", "override"):
                # Establish (or empty) the segment first, then add the batch piecewise.
                await self._send(target, action, [])
                await self._record(target, action, [])
                action = "add"
            await self._isolate(target, "remove" if action == "remove" else "add", batch, exc)
            return
        await self._record(target, action, batch)

    async def _send(self, target: _Target, action: Action, batch: list[str]) -> None:
        mapping = target.mapping
        if action == "create":
            try:
                target.guid = await self._client.create_segment(
                    target.system, mapping.name, mapping.external_id, batch
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
        # the next run sends this batch again before it diffs.
        await self._store.begin_batch(mapping.name, action, batch)
        try:
            await self._client.update_segment(target.system, target.guid, action, batch)
        except (WalkMeRejected, WalkMeNotFound, WalkMeAuthError):
            await self._store.clear_pending(mapping.name)  # refused: certainly not applied
            raise

    async def _record(self, target: _Target, action: Action, batch: list[str]) -> None:
        outcome = target.outcome
        await self._store.record_batch(
            target.mapping.name, outcome.run_id, action, batch, target.guid
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

    async def report_orphans(self) -> list[SegmentState]:
        """One ``segment.orphaned`` line per segment syncd wrote to but no longer maps."""
        # A segment that cannot be mapped is still wanted: never an orphan to prune.
        orphans = await self._store.mark_orphans((await self.mapping_set()).names)
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
        """Delete the WalkMe segment and forget it; False when WalkMe had it gone already."""
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
        # A process frozen past its lease (GC, VM pause) must not send on waking.
        stale = time.monotonic() - outcome.lease_renewed_at > self._ttl * 0.8
        if outcome.lease_lost or (outcome.lease_renewed_at and stale):
            raise Interrupted("lost this segment's lease; another replica carries on")

    async def _finish(self, outcome: Outcome) -> None:
        result: RunResult = outcome.result if outcome.result in ("synced", "held") else "failed"
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
            )
            state = await self._store.get(outcome.segment)
        except StateError as exc:
            outcome.result = "failed"
            outcome.error = outcome.error or str(exc)
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
