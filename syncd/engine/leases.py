"""Segment leases: one run per segment across replicas, fenced by a per-tenure token."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

import structlog

from syncd.processes import alive
from syncd.state import StateError, StateStore
from syncd.state.base import LeaseLost, StateRecreated
from syncd.walkme import BeforeAttempt

log = structlog.get_logger("syncd.engine")


@dataclass
class Lease:
    """One tenure of a segment's lease. The holder token is unique per tenure, so a
    lease this process takes again later is never mistaken for this one."""

    name: str
    holder: str  # host:pid:nonce-run_id (``dead_here`` reads host and pid)
    run_id: str  # the run holding it now (a rerun keeps the tenure)
    lost: bool = False
    released: bool = False


class LeaseKeeper:
    """Takes, renews, proves and releases this process's segment leases."""

    def __init__(self, store: StateStore, holder: str, ttl: float) -> None:
        self._store = store
        self._holder = holder  # this process: host:pid:nonce
        self._ttl = ttl

    async def take(self, name: str, run_id: str) -> Lease | None:
        """The segment's lease for a new tenure, or None while another holds it. A
        trigger that finds it taken leaves a due mark first, so the holder runs the
        segment again before releasing: the run asked for here is never lost."""
        lease = Lease(name, f"{self._holder}-{run_id}", run_id)
        if await self._acquire(lease):
            return lease
        await self._store.mark_due(name)
        # The holder may have released between our try and the mark.
        return lease if await self._acquire(lease) else None

    async def _acquire(self, lease: Lease) -> bool:
        try:
            taken = await self._store.acquire_lease(lease.name, lease.holder, self._ttl)
        except StateRecreated:
            # The store just made its lost tables again: this run starts the segment
            # afresh (found again in WalkMe and rebuilt), no need to wait a cycle.
            taken = await self._store.acquire_lease(lease.name, lease.holder, self._ttl)
        if taken:
            return True
        holder = await self._store.lease_holder(lease.name)
        if holder is None or not dead_here(holder):
            return False
        # A process of this host that no longer runs (a restart after a crash):
        # waiting out its lease would only delay the run.
        log.info("segment.lease_broken", holder=holder)
        await self._store.release_lease(lease.name, holder)
        return await self._store.acquire_lease(lease.name, lease.holder, self._ttl)

    async def keep(self, lease: Lease) -> None:
        """Renew the lease while it is still ours; once it lapsed it is never resumed."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                renewed = await self._store.renew_lease(lease.name, lease.holder, self._ttl)
            except StateError:
                renewed = False
            if not renewed:
                self._lose(lease)
                return

    def proof(self, lease: Lease) -> BeforeAttempt:
        """Before each send (and each retry of one): the lease is still this run's,
        by the store's clock, or LeaseLost and nothing is sent."""

        async def prove() -> None:
            if not lease.lost and await self._store.renew_lease(
                lease.name, lease.holder, self._ttl
            ):
                return
            self._lose(lease)
            raise LeaseLost(lease.name)

        return prove

    def _lose(self, lease: Lease) -> None:
        if not lease.lost:
            lease.lost = True
            log.warning("segment.lease_lost", segment=lease.name, run_id=lease.run_id)

    async def due_again(self, lease: Lease, read_started: float | None) -> bool:
        """After a finished run: release the lease unless the segment was asked for
        since the run began reading (a due mark): then keep it and say so, and the
        caller runs again."""
        if lease.lost or read_started is None:
            return False  # released unconditionally
        try:
            released = await self._store.release_lease(lease.name, lease.holder, read_started)
        except StateError as exc:  # it expires by itself
            log.warning("state.unavailable", error=str(exc))
            lease.released = True
            return False
        if released:
            lease.released = True
            return False
        log.info(
            "segment.rerun",
            reason="asked for again (webhook, sync command or schedule) after this run"
            " began reading its source",
        )
        return True

    async def release(self, lease: Lease) -> None:
        if lease.released:
            return
        try:
            await self._store.release_lease(lease.name, lease.holder)
        except StateError as exc:  # it expires by itself
            log.warning("state.unavailable", error=str(exc))


def dead_here(holder: str) -> bool:
    """Whether a lease holder (``host:pid:nonce``) was a process of this host that is gone."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    # Our own pid with another nonce is a previous run of this container.
    return pid == os.getpid() or not alive(pid)
