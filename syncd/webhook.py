"""The Heap Segments Sync webhook receiver.

It listens on its own port and serves only the webhook path. A page is
verified (``Heap-Hash``), parsed, and written durably to the state store
before the 200 goes out; storing never waits on WalkMe. When a task's last
outstanding page arrives, ``on_task_complete`` asks for a sync soon.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from pydantic import SecretStr

from syncd import metrics
from syncd.state import StateError, StateStore
from syncd.state.base import HeapPage

log = structlog.get_logger("syncd.webhook")

SYNC_ACTION = "segment.users.sync"
MAX_NAME = 200  # a segment name longer than this is cut: it becomes a WalkMe segment name
_HEADER = re.compile(r"^\s*ts:(?P<ts>\d{1,16})\s*,\s*hmac:(?P<hmac>[A-Za-z0-9+/=_-]+)\s*$")

#: Called with the Heap segment id whose sync task just became complete.
TaskCompleteCallback = Callable[[int], None]


class BadPage(Exception):
    """The request is malformed: answered 400 (Heap's reference receiver does the same)."""


def sign(secret: str, timestamp_ms: int, body: bytes) -> str:
    """Heap's signature: base64(HMAC-SHA256(secret, "<ts>" + body))."""
    digest = hmac.new(secret.encode(), str(timestamp_ms).encode() + body, hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


def parse_page(payload: Any) -> HeapPage:
    """Validate a ``segment.users.sync`` body; raise BadPage naming the bad field."""
    if not isinstance(payload, dict):
        raise BadPage("body is not a JSON object")
    data = _field(payload, "data", dict)
    segment = _field(data, "segment", dict, "data.")
    info = _field(data, "sync_info", dict, "data.")
    segment_id = _field(segment, "id", int, "data.segment.")
    page_number = _field(info, "page_number", int, "data.sync_info.")
    total_pages = _field(info, "total_pages", int, "data.sync_info.")
    if segment_id < 0 or page_number < 1 or total_pages < 1 or page_number > total_pages:
        raise BadPage("data.segment.id, page_number or total_pages out of range")
    name = segment.get("name")
    name = name.strip()[:MAX_NAME] if isinstance(name, str) and name.strip() else str(segment_id)
    return HeapPage(
        heap_segment_id=segment_id,
        segment_name=name,
        sync_task_id=str(_field(info, "sync_task_id", str, "data.sync_info.")),
        page_number=page_number,
        total_pages=total_pages,
        add=_user_ids(data, "add"),
        remove=_user_ids(data, "remove"),
    )


def _field(container: dict[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    value = container.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadPage(f"{prefix}{key} is missing or not a {kind.__name__}")
    return value


def _user_ids(data: dict[str, Any], key: str) -> list[str]:
    items = data.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise BadPage(f"data.{key} is not a list")
    ids: list[str] = []
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            raise BadPage(f"data.{key} holds an entry without an id")
        value = item["id"]
        if value is None:
            continue  # a user without the identity matching key: nothing to send
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise BadPage(f"data.{key} holds an id that is not a string")
        text = str(value).strip()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise BadPage(f"data.{key} holds an id that is not valid Unicode") from None
        if text:
            ids.append(text)
    return ids


class HeapWebhookReceiver:
    def __init__(
        self,
        store: StateStore,
        *,
        secret: SecretStr,
        port: int,
        path: str,
        tolerance_s: float,
        max_body: int,
        on_task_complete: TaskCompleteCallback,
        host: str,
    ) -> None:
        self._store = store
        self._secret = secret
        self._path = path
        self._tolerance_ms = tolerance_s * 1000
        self._max_body = max_body
        self._on_task_complete = on_task_complete
        self._host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"<HeapWebhookReceiver :{self.port}{self._path}>"

    async def start(self) -> None:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post(self._path, self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("heap.webhook_listening", host=self._host, port=self.port, path=self._path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > self._max_body:
            return self._reject(413, "body larger than SYNCD_HEAP_WEBHOOK_MAX_BODY")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, "body larger than SYNCD_HEAP_WEBHOOK_MAX_BODY")
        try:
            self._verify(request.headers.get("Heap-Hash"), body)
        except BadPage as exc:
            return self._reject(400, str(exc))
        except PermissionError as exc:
            return self._reject(401, str(exc))
        try:
            payload = json.loads(body)
        except ValueError:
            return self._reject(400, "body is not valid JSON")
        if not isinstance(payload, dict):
            return self._reject(400, "body is not a JSON object")
        action = payload.get("action_type")
        if action != SYNC_ACTION:
            # Answer 200 so Heap does not retry a call syncd will never understand.
            log.warning("heap.webhook_ignored", action_type=str(action)[:100])
            metrics.webhook_pages.labels("ignored").inc()
            return web.json_response({"status": "ignored"})
        try:
            page = parse_page(payload)
        except BadPage as exc:
            return self._reject(400, str(exc))
        try:
            receipt = await self._store.store_heap_page(page)
        except StateError as exc:
            # Not stored: a non-2xx makes Heap send the page again later.
            log.error("heap.page_not_stored", error=str(exc))
            metrics.webhook_pages.labels("not_stored").inc()
            return web.json_response({"error": "state store unavailable"}, status=503)
        log.info(
            "heap.page_received",
            heap_segment_id=page.heap_segment_id,
            sync_task_id=page.sync_task_id,
            page=page.page_number,
            total_pages=page.total_pages,
            add=len(page.add),
            remove=len(page.remove),
            duplicate=receipt.duplicate,
            task_complete=receipt.task_complete,
        )
        result = "duplicate" if receipt.duplicate else "stored"
        metrics.webhook_pages.labels(result).inc()
        if receipt.task_complete:
            self._on_task_complete(page.heap_segment_id)
        return web.json_response({"status": result})

    def _verify(self, header: str | None, body: bytes) -> None:
        if not header:
            raise BadPage("missing Heap-Hash header")
        match = _HEADER.match(header)
        if match is None:
            raise BadPage("malformed Heap-Hash header (expected ts:<ms>,hmac:<base64>)")
        try:
            given = base64.b64decode(match["hmac"], validate=True)
        except (binascii.Error, ValueError):
            raise BadPage("Heap-Hash hmac is not base64") from None
        timestamp = int(match["ts"])
        if abs(time.time() * 1000 - timestamp) > self._tolerance_ms:
            raise PermissionError("Heap-Hash ts outside SYNCD_HEAP_WEBHOOK_TOLERANCE")
        expected = base64.b64decode(sign(self._secret.get_secret_value(), timestamp, body))
        if not hmac.compare_digest(given, expected):
            raise PermissionError("Heap-Hash signature does not match SYNCD_HEAP_WEBHOOK_SECRET")

    @staticmethod
    def _reject(status: int, reason: str) -> web.Response:
        log.warning("heap.webhook_rejected", status=status, reason=reason)
        metrics.webhook_pages.labels(f"rejected_{status}").inc()
        return web.json_response({"error": reason}, status=status)
