"""The Heap page inbox: the desired membership Heap's Segments Sync pushed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from syncd.ids import IdText
from syncd.state.base import HeapPage, HeapSegment, PageReceipt
from syncd.state.sql import Query, Script, SqlStore


class HeapInbox(SqlStore):
    async def store_heap_page(self, page: HeapPage) -> PageReceipt:
        """Apply a page to the Heap segment's desired membership, once, durably."""
        dialect = self.dialect
        segment = page.heap_segment_id

        def script() -> Script[PageReceipt]:
            # The upsert locks the segment's row: pages of one segment arriving at
            # several replicas apply one after another, and exactly one of them
            # sees its task complete.
            mapping_name: str = (
                yield Query(
                    "INSERT INTO heap_segments (heap_segment_id, name, mapping_name, updated_at)"
                    f" VALUES (?, ?, ?, {dialect.now}) ON CONFLICT (heap_segment_id) DO UPDATE"
                    " SET name = excluded.name, updated_at = excluded.updated_at"
                    " RETURNING mapping_name",
                    (segment, page.segment_name, page.segment_name),
                )
            ).value()
            inserted = (
                yield Query(
                    "INSERT INTO heap_pages (sync_task_id, page_number, heap_segment_id,"
                    f" total_pages, received_at) VALUES (?, ?, ?, ?, {dialect.now})"
                    " ON CONFLICT DO NOTHING",
                    (page.sync_task_id, page.page_number, segment, page.total_pages),
                )
            ).count
            if not inserted:
                return PageReceipt(True, False, mapping_name)
            removed = (
                yield Query(
                    "DELETE FROM heap_members"
                    f" WHERE heap_segment_id = ? AND {dialect.ids_in('id')}",
                    (segment, dialect.encode_ids(page.remove)),
                )
            ).count
            added = (
                yield Query(
                    f"INSERT INTO heap_members (heap_segment_id, id) SELECT ?, {dialect.each_id}"
                    " ON CONFLICT DO NOTHING",
                    (segment, dialect.encode_ids(page.add)),
                )
            ).count
            received = (
                yield Query(
                    "SELECT count(*) FROM heap_pages"
                    " WHERE heap_segment_id = ? AND sync_task_id = ?",
                    (segment, page.sync_task_id),
                )
            ).value()
            complete = received >= page.total_pages
            yield Query(
                "UPDATE heap_segments SET members = members + ? - ?,"
                " complete_tasks = complete_tasks + ? WHERE heap_segment_id = ?",
                (added, removed, int(complete), segment),
            )
            return PageReceipt(False, complete, mapping_name)

        return await self._write(script())

    async def heap_segments(self) -> list[HeapSegment]:
        def script() -> Script[list[HeapSegment]]:
            rows = (
                yield Query(
                    "SELECT heap_segment_id, name, mapping_name, members, complete_tasks"
                    " FROM heap_segments ORDER BY heap_segment_id"
                )
            ).rows
            return [
                HeapSegment(
                    row["heap_segment_id"],
                    row["name"],
                    row["mapping_name"],
                    row["members"],
                    row["complete_tasks"],
                )
                for row in rows
            ]

        return await self._read(script())

    def heap_members(self, heap_segment_id: int, size: int) -> AsyncIterator[IdText]:
        """The desired membership Heap pushed, ``size`` at a time."""
        return self._id_pages("heap_members", "heap_segment_id", heap_segment_id, size)
