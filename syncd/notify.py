"""Messages for a person (``SYNCD_NOTIFY_URL``), delivered in the background.

The engine decides when a segment needs a human and what to say
(``syncd.engine.notices``); this module only delivers: a bounded queue and one
sender task, so a sync never waits on the receiver, and stamina's backoff between
attempts (``Retry-After`` honoured; waits capped by ``SYNCD_RETRY_MAX_WAIT``). A
message that cannot be delivered is a ``notify.failed`` line and a
``syncd_notifications_total{result="failed"}`` count, never a failed sync.

The URL holds the receiver's token (a Slack webhook's path is its credential): it
is shown as scheme://host only, and registered for scrubbing in every form.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import aiohttp
import structlog
from pydantic import SecretStr

from syncd import metrics
from syncd.logs import redact, scrub
from syncd.settings import printable
from syncd.walkme import backoff_attempts, os_cause, parse_retry_after

log = structlog.get_logger("syncd.notify")

#: What a message is about; "unknown" only counts a message the state store kept
#: syncd from deciding on (the metric's label, never a message's).
NotifyEvent = Literal["failing", "held", "quarantined", "recovered"]
MetricEvent = NotifyEvent | Literal["unknown"]
ATTEMPTS = 5  # per message: with the default waits, about 15 s of a receiver's outage
QUEUE_LIMIT = 100  # messages waiting; more means the receiver is down: drop, say so
ANSWER_SHOWN = 200  # characters of a refusal's body kept in the log line
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_SHORTEST_SECRET_PART = 8  # a URL's path or query this short cannot be a token

for _event in (*get_args(NotifyEvent), "unknown"):
    for _result in ("sent", "failed"):
        metrics.notifications.labels(_event, _result)  # every series exists from the start


@dataclass(frozen=True)
class Notice:
    """One message: the JSON body to post, and what it is about (for logs, metrics)."""

    segment: str
    event: NotifyEvent
    body: dict[str, Any]


def describe_receiver(url: str) -> str:
    """The receiver as logs may show it: scheme://host[:port], never the path or query."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    shown = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{shown}{port}"


def redact_receiver(url: str) -> None:
    """Never let the URL, or the parts after its host (where the token is), or a
    password in it appear in any output."""
    parts = urlsplit(url)
    redact(url)
    after_host = url.split(parts.netloc, 1)[-1]
    for piece in (after_host, parts.path, parts.query):
        if len(piece) >= _SHORTEST_SECRET_PART:
            redact(piece)
    if parts.password:
        redact(parts.password)


def count_failed(event: MetricEvent) -> None:
    metrics.notifications.labels(event, "failed").inc()


class _Undelivered(Exception):
    """One attempt failed; ``retry``: another may work."""

    def __init__(self, detail: str, *, retry: bool = True, retry_after: float | None = None):
        super().__init__(detail)
        self.retry = retry
        self.retry_after = retry_after


def _backoff(exc: Exception) -> bool | float:
    """stamina's decision: retry what may pass later, after Retry-After when given."""
    if isinstance(exc, _Undelivered) and exc.retry:
        return exc.retry_after if exc.retry_after is not None else True
    return False


class Notifier:
    """Posts each ``Notice`` as JSON to the receiver, in order, one at a time."""

    def __init__(
        self, url: SecretStr, *, timeout_s: float, max_wait: float, attempts: int = ATTEMPTS
    ) -> None:
        self._url = url
        self.receiver = describe_receiver(url.get_secret_value())
        self._timeout_s = timeout_s
        self._max_wait = max_wait
        self._attempts = attempts
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(QUEUE_LIMIT)
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    def send(self, notice: Notice) -> None:
        """Queue the message and return at once."""
        if self._closed:
            self._failed(notice, 0, "syncd was stopping: not sent")
            return
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            self._failed(
                notice, 0, f"{QUEUE_LIMIT} messages already wait: the receiver is down or slow"
            )
            return
        if self._sender is None:
            # A context of its own: the sender's log lines belong to no segment run.
            self._sender = asyncio.create_task(self._send_all(), context=contextvars.Context())

    async def close(self) -> None:
        """Wait up to SYNCD_NOTIFY_TIMEOUT for the messages queued, then give up on the
        rest (a ``notify.failed`` line each). A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        sender = self._sender
        if sender is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), self._timeout_s)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        while not self._queue.empty():
            self._failed(self._queue.get_nowait(), 0, "syncd stopped before it was sent")

    async def _send_all(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, raise_for_status=False) as session:
            while True:
                notice = await self._queue.get()
                try:
                    await self._deliver(session, notice)
                except Exception as exc:
                    # A bug must lose this message only, not stop the messages after it.
                    self._failed(notice, 0, f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    self._queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, notice: Notice) -> None:
        tries = 0
        try:
            async for attempt in backoff_attempts(_backoff, self._attempts, 1.0, self._max_wait):
                with attempt:
                    tries = attempt.num
                    await self._post(session, notice)
        except _Undelivered as exc:
            self._failed(notice, tries, str(exc))
            return
        except asyncio.CancelledError:
            self._failed(notice, tries, "syncd stopped before it was delivered")
            raise
        metrics.notifications.labels(notice.event, "sent").inc()
        log.info("notify.sent", **self._log_fields(notice, tries))

    async def _post(self, session: aiohttp.ClientSession, notice: Notice) -> None:
        """One attempt; raises ``_Undelivered`` unless the receiver answered 2xx."""
        receiver = self.receiver
        try:
            # A redirect is not followed: the message would go where the Location says.
            async with session.post(
                self._url.get_secret_value(), json=notice.body, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                answer = (await response.read()).decode("utf-8", errors="replace")
        except TimeoutError:
            raise _Undelivered(
                f"no answer from {receiver} within {self._timeout_s:g} s (SYNCD_NOTIFY_TIMEOUT)"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise _Undelivered(f"cannot connect to {receiver}: {os_cause(exc.os_error)}") from None
        except aiohttp.ClientError as exc:
            # Never str(exc): aiohttp's texts may quote the URL.
            raise _Undelivered(f"{receiver}: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            raise _Undelivered(
                f"{receiver} answered HTTP {status}, a redirect (not followed): set"
                " SYNCD_NOTIFY_URL to the address it names",
                retry=False,
            )
        if status in _RETRY_STATUSES:
            wait = None if retry_after is None else min(retry_after, self._max_wait)
            raise _Undelivered(f"{receiver} answered HTTP {status}", retry_after=wait)
        raise _Undelivered(
            f"{receiver} refused the message with HTTP {status} (not retried; check"
            f" SYNCD_NOTIFY_URL): {scrub(answer)[:ANSWER_SHOWN]!r}",
            retry=False,
        )

    def _failed(self, notice: Notice, attempts: int, error: str) -> None:
        count_failed(notice.event)
        log.error("notify.failed", **self._log_fields(notice, attempts), error=error)

    def _log_fields(self, notice: Notice, attempts: int) -> dict[str, Any]:
        return {
            "segment": printable(notice.segment),
            "notice": notice.event,
            "receiver": self.receiver,
            "attempts": attempts,
        }
