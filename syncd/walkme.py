"""The WalkMe Segments API client: token, retries, and tolerant response parsing.

The API is a beta with undocumented answers (see ``shared/reference``): the
client accepts every response shape seen or plausible, retries what can be
retried (429, 5xx, timeouts, dropped connections) with backoff that honours
``Retry-After``, and turns everything else into an error that says what to fix.

Only a real acknowledgement counts: 200, 201, 202 or 204 with an empty body or
a JSON object (an array or object for list) that does not report an error. An
HTML page, a body cut short, any other 1xx/2xx, or JSON saying ``"success":
false`` is not WalkMe's answer (a proxy, a captive portal): retried like a 5xx,
then the call fails with the body's first bytes. Redirects are never followed:
a 3xx fails the call naming its ``Location``. No error text holds a secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import aiohttp
import stamina
import structlog
from pydantic import SecretStr
from stamina.instrumentation import RetryDetails

from syncd import metrics
from syncd.logs import forget_redaction, redact, redact_credentials, scrub

log = structlog.get_logger("syncd.walkme")

UpdateAction = Literal["add", "remove", "override"]
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# 203 (a proxy rewrote it), 206 (partial) and the rest are not WalkMe acknowledging.
ACK_STATUSES = frozenset({200, 201, 202, 204})
_JSON_TYPES = frozenset({"application/json", "text/json", "text/plain"})
BODY_SHOWN = 500  # characters of an error body kept in logs and messages
_GUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I)
_LIST_KEYS = ("data", "segments", "items", "results")
_GUID_KEYS = ("guid", "segmentGuid", "segmentId", "id")
_T = TypeVar("_T")
#: The ``reason`` label of ``syncd_walkme_retries_total``: a closed set, never free text.
RetryReason = Literal[
    "throttled",
    "server error",
    "token endpoint unavailable",
    "unexpected answer",
    "timeout",
    "connection error",
    "broken response",
]
for _reason in get_args(RetryReason):
    metrics.walkme_retries.labels(_reason)  # every series exists from the start, at 0

#: Requests sent, by kind ("token", "list", "create", "update"...): a caller that
#: passes one to each call it makes (a segment run) can report its own count.
RequestTally = Counter[str]

#: Awaited right before each send of a change (first try, retries, the retry after
#: a fresh token); raising stops the call with nothing sent. The engine's proves
#: the run still holds the segment's lease.
BeforeAttempt = Callable[[], Awaitable[None]]


class WalkMeError(Exception):
    """A WalkMe call failed for good; ``str()`` is safe to log and show."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class WalkMeAuthError(WalkMeError):
    """401 after a fresh token, or 403: credentials, permissions or system are wrong."""


class WalkMeNotFound(WalkMeError):
    """404: the segment (or system) does not exist."""


class WalkMeRejected(WalkMeError):
    """400: WalkMe refused the request's content (often one bad id in a batch)."""


class WalkMeTooLarge(WalkMeError):
    """413: the request was too large for WalkMe (or a proxy before it); not applied."""


class WalkMeConflict(WalkMeError):
    """409: the external id is already used by another segment (``guid`` when known)."""

    def __init__(self, message: str, status: int, body: str, guid: str | None = None) -> None:
        super().__init__(message, status, body)
        self.guid = guid


class WalkMeUnavailable(WalkMeError):
    """Retryable failures went on past the attempt budget."""


class WalkMeStopped(WalkMeError):
    """Shutdown came while a call was waiting to be retried; nothing was in flight."""


class _Retryable(Exception):
    def __init__(
        self,
        reason: RetryReason,
        status: int | None = None,
        retry_after: float | None = None,
        detail: str | None = None,
    ):
        # ``reason`` is a metrics label (a fixed word); ``detail`` is for people.
        super().__init__(detail or (reason if status is None else f"{reason} (HTTP {status})"))
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        # No connection was made (refused, DNS, unreachable, connect timeout): a
        # fail-fast client (``check``) does not try again.
        self.unconnected = False


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    retry_after: float | None
    media_type: str  # the Content-Type without parameters, lowercase; "" when absent
    location: str | None


@dataclass(frozen=True)
class RemoteSegment:
    guid: str
    name: str | None
    external_id: str | None


def normalize_guid(value: str) -> str:
    """WalkMe wants the hyphenated form (8-4-4-4-12) in paths."""
    digits = value.replace("-", "").lower()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def is_guid(value: object) -> bool:
    return isinstance(value, str) and bool(_GUID.match(value))


