"""One segment run, in the README's five steps:

1. read the source's ids, apply the mapping's id transform and the id rules
   (skipped when its fingerprint shows it is what the last successful run
   delivered);
2. diff them against the snapshot of what WalkMe acknowledged (``syncd.diff``,
   streamed, in bounded memory);
3. send ``remove`` batches, then ``add`` batches (a new segment is created with
   its first batch; an adopted or reset one is rebuilt with ``override``);
4. record each acknowledged batch in the snapshot before sending the next, so a
   crash re-sends at most the one batch that was in flight (remembered as the
   pending batch, and sent again first by the next run);
5. close the run: its result, counts and the source's fingerprint.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from syncd.diff import Diff, Quarantined, compute_diff
from syncd.engine.control import Interrupted, RunControl
from syncd.engine.delivery import EXAMPLES_SHOWN, BatchDelivery
from syncd.engine.guard import Hold, hold_for
from syncd.engine.notices import RunNotices
from syncd.engine.outcome import Outcome, Plan
from syncd.engine.report import report
from syncd.engine.resolve import Mode, SegmentResolver, first_batch_mode
from syncd.ids import IdText, NotAnId, SkippedIds, clean_ids, clean_text, source_texts
from syncd.logs import scrub
from syncd.settings import SegmentMapping, Settings
from syncd.sources import Source, SourceError, build_source
from syncd.sources.base import bounded, bounded_chunks
from syncd.state import SegmentState, StateError, StateStore
from syncd.state.base import LeaseLost, RunResult
from syncd.transforms import stored_steps
from syncd.walkme import WalkMeClient, WalkMeError, WalkMeNotFound, WalkMeStopped

log = structlog.get_logger("syncd.engine")

SNAPSHOT_CHUNK = 50_000  # larger chunks measured no faster, and cost peak memory
TRANSFORM_EXAMPLES = 3  # source ids shown before and after the transform (dry run)


class SegmentRun:
    """One run of one mapping; its result is ``outcome``, its controls ``control``."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        client: WalkMeClient,
        resolver: SegmentResolver,
        mapping: SegmentMapping,
        outcome: Outcome,
        control: RunControl,
        notices: RunNotices | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._client = client
        self._resolver = resolver
        self._mapping = mapping
        self._system = settings.system_for(mapping)
        self.outcome = outcome
        self.control = control
        self._notices = notices

    async def plan(self) -> None:
        """A dry run: what a run would send, with nothing sent or stored."""
        await self._guarded(self._plan)

    async def run(self, *, force: bool) -> None:
        """Sync the segment, then close the run in the store, log and count it;
        ``force`` applies a plan the removal guard would hold."""
        started = time.monotonic()
        try:
            await self._guarded(lambda: self._sync(force))
        finally:
            self.outcome.duration_s = round(time.monotonic() - started, 3)
            self.outcome.requests = sum(self.control.tally.values())
            closed = await self._close()
            if self._notices is not None:
                # Before the run's last line: whatever it logs belongs to the run.
                await self._notices.after_run(self.outcome, closed, self.control.holder)
            report(self.outcome, closed)

    async def _guarded(self, steps: Callable[[], Awaitable[None]]) -> None:
        """Whatever goes wrong fails this run (its error in the outcome), nothing more."""
        outcome = self.outcome
        try:
            await steps()
        except (Interrupted, WalkMeStopped, LeaseLost) as exc:
            outcome.error, outcome.interrupted = str(exc), True
        except (SourceError, WalkMeError, StateError) as exc:
            outcome.error = str(exc) or type(exc).__name__
        except Exception as exc:
            # A bug must fail this segment's run, not the daemon.
            log.exception("segment.internal_error")
            outcome.error = f"internal error: {type(exc).__name__}: {exc}"

    def _source(self) -> Source:
        """The mapping's source, built afresh for each run (``explain`` watches it)."""
        return build_source(self._mapping.source, self._settings, self._store)

    async def _plan(self) -> None:
        source = self._source()
        state = await self._store.get(self._mapping.name)
        self._transform_changed(state)
        mode = first_batch_mode(state, self._mapping)
        diff = await self._diff(source, state, mode)
        try:
            self.outcome.plan = Plan(
                mode=mode,
                staged=diff.distinct,
                adds=diff.adds,
                removes=diff.removes,
                add_examples=diff.examples("add", EXAMPLES_SHOWN),
                remove_examples=diff.examples("remove", EXAMPLES_SHOWN),
                held=self._hold(diff, state, mode),
            )
            self.outcome.result = "planned"
        finally:
            diff.close()

    async def _sync(self, force: bool) -> None:
        mapping, outcome, store = self._mapping, self.outcome, self._store
        source = self._source()
        begun = await store.begin_run(
            mapping.name, outcome.run_id, self._system, mapping.external_id
        )
        # What was asked for after this instant is not in what this run reads.
        self.control.read_started = await store.clock()
        if self._transform_changed(begun):
            log.info(
                "segment.transform_changed",
                old_transform=outcome.previous_transform,
                transform=list(mapping.transform.steps),
                hint="a membership change like any other: this run sends the difference,"
                " within the removal guard",
            )
        replayed = await self._replay_pending(begun)
        # The shortcuts only when nothing was pending (a replay changed the snapshot)
        # and this run updates (a reset or adoption rebuilds). Only a synced run
        # leaves a fingerprint or digest to compare with (``finish_run``).
        up_to_date = replayed is None and first_batch_mode(begun, mapping) == "update"
        if up_to_date and await self._unchanged(source, begun):
            return
        state: SegmentState | None = replayed or begun
        # The same ids as the last successful run read need no comparing either.
        unchanged_since = begun.source_digest if up_to_date else None
        for attempt in (1, 2):
            mode = first_batch_mode(state, mapping)
            diff = await self._diff(source, state, mode, unchanged_since)
            try:
                outcome.source_digest = diff.digest
                if diff.unchanged:
                    outcome.collapsed, outcome.unchanged = begun.collapsed, True
                    break
                # Resolved first: a first sync may find the segment in WalkMe and
                # rebuild it, which the guard must see.
                guid, mode = await self._resolver.resolve(
                    mapping, self._system, self.control.tally
                )
                outcome.hold = None if force else self._hold(diff, state, mode)
                if outcome.hold is not None:
                    outcome.result, outcome.error = "held", outcome.hold.reason
                    return
                await store.release_quarantine(mapping.name, diff.released)
                await self._delivery(guid).send_diff(diff, mode, self._settings.batch_size)
                break
            except WalkMeNotFound:
                if attempt == 2:
                    raise
                # Deleted in WalkMe behind our back: start over with a new segment.
                log.warning("segment.recreating", reason="WalkMe answered 404 on update")
                await store.forget_guid(mapping.name)
                state = await store.get(mapping.name)
                unchanged_since = None
            finally:
                diff.close()
        outcome.result = "synced"

    def _transform_changed(self, state: SegmentState | None) -> bool:
        """Whether the mapping's transform differs from the one the last successful run
        used (noted in the outcome); a segment never synced has nothing to differ from."""
        stored = self._mapping.transform.stored
        if state is None or state.last_success_at is None or state.id_transform == stored:
            return False
        self.outcome.previous_transform = stored_steps(state.id_transform)
        return True

    async def _unchanged(self, source: Source, state: SegmentState) -> bool:
        """Whether the source is byte-for-byte what the last successful run delivered,
        so the diff would be empty: then the run is done without reading it. Asked
        only of a snapshot that run left up to date (``_sync``).

        The invariant that makes this exact: a stored fingerprint is the digest of
        exactly the bytes (with the column and the id rules) whose ids the last run
        diffed and delivered in full (``Source.read_fingerprint``, never the earlier
        cheap check); ``begin_run`` clears it, so a run that crashed, failed or was
        held leaves none; and only a plain update keeps the snapshot (a reset or an
        adoption rebuilds). An equal fingerprint then means the same ids against the
        same snapshot, and the same (empty) diff.
        """
        limit_s = self._settings.source_timeout
        fingerprint = self._mapping.transform.fingerprint(
            await bounded(source.fingerprint(), limit_s, source, self.control.check)
        )
        if fingerprint is None or state.source_fingerprint != fingerprint:
            return False
        outcome = self.outcome
        outcome.source_fingerprint = fingerprint
        outcome.source_digest = state.source_digest  # the same bytes: the same ids
        outcome.skipped = SkippedIds(state.skipped, state.skipped_examples)
        outcome.collapsed = state.collapsed
        outcome.unchanged = True
        outcome.result = "synced"
        return True

    async def _replay_pending(self, state: SegmentState) -> SegmentState | None:
        """A batch whose answer was lost may or may not be in WalkMe; sending it again
        (add, remove and override are idempotent) makes the snapshot exact again, so
        the diff that follows is right even for ids that changed since. Returns the
        state after the replay, or None when nothing was pending."""
        name = self._mapping.name
        pending = await self._store.pending_batch(name)
        if pending is None:
            return None
        if first_batch_mode(state, self._mapping) != "update":
            # The run rebuilds the segment anyway.
            await self._store.clear_pending(name, self.control.holder)
            return state
        log.info("segment.replaying", action=pending.action, ids=len(pending.ids))
        delivery = self._delivery(state.segment_guid)
        await delivery.replay(pending, self._settings.batch_size)
        refreshed = await self._store.get(name)
        assert refreshed is not None
        return refreshed

    async def _diff(
        self,
        source: Source,
        state: SegmentState | None,
        mode: Mode,
        unchanged_since: str | None = None,
    ) -> Diff:
        """Source ids (after the id rules) against the snapshot; a new or rebuilt
        segment is diffed against nothing, as everything must be sent. A source whose
        digest is ``unchanged_since`` is not compared (``Diff.unchanged``)."""
        log.debug("segment.reading", source=source.describe())
        outcome = self.outcome
        outcome.skipped = SkippedIds()
        sent_ids = 0  # ids handed to the diff, repeats included

        async def cleaned() -> AsyncIterator[IdText]:
            nonlocal sent_ids
            limit_s = self._settings.source_timeout
            async for chunk in bounded_chunks(source, limit_s, self.control.check):
                if isinstance(chunk, str):
                    if not self._mapping.transform:
                        text = clean_text(chunk, outcome.skipped)
                        sent_ids += text.count("\n") + 1 if text else 0
                        yield text
                        continue
                    chunk = list(chunk.split("\n"))  # a transform takes the ids one by one
                try:
                    ids = self._ids(chunk)
                except NotAnId as exc:
                    raise SourceError(f"{source.describe()}: {exc}") from None
                sent_ids += len(ids)
                yield IdText.of(ids)

        if mode == "update" and state is not None:
            snapshot = self._store.snapshot(self._mapping.name, SNAPSHOT_CHUNK)
            snapshot_size = state.members
            quarantined = await self._store.quarantined(self._mapping.name)
        else:
            snapshot, snapshot_size, quarantined = _nothing(), 0, Quarantined()
        diff = await compute_diff(
            cleaned(),
            snapshot,
            quarantined,
            self._settings.work_dir,
            stored_digest=unchanged_since,
        )
        # What a successful run records: the digest of exactly the ids just diffed.
        outcome.source_fingerprint = self._mapping.transform.fingerprint(source.read_fingerprint())
        if diff.unchanged:
            return diff
        outcome.collapsed = sent_ids - diff.distinct
        if diff.distinct == 0 and snapshot_size > 0:
            # An empty or half-loaded table looks exactly like this.
            log.warning(
                "segment.source_empty",
                source=source.describe(),
                source_ids=0,
                snapshot_members=snapshot_size,
            )
        return diff

    def _ids(self, chunk: list[object]) -> list[str]:
        """A chunk of source values through the mapping's transform, then the id rules."""
        transform, outcome = self._mapping.transform, self.outcome
        if not transform:
            return clean_ids(chunk, outcome.skipped)
        texts = source_texts(chunk)
        shown = outcome.transform_examples
        shown += map(transform.example, texts[: TRANSFORM_EXAMPLES - len(shown)])
        return clean_ids(transform.apply(texts, outcome.skipped.add), outcome.skipped)

    def _hold(self, diff: Diff, state: SegmentState | None, mode: Mode) -> Hold | None:
        """The removal guard's verdict on an update or a rebuild; a create removes nothing."""
        if mode == "create":
            return None
        fraction = self._mapping.max_remove_fraction
        return hold_for(
            removes=diff.removes,
            snapshot_members=state.members if state is not None else 0,
            source_ids=diff.distinct,
            max_remove_fraction=(
                fraction if fraction is not None else self._settings.max_remove_fraction
            ),
            guard_min_members=self._settings.guard_min_members,
            rebuild=mode == "override",
        )

    def _delivery(self, guid: str | None) -> BatchDelivery:
        return BatchDelivery(
            self._store,
            self._client,
            self.control,
            self.outcome,
            self._mapping,
            self._system,
            guid,
        )

    async def _close(self) -> SegmentState | None:
        """Store the run's result; the segment as it is now (None: the store failed)."""
        outcome = self.outcome
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
                holder=self.control.holder,
                collapsed=outcome.collapsed,
                id_transform=self._mapping.transform.stored,
                source_digest=outcome.source_digest,
            )
            return await self._store.get(outcome.segment)
        except StateError as exc:
            outcome.result = "failed"
            outcome.error = outcome.error or scrub(str(exc))
            return None


async def _nothing() -> AsyncIterator[IdText]:
    return
    yield  # an empty async generator
