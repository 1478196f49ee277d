"""Heap Segments Sync: the membership Heap pushed to the webhook receiver.

The receiver (``syncd.webhook``) stores each page's adds and removes in the
state store; this source reads the resulting membership back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from syncd.sources.base import Chunk, NoFingerprint, SourceError
from syncd.state import StateStore

PAGE_IDS = 50_000  # ids read from the store a page at a time


class HeapWebhookSource(NoFingerprint):
    def __init__(self, store: StateStore, heap_segment_id: int) -> None:
        self._store = store
        self.heap_segment_id = heap_segment_id

    def describe(self) -> str:
        return f"Heap webhook segment {self.heap_segment_id}"

    async def chunks(self) -> AsyncIterator[Chunk]:
        segments = {s.heap_segment_id: s for s in await self._store.heap_segments()}
        known = segments.get(self.heap_segment_id)
        if known is None or known.complete_tasks == 0:
            # Until one whole sync has arrived, an empty set means "not yet", not "nobody".
            raise SourceError(
                f"no complete sync from Heap yet for segment {self.heap_segment_id};"
                " check that it is toggled to sync in Heap and that Heap reaches the webhook"
            )
        async for chunk in self._store.heap_members(self.heap_segment_id, PAGE_IDS):
            yield chunk
