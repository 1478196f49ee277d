"""Which segments syncd keeps: the configured mappings plus the Heap segments the
webhook stored (``SYNCD_HEAP_AUTO_MAP``), and those of them that cannot be mapped."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from syncd.settings import HeapWebhookSourceConfig, SegmentMapping, Settings, printable
from syncd.state import StateStore
from syncd.state.base import HeapSegment

log = structlog.get_logger("syncd.engine")


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

    def for_heap_segment(self, heap_segment_id: int) -> SegmentMapping | BrokenMapping | None:
        """The mapping (usable or broken) whose source is this Heap segment, if any."""
        for mapping in self.usable.values():
            source = mapping.source
            if (
                isinstance(source, HeapWebhookSourceConfig)
                and source.heap_segment_id == heap_segment_id
            ):
                return mapping
        return next((b for b in self.broken.values() if b.heap_segment_id == heap_segment_id), None)


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
