"""What a person was last told about each segment (``SYNCD_NOTIFY_URL``): its standing
and the failed runs in a row since, so a restart or another replica never says it twice."""

from __future__ import annotations

from syncd.state.base import NoticeState
from syncd.state.sql import Query, Script, SqlStore


class NoticeBoard(SqlStore):
    async def notice_state(self, name: str) -> NoticeState:
        """The segment's notice state; a segment never written is ``ok`` with no failures."""

        def script() -> Script[NoticeState]:
            rows = (
                yield Query(
                    "SELECT standing, failures, version FROM notices WHERE segment = ?", (name,)
                )
            ).rows
            if not rows:
                return NoticeState()
            row = rows[0]
            return NoticeState(row["standing"], row["failures"], row["version"])

        return await self._read(script())

    async def claim_notice(
        self, name: str, seen: NoticeState, new: NoticeState, holder: str | None = None
    ) -> bool:
        """Write ``new`` (its version ignored: one more than ``seen``'s) only while the
        stored state is still ``seen``: True for exactly one of several writers that
        read the same state, who then sends the messages the change calls for. With
        ``holder``, only under that unexpired lease (else LeaseLost, nothing written)."""

        def script() -> Script[bool]:
            yield from self._fence(name, holder)
            # A row is written with version 1 or more: "WHERE version = 0" never
            # matches one, so a writer that saw no row wins only by inserting it.
            return (
                yield Query(
                    "INSERT INTO notices (segment, standing, failures, version)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (segment) DO UPDATE SET"
                    " standing = excluded.standing, failures = excluded.failures,"
                    " version = excluded.version WHERE notices.version = ?",
                    (name, new.standing, new.failures, seen.version + 1, seen.version),
                )
            ).count > 0

        return await self._write(script())
