"""The sync engine: source -> diff against the snapshot -> batches -> WalkMe -> snapshot.

One segment run:
1. stage the source's ids (after the id rules) in the state store;
2. diff them against the snapshot of what WalkMe acknowledged, inside the store;
3. send ``remove`` batches, then ``add`` batches (a new segment is created with
   its first batch; an adopted or reset one is rebuilt with ``override``);
4. record each acknowledged batch in the snapshot before sending the next, so a
   crash re-sends at most the one batch that was in flight.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from syncd.ids import SkippedIds, clean_ids
from syncd.settings import HeapWebhookSourceConfig, SegmentMapping, Settings
from syncd.sources import SourceError, build_source
from syncd.state import SegmentState, Stage, StateError, StateStore
from syncd.state.base import RunResult
from syncd.walkme import WalkMeClient, WalkMeError, WalkMeNotFound, normalize_guid, request_tally

log = structlog.get_logger("syncd.engine")

EXAMPLES_SHOWN = 5
Mode = Literal["create", "override", "update"]


class Interrupted(Exception):
    """Shutdown was requested; the batch in flight finished and was recorded."""


@dataclass(frozen=True)
class Plan:
    """What a run will send: the dry-run output, and the guard's input later."""

    mode: Mode
    staged: int
    adds: int
    removes: int
    add_examples: list[str]
    remove_examples: list[str]


