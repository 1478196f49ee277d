"""The snapshot of what WalkMe acknowledged, per segment, with the batch in flight
and the ids WalkMe rejected (the quarantine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

from syncd.diff import Quarantined
from syncd.ids import IdText
from syncd.state.base import (
    Action,
    Delivered,
    Origin,
    PendingBatch,
    QuarantineEntry,
    SegmentState,
)
from syncd.state.schema import SEGMENT_COLUMNS, segment_state
from syncd.state.sql import Query, Script, SqlStore

# What syncd knows of a segment's members in WalkMe: the snapshot, the quarantine
# and the batch in flight.
_MEMBER_TABLES = ("members", "quarantine", "pending")
# All that is kept per segment name, besides its row.
_SEGMENT_TABLES = (*_MEMBER_TABLES, "runs", "leases", "due", "notices")


def _forget(tables: tuple[str, ...], name: str) -> Script[None]:
    for table in tables:
        yield Query(f"DELETE FROM {table} WHERE segment = ?", (name,))


class SnapshotStore(SqlStore):
    def _segments(self, where: str, args: tuple[object, ...] = ()) -> Script[list[SegmentState]]:
        rows = (
            yield Query(
                f"SELECT {SEGMENT_COLUMNS} FROM segments {where}"
                f" ORDER BY name{self.dialect.text_order}",
                args,
            )
        ).rows
        return [segment_state(row, self.dialect) for row in rows]

    async def get(self, name: str) -> SegmentState | None:
        found = await self._read(self._segments("WHERE name = ?", (name,)))
        return found[0] if found else None

    async def all(self) -> list[SegmentState]:
        return await self._read(self._segments(""))

    def snapshot(self, name: str, size: int) -> AsyncIterator[IdText]:
        """The ids WalkMe acknowledged for this segment, ``size`` at a time."""
        return self._id_pages("members", "segment", name, size)

    async def delivered(self, name: str, member: str) -> Delivered | None:
        """Whether ``member`` is in the segment's snapshot, and which run delivered it
        (None: not a member)."""

        def script() -> Script[Delivered | None]:
            rows = (
                yield Query(
                    "SELECT m.delivered_by, r.started_at FROM members m"
                    " LEFT JOIN runs r ON r.run_id = m.delivered_by"
                    " WHERE m.segment = ? AND m.id = ?",
                    (name, member),
                )
            ).rows
            if not rows:
                return None
            return Delivered(
                rows[0]["delivered_by"], self.dialect.time_value(rows[0]["started_at"])
            )

        return await self._read(script())

    async def adopt(self, name: str, segment_guid: str, origin: Origin) -> None:
        """Point at an existing WalkMe segment whose members are unknown: rebuild it."""

        def script() -> Script[None]:
            yield from _forget(_MEMBER_TABLES, name)
            yield Query(
                "UPDATE segments SET segment_guid = ?, origin = ?, needs_override = TRUE,"
                " members = 0 WHERE name = ?",
                (segment_guid, origin, name),
            )

        await self._write(script())

    async def record_batch(
        self,
        name: str,
        run_id: str,
        action: Action,
        ids: list[str],
        segment_guid: str | None = None,
        holder: str | None = None,
        *,
        still_pending: PendingBatch | None = None,
    ) -> None:
        """WalkMe acknowledged this batch: apply it to the snapshot and clear the
        pending batch (or make it ``still_pending``: the rest of a replay), atomically.
        With ``holder``, only while that holder's lease is unexpired (checked in the
        same transaction); otherwise LeaseLost, nothing written."""
        dialect = self.dialect
        encoded = dialect.encode_ids(ids)

        def script() -> Script[None]:
            yield from self._fence(name, holder)
            yield Query("DELETE FROM pending WHERE segment = ?", (name,))
            if still_pending is not None and still_pending.ids:
                yield Query(
                    "INSERT INTO pending (segment, action, ids) VALUES (?, ?, ?)",
                    (name, still_pending.action, dialect.encode_pending(still_pending.ids)),
                )
            if action == "remove":
                changed = -(
                    yield Query(
                        f"DELETE FROM members WHERE segment = ? AND {dialect.ids_in('id')}",
                        (name, encoded),
                    )
                ).count
            else:
                if action in ("create", "override"):
                    yield Query("DELETE FROM members WHERE segment = ?", (name,))
                    yield Query(
                        "UPDATE segments SET members = 0, needs_override = FALSE,"
                        " segment_guid = coalesce(?, segment_guid),"
                        " origin = coalesce(origin, 'created') WHERE name = ?",
                        (segment_guid, name),
                    )
                # An id already a member keeps the run that first delivered it.
                changed = (
                    yield Query(
                        "INSERT INTO members (segment, delivered_by, id)"
                        f" SELECT ?, ?, {dialect.each_id} ON CONFLICT DO NOTHING",
                        (name, run_id, encoded),
                    )
                ).count
            yield Query("UPDATE segments SET members = members + ? WHERE name = ?", (changed, name))
            column = "removed" if action == "remove" else "added"
            yield Query(
                f"UPDATE runs SET requests = requests + 1, {column} = {column} + ?"
                " WHERE run_id = ?",
                (len(ids), run_id),
            )

        await self._write(script())

    async def begin_batch(
        self, name: str, action: Action, ids: list[str], holder: str | None = None
    ) -> None:
        """About to send this batch: remembered until record_batch or clear_pending.
        Fenced by ``holder`` as record_batch is."""
        encoded = self.dialect.encode_pending(ids)

        def script() -> Script[None]:
            yield from self._fence(name, holder)
            yield Query(
                "INSERT INTO pending (segment, action, ids) VALUES (?, ?, ?)"
                " ON CONFLICT (segment) DO UPDATE SET action = excluded.action,"
                " ids = excluded.ids",
                (name, action, encoded),
            )

        await self._write(script())

    async def pending_batch(self, name: str) -> PendingBatch | None:
        def script() -> Script[PendingBatch | None]:
            rows = (yield Query("SELECT action, ids FROM pending WHERE segment = ?", (name,))).rows
            if not rows:
                return None
            return PendingBatch(rows[0]["action"], self.dialect.decode_pending(rows[0]["ids"]))

        return await self._read(script())

    async def clear_pending(self, name: str, holder: str | None = None) -> None:
        """WalkMe definitely did not apply the batch (it answered 4xx). Fenced by
        ``holder`` as record_batch is."""

        def script() -> Script[None]:
            yield from self._fence(name, holder)
            yield Query("DELETE FROM pending WHERE segment = ?", (name,))

        await self._write(script())

    async def forget_guid(self, name: str) -> None:
        """The WalkMe segment is gone: drop its GUID and snapshot."""

        def script() -> Script[None]:
            yield from _forget(_MEMBER_TABLES, name)
            yield Query(
                "UPDATE segments SET segment_guid = NULL, origin = NULL,"
                " needs_override = FALSE, members = 0 WHERE name = ?",
                (name,),
            )

        await self._write(script())

    async def mark_orphans(self, configured: set[str]) -> list[SegmentState]:
        """Segments with a WalkMe GUID but no mapping: record since when, return them."""
        dialect = self.dialect
        names = dialect.encode_ids(sorted(configured))
        mapped = dialect.ids_in("name")

        def script() -> Script[list[SegmentState]]:
            yield Query(
                f"UPDATE segments SET orphaned_at = {dialect.now} WHERE orphaned_at IS NULL"
                f" AND segment_guid IS NOT NULL AND NOT ({mapped})",
                (names,),
            )
            yield Query(
                "UPDATE segments SET orphaned_at = NULL WHERE orphaned_at IS NOT NULL"
                f" AND (segment_guid IS NULL OR {mapped})",
                (names,),
            )
            return (yield from self._segments("WHERE orphaned_at IS NOT NULL"))

        return await self._write(script())

    async def forget(self, name: str) -> bool:
        """Drop everything known about a segment (after it was deleted in WalkMe)."""

        def script() -> Script[bool]:
            yield from _forget(_SEGMENT_TABLES, name)
            return (yield Query("DELETE FROM segments WHERE name = ?", (name,))).count > 0

        return await self._write(script())

    async def reset(self, name: str) -> bool:
        """Forget the snapshot so the next run rebuilds with ``override``."""

        def script() -> Script[bool]:
            yield from _forget(_MEMBER_TABLES, name)
            return (
                yield Query(
                    "UPDATE segments SET members = 0,"
                    " needs_override = (segment_guid IS NOT NULL) WHERE name = ?",
                    (name,),
                )
            ).count > 0

        return await self._write(script())


class Quarantine(SqlStore):
    """Ids WalkMe rejected, with its answer: not sent again until they change."""

    async def quarantine(
        self, name: str, action: Literal["add", "remove"], rejected: list[tuple[str, str]]
    ) -> None:
        def script() -> Script[None]:
            # Precise time: "newest first" must hold between two calls.
            yield Query(
                "INSERT INTO quarantine (segment, action, id, reason, since)"
                f" VALUES (?, ?, ?, ?, {self.dialect.now_precise})"
                " ON CONFLICT (segment, action, id)"
                " DO UPDATE SET reason = excluded.reason, since = excluded.since",
                [(name, action, member, reason) for member, reason in rejected],
                many=True,
            )

        await self._write(script())

    async def quarantined(self, name: str) -> Quarantined:
        """Every quarantined id of the segment, by action (a handful, normally)."""

        def script() -> Script[Quarantined]:
            rows = (
                yield Query("SELECT action, id FROM quarantine WHERE segment = ?", (name,))
            ).rows
            return Quarantined(
                add=frozenset(row["id"] for row in rows if row["action"] == "add"),
                remove=frozenset(row["id"] for row in rows if row["action"] == "remove"),
            )

        return await self._read(script())

    async def release_quarantine(self, name: str, released: Quarantined) -> None:
        """Their membership changed: try them again."""
        if not released.add and not released.remove:
            return
        dialect = self.dialect

        def script() -> Script[None]:
            for action, ids in (("add", released.add), ("remove", released.remove)):
                if ids:
                    yield Query(
                        "DELETE FROM quarantine WHERE segment = ? AND action = ?"
                        f" AND {dialect.ids_in('id')}",
                        (name, action, dialect.encode_ids(sorted(ids))),
                    )

        await self._write(script())

    async def quarantine_examples(self, name: str, limit: int) -> list[tuple[str, str, str]]:
        """Some quarantined (id, action, reason), newest first."""

        def script() -> Script[list[tuple[str, str, str]]]:
            rows = (
                yield Query(
                    "SELECT id, action, reason FROM quarantine WHERE segment = ?"
                    f" ORDER BY since DESC, id{self.dialect.text_order} LIMIT ?",
                    (name, limit),
                )
            ).rows
            return [(row["id"], row["action"], row["reason"]) for row in rows]

        return await self._read(script())

    async def quarantine_of(self, name: str, member: str) -> list[QuarantineEntry]:
        """Why WalkMe rejected this id, per action (empty: it is not quarantined)."""

        def script() -> Script[list[QuarantineEntry]]:
            rows = (
                yield Query(
                    "SELECT action, reason, since FROM quarantine WHERE segment = ? AND id = ?"
                    " ORDER BY action",
                    (name, member),
                )
            ).rows
            return [
                QuarantineEntry(row["action"], row["reason"], self.dialect.time_value(row["since"]))
                for row in rows
            ]

        return await self._read(script())
