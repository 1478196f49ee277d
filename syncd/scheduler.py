"""The daemon loop: a sync at start, then on schedule, until a signal. One job per
schedule (``SYNCD_SCHEDULE``, and each other one a mapping has) runs the cycle of its
segments; the engine's slots and per-segment locks keep the concurrency rules across
jobs, and a job whose cycle still runs skips its next one (``cycle.overrun``).

SIGTERM, SIGINT or SIGHUP (what terminals and many process managers send) stops
new work; the batch in flight finishes and is recorded before the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncd import metrics
from syncd.admin import AdminServer
from syncd.engine import Engine, Outcome, set_segment_gauges
from syncd.notify import Notifier
from syncd.schedule import Schedule
from syncd.settings import ConfigError, Settings, printable
from syncd.state import StateError, StateStore
from syncd.webhook import HeapWebhookReceiver

log = structlog.get_logger("syncd.scheduler")

# Each ends the process gracefully: no batch is cut off mid-request.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _NoOverrunText(logging.Filter):
    """APScheduler's free-text line for a skipped cycle: ``cycle.overrun`` says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


_NO_OVERRUN_TEXT = _NoOverrunText()


class Daemon:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: StateStore,
        notifier: Notifier | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store
        self._notifier = notifier
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._debounce: dict[int, asyncio.TimerHandle] = {}
        self._stop = asyncio.Event()
        self._started_at = datetime.now(UTC)
        # Running cycles by job id: their time.monotonic() start and their segments.
        self._cycles: dict[str, tuple[float, list[str]]] = {}
        self._schedules = {_job_id(s): s for s in engine.schedules()}
        self.admin = AdminServer(settings.admin_port, self._readiness, settings.admin_host)
        secret = settings.webhook_secret()
        self.receiver = (
            None
            if secret is None
            else HeapWebhookReceiver(
                store,
                secret=secret,
                port=settings.webhook_port,
                host=settings.webhook_host,
                path=settings.heap_webhook_path,
                tolerance_s=settings.heap_webhook_tolerance,
                max_body=settings.heap_webhook_max_body,
                on_task_complete=self._heap_task_complete,
            )
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._started_at = datetime.now(UTC)
        for state in await self._store.all():
            set_segment_gauges(state)  # staleness survives restarts
        for name in await self._engine.mappings():
            for result in ("synced", "failed", "held"):
                # Series exist from the start, so increase() sees the first failure.
                metrics.segment_runs.labels(name, result)
        settings = self._settings
        await self._listen(self.admin.start(), "ADMIN", settings.admin_host, self.admin.port)
        if self.receiver is not None:
            await self._listen(
                self.receiver.start(), "WEBHOOK", settings.webhook_host, self.receiver.port
            )
        heartbeat = asyncio.create_task(self._heartbeats())
        for job_id, schedule in self._schedules.items():
            self._scheduler.add_job(
                self._cycle,
                trigger=schedule.trigger(),
                args=[schedule],
                id=job_id,
                next_run_time=datetime.now(UTC),  # once at start
                max_instances=1,  # a cycle still running when the next is due: skip it
                coalesce=True,
                misfire_grace_time=None,
            )
        logging.getLogger("apscheduler.scheduler").addFilter(_NO_OVERRUN_TEXT)
        self._scheduler.add_listener(self._overrun, EVENT_JOB_MAX_INSTANCES)
        self._scheduler.start()
        log.info(
            "daemon.started",
            schedule=settings.schedule,
            schedules=[schedule.text for schedule in self._schedules.values()],
            segments=len(await self._engine.mappings()),
            admin_host=self._settings.admin_host,
            admin_port=self.admin.port,
        )
        await self._stop.wait()
        # No new work; runs in flight finish their current batch and record it.
        # (Shutting the scheduler down first would cancel them mid-request.)
        self._scheduler.pause()
        self._engine.stop()
        for handle in self._debounce.values():
            handle.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._scheduler.shutdown(wait=False)
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat  # its last write lands before the row is forgotten
        try:
            await self._engine.leave()
        except StateError as exc:  # its heartbeat lapses by itself
            log.warning("state.unavailable", error=str(exc))
        if self.receiver is not None:
            await self.receiver.stop()
        await self.admin.stop()
        if self._notifier is not None:
            await self._notifier.close()  # the last runs' messages, for a bounded time
        log.info("daemon.stopped")
        return 0

    @staticmethod
    async def _listen(start: Awaitable[None], server: str, host: str, port: int) -> None:
        try:
            await start
        except OSError as exc:
            # A name that does not resolve or an address not on this machine is the
            # host's fault; anything else (in use, no permission) the port's.
            bad_host = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
            variable = f"SYNCD_{server}_{'HOST' if bad_host else 'PORT'}"
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"{variable}: cannot listen on {host} port {port}: {reason}"
            ) from None

    async def _heartbeats(self) -> None:
        """As often as a lease is renewed: a replica is live while it could hold one."""
        while True:
            await self._heartbeat()
            await asyncio.sleep(self._settings.lease_ttl / 3)

    async def _heartbeat(self) -> None:
        """This replica is live; with it go its next scheduled runs (``syncd status``)."""
        try:
            await self._engine.heartbeat(await self._next_runs())
        except StateError as exc:
            log.warning("state.unavailable", error=str(exc))

    async def _next_runs(self) -> dict[str, float]:
        """When each segment next runs on its schedule, as Unix time."""
        next_runs: dict[str, float] = {}
        for key, names in (await self._engine.schedule_groups()).items():
            job = self._scheduler.get_job(_job_id_of(key))
            when: datetime | None = None if job is None else job.next_run_time
            if when is not None:
                next_runs.update(dict.fromkeys(names, when.timestamp()))
        return next_runs

    def _overrun(self, event: JobSubmissionEvent) -> None:
        started, names = self._cycles.get(event.job_id, (None, []))
        schedule = self._schedules[event.job_id]
        log.warning(
            "cycle.overrun",
            segments=[name for name in self._engine.running() if name in names],
            running_s=round(time.monotonic() - started, 1) if started is not None else None,
            schedule=schedule.text,
            hint="a cycle outlasts its schedule: the cycle due now is skipped; the next"
            " one starts on schedule after this one ends",
        )

    def _on_signal(self, signum: int) -> None:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self._stop.set()

    async def _cycle(self, schedule: Schedule) -> None:
        """One pass over the segments of ``schedule``; ``SYNCD_SCHEDULE``'s cycle also
        reports orphans and prunes the history."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        job_id = _job_id(schedule)
        self._cycles[job_id] = (time.monotonic(), [])
        try:
            outcomes: list[Outcome] = []
            try:
                # Each segment's failure is its own outcome; what fails here is the
                # listing of segments, the orphan report or the history pruning.
                names = (await self._engine.schedule_groups()).get(schedule.key, [])
                self._cycles[job_id] = (self._cycles[job_id][0], names)
                await self._heartbeat()  # its next run is known now: status shows it at once
                if names:
                    outcomes = await self._engine.sync_all(names)
                if schedule.key == self._settings.parsed_schedule.key:
                    await self._engine.report_orphans()
                    cutoff = datetime.now(UTC) - timedelta(days=self._settings.history_days)
                    await self._store.prune_history(cutoff)
            except StateError as exc:
                log.error("state.unavailable", error=str(exc))
            except Exception:
                log.exception("cycle.internal_error")
            results = Counter(outcome.result for outcome in outcomes)
            log.info(
                "cycle.finished",
                schedule=schedule.text,
                segments=len(outcomes),
                synced=results["synced"],
                failed=results["failed"],
                held=results["held"],
                skipped=results["skipped"],
            )
        finally:
            self._cycles.pop(job_id, None)
            self._tasks.discard(task)

    def _heap_task_complete(self, heap_segment_id: int) -> None:
        """Sync soon after Heap's last page; pages arriving meanwhile push it back."""
        if self._stop.is_set():
            return
        pending = self._debounce.pop(heap_segment_id, None)
        if pending is not None:
            pending.cancel()
        self._debounce[heap_segment_id] = asyncio.get_running_loop().call_later(
            self._settings.heap_webhook_debounce, self._start_heap_sync, heap_segment_id
        )

    def _start_heap_sync(self, heap_segment_id: int) -> None:
        self._debounce.pop(heap_segment_id, None)
        if self._stop.is_set():
            return
        task = asyncio.create_task(self._sync_heap_segment(heap_segment_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync_heap_segment(self, heap_segment_id: int) -> None:
        try:
            outcome = await self._engine.sync_heap_segment(heap_segment_id)
        except StateError as exc:
            log.error("state.unavailable", error=str(exc), heap_segment_id=heap_segment_id)
            return
        except Exception:
            # Nothing may end this task unlogged ("Task exception was never retrieved").
            log.exception("cycle.internal_error", heap_segment_id=heap_segment_id)
            return
        if outcome is None:
            log.warning(
                "heap.segment_unmapped",
                heap_segment_id=heap_segment_id,
                hint="add a mapping with this heap_segment_id, or set SYNCD_HEAP_AUTO_MAP=true",
            )

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready while the store answers and the scheduler runs. Stale segments are
        listed but keep it 200: restarting syncd does not fix WalkMe's outages."""
        try:
            await self._store.ping()
            states = {state.name: state for state in await self._store.all()}
            found = await self._engine.mapping_set()
        except StateError as exc:
            return False, {"state_store": str(exc)}
        if not self._scheduler.running:
            return False, {"scheduler": "not running"}
        now = datetime.now(UTC)
        stale = []
        for name, mapping in found.usable.items():
            # Each segment by its own schedule: a nightly one is not stale at noon.
            limit_s = self._settings.stale_seconds_for(mapping)
            state = states.get(name)
            since = state.last_success_at if state and state.last_success_at else None
            if now - (since or self._started_at) > timedelta(seconds=limit_s):
                stale.append(
                    {
                        "segment": name,
                        "last_success_at": since and since.isoformat(),
                        "stale_after_s": limit_s,
                    }
                )
        # Listed, not "not ready": a restart cannot fix a segment's name.
        invalid = [
            {"segment": printable(broken.name), "error": broken.error}
            for broken in found.broken.values()
        ]
        return True, {
            "stale_after_s": self._settings.stale_seconds,  # SYNCD_SCHEDULE's segments'
            "stale": stale,
            "invalid": invalid,
        }


def _job_id(schedule: Schedule) -> str:
    return _job_id_of(schedule.key)


def _job_id_of(key: str) -> str:
    """The APScheduler job of the schedule with this ``Schedule.key``."""
    return f"sync {key}"
