"""Run history: one record per segment run, kept for ``syncd history``."""

from __future__ import annotations

import json
from datetime import datetime

from syncd.ids import SkippedIds
from syncd.state.base import LeaseLost, RunRecord, RunResult, SegmentState
from syncd.state.schema import RUN_COLUMNS, SEGMENT_COLUMNS, run_record, segment_state
from syncd.state.sql import Query, Script, SqlStore


class RunLog(SqlStore):
    async def begin_run(
        self, name: str, run_id: str, system_guid: str, external_id: str | None
    ) -> SegmentState:
        """Create the segment's row if new and open a run record; returns the state
        as it was (the stored source fingerprint is cleared until the run succeeds)."""
        dialect = self.dialect

        def script() -> Script[SegmentState]:
            yield Query(
                "INSERT INTO segments (name, system_guid, external_id) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET external_id = excluded.external_id",
                (name, system_guid, external_id),
            )
            yield Query(
                "INSERT INTO runs (run_id, segment, started_at, result)"
                f" VALUES (?, ?, {dialect.now}, 'running')",
                (run_id, name),
            )
            row = (
                yield Query(f"SELECT {SEGMENT_COLUMNS} FROM segments WHERE name = ?", (name,))
            ).rows[0]
            # A run that dies from here on leaves WalkMe changed: until one
            # succeeds again, no fingerprint may vouch for the snapshot.
            yield Query(
                "UPDATE segments SET source_fingerprint = NULL, source_digest = NULL"
                " WHERE name = ?",
                (name,),
            )
            return segment_state(row, dialect)

        return await self._write(script())

    async def finish_run(
        self,
        name: str,
        run_id: str,
        result: RunResult,
        error: str | None,
        skipped: SkippedIds,
        requests: int,
        quarantined: int,
        source_fingerprint: str | None = None,
        holder: str | None = None,
        *,
        collapsed: int = 0,
        id_transform: str | None = None,
        source_digest: str | None = None,
    ) -> None:
        """Close the run; a synced run keeps the source's fingerprint and digest,
        others clear them,
        and only a synced run records its ``id_transform`` (the steps the snapshot now
        follows). With ``holder``, the segment's own row changes only under that
        unexpired lease (a run that lost it closes its run record and leaves the
        segment alone)."""
        now = self.dialect.now

        def script() -> Script[None]:
            yield Query(
                f"UPDATE runs SET ended_at = {now}, result = ?, error = ?, skipped = ?,"
                " requests = ?, quarantined = ? WHERE run_id = ?",
                (result, error, skipped.count, requests, quarantined, run_id),
            )
            try:
                yield from self._fence(name, holder)
            except LeaseLost:
                return  # the run's own record is closed; the segment is the new holder's
            yield Query(
                f"UPDATE segments SET last_run_at = {now}, last_result = ?, last_error = ?,"
                " skipped = ?, skipped_examples = ?, source_fingerprint = ?, source_digest = ?,"
                " collapsed = ?,"
                f" last_success_at = CASE WHEN ? = 'synced' THEN {now} ELSE last_success_at END,"
                " id_transform = CASE WHEN ? = 'synced' THEN ? ELSE id_transform END"
                " WHERE name = ?",
                (
                    result,
                    error,
                    skipped.count,
                    json.dumps(skipped.examples),
                    source_fingerprint if result == "synced" else None,
                    source_digest if result == "synced" else None,
                    collapsed,
                    result,
                    result,
                    id_transform,
                    name,
                ),
            )

        await self._write(script())

    async def history(self, name: str, limit: int) -> list[RunRecord]:
        """The segment's runs, newest first; of runs started in the same instant,
        the one begun last first."""

        def script() -> Script[list[RunRecord]]:
            rows = (
                yield Query(
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE segment = ?"
                    f" ORDER BY started_at DESC, {self.dialect.run_order} DESC LIMIT ?",
                    (name, limit),
                )
            ).rows
            return [run_record(row, self.dialect) for row in rows]

        return await self._read(script())

    async def prune_history(self, before: datetime) -> int:
        """Forget runs (and Heap page receipts) older than this; returns runs forgotten."""
        cutoff = self.dialect.time_arg(before)

        def script() -> Script[int]:
            # Heap retries a page within hours; older page receipts only take room.
            yield Query("DELETE FROM heap_pages WHERE received_at < ?", (cutoff,))
            return (
                yield Query(
                    "DELETE FROM runs WHERE started_at < ? AND result != 'running'", (cutoff,)
                )
            ).count

        return await self._write(script())
