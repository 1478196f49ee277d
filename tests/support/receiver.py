"""A local receiver of syncd's messages (``SYNCD_NOTIFY_URL``): an aiohttp server on
127.0.0.1 that records every body posted to it and answers as told: 200, 500, a
hang, a refusal or a redirect. In a test's event loop (``async with``) or on a
thread for ``syncd`` subprocesses (``serve_in_thread(NotifyReceiver())``)."""

from __future__ import annotations

import asyncio
import json
import threading
from types import TracebackType
from typing import Any, Literal

from aiohttp import web

from syncd.http_server import start_server

Answer = Literal["ok", "error", "hang", "refuse", "redirect"]
# Slack-shaped: the path is the credential, so it must never show in syncd's output.
TOKEN = "T0NOTIFY/B0NOTIFY/notify-token-5e2c9a71d4"
PATH = f"/services/{TOKEN}"


class NotifyReceiver:
    """Records each request's JSON body (``posted``: every attempt; ``delivered``: those
    answered 2xx). ``answer`` may be changed while it runs, from any thread."""

    def __init__(self, answer: Answer = "ok") -> None:
        self.answer: Answer = answer
        self._posted: list[dict[str, Any]] = []
        self._delivered: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._base: str | None = None

    @property
    def url(self) -> str:
        """The SYNCD_NOTIFY_URL of this receiver; raises if not started."""
        if self._base is None:
            raise RuntimeError("receiver is not running")
        return self._base + PATH

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post(PATH, self._receive)
        # shutdown_timeout: a hanging answer must not hold stop() for aiohttp's 60 s.
        self._runner, bound_host, bound_port = await start_server(
            app, host, port, access_log=None, shutdown_timeout=0.5
        )
        self._base = f"http://{bound_host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> NotifyReceiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        assert isinstance(body, dict), body
        answer = self.answer
        with self._lock:
            self._posted.append(body)
        if answer == "hang":
            await asyncio.sleep(3600)
        if answer == "error":
            return web.Response(status=500, text="internal error")
        if answer == "refuse":
            return web.Response(status=404, text="no_service")
        if answer == "redirect":
            raise web.HTTPFound(PATH + "/elsewhere")
        with self._lock:
            self._delivered.append(body)
        return web.Response(text="ok")  # what Slack answers

    def posted(self) -> list[dict[str, Any]]:
        """Every body posted, retries included, in arrival order."""
        with self._lock:
            return list(self._posted)

    def delivered(self) -> list[dict[str, Any]]:
        """The bodies answered 2xx, in arrival order."""
        with self._lock:
            return list(self._delivered)

    def events(self) -> list[tuple[str, str]]:
        """(segment, event) of each delivered message, in arrival order."""
        return [(body["syncd"]["segment"], body["syncd"]["event"]) for body in self.delivered()]