@dataclass
class Outcome:
    segment: str
    result: Literal["synced", "failed", "planned"]
    run_id: str
    added: int = 0
    removed: int = 0
    skipped: SkippedIds = field(default_factory=SkippedIds)
    requests: int = 0
    duration_s: float = 0.0
    error: str | None = None
    plan: Plan | None = None


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

    def stop(self) -> None:
        """Finish the batches in flight, then end every run."""
        self._stopping = True

    async def mappings(self) -> dict[str, SegmentMapping]:
        """The configured mappings, plus Heap segments auto-mapped by the webhook."""
        return await current_mappings(self._settings, self._configured.values(), self._store)

    async def mapping_for_heap_segment(self, heap_segment_id: int) -> SegmentMapping | None:
        for mapping in (await self.mappings()).values():
            source = mapping.source
            if (
                isinstance(source, HeapWebhookSourceConfig)
                and source.heap_segment_id == heap_segment_id
            ):
                return mapping
        return None

    async def sync_all(
        self, names: Sequence[str] | None = None, *, dry_run: bool = False
    ) -> list[Outcome]:
        known = await self.mappings()
        chosen = [known[name] for name in names] if names else list(known.values())
        return list(await asyncio.gather(*(self.sync_segment(m, dry_run=dry_run) for m in chosen)))

    async def sync_segment(self, mapping: SegmentMapping, *, dry_run: bool = False) -> Outcome:
        lock = self._locks.setdefault(mapping.name, asyncio.Lock())
        async with self._slots, lock:
            # Each run counts its own requests (the tally is task-local).
            tally: Counter[str] = Counter()
            request_tally.set(tally)
            outcome = Outcome(mapping.name, "failed", uuid.uuid4().hex[:12])
            with structlog.contextvars.bound_contextvars(
                segment=mapping.name, run_id=outcome.run_id
            ):
                started = time.monotonic()
                await self._run(mapping, outcome, dry_run)
                outcome.duration_s = round(time.monotonic() - started, 3)
                outcome.requests = sum(tally.values())
                if not dry_run:
                    self._log_outcome(outcome)
            return outcome

    async def _run(self, mapping: SegmentMapping, outcome: Outcome, dry_run: bool) -> None:
        system = self._settings.system_for(mapping)
        source = build_source(mapping.source, self._settings, self._store)
        try:
            if dry_run:
                state = await self._store.get(mapping.name)
            else:
                state = await self._store.begin_run(
                    mapping.name, outcome.run_id, system, mapping.external_id
                )
            async with self._store.stage(mapping.name) as stage:
                log.debug("segment.reading", source=source.describe())
                source_ids = 0
                async for chunk in source.chunks():
                    ids = clean_ids(chunk, outcome.skipped)
                    source_ids += len(ids)
                    await stage.add(ids)
                if source_ids == 0 and state is not None and state.members > 0:
                    # An empty or half-loaded table looks exactly like this.
                    log.warning(
                        "segment.source_empty",
                        source=source.describe(),
                        source_ids=0,
                        snapshot_members=state.members,
                    )
                if state is None or state.segment_guid is None:
                    mode: Mode = "create"
                else:
                    mode = "override" if state.needs_override else "update"
                if dry_run:
                    outcome.plan = await self._plan(stage, mode)
                    outcome.result = "planned"
                    return
                await self._push(mapping, system, stage, outcome)
            outcome.result = "synced"
        except (SourceError, WalkMeError, StateError, Interrupted) as exc:
            outcome.error = str(exc) or type(exc).__name__
        except Exception as exc:
            # A bug must fail this segment's run, not the daemon.
            log.exception("segment.internal_error")
            outcome.error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if not dry_run:
                await self._finish(outcome)

    async def _plan(self, stage: Stage, mode: Mode) -> Plan:
        return Plan(
            mode=mode,
            staged=await stage.size(),
            adds=await stage.pending("add"),
            removes=await stage.pending("remove"),
            add_examples=await stage.examples("add", EXAMPLES_SHOWN),
            remove_examples=await stage.examples("remove", EXAMPLES_SHOWN),
        )

    async def _push(
        self, mapping: SegmentMapping, system: str, stage: Stage, outcome: Outcome
    ) -> None:
        try:
            await self._push_once(mapping, system, stage, outcome)
        except WalkMeNotFound:
            # Deleted in WalkMe behind our back: start over with a new segment.
            log.warning("segment.recreating", reason="WalkMe answered 404 on update")
            await self._store.forget_guid(mapping.name)
            await self._push_once(mapping, system, stage, outcome)

    async def _push_once(
        self, mapping: SegmentMapping, system: str, stage: Stage, outcome: Outcome
    ) -> None:
        name, size, run_id = mapping.name, self._settings.batch_size, outcome.run_id
        guid, mode = await self._resolve(mapping, system)
        if mode == "update":
            assert guid is not None
            async for batch in stage.batches("remove", size):
                self._check_stopping()
                await self._client.update_segment(system, guid, "remove", batch)
                await self._store.record_batch(name, run_id, "remove", batch)
                outcome.removed += len(batch)
        first = mode != "update"
        async for batch in stage.batches("add", size):
            self._check_stopping()
            guid = await self._send_add(mapping, system, guid, mode if first else "update", batch)
            await self._store.record_batch(
                name, run_id, _action(mode if first else "update"), batch, guid
            )
            outcome.added += len(batch)
            first = False
        if first:
            # Nothing to add, yet the segment must exist (create) or be emptied
            # of unknown members (override).
            guid = await self._send_add(mapping, system, guid, mode, [])
            await self._store.record_batch(name, run_id, _action(mode), [], guid)

    async def _send_add(
        self, mapping: SegmentMapping, system: str, guid: str | None, mode: Mode, batch: list[str]
    ) -> str:
        if mode == "create":
            guid = await self._client.create_segment(
                system, mapping.name, mapping.external_id, batch
            )
            log.info("segment.created", segment_guid=guid)
            return guid
        assert guid is not None
        await self._client.update_segment(
            system, guid, "override" if mode == "override" else "add", batch
        )
        return guid

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
        orphans = await self._store.mark_orphans(set(await self.mappings()))
        for orphan in orphans:
            log.warning(
                "segment.orphaned",
                segment=orphan.name,
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

    def _check_stopping(self) -> None:
        if self._stopping:
            raise Interrupted("stopped by shutdown; the next run carries on from the snapshot")

    async def _finish(self, outcome: Outcome) -> None:
        result: RunResult = "synced" if outcome.result == "synced" else "failed"
        try:
            await self._store.finish_run(
                outcome.segment, outcome.run_id, result, outcome.error, outcome.skipped
            )
        except StateError as exc:
            outcome.result = "failed"
            outcome.error = outcome.error or str(exc)

    def _log_outcome(self, outcome: Outcome) -> None:
        fields = {
            "added": outcome.added,
            "removed": outcome.removed,
            "skipped": outcome.skipped.count,
            "requests": outcome.requests,
            "duration_s": outcome.duration_s,
        }
        if outcome.skipped.count:
            log.warning(
                "segment.ids_skipped",
                skipped=outcome.skipped.count,
                examples=outcome.skipped.examples,
            )
        if outcome.result == "synced":
            log.info("segment.synced", **fields)
        else:
            log.error("segment.failed", error=outcome.error, **fields)


async def current_mappings(
    settings: Settings, configured: Iterable[SegmentMapping], store: StateStore
) -> dict[str, SegmentMapping]:
    """The configured mappings, plus Heap segments auto-mapped by the webhook."""
    mappings = {mapping.name: mapping for mapping in configured}
    if not settings.auto_map:
        return mappings
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
                name=heap.mapping_name,
                reason="a configured segment already has this name",
            )
            continue
        mappings[heap.mapping_name] = auto_mapping(heap.heap_segment_id, heap.mapping_name)
    return mappings


def auto_mapping(heap_segment_id: int, name: str) -> SegmentMapping:
    """The mapping a Heap segment gets when it arrives unconfigured (SYNCD_HEAP_AUTO_MAP)."""
    return SegmentMapping(
        name=name,
        external_id=str(heap_segment_id),
        source=HeapWebhookSourceConfig(type="heap_webhook", heap_segment_id=heap_segment_id),
    )


def _action(mode: Mode) -> Literal["create", "override", "add"]:
    return "add" if mode == "update" else mode
