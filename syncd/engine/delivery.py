"""Batch delivery: send each batch to one WalkMe segment and record it once acknowledged.

It owns what a refused batch becomes: a 413 is sent again in halves, a 400 is
bisected down to the ids WalkMe refuses (quarantined), a 409 on create adopts the
segment that create made, and a pending batch is replayed in today's batch size.
"""

from __future__ import annotations

from typing import Literal

import structlog

from syncd.diff import Diff
from syncd.engine.control import RunControl
from syncd.engine.outcome import Outcome
from syncd.engine.resolve import Mode
from syncd.logs import scrub
from syncd.settings import SegmentMapping
from syncd.state import Action, StateStore
from syncd.state.base import PendingBatch
from syncd.walkme import (
    WalkMeAuthError,
    WalkMeClient,
    WalkMeConflict,
    WalkMeError,
    WalkMeNotFound,
    WalkMeRejected,
    WalkMeTooLarge,
)

log = structlog.get_logger("syncd.engine")

EXAMPLES_SHOWN = 5
MAX_QUARANTINED_PER_BATCH = 1000  # more than this is not "a few bad ids": give up


class BatchDelivery:
    """One run's batches to one WalkMe segment; ``guid`` is set once a create is
    acknowledged. Counts what WalkMe acknowledged into the run's outcome."""

    def __init__(
        self,
        store: StateStore,
        client: WalkMeClient,
        control: RunControl,
        outcome: Outcome,
        mapping: SegmentMapping,
        system: str,
        guid: str | None,
    ) -> None:
        self._store = store
        self._client = client
        self._control = control
        self._outcome = outcome
        self._mapping = mapping
        self._system = system
        self.guid = guid
        # After a 413: the most ids one request may carry for the rest of this run.
        self._max_ids: int | None = None
        # While replaying a pending batch: its ids not yet acknowledged. They stay the
        # pending batch (an earlier, lost request may have applied any of them) until
        # each is recorded, so a crash mid-replay leaves none of them unaccounted for.
        self._unsettled: dict[str, None] | None = None

    async def send_diff(self, diff: Diff, mode: Mode, batch_size: int) -> None:
        """Removes, then adds; a new segment is created with its first batch, and an
        adopted or reset one is rebuilt with override as its first batch."""
        if mode == "update":
            for batch in diff.batches("remove", batch_size):
                self._control.check()
                await self._deliver("remove", batch)
        first: Action | None = None if mode == "update" else mode
        for batch in diff.batches("add", batch_size):
            self._control.check()
            await self._deliver(first or "add", batch)
            first = None
        if first is not None:
            # Nothing to add, yet the segment must exist (create) or be emptied
            # of unknown members (override).
            await self._deliver(first, [])

    async def replay(self, pending: PendingBatch, batch_size: int) -> None:
        """Send a pending batch again, in slices of today's batch size: one stored
        under a larger SYNCD_BATCH_SIZE (or refused as too large) must not be sent
        whole on every run. What WalkMe refused of it is no longer pending."""
        self._unsettled = dict.fromkeys(pending.ids)
        await self._deliver_in_slices(pending.action, pending.ids, batch_size)
        if self._unsettled:
            await self._store.clear_pending(self._mapping.name, self._control.holder)

    async def _deliver(self, action: Action, batch: list[str]) -> None:
        """Send one batch and record it; on a 400, find and quarantine the rejected ids;
        on a 413, send it in halves."""
        if self._max_ids is not None and len(batch) > self._max_ids:
            await self._deliver_in_slices(action, batch, self._max_ids)
            return
        try:
            await self._send(action, batch)
        except (WalkMeRejected, WalkMeTooLarge) as exc:
            if not batch:
                raise
            if isinstance(exc, WalkMeTooLarge) and len(batch) == 1:
                raise _too_large_for_one(exc) from None
            if action in ("create", "override"):
                # Establish (or empty) the segment first, then add the batch piecewise.
                await self._send(action, [])
                await self._record(action, [])
                action = "add"
            if isinstance(exc, WalkMeTooLarge):
                # Not applied: nothing was wrong but the size. Halve, and keep to
                # that size for the rest of the run.
                half = (len(batch) + 1) // 2
                self._max_ids = min(self._max_ids or half, half)
                await self._deliver_in_slices(action, batch, half)
                return
            await self._isolate("remove" if action == "remove" else "add", batch, exc)
            return
        await self._record(action, batch)

    async def _deliver_in_slices(self, action: Action, batch: list[str], size: int) -> None:
        """A batch as several requests of at most ``size`` ids; after the first,
        a create or override goes on with add (each would replace what came before)."""
        for start in range(0, max(len(batch), 1), size):
            if start:
                self._control.check()
            await self._deliver(action, batch[start : start + size])
            if action in ("create", "override"):
                action = "add"

    async def _send(self, action: Action, batch: list[str]) -> None:
        mapping, control = self._mapping, self._control
        if action == "create":
            try:
                self.guid = await self._client.create_segment(
                    self._system,
                    mapping.name,
                    mapping.external_id,
                    batch,
                    control.prove_lease,
                    tally=control.tally,
                )
            except WalkMeConflict as exc:
                if exc.guid is None:
                    raise
                # Our own create key is taken: an earlier create did land. Its
                # members are unknown, so adopt it and rebuild it with this batch.
                await self._store.adopt(mapping.name, exc.guid, "created")
                log.info("segment.adopted", segment_guid=exc.guid, by="create key")
                self.guid = exc.guid
                await self._send("override", batch)
                return
            log.info("segment.created", segment_guid=self.guid)
            return
        assert self.guid is not None
        # Remembered before sending: if the answer is lost (crash, kill, timeout),
        # the next run sends this batch again before it diffs. A replay's ids are
        # remembered already.
        holder = control.holder
        if self._unsettled is None:
            await self._store.begin_batch(mapping.name, action, batch, holder)
        try:
            await self._client.update_segment(
                self._system, self.guid, action, batch, control.prove_lease, tally=control.tally
            )
        except WalkMeNotFound:
            await self._store.clear_pending(mapping.name, holder)  # the segment is gone: rebuilt
            raise
        except (WalkMeRejected, WalkMeTooLarge, WalkMeAuthError):
            if self._unsettled is None:
                # Refused: certainly not applied. (A replayed batch may have been
                # applied by the request whose answer was lost: it stays pending.)
                await self._store.clear_pending(mapping.name, holder)
            raise

    async def _record(self, action: Action, batch: list[str]) -> None:
        outcome = self._outcome
        still_pending: PendingBatch | None = None
        if self._unsettled is not None:
            for member in batch:
                self._unsettled.pop(member, None)
            # After an override's first slice, the rest only adds.
            rest: Action = "add" if action in ("create", "override") else action
            still_pending = PendingBatch(rest, list(self._unsettled))
        await self._store.record_batch(
            self._mapping.name,
            outcome.run_id,
            action,
            batch,
            self.guid,
            self._control.holder,
            still_pending=still_pending,
        )
        if action == "remove":
            outcome.removed += len(batch)
        else:
            outcome.added += len(batch)

    async def _isolate(
        self, action: Literal["add", "remove"], batch: list[str], error: WalkMeRejected
    ) -> None:
        """Bisect a rejected batch down to the single ids WalkMe refuses.

        k bad ids cost about 2·k·log2(len(batch)) extra requests. A 400 that is
        not about ids (every part refused, even an empty request) fails the run
        instead of quarantining good ids.
        """
        pending = [batch[len(batch) // 2 :], batch[: len(batch) // 2]]
        rejected: list[tuple[str, str]] = []
        accepted = 0
        control_done = False
        try:
            while pending:
                part = pending.pop()
                self._control.check()
                try:
                    await self._send(action, part)
                except WalkMeTooLarge as exc:
                    if len(part) == 1:
                        raise _too_large_for_one(exc) from None
                    pending += [part[len(part) // 2 :], part[: len(part) // 2]]
                    continue
                except WalkMeRejected as exc:
                    if len(part) > 1:
                        pending += [part[len(part) // 2 :], part[: len(part) // 2]]
                        continue
                    if not accepted and not control_done:
                        # Before blaming any id: does WalkMe refuse even no ids?
                        control_done = True
                        await self._control_request(action, exc)
                    rejected.append((part[0], exc.body or str(exc)))
                    if len(rejected) > MAX_QUARANTINED_PER_BATCH:
                        raise WalkMeRejected(
                            f"WalkMe rejected more than {MAX_QUARANTINED_PER_BATCH} ids of one"
                            f" batch; giving up on this run. Last answer: {exc.body}",
                            400,
                            exc.body,
                        ) from None
                    continue
                await self._record(action, part)
                accepted += len(part)
        finally:
            if rejected:
                rejected = [(member, scrub(answer)) for member, answer in rejected]
                await self._store.quarantine(self._mapping.name, action, rejected)
                self._outcome.quarantined += len(rejected)
                log.warning(
                    "segment.quarantined",
                    action=action,
                    count=len(rejected),
                    ids=[member for member, _ in rejected[:EXAMPLES_SHOWN]],
                    walkme_answer=rejected[0][1][:300],
                    first_answer=error.body[:300],
                )

    async def _control_request(self, action: Literal["add", "remove"], exc: WalkMeRejected) -> None:
        """An empty request: if WalkMe refuses even that, the 400 is not about ids."""
        try:
            await self._send(action, [])
        except WalkMeRejected as control:
            raise WalkMeRejected(
                "WalkMe answers 400 even to a request without ids: the problem is not"
                f" the ids. WalkMe said: {control.body or exc.body}",
                400,
                control.body,
            ) from None


def _too_large_for_one(exc: WalkMeTooLarge) -> WalkMeError:
    return WalkMeError(
        "WalkMe (or a proxy before it) answers 413 payload too large even to a request"
        " with one id: raise the request body limit of the proxy between syncd and WalkMe."
        f" WalkMe said: {exc.body}",
        413,
        exc.body,
    )
