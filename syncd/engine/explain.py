"""``syncd explain``: why one id is (or is not) in a segment.

The source is read as a dry run reads it (``SegmentRun.plan``: the same source, id
rules and diff, nothing sent or written), watched on the way for the id; the
snapshot, quarantine and pending batch are read from the state store. For a huge
source this is a full read, as a dry run is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Literal

from syncd.engine.control import RunControl
from syncd.engine.mappings import BrokenMapping
from syncd.engine.outcome import Outcome
from syncd.engine.resolve import Mode, SegmentResolver
from syncd.engine.run import SegmentRun
from syncd.ids import NotAnId, skip_reason, value_text
from syncd.settings import SegmentMapping, Settings
from syncd.sources import Source
from syncd.sources.base import Chunk
from syncd.state import StateStore
from syncd.state.base import Action, Delivered, PendingBatch, QuarantineEntry
from syncd.walkme import WalkMeClient

ORIGINALS_KEPT = 5  # source values that become the id, shown as examples

_DONE = {"add": "added", "remove": "removed"}
NextAction = Literal["add", "remove", "nothing", "held", "quarantined", "unknown"]


def transformed(raw: str, mapping: SegmentMapping) -> str | None:
    """The one place explain applies a mapping's transform, as a run does (trimmed
    first, then each step): the raw source value as the transform makes it (None:
    the transform drops it). The id rules apply to what it returns."""
    trimmed = raw.strip()
    if not mapping.transform or not trimmed:
        return trimmed or None
    after = mapping.transform.apply([trimmed], lambda _value, _reason: None)
    return after[0] if after else None


@dataclass
class _Watch:
    """Looks at each chunk a dry run reads for the values that become ``member``."""

    member: str
    mapping: SegmentMapping
    count: int = 0
    originals: list[str] = field(default_factory=list)

    def look(self, chunk: Chunk) -> None:
        values = chunk.split("\n") if isinstance(chunk, str) else chunk
        for value in values:
            if value is None:
                continue
            try:
                raw = value_text(value)
            except NotAnId:
                continue  # the dry run fails on it, and says so
            if isinstance(chunk, str) and raw.endswith("\r"):
                raw = raw[:-1]  # a CRLF line, as the id rules read it
            found = transformed(raw, self.mapping)
            if found is None or found.strip() != self.member:
                continue
            self.count += 1
            if len(self.originals) < ORIGINALS_KEPT:
                self.originals.append(raw)


class _Watched:
    """A source whose chunks pass the watch on their way to the dry run."""

    def __init__(self, source: Source, watch: _Watch) -> None:
        self._source = source
        self._watch = watch

    def describe(self) -> str:
        return self._source.describe()

    async def chunks(self) -> AsyncIterator[Chunk]:
        async for chunk in self._source.chunks():
            self._watch.look(chunk)
            yield chunk

    async def fingerprint(self) -> str | None:
        return await self._source.fingerprint()

    def read_fingerprint(self) -> str | None:
        return self._source.read_fingerprint()


class _ExplainRun(SegmentRun):
    """A dry run whose source is watched."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        client: WalkMeClient,
        mapping: SegmentMapping,
        watch: _Watch,
    ) -> None:
        super().__init__(
            settings,
            store,
            client,
            SegmentResolver(store, client, ()),  # a dry run resolves no WalkMe segment
            mapping,
            Outcome(mapping.name, "failed", "explain"),
            RunControl(lambda: False),
        )
        self._watch = watch
        self.described: str | None = None  # the source, once built

    def _source(self) -> Source:
        source = super()._source()
        self.described = source.describe()
        return _Watched(source, self._watch)


@dataclass(frozen=True)
class Explanation:
    """What syncd knows of one id in one segment, and what the next run would do."""

    segment: str
    id: str
    id_rules: str | None  # why the id rules skip this id anywhere; None: it may be sent
    source: str | None  # where the ids come from (None: the mapping is broken)
    error: str | None  # why the source could not be read (then no plan)
    in_source: bool  # in the source now, kept by the id rules
    found_in_source: int  # source values that become the id (skipped or not)
    originals: list[str]  # some of them, as the source holds them
    delivered: Delivered | None  # in the snapshot (None: not delivered)
    quarantine: list[QuarantineEntry]
    pending: Action | None  # the action of the pending batch holding the id
    mode: Mode | None  # the next run's first batch (None: no plan)
    held: str | None  # why the removal guard would hold the next plan
    last_result: str | None  # the segment's last run ("held": a held plan waits)
    next_run: NextAction
    why: str


