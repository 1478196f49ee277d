"""The daemon loop: a sync at start, then on ``SYNCD_SCHEDULE``, until a signal.

SIGTERM, SIGINT or SIGHUP (what terminals and many process managers send) stops
new work; the batch in flight finishes and is recorded before the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncd import metrics
from syncd.admin import AdminServer
from syncd.engine import Engine, Outcome, set_segment_gauges
from syncd.settings import ConfigError, Settings, printable
from syncd.state import StateError, StateStore
from syncd.webhook import HeapWebhookReceiver

log = structlog.get_logger("syncd.scheduler")

# Each ends the process gracefully: no batch is cut off mid-request.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Daemon:
    def __init__(self, settings: Settings, engine: Engine, store: StateStore) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._debounce: dict[int, asyncio.TimerHandle] = {}
        self._stop = asyncio.Event()
        self._started_at = datetime.now(UTC)
        self.admin = AdminServer(settings.admin_port, self._readiness)
        secret = settings.webhook_secret()
        self.receiver = (
            None
            if secret is None
            else HeapWebhookReceiver(
                store,
                secret=secret,
                port=settings.webhook_port,
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
        await self._listen(self.admin.start(), "SYNCD_ADMIN_PORT", self.admin.port)
        if self.receiver is not None:
            await self._listen(self.receiver.start(), "SYNCD_WEBHOOK_PORT", self.receiver.port)
        schedule = self._settings.parsed_schedule
        self._scheduler.add_job(
            self._cycle,
            trigger=schedule.trigger(),
            id="sync",
            next_run_time=datetime.now(UTC),  # once at start
            max_instances=1,  # a cycle still running when the next is due: skip it
            coalesce=True,
            misfire_grace_time=None,
        )
        self._scheduler.start()
        log.info(
            "daemon.started",
            schedule=schedule.text,
            segments=len(await self._engine.mappings()),
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
        if self.receiver is not None:
            await self.receiver.stop()
        await self.admin.stop()
        log.info("daemon.stopped")
        return 0

    @staticmethod
    async def _listen(start: Awaitable[None], variable: str, port: int) -> None:
        try:
            await start
        except OSError as exc:
            raise ConfigError(f"{variable}: cannot listen on port {port}: {exc.strerror}") from None

    def _on_signal(self, signum: int) -> None:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self._stop.set()

    async def _cycle(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            outcomes: list[Outcome] = []
            try:
                # Each segment's failure is its own outcome; what fails here is the
                # listing of segments, the orphan report or the history pruning.
                outcomes = await self._engine.sync_all()
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
                segments=len(outcomes),
                synced=results["synced"],
                failed=results["failed"],
                held=results["held"],
                skipped=results["skipped"],
            )
        finally:
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
        names = found.usable
        if not self._scheduler.running:
            return False, {"scheduler": "not running"}
        limit = timedelta(seconds=self._settings.stale_seconds)
        now = datetime.now(UTC)
        stale = []
        for name in names:
            state = states.get(name)
            since = state.last_success_at if state and state.last_success_at else None
            if now - (since or self._started_at) > limit:
                stale.append({"segment": name, "last_success_at": since and since.isoformat()})
        # Listed, not "not ready": a restart cannot fix a segment's name.
        invalid = [
            {"segment": printable(broken.name), "error": broken.error}
            for broken in found.broken.values()
        ]
        return True, {"stale_after_s": limit.total_seconds(), "stale": stale, "invalid": invalid}
