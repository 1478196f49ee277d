"""Who may run a segment now (leases and due marks), and which replicas are live.

Leases are the one place the stores differ in kind, not spelling: each judges
expiry by its own clock (SQLite: the host's boot clock; PostgreSQL: the
database's), so each implements them itself.
"""

from __future__ import annotations

import json
from abc import abstractmethod

from syncd.state.base import ReplicaPresence
from syncd.state.sql import Query, Script, SqlStore


class LeaseStore(SqlStore):
    @abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the right to run this segment; False while another holds it.
        A holder that dies loses the lease when ``ttl_s`` passes without a renewal."""

    @abstractmethod
    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease only while this holder still has it unexpired; False once
        it lapsed (even if nobody took it since: a lapsed lease is never resumed)."""

    @abstractmethod
    async def lease_holder(self, name: str) -> str | None:
        """Who holds the segment's unexpired lease, if anyone."""

    @abstractmethod
    async def release_lease(
        self, name: str, holder: str, read_started: float | None = None
    ) -> bool:
        """Give the lease up; True once this holder holds it no more. With
        ``read_started`` (a ``clock()`` reading), a due mark made since keeps the
        lease instead and answers False: the holder must run the segment again."""

    @abstractmethod
    async def mark_due(self, name: str) -> None:
        """Something asked for a run of this segment now (by the store's clock)."""

    @abstractmethod
    async def clock(self) -> float:
        """The store's lease clock, in seconds: the one leases and due marks use."""


class ReplicaRegistry(SqlStore):
    """Replica heartbeats, by the store's wall clock (PostgreSQL's: replicas on
    different hosts judge liveness alike)."""

    async def heartbeat(
        self,
        replica_id: str,
        mappings: list[str],
        live_s: float,
        next_runs: dict[str, float] | None = None,
    ) -> None:
        """This replica runs and maps these segments (and runs them next on schedule at
        ``next_runs``, Unix times by segment); it counts as live for ``live_s`` unless
        renewed. Rows of replicas that lapsed are dropped."""
        dialect = self.dialect
        now = dialect.wall_clock

        def script() -> Script[None]:
            yield Query(f"DELETE FROM replicas WHERE expires_at < {now}")
            yield Query(
                "INSERT INTO replicas (replica_id, mappings, seen_at, expires_at, next_runs)"
                f" VALUES (?, ?, {now}, {now} + ?, ?) ON CONFLICT (replica_id) DO UPDATE SET"
                " mappings = excluded.mappings, seen_at = excluded.seen_at,"
                " expires_at = excluded.expires_at, next_runs = excluded.next_runs",
                (
                    replica_id,
                    dialect.encode_names(sorted(mappings)),
                    live_s,
                    json.dumps(next_runs or {}),
                ),
            )

        await self._write(script())

    async def live_replicas(self) -> list[ReplicaPresence]:
        """Replicas whose heartbeat has not lapsed (by the store's clock), by id."""
        dialect = self.dialect

        def script() -> Script[list[ReplicaPresence]]:
            rows = (
                yield Query(
                    "SELECT replica_id, mappings, next_runs,"
                    f" {dialect.wall_clock} - seen_at AS seen_s_ago"
                    f" FROM replicas WHERE expires_at >= {dialect.wall_clock}"
                    f" ORDER BY replica_id{dialect.text_order}"
                )
            ).rows
            return [
                ReplicaPresence(
                    row["replica_id"],
                    dialect.decode_names(row["mappings"]),
                    max(0.0, float(row["seen_s_ago"])),
                    json.loads(row["next_runs"]),
                )
                for row in rows
            ]

        return await self._read(script())

    async def forget_replica(self, replica_id: str) -> None:
        """The replica stopped: it maps nothing any more."""

        def script() -> Script[None]:
            yield Query("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

        await self._write(script())
