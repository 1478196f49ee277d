"""The Heap Segments Sync webhook receiver.

It listens on its own port and serves only the webhook path. A page is
verified (``Heap-Hash``), parsed, and written durably to the state store
before the 200 goes out; storing never waits on WalkMe. When a task's last
outstanding page arrives, ``on_task_complete`` asks for a sync soon.

The port faces the internet, so everything a sender controls is bounded before
it costs memory or reaches the store or a log line: compressed bodies are
refused unread, bodies are read with a size cap, a deadline and a shared budget
of unverified bytes, the signature is checked before any parsing, and every
field is checked against the range the store and the segment mappings take.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import SecretStr

from syncd import metrics
from syncd.http_server import start_server
from syncd.settings import (
    HEAP_SEGMENT_ID_MAX,
    SEGMENT_NAME_MAX,
    segment_name_problem,
    without_unsafe,
)
from syncd.state import StateError, StateStore
from syncd.state.base import HeapPage

log = structlog.get_logger("syncd.webhook")

SYNC_ACTION = "segment.users.sync"
MAX_PAGES = 1_000_000  # page_number and total_pages; PostgreSQL stores them as INTEGER
MAX_TASK_ID = 200  # Heap's sync_task_id is a UUID; it is logged with every page
MAX_LOGGED = 200  # characters of any sender-controlled text in a log line
READ_TIMEOUT_S = 60.0  # a whole body must arrive within this: slow senders are cut off
_HEADER = re.compile(r"^\s*ts:(?P<ts>\d{1,16})\s*,\s*hmac:(?P<hmac>[A-Za-z0-9+/=_-]+)\s*$")
_IDENTITY = ("", "identity")  # "Content-Encoding: identity" or none: plain bytes

# The logger aiohttp reports the webhook port's HTTP errors to (see _MalformedHttpIsOneLine).
http_log = logging.getLogger("syncd.webhook.http")

#: Called with the Heap segment id whose sync task just became complete.
TaskCompleteCallback = Callable[[int], None]


class BadPage(Exception):
    """The request is malformed: answered 400 (Heap's reference receiver does the same)."""


def sign(secret: str, timestamp_ms: int, body: bytes | bytearray) -> str:
    """Heap's signature: base64(HMAC-SHA256(secret, "<ts>" + body))."""
    digest = hmac.new(secret.encode(), str(timestamp_ms).encode() + body, hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


class _Refused(Exception):
    """The request is answered ``status`` without reading (the rest of) it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def shown(text: str, limit: int = MAX_LOGGED) -> str:
    """Sender-controlled text as it may appear in a log line: cut, with a marker."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more]"


def _refuse_constant(name: str) -> float:
    raise BadPage(f"body holds {name}, which is not JSON")


def parse_body(body: bytes | bytearray) -> Any:
    """The body as JSON: NaN and Infinity refused, nesting bounded by the parser's depth."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadPage("body is nested too deeply") from None
    except ValueError:  # also UnicodeDecodeError: the body is not UTF-8
        raise BadPage("body is not valid JSON") from None


def parse_page(payload: Any) -> HeapPage:
    """Validate a ``segment.users.sync`` body; raise BadPage naming the bad field."""
    if not isinstance(payload, dict):
        raise BadPage("body is not a JSON object")
    data = _field(payload, "data", dict)
    segment = _field(data, "segment", dict, "data.")
    info = _field(data, "sync_info", dict, "data.")
    segment_id = _number(segment, "id", 0, HEAP_SEGMENT_ID_MAX, "data.segment.")
    total_pages = _number(info, "total_pages", 1, MAX_PAGES, "data.sync_info.")
    page_number = _number(info, "page_number", 1, total_pages, "data.sync_info.")
    return HeapPage(
        heap_segment_id=segment_id,
        segment_name=_segment_name(segment.get("name"), segment_id),
        sync_task_id=_task_id(info),
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


def _number(container: dict[str, Any], key: str, low: int, high: int, prefix: str) -> int:
    value: int = _field(container, key, int, prefix)
    if not low <= value <= high:
        raise BadPage(f"{prefix}{key} is out of range ({low} to {high})")
    return value


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        return False
    return True


def _task_id(info: dict[str, Any]) -> str:
    task: str = _field(info, "sync_task_id", str, "data.sync_info.")
    if not 1 <= len(task) <= MAX_TASK_ID or not task.isprintable():  # also lone surrogates
        raise BadPage(f"data.sync_info.sync_task_id is not 1 to {MAX_TASK_ID} printable characters")
    return task


def _segment_name(raw: Any, segment_id: int) -> str:
    """Heap's name made a valid segment name; the segment id when nothing of it is left.

    Heap documents no rules for names, and refusing the page would only make Heap
    send it again for ever, so the name is repaired rather than refused.
    """
    if not isinstance(raw, str) or not _unicode(raw):
        return str(segment_id)
    name = without_unsafe(raw).strip()[:SEGMENT_NAME_MAX].rstrip()
    return name if name and segment_name_problem(name) is None else str(segment_id)


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
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise BadPage(f"data.{key} holds an id that is not a string or an integer")
        text = str(value).strip()
        if not _unicode(text):
            raise BadPage(f"data.{key} holds an id that is not valid Unicode")
        if text:
            # PostgreSQL text cannot hold NUL. Another control character keeps the id
            # one that the id rules refuse and report, as they would have this one.
            ids.append(text.replace("\x00", "\x01"))
    return ids


class _MalformedHttpIsOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse with the bytes it choked on and a
    traceback: keep one short warning instead (other errors keep their traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = " ".join(str(error).split())
            record.msg = f"malformed HTTP request refused: {shown(reason)}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


http_log.addFilter(_MalformedHttpIsOneLine())


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
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._store = store
        self._secret = secret
        self._path = path
        self._tolerance_ms = tolerance_s * 1000
        self._max_body = max_body
        # Bytes of not yet verified bodies held at once, over all requests: anyone can
        # send them, so together they may take no more than two of the largest pages.
        self._unverified_budget = 2 * max_body
        self._unverified = 0
        self._read_timeout_s = read_timeout_s
        self._on_task_complete = on_task_complete
        self._host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"<HeapWebhookReceiver :{self.port}{self._path}>"

    async def start(self) -> None:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post(self._path, self._receive)
        # Never inflate a body: a few KiB of gzip can become GiBs (refused with 415).
        self._runner, _, self.port = await start_server(
            app, self._host, self.port, access_log=None, auto_decompress=False, logger=http_log
        )
        log.info("heap.webhook_listening", host=self._host, port=self.port, path=self._path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_body(request)
        except _Refused as exc:
            return self._reject(exc.status, str(exc))
        try:
            self._verify(request.headers.get("Heap-Hash"), body)
        except BadPage as exc:
            return self._reject(400, str(exc))
        except PermissionError as exc:
            return self._reject(401, str(exc))
        try:
            payload = parse_body(body)
        except BadPage as exc:
            return self._reject(400, str(exc))
        if not isinstance(payload, dict):
            return self._reject(400, "body is not a JSON object")
        action = payload.get("action_type")
        if action != SYNC_ACTION:
            # Answer 200 so Heap does not retry a call syncd will never understand.
            shown_action = shown(action if isinstance(action, str) else type(action).__name__)
            log.warning("heap.webhook_ignored", action_type=shown_action)
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
            log.error("heap.page_not_stored", error=shown(str(exc)))
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

    async def _read_body(self, request: web.Request) -> bytearray:
        """The raw body, bounded in size, in time and in unverified bytes held at once."""
        encodings = ",".join(request.headers.getall("Content-Encoding", [])).lower()
        if any(encoding.strip() not in _IDENTITY for encoding in encodings.split(",")):
            raise _Refused(415, "compressed bodies are refused: send plain JSON")
        if request.content_length is not None and request.content_length > self._max_body:
            raise _Refused(413, "body larger than SYNCD_HEAP_WEBHOOK_MAX_BODY")
        body = bytearray()
        try:
            async with asyncio.timeout(self._read_timeout_s):
                async for chunk in request.content.iter_any():
                    if len(body) + len(chunk) > self._max_body:
                        raise _Refused(413, "body larger than SYNCD_HEAP_WEBHOOK_MAX_BODY")
                    if self._unverified + len(chunk) > self._unverified_budget:
                        # Transient: Heap sends the page again later.
                        raise _Refused(503, "too many large bodies arriving at once")
                    self._unverified += len(chunk)
                    body += chunk
        except TimeoutError:
            raise _Refused(408, f"body not received within {self._read_timeout_s:g} s") from None
        finally:
            self._unverified -= len(body)
        return body

    def _verify(self, header: str | None, body: bytes | bytearray) -> None:
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
