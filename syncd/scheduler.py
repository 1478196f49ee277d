"""The daemon loop: a sync at start, then on ``SYNCD_SCHEDULE``, until a signal.

SIGTERM or SIGINT stops new work; the batch in flight finishes and is recorded
before the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncd.admin import AdminServer
from syncd.engine import Engine
from syncd.settings import Settings
from syncd.state import StateError, StateStore

log = structlog.get_logger("syncd.scheduler")


class Daemon:
    def __init__(self, settings: Settings, engine: Engine, store: StateStore) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._cycles: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self.admin = AdminServer(settings.admin_port, self._readiness)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        await self.admin.start()
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
            segments=len(self._engine.mappings),
            admin_port=self.admin.port,
        )
        await self._stop.wait()
        self._engine.stop()
        self._scheduler.shutdown(wait=False)
        if self._cycles:
            await asyncio.gather(*self._cycles, return_exceptions=True)
        await self.admin.stop()
        log.info("daemon.stopped")
        return 0

    def _on_signal(self, signum: int) -> None:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self._stop.set()

    async def _cycle(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._cycles.add(task)
        try:
            outcomes = await self._engine.sync_all()
            failed = sum(1 for outcome in outcomes if outcome.result != "synced")
            log.info("cycle.finished", segments=len(outcomes), failed=failed)
        finally:
            self._cycles.discard(task)

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        try:
            await self._store.ping()
        except StateError as exc:
            return False, {"state_store": str(exc)}
        if not self._scheduler.running:
            return False, {"scheduler": "not running"}
        return True, {}