def segment_list(payload: Any) -> list[dict[str, Any]]:
    """The segment objects in a list answer: a bare array, or wrapped in a known key."""
    if isinstance(payload, list):
        return [item for item in payload if isinstance(item, dict)]
    if isinstance(payload, dict):
        for key in _LIST_KEYS:
            if key in payload and isinstance(payload[key], list | dict):
                return segment_list(payload[key])
    return []


def parse_segment(item: dict[str, Any]) -> RemoteSegment | None:
    """A segment's GUID is the first GUID-shaped value under a known key."""
    guid = next((item[key] for key in _GUID_KEYS if is_guid(item.get(key))), None)
    if guid is None:
        return None
    external = item.get("externalId")
    if external is None and "id" in item and not is_guid(item["id"]):
        external = item["id"]
    name = item.get("name")
    return RemoteSegment(
        guid=normalize_guid(guid),
        name=name if isinstance(name, str) else None,
        external_id=None if external is None else str(external),
    )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def create_key(system_guid: str, name: str) -> str:
    """The external id syncd sends when a mapping has none: stable per segment, so
    WalkMe's uniqueness check (409) stops a retried create from making a twin."""
    digest = hashlib.sha256(f"{system_guid.lower()}|{name}".encode()).hexdigest()
    return f"syncd-{digest[:24]}"


def log_retry(details: RetryDetails) -> None:
    """stamina hook: one ``walkme.retry`` line per scheduled retry."""
    cause = details.caused_by
    if not isinstance(cause, _Retryable):
        return  # only _Retryable is retried (see _backoff)
    metrics.walkme_retries.labels(cause.reason).inc()
    log.warning(
        "walkme.retry",
        reason=cause.reason,
        status=cause.status,
        error=str(cause),
        retry=details.retry_num,
        wait_s=round(details.wait_for, 2),
    )


def make_session(
    timeout: float, ca_bundle: Path | None = None, connect_timeout: float | None = None
) -> aiohttp.ClientSession:
    """An HTTP session with TLS verification always on (optionally a custom CA bundle)."""
    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=32),
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
        raise_for_status=False,
    )


def _endpoint(url: str) -> str:
    """``host:port`` of a URL (never its path, query or credentials)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def os_cause(error: OSError) -> str:
    """The operating system's words for a failed connection: "Connection refused",
    "Name or service not known"... (asyncio's own text only repeats the address)."""
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error.reason or error}"
    if isinstance(error.errno, int) and error.errno > 0:
        return os.strerror(error.errno)
    return str(error.strerror or error) or type(error).__name__


def _connection_failure(exc: aiohttp.ClientConnectionError, url: str) -> _Retryable:
    """A dropped or impossible connection, naming where and the OS-level cause."""
    where = _endpoint(url)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        detail = f"cannot connect to {where}: TLS certificate not trusted: {exc.certificate_error}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        detail = f"cannot connect to {where}: {os_cause(exc.os_error)}"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        detail = f"connection to {where} closed by the server before it answered"
    else:
        detail = f"connection to {where} failed: {str(exc) or type(exc).__name__}"
    failure = _Retryable("connection error", detail=scrub(detail))
    failure.unconnected = isinstance(exc, aiohttp.ClientConnectorError)
    return failure


def _excerpt(body: bytes) -> str:
    """The first bytes of an answer, never holding a secret (servers echo requests)."""
    text = scrub(body.decode("utf-8", errors="replace"))
    return text if len(text) <= BODY_SHOWN else text[:BODY_SHOWN] + "..."


def _not_walkme(kind: str, answer: _Response, why: str) -> _Retryable:
    return _Retryable(
        "unexpected answer",
        answer.status,
        detail=f"{kind} answered HTTP {answer.status} with {why}, not an acknowledgement:"
        f" {_excerpt(answer.body)!r}",
    )


def _reports_error(payload: dict[str, Any]) -> bool:
    status = payload.get("status")
    success = payload.get("success")
    return (
        success is False
        # Some gateways spell the flag as text.
        or (isinstance(success, str) and success.strip().lower() == "false")
        or bool(payload.get("error"))
        or bool(payload.get("errors"))
        or (isinstance(status, str) and status.lower() in ("error", "fail", "failed", "failure"))
    )


