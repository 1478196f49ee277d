"""The admin HTTP server: ``/healthz`` (the process lives) and ``/readyz`` (it can work)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from syncd.http_server import start_server
from syncd.metrics import REGISTRY

log = structlog.get_logger("syncd.admin")

#: Returns (ready, details); details go into the JSON body.
ReadinessCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class AdminServer:
    def __init__(self, port: int, readiness: ReadinessCheck, host: str) -> None:
        self._port = port
        self._host = host
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # Port 0 asks the OS for a free port (tests); report the real one.
        self._runner, _, self.port = await start_server(
            app, self._host, self._port, access_log=None
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        # Answering at all proves the event loop turns; nothing else is checked.
        return web.json_response({"status": "ok"})

    async def _metrics(self, _: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(REGISTRY))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _readyz(self, _: web.Request) -> web.Response:
        try:
            ready, details = await self._readiness()
        except Exception as exc:
            # A check that breaks is an answer too: 503 with the reason, never a bare 500.
            log.exception("admin.readiness_error")
            ready, details = False, {"error": f"internal error: {type(exc).__name__}: {exc}"}
        return web.json_response(
            {"status": "ready" if ready else "not ready", **details}, status=200 if ready else 503
        )
