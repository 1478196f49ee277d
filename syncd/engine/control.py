"""Run control: what a run consults before each batch, kept apart from its result."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from syncd.engine.leases import Lease
from syncd.state.base import LeaseLost
from syncd.walkme import BeforeAttempt


class Interrupted(Exception):
    """Shutdown was requested; the batch in flight finished and was recorded."""


@dataclass
class RunControl:
    """One run's controls: shutdown, its lease and the proof of it before each send,
    when it began reading its source, and the WalkMe requests it sent."""

    stopping: Callable[[], bool]
    lease: Lease | None = None  # None: a dry run, which takes no lease
    prove_lease: BeforeAttempt | None = None
    read_started: float | None = None  # store clock when the run began reading its source
    tally: Counter[str] = field(default_factory=Counter)  # WalkMe requests by kind

    @property
    def holder(self) -> str | None:
        """The lease token that fences this run's writes (None: a run without a lease)."""
        return self.lease.holder if self.lease is not None else None

    def check(self) -> None:
        """Raise before starting a batch this run must not send."""
        if self.stopping():
            raise Interrupted("stopped by shutdown; the next run carries on from the snapshot")
        # Each send proves the lease by the store's clock (prove_lease); this only
        # saves starting a batch once the keeper found it lost.
        if self.lease is not None and self.lease.lost:
            raise LeaseLost(self.lease.name)