def _acknowledged(kind: str, answer: _Response) -> Any:
    """The JSON of a 2xx answer that is WalkMe acknowledging (None for an empty body);
    anything else raises ``_Retryable``: it was perhaps not applied, and sending again
    is safe (every call is idempotent, create is guarded by its external id)."""
    if answer.status not in ACK_STATUSES:
        raise _not_walkme(kind, answer, "a status WalkMe does not acknowledge with")
    if not answer.body.strip():
        if kind == "list":
            raise _not_walkme(kind, answer, "an empty body")
        return None
    media = answer.media_type
    if media and media not in _JSON_TYPES and not media.endswith("+json"):
        raise _not_walkme(kind, answer, f"Content-Type {media}")
    try:
        payload = json.loads(answer.body)
    except ValueError:
        raise _not_walkme(kind, answer, "a body that is not JSON") from None
    if isinstance(payload, dict) and _reports_error(payload):
        raise _not_walkme(kind, answer, "JSON reporting an error")
    if kind == "list" and not _is_list_answer(payload):
        raise _not_walkme(kind, answer, "JSON that holds no list of segments")
    if kind != "list" and not isinstance(payload, dict):
        raise _not_walkme(kind, answer, "JSON that is not an object")
    return payload


def _is_list_answer(payload: Any) -> bool:
    """A bare array, or one wrapped in a known key (as ``segment_list`` reads it)."""
    if isinstance(payload, list):
        return True
    return isinstance(payload, dict) and any(
        _is_list_answer(payload[key]) for key in _LIST_KEYS if key in payload
    )


def _redirected(kind: str, answer: _Response, setting: str) -> WalkMeError:
    where = scrub(answer.location) if answer.location else "no Location given"
    return WalkMeError(
        f"WalkMe answered HTTP {answer.status} to {kind}, redirecting to {where}: syncd never"
        f" follows redirects (nothing was sent there); if WalkMe moved, set {setting}",
        answer.status,
        _excerpt(answer.body),
    )


class _Token:
    __slots__ = ("expires_at", "value")

    def __init__(self, value: str, expires_at: float) -> None:
        self.value = value
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return "<token [redacted]>"