async def explain(
    settings: Settings,
    store: StateStore,
    client: WalkMeClient,
    mappings: Collection[SegmentMapping | BrokenMapping],
    member: str,
) -> list[Explanation]:
    """Explain ``member`` (an id as the id rules leave it) in each segment; reads only."""
    return [await _explain_one(settings, store, client, m, member) for m in mappings]


async def _explain_one(
    settings: Settings,
    store: StateStore,
    client: WalkMeClient,
    mapping: SegmentMapping | BrokenMapping,
    member: str,
) -> Explanation:
    name = mapping.name
    state = await store.get(name)
    delivered = await store.delivered(name, member)
    quarantine = await store.quarantine_of(name, member)
    pending = await store.pending_batch(name)
    in_pending = pending if pending is not None and member in pending.ids else None
    watch: _Watch | None = None
    source: str | None = None
    mode: Mode | None = None
    held: str | None = None
    if isinstance(mapping, BrokenMapping):
        error: str | None = mapping.error
    else:
        watch = _Watch(member, mapping)
        run = _ExplainRun(settings, store, client, mapping, watch)
        await run.plan()
        plan, source = run.outcome.plan, run.described
        error = run.outcome.error if plan is None else None
        mode = plan.mode if plan is not None else None
        held = plan.held.reason if plan is not None and plan.held is not None else None
    in_source = watch is not None and watch.count > 0 and skip_reason(member) is None
    next_run, why = next_action(
        wanted=in_source,
        member=delivered is not None,
        mode=mode,
        pending=pending,
        in_pending=in_pending is not None,
        quarantine=quarantine,
        held=held,
        error=error,
    )
    return Explanation(
        segment=name,
        id=member,
        id_rules=skip_reason(member),
        source=source,
        error=error,
        in_source=in_source,
        found_in_source=watch.count if watch is not None else 0,
        originals=watch.originals if watch is not None else [],
        delivered=delivered,
        quarantine=quarantine,
        pending=in_pending.action if in_pending is not None else None,
        mode=mode,
        held=held,
        last_result=state.last_result if state is not None else None,
        next_run=next_run,
        why=why,
    )


def next_action(
    *,
    wanted: bool,
    member: bool,
    mode: Mode | None,
    pending: PendingBatch | None,
    in_pending: bool,
    quarantine: list[QuarantineEntry],
    held: str | None,
    error: str | None,
) -> tuple[NextAction, str]:
    """What the next run would do with the id, and why, in the run's own order:
    the pending batch is sent again first, then the diff, quarantine and guard."""
    if error is not None:
        return "unknown", f"no plan: {error}"
    if mode != "update":
        # A new or rebuilt segment gets the whole source, whatever the snapshot says.
        how = "creates the WalkMe segment" if mode == "create" else "rebuilds the segment"
        if wanted:
            batches = "" if mode == "create" else " (override, then add)"
            return "add", f"the next run {how}{batches} with it"
        if held is not None:  # a rebuild from a source with no ids
            return "held", f"the removal guard holds the plan that {how}: {held}"
        return "nothing", f"the next run {how} without it: it is not in the source"
    replay = ""
    if pending is not None and (in_pending or pending.action in ("create", "override")):
        # Sent again before the diff: an override's replay makes the snapshot that batch.
        member = in_pending and pending.action != "remove"
        held_or_not = "holding" if in_pending else "without"
        replay = f"the pending {pending.action} batch {held_or_not} it is sent again first; then "
    if wanted == member:
        where = "in the source and delivered" if wanted else "neither in the source nor delivered"
        return "nothing", replay + where
    action: Literal["add", "remove"] = "add" if wanted else "remove"
    rejected = [entry for entry in quarantine if entry.action == action]
    if rejected:
        return "quarantined", replay + (
            f"it would be {_DONE[action]}, but WalkMe rejected that ({rejected[0].reason});"
            " not sent again until its membership changes"
        )
    if held is not None:
        return "held", replay + (
            f"it would be {_DONE[action]}, but the removal guard holds the plan: {held}"
        )
    if action == "add":
        return "add", replay + "in the source, not delivered"
    return "remove", replay + "delivered, no longer in the source"
