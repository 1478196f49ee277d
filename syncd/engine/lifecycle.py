"""A segment's life beyond its runs: replicas' claims on it, orphans, and delete."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog

from syncd.engine.mappings import MappingSet
from syncd.settings import printable
from syncd.state import SegmentState, StateStore
from syncd.walkme import WalkMeClient, WalkMeNotFound

log = structlog.get_logger("syncd.engine")

# A segment synced within this many schedule intervals is in use, mapped or not: a
# replica that maps it may be restarting mid-rollout. No orphan, never deleted.
IN_USE_INTERVALS = 3


class SegmentInUse(Exception):
    """A delete refused: a replica maps, syncs or recently synced the segment."""


class SegmentLifecycle:
    """This replica's presence (heartbeats), the segments in use anywhere, the orphans
    no replica keeps, and deleting one."""

    def __init__(
        self,
        store: StateStore,
        client: WalkMeClient,
        replica_id: str,
        ttl: float,
        schedule_interval_s: Callable[[str], float],
        mapping_set: Callable[[], Awaitable[MappingSet]],
    ) -> None:
        self._store = store
        self._client = client
        self._replica_id = replica_id
        self._ttl = ttl  # a heartbeat lapses like a lease: live while it could hold one
        self._interval_s = schedule_interval_s  # by segment name
        self._mapping_set = mapping_set
        # Mapping-set differences with other replicas already warned about, by replica.
        self._differences: dict[str, tuple[list[str], list[str]]] = {}

    async def heartbeat(self, next_runs: dict[str, float] | None = None) -> None:
        """Tell other replicas (and ``prune``, and ``status``: ``next_runs``) that this
        one runs, what it maps and when it runs each segment next; warn once per change
        when another live replica maps a different set."""
        names = sorted((await self._mapping_set()).usable)
        await self._store.heartbeat(self._replica_id, names, self._ttl, next_runs)
        differences: dict[str, tuple[list[str], list[str]]] = {}
        for replica in await self._store.live_replicas():
            only_here = sorted(set(names) - set(replica.mappings))
            only_there = sorted(set(replica.mappings) - set(names))
            if replica.replica_id == self._replica_id or not (only_here or only_there):
                continue
            differences[replica.replica_id] = (only_here, only_there)
            if self._differences.get(replica.replica_id) != (only_here, only_there):
                log.warning(
                    "replicas.config_differs",
                    replica=replica.host_pid,
                    only_here=only_here,
                    only_there=only_there,
                    hint="replicas serve different segment mappings: a rollout under way"
                    " or a replica left behind; none of these segments counts as an orphan",
                )
        self._differences = differences

    async def leave(self) -> None:
        """This replica stops: it no longer keeps any segment in use."""
        await self._store.forget_replica(self._replica_id)

    async def claims(self) -> dict[str, str]:
        """Segments in use somewhere, whatever this configuration maps, and why: a live
        replica maps it, or it synced within IN_USE_INTERVALS of its schedule's intervals."""
        claims: dict[str, str] = {}
        for replica in await self._store.live_replicas():
            for name in replica.mappings:
                claims.setdefault(
                    name,
                    f"mapped by live replica {replica.host_pid}"
                    f" (heartbeat {replica.seen_s_ago:.0f} s ago)",
                )
        now = datetime.now(UTC)
        for state in await self._store.all():
            synced = state.last_success_at
            window = timedelta(seconds=IN_USE_INTERVALS * self._interval_s(state.name))
            if state.name not in claims and synced is not None and now - synced < window:
                claims[state.name] = (
                    f"last synced at {synced.isoformat()}, less than {IN_USE_INTERVALS}"
                    f" schedule intervals ({window.total_seconds():.0f} s) ago; not an orphan"
                    f" before {(synced + window).isoformat()}"
                )
        return claims

    async def in_use(self, name: str) -> str | None:
        """Why this segment must not be deleted now, or None."""
        holder = await self._store.lease_holder(name)
        if holder is not None:
            return f"being synced now by {holder.rsplit(':', 1)[0]}"
        return (await self.claims()).get(name)

    async def report_orphans(self) -> list[SegmentState]:
        """One ``segment.orphaned`` line per segment syncd wrote to that no configuration
        of a live replica maps and that did not sync recently."""
        # A segment that cannot be mapped is still wanted: never an orphan to prune.
        in_use = set((await self._mapping_set()).names) | set(await self.claims())
        orphans = await self._store.mark_orphans(in_use)
        for orphan in orphans:
            log.warning(
                "segment.orphaned",
                segment=printable(orphan.name),
                segment_guid=orphan.segment_guid,
                members=orphan.members,
                origin=orphan.origin,
                since=orphan.orphaned_at.isoformat() if orphan.orphaned_at else None,
            )
        return orphans

    async def delete(self, state: SegmentState) -> bool:
        """Delete the WalkMe segment and forget it; False when WalkMe had it gone already.
        Raises SegmentInUse, deleting nothing, while any replica uses it."""
        reason = await self.in_use(state.name)
        if reason is not None:
            raise SegmentInUse(reason)
        existed = True
        if state.segment_guid is not None:
            try:
                await self._client.delete_segment(state.system_guid, state.segment_guid)
            except WalkMeNotFound:
                existed = False
        await self._store.forget(state.name)
        log.info(
            "segment.deleted",
            segment=state.name,
            segment_guid=state.segment_guid,
            already_gone=not existed,
        )
        return existed