class WalkMeClient:
    """One WalkMe API key's view of the Segments API."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_url: str,
        token_url: str,
        client_id: str,
        client_secret: SecretStr,
        attempts: int = 8,
        max_wait: float = 60.0,
        fail_fast: bool = False,
    ) -> None:
        self._session = session
        # Interactive (``check``): a connection that cannot be made fails at once.
        self._fail_fast = fail_fast
        self._api_url = api_url.rstrip("/")
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._attempts = attempts
        self._max_wait = max_wait
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()
        self._stopped = asyncio.Event()
        self._in_flight = 0  # requests on the wire: shutdown lets them finish
        self.token_refreshes = 0
        redact_credentials(client_id, client_secret.get_secret_value())

    def __repr__(self) -> str:
        return f"<WalkMeClient {self._api_url} client_id={self._client_id}>"

    # -- token ---------------------------------------------------------------------

    async def access_token(self, tally: RequestTally | None = None) -> str:
        """A valid token; concurrent callers share one refresh (counted in the
        ``tally`` of the caller that sends it)."""
        token = self._token
        if token is not None and time.monotonic() < token.expires_at:
            return token.value
        async with self._token_lock:
            token = self._token
            if token is None or time.monotonic() >= token.expires_at:
                token = await self._retrying("token", lambda: self._fetch_token(tally))
                self._token = token
            return token.value

    def _invalidate(self, value: str) -> None:
        if self._token is not None and self._token.value == value:
            forget_redaction(value)
            self._token = None

    async def _fetch_token(self, tally: RequestTally | None) -> _Token:
        started = time.monotonic()
        answer = await self._send(
            "token",
            "POST",
            self._token_url,
            data={"grant_type": "client_credentials"},
            basic=True,
            tally=tally,
        )
        status, body = answer.status, answer.body
        if status in RETRY_STATUSES:
            wait = None if answer.retry_after is None else min(answer.retry_after, self._max_wait)
            raise _Retryable("token endpoint unavailable", status, wait)
        if 300 <= status < 400:
            raise _redirected("token", answer, "SYNCD_WALKME_TOKEN_URL")
        if status in (400, 401, 403):
            raise WalkMeAuthError(
                f"WalkMe refused the API key at {self._token_url} (HTTP {status}): check"
                " SYNCD_WALKME_CLIENT_ID and SYNCD_WALKME_CLIENT_SECRET, and that the key"
                " is active",
                status,
                _excerpt(body),
            )
        if status >= 300:
            raise WalkMeError(
                f"token call answered HTTP {status}: {_excerpt(body)}", status, _excerpt(body)
            )
        payload = _acknowledged("token", answer)
        if not isinstance(payload, dict) or not (
            isinstance(payload.get("access_token"), str) and payload["access_token"]
        ):
            raise WalkMeError("token call answered without an access_token", status)
        token_type = payload.get("token_type", "Bearer")
        if isinstance(token_type, str) and token_type.lower() != "bearer":
            raise WalkMeError(f"token call answered an unsupported token_type {token_type!r}")
        value = payload["access_token"]
        redact(value)
        try:
            lifetime = float(payload.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = 3600.0
        # Refresh early: a tenth of the lifetime, at most five minutes, so a
        # request never starts with a token about to expire in flight.
        margin = min(300.0, lifetime * 0.1)
        self.token_refreshes += 1
        metrics.token_refreshes.inc()
        log.info("walkme.token_refreshed", expires_in=lifetime)
        return _Token(value, started + lifetime - margin)

    # -- segment calls -------------------------------------------------------------

    def _segments_url(self, system_guid: str, segment_guid: str | None = None) -> str:
        url = f"{self._api_url}/public/v1/user/system/{system_guid}/segment"
        return url if segment_guid is None else f"{url}/{normalize_guid(segment_guid)}"

    async def list_segments(
        self, system_guid: str, *, tally: RequestTally | None = None
    ) -> list[RemoteSegment]:
        url = self._segments_url(system_guid)
        try:
            payload = await self._retrying(
                "list", lambda: self._call("list", "GET", url, tally=tally)
            )
        except WalkMeNotFound as exc:
            # Listing a system's segments finds no system: its GUID is wrong.
            raise WalkMeNotFound(
                f"WalkMe has no system {system_guid} (HTTP 404 listing its segments): check"
                " SYNCD_WALKME_SYSTEM_GUID (or the mapping's system_guid), the GUID in"
                f" cdn.walkme.com/users/<GUID>/; WalkMe said: {exc.body}",
                404,
                exc.body,
            ) from None
        segments = (parse_segment(item) for item in segment_list(payload))
        return [segment for segment in segments if segment is not None]

    @staticmethod
    def _created(payload: Any, name: str, key: str) -> RemoteSegment | None:
        """The segment a create answer names, if it is the one just created: an
        object (maybe wrapped; an acknowledged create answer is always an object)
        whose name and external id, when given, are ours. Otherwise the GUID is found
        by listing."""
        if not isinstance(payload, dict):
            return None
        wrapped = [payload[k] for k in _LIST_KEYS if isinstance(payload.get(k), dict)]
        for item in [payload, *wrapped[:1]]:
            created = parse_segment(item)
            if created is None:
                continue
            if created.name not in (None, name) or created.external_id not in (None, key):
                return None  # not the segment just created: never adopt a stranger
            return created
        return None

    async def find_segment(
        self,
        system_guid: str,
        name: str,
        external_id: str | None,
        *,
        tally: RequestTally | None = None,
    ) -> RemoteSegment | None:
        """The segment with this external id (when given) or else this name."""
        segments = await self.list_segments(system_guid, tally=tally)
        if external_id is not None:
            return next((s for s in segments if s.external_id == external_id), None)
        return next((s for s in segments if s.name == name), None)

    async def create_segment(
        self,
        system_guid: str,
        name: str,
        external_id: str | None,
        user_ids: list[str],
        before_attempt: BeforeAttempt | None = None,
        *,
        tally: RequestTally | None = None,
    ) -> str:
        """Create a segment holding ``user_ids``; returns its GUID.

        A create whose answer was lost may have been applied: before each retry
        the segment is looked up by its external id (syncd's own key when the
        mapping has none), and WalkMe refuses a second segment with that id, so a
        retry never makes a twin. WalkMeConflict(guid=...) means our key is taken
        by a segment whose members are unknown: the caller adopts it.
        """
        key = external_id or create_key(system_guid, name)
        body: dict[str, Any] = {"id": key, "name": name, "userIds": user_ids}
        url = self._segments_url(system_guid)
        first = True

        async def attempt() -> str:
            nonlocal first
            if not first:
                existing = await self.find_segment(system_guid, name, key, tally=tally)
                if existing is not None:
                    return existing.guid
            first = False
            try:
                payload = await self._call("create", "POST", url, body, before_attempt, tally)
            except WalkMeError as exc:
                if exc.status != 409:
                    raise
                if external_id is not None:
                    raise WalkMeConflict(
                        f"WalkMe already has a segment with external id {external_id!r}"
                        f" (HTTP 409) but not named {name!r}: set segment_guid in the mapping"
                        " to adopt it, or use another external_id",
                        409,
                        exc.body,
                    ) from None
                found = await self.find_segment(system_guid, name, key, tally=tally)
                raise WalkMeConflict(
                    f"segment {name!r} already exists in WalkMe (HTTP 409)",
                    409,
                    exc.body,
                    guid=found.guid if found else None,
                ) from None
            created = self._created(payload, name, key)
            if created is not None:
                return created.guid
            # The answer carried no GUID: find the new segment by listing.
            found = await self.find_segment(system_guid, name, key, tally=tally)
            if found is None:
                raise WalkMeError(f"created segment {name!r} but cannot find its GUID")
            return found.guid

        return await self._retrying("create", attempt)

    async def update_segment(
        self,
        system_guid: str,
        segment_guid: str,
        action: UpdateAction,
        user_ids: list[str],
        before_attempt: BeforeAttempt | None = None,
        *,
        tally: RequestTally | None = None,
    ) -> None:
        url = self._segments_url(system_guid, segment_guid)
        body = {"action": action, "userIds": user_ids}
        await self._retrying(
            "update", lambda: self._call("update", "PUT", url, body, before_attempt, tally)
        )

    async def delete_segment(self, system_guid: str, segment_guid: str) -> None:
        url = self._segments_url(system_guid, segment_guid)
        await self._retrying("delete", lambda: self._call("delete", "DELETE", url))

    # -- plumbing ------------------------------------------------------------------

    def stop(self) -> None:
        """Shutdown: requests on the wire finish; waiting for a retry ends now."""
        self._stopped.set()

    async def _retrying(self, kind: str, call: Callable[[], Awaitable[_T]]) -> _T:
        if self._stopped.is_set():
            raise WalkMeStopped(f"not sending {kind}: syncd is stopping")
        calling = asyncio.ensure_future(self._retry_loop(kind, call))
        stopping = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({calling, stopping}, return_when=asyncio.FIRST_COMPLETED)
            while not calling.done() and self._in_flight:
                await asyncio.wait({calling}, timeout=0.05)
            if calling.done():
                return calling.result()
            calling.cancel()
            raise WalkMeStopped(f"stopped while waiting to retry {kind}: syncd is stopping")
        finally:
            stopping.cancel()
            if not calling.done():
                calling.cancel()

    def _backoff(self, exc: Exception) -> bool | float:
        if self._fail_fast and isinstance(exc, _Retryable) and exc.unconnected:
            return False
        return _backoff(exc)

    async def _retry_loop(self, kind: str, call: Callable[[], Awaitable[_T]]) -> _T:
        tries = 0
        try:
            async for attempt in backoff_attempts(
                self._backoff, self._attempts, 0.5, self._max_wait
            ):
                with attempt:
                    tries = attempt.num
                    return await call()
        except _Retryable as exc:
            times = "once" if tries == 1 else f"{tries} times"
            raise WalkMeUnavailable(
                f"WalkMe {kind} call failed {times}; last: {exc}", exc.status
            ) from None
        raise AssertionError("stamina ended without a result")  # pragma: no cover

    async def _call(
        self,
        kind: str,
        method: str,
        url: str,
        body: Any = None,
        before_attempt: BeforeAttempt | None = None,
        tally: RequestTally | None = None,
    ) -> Any:
        """One authenticated call; a 401 gets one fresh token and one more try."""
        token = await self.access_token(tally)
        if before_attempt is not None:
            await before_attempt()
        answer = await self._send(kind, method, url, json_body=body, token=token, tally=tally)
        if answer.status == 401:
            self._invalidate(token)
            token = await self.access_token(tally)
            if before_attempt is not None:
                await before_attempt()
            answer = await self._send(kind, method, url, json_body=body, token=token, tally=tally)
            if answer.status == 401:
                raise WalkMeAuthError(
                    "WalkMe answered 401 to a fresh token: the API key may have been revoked"
                    " or rotated (check SYNCD_WALKME_CLIENT_ID/SECRET)",
                    401,
                    _excerpt(answer.body),
                )
        status = answer.status
        if status < 300:
            return _acknowledged(kind, answer)
        if status < 400:
            raise _redirected(kind, answer, "SYNCD_WALKME_API_URL")
        excerpt = _excerpt(answer.body)
        if status in RETRY_STATUSES:
            wait = None if answer.retry_after is None else min(answer.retry_after, self._max_wait)
            raise _Retryable("throttled" if status == 429 else "server error", status, wait)
        log.warning("walkme.rejected", kind=kind, status=status, body=excerpt)
        if status == 403:
            raise WalkMeAuthError(
                "WalkMe answered 403: the API key is valid but not allowed here; check that"
                " the key has the Segments API with Read and Write, and that"
                " SYNCD_WALKME_SYSTEM_GUID (or the mapping's system_guid) is right",
                403,
                excerpt,
            )
        if status == 404:
            raise WalkMeNotFound(f"WalkMe answered 404 for {kind}: {excerpt}", 404, excerpt)
        if status == 400:
            raise WalkMeRejected(f"WalkMe answered 400 to {kind}: {excerpt}", 400, excerpt)
        if status == 413:
            raise WalkMeTooLarge(
                f"WalkMe answered 413 (payload too large) to {kind}: {excerpt}", 413, excerpt
            )
        raise WalkMeError(f"WalkMe answered HTTP {status} to {kind}: {excerpt}", status, excerpt)

    async def _send(
        self,
        kind: str,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        data: dict[str, str] | None = None,
        token: str | None = None,
        basic: bool = False,
        tally: RequestTally | None = None,
    ) -> _Response:
        headers = {"Accept": "application/json"}
        payload: bytes | dict[str, str] | None = data
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if basic:
            credentials = f"{self._client_id}:{self._client_secret.get_secret_value()}"
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(json_body, separators=(",", ":")).encode()
        if tally is not None:
            tally[kind] += 1
        started = time.monotonic()
        status = "error"
        self._in_flight += 1
        try:
            # A redirect is never followed: the ids (or the credentials) would go to
            # whoever the Location names, and their 200 would count as WalkMe's.
            async with self._session.request(
                method, url, data=payload, headers=headers, allow_redirects=False
            ) as response:
                body = await response.read()
                status = str(response.status)
                media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                return _Response(
                    response.status,
                    body,
                    parse_retry_after(response.headers.get("Retry-After")),
                    media,
                    response.headers.get("Location"),
                )
        except aiohttp.ConnectionTimeoutError:
            failure = _Retryable(
                "timeout", detail=f"cannot connect to {_endpoint(url)}: connect timed out"
            )
            failure.unconnected = True
            raise failure from None
        except TimeoutError:
            raise _Retryable(
                "timeout", detail=f"no answer from {_endpoint(url)} in time (SYNCD_HTTP_TIMEOUT)"
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise _connection_failure(exc, url) from None
        except aiohttp.ClientPayloadError as exc:
            raise _Retryable(
                "broken response",
                detail=f"answer from {_endpoint(url)} cut short: {type(exc).__name__}",
            ) from None
        finally:
            self._in_flight -= 1
            metrics.walkme_requests.labels(kind, status).inc()
            metrics.walkme_latency.labels(kind).observe(time.monotonic() - started)


def backoff_attempts(
    on: Callable[[Exception], bool | float], attempts: int, wait_initial: float, wait_max: float
) -> AsyncIterator[stamina.Attempt]:
    """stamina's attempts as syncd retries: ``on`` decides (a float is Retry-After's
    wait), exponential from ``wait_initial`` plus up to 1 s of jitter, capped at
    ``wait_max``; ``attempts`` alone bounds the whole, not a timeout."""
    return stamina.retry_context(
        on=on,
        attempts=attempts,
        timeout=None,
        wait_initial=wait_initial,
        wait_max=wait_max,
        wait_jitter=1.0,
    )


def _backoff(exc: Exception) -> bool | float:
    """stamina's decision: retry transient failures, after Retry-After when given."""
    if isinstance(exc, _Retryable):
        return exc.retry_after if exc.retry_after is not None else True
    return False
