"""Which WalkMe segment a mapping writes to, and how its first batch goes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from typing import Literal

import structlog

from syncd.settings import SegmentMapping
from syncd.state import SegmentState, StateStore
from syncd.walkme import WalkMeClient, normalize_guid

log = structlog.get_logger("syncd.engine")

Mode = Literal["create", "override", "update"]


def first_batch_mode(state: SegmentState | None, mapping: SegmentMapping) -> Mode:
    """How this run's first batch goes: create, override (rebuild), or plain update."""
    if state is None or state.segment_guid is None:
        return "create"
    wanted = normalize_guid(mapping.segment_guid) if mapping.segment_guid else None
    if state.needs_override or (wanted is not None and wanted != state.segment_guid):
        return "override"
    return "update"


class SegmentResolver:
    """Finds (or adopts) the WalkMe segment of a mapping, and notices renames."""

    def __init__(
        self, store: StateStore, client: WalkMeClient, configured: Collection[str]
    ) -> None:
        self._store = store
        self._client = client
        self._configured = configured  # names of the configured mappings

    async def resolve(
        self, mapping: SegmentMapping, system: str, tally: Counter[str]
    ) -> tuple[str | None, Mode]:
        """The segment's GUID (None: to be created) and how its first batch goes."""
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
        found = await self._client.find_segment(
            system, mapping.name, mapping.external_id, tally=tally
        )
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
